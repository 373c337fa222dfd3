"""Routing until a kernel wins: shapes at which a genfast GPU kernel was measured slower than the torch
path it replaces go to that torch path.

Each rule is data: the op, the device and dtypes, the shape condition, the winner (the torch path that
runs instead) and the measurement it comes from (a file under benchmarks/results and its rows). The
drop-in APIs ask ``route()`` before launching a kernel (genfast.generation.decode.decode_attention,
genfast.generation.sampling.sample / process_logits, genfast.nn.LSTM / GRU); the ``torch.ops.genfast.*``
ops themselves are always genfast's kernels. ``last_dispatch()`` says which path the latest call of an op
took and by which rule; ``genfast.info()`` lists the rules.

Forcing the kernels (benchmarks timing a kernel itself, tests of the kernels): ``force_kernels()`` as a
context manager, or GENFAST_FORCE_KERNELS=1 in the environment. A rule goes when a GPU session measures
the kernel at >= 1.0x at its shapes (docs/design.md, "Routing until a kernel wins").
"""
from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass, field
from typing import Callable, Iterator

import torch

GENERATION_H200 = "benchmarks/results/gpu-h200-2026-11-28-session2/generation_gpu.txt"
RNN_H200 = "benchmarks/results/gpu-h200-2026-11-28/rnn_gpu.txt"


@dataclass(frozen=True, eq=False)
class Rule:
    name: str
    op: str                      # decode_attention | sampling_draw | sampling_filter | rnn
    device: str                  # the device type the rule is for
    dtypes: tuple[torch.dtype, ...]
    when: dict = field(default_factory=dict)   # shape condition: keys of CONDITIONS, all must hold
    winner: str = ""             # the torch path that runs instead (the backend last_dispatch names)
    source: str = ""             # the measurement: file and rows
    measured: str = ""           # what those rows say, in short
    evidence: str = "measured"   # "measured", or "inferred: <why>" where the rule extends measured rows

    def describe(self) -> str:
        dtypes = "/".join(str(d).replace("torch.", "") for d in self.dtypes)
        when = ", ".join(f"{k}={v}" for k, v in self.when.items()) or "every shape"
        return (f"{self.name}: {self.op} on {self.device} {dtypes} ({when}) -> {self.winner}; "
                f"{self.source}: {self.measured}; {self.evidence}")


# A condition's name -> whether it holds for the call's facts (keyword arguments of route()).
CONDITIONS: dict[str, Callable[[dict, object], bool]] = {
    # decode_attention: an int length (eager calls); a length tensor read on the device (CUDA graphs) is not
    # routed: the torch paths would need the host to read it, and the graph replay has no per-call launch cost.
    "length_on_host": lambda f, v: (f["length"] is not None) == v,
    "equal_heads": lambda f, v: (f["heads_q"] == f["heads_kv"]) == v,
    # batch x heads_kv x length x head_dim, the keys read: at most the largest losing shape measured.
    "max_cache_elements": lambda f, v: f["batch"] * f["heads_kv"] * f["length"] * f["head_dim"] <= v,
    "min_steps": lambda f, v: f["steps"] >= v,
    "min_batch": lambda f, v: f["batch"] >= v,
}

_HALF_INFERRED = ("inferred: bfloat16 not measured; the kernel's time does not fall with the element size (its "
                  "float32 rows take 0.56-1.18x the time of its float16 rows), and SDPA runs bfloat16 on the same "
                  "flash kernel as float16, against which the kernel lost 2.6-7x")

RULES: tuple[Rule, ...] = (
    Rule("decode_attention.float16", "decode_attention", "cuda", (torch.float16,), {"length_on_host": True},
         "torch_sdpa", f"{GENERATION_H200} lines 2-5 (decode_attention float16)",
         "genfast 0.198-0.432 ms (launcher 0.107-0.415) vs torch_sdpa 0.041-0.066 ms: 0.14-0.39x at "
         "B1-8, H12/12 and 32/8, D64/128, L1024-32768"),
    Rule("decode_attention.bfloat16", "decode_attention", "cuda", (torch.bfloat16,), {"length_on_host": True},
         "torch_sdpa", f"{GENERATION_H200} lines 2-5 (decode_attention float16)",
         "as decode_attention.float16", _HALF_INFERRED),
    Rule("decode_attention.float32.small_mha", "decode_attention", "cuda", (torch.float32,),
         {"length_on_host": True, "equal_heads": True, "max_cache_elements": 1 * 12 * 16384 * 64},
         "torch_math", f"{GENERATION_H200} lines 6-7 (decode_attention float32 B1 H12/12 D64)",
         "genfast 0.123/0.130 ms (launcher 0.119/0.113) vs reference 0.071/0.083 ms: 0.58x/0.64x at L1024/16384; "
         "genfast wins lines 8-9 (GQA 32/8, D128: 2.6-3.5x), SDPA is slower than genfast in float32"),
    Rule("sampling_draw.float32", "sampling_draw", "cuda", (torch.float32,), {},
         "torch_reference", f"{GENERATION_H200} lines 10-18 (sampling_draw)",
         "genfast 0.38-7.59 ms vs reference 0.29-0.90 ms: 0.07-0.94x at every row (B1/32, V50257/151936, "
         "t/k/p (0.8,0,1) (1,50,0.9) (1,0,0.9)); the top-k rows predate the top-k over 2k+64 candidates, "
         "not yet timed on a GPU"),
    Rule("sampling_filter.float32", "sampling_filter", "cuda", (torch.float32,), {},
         "torch_reference", f"{GENERATION_H200} lines 10-18 (sampling_draw)", "as sampling_draw.float32",
         "inferred: the filter kernel alone was not timed; it runs the per-row filter (_filter_row in "
         "kernels/sampling.py) in which the draw kernel spends its time"),
    Rule("rnn.float32", "rnn", "cuda", (torch.float32,), {},
         "torch_cudnn", f"{RNN_H200} lines 2-4, 8-10 (lstm/gru float32)",
         "genfast vs cuDNN: 0.64-0.81x at T=100 N=64 I=H=512 (inference and training), 0.79x decoding one "
         "token at N=1 H=512"),
    Rule("rnn.bfloat16.sequences", "rnn", "cuda", (torch.bfloat16,), {"min_steps": 100, "min_batch": 64},
         "torch_cudnn", f"{RNN_H200} lines 5-6, 11-12 (lstm/gru bfloat16 T=100 N=64)",
         "genfast vs cuDNN: 0.64-0.96x at T=100 N=64 I=H=512; genfast keeps the one-token steps, where it "
         "measured 2.5-2.8x (lines 7, 13)"),
)

# (op, device, dtype) -> its rules, each with its checks: a decode step asks once per layer, so the lookup is lean.
_INDEX: dict[tuple, tuple] = {}
for _rule in RULES:
    _checks = tuple((CONDITIONS[key], value) for key, value in _rule.when.items())
    for _dtype in _rule.dtypes:
        _key = (_rule.op, _rule.device, _dtype)
        _INDEX[_key] = _INDEX.get(_key, ()) + ((_rule, _checks),)

_forced = os.environ.get("GENFAST_FORCE_KERNELS", "0") == "1"
_last: dict[str, dict] = {}
_records: dict[tuple, dict] = {}  # the record of each (op, rule or kernel, forced), made once


def decide(op: str, device: str, dtype: torch.dtype, **facts) -> Rule | None:
    """The rule that sends this call to a torch path, or None (genfast's kernel runs). Pure: ignores forcing."""
    for rule, checks in _INDEX.get((op, device, dtype), ()):
        for check, value in checks:
            if not check(facts, value):
                break
        else:
            return rule
    return None


def route(op: str, device: str, dtype: torch.dtype, kernel: str, **facts) -> Rule | None:
    """decide(), unless the kernels are forced; the decision is recorded for last_dispatch(op).
    ``kernel``: the backend name recorded when genfast's kernel runs."""
    rule = None if _forced else decide(op, device, dtype, **facts)
    if not torch.compiler.is_compiling():  # the decision is made once at trace time; no recording then
        key = (op, rule.name if rule is not None else kernel, _forced)
        record = _records.get(key)
        if record is None:
            record = _records[key] = _record(op, rule, kernel)
        _last[op] = record
    return rule


def _record(op: str, rule: Rule | None, kernel: str) -> dict:
    if rule is not None:
        return {"op": op, "backend": rule.winner, "rule": rule.name, "source": rule.source,
                "reason": f"{rule.measured} ({rule.evidence})"}
    reason = "kernels forced (GENFAST_FORCE_KERNELS / force_kernels())" if _forced else "no rule: genfast's kernel"
    return {"op": op, "backend": kernel, "rule": None, "source": None, "reason": reason}


def last_dispatch(op: str | None = None) -> dict:
    """The latest routed call of ``op`` (backend, rule, source, reason), or of every op routed so far."""
    if op is None:
        return {name: dict(entry) for name, entry in _last.items()}
    return dict(_last.get(op, {"op": op, "backend": None, "rule": None, "source": None, "reason": "no call yet"}))


def kernels_forced() -> bool:
    return _forced


@contextlib.contextmanager
def force_kernels(enabled: bool = True) -> Iterator[None]:
    """Within the block, every routed op runs genfast's kernel (enabled=True) or follows the rules (False)."""
    global _forced
    previous, _forced = _forced, enabled
    try:
        yield
    finally:
        _forced = previous


def rules(op: str | None = None) -> list[Rule]:
    return [r for r in RULES if op is None or r.op == op]


def describe() -> list[str]:
    """One line per rule (genfast.info()'s "routing")."""
    return [rule.describe() for rule in RULES]


__all__ = ["Rule", "RULES", "CONDITIONS", "decide", "route", "last_dispatch", "kernels_forced", "force_kernels",
           "rules", "describe"]
