"""The attention op: typed wrappers over torch.ops.genfast.attention_*, its fake kernels, and its
CUDA kernels.

    genfast.nn.functional.scaled_dot_product_attention -> attention_forward
        -> torch.ops.genfast.attention_forward -> csrc/cpu/attention.cpp (CPU)
                                               -> kernels/flash_attention.py (CUDA, Triton; registered below)
        autograd: csrc/attention_autograd.cpp (every device) -> torch.ops.genfast.attention_backward

Layout (B, H, L, D). ``attention_forward`` returns the output and the per-row logsumexp that the
backward uses to recompute the probabilities; gradients flow to q, k and v (not to attn_mask,
and not through logsumexp). The CUDA kernel reads attn_mask in place (bool or additive) and needs v's
head dim equal to q's (genfast.nn.functional sends other calls to torch's SDPA, saying why); dropout
on CUDA runs in kernels/flash_attention.flash_attention, outside this op (its schema has no dropout).
"""
from __future__ import annotations

import functools

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


# ---- CUDA: the Triton kernels, imported on first use so that CPU-only installs need no triton ----

@functools.cache
def cuda_kernel_error() -> str | None:
    """Why the CUDA kernels cannot run here (triton missing or failing to import), or None. Asked once."""
    try:
        _flash()
    except (ImportError, RuntimeError) as err:
        return f"Triton kernel unavailable ({err})"
    return None


def _flash():
    from genfast.kernels import load

    return load("flash_attention", "attention_forward")


def attention_forward_cuda(q, k, v, attn_mask, is_causal, scale):
    """attention_forward's CUDA kernel (also runs CPU tensors under TRITON_INTERPRET=1, for tests).
    attn_mask (bool or additive, broadcastable to (B, Hq, Lq, Lk)) is read in place by the kernel."""
    return _flash().forward(q, k, v, is_causal, scale, attn_mask)


def attention_backward_cuda(grad_out, q, k, v, out, logsumexp, attn_mask, is_causal, scale):
    """attention_backward's CUDA kernel (also runs CPU tensors under TRITON_INTERPRET=1, for tests)."""
    return _flash().backward(grad_out, q, k, v, out, logsumexp, is_causal, scale, attn_mask)


torch.library.register_kernel("genfast::attention_forward", "cuda", attention_forward_cuda)
torch.library.register_kernel("genfast::attention_backward", "cuda", attention_backward_cuda)

__all__ = ["attention_forward", "attention_backward", "cuda_kernel_error"]
