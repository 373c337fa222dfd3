"""LSTM and GRU ops: one layer, one direction, a whole (padded or packed) sequence.

    genfast.nn.LSTM.forward -> genfast.ops.rnn.lstm -> torch.ops.genfast.lstm_forward
        -> csrc/cpu/rnn.cpp (rnn_forward<LstmCell>, forward_loop) -> csrc/rnn/cells.h (LstmCell)

The kernels live in C++ (csrc/cpu/, csrc/cuda/), and so does their autograd
(csrc/rnn_autograd.cpp: BPTT through the *_backward ops). This module gives them fake
kernels (shapes only, for torch.compile); the workspace size comes from the C++ definition
of each cell's layout (csrc/rnn/cells.h), asked once per cell.
"""
from __future__ import annotations

import functools

import torch
from torch import Tensor

from genfast import _extension

_ops = torch.ops.genfast

# The CPU kernels compute in float32 or float64. A bfloat16 or float16 layer on the CPU runs
# in float32 (its weights, input and states converted on the way in, its outputs rounded back
# on the way out, both differentiable), as a reduced-precision RNN accumulates anyway; the
# cell state and gates of every step stay in float32 in between. On CUDA the kernels take
# these dtypes natively.
_CPU_UPCAST = (torch.bfloat16, torch.float16)


def _cpu_upcast_dtype(input: Tensor, tensors) -> torch.dtype | None:
    """input's dtype if this call runs in float32 on the CPU: every tensor is a CPU tensor of that
    dtype. Anything else (a mismatch included) goes to the op as it is, whose checks name it."""
    dtype = input.dtype
    if input.device.type != "cpu" or dtype not in _CPU_UPCAST:
        return None
    if any(t is not None and (t.dtype != dtype or t.device.type != "cpu") for t in tensors):
        return None
    return dtype


def _float(t: Tensor | None) -> Tensor | None:
    return None if t is None else t.float()


def lstm(input: Tensor, hx: Tensor, cx: Tensor, w_ih: Tensor, w_hh: Tensor,
         b_ih: Tensor | None = None, b_hh: Tensor | None = None, w_hr: Tensor | None = None,
         batch_sizes: Tensor | None = None, reverse: bool = False, *, zoneout: Tensor | None = None,
         cell_zoneout: Tensor | None = None, recurrent_mask: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """One LSTM layer over ``input`` (T, N, I), or packed (S, I) with ``batch_sizes``.

    Returns (output, h_n, c_n). The op keeps what backward needs only when autograd
    will need it. Regularisers, each optional (docs/design.md, "Regularisers"): ``zoneout``
    and ``cell_zoneout`` (S, H), one row per row of the flattened or packed sequence, the weight
    of h_{t-1} (c_{t-1}) in h_t (c_t); ``recurrent_mask`` (N, H) multiplies h_{t-1} in W_hh h_{t-1}.
    """
    tensors = (input, hx, cx, w_ih, w_hh, b_ih, b_hh, w_hr)
    masks = (zoneout, cell_zoneout, recurrent_mask)
    reduced = _cpu_upcast_dtype(input, tensors[1:] + masks)
    if reduced is not None:
        zoneout, cell_zoneout, recurrent_mask = map(_float, masks)
        output, hy, cy = lstm(*map(_float, tensors), batch_sizes, reverse, zoneout=zoneout,
                              cell_zoneout=cell_zoneout, recurrent_mask=recurrent_mask)
        return output.to(reduced), hy.to(reduced), cy.to(reduced)
    train = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)
    if zoneout is None and cell_zoneout is None and recurrent_mask is None:
        output, hy, cy, _ = _ops.lstm_forward(input, hx, cx, w_ih, w_hh, b_ih, b_hh, w_hr, batch_sizes, reverse, train)
    else:
        output, hy, cy, _ = _ops.lstm_forward(input, hx, cx, w_ih, w_hh, b_ih, b_hh, w_hr, batch_sizes, reverse, train,
                                              zoneout, cell_zoneout, recurrent_mask)
    return output, hy, cy


def gru(input: Tensor, hx: Tensor, w_ih: Tensor, w_hh: Tensor, b_ih: Tensor | None = None,
        b_hh: Tensor | None = None, batch_sizes: Tensor | None = None,
        reverse: bool = False, *, zoneout: Tensor | None = None,
        recurrent_mask: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """One GRU layer (PyTorch's gate convention). Returns (output, h_n). Regularisers: see lstm()."""
    tensors = (input, hx, w_ih, w_hh, b_ih, b_hh)
    masks = (zoneout, recurrent_mask)
    reduced = _cpu_upcast_dtype(input, tensors[1:] + masks)
    if reduced is not None:
        zoneout, recurrent_mask = map(_float, masks)
        output, hy = gru(*map(_float, tensors), batch_sizes, reverse, zoneout=zoneout, recurrent_mask=recurrent_mask)
        return output.to(reduced), hy.to(reduced)
    train = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)
    if zoneout is None and recurrent_mask is None:
        output, hy, _ = _ops.gru_forward(input, hx, w_ih, w_hh, b_ih, b_hh, batch_sizes, reverse, train)
    else:
        output, hy, _ = _ops.gru_forward(input, hx, w_ih, w_hh, b_ih, b_hh, batch_sizes, reverse, train, zoneout,
                                         recurrent_mask)
    return output, hy


# ---------------------------------------------------------------- fake kernels
@functools.lru_cache(maxsize=None)
def _workspace_values_per_row(cell: str, projected: bool) -> int:
    """H-wide values the training workspace of ``cell`` holds per row of the sequence."""
    return _extension.load().rnn_workspace_values_per_row(cell, projected)


def _workspace(cell: str, input: Tensor, batch_sizes: Tensor | None, hidden, projected: bool, train: bool,
               cell_zoneout: bool = False) -> Tensor:
    """The (empty) workspace the forward op returns: rows * hidden * values per row, or 0 elements.
    Under cell zoneout it holds one value more per row, the carried c_t (csrc/rnn/regularizers_host.h)."""
    rows = input.shape[0] if batch_sizes is not None else input.shape[0] * input.shape[1]
    size = rows * hidden * (_workspace_values_per_row(cell, projected) + int(cell_zoneout)) if train else 0
    return input.new_empty((size,))


def _grad_input(input: Tensor, input_grad: bool) -> Tensor:
    """The backward ops' grad_input: empty when the caller asked for none (input_grad=False)."""
    return input.new_empty(input.shape if input_grad else (0,))


@torch.library.register_fake("genfast::lstm_forward")
def _lstm_forward_fake(input, hx, cx, w_ih, w_hh, b_ih, b_hh, w_hr, batch_sizes, reverse, train, zoneout=None,
                       cell_zoneout=None, recurrent_mask=None):
    hidden = w_ih.shape[0] // 4
    out_features = w_hh.shape[1]
    output = input.new_empty((*input.shape[:-1], out_features))
    workspace = _workspace("lstm", input, batch_sizes, hidden, w_hr is not None, train, cell_zoneout is not None)
    return output, hx.new_empty(hx.shape), cx.new_empty(cx.shape), workspace


@torch.library.register_fake("genfast::lstm_backward")
def _lstm_backward_fake(grad_output, grad_hy, grad_cy, input, hx, cx, w_ih, w_hh, w_hr, output, workspace,
                        batch_sizes, reverse, zoneout=None, cell_zoneout=None, recurrent_mask=None, input_grad=True):
    grad_w_hr = w_hr.new_empty(w_hr.shape) if w_hr is not None else input.new_empty((0,))
    return (_grad_input(input, input_grad), hx.new_empty(hx.shape), cx.new_empty(cx.shape),
            w_ih.new_empty(w_ih.shape), w_hh.new_empty(w_hh.shape), w_ih.new_empty((w_ih.shape[0],)), grad_w_hr)


@torch.library.register_fake("genfast::gru_forward")
def _gru_forward_fake(input, hx, w_ih, w_hh, b_ih, b_hh, batch_sizes, reverse, train, zoneout=None,
                      recurrent_mask=None):
    hidden = w_ih.shape[0] // 3
    output = input.new_empty((*input.shape[:-1], hidden))
    workspace = _workspace("gru", input, batch_sizes, hidden, False, train)
    return output, hx.new_empty(hx.shape), workspace


@torch.library.register_fake("genfast::gru_backward")
def _gru_backward_fake(grad_output, grad_hy, input, hx, w_ih, w_hh, output, workspace, batch_sizes, reverse,
                       zoneout=None, recurrent_mask=None, input_grad=True):
    bias = w_ih.new_empty((w_ih.shape[0],))
    return (_grad_input(input, input_grad), hx.new_empty(hx.shape), w_ih.new_empty(w_ih.shape),
            w_hh.new_empty(w_hh.shape), bias, bias.new_empty(bias.shape))


# ---------------------------------------------------------------- GRU, reset gate before the product
def gru_reset_before(input: Tensor, hx: Tensor, w_ih: Tensor, w_hh: Tensor, b_ih: Tensor | None = None,
                     b_hh: Tensor | None = None, batch_sizes: Tensor | None = None,
                     reverse: bool = False, *, zoneout: Tensor | None = None,
                     recurrent_mask: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """One layer of the GRU whose reset gate multiplies h before the recurrent product (Keras'
    reset_after=False): n = tanh(W_in x + b_in + W_hn (r * h) + b_hn), the rest and the parameters as
    torch.nn.GRU's. Returns (output, h_n). Regularisers: see lstm(); ``recurrent_mask`` m multiplies h
    in all three products: W_hr (m * h), W_hz (m * h), W_hn (r * (m * h)); z * h keeps the carried h."""
    tensors = (input, hx, w_ih, w_hh, b_ih, b_hh)
    masks = (zoneout, recurrent_mask)
    reduced = _cpu_upcast_dtype(input, tensors[1:] + masks)
    if reduced is not None:
        zoneout, recurrent_mask = map(_float, masks)
        output, hy = gru_reset_before(*map(_float, tensors), batch_sizes, reverse, zoneout=zoneout,
                                      recurrent_mask=recurrent_mask)
        return output.to(reduced), hy.to(reduced)
    train = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)
    if zoneout is None and recurrent_mask is None:
        output, hy, _ = _ops.gru_reset_before_forward(input, hx, w_ih, w_hh, b_ih, b_hh, batch_sizes, reverse, train)
    else:
        output, hy, _ = _ops.gru_reset_before_forward(input, hx, w_ih, w_hh, b_ih, b_hh, batch_sizes, reverse, train,
                                                      zoneout, recurrent_mask)
    return output, hy


@torch.library.register_fake("genfast::gru_reset_before_forward")
def _gru_reset_before_forward_fake(input, hx, w_ih, w_hh, b_ih, b_hh, batch_sizes, reverse, train, zoneout=None,
                                   recurrent_mask=None):
    hidden = w_ih.shape[0] // 3
    output = input.new_empty((*input.shape[:-1], hidden))
    workspace = _workspace("gru_reset_before", input, batch_sizes, hidden, False, train)
    return output, hx.new_empty(hx.shape), workspace


@torch.library.register_fake("genfast::gru_reset_before_backward")
def _gru_reset_before_backward_fake(grad_output, grad_hy, input, hx, w_ih, w_hh, output, workspace, batch_sizes,
                                    reverse, zoneout=None, recurrent_mask=None, input_grad=True):
    return (_grad_input(input, input_grad), hx.new_empty(hx.shape), w_ih.new_empty(w_ih.shape),
            w_hh.new_empty(w_hh.shape), w_ih.new_empty((w_ih.shape[0],)))
