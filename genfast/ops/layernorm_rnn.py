"""Layer-normalised LSTM and GRU ops (issue 19): one layer, one direction, a whole (padded or packed)
sequence.

    genfast.nn.LayerNormLSTM.forward -> genfast.ops.layernorm_rnn.layernorm_lstm
        -> torch.ops.genfast.layernorm_lstm_forward -> csrc/cpu/rnn_layernorm.cpp
                                                       (CUDA: csrc/cuda/rnn_layernorm_glue.cpp)
        -> csrc/rnn/layernorm_cells.h (the equations; genfast.reference.layernorm_lstm_cell)

Kernels and their autograd are C++ (csrc/cpu/rnn_layernorm.cpp; csrc/cuda/rnn_layernorm_glue.cpp and
rnn_layernorm.cu; csrc/rnn_layernorm_autograd.cpp). This module gives the ops fake kernels for
torch.compile; the workspace size comes from the C++ layout (csrc/rnn/layernorm_cells.h) through
genfast::layernorm_rnn_workspace_layout. CPU and CUDA tensors; any other device raises
NotImplementedError. On CUDA, float16 and bfloat16 run natively (float accumulation), as genfast.ops.lstm.
"""
from __future__ import annotations

import functools

import torch
from torch import Tensor

from genfast import _extension
from genfast.ops.rnn import _cpu_upcast_dtype, _float, _grad_input

_extension.load()
_ops = torch.ops.genfast


def _check_device(name: str, input: Tensor) -> None:
    if input.device.type not in ("cpu", "cuda"):
        raise NotImplementedError(
            f"genfast {name}: kernels exist for CPU and CUDA tensors only; got a {input.device.type} tensor")
    if input.is_cuda and not _extension.load().cuda_built():
        raise RuntimeError(
            f"genfast {name}: genfast was built without its CUDA kernels (the installed torch had no CUDA, or "
            "CUDA_HOME was unset), so it cannot run on a CUDA tensor; rebuild with a CUDA torch")


def layernorm_lstm(input: Tensor, hx: Tensor, cx: Tensor, w_ih: Tensor, w_hh: Tensor, b_ih: Tensor | None,
                   b_hh: Tensor | None, ln_ih_weight: Tensor, ln_hh_weight: Tensor, ln_cell_weight: Tensor,
                   ln_cell_bias: Tensor, batch_sizes: Tensor | None = None, reverse: bool = False, *,
                   zoneout: Tensor | None = None, cell_zoneout: Tensor | None = None,
                   recurrent_mask: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """One layer-normalised LSTM layer over ``input`` (T, N, I), or packed (S, I) with ``batch_sizes``.

    Returns (output, h_n, c_n). bfloat16 / float16 run in float32 on the CPU and natively (float
    accumulation) on CUDA, as genfast.ops.lstm.
    Regularisers, each optional, as genfast.ops.lstm takes them: ``zoneout`` and ``cell_zoneout``
    (S, H), the weight of h_{t-1} (c_{t-1}) in h_t (c_t) per row of the sequence; ``recurrent_mask``
    (N, H) multiplies h_{t-1} where it enters LN(W_hh h_{t-1}).
    """
    _check_device("layernorm_lstm", input)
    tensors = (input, hx, cx, w_ih, w_hh, b_ih, b_hh, ln_ih_weight, ln_hh_weight, ln_cell_weight, ln_cell_bias)
    masks = (zoneout, cell_zoneout, recurrent_mask)
    reduced = _cpu_upcast_dtype(input, tensors[1:] + masks)
    if reduced is not None:
        zoneout, cell_zoneout, recurrent_mask = map(_float, masks)
        output, hy, cy = layernorm_lstm(*map(_float, tensors), batch_sizes, reverse, zoneout=zoneout,
                                        cell_zoneout=cell_zoneout, recurrent_mask=recurrent_mask)
        return output.to(reduced), hy.to(reduced), cy.to(reduced)
    train = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)
    args = (input, hx, cx, w_ih, w_hh, b_ih, b_hh, ln_ih_weight, ln_hh_weight, ln_cell_weight, ln_cell_bias,
            batch_sizes, reverse, train)
    if zoneout is None and cell_zoneout is None and recurrent_mask is None:
        output, hy, cy, _ = _ops.layernorm_lstm_forward(*args)
    else:
        output, hy, cy, _ = _ops.layernorm_lstm_forward(*args, zoneout, cell_zoneout, recurrent_mask)
    return output, hy, cy


def layernorm_gru(input: Tensor, hx: Tensor, w_ih: Tensor, w_hh: Tensor, b_ih: Tensor | None, b_hh: Tensor | None,
                  ln_ih_weight: Tensor, ln_hh_weight: Tensor, batch_sizes: Tensor | None = None,
                  reverse: bool = False, *, zoneout: Tensor | None = None,
                  recurrent_mask: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """One layer-normalised GRU layer. Returns (output, h_n). Regularisers: see layernorm_lstm()."""
    _check_device("layernorm_gru", input)
    tensors = (input, hx, w_ih, w_hh, b_ih, b_hh, ln_ih_weight, ln_hh_weight)
    masks = (zoneout, recurrent_mask)
    reduced = _cpu_upcast_dtype(input, tensors[1:] + masks)
    if reduced is not None:
        zoneout, recurrent_mask = map(_float, masks)
        output, hy = layernorm_gru(*map(_float, tensors), batch_sizes, reverse, zoneout=zoneout,
                                   recurrent_mask=recurrent_mask)
        return output.to(reduced), hy.to(reduced)
    train = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)
    args = (input, hx, w_ih, w_hh, b_ih, b_hh, ln_ih_weight, ln_hh_weight, batch_sizes, reverse, train)
    if zoneout is None and recurrent_mask is None:
        output, hy, _ = _ops.layernorm_gru_forward(*args)
    else:
        output, hy, _ = _ops.layernorm_gru_forward(*args, zoneout, recurrent_mask)
    return output, hy


# ---------------------------------------------------------------- fake kernels
@functools.lru_cache(maxsize=None)
def _workspace_layout(cell: str) -> tuple[int, int]:
    """(H-wide values, scalars) the training workspace of ``cell`` holds per row of the sequence."""
    wide, scalars = _ops.layernorm_rnn_workspace_layout(cell)
    return wide, scalars


def _workspace(cell: str, input: Tensor, batch_sizes: Tensor | None, hidden, train: bool) -> Tensor:
    rows = input.shape[0] if batch_sizes is not None else input.shape[0] * input.shape[1]
    wide, scalars = _workspace_layout(cell)
    return input.new_empty((rows * (hidden * wide + scalars) if train else 0,))


@torch.library.register_fake("genfast::layernorm_lstm_forward")
def _layernorm_lstm_forward_fake(input, hx, cx, w_ih, w_hh, b_ih, b_hh, ln_ih_weight, ln_hh_weight, ln_cell_weight,
                                 ln_cell_bias, batch_sizes, reverse, train, zoneout=None, cell_zoneout=None,
                                 recurrent_mask=None):
    hidden = w_ih.shape[0] // 4
    output = input.new_empty((*input.shape[:-1], hidden))
    workspace = _workspace("layernorm_lstm", input, batch_sizes, hidden, train)
    return output, hx.new_empty(hx.shape), cx.new_empty(cx.shape), workspace


@torch.library.register_fake("genfast::layernorm_lstm_backward")
def _layernorm_lstm_backward_fake(grad_output, grad_hy, grad_cy, input, hx, cx, w_ih, w_hh, ln_ih_weight,
                                  ln_hh_weight, ln_cell_weight, ln_cell_bias, output, workspace, batch_sizes, reverse,
                                  zoneout=None, cell_zoneout=None, recurrent_mask=None, input_grad=True):
    return (_grad_input(input, input_grad), hx.new_empty(hx.shape), cx.new_empty(cx.shape), w_ih.new_empty(w_ih.shape),
            w_hh.new_empty(w_hh.shape), w_ih.new_empty((w_ih.shape[0],)), ln_ih_weight.new_empty(ln_ih_weight.shape),
            ln_hh_weight.new_empty(ln_hh_weight.shape), ln_cell_weight.new_empty(ln_cell_weight.shape),
            ln_cell_bias.new_empty(ln_cell_bias.shape))


@torch.library.register_fake("genfast::layernorm_gru_forward")
def _layernorm_gru_forward_fake(input, hx, w_ih, w_hh, b_ih, b_hh, ln_ih_weight, ln_hh_weight, batch_sizes, reverse,
                                train, zoneout=None, recurrent_mask=None):
    hidden = w_ih.shape[0] // 3
    output = input.new_empty((*input.shape[:-1], hidden))
    workspace = _workspace("layernorm_gru", input, batch_sizes, hidden, train)
    return output, hx.new_empty(hx.shape), workspace


@torch.library.register_fake("genfast::layernorm_gru_backward")
def _layernorm_gru_backward_fake(grad_output, grad_hy, input, hx, w_ih, w_hh, ln_ih_weight, ln_hh_weight, output,
                                 workspace, batch_sizes, reverse, zoneout=None, recurrent_mask=None,
                                 input_grad=True):
    bias = w_ih.new_empty((w_ih.shape[0],))
    return (_grad_input(input, input_grad), hx.new_empty(hx.shape), w_ih.new_empty(w_ih.shape),
            w_hh.new_empty(w_hh.shape), bias, bias.new_empty(bias.shape), ln_ih_weight.new_empty(ln_ih_weight.shape),
            ln_hh_weight.new_empty(ln_hh_weight.shape))
