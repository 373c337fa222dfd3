"""Decode-step attention: one query token per (batch, head) against a preallocated KV cache.

    genfast.nn.generation.decode_attention -> torch.ops.genfast.decode_attention
                                           -> csrc/cpu/decode_attention.cpp (CPU)
                                           -> kernels/decode_attention.py (CUDA, Triton flash-decoding)

Reference: genfast.reference.attention on the cache's first ``length`` rows. Inference only.
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


# CUDA: the Triton kernels, imported on first use so that CPU-only installs need no triton.
@torch.library.register_kernel("genfast::decode_attention", "cuda")
def _decode_attention_cuda(q, k_cache, v_cache, length, scale):
    from genfast.kernels import load

    return load("decode_attention", "decode_attention").decode_attention(q, k_cache, v_cache, length, scale)


__all__ = ["decode_attention"]
