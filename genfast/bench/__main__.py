"""The benchmark command: genfast against the PyTorch baselines, side by side.

    python -m genfast.bench                 # --quick: a representative subset, < 3 min on 2 cores
    python -m genfast.bench --full          # every case
    python -m genfast.bench --filter lstm.fastrnns --json out.json --plot speedups.png
    python -m genfast.bench --list          # case names, for --filter
    python -m genfast.bench --device cuda   # on a GPU: the GPU session's cases (gpu.*)
    python -m genfast.bench --ab ../other   # this build against another checkout's, alternating
    python -m genfast.bench --sweep         # LSTM/GRU shape sweep against torch.nn: CSV + heatmaps
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

# Set-dependent timing: --quick keeps to the minimum number of rounds on heavy cases;
# --full spends longer per case for tighter spreads; smoke is for the suite's tests.
PLANS = {
    "quick": dict(warmup_calls=1, warmup_s=0.05, min_sample_s=0.002, min_rounds=5, budget_s=0.6),
    "full": dict(warmup_calls=2, warmup_s=0.2, min_sample_s=0.005, min_rounds=7, budget_s=3.0),
    "smoke": dict(warmup_calls=1, warmup_s=0.0, min_sample_s=0.0002, min_rounds=5, budget_s=0.0),
}
PEAK_BUDGET_S = {"quick": 4.0, "full": 8.0, "smoke": 0.2}
# The smoke set measures nothing worth a peak; a small GEMM keeps its tests fast.
PEAK_SHAPES = {"smoke": ((512, 512, 512),)}


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m genfast.bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    which = parser.add_mutually_exclusive_group()
    which.add_argument("--quick", dest="set", action="store_const", const="quick",
                       help="representative subset, under 3 minutes on a 2-core CPU (default)")
    which.add_argument("--full", dest="set", action="store_const", const="full", help="every case")
    which.add_argument("--smoke", dest="set", action="store_const", const="smoke",
                       help="tiny shapes: checks the suite runs, measures nothing useful")
    parser.add_argument("--filter", metavar="SUBSTR",
                        help="only cases whose name contains SUBSTR (several: comma-separated, any one)")
    parser.add_argument("--json", metavar="PATH", help="write every sample and statistic as JSON")
    parser.add_argument("--plot", metavar="PATH", help="write a PNG bar chart of genfast's speedups")
    parser.add_argument("--csv", metavar="PATH", help="append the run to this CSV "
                        "(default: benchmarks/results/runs.csv in the checkout, else ./benchmarks/results/)")
    parser.add_argument("--no-csv", action="store_true", help="don't append the run to the CSV log")
    parser.add_argument("--threads", type=int, metavar="N", help="torch.set_num_threads(N) (default: torch's)")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                        help="auto: cuda when available, else cpu")
    parser.add_argument("--compile-timeout", type=float, metavar="S",
                        help="compiled_reference (--full): give up compiling after S seconds "
                             "(default 120, or $GENFAST_BENCH_COMPILE_TIMEOUT)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    parser.add_argument("--list", action="store_true", help="print the selected case names and exit")
    parser.add_argument("--no-peak", action="store_true", help="don't measure the GEMM peak (no %%peak column)")
    parser.add_argument("--ab", metavar="OTHER_CHECKOUT",
                        help="run the selected cases in this build (A) and in OTHER_CHECKOUT's build (B), one "
                             "process per build per round, alternating; print ratios in A and B and A/B times")
    parser.add_argument("--ab-rounds", type=int, default=3, metavar="N",
                        help="--ab: rounds (one process per build each) (default 3)")
    from genfast.bench import sweep

    sweep.add_arguments(parser)
    parser.set_defaults(set="quick")
    return parser


def case_dtype(case, device: str) -> str:
    """The dtype whose GEMM peak a case's %peak is taken against: its own on CUDA, fp32 on the CPU."""
    if device != "cuda":
        return "float32"
    default = "float16" if case.kind == "attention" else "float32"
    return case.params.get("dtype", default)


def default_csv_path() -> Path:
    from genfast.bench.machine import repo_root

    root = repo_root() or Path.cwd()
    return root / "benchmarks" / "results" / "runs.csv"


def main(argv: list[str] | None = None) -> int:
    started = time.perf_counter()
    args = _parser().parse_args(argv)

    if args.sweep:
        from genfast.bench import sweep

        return sweep.run(args)
    import torch

    from genfast.bench import cases as case_sets
    from genfast.bench import machine, providers, report, runner, timing

    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    selected = case_sets.cases(args.set, args.filter, device)
    if args.list:
        for case in selected:
            print(case.name)
        return 0
    if not selected:
        print(f"no case in the {args.set} set on {device} matches --filter {args.filter!r} (see --list)",
              file=sys.stderr)
        return 2
    if args.threads is not None and args.threads < 1:
        print(f"--threads must be >= 1, got {args.threads}", file=sys.stderr)
        return 2
    if args.ab:
        from genfast.bench import ab

        return ab.run(args, device, args.ab)
    if device == "cuda" and not torch.cuda.is_available():
        print("--device cuda: torch sees no CUDA device", file=sys.stderr)
        return 2
    # Fixed for the whole run (and printed in the header), whether given or torch's default.
    torch.set_num_threads(args.threads or torch.get_num_threads())
    if device == "cuda":  # float32 means IEEE fp32 products, for genfast and the baselines alike
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False

    if args.compile_timeout is not None:
        providers.COMPILE_TIMEOUT_S = args.compile_timeout
    header = machine.header(device, torch.get_num_threads())
    setup_s = time.perf_counter() - started
    peak_shapes = PEAK_SHAPES.get(args.set)
    measure_peak = not args.no_peak
    no_peak = {"gflops": 0.0, "source": "not measured (--no-peak)", "all": {}, "by_method": {}, "rounds": 0,
               "dtype": "float32", "probe": "-"}
    peak = (machine.measure_peak(device, torch.float32, budget_s=PEAK_BUDGET_S[args.set], shapes=peak_shapes)
            if measure_peak else no_peak)
    peaks = {"float32": peak}
    # On a GPU each case is compared with the peak of its own dtype (the attention cases run in
    # fp16 or bf16); on the CPU with the fp32 peak.
    for dtype in dict.fromkeys(case_dtype(case, device) for case in selected):
        if dtype not in peaks:
            peaks[dtype] = (machine.measure_peak(device, getattr(torch, dtype), budget_s=PEAK_BUDGET_S[args.set],
                                                 shapes=peak_shapes) if measure_peak else dict(no_peak, dtype=dtype))
    plan = timing.TimingPlan(**PLANS[args.set])

    peak_s = time.perf_counter() - started - setup_s
    results = []
    progress = None
    if not args.no_progress:
        from tqdm import tqdm

        progress = tqdm(total=len(selected), file=sys.stderr, unit="case", dynamic_ncols=True)
    for index, case in enumerate(selected):
        if progress is not None:
            progress.set_description(case.name)
        results.append(runner.run_case(case, device, plan, peaks[case_dtype(case, device)]["gflops"]))
        if progress is not None:
            progress.update(1)
        else:  # a log line per case, so a run cut short (a GPU session's time limit) shows how far it got
            print(f"[{index + 1}/{len(selected)}] {case.name}: {results[-1].wall_s:.1f}s", file=sys.stderr,
                  flush=True)
        if args.json:  # what was measured so far survives a run that is killed
            partial = report.to_json(header, peaks, plan, args.set, results)
            partial.update(partial=True)
            report.write_json(args.json, partial)
    if progress is not None:
        progress.close()
    if args.set != "smoke" and measure_peak and device == "cpu":
        # Measure the peak again at the end and keep the better of the two: on a shared
        # machine a peak taken while others load the CPU is too low, and % of peak too high.
        again = machine.measure_peak(device, torch.float32, budget_s=PEAK_BUDGET_S[args.set], shapes=peak_shapes)
        if again["gflops"] > peak["gflops"]:
            peak = peaks["float32"] = again
            for result in results:
                for p in result.providers.values():
                    if p.gflops is not None and case_dtype(result.case, device) == "float32":
                        p.pct_peak = 100.0 * p.gflops / peak["gflops"]

    print(report.header_text(header, peak, plan, args.set, peaks))
    print()
    print(report.table(results))
    document = report.to_json(header, peaks, plan, args.set, results)
    document.update(wall_s=time.perf_counter() - started, import_s=setup_s, peak_s=peak_s)
    if args.json:
        report.write_json(args.json, document)
        print(f"\nJSON: {args.json}")
    if args.plot:
        report.plot(args.plot, results, f"genfast speedups ({args.set}, {header['cpu']}, "
                                        f"{header['threads']} threads, {header['date']})")
        print(f"plot: {args.plot}")
    if not args.no_csv:
        path = Path(args.csv) if args.csv else default_csv_path()
        lines = report.append_csv(path, header, results)
        print(f"CSV: appended {lines} lines to {path}")
    print(f"wall time: {time.perf_counter() - started:.1f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
