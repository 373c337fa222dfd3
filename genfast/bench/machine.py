"""What machine the numbers come from (the run header) and its fp32 GEMM peak."""
from __future__ import annotations

import datetime
import os
import platform
import subprocess
import time
from pathlib import Path

import torch

from genfast.bench import flops as flop_counts


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def simd_level() -> str:
    """SIMD level genfast's kernels dispatch to; torch's CPU capability when genfast._C is missing."""
    try:
        from genfast import _extension

        return f"{_extension.load().simd_level()} (genfast)"
    except (ImportError, AttributeError):
        return f"{torch.backends.cpu.get_cpu_capability().lower()} (torch)"


def repo_root() -> Path | None:
    """The git checkout genfast is imported from, if any (editable installs)."""
    here = Path(__file__).resolve().parents[2]
    return here if (here / ".git").exists() else None


def git_commit() -> str:
    root = repo_root()
    if root is None:
        return "-"
    try:
        out = subprocess.run(["git", "-C", str(root), "rev-parse", "--short=12", "HEAD"],
                             capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return "-"
    if out.returncode != 0:
        return "-"
    return out.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")


def load_average() -> float | None:
    """1-minute load average: above the core count, other processes are competing for the CPUs."""
    try:
        return round(os.getloadavg()[0], 2)
    except (OSError, AttributeError):
        return None


def header(device: str, threads: int) -> dict:
    import genfast

    info = {
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "commit": git_commit(),
        "cpu": cpu_model(),
        "cores": os.cpu_count() or 0,
        "simd": simd_level(),
        "threads": threads,
        "torch": torch.__version__,
        "genfast": genfast.__version__,
        "device": device,
        "gpu": torch.cuda.get_device_name(0) if device == "cuda" else "-",
        "python": platform.python_version(),
        "load_avg": load_average(),
    }
    return info


# Square-ish shapes big enough to reach the GEMM's steady state, small enough that the
# whole measurement stays within a few seconds on a 2-core CPU.
CPU_PEAK_SHAPES = ((1024, 1024, 1024), (2048, 1024, 1024), (1536, 1536, 1536))
CUDA_PEAK_SHAPES = ((4096, 4096, 4096), (8192, 8192, 4096))


def _mm_gflops_once(operands, device: str) -> float:
    a, b, out = operands
    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    torch.mm(a, b, out=out)
    if device == "cuda":
        torch.cuda.synchronize()
    return flop_counts.gemm(a.shape[0], b.shape[1], a.shape[1]) / (time.perf_counter() - start) / 1e9


def measure_peak(device: str = "cpu", dtype: torch.dtype = torch.float32, budget_s: float = 4.0,
                 repeats: int = 4, shapes=None) -> dict:
    """Best GFLOP/s of torch.mm (and genfast's packed GEMM when exposed) on a few shapes.

    This is the machine's *achievable* GEMM peak, the yardstick for "% of peak"; it is
    not the datasheet number. Returns {"gflops": best, "source": "...", "all": {...}}.
    """
    deadline = time.perf_counter() + budget_s
    if shapes is None:
        shapes = CUDA_PEAK_SHAPES if device == "cuda" else CPU_PEAK_SHAPES
    operands = {}
    for m, n, k in shapes:
        operands[f"torch.mm {m}x{n}x{k}"] = (torch.randn(m, k, device=device, dtype=dtype),
                                             torch.randn(k, n, device=device, dtype=dtype),
                                             torch.empty(m, n, device=device, dtype=dtype))
    results: dict[str, float] = {}
    # Cycle through the shapes until the budget is spent: on a shared machine the best of
    # many short samples is the one least disturbed by other processes.
    rounds = 0
    while rounds < 2 or (time.perf_counter() < deadline and rounds < 50):
        for name, ops in operands.items():
            results[name] = max(results.get(name, 0.0), _mm_gflops_once(ops, device))
        rounds += 1
    del operands
    if device == "cpu" and dtype == torch.float32:
        try:
            from genfast import _extension

            packed_gemm = getattr(_extension.load(), "packed_gemm_gflops", None)
        except ImportError:
            packed_gemm = None
        if packed_gemm is not None:
            for m, n, k in shapes[:2]:
                # genfast._C.packed_gemm_gflops(M, N, K, repeats) -> best GFLOP/s of genfast's RNN GEMM
                results[f"genfast packed_gemm {m}x{n}x{k}"] = float(packed_gemm(m, n, k, repeats))
    source, best = max(results.items(), key=lambda item: item[1])
    return {"gflops": best, "source": source, "all": results, "rounds": rounds,
            "dtype": str(dtype).replace("torch.", "")}
