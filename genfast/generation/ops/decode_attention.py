"""Decode-step attention: one query token per (batch, head) against a preallocated KV cache.

    genfast.generation.decode.decode_attention -> torch.ops.genfast.decode_attention
        -> csrc/generation/decode_attention.cpp (CPU)
        -> kernels/decode_attention.py (CUDA, Triton flash-decoding; registered below)

Reference: genfast.reference.attention on the cache's first ``length`` rows. Inference only.
``launch_cuda`` is the CUDA kernel itself; genfast.generation.decode calls it directly for eager
CUDA decode steps (the one place a call skips the dispatcher; why: docs/design.md).
"""
from __future__ import annotations

import torch
from torch import Tensor

_ops = torch.ops.genfast


def decode_attention(q: Tensor, k_cache: Tensor, v_cache: Tensor, length: int, scale: float) -> Tensor:
    """softmax(scale * K[:length] q) V[:length] for q (B, Hq, D), caches (B, Hk, max_len, D|Dv) -> (B, Hq, Dv)."""
    return _ops.decode_attention(q, k_cache, v_cache, int(length), float(scale))


@torch.library.register_fake("genfast::decode_attention")
def _decode_attention_fake(q, k_cache, v_cache, length, scale):
    return q.new_empty((q.shape[0], q.shape[1], v_cache.shape[3]))


def launch_cuda(q: Tensor, k_cache: Tensor, v_cache: Tensor, length: int | Tensor, scale: float) -> Tensor:
    """The op's CUDA kernel (Triton), imported on first use so that CPU-only installs need no triton.

    ``length`` may also be a one-element integer tensor on q's device, read by the kernels (for CUDA graphs).
    """
    from genfast.kernels import load

    return load("decode_attention", "decode_attention").decode_attention(q, k_cache, v_cache, length, scale)


torch.library.register_kernel("genfast::decode_attention", "cuda", launch_cuda)

__all__ = ["decode_attention", "launch_cuda"]
