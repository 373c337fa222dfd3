"""Glue for the pytest-benchmark files in benchmarks/: the same cases, timed by the same harness.

    python -m pytest benchmarks/ --benchmark-only                 # the quick set
    GENFAST_BENCH_SET=full python -m pytest benchmarks/            # every case
    GENFAST_BENCH_DEVICE=cpu python -m pytest benchmarks/bench_lstm.py
    GENFAST_BENCH_FILTER=fastrnns python -m pytest benchmarks/     # as --filter: substrings, comma-separated

pytest-benchmark does not time anything here. Each case runs once through genfast.bench's runner
(warm-up, interleaved rounds of all its providers, as `python -m genfast.bench` does); each
(case, provider) test then hands that provider's per-round samples to pytest-benchmark, through a
clock that replays them, so its table, --benchmark-json and comparisons show the harness's numbers,
grouped by case. A provider that can't run here is skipped with its reason ("not built: ...",
"needs CUDA: ...").
"""
from __future__ import annotations

import functools
import os

import torch

from genfast.bench import cases as case_sets
from genfast.bench import runner, timing

SET_ENV = "GENFAST_BENCH_SET"
DEVICE_ENV = "GENFAST_BENCH_DEVICE"
FILTER_ENV = "GENFAST_BENCH_FILTER"
# The command's plans by set name (genfast.bench.__main__.PLANS).
_PLAN_SET = {"quick": "quick", "full": "full", "smoke": "smoke"}


def _set_name() -> str:
    name = os.environ.get(SET_ENV, "quick")
    if name not in case_sets.SETS:
        raise ValueError(f"{SET_ENV} must be one of {case_sets.SETS}, got {name!r}")
    return name


def _device() -> str:
    return os.environ.get(DEVICE_ENV) or ("cuda" if torch.cuda.is_available() else "cpu")


def params(op: str) -> list:
    """pytest parameters (case, provider) for every case of `op` in the selected set and device."""
    import pytest

    return [pytest.param(case, name, id=f"{case.name}-{name}")
            for case in case_sets.cases(_set_name(), os.environ.get(FILTER_ENV) or None, _device())
            if case.op == op for name in case.providers]


@functools.lru_cache(maxsize=1)
def case_result(case: case_sets.Case, device: str) -> runner.CaseResult:
    """One run of a case through the harness, shared by its providers' tests (they are adjacent)."""
    from genfast.bench.__main__ import PLANS

    if device == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    return runner.run_case(case, device, timing.TimingPlan(**PLANS[_PLAN_SET[_set_name()]]), peak_gflops=0.0)


class ReplayClock:
    """A clock that moves only when advance() is called, by the next recorded sample."""

    __name__ = "genfast.bench interleaved rounds (replayed)"

    def __init__(self, samples: list[float]):
        self.samples = list(samples)
        self.now = 0.0
        self.index = 0

    def __call__(self) -> float:
        return self.now

    def advance(self) -> None:
        self.now += self.samples[self.index % len(self.samples)]
        self.index += 1


def run(benchmark, case: case_sets.Case, provider: str) -> None:
    import pytest

    result = case_result(case, _device())
    p = result.providers[provider]
    if not p.ok:
        pytest.skip(f"{provider} {p.status}: {p.reason}")
    benchmark.group = case.name
    benchmark.extra_info.update(case=case.name, provider=provider, role=p.role, flops=case.flops, mode=case.mode,
                                rounds=len(p.samples), median_s=p.stats.median, first_call_s=p.first_call_s,
                                speedups={b: s.median for b, s in result.speedups.get(provider, {}).items()},
                                checks=result.checks)
    clock = ReplayClock(p.samples)
    benchmark._timer = clock  # pytest-benchmark reads its clock from here; it only stores what we measured
    benchmark.pedantic(clock.advance, rounds=len(p.samples), iterations=1, warmup_rounds=0)
