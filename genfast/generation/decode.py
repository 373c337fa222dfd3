"""The attention and linear layers of one decode step (one new token per sequence), routed by
device and autograd:

  decode_attention  CPU, CUDA -> torch.ops.genfast.decode_attention (one query token vs the KV cache;
                    C++ on CPU, Triton flash-decoding on CUDA, whose kernel eager calls reach
                    directly: see decode_attention); CUDA shapes where that kernel measured slower
                    -> torch's SDPA or plain matmuls, by genfast.routing's rules; autograd and other
                    devices -> genfast's scaled_dot_product_attention on the filled rows (differentiable)
  linear            F.linear's contract. A few rows on CPU in inference -> torch.ops.genfast.decode_linear
                    (streams the weight at memory bandwidth); anything else (prefill, autograd,
                    other devices) -> F.linear, which is the right kernel there (a GEMM)
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from genfast import reference, routing
from genfast.generation.ops import decode_attention as _decode_attention_op
from genfast.generation.ops.decode_linear import decode_linear, dot_path_rows
from genfast.nn import functional as gf

_OP_DEVICES = ("cpu", "cuda")  # devices with a genfast decode-attention kernel


def decode_attention(q: Tensor, k_cache: Tensor, v_cache: Tensor, length: int | Tensor, scale: float) -> Tensor:
    """Attention of q (B, Hq, D), one token per row, over the first ``length`` rows of the
    caches (B, Hk, max_len, D). Returns (B, Hq, Dv).

    On CUDA ``length`` may be a one-element integer tensor on q's device, which the Triton kernels
    read from memory, so that a CUDA graph can capture a decode step and replay it as the cache grows
    (elsewhere a tensor length is read on the host).

    Eager CUDA calls run the op's CUDA kernel directly (``launch_cuda``, the function the op has
    registered): at batch 1 the dispatch of torch.ops to a Python kernel costs about as much as the
    kernels (docs/design.md). Under torch.compile the op itself is called, so the graph sees it.
    CUDA calls at shapes where the kernel was measured slower than a torch path run that path instead
    (genfast.routing; genfast.routing.last_dispatch("decode_attention") says which ran and why).

    The op has no backward: when autograd needs one (grad enabled and q or a cache requiring grad,
    e.g. fine-tuning through a cached decode step), genfast's differentiable attention runs instead."""
    needs_grad = torch.is_grad_enabled() and (q.requires_grad or k_cache.requires_grad or v_cache.requires_grad)
    if q.is_cuda and not needs_grad:
        torch_path = _routed_torch_path(q, k_cache, v_cache, length)
        if torch_path is not None:
            return torch_path(q, k_cache, v_cache, int(length), scale)
        if isinstance(length, Tensor) or not torch.compiler.is_compiling():
            return _decode_attention_op.launch_cuda(q, k_cache, v_cache, length, scale)
    if isinstance(length, Tensor):
        length = int(length)
    if q.device.type in _OP_DEVICES and not needs_grad:
        return _decode_attention_op.decode_attention(q, k_cache, v_cache, length, scale)
    out = gf.scaled_dot_product_attention(q.unsqueeze(2), k_cache[:, :, :length], v_cache[:, :, :length],
                                          scale=scale, enable_gqa=k_cache.shape[1] != q.shape[1])
    return out.squeeze(2)


def _routed_torch_path(q: Tensor, k_cache: Tensor, v_cache: Tensor, length: int | Tensor):
    """The torch path genfast.routing sends this CUDA call to (None: genfast's kernel). Only well-formed calls
    are routed: the kernel raises the errors for the others."""
    if q.dim() != 3 or k_cache.dim() != 4 or v_cache.dim() != 4:
        return None
    batch, heads_q, dim = q.shape
    k_batch, heads_kv, max_len, k_dim = k_cache.shape
    v_batch, v_heads, v_len, _ = v_cache.shape
    host_length = not isinstance(length, Tensor)
    dtype = q.dtype
    if (k_cache.dtype != dtype or v_cache.dtype != dtype or k_batch != batch or v_batch != batch
            or v_heads != heads_kv or v_len != max_len or k_dim != dim or heads_kv == 0 or heads_q % heads_kv
            or (host_length and not 1 <= length <= max_len)
            or k_cache.get_device() != q.get_device() or v_cache.get_device() != q.get_device()):
        return None
    rule = routing.route("decode_attention", "cuda", dtype, "genfast-triton", batch=batch, heads_q=heads_q,
                         heads_kv=heads_kv, head_dim=dim, length=int(length) if host_length else None)
    return None if rule is None else _TORCH_PATHS[rule.winner]


def _torch_sdpa(q: Tensor, k_cache: Tensor, v_cache: Tensor, length: int, scale: float) -> Tensor:
    """torch's SDPA on the cache's first ``length`` rows (views), as the benchmark's torch_sdpa provider calls it."""
    return F.scaled_dot_product_attention(q[:, :, None], k_cache[:, :, :length], v_cache[:, :, :length],
                                          scale=scale, enable_gqa=q.shape[1] != k_cache.shape[1])[:, :, 0]


def _torch_math(q: Tensor, k_cache: Tensor, v_cache: Tensor, length: int, scale: float) -> Tensor:
    """q K^T, softmax, V in plain PyTorch (genfast.reference.attention, the benchmark's reference provider)."""
    return reference.attention(q[:, :, None], k_cache[:, :, :length], v_cache[:, :, :length], scale=scale,
                               enable_gqa=True)[:, :, 0]


_TORCH_PATHS = {"torch_sdpa": _torch_sdpa, "torch_math": _torch_math}


def linear(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """``F.linear(x, weight, bias)``; for the few rows of x on CPU (without autograd) for which decode_linear
    reads the weight in place (at most ``dot_path_rows(weight)``), through it. Not a fallback: F.linear
    (a GEMM) is the faster kernel elsewhere."""
    rows = x.numel() // x.shape[-1] if x.shape[-1] else 0
    needs_grad = torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad
                                              or (bias is not None and bias.requires_grad))
    if (0 < rows and x.device.type == "cpu" and not needs_grad and x.dtype in (torch.float32, torch.float64)
            and weight.dtype == x.dtype and rows <= dot_path_rows(weight)):
        return decode_linear(x.reshape(rows, x.shape[-1]), weight, bias).view(*x.shape[:-1], weight.shape[0])
    return F.linear(x, weight, bias)


__all__ = ["decode_attention", "linear"]
