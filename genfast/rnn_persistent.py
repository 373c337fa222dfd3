"""The persistent CUDA LSTM/GRU kernels (issue 20): their switch and the record of the path taken.

Opt-in until a GPU session measures it: ``GENFAST_RNN_PERSISTENT=1`` in the environment (read by the CUDA
glue at every layer call, so setting ``os.environ`` in a running process takes effect), or the
``enabled()`` context manager. When on, each CUDA LSTM/GRU layer and direction whose shape fits on chip
(csrc/rnn/persistent_plan.h) runs as one cooperative kernel launch; every other layer runs the per-step
path, and ``last_path()`` says which ran last and why. Training runs the persistent backward (BPTT) kernel too
where it fits, else the per-step backward on what the persistent forward saved. genfast.routing's rules still
apply to the drop-in modules (fp32 and long bf16 sequences go to cuDNN unless the kernels are forced).
"""
from __future__ import annotations

import contextlib
import os
from typing import Iterator

ENV = "GENFAST_RNN_PERSISTENT"


def is_enabled() -> bool:
    return os.environ.get(ENV, "0") == "1"


@contextlib.contextmanager
def enabled(on: bool = True) -> Iterator[None]:
    """Within the block, CUDA LSTM/GRU layers try the persistent kernel (on=True) or never do (False)."""
    previous = os.environ.get(ENV)
    os.environ[ENV] = "1" if on else "0"
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop(ENV, None)
        else:
            os.environ[ENV] = previous


def last_path() -> dict:
    """The path the latest CUDA LSTM/GRU layer call took, forward or backward ("persistent", "per-step"; "none"
    before any; a backward's reason starts with "backward: "), why, and how many forward and backward layers the
    persistent kernels have run in this process."""
    import torch

    from genfast import _extension

    if not (_extension.available() and _extension.load().cuda_built()):
        return {"path": None, "reason": "genfast._C has no CUDA kernels", "persistent_layers": 0,
                "persistent_backward_layers": 0}
    path, reason, layers, backward_layers = torch.ops.genfast.rnn_cuda_path()
    return {"path": path, "reason": reason, "persistent_layers": layers, "persistent_backward_layers": backward_layers}


__all__ = ["ENV", "is_enabled", "enabled", "last_path"]
