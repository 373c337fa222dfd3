"""genfast.info(): what was built and what this machine will run."""
from __future__ import annotations

import importlib.util
import os


def info(print_it: bool = True) -> dict:
    """Return (and by default print) versions, compiled backends, SIMD level and threads."""
    import torch

    import genfast
    from genfast import _extension

    report: dict = {
        "genfast": genfast.__version__,
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "extension": _extension.available(),
    }
    if report["extension"]:
        ext = _extension.load()
        report["cpu_kernels"] = True
        report["simd_level"] = ext.simd_level()
        report["cuda_kernels"] = ext.cuda_built()
        report["cuda_archs"] = ext.cuda_archs() or None
        limit = ext.cpu_cache_limit_bytes()
        report["cpu_buffer_cache"] = (f"{ext.cpu_cache_bytes() / 2**20:.0f} MB held, up to {limit / 2**20:.0f} MB "
                                      "(GENFAST_CPU_CACHE_MB; genfast.empty_cache() frees)" if limit
                                      else "off (GENFAST_CPU_CACHE_MB=0)")
    else:
        report.update(cpu_kernels=False, simd_level=None, cuda_kernels=False, cuda_archs=None, cpu_buffer_cache=None)
        report["extension_error"] = _extension.load_error()
    report["triton"] = importlib.util.find_spec("triton") is not None
    report["triton_interpret"] = os.environ.get("TRITON_INTERPRET", "0") == "1"
    report["cuda_device"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    report["threads"] = torch.get_num_threads()
    report["huge_pages"] = _huge_pages()
    try:
        from genfast.nn import functional as _functional

        explain = getattr(_functional, "last_dispatch", None)
        if explain is not None:
            report["attention_dispatch"] = explain()
    except ImportError:
        pass
    from genfast import routing

    # Routing until a kernel wins: the CUDA shapes sent to a torch path, each with its measurement.
    report["routing"] = routing.describe()
    report["routing_forced"] = routing.kernels_forced()
    report["routing_last_dispatch"] = routing.last_dispatch()
    from genfast import rnn_persistent

    # The persistent CUDA LSTM/GRU kernel (issue 20): opt-in, and the path the latest CUDA layer took.
    report["rnn_persistent"] = f"{'on' if rnn_persistent.is_enabled() else 'off'} ({rnn_persistent.ENV}=1 turns it on)"
    report["rnn_cuda_path"] = rnn_persistent.last_path()
    if print_it:
        width = max(len(k) for k in report)
        for key, value in report.items():
            lines = value if isinstance(value, list) and value else [value]  # a list: one item per line
            print(f"{key:<{width}}  {lines[0]}")
            for line in lines[1:]:
                print(f"{'':<{width}}  {line}")
    return report


def _huge_pages() -> str:
    """Whether the CPU kernels' large buffers get transparent huge pages (csrc/cpu/memory.h)."""
    if not os.environ.get("GENFAST_HUGE_PAGES", "0").startswith("1"):
        return "off (GENFAST_HUGE_PAGES=1 requests them for buffers >= 4 MB)"
    try:
        with open("/sys/kernel/mm/transparent_hugepage/enabled") as modes:
            mode = modes.read().split("[")[1].split("]")[0]
    except (OSError, IndexError):
        return "not available (no Linux transparent huge pages)"
    if mode == "never":
        return "not available (transparent_hugepage is 'never')"
    return f"requested for buffers >= 4 MB (transparent_hugepage: {mode})"
