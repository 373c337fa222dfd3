"""Which backend genfast.nn.functional.scaled_dot_product_attention took: the one place the attention
tests read ``last_dispatch()``, so a silent hand-off to torch cannot pass as a kernel test."""
from __future__ import annotations

from genfast.nn import functional as gf

# The backend names last_dispatch() records.
CPU_KERNEL = "genfast-cpu"            # the fused C++ kernel
CPU_UNFUSED = "genfast-cpu-unfused"   # dropout on the CPU: the softmax materialised, torch's dropout applied
TRITON_KERNEL = "genfast-triton"      # the Triton flash-attention kernel (CUDA)
HANDED_OFF = "torch"                  # torch's own SDPA, with the reason recorded
CPU_VARLEN = "genfast-cpu-varlen"     # flash_attn_varlen's C++ kernel (also MultiheadAttention's end padding)
TRITON_VARLEN = "genfast-triton-varlen"  # flash_attn_varlen's Triton kernel (CUDA)


def expect_dispatch(call, backend, reason=None):
    """Runs call() and asserts that genfast's SDPA chose ``backend`` for it, and, if given, that the
    recorded reason contains ``reason``. Returns call()'s result. The record is cleared first, so
    that a call that records nothing cannot pass on an earlier call's decision."""
    gf._last_dispatch.update(backend=None, reason="cleared by the test")  # last_dispatch() has no reset
    result = call()
    dispatch = gf.last_dispatch()
    assert dispatch["backend"] == backend, dispatch
    if reason is not None:
        assert reason in dispatch["reason"], dispatch
    return result
