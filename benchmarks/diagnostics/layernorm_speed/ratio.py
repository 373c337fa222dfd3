"""LN cell / plain cell, training step (genfast.bench's layernorm_{lstm,gru}.<workload>.training cases), timed
by this thread's CPU time with torch on one thread, alternating the two module calls; prints the median ratio
per case. To A/B a kernel change, run it once per build, the builds' processes alternating
(docs/performance.md 2.5.2):

    for i in 1 2 3; do for c in <before> <after>; do
      PYTHONPATH=$c python benchmarks/diagnostics/layernorm_speed/ratio.py imdb 20 lstm,gru; done; done
"""
import statistics
import sys

import torch

from genfast.bench import cases, providers
from genfast.bench.timing import alternating_thread_times


def main(workload: str = "imdb", rounds: int = 20, cells: str = "lstm,gru") -> None:
    torch.set_num_threads(1)
    for cell in cells.split(","):
        (case,) = [c for c in cases.cases("full", f"layernorm_{cell}.{workload}.training")]
        work = providers.WORKLOADS[case.kind](case, "cpu")
        fns = {"ln": providers.PROVIDERS["layernorm_rnn"]["genfast"].build(work),
               "plain": providers.PROVIDERS["layernorm_rnn"]["genfast_plain"].build(work)}
        times = alternating_thread_times(fns, rounds)
        ratios = [a / b for a, b in zip(times["ln"], times["plain"])]
        q1, _, q3 = statistics.quantiles(ratios, n=4)
        print(f"{case.name:40s} LN / plain {statistics.median(ratios):.3f} (IQR {q1:.3f}-{q3:.3f}, {rounds} rounds; "
              f"LN {statistics.median(times['ln']) * 1e3:.2f} ms, plain {statistics.median(times['plain']) * 1e3:.2f} ms CPU)",
              flush=True)


if __name__ == "__main__":
    main(*(sys.argv[1:2] or ["imdb"]), *[int(a) for a in sys.argv[2:3]], *sys.argv[3:4])
