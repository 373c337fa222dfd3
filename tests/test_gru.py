"""genfast.nn.GRU / GRUCell and the genfast::gru_* ops against torch.nn on the same weights."""
from __future__ import annotations

import pytest
import torch

import genfast.nn as gnn
from genfast import ops, reference
from tests.rnn_parity import (assert_reduced_precision_layer_and_cell, assert_same, assert_same_for_any_thread_count,
                               clone_module, packed_input, run_both)

DTYPES = [torch.float32, torch.float64]

CONFIGS = [  # (num_layers, bidirectional, batch_first, bias)
    (1, False, False, True),
    (2, True, False, True),
    (3, False, True, False),
    (2, True, True, False),
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layers,bidirectional,batch_first,bias", CONFIGS)
@pytest.mark.parametrize("with_hx", [False, True])
def test_gru_matches_torch(dtype, layers, bidirectional, batch_first, bias, with_hx):
    torch.manual_seed(0)
    T, N, I, H = 7, 3, 11, 19
    ref = torch.nn.GRU(I, H, layers, bias=bias, batch_first=batch_first, bidirectional=bidirectional, dtype=dtype)
    mine = clone_module(ref, gnn.GRU)
    x = torch.randn((N, T, I) if batch_first else (T, N, I), dtype=dtype)
    hx = torch.randn(layers * (2 if bidirectional else 1), N, H, dtype=dtype) if with_hx else None
    assert_same(run_both(ref, mine, lambda: x.clone().requires_grad_(True), hx), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("T,N,I,H", [(1, 1, 3, 5), (1, 4, 8, 16), (5, 1, 2, 33), (4, 13, 9, 40), (3, 70, 6, 17)])
def test_gru_shapes(dtype, T, N, I, H):
    torch.manual_seed(1)
    ref = torch.nn.GRU(I, H, dtype=dtype)
    mine = clone_module(ref, gnn.GRU)
    x = torch.randn(T, N, I, dtype=dtype)
    assert_same(run_both(ref, mine, lambda: x.clone().requires_grad_(True)), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("enforce_sorted", [True, False])
@pytest.mark.parametrize("bidirectional", [False, True])
def test_gru_packed_sequence(dtype, enforce_sorted, bidirectional):
    torch.manual_seed(2)
    lengths = [6, 6, 4, 1, 3] if not enforce_sorted else [6, 6, 4, 3, 1]
    ref = torch.nn.GRU(5, 9, 2, bidirectional=bidirectional, dtype=dtype)
    mine = clone_module(ref, gnn.GRU)
    hx = torch.randn(2 * (2 if bidirectional else 1), 5, 9, dtype=dtype)
    assert_same(run_both(ref, mine, packed_input(lengths, 5, dtype, enforce_sorted), hx), dtype)


@pytest.mark.parametrize("packed", [False, True])
def test_gru_same_result_for_any_thread_count(packed):
    # Big enough per step that the time loop runs on a team of threads (rnn_common.h, for_each_step).
    torch.manual_seed(4)
    mine = gnn.GRU(24, 72, bidirectional=True)
    if packed:
        make = packed_input([7, 7, 5, 5, 5, 4, 2, 1] * 4, 24, torch.float32, enforce_sorted=False)
    else:
        x = torch.randn(7, 30, 24)
        make = lambda: x.clone().requires_grad_(True)  # noqa: E731
    assert_same_for_any_thread_count(mine, make)


@pytest.mark.parametrize("dtype", DTYPES)
def test_gru_unbatched(dtype):
    torch.manual_seed(3)
    ref = torch.nn.GRU(4, 6, 2, bidirectional=True, dtype=dtype)
    mine = clone_module(ref, gnn.GRU)
    x = torch.randn(5, 4, dtype=dtype)
    for hx in (None, torch.randn(4, 6, dtype=dtype)):
        assert_same(run_both(ref, mine, lambda: x.clone().requires_grad_(True), hx), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("batched", [True, False])
def test_gru_cell(dtype, batched):
    torch.manual_seed(4)
    ref = torch.nn.GRUCell(7, 10, dtype=dtype)
    mine = gnn.GRUCell.from_torch(ref)
    x = torch.randn(3, 7, dtype=dtype) if batched else torch.randn(7, dtype=dtype)
    hx = torch.randn((3, 10) if batched else (10,), dtype=dtype)
    for use_hx in (None, hx):
        outs = []
        for m in (ref, mine):
            xi = x.clone().requires_grad_(True)
            h = m(xi, use_hx)
            (h * torch.arange(10, dtype=dtype)).sum().backward()
            outs.append((h, xi.grad, m.weight_hh.grad.clone(), m.bias_hh.grad.clone()))
            m.zero_grad()
        for a, b in zip(outs[1], outs[0]):
            torch.testing.assert_close(a, b, **({"atol": 1e-9, "rtol": 1e-7} if dtype == torch.float64 else {}))


def _op_inputs(dtype, T=3, N=2, I=3, H=4, bias=True, seed=0):
    gen = torch.Generator().manual_seed(seed)
    r = lambda *s: (torch.randn(*s, generator=gen, dtype=dtype) * 0.5).requires_grad_(True)
    return (r(T, N, I), r(N, H), r(3 * H, I), r(3 * H, H), r(3 * H) if bias else None, r(3 * H) if bias else None)


@pytest.mark.parametrize("bias,reverse", [(True, False), (False, True)])
def test_gru_op_matches_reference(bias, reverse):
    args = _op_inputs(torch.float64, T=5, N=3, I=4, H=6, bias=bias)
    out, hy, _ = torch.ops.genfast.gru_forward(*args, None, reverse, False)
    r_out, r_hy = reference.gru_layer(*args, reverse=reverse)
    torch.testing.assert_close(out, r_out)
    torch.testing.assert_close(hy, r_hy)


@pytest.mark.parametrize("bias,reverse,packed", [(True, False, False), (False, True, False), (True, True, True)])
def test_gru_op_gradcheck(bias, reverse, packed):
    args = _op_inputs(torch.float64, T=3, N=3, I=2, H=3, bias=bias, seed=1)
    batch_sizes = None
    if packed:
        batch_sizes = torch.tensor([3, 2, 1])
        x = args[0].detach()
        args = (torch.cat([x[0, :3], x[1, :2], x[2, :1]]).requires_grad_(True),) + args[1:]
    diff = [a for a in args if a is not None]

    def fn(*tensors):
        it = iter(tensors)
        full = [next(it) if a is not None else None for a in args]
        return ops.gru(*full, batch_sizes=batch_sizes, reverse=reverse)

    assert torch.autograd.gradcheck(fn, diff, eps=1e-6, atol=1e-7)


@pytest.mark.parametrize("packed,train", [(False, True), (True, True), (False, False)])
def test_gru_op_opcheck(packed, train):
    args = list(_op_inputs(torch.float32, T=3, N=3, I=2, H=5, seed=2))
    batch_sizes = None
    if packed:
        batch_sizes = torch.tensor([3, 2, 2])
        args[0] = torch.randn(7, 2, requires_grad=True)
    if not train:  # inference mode: no workspace is kept, so nothing may ask for gradients
        args = [a.detach() if a is not None else None for a in args]
    torch.library.opcheck(torch.ops.genfast.gru_forward.default, (*args, batch_sizes, False, train))


def test_gru_backward_after_an_inference_forward_is_a_clear_error():
    args = _op_inputs(torch.float32, seed=4)
    out, _, ws = torch.ops.genfast.gru_forward(*args, None, False, False)  # train=False: no workspace
    assert ws.numel() == 0
    with pytest.raises(RuntimeError, match=r"gru_forward\(\.\.\., train=True\)"):
        out.sum().backward()


def test_gru_backward_opcheck():
    x, hx, w_ih, w_hh, b_ih, b_hh = [a.detach() for a in _op_inputs(torch.float32, seed=3)]
    out, hy, ws = torch.ops.genfast.gru_forward(x, hx, w_ih, w_hh, b_ih, b_hh, None, True, True)
    torch.library.opcheck(torch.ops.genfast.gru_backward.default,
                          (torch.randn_like(out), torch.randn_like(hy), x, hx, w_ih, w_hh, out, ws, None, True))


def test_gru_torch_compile_fullgraph():
    torch.manual_seed(8)
    gru = gnn.GRU(6, 8, 2, bidirectional=True)
    x = torch.randn(5, 3, 6, requires_grad=True)

    def f(inp):
        out, h = gru(inp)
        return out.sum() + h.pow(2).sum()

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(x), f(x))


def test_gru_bad_input_errors():
    m = gnn.GRU(4, 5)
    with pytest.raises(RuntimeError, match="input.size\\(-1\\) must be equal to input_size"):
        m(torch.randn(3, 2, 6))
    with pytest.raises(RuntimeError, match="Expected hidden size"):
        m(torch.randn(3, 2, 4), torch.randn(1, 3, 5))
    with pytest.raises(ValueError, match="empty batch"):
        m(torch.randn(3, 0, 4))
    with pytest.raises(RuntimeError, match="w_hh: expected shape"):
        torch.ops.genfast.gru_forward(torch.randn(3, 2, 4), torch.randn(2, 5), m.weight_ih_l0, m.weight_hh_l0[:, :4],
                                      None, None, None, False, False)


def test_gru_nan_propagates():
    m = gnn.GRU(3, 4)
    x = torch.randn(4, 2, 3)
    x[2, 1, 1] = float("nan")
    out, h = m(x)
    assert torch.isnan(out[2:, 1]).all() and not torch.isnan(out[:, 0]).any() and not torch.isnan(out[:2]).any()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("with_hx", [False, True])
def test_gru_reduced_precision_runs_in_float32_on_cpu(dtype, with_hx):
    """bfloat16 / float16 on the CPU: computed in float32 and rounded once (see rnn_parity), so within
    2 units of roundoff of float64 on the same rounded weights: outputs, states, every gradient."""
    assert_reduced_precision_layer_and_cell(gnn.GRU, gnn.GRUCell, 1, dtype, with_hx)
