"""A/B of the plain (no regulariser) genfast.nn.LSTM/GRU path between this checkout and another, by this
thread's CPU time with torch on one thread: one process per build per round, alternating, each timing
`calls` calls of every case and keeping the median. Wall-clock A/B on the shared 2-core VM under load
spread by x0.6-1.8 for identical code; CPU time is not inflated by preemption.

    PYTHONPATH=. python benchmarks/diagnostics/regularizers/plain_ab_cpu_time.py OTHER_CHECKOUT [ROUNDS]
"""
import json
import os
import statistics
import subprocess
import sys

CASES = ["lstm.imdb.training", "lstm.imdb.inference", "gru.fastrnns.training", "lstm.fastrnns.training",
         "lstm.decode.h256.inference"]
CHILD = r"""
import json, statistics, sys, time, torch
from genfast.bench import cases, providers
torch.set_num_threads(1)
out = {}
for name in sys.argv[1].split(","):
    case = cases.find(name)
    fn = providers.PROVIDERS["rnn"]["genfast"].build(providers.WORKLOADS[case.kind](case, "cpu"))
    fn(); fn()
    calls = 400 if "decode" in name else 40 if "imdb" in name else 3
    times = []
    for _ in range(calls):
        started = time.thread_time()
        fn()
        times.append(time.thread_time() - started)
    out[name] = statistics.median(times)
print(json.dumps(out))
"""


def run(checkout: str) -> dict:
    env = dict(os.environ, PYTHONPATH=checkout)
    result = subprocess.run([sys.executable, "-c", CHILD, ",".join(CASES)], env=env, cwd=checkout,
                            capture_output=True, text=True, check=True)
    return json.loads(result.stdout.strip().splitlines()[-1])


def main(other: str, rounds: int = 3) -> None:
    here = os.getcwd()
    ratios = {name: [] for name in CASES}
    for r in range(rounds):
        order = [here, other] if r % 2 == 0 else [other, here]
        times = {checkout: run(checkout) for checkout in order}
        for name in CASES:
            ratios[name].append(times[here][name] / times[other][name])
        print(f"round {r + 1}: " + ", ".join(f"{n} {ratios[n][-1]:.3f}" for n in CASES), flush=True)
    for name in CASES:
        print(f"{name:30s} CPU time this / other: median {statistics.median(ratios[name]):.3f} "
              f"(rounds: {', '.join(f'{v:.3f}' for v in ratios[name])})")


if __name__ == "__main__":
    main(sys.argv[1], *[int(a) for a in sys.argv[2:3]])
