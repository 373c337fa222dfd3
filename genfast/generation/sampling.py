"""Logits processing and sampling for autoregressive generation, with Hugging Face's semantics
(transformers' logits processors): repetition penalty, then temperature, top-k, top-p;
``top_k`` None or 0 and ``top_p`` 1.0 disable a filter.

  process_logits / sample   CPU, CUDA -> genfast's fused op (torch.ops.genfast.sampling_*: C++ on
                            CPU, Triton on CUDA); CUDA calls where the Triton kernel measured slower
                            -> the plain-PyTorch reference, by genfast.routing's rules (recorded in
                            genfast.routing.last_dispatch); other devices -> the plain-PyTorch
                            reference, with a one-time warning
  apply_repetition_penalty  plain PyTorch (a gather and a scatter; nothing to fuse)
"""
from __future__ import annotations

import math
import warnings

import torch
from torch import Tensor

from genfast import reference, routing

_warned_devices: set[str] = set()
_OP_DEVICES = ("cpu", "cuda")  # devices with a genfast sampling kernel


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
    if logits.device.type in _OP_DEVICES and not _routed_to_torch("sampling_filter", logits):
        from genfast.generation.ops.sampling import sampling_filter

        return sampling_filter(logits, temperature, top_k, top_p)
    if logits.device.type not in _OP_DEVICES:
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
    return _draw(logits, uniforms.to(logits.device), temperature, top_k, top_p)


def draw(logits: Tensor, uniforms: Tensor, temperature: float = 1.0, top_k: int | None = None,
         top_p: float = 1.0) -> Tensor:
    """sample() at given uniforms (N,) in [0, 1) on logits' device: the processed distribution's inverse CDF."""
    top_k = _check_settings(logits, temperature, top_k, top_p)
    if uniforms.shape != (logits.shape[0],) or uniforms.device != logits.device or not uniforms.is_floating_point():
        raise ValueError(f"uniforms must be a floating point ({logits.shape[0]},) tensor on {logits.device}, got "
                         f"{uniforms.dtype} {tuple(uniforms.shape)} on {uniforms.device}")
    return _draw(logits, uniforms, temperature, top_k, top_p)


def _draw(logits: Tensor, uniforms: Tensor, temperature: float, top_k: int, top_p: float) -> Tensor:
    if logits.device.type in _OP_DEVICES and not _routed_to_torch("sampling_draw", logits):
        from genfast.generation.ops.sampling import sampling_draw

        return sampling_draw(logits, uniforms, temperature, top_k, top_p)
    if logits.device.type not in _OP_DEVICES:
        _warn_fallback(logits.device, "sampling")
    scores = reference.process_logits(logits, temperature, top_k, top_p)
    return reference.draw_from_scores(scores, uniforms)


def _routed_to_torch(op: str, logits: Tensor) -> bool:
    """Whether genfast.routing sends this CUDA call to the plain-PyTorch path (the reference's equations)."""
    if not logits.is_cuda or logits.numel() == 0:  # empty input: the op's own result or error
        return False
    rows, vocab = logits.shape
    return routing.route(op, "cuda", logits.dtype, "genfast-triton", rows=rows, vocab=vocab) is not None


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


__all__ = ["process_logits", "sample", "draw", "apply_repetition_penalty"]
