"""Peak memory of one call, beyond what was already allocated when the call started.

CUDA: torch.cuda.max_memory_allocated after reset_peak_memory_stats.
CPU: torch has no peak counter for its CPU allocator, so the call runs once under
torch.profiler with profile_memory=True and the allocation/free events are replayed
in time order; the running maximum is the peak. Only memory allocated through
torch's allocator is seen (at::empty and friends, which is what genfast's kernels use).
"""
from __future__ import annotations

import contextlib
import os
from typing import Callable

import torch


@contextlib.contextmanager
def _quiet_stderr():
    """The profiler's C++ side prints start/stop lines to fd 2; hide them from the table."""
    try:
        saved = os.dup(2)
    except OSError:
        yield
        return
    try:
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), 2)
            try:
                yield
            finally:
                os.dup2(saved, 2)
    finally:
        os.close(saved)


def peak_bytes(fn: Callable[[], object], device: str) -> int:
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        result = fn()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - before
        del result
        return int(peak)
    from torch.profiler import ProfilerActivity, profile

    with _quiet_stderr():
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            result = fn()
            del result
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    events.sort(key=lambda e: e.start_ns())
    current = peak = 0
    for event in events:
        current += event.nbytes()
        peak = max(peak, current)
    return int(peak)
