"""genfast's Triton kernels, installed as the subpackage ``genfast.kernels``.

Importing a kernel module imports triton; code that must also run without triton (the CUDA
registrations in genfast/ops/) goes through ``load``, which raises a clear error at call time.
"""
from __future__ import annotations

import importlib
from types import ModuleType


def load(name: str, what: str) -> ModuleType:
    """genfast.kernels.<name>, or RuntimeError saying that ``what`` needs Triton."""
    try:
        import triton  # noqa: F401
    except ImportError as err:
        raise RuntimeError(f"genfast: {what} on CUDA tensors runs a Triton kernel, and triton is not "
                           f"installed ({err}); install the triton that matches your torch") from err
    return importlib.import_module(f"genfast.kernels.{name}")
