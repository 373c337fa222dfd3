"""Issue 19's regulariser cases (genfast/bench/cases.py: {lstm,gru}.regularizers.*), timed by this thread's
CPU time with torch on one thread, alternating plain and regularised module call by call.

On a shared 2-core VM the harness's wall-clock ratios of these cases spread by +-15% per round; CPU time
is not inflated by preemption, so the same comparison settles within a few rounds. One thread only:
thread_time counts the calling thread alone.

    PYTHONPATH=. python benchmarks/diagnostics/regularizers/module_cpu_time.py [FILTER] [ROUNDS]
"""
import statistics
import sys

import torch

from genfast.bench import cases, providers
from genfast.bench.timing import alternating_thread_times


def main(name_filter: str = "regularizers", rounds: int = 30) -> None:
    torch.set_num_threads(1)
    for case in cases.cases("full", name_filter):
        if case.kind != "rnn":  # the LayerNorm cells' regulariser cases: benchmarks/diagnostics/layernorm_speed
            continue
        work = providers.WORKLOADS[case.kind](case, "cpu")
        fns = {name: providers.PROVIDERS["rnn"][name].build(work) for name in ("genfast", "genfast_regularized")}
        times = alternating_thread_times(fns, rounds)
        ratios = [r / p for r, p in zip(times["genfast_regularized"], times["genfast"])]
        q1, _, q3 = statistics.quantiles(ratios, n=4)
        print(f"{case.name:52s} regularised / plain {statistics.median(ratios):.3f} (IQR {q1:.3f}-{q3:.3f}, "
              f"{rounds} rounds; plain {statistics.median(times['genfast']) * 1e3:.1f} ms CPU)", flush=True)


if __name__ == "__main__":
    main(*(sys.argv[1:2] or ["regularizers"]), *[int(a) for a in sys.argv[2:3]])
