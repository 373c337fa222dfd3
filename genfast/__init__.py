"""genfast: fused LSTM/GRU and attention kernels behind drop-in torch.nn modules.

    import genfast
    genfast.info()                       # what was built, what this CPU runs
    lstm = genfast.nn.LSTM(512, 512)     # same API and numbers as torch.nn.LSTM
"""
from __future__ import annotations

__version__ = "0.1.0"

from genfast._info import info  # noqa: E402


def empty_cache() -> None:
    """Frees the large CPU buffers genfast's kernels keep for reuse (see genfast.info()["cpu_buffer_cache"]).

    Like torch.cuda.empty_cache(): buffers in use are untouched, and the next large kernel call
    allocates afresh. GENFAST_CPU_CACHE_MB (default 1024; 0 disables the cache) bounds what is kept.
    """
    from genfast import _extension

    _extension.load().empty_cpu_cache()


def __getattr__(name):
    # Submodules load lazily so that `import genfast` (and genfast.info()) work even
    # when the compiled extension is missing; `genfast.nn` then raises ImportError.
    import importlib

    if name in {"nn", "ops", "reference", "generation", "bench", "kernels"}:
        return importlib.import_module(f"genfast.{name}")
    raise AttributeError(f"module 'genfast' has no attribute {name!r}")


__all__ = ["info", "empty_cache", "__version__"]
