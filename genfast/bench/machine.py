"""What machine the numbers come from (the run header) and its fp32 GEMM peak."""
from __future__ import annotations

import datetime
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch

from genfast.bench import flops as flop_counts
from genfast.bench import timing


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


def git_commit(root: Path | None = None) -> str:
    """The short commit of the checkout at root (default: the one genfast is imported from), +dirty if modified."""
    root = repo_root() if root is None else root
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

PROBE_MISSING = ("genfast._probe is not built ({err}): the fp32 peak comes from torch.mm alone, so % of peak "
                 "may read high on CPUs where genfast's or oneDNN's micro-kernel beats torch.mm. Build it with "
                 "`python setup.py build_ext --inplace` (or pip install -e .).")
_warned_probe = False


def load_probe():
    """genfast._probe (csrc/probe/), the C++ side of the peak measurement, or None with one warning."""
    global _warned_probe
    try:
        import importlib

        return importlib.import_module("genfast._probe")
    except ImportError as err:
        if not _warned_probe:
            _warned_probe = True
            print(f"WARNING: {PROBE_MISSING.format(err=err)}", file=sys.stderr)
        return None


def _mm_gflops_once(operands, device: str) -> float:
    a, b, out = operands
    timer = timing.timer_for(device)
    return flop_counts.gemm(a.shape[0], b.shape[1], a.shape[1]) / timer.time_calls(lambda: torch.mm(a, b, out=out),
                                                                                  1) / 1e9


def measure_peak(device: str = "cpu", dtype: torch.dtype = torch.float32, budget_s: float = 4.0,
                 repeats: int = 2, shapes=None) -> dict:
    """The machine's achievable GEMM peak, the yardstick for "% of peak" (not the datasheet number).

    Three ways on the CPU in fp32, the best of which is the peak: torch.mm timed from here, and
    from genfast._probe genfast's packed micro-kernel (the RNN kernels' GEMM) and ATen's
    cpublas::brgemm (oneDNN's micro-kernel). On CUDA, or without the probe, torch.mm alone.
    Returns {"gflops": best, "source": "...", "all": {name: GFLOP/s}, "by_method": {method: best},
    "probe": "genfast._probe" | "missing: ...", ...}.
    """
    deadline = time.perf_counter() + budget_s
    if shapes is None:
        shapes = CUDA_PEAK_SHAPES if device == "cuda" else CPU_PEAK_SHAPES
    measures = {}  # name -> zero-argument callable returning GFLOP/s of one sample
    for m, n, k in shapes:
        operands = (torch.randn(m, k, device=device, dtype=dtype), torch.randn(k, n, device=device, dtype=dtype),
                    torch.empty(m, n, device=device, dtype=dtype))
        measures[f"torch.mm {m}x{n}x{k}"] = lambda operands=operands: _mm_gflops_once(operands, device)
    probe_status = "not used (CUDA or not fp32)"
    if device == "cpu" and dtype == torch.float32:
        probe = load_probe()
        probe_status = "genfast._probe" if probe is not None else "missing: torch.mm only"
        if probe is not None:
            for m, n, k in shapes[:2]:
                for name, kernel in (("genfast packed", probe.packed_gemm_gflops),
                                     ("aten brgemm", probe.brgemm_gflops)):
                    measures[f"{name} {m}x{n}x{k}"] = lambda kernel=kernel, shape=(m, n, k): kernel(*shape, repeats)
    results: dict[str, float] = {}
    # Cycle through every shape and kernel until the budget is spent: on a shared machine the
    # best of many short samples is the one least disturbed by other processes, and each
    # method gets the same chances.
    rounds = 0
    while rounds < 2 or (time.perf_counter() < deadline and rounds < 50):
        for name, measure in measures.items():
            results[name] = max(results.get(name, 0.0), float(measure()))
        rounds += 1
    del measures
    by_method: dict[str, float] = {}
    for name, value in results.items():
        method = name.rsplit(" ", 1)[0]
        by_method[method] = max(by_method.get(method, 0.0), value)
    source, best = max(results.items(), key=lambda item: item[1])
    return {"gflops": best, "source": source, "all": results, "by_method": by_method, "rounds": rounds,
            "dtype": str(dtype).replace("torch.", ""), "probe": probe_status}


def copy_bandwidth_gbps(megabytes: int = 256, repeats: int = 5) -> float:
    """Bytes moved (read + write) per second by a large CPU tensor copy, best of `repeats`, GB/s."""
    src = torch.empty(megabytes * 2**20 // 4, dtype=torch.float32).fill_(1.0)
    dst = torch.empty_like(src)
    dst.copy_(src)
    timer = timing.CpuTimer()
    best = min(timer.time_calls(lambda: dst.copy_(src), 1) for _ in range(repeats))
    return 2 * src.numel() * 4 / best / 1e9
