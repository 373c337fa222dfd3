"""Typed wrappers over torch.ops.genfast.attention_*, and their fake kernels.

Layout (B, H, L, D). ``attention_forward`` returns the output and the per-row
logsumexp that the backward uses to recompute the probabilities; gradients flow to
q, k and v (not to attn_mask, and not through logsumexp), by csrc/attention_autograd.cpp.
"""
from __future__ import annotations

import torch
from torch import Tensor

from genfast import _extension

_extension.load()  # registers torch.ops.genfast.*

_HALF = (torch.float16, torch.bfloat16)


def attention_forward(q: Tensor, k: Tensor, v: Tensor, attn_mask: Tensor | None, is_causal: bool,
                      scale: float) -> tuple[Tensor, Tensor]:
    """softmax(scale * q k^T + mask) v for q (B, Hq, Lq, D), k (B, Hk, Lk, D), v (B, Hk, Lk, Dv)."""
    return torch.ops.genfast.attention_forward(q, k, v, attn_mask, is_causal, scale)


def attention_backward(grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, logsumexp: Tensor,
                       attn_mask: Tensor | None, is_causal: bool, scale: float) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients (grad_q, grad_k, grad_v) of attention_forward's output."""
    return torch.ops.genfast.attention_backward(grad_out, q, k, v, out, logsumexp, attn_mask, is_causal, scale)


@torch.library.register_fake("genfast::attention_forward")
def _attention_forward_fake(q, k, v, attn_mask, is_causal, scale):
    out = q.new_empty((q.shape[0], q.shape[1], q.shape[2], v.shape[3]))
    lse = q.new_empty(q.shape[:3], dtype=torch.float32 if q.dtype in _HALF else q.dtype)
    return out, lse


@torch.library.register_fake("genfast::attention_backward")
def _attention_backward_fake(grad_out, q, k, v, out, logsumexp, attn_mask, is_causal, scale):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


__all__ = ["attention_forward", "attention_backward"]
