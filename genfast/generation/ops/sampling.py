"""Fused logits processing and sampling: temperature + top-k + top-p (+ the draw) in one pass.

    genfast.generation.sampling.sample -> genfast.generation.ops.sampling.sampling_draw
        -> torch.ops.genfast.sampling_draw -> csrc/generation/sampling.cpp (CPU)
                                           -> kernels/sampling.py (CUDA, Triton; registered below)

Hugging Face's semantics (reference: genfast.reference.process_logits / draw_from_scores).
The draw takes its uniforms from the caller, so randomness comes from a torch.Generator
and a seeded generator reproduces the tokens. Not differentiable (discrete output, and
the filter's mask has no gradient worth having).
"""
from __future__ import annotations

import torch
from torch import Tensor

_ops = torch.ops.genfast


def sampling_filter(logits: Tensor, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0) -> Tensor:
    """logits (N, V) / temperature, with -inf where top-k or top-p removes the token."""
    return _ops.sampling_filter(logits, float(temperature), int(top_k), float(top_p))


def sampling_draw(logits: Tensor, uniforms: Tensor, temperature: float = 1.0, top_k: int = 0,
                  top_p: float = 1.0) -> Tensor:
    """One int64 token per row of logits (N, V): the filter above, then the inverse CDF at uniforms (N,)."""
    return _ops.sampling_draw(logits, uniforms, float(temperature), int(top_k), float(top_p))


@torch.library.register_fake("genfast::sampling_filter")
def _sampling_filter_fake(logits, temperature, top_k, top_p):
    return logits.new_empty(logits.shape)


@torch.library.register_fake("genfast::sampling_draw")
def _sampling_draw_fake(logits, uniforms, temperature, top_k, top_p):
    return logits.new_empty((logits.shape[0],), dtype=torch.int64)


# CUDA: the Triton kernels, imported on first use so that CPU-only installs need no triton.
@torch.library.register_kernel("genfast::sampling_filter", "cuda")
def _sampling_filter_cuda(logits, temperature, top_k, top_p):
    from genfast.kernels import load

    return load("sampling", "sampling_filter").sampling_filter(logits, temperature, top_k, top_p)


@torch.library.register_kernel("genfast::sampling_draw", "cuda")
def _sampling_draw_cuda(logits, uniforms, temperature, top_k, top_p):
    from genfast.kernels import load

    return load("sampling", "sampling_draw").sampling_draw(logits, uniforms, temperature, top_k, top_p)


__all__ = ["sampling_filter", "sampling_draw"]
