"""Child process for the compiled_reference provider: compile one case's reference, run it once.

    python -m genfast.bench.compile_probe CASE_NAME DEVICE THREADS

The parent runs this under a time limit, so a compilation that would take too long is
killed without leaving a compiler thread behind in the process that does the timing.
Exit status 0: it compiled and ran (and the on-disk compile cache is warm for the parent).
"""
from __future__ import annotations

import sys
import time


def main(argv: list[str]) -> int:
    case_name, device, threads = argv
    import torch

    from genfast.bench import cases, providers

    torch.set_num_threads(int(threads))
    case = cases.find(case_name)
    work = providers.WORKLOADS[case.kind](case, device)
    started = time.perf_counter()
    providers.compiled_reference_rnn(work, probe=False)()
    print(f"compiled and ran {case_name} in {time.perf_counter() - started:.1f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
