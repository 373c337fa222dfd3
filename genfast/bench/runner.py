"""Run one case: build every provider, check they agree, time them interleaved, measure memory."""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import torch

from genfast.bench import memory, providers, timing
from genfast.bench.cases import Case


@dataclass
class ProviderResult:
    name: str
    role: str                        # subject (a genfast path) | baseline
    status: str = "ok"               # ok | not built | needs CUDA | skipped | error
    reason: str = ""
    samples: list[float] = field(default_factory=list)   # seconds per call, one per round
    stats: timing.Stats | None = None
    gflops: float | None = None
    pct_peak: float | None = None
    peak_memory_bytes: int | None = None
    first_call_s: float | None = None  # the first call (compiles, autotunes, allocates), timed alone

    @property
    def ok(self) -> bool:
        return self.status == "ok"


@dataclass
class CaseResult:
    case: Case
    providers: dict[str, ProviderResult]
    speedups: dict[str, dict[str, timing.Stats]]   # subject -> baseline -> stats of baseline/subject
    checks: dict = field(default_factory=dict)
    wall_s: float = 0.0                            # the whole case: build, check, time, memory

    def subjects(self) -> list[ProviderResult]:
        return [p for p in self.providers.values() if p.role == "subject"]

    def baselines(self) -> list[ProviderResult]:
        return [p for p in self.providers.values() if p.role == "baseline"]


def _error_text(err: BaseException) -> str:
    return f"{type(err).__name__}: {err}"


def _max_abs_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    if a.numel() != b.numel():
        return math.nan
    return (a.reshape(-1).double() - b.reshape(-1).double()).abs().max().item() if a.numel() else 0.0


def _first_difference(a: torch.Tensor, b: torch.Tensor):
    """Index of the first generated token where two outputs differ (None: identical)."""
    if a.shape != b.shape:
        return f"shapes {tuple(a.shape)} vs {tuple(b.shape)}"
    differs = (a != b).any(dim=0).nonzero()
    return None if differs.numel() == 0 else int(differs[0])


def finish_stats(result: CaseResult, flops: float, peak_gflops: float) -> None:
    """Medians, GFLOP/s, % of peak and per-round speedups from the providers' samples."""
    for p in result.providers.values():
        if p.ok and p.samples:
            p.stats = timing.summarize(p.samples)
            p.gflops = timing.gflops(flops, p.stats.median)
            p.pct_peak = 100.0 * p.gflops / peak_gflops if peak_gflops > 0 else None
    result.speedups = {}
    for subject in result.subjects():
        if not (subject.ok and subject.samples):
            continue
        result.speedups[subject.name] = {
            baseline.name: timing.speedup(baseline.samples, subject.samples)
            for baseline in result.baselines() if baseline.ok and baseline.samples}


def run_case(case: Case, device: str, plan: timing.TimingPlan, peak_gflops: float,
             timer: timing.CpuTimer | None = None) -> CaseResult:
    started = time.perf_counter()
    result = _run_case(case, device, plan, peak_gflops, timer)
    result.wall_s = time.perf_counter() - started
    return result


def _run_case(case: Case, device: str, plan: timing.TimingPlan, peak_gflops: float,
              timer: timing.CpuTimer | None) -> CaseResult:
    roles = {name: "subject" for name in case.subjects} | {name: "baseline" for name in case.baselines}
    results = {name: ProviderResult(name, role) for name, role in roles.items()}
    outcome = CaseResult(case, results, {})
    try:
        work = providers.WORKLOADS[case.kind](case, device)
    except providers.Unavailable as err:
        for r in results.values():
            r.status, r.reason = err.status, err.reason
        return outcome
    except Exception as err:  # noqa: BLE001  (any failure becomes a row, never a crash)
        for r in results.values():
            r.status, r.reason = "error", f"workload: {_error_text(err)}"
        return outcome

    timer = timer or timing.timer_for(device, case.timer)
    fns, outputs, first_call_s = {}, {}, {}
    for name, r in results.items():
        try:
            fn = providers.PROVIDERS[case.kind][name].build(work)
            # The first call is the first warm-up call and gives the output for the agreement check.
            first_call_s[name] = timer.time_calls(lambda: outputs.__setitem__(name, fn()), 1)
            fns[name] = fn
        except providers.Unavailable as err:
            r.status, r.reason = err.status, err.reason
        except Exception as err:  # noqa: BLE001
            r.status, r.reason = "error", _error_text(err)

    if case.kind == "generation" and len(outputs) > 1:
        (first_name, first), *others = outputs.items()
        outcome.checks["identical_tokens"] = all(torch.equal(first, o) for _, o in others)
        outcome.checks["first_difference"] = {f"{name} vs {first_name}": _first_difference(first, o)
                                              for name, o in others}
    agreement = {}
    reference_name = next((b for b in case.baselines if b in outputs), None)
    for subject in case.subjects:
        # A regularised module (random masks) is not meant to agree with the plain one it is timed against,
        # nor attention with dropout (each provider draws its own mask) with another.
        if (subject in outputs and reference_name is not None and not case.params.get("regularizers")
                and not case.params.get("dropout_p")):
            agreement[f"{subject} vs {reference_name}"] = _max_abs_diff(outputs[subject], outputs[reference_name])
    if agreement:
        outcome.checks["max_abs_diff"] = agreement
    del outputs

    try:
        samples = timing.run_interleaved(fns, plan, timer, first_call_s)
    except Exception as err:  # noqa: BLE001
        for name in fns:
            results[name].status, results[name].reason = "error", f"while timing: {_error_text(err)}"
        samples = {}
    for name, values in samples.items():
        results[name].samples = values
    for name, seconds in first_call_s.items():
        results[name].first_call_s = seconds

    if case.measure_memory:
        for name, fn in fns.items():
            results[name].peak_memory_bytes = memory.peak_bytes(fn, device)

    if case.kind == "imdb" and case.training and "genfast" in fns and "torch" in fns:
        steps = case.params["steps_checked"]
        ours, theirs = providers.imdb_train_losses("genfast", work), providers.imdb_train_losses("torch", work)
        outcome.checks["loss_after_steps"] = {"steps": steps, "genfast": ours[-1], "torch": theirs[-1],
                                              "abs_diff": abs(ours[-1] - theirs[-1])}

    if case.kind == "vae" and "genfast" in fns and "torch" in fns:
        from genfast.bench.vae import vae_train_losses

        ours, theirs = vae_train_losses("genfast", work), vae_train_losses("torch", work)
        outcome.checks["loss_after_steps"] = {"steps": work.steps_checked, "genfast": ours[-1], "torch": theirs[-1],
                                              "abs_diff": abs(ours[-1] - theirs[-1])}

    finish_stats(outcome, case.flops, peak_gflops)
    if case.kind == "generation":
        outcome.checks.update(_generation_rates(outcome, work))
    return outcome


def _generation_rates(result: CaseResult, work) -> dict:
    """tokens/s of each provider; the weight bytes genfast streams per second (every
    generated token reads all weights once) next to this machine's copy bandwidth (CPU)."""
    from genfast.bench.machine import copy_bandwidth_gbps

    tokens = work.prompt.shape[0] * work.new_tokens  # every row generates new_tokens
    rates = {f"{p.name}_tokens_per_s": tokens / p.stats.median
             for p in result.providers.values() if p.ok and p.stats}
    ours = result.providers.get("genfast")
    if ours is not None and ours.ok and ours.stats:
        rates["genfast_weight_GBps"] = work.params * work.dtype.itemsize * work.new_tokens / ours.stats.median / 1e9
        if work.device == "cpu":
            rates["copy_GBps_read_plus_write"] = copy_bandwidth_gbps()
    return rates
