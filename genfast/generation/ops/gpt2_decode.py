"""One GPT-2 block for one new token per row, fused on the CPU: the decode step of generation.

    genfast.generation.gpt2.Block.decode_step -> torch.ops.genfast.gpt2_decode_block
                                              -> csrc/generation/gpt2_decode.cpp

Reference: the block's own forward (genfast.generation.gpt2.Block) with a KV cache, which runs the
same equations as separate torch ops. Inference only (no autograd), CPU, float32/float64. Any number
of rows is computed correctly; GPT2 sends it only the rows for which every weight of the block is on
decode_linear's few-row path (``max_rows``); beyond it the unfused blocks run torch's GEMMs.
"""
from __future__ import annotations

import torch
from torch import Tensor

from genfast.generation.ops.decode_linear import dot_path_rows

_ops = torch.ops.genfast

# The activations the kernel computes, by GPT2Config.activation_function.
ACTIVATIONS = {"gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "gelu": "gelu", "relu": "relu",
               "silu": "silu", "swish": "silu"}


def gpt2_decode_block(x: Tensor, ln_1: tuple[Tensor, Tensor], attn: tuple[Tensor, Tensor],
                      attn_proj: tuple[Tensor, Tensor], ln_2: tuple[Tensor, Tensor], fc: tuple[Tensor, Tensor],
                      mlp_proj: tuple[Tensor, Tensor], k_cache: Tensor, v_cache: Tensor, position: int,
                      n_head: int, scale: float, eps: float, activation: str) -> Tensor:
    """x (B, C) after one pre-LN GPT-2 block; (weight, bias) pairs in nn.Linear / nn.LayerNorm layout.

    Writes the token's key and value into row ``position`` of k_cache, v_cache (B, n_head, max_len,
    C / n_head), in place, and attends to rows [0, position]. ``activation``: a GPT2Config name.
    """
    if activation not in ACTIVATIONS:
        raise ValueError(f"gpt2_decode_block: activation {activation!r} not one of {sorted(ACTIVATIONS)}")
    return _ops.gpt2_decode_block(x, *ln_1, *attn, *attn_proj, *ln_2, *fc, *mlp_proj, k_cache, v_cache,
                                  int(position), int(n_head), float(scale), float(eps), ACTIVATIONS[activation])


def max_rows(weights: list[Tensor]) -> int:
    """The most rows for which the fused block reads each of ``weights`` in place (decode_linear's path)."""
    return min(dot_path_rows(w) for w in weights)


@torch.library.register_fake("genfast::gpt2_decode_block")
def _gpt2_decode_block_fake(x, *args):
    return x.new_empty(x.shape)


__all__ = ["gpt2_decode_block", "ACTIVATIONS", "max_rows"]
