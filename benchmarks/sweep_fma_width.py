"""Which cells of a `GENFAST_SIMD=avx2` sweep the FMA width alone keeps below parity.

    python benchmarks/sweep_fma_width.py AVX512_SWEEP.csv AVX2_SWEEP.csv [--threshold 0.95] [--peaks W,N]

The two CSVs are `python -m genfast.bench --sweep` runs of one build, as installed and under
`GENFAST_SIMD=avx2` (torch.nn stays on oneDNN's AVX-512 kernels in both). genfast's GEMM peak is
measured here at both SIMD levels (genfast.bench.machine.measure_peak, one process per level, the
sweep's thread count), or taken from --peaks (AVX-512, AVX2 GFLOP/s). For every cell below the threshold under AVX2 it prints:

- predicted: the AVX-512 run's ratio times peak(AVX2) / peak(AVX-512), the ratio the same code
  would reach on AVX2 at the same fraction of its peak. Below the threshold: the FMA width alone
  keeps the cell below, whatever the schedule;
- slowdown: genfast's own AVX-512 time / its AVX2 time on the cell;
- efficiency: GFLOP/s over the level's peak, AVX2 / AVX-512 (1: the AVX2 kernels do as well
  against their peak as the AVX-512 ones against theirs).
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import statistics
import subprocess
import sys

_PEAK = ("import json, torch; from genfast.bench.machine import measure_peak; torch.set_num_threads({threads}); "
         "print(json.dumps(measure_peak(budget_s=6.0)['by_method']))")


def genfast_peak(simd: str | None, threads: int) -> float:
    env = {k: v for k, v in os.environ.items() if k != "GENFAST_SIMD"}
    if simd:
        env["GENFAST_SIMD"] = simd
    done = subprocess.run([sys.executable, "-c", _PEAK.format(threads=threads)], env=env, capture_output=True,
                          text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])["genfast packed"]


def load(path: str) -> dict:
    with open(path) as f:
        return {(r["cell"], r["mode"], r["T"], r["N"], r["H"], r["packed"]): r for r in csv.DictReader(f)}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("avx512_csv")
    parser.add_argument("avx2_csv")
    parser.add_argument("--threshold", type=float, default=0.95)
    parser.add_argument("--peaks", help="AVX-512,AVX2 genfast GEMM peaks in GFLOP/s, instead of measuring them")
    args = parser.parse_args(argv)
    wide, narrow = load(args.avx512_csv), load(args.avx2_csv)
    threads = int(next(iter(narrow.values()))["threads"])
    if args.peaks:
        peak_wide, peak_narrow = (float(v) for v in args.peaks.split(","))
    else:
        peak_wide, peak_narrow = genfast_peak(None, threads), genfast_peak("avx2", threads)
    print(f"genfast packed GEMM peak, {threads} threads: AVX-512 {peak_wide:.0f} GFLOP/s, AVX2 {peak_narrow:.0f} "
          f"GFLOP/s (x{peak_narrow / peak_wide:.2f})")
    below = [k for k in narrow if k in wide and float(narrow[k]["ratio"]) < args.threshold]
    print(f"{len(below)} of {len(narrow)} cells below {args.threshold} under AVX2")
    print("cell mode T N H packed | ratio AVX-512 | ratio AVX2 | predicted | slowdown | efficiency")
    explained, slowdowns, efficiencies = 0, [], []
    for key in sorted(below, key=lambda k: (k[0], k[1], int(k[2]), int(k[3]), int(k[4]))):
        a, b = wide[key], narrow[key]
        predicted = float(a["ratio"]) * peak_narrow / peak_wide
        slowdown = float(a["genfast_ms"]) / float(b["genfast_ms"])
        efficiency = (float(b["genfast_gflops"]) / peak_narrow) / (float(a["genfast_gflops"]) / peak_wide)
        explained += predicted < args.threshold
        slowdowns.append(slowdown)
        efficiencies.append(efficiency)
        print(" ".join(key), f"| {float(a['ratio']):.2f} | {float(b['ratio']):.2f} | {predicted:.2f} | "
              f"{slowdown:.2f} | {efficiency:.2f}")
    if below:
        print(f"predicted below {args.threshold}: {explained} of {len(below)}; slowdown median "
              f"{statistics.median(slowdowns):.2f} ({min(slowdowns):.2f}-{max(slowdowns):.2f}); efficiency median "
              f"{statistics.median(efficiencies):.2f} ({min(efficiencies):.2f}-{max(efficiencies):.2f})")


if __name__ == "__main__":
    main()
