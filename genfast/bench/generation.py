"""GPT-2 greedy generation, genfast against transformers: the gpt2 cases of the benchmark command.

    python -m genfast.bench.generation [options]   # = python -m genfast.bench --full --filter gpt2 [options]

The cases (genfast.bench.cases: gpt2.*, and gpu.gpt2.* on CUDA) time GPT-2 124M-shaped greedy
decoding, random weights, with the same harness as every other case; the notes column gives
tokens/s, whether the tokens are identical, and the weight bytes streamed per second next to the
machine's copy bandwidth. Any option of `python -m genfast.bench` may follow.
"""
from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    from genfast.bench.__main__ import main as bench_main

    argv = list(sys.argv[1:] if argv is None else argv)
    if not any(a in ("--quick", "--full", "--smoke") for a in argv):
        argv.insert(0, "--full")
    if "--filter" not in argv and not any(a.startswith("--filter=") for a in argv):
        argv += ["--filter", "gpt2"]
    return bench_main(argv)


if __name__ == "__main__":
    sys.exit(main())
