"""Building blocks of autoregressive generation: logits processing, sampling, decode attention,
decode-step linear layers.

The one API that checks arguments and dispatches by device:
  process_logits / sample   CPU, CUDA -> genfast's fused op (torch.ops.genfast.sampling_*: C++ on
                            CPU, Triton on CUDA); other devices -> the plain-PyTorch reference,
                            with a one-time warning
  decode_attention          CPU, CUDA -> torch.ops.genfast.decode_attention (one query token vs
                            the KV cache; C++ on CPU, Triton flash-decoding on CUDA, whose
                            launcher eager calls reach directly; inference only); autograd and
                            other devices -> genfast's scaled_dot_product_attention on the
                            filled rows (differentiable)
  linear                    F.linear's contract. A few rows (a decode step) on CPU in inference
                            -> torch.ops.genfast.decode_linear (streams the weight at memory
                            bandwidth); anything else (prefill, autograd, other devices) ->
                            F.linear, which is the right kernel there (a GEMM)
  apply_repetition_penalty  plain PyTorch (a gather and a scatter; nothing to fuse)

Semantics are Hugging Face's (transformers' logits processors): repetition penalty,
then temperature, top-k, top-p; ``top_k`` None or 0 and ``top_p`` 1.0 disable a filter.
"""
from __future__ import annotations

import math
import warnings

import torch
import torch.nn.functional as F
from torch import Tensor

from genfast import reference
from genfast.nn import functional as gf

_warned_devices: set[str] = set()
_OP_DEVICES = ("cpu", "cuda")  # devices with a genfast kernel for the ops below


def _warn_fallback(device: torch.device, what: str) -> None:
    if device.type not in _warned_devices:
        _warned_devices.add(device.type)
        warnings.warn(f"genfast: no fused {what} kernel for {device.type} tensors; using the plain-PyTorch "
                      "reference (same results, slower)", stacklevel=3)


def _check_settings(logits: Tensor, temperature: float, top_k: int | None, top_p: float) -> int:
    if logits.dim() != 2:
        raise ValueError(f"logits must be (batch, vocab), got shape {tuple(logits.shape)}")
    if not logits.is_floating_point():
        raise TypeError(f"logits must be floating point, got {logits.dtype}")
    if not (isinstance(temperature, (int, float)) and math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"temperature must be a positive finite number, got {temperature!r}")
    top_k = 0 if top_k is None else top_k
    if not isinstance(top_k, int) or top_k < 0:
        raise ValueError(f"top_k must be None or an int >= 0, got {top_k!r}")
    if not (isinstance(top_p, (int, float)) and 0.0 <= top_p <= 1.0):
        raise ValueError(f"top_p must be a float in [0, 1], got {top_p!r}")
    return top_k


def process_logits(logits: Tensor, temperature: float = 1.0, top_k: int | None = None,
                   top_p: float = 1.0) -> Tensor:
    """logits (N, V) -> scores / temperature with -inf where top-k / top-p remove the token."""
    top_k = _check_settings(logits, temperature, top_k, top_p)
    if logits.device.type in _OP_DEVICES:
        from genfast.ops.sampling import sampling_filter

        return sampling_filter(logits, temperature, top_k, top_p)
    _warn_fallback(logits.device, "sampling")
    return reference.process_logits(logits, temperature, top_k, top_p)


def sample(logits: Tensor, temperature: float = 1.0, top_k: int | None = None, top_p: float = 1.0,
           generator: torch.Generator | None = None) -> Tensor:
    """One token per row of logits (N, V) -> int64 (N,), drawn from the processed distribution.

    The randomness is one uniform per row from ``torch.rand(generator=generator)``, so a
    seeded generator gives the same tokens on every run.
    """
    top_k = _check_settings(logits, temperature, top_k, top_p)
    uniforms = torch.rand(logits.shape[0], generator=generator, dtype=torch.float64,
                          device=generator.device if generator is not None else logits.device)
    if logits.device.type in _OP_DEVICES:
        from genfast.ops.sampling import sampling_draw

        return sampling_draw(logits, uniforms.to(logits.device), temperature, top_k, top_p)
    _warn_fallback(logits.device, "sampling")
    scores = reference.process_logits(logits, temperature, top_k, top_p)
    return reference.draw_from_scores(scores, uniforms.to(logits.device))


def apply_repetition_penalty(scores: Tensor, token_ids: Tensor, penalty: float) -> Tensor:
    """HF's RepetitionPenaltyLogitsProcessor: scores (N, V) of tokens seen in token_ids (N, T)
    are divided by ``penalty`` where positive and multiplied where negative."""
    if not (isinstance(penalty, (int, float)) and penalty > 0):
        raise ValueError(f"repetition_penalty must be a positive number, got {penalty!r}")
    if penalty == 1.0:
        return scores
    seen = torch.gather(scores, 1, token_ids)
    seen = torch.where(seen < 0, seen * penalty, seen / penalty)
    return scores.scatter(1, token_ids, seen)


def decode_attention(q: Tensor, k_cache: Tensor, v_cache: Tensor, length: int | Tensor, scale: float) -> Tensor:
    """Attention of q (B, Hq, D), one token per row, over the first ``length`` rows of the
    caches (B, Hk, max_len, D). Returns (B, Hq, Dv).

    On CUDA ``length`` may be a one-element integer tensor on q's device, which the Triton kernels
    read from memory, so that a CUDA graph can capture a decode step and replay it as the cache grows
    (elsewhere a tensor length is read on the host).

    Eager CUDA calls go to the Triton launcher directly: dispatching torch.ops to a Python kernel cost
    as much as the kernels at batch 1 (0.20 ms against 0.11 ms per call on an H200). Under
    torch.compile the registered op is called, so the graph sees it.

    The op has no backward: when autograd needs one (grad enabled and q or a cache requiring grad,
    e.g. fine-tuning through a cached decode step), genfast's differentiable attention runs instead."""
    needs_grad = torch.is_grad_enabled() and (q.requires_grad or k_cache.requires_grad or v_cache.requires_grad)
    if q.is_cuda and not needs_grad and (isinstance(length, Tensor) or not torch.compiler.is_compiling()):
        from genfast.kernels import load

        return load("decode_attention", "decode_attention").decode_attention(q, k_cache, v_cache, length, scale)
    if isinstance(length, Tensor):
        length = int(length)
    if q.device.type in _OP_DEVICES and not needs_grad:
        from genfast.ops.decode_attention import decode_attention as op

        return op(q, k_cache, v_cache, length, scale)
    out = gf.scaled_dot_product_attention(q.unsqueeze(2), k_cache[:, :, :length], v_cache[:, :, :length],
                                          scale=scale, enable_gqa=k_cache.shape[1] != q.shape[1])
    return out.squeeze(2)


def linear(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """``F.linear(x, weight, bias)``; for the few rows of x on CPU (without autograd) for which decode_linear
    reads the weight in place (up to 32, dot_path_rows), through it. Not a fallback: F.linear (a GEMM) is the
    faster kernel elsewhere."""
    from genfast.ops.decode_linear import decode_linear, dot_path_rows

    rows = x.numel() // x.shape[-1] if x.shape[-1] else 0
    needs_grad = torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad
                                              or (bias is not None and bias.requires_grad))
    if (0 < rows and x.device.type == "cpu" and not needs_grad and x.dtype in (torch.float32, torch.float64)
            and weight.dtype == x.dtype and rows <= dot_path_rows(weight)):
        return decode_linear(x.reshape(rows, x.shape[-1]), weight, bias).view(*x.shape[:-1], weight.shape[0])
    return F.linear(x, weight, bias)


__all__ = ["process_logits", "sample", "apply_repetition_penalty", "decode_attention", "linear"]
