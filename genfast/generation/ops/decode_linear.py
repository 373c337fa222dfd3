"""Decode-step linear layer: ``F.linear(x, weight, bias)`` for a few rows, streaming the weight once.

    genfast.generation.decode.linear -> genfast.generation.ops.decode_linear.decode_linear
        -> torch.ops.genfast.decode_linear -> csrc/generation/decode_linear.cpp

Reference: ``torch.nn.functional.linear``. Inference only (no autograd): genfast.generation.decode.linear
sends inputs that need gradients, and inputs with more rows than ``dot_path_rows(weight)``, to torch.
"""
from __future__ import annotations

import functools

import torch
from torch import Tensor

_ops = torch.ops.genfast


def dot_path_rows(weight: Tensor) -> int:
    """The most rows of x for which decode_linear(x, weight) reads ``weight`` in place, by dot products
    (the core matmul's few-row path, csrc/cpu/gemm.h dot_path_max_rows); more rows take its GEMM path,
    where torch's F.linear is as good."""
    return _max_rows(weight.numel() * weight.element_size())


@functools.lru_cache(maxsize=256)
def _max_rows(weight_bytes: int) -> int:  # asked per decode-step linear layer: cached by size
    return _ops.decode_linear_max_rows(weight_bytes)


def decode_linear(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """x (M, K), weight (N, K) as nn.Linear stores it, bias (N,) -> x weight^T + bias, (M, N)."""
    return _ops.decode_linear(x, weight, bias)


@torch.library.register_fake("genfast::decode_linear")
def _decode_linear_fake(x, weight, bias):
    return x.new_empty((x.shape[0], weight.shape[0]))


__all__ = ["decode_linear", "dot_path_rows"]
