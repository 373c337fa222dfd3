"""Honest timing: warm-up, interleaved rounds, medians, spreads and per-pair ratios.

How a comparison is measured (run_interleaved):
  1. warm-up: every contender runs until it has had `warmup_calls` calls and `warmup_s`
     seconds (first-call costs: allocation, JIT, caches); the last warm-up call times one call.
  2. batching: calls that are shorter than `min_sample_s` are repeated `inner` times per
     sample, so that the clock's resolution and the loop overhead don't count.
  3. rounds: every round times each contender once, A B C then C B A then A B C ..., so
     that slow drift (thermal, other processes on the machine) hits all of them alike.
     At least `min_rounds` rounds; more while the time budget lasts, up to `max_rounds`.
  4. statistics: median and quartiles of each contender's samples; the speed ratio of
     baseline B against subject A is the median over rounds of B_i / A_i (same round,
     same conditions), not the ratio of two medians.
Timers (what one sample is): CpuTimer, a wall clock around `inner` calls; CudaTimer, CUDA events
around them after a synchronisation; DoBenchTimer, Triton's do_bench (CUDA events per call, the L2
cache flushed between calls, the median taken), for kernels whose inputs would otherwise sit in L2.
timer_for() picks one. ProcessTimeTimer counts the process's CPU time instead of the wall clock (one-thread
runs on a machine shared with busy processes; the sweep's --sweep-clock cpu).
This module is the only place genfast's benchmarks read a clock.
"""
from __future__ import annotations

import math
import statistics
import time
from dataclasses import asdict, dataclass
from typing import Callable, Sequence

Clock = Callable[[], float]


@dataclass(frozen=True)
class Stats:
    """Summary of a list of samples (seconds per call, or ratios)."""

    median: float
    q1: float
    q3: float
    min: float
    max: float
    n: int

    @property
    def iqr(self) -> float:
        return self.q3 - self.q1

    @property
    def relative_iqr(self) -> float:
        return self.iqr / self.median if self.median else math.nan

    def as_dict(self) -> dict:
        return {**asdict(self), "iqr": self.iqr}


def summarize(samples: Sequence[float]) -> Stats:
    if len(samples) == 0:
        raise ValueError("summarize() needs at least one sample")
    ordered = sorted(samples)
    if len(ordered) == 1:
        q1 = q3 = ordered[0]
    else:
        # 'inclusive' quartiles: interpolate between the samples, stay inside [min, max].
        q1, _, q3 = statistics.quantiles(ordered, n=4, method="inclusive")
    return Stats(median=statistics.median(ordered), q1=q1, q3=q3, min=ordered[0], max=ordered[-1],
                 n=len(ordered))


def paired_ratios(baseline: Sequence[float], subject: Sequence[float]) -> list[float]:
    """Per-round ratios baseline_i / subject_i (>1: the subject is faster)."""
    if len(baseline) != len(subject):
        raise ValueError(f"paired samples must have equal length, got {len(baseline)} and {len(subject)}")
    if any(s <= 0 for s in subject):
        raise ValueError("subject samples must be positive times")
    return [b / s for b, s in zip(baseline, subject)]


def speedup(baseline: Sequence[float], subject: Sequence[float]) -> Stats:
    """Median (and spread) of the per-round ratios baseline / subject."""
    return summarize(paired_ratios(baseline, subject))


def gflops(flops: float, seconds: float) -> float:
    return flops / seconds / 1e9 if seconds > 0 else math.nan


class CpuTimer:
    """Times `inner` back-to-back calls with a wall clock (time.perf_counter by default)."""

    def __init__(self, clock: Clock = time.perf_counter):
        self.clock = clock

    def now(self) -> float:
        return self.clock()

    def time_calls(self, fn: Callable[[], object], inner: int) -> float:
        """Seconds per call, averaged over `inner` consecutive calls."""
        start = self.clock()
        for _ in range(inner):
            fn()
        return (self.clock() - start) / inner


class ProcessTimeTimer(CpuTimer):
    """Times with the process's CPU time (time.process_time: all its threads) instead of the wall clock.
    On a machine shared with other busy processes, a one-thread run's CPU time does not count the time
    the scheduler gave to others, which the wall clock does. With several threads it counts every
    thread's time, spin-waits included, so it is no longer the elapsed time: use it with one thread."""

    def __init__(self):
        super().__init__(time.process_time)


class CudaTimer(CpuTimer):
    """Times with CUDA events on the current stream; synchronises so queued work counts."""

    def __init__(self, clock: Clock = time.perf_counter):
        super().__init__(clock)
        import torch

        self._torch = torch

    def time_calls(self, fn: Callable[[], object], inner: int) -> float:
        torch = self._torch
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize()
        start.record()
        for _ in range(inner):
            fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3 / inner


class DoBenchTimer(CudaTimer):
    """A sample is triton.testing.do_bench over about `inner` calls' worth of time: per-call CUDA
    events with the L2 cache flushed before each call, the median, in seconds. A callable's first
    sample is one plain event-timed call, which gives do_bench's time budget for the next ones.
    `grad_to_none`: tensors whose .grad do_bench resets before each call."""

    def __init__(self, clock: Clock = time.perf_counter, grad_to_none=None):
        super().__init__(clock)
        from triton.testing import do_bench

        self._do_bench = do_bench
        self.grad_to_none = grad_to_none
        self._estimate_ms: dict[int, float] = {}

    def time_calls(self, fn: Callable[[], object], inner: int) -> float:
        estimate = self._estimate_ms.get(id(fn))
        if estimate is None:
            seconds = super().time_calls(fn, 1)
        else:
            seconds = self._do_bench(fn, warmup=0, rep=max(inner * estimate, 1e-3), grad_to_none=self.grad_to_none,
                                     return_mode="median") / 1e3
        self._estimate_ms[id(fn)] = seconds * 1e3
        return seconds


def alternating_thread_times(fns: dict[str, Callable[[], object]], rounds: int) -> dict[str, list[float]]:
    """This thread's CPU time (time.thread_time) of one call of each callable per round, the order of the calls
    reversed every other round, after two warm-up calls of each. The diagnostics' A/B clock: on a shared
    machine a call's CPU time is not inflated by preemption as the wall clock is, but it counts the calling
    thread alone, so run torch on one thread."""
    times: dict[str, list[float]] = {name: [] for name in fns}
    for fn in fns.values():
        fn(), fn()
    names = list(fns)
    for i in range(rounds):
        for name in (names if i % 2 == 0 else names[::-1]):
            started = time.thread_time()
            fns[name]()
            times[name].append(time.thread_time() - started)
    return times


def timer_for(device: str, kind: str = "events") -> CpuTimer:
    """The timer for a device: a wall clock on the CPU; on CUDA, events ("events") or
    Triton's do_bench ("do_bench")."""
    if device != "cuda":
        return CpuTimer()
    if kind == "do_bench":
        return DoBenchTimer()
    if kind != "events":
        raise ValueError(f"kind must be 'events' or 'do_bench', got {kind!r}")
    return CudaTimer()


@dataclass(frozen=True)
class TimingPlan:
    """How long to measure. The defaults suit --quick; --full passes a larger budget."""

    warmup_calls: int = 1
    warmup_s: float = 0.05
    min_sample_s: float = 0.002
    min_rounds: int = 5
    max_rounds: int = 200
    budget_s: float = 1.0
    # When set, slow calls get fewer rounds: min_rounds drops (not below this floor) to the number
    # of rounds that fit budget_s, judged from the fastest warm-up call of each contender (a call
    # stalled by another process on a shared machine does not cut the rounds short). The sweep
    # uses it so that its largest shapes cost a couple of rounds, not min_rounds.
    min_rounds_floor: int | None = None


def run_interleaved(fns: dict[str, Callable[[], object]], plan: TimingPlan = TimingPlan(),
                    timer: CpuTimer | None = None,
                    first_call_s: dict[str, float] | None = None) -> dict[str, list[float]]:
    """Time every callable in `fns` in interleaved rounds; returns seconds per call, per round.

    All lists have the same length (the number of rounds) and index i of each list
    comes from the same round, so they can be paired. `first_call_s` names callables
    the caller has already called once (and how long that took): that call counts as
    the first warm-up call, so a slow op is not run once more just to warm up.
    """
    if not fns:
        return {}
    if plan.min_rounds < 1:
        raise ValueError("plan.min_rounds must be >= 1")
    timer = timer or CpuTimer()
    names = list(fns)

    inner: dict[str, int] = {}
    fastest_call_s: dict[str, float] = {}
    for name in names:
        fn = fns[name]
        started = timer.now()
        calls, per_call = 0, math.inf
        if first_call_s and name in first_call_s:
            calls, per_call = 1, first_call_s[name]
        while calls < plan.warmup_calls or timer.now() - started < plan.warmup_s:
            per_call = timer.time_calls(fn, 1)
            fastest_call_s[name] = min(fastest_call_s.get(name, math.inf), per_call)
            calls += 1
            if calls >= 1000:  # enough for anything that fast; min_sample_s batching takes over
                break
        inner[name] = max(1, math.ceil(plan.min_sample_s / per_call)) if per_call > 0 else 1000
        fastest_call_s[name] = min(fastest_call_s.get(name, math.inf), per_call)

    min_rounds = plan.min_rounds
    if plan.min_rounds_floor is not None:
        if plan.min_rounds_floor < 1:
            raise ValueError("plan.min_rounds_floor must be >= 1")
        round_s = sum(fastest_call_s[name] * inner[name] for name in names
                      if math.isfinite(fastest_call_s.get(name, math.inf)))
        fit = int(plan.budget_s / round_s) if round_s > 0 else min_rounds
        min_rounds = max(plan.min_rounds_floor, min(min_rounds, fit))

    samples: dict[str, list[float]] = {name: [] for name in names}
    started = timer.now()
    rounds = 0
    while rounds < min_rounds or (timer.now() - started < plan.budget_s and rounds < plan.max_rounds):
        order = names if rounds % 2 == 0 else names[::-1]
        for name in order:
            samples[name].append(timer.time_calls(fns[name], inner[name]))
        rounds += 1
    return samples
