"""Variable-length attention (FlashAttention-2's packed layout): typed wrappers over
torch.ops.genfast.attention_varlen_*, and their fake kernels.

    genfast.nn.functional.flash_attn_varlen -> attention_varlen_forward (CPU tensors)
        -> torch.ops.genfast.attention_varlen_forward -> csrc/cpu/attention.cpp
        autograd: csrc/attention_varlen_autograd.cpp -> torch.ops.genfast.attention_varlen_backward

q (total_q, Hq, D), k (total_k, Hk, D), v (total_k, Hk, Dv); cu_seqlens_* int32 (B + 1). Causal and
windows are aligned bottom-right. Returns the output (total_q, Hq, Dv) and logsumexp (Hq, total_q).
CUDA tensors go to genfast.kernels.flash_attention.flash_attention_varlen (Triton) from
genfast.nn.functional; no CUDA kernel is registered to these ops.
"""
from __future__ import annotations

import torch
from torch import Tensor

from genfast import _extension

_extension.load()  # registers torch.ops.genfast.*

_HALF = (torch.float16, torch.bfloat16)


def attention_varlen_forward(q: Tensor, k: Tensor, v: Tensor, cu_seqlens_q: Tensor, cu_seqlens_k: Tensor,
                             max_seqlen_q: int, max_seqlen_k: int, causal: bool, scale: float, window_left: int,
                             window_right: int, dropout_p: float,
                             dropout_seed: Tensor | None) -> tuple[Tensor, Tensor]:
    """(out, logsumexp) of attention over each packed sequence."""
    return torch.ops.genfast.attention_varlen_forward(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                                                      max_seqlen_k, causal, scale, window_left, window_right,
                                                      dropout_p, dropout_seed)


def dropout_mask(batch: int, heads: int, len_q: int, len_k: int, dropout_p: float, dropout_seed: Tensor) -> Tensor:
    """The multipliers (0 or 1 / (1 - p), float64, (batch, heads, len_q, len_k)) the kernels draw for a seed.

    Positions are counted within each sequence; len_q / len_k must be the max_seqlen_* of the call.
    """
    return torch.ops.genfast.attention_dropout_mask(batch, heads, len_q, len_k, dropout_p, dropout_seed)


@torch.library.register_fake("genfast::attention_varlen_forward")
def _attention_varlen_forward_fake(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal, scale,
                                   window_left, window_right, dropout_p, dropout_seed):
    out = q.new_empty((q.shape[0], q.shape[1], v.shape[2]))
    lse = q.new_empty((q.shape[1], q.shape[0]), dtype=torch.float32 if q.dtype in _HALF else q.dtype)
    return out, lse


@torch.library.register_fake("genfast::attention_varlen_backward")
def _attention_varlen_backward_fake(grad_out, q, k, v, out, logsumexp, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                                    max_seqlen_k, causal, scale, window_left, window_right, dropout_p, dropout_seed):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


@torch.library.register_fake("genfast::attention_dropout_mask")
def _attention_dropout_mask_fake(batch, heads, len_q, len_k, dropout_p, dropout_seed):
    return dropout_seed.new_empty((batch, heads, len_q, len_k), dtype=torch.float64)


__all__ = ["attention_varlen_forward", "dropout_mask"]
