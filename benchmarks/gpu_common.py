"""What benchmarks/gpu_rnn.py and gpu_generation.py share: the timer, the median, and the report files."""
from __future__ import annotations

import json
import os
import statistics

import torch

from genfast.bench.timing import CpuTimer, CudaTimer


def timer_for(device: str):
    """CUDA events on a GPU; a wall clock for the CPU (--device cpu --smoke, a check of the script)."""
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("this benchmark needs a CUDA GPU (or --device cpu --smoke)")
    return CudaTimer() if device == "cuda" else CpuTimer()


def device_name(device: str) -> str:
    return torch.cuda.get_device_name() if device == "cuda" else "cpu"


def median_ms(timer, fn, warmup: int, repeats: int) -> float:
    """Median over `repeats` single calls, after `warmup` calls, in milliseconds."""
    for _ in range(warmup):
        fn()
    return statistics.median(timer.time_calls(fn, 1) for _ in range(repeats)) * 1e3


def finish(header: str, rows: list[str], report: dict, out_dir: str, filename: str) -> int:
    """Print the table (last, so it ends the output) and write the raw numbers as JSON."""
    print(header)
    print("\n".join(rows), flush=True)
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, filename), "w") as f:
        json.dump(report, f, indent=1)
    return 0
