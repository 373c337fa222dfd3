"""Loading the compiled extension, with an error that says how to build it.

There is no pure-PyTorch fallback for genfast's ops: if ``genfast._C`` is missing,
everything that needs it raises :class:`ImportError` with build instructions.
"""
from __future__ import annotations

import importlib

_BUILD_HINT = (
    "genfast's compiled extension genfast._C could not be loaded ({err}).\n"
    "Build it against your installed torch, from the repository root:\n"
    "    pip install --no-build-isolation -e .      # or: make setup\n"
    "(install torch first; see README.md)."
)

_module = None
_error: Exception | None = None


def load():
    """Import genfast._C (which registers torch.ops.genfast.*) or raise ImportError."""
    global _module, _error
    if _module is not None:
        return _module
    try:
        import torch  # noqa: F401  (the extension links against libtorch)

        _module = importlib.import_module("genfast._C")
    except ImportError as err:  # missing file, or an ABI mismatch with this torch
        _error = err
        raise ImportError(_BUILD_HINT.format(err=err)) from err
    return _module


def available() -> bool:
    try:
        load()
        return True
    except ImportError:
        return False


def load_error() -> str | None:
    return None if _error is None else str(_error)
