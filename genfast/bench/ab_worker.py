"""Child process of `python -m genfast.bench --ab`: this checkout's harness, another build's genfast.

    PYTHONPATH=/path/to/build python /path/to/this/genfast/bench/ab_worker.py [genfast.bench options]

Two builds of genfast._C cannot live in one process, so --ab runs each build in processes of its
own. To time both with the same harness (the same cases, providers and timing code), this script
imports `genfast` from PYTHONPATH (the build under test) and then loads the benchmark package
from the directory this file is in as `genfast.bench`, before anything imports the build's own.
It prints where genfast came from (the parent checks it) and runs the benchmark command.
"""
from __future__ import annotations

import importlib.util
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))


def main(argv: list[str]) -> int:
    # Run as a script, Python put this directory first on sys.path: its modules are not top-level.
    if sys.path and os.path.abspath(sys.path[0] or os.getcwd()) == HERE:
        sys.path.pop(0)
    import torch  # noqa: F401  (before genfast._C, which links against libtorch)

    import genfast

    spec = importlib.util.spec_from_file_location("genfast.bench", os.path.join(HERE, "__init__.py"),
                                                  submodule_search_locations=[HERE])
    bench = importlib.util.module_from_spec(spec)
    sys.modules["genfast.bench"] = bench
    spec.loader.exec_module(bench)
    genfast.bench = bench
    print(f"genfast from {os.path.dirname(os.path.abspath(genfast.__file__))}", flush=True)
    from genfast.bench.__main__ import main as bench_main

    return bench_main(argv)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
