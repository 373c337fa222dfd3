"""LSTM and GRU ops: one layer, one direction, a whole (padded or packed) sequence.

    genfast.nn.LSTM.forward -> genfast.ops.rnn.lstm -> torch.ops.genfast.lstm_forward
                                                     -> csrc/cpu/lstm.cpp (forward_loop)

The kernels live in C++ (csrc/cpu/, csrc/cuda/); this module gives them fake kernels
(shapes only, for torch.compile) and autograd (BPTT through the *_backward ops).
"""
from __future__ import annotations

import torch
from torch import Tensor

_ops = torch.ops.genfast


def lstm(input: Tensor, hx: Tensor, cx: Tensor, w_ih: Tensor, w_hh: Tensor,
         b_ih: Tensor | None = None, b_hh: Tensor | None = None, w_hr: Tensor | None = None,
         batch_sizes: Tensor | None = None, reverse: bool = False) -> tuple[Tensor, Tensor, Tensor]:
    """One LSTM layer over ``input`` (T, N, I), or packed (S, I) with ``batch_sizes``.

    Returns (output, h_n, c_n). The op keeps what backward needs only when autograd
    will need it.
    """
    train = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (input, hx, cx, w_ih, w_hh, b_ih, b_hh, w_hr))
    output, hy, cy, _ = _ops.lstm_forward(input, hx, cx, w_ih, w_hh, b_ih, b_hh, w_hr, batch_sizes, reverse, train)
    return output, hy, cy


def gru(input: Tensor, hx: Tensor, w_ih: Tensor, w_hh: Tensor, b_ih: Tensor | None = None,
        b_hh: Tensor | None = None, batch_sizes: Tensor | None = None,
        reverse: bool = False) -> tuple[Tensor, Tensor]:
    """One GRU layer (PyTorch's gate convention). Returns (output, h_n)."""
    train = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (input, hx, w_ih, w_hh, b_ih, b_hh))
    output, hy, _ = _ops.gru_forward(input, hx, w_ih, w_hh, b_ih, b_hh, batch_sizes, reverse, train)
    return output, hy


# ---------------------------------------------------------------- fake kernels
def _workspace_rows(input: Tensor, batch_sizes: Tensor | None):
    return input.shape[0] if batch_sizes is not None else input.shape[0] * input.shape[1]


@torch.library.register_fake("genfast::lstm_forward")
def _lstm_forward_fake(input, hx, cx, w_ih, w_hh, b_ih, b_hh, w_hr, batch_sizes, reverse, train):
    hidden = w_ih.shape[0] // 4
    out_features = w_hh.shape[1]
    output = input.new_empty((*input.shape[:-1], out_features))
    per_row = (5 + (1 if w_hr is not None else 0)) * hidden
    workspace = input.new_empty((_workspace_rows(input, batch_sizes) * per_row if train else 0,))
    return output, hx.new_empty(hx.shape), cx.new_empty(cx.shape), workspace


@torch.library.register_fake("genfast::lstm_backward")
def _lstm_backward_fake(grad_output, grad_hy, grad_cy, input, hx, cx, w_ih, w_hh, w_hr, output, workspace,
                        batch_sizes, reverse):
    grad_w_hr = w_hr.new_empty(w_hr.shape) if w_hr is not None else input.new_empty((0,))
    return (input.new_empty(input.shape), hx.new_empty(hx.shape), cx.new_empty(cx.shape),
            w_ih.new_empty(w_ih.shape), w_hh.new_empty(w_hh.shape), w_ih.new_empty((w_ih.shape[0],)), grad_w_hr)


@torch.library.register_fake("genfast::gru_forward")
def _gru_forward_fake(input, hx, w_ih, w_hh, b_ih, b_hh, batch_sizes, reverse, train):
    hidden = w_ih.shape[0] // 3
    output = input.new_empty((*input.shape[:-1], hidden))
    workspace = input.new_empty((_workspace_rows(input, batch_sizes) * 4 * hidden if train else 0,))
    return output, hx.new_empty(hx.shape), workspace


@torch.library.register_fake("genfast::gru_backward")
def _gru_backward_fake(grad_output, grad_hy, input, hx, w_ih, w_hh, output, workspace, batch_sizes, reverse):
    bias = w_ih.new_empty((w_ih.shape[0],))
    return (input.new_empty(input.shape), hx.new_empty(hx.shape), w_ih.new_empty(w_ih.shape),
            w_hh.new_empty(w_hh.shape), bias, bias.new_empty(bias.shape))


# ---------------------------------------------------------------- autograd
def _zeros_if_none(grad: Tensor | None, like: Tensor) -> Tensor:
    return torch.zeros_like(like) if grad is None else grad


def _check_workspace(workspace: Tensor, op: str) -> None:
    if workspace.numel() == 0:
        raise RuntimeError(
            f"genfast::{op}: backward needs the workspace that {op}(..., train=True) fills; this forward ran "
            "with train=False (under no_grad, or with no input requiring grad)")


def _lstm_setup_context(ctx, inputs, output):
    input, hx, cx, w_ih, w_hh, b_ih, b_hh, w_hr, batch_sizes, reverse, train = inputs
    out, _, _, workspace = output
    # Outputs without a gradient arrive as None rather than as zeros: the workspace is as
    # large as the saved gates, and filling it with zeros every backward would be waste.
    ctx.set_materialize_grads(False)
    ctx.has_bias = b_ih is not None
    ctx.reverse = reverse
    ctx.save_for_backward(input, hx, cx, w_ih, w_hh, w_hr, out, workspace, batch_sizes)


def _lstm_backward(ctx, grad_output, grad_hy, grad_cy, _grad_workspace):
    input, hx, cx, w_ih, w_hh, w_hr, out, workspace, batch_sizes = ctx.saved_tensors
    _check_workspace(workspace, "lstm_forward")
    grads = _ops.lstm_backward(
        _zeros_if_none(grad_output, out), _zeros_if_none(grad_hy, hx), _zeros_if_none(grad_cy, cx),
        input, hx, cx, w_ih, w_hh, w_hr, out, workspace, batch_sizes, ctx.reverse)
    grad_input, grad_hx, grad_cx, grad_w_ih, grad_w_hh, grad_bias, grad_w_hr = grads
    grad_b = grad_bias if ctx.has_bias else None
    return (grad_input, grad_hx, grad_cx, grad_w_ih, grad_w_hh, grad_b, grad_b,
            grad_w_hr if w_hr is not None else None, None, None, None)


def _gru_setup_context(ctx, inputs, output):
    input, hx, w_ih, w_hh, b_ih, b_hh, batch_sizes, reverse, train = inputs
    out, _, workspace = output
    ctx.set_materialize_grads(False)  # see _lstm_setup_context
    ctx.has_bias = b_ih is not None
    ctx.reverse = reverse
    ctx.save_for_backward(input, hx, w_ih, w_hh, out, workspace, batch_sizes)


def _gru_backward(ctx, grad_output, grad_hy, _grad_workspace):
    input, hx, w_ih, w_hh, out, workspace, batch_sizes = ctx.saved_tensors
    _check_workspace(workspace, "gru_forward")
    grad_input, grad_hx, grad_w_ih, grad_w_hh, grad_b_ih, grad_b_hh = _ops.gru_backward(
        _zeros_if_none(grad_output, out), _zeros_if_none(grad_hy, hx), input, hx, w_ih, w_hh, out, workspace,
        batch_sizes, ctx.reverse)
    if not ctx.has_bias:
        grad_b_ih = grad_b_hh = None
    return grad_input, grad_hx, grad_w_ih, grad_w_hh, grad_b_ih, grad_b_hh, None, None, None


torch.library.register_autograd("genfast::lstm_forward", _lstm_backward, setup_context=_lstm_setup_context)
torch.library.register_autograd("genfast::gru_forward", _gru_backward, setup_context=_gru_setup_context)
