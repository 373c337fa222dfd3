"""Logits processing and sampling for autoregressive generation, with Hugging Face's semantics
(transformers' logits processors): repetition penalty, then temperature, top-k, top-p;
``top_k`` None or 0 and ``top_p`` 1.0 disable a filter.

  process_logits / sample   CPU, CUDA -> genfast's fused op (torch.ops.genfast.sampling_*: C++ on
                            CPU, Triton on CUDA); other devices -> the plain-PyTorch reference,
                            with a one-time warning
  apply_repetition_penalty  plain PyTorch (a gather and a scatter; nothing to fuse)
"""
from __future__ import annotations

import math
import warnings

import torch
from torch import Tensor

from genfast import reference

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
    if logits.device.type in _OP_DEVICES:
        from genfast.generation.ops.sampling import sampling_filter

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
        from genfast.generation.ops.sampling import sampling_draw

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


__all__ = ["process_logits", "sample", "apply_repetition_penalty"]
