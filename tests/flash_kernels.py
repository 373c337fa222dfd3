"""The Triton flash-attention kernels (kernels/flash_attention.py) as their tests call them.

``forward`` / ``backward`` are the kernel module's launchers; ``flash_attention`` pairs them under
autograd, so a test of the kernels runs exactly them (no dispatcher, no other device's kernel).
``op_attention`` is the registered op whose kernels these are, differentiable through the op's own
autograd, for opcheck and torch.compile.

The kernel module exposes its launchers as ``forward`` and ``backward``, and its kernels are the CUDA
kernels of torch.ops.genfast.attention_forward / attention_backward; a module without them registers
the kernels as ops of their own (genfast::flash_attention_forward / _backward). Both are read here, in
this one place.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from genfast.kernels import flash_attention as flash_module

LAUNCHERS = hasattr(flash_module, "forward") and hasattr(flash_module, "backward")


def _scale(q: Tensor, scale: float | None) -> float:
    return 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)


if LAUNCHERS:
    forward, backward = flash_module.forward, flash_module.backward

    def op_forward_args(q, k, v, causal, scale):
        return (q, k, v, None, causal, scale)

    def op_backward_args(grad_out, q, k, v, out, lse, causal, scale):
        return (grad_out, q, k, v, out, lse, None, causal, scale)

    OP_FORWARD, OP_BACKWARD = "attention_forward", "attention_backward"
else:
    def forward(q: Tensor, k: Tensor, v: Tensor, causal: bool = False, scale: float | None = None):
        flash_module._check_inputs(q, k, v)
        return torch.ops.genfast.flash_attention_forward(q, k, v, bool(causal), _scale(q, scale))

    def backward(grad_out, q, k, v, out, lse, causal: bool = False, scale: float | None = None):
        return torch.ops.genfast.flash_attention_backward(grad_out, q, k, v, out, lse, bool(causal), _scale(q, scale))

    def op_forward_args(q, k, v, causal, scale):
        return (q, k, v, causal, scale)

    def op_backward_args(grad_out, q, k, v, out, lse, causal, scale):
        return (grad_out, q, k, v, out, lse, causal, scale)

    OP_FORWARD, OP_BACKWARD = "flash_attention_forward", "flash_attention_backward"


def op(name: str):
    """torch.ops.genfast.<name>.default"""
    return getattr(torch.ops.genfast, name).default


class _FlashAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, causal, scale):
        out, lse = forward(q, k, v, causal, scale)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.causal, ctx.scale = causal, scale
        return out

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, out, lse = ctx.saved_tensors
        grad_q, grad_k, grad_v = backward(grad_out, q, k, v, out, lse, ctx.causal, ctx.scale)
        return grad_q, grad_k, grad_v, None, None


def flash_attention(q: Tensor, k: Tensor, v: Tensor, *, causal: bool = False, scale: float | None = None) -> Tensor:
    """softmax(q k^T * scale [+ causal mask]) v by the kernels, q (B, Hq, L, D), k and v (B, Hk, S, D);
    the backward by the kernels' backward."""
    return _FlashAttention.apply(q, k, v, bool(causal), scale)


def op_attention(q: Tensor, k: Tensor, v: Tensor, causal: bool, scale: float) -> Tensor:
    """The output of the registered op whose kernels these are (its autograd included)."""
    return op(OP_FORWARD)(*op_forward_args(q, k, v, causal, scale))[0]
