"""Glue for the pytest-benchmark suites in benchmarks/: same cases, same providers.

    python -m pytest benchmarks/ --benchmark-json out.json      # the quick set
    GENFAST_BENCH_SET=full python -m pytest benchmarks/          # every case

Each (case, provider) pair is one benchmark, grouped by case so pytest-benchmark's
table puts a case's providers side by side. A provider that can't run here is
skipped with its reason ("not built: ...", "needs CUDA: ...").
"""
from __future__ import annotations

import functools
import os

import torch

from genfast.bench import cases as case_sets
from genfast.bench import providers

SET_ENV = "GENFAST_BENCH_SET"


def _device() -> str:
    return os.environ.get("GENFAST_BENCH_DEVICE") or ("cuda" if torch.cuda.is_available() else "cpu")


def params(op: str) -> list:
    """pytest parameters (case, provider) for every case of `op` in the selected set."""
    import pytest

    set_name = os.environ.get(SET_ENV, "quick")
    return [pytest.param(case, name, id=f"{case.name}-{name}")
            for case in case_sets.cases(set_name) if case.op == op for name in case.providers]


@functools.lru_cache(maxsize=1)
def _workload(case: case_sets.Case, device: str):
    # One workload per case (the last one used), shared by its providers as in genfast.bench.
    return providers.WORKLOADS[case.kind](case, device)


def run(benchmark, case: case_sets.Case, provider: str) -> None:
    import pytest

    device = _device()
    try:
        fn = providers.PROVIDERS[case.kind][provider].build(_workload(case, device))
    except providers.Unavailable as err:
        pytest.skip(f"{provider} {err.status}: {err.reason}")
    if device == "cuda":
        call = fn

        def fn():
            call()
            torch.cuda.synchronize()
    benchmark.group = case.name
    benchmark.extra_info.update(case=case.name, provider=provider, flops=case.flops, mode=case.mode)
    # Latency cases are microseconds: batch calls so each round is well above timer resolution.
    iterations = 100 if case.unit == "us" else 1
    benchmark.pedantic(fn, rounds=5, iterations=iterations, warmup_rounds=1)
