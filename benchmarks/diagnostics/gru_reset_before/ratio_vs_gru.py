"""genfast.nn.GRU(reset_after=False) against genfast.nn.GRU (reset_after=True) on the same weights and input,
alone: the two modules timed in alternation, round by round, and the median of the per-round ratios
(reset_before / plain) printed per shape and mode. The benchmark cases gru_reset_before.* time the same
pair among slow baselines; this is the quick check of the one ratio.

    PYTHONPATH=. python benchmarks/diagnostics/gru_reset_before/ratio_vs_gru.py [--rounds 15] [--threads N]
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

import genfast.nn as gnn

SHAPES = {"fastrnns": dict(T=100, N=64, I=512, H=512), "imdb": dict(T=100, N=32, I=256, H=64)}


def runner(module, x, h0, training):
    def run():
        with torch.set_grad_enabled(training):
            out, _ = module(x, h0)
            if training:
                out.sum().backward()
    return run


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--threads", type=int)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"threads {torch.get_num_threads()}, rounds {args.rounds}")
    for name, s in SHAPES.items():
        torch.manual_seed(0)
        plain = gnn.GRU(s["I"], s["H"])
        before = gnn.GRU.from_torch(plain)
        before.reset_after = False
        x = torch.randn(s["T"], s["N"], s["I"])
        h0 = torch.randn(1, s["N"], s["H"])
        for training in (False, True):
            fns = [runner(plain, x, h0, training), runner(before, x, h0, training)]
            for fn in fns * 2:  # warm-up
                fn()
            ratios, times = [], [[], []]
            for r in range(args.rounds):
                order = (0, 1) if r % 2 == 0 else (1, 0)
                t = [0.0, 0.0]
                for i in order:
                    start = time.perf_counter()
                    fns[i]()
                    t[i] = time.perf_counter() - start
                    times[i].append(t[i])
                ratios.append(t[1] / t[0])
            mode = "training" if training else "inference"
            print(f"{name:9s} {mode:9s} plain {statistics.median(times[0]) * 1e3:8.2f} ms  reset_before "
                  f"{statistics.median(times[1]) * 1e3:8.2f} ms  ratio (median per round) {statistics.median(ratios):.2f}"
                  f"  [quartiles {statistics.quantiles(ratios, n=4)[0]:.2f}, {statistics.quantiles(ratios, n=4)[2]:.2f}]")


if __name__ == "__main__":
    main()
