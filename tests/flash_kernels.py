"""The Triton flash-attention kernels (kernels/flash_attention.py) as their tests call them.

``forward`` / ``backward`` are the kernel module's launchers; ``flash_attention`` pairs them under
autograd, so a test of the kernels runs exactly them (no dispatcher, no other device's kernel).
``op_attention`` is the registered op whose kernels these are, differentiable through the op's own
autograd, for opcheck and torch.compile.

The kernels are the CUDA kernels of torch.ops.genfast.attention_forward / attention_backward.
"""
from __future__ import annotations

import torch
from torch import Tensor

from genfast.kernels import flash_attention as flash_module

forward, backward = flash_module.forward, flash_module.backward
OP_FORWARD, OP_BACKWARD = "attention_forward", "attention_backward"


def op_forward_args(q, k, v, causal, scale):
    return (q, k, v, None, causal, scale)


def op_backward_args(grad_out, q, k, v, out, lse, causal, scale):
    return (grad_out, q, k, v, out, lse, None, causal, scale)


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
