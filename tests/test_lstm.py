"""genfast.nn.LSTM / LSTMCell and the genfast::lstm_* ops against torch.nn on the same weights."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

import genfast.nn as gnn
from genfast import reference
from tests.rnn_parity import (assert_reduced_precision_layer_and_cell, assert_same, assert_same_for_any_thread_count,
                               clone_module, packed_input, run_both)

DTYPES = [torch.float32, torch.float64]

# (num_layers, bidirectional, batch_first, proj_size, bias): each flag on in some case,
# layers 1-3, sizes that are not multiples of 8 or 16 below.
CONFIGS = [
    (1, False, False, 0, True),
    (2, True, False, 0, True),
    (3, False, True, 0, False),
    (2, True, True, 5, True),
    (1, False, False, 7, False),
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layers,bidirectional,batch_first,proj,bias", CONFIGS)
@pytest.mark.parametrize("with_hx", [False, True])
def test_lstm_matches_torch(dtype, layers, bidirectional, batch_first, proj, bias, with_hx):
    torch.manual_seed(0)
    T, N, I, H = 7, 3, 11, 19
    ref = torch.nn.LSTM(I, H, layers, bias=bias, batch_first=batch_first, bidirectional=bidirectional,
                        proj_size=proj, dtype=dtype)
    mine = clone_module(ref, gnn.LSTM)
    x = torch.randn((N, T, I) if batch_first else (T, N, I), dtype=dtype)
    hx = None
    if with_hx:
        D = 2 if bidirectional else 1
        hx = (torch.randn(layers * D, N, proj or H, dtype=dtype), torch.randn(layers * D, N, H, dtype=dtype))
    assert_same(run_both(ref, mine, lambda: x.clone().requires_grad_(True), hx), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("T,N,I,H", [(1, 1, 3, 5), (1, 4, 8, 16), (5, 1, 2, 33), (4, 13, 9, 40), (3, 70, 6, 17)])
def test_lstm_shapes(dtype, T, N, I, H):
    """Batch 1, sequence length 1, and sizes around the kernel's 16-unit panels and row blocks."""
    torch.manual_seed(1)
    ref = torch.nn.LSTM(I, H, dtype=dtype)
    mine = clone_module(ref, gnn.LSTM)
    x = torch.randn(T, N, I, dtype=dtype)
    assert_same(run_both(ref, mine, lambda: x.clone().requires_grad_(True)), dtype)


@pytest.mark.parametrize("case", ["one sequence", "two sequences, packed", "weight over the cache threshold"])
def test_lstm_input_projection_first(case):
    """The forward paths that compute X W_ih^T for all steps before the loop (lstm.cpp,
    project_input_first): one sequence (W_hh then read in place), two rows per step, and stacked
    weights over 16 MB; with proj_size and given states where they apply."""
    torch.manual_seed(3)
    dtype = torch.float64
    hx = None
    if case == "one sequence":
        ref = torch.nn.LSTM(7, 20, 2, bidirectional=True, proj_size=6, dtype=dtype)
        x = torch.randn(6, 1, 7, dtype=dtype)
        make = lambda: x.clone().requires_grad_(True)  # noqa: E731
        hx = (torch.randn(4, 1, 6, dtype=dtype), torch.randn(4, 1, 20, dtype=dtype))
    elif case == "two sequences, packed":
        ref = torch.nn.LSTM(7, 20, 2, bidirectional=True, proj_size=6, dtype=dtype)
        make = packed_input([5, 3], 7, dtype, enforce_sorted=False)
    else:  # (512 + 512) * 4 * 512 float64 values: 16.8 MB, batch 3
        ref = torch.nn.LSTM(512, 512, dtype=dtype)
        x = torch.randn(4, 3, 512, dtype=dtype)
        make = lambda: x.clone().requires_grad_(True)  # noqa: E731
    assert_same(run_both(ref, clone_module(ref, gnn.LSTM), make, hx), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("enforce_sorted", [True, False])
@pytest.mark.parametrize("bidirectional,proj", [(False, 0), (True, 0), (True, 4)])
def test_lstm_packed_sequence(dtype, enforce_sorted, bidirectional, proj):
    torch.manual_seed(2)
    lengths = [6, 6, 4, 1, 3] if not enforce_sorted else [6, 6, 4, 3, 1]
    ref = torch.nn.LSTM(5, 9, 2, bidirectional=bidirectional, proj_size=proj, dtype=dtype)
    mine = clone_module(ref, gnn.LSTM)
    make = packed_input(lengths, 5, dtype, enforce_sorted)
    D = 2 if bidirectional else 1
    hx = (torch.randn(2 * D, 5, proj or 9, dtype=dtype), torch.randn(2 * D, 5, 9, dtype=dtype))
    assert_same(run_both(ref, mine, make, hx), dtype)
    out, _ = mine(make())
    assert isinstance(out, torch.nn.utils.rnn.PackedSequence)


@pytest.mark.parametrize("case", ["padded", "packed", "projection"])
def test_lstm_same_result_for_any_thread_count(case):
    # Big enough per step that the time loop runs on a team of threads (rnn_common.h, for_each_step).
    torch.manual_seed(4)
    proj = 24 if case == "projection" else 0
    mine = gnn.LSTM(24, 72, bidirectional=True, proj_size=proj)
    if case == "packed":
        make = packed_input([7, 7, 5, 5, 5, 4, 2, 1] * 4, 24, torch.float32, enforce_sorted=False)
    else:
        x = torch.randn(7, 30, 24)
        make = lambda: x.clone().requires_grad_(True)  # noqa: E731
    assert_same_for_any_thread_count(mine, make)


def test_lstm_concurrent_calls_from_python_threads():
    # Each call runs its own team of threads (rnn_common.h); two at once must not disturb each other.
    import threading

    torch.manual_seed(5)
    mine = gnn.LSTM(24, 72)
    inputs = [torch.randn(7, 30, 24, requires_grad=True) for _ in range(4)]

    def run(x):
        out, (h, c) = mine(x)
        grad_x, = torch.autograd.grad((out * out).sum() + h.sum() + c.sum(), x)
        return out.detach(), grad_x

    expected = [run(x) for x in inputs]
    results = [None] * len(inputs)

    def worker(i):
        for _ in range(3):
            results[i] = run(inputs[i])

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(len(inputs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for (out, grad_x), (out_ref, grad_ref) in zip(results, expected):
        assert torch.equal(out, out_ref) and torch.equal(grad_x, grad_ref)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("with_hx", [False, True])
def test_lstm_unbatched(dtype, with_hx):
    torch.manual_seed(3)
    ref = torch.nn.LSTM(4, 6, 2, bidirectional=True, dtype=dtype)
    mine = clone_module(ref, gnn.LSTM)
    x = torch.randn(5, 4, dtype=dtype)
    hx = (torch.randn(4, 6, dtype=dtype), torch.randn(4, 6, dtype=dtype)) if with_hx else None
    results = run_both(ref, mine, lambda: x.clone().requires_grad_(True), hx)
    assert results[1][0].shape == (5, 12)
    assert_same(results, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("batched", [True, False])
def test_lstm_cell(dtype, batched):
    torch.manual_seed(4)
    ref = torch.nn.LSTMCell(7, 10, dtype=dtype)
    mine = gnn.LSTMCell.from_torch(ref)
    x = torch.randn(3, 7, dtype=dtype) if batched else torch.randn(7, dtype=dtype)
    shape = (3, 10) if batched else (10,)
    hx = (torch.randn(shape, dtype=dtype), torch.randn(shape, dtype=dtype))
    for use_hx in (None, hx):
        outs = []
        for m in (ref, mine):
            xi = x.clone().requires_grad_(True)
            h, c = m(xi, use_hx)
            (h.sum() * 2 + (c * c).sum()).backward()
            outs.append((h, c, xi.grad, m.weight_hh.grad.clone()))
            m.zero_grad()
        for a, b in zip(outs[1], outs[0]):
            torch.testing.assert_close(a, b, **({"atol": 1e-9, "rtol": 1e-7} if dtype == torch.float64 else {}))


def test_lstm_state_dict_round_trip_and_init():
    torch.manual_seed(5)
    mine = gnn.LSTM(8, 12, 2, proj_size=4, bidirectional=True)
    torch.manual_seed(5)
    ref = torch.nn.LSTM(8, 12, 2, proj_size=4, bidirectional=True)
    # Same initialisation from the same seed, same names and shapes both ways.
    for (n1, p1), (n2, p2) in zip(mine.named_parameters(), ref.named_parameters()):
        assert n1 == n2
        torch.testing.assert_close(p1, p2)
    ref2 = torch.nn.LSTM(8, 12, 2, proj_size=4, bidirectional=True)
    ref2.load_state_dict(mine.state_dict())
    mine.load_state_dict(ref.state_dict())


@pytest.mark.parametrize("bias", [True, False])
def test_lstm_follows_reassigned_weights_and_dtype_changes(bias):
    """The modules read RNNBase's _flat_weights (as torch.nn.LSTM does): a weight assigned anew, or the
    module converted with .double(), must be what the next forward uses."""
    torch.manual_seed(9)
    ref = torch.nn.LSTM(3, 5, num_layers=2, bidirectional=True, proj_size=2, bias=bias)
    mine = clone_module(ref, gnn.LSTM)
    new = torch.randn_like(ref.weight_hh_l1_reverse)
    ref.weight_hh_l1_reverse = torch.nn.Parameter(new.clone())
    mine.weight_hh_l1_reverse = torch.nn.Parameter(new.clone())
    ref.double()
    mine.double()
    x = torch.randn(4, 2, 3, dtype=torch.float64)
    assert_same(run_both(ref, mine, lambda: x.clone().requires_grad_(True)), torch.float64)


def test_replace_rnns_keeps_weights():
    torch.manual_seed(6)
    model = torch.nn.Sequential()
    model.add_module("emb", torch.nn.Embedding(20, 8))
    model.add_module("lstm", torch.nn.LSTM(8, 6, batch_first=True))
    inner = torch.nn.Module()
    inner.cell = torch.nn.LSTMCell(3, 4)
    inner.gru = torch.nn.GRU(3, 4)
    model.add_module("inner", inner)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    tokens = torch.randint(0, 20, (2, 5))
    expected, _ = model.lstm(model.emb(tokens))
    gnn.replace_rnns(model)
    assert type(model.lstm) is gnn.LSTM and type(model.inner.cell) is gnn.LSTMCell and type(model.inner.gru) is gnn.GRU
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, before[k])
    got, _ = model.lstm(model.emb(tokens))
    torch.testing.assert_close(got, expected, atol=2e-5, rtol=1e-4)


def test_dropout_between_layers():
    torch.manual_seed(7)
    m = gnn.LSTM(4, 8, 3, dropout=0.5)
    x = torch.randn(5, 2, 4)
    m.eval()
    a, _ = m(x)
    b, _ = m(x)
    torch.testing.assert_close(a, b)  # eval: deterministic
    m.train()
    c, _ = m(x)
    d, _ = m(x)
    assert not torch.equal(c, d)  # training: dropout masks differ between calls
    # With dropout 0 in training, the result equals eval mode.
    m0 = gnn.LSTM(4, 8, 3, dropout=0.0)
    m0.load_state_dict(m.state_dict())
    torch.testing.assert_close(m0.train()(x)[0], m0.eval()(x)[0])


# ---------------------------------------------------------------- op level
def _op_inputs(dtype, T=3, N=2, I=3, H=4, proj=0, bias=True, seed=0):
    gen = torch.Generator().manual_seed(seed)
    r = lambda *s: (torch.randn(*s, generator=gen, dtype=dtype) * 0.5).requires_grad_(True)
    Ho = proj or H
    return (r(T, N, I), r(N, Ho), r(N, H), r(4 * H, I), r(4 * H, Ho), r(4 * H) if bias else None,
            r(4 * H) if bias else None, r(Ho, H) if proj else None)


@pytest.mark.parametrize("proj,bias,reverse", [(0, True, False), (0, False, True), (3, True, True)])
def test_lstm_op_matches_reference(proj, bias, reverse):
    args = _op_inputs(torch.float64, T=5, N=3, I=4, H=6, proj=proj, bias=bias)
    out, hy, cy, _ = torch.ops.genfast.lstm_forward(*args, None, reverse, False)
    r_out, r_hy, r_cy = reference.lstm_layer(*args, reverse=reverse)
    torch.testing.assert_close(out, r_out)
    torch.testing.assert_close(hy, r_hy)
    torch.testing.assert_close(cy, r_cy)


@pytest.mark.parametrize("proj,bias,reverse,packed", [
    (0, True, False, False), (0, False, True, False), (2, True, False, False), (2, True, True, True),
    (0, True, False, True)])
def test_lstm_op_gradcheck(proj, bias, reverse, packed):
    args = _op_inputs(torch.float64, T=3, N=3, I=2, H=3, proj=proj, bias=bias, seed=1)
    batch_sizes = None
    if packed:
        batch_sizes = torch.tensor([3, 2, 1])
        x = args[0].detach()
        data = torch.cat([x[0, :3], x[1, :2], x[2, :1]]).requires_grad_(True)
        args = (data,) + args[1:]
    diff = [a for a in args if a is not None]

    def fn(*tensors):
        it = iter(tensors)
        full = [next(it) if a is not None else None for a in args]
        out, hy, cy = genfast_ops.lstm(*full, batch_sizes=batch_sizes, reverse=reverse)
        return out, hy, cy

    assert torch.autograd.gradcheck(fn, diff, eps=1e-6, atol=1e-7)


@pytest.mark.parametrize("proj,packed,train", [(0, False, True), (2, False, True), (0, True, True), (0, False, False)])
def test_lstm_op_opcheck(proj, packed, train):
    args = list(_op_inputs(torch.float32, T=3, N=3, I=2, H=5, proj=proj, seed=2))
    batch_sizes = None
    if packed:
        batch_sizes = torch.tensor([3, 2, 2])
        args[0] = torch.randn(7, 2, requires_grad=True)
    if not train:  # inference mode: no workspace is kept, so nothing may ask for gradients
        args = [a.detach() if a is not None else None for a in args]
    torch.library.opcheck(torch.ops.genfast.lstm_forward.default, (*args, batch_sizes, False, train))


def test_lstm_backward_after_an_inference_forward_is_a_clear_error():
    args = _op_inputs(torch.float32, T=2, N=2, I=3, H=4, seed=4)
    out, _, _, ws = torch.ops.genfast.lstm_forward(*args, None, False, False)  # train=False: no workspace
    assert ws.numel() == 0
    with pytest.raises(RuntimeError, match=r"lstm_forward\(\.\.\., train=True\)"):
        out.sum().backward()


def test_lstm_bias_gradients_do_not_share_storage():
    """b_ih and b_hh receive the same gradient; accumulating into one must leave the other alone."""
    lstm = gnn.LSTM(3, 4)
    for _ in range(2):  # the second backward accumulates in place into .grad
        lstm(torch.randn(2, 1, 3))[0].sum().backward()
    torch.testing.assert_close(lstm.bias_ih_l0.grad, lstm.bias_hh_l0.grad)
    assert lstm.bias_ih_l0.grad.data_ptr() != lstm.bias_hh_l0.grad.data_ptr()


def test_lstm_backward_opcheck():
    args = _op_inputs(torch.float32, T=3, N=2, I=2, H=4, proj=2, seed=3)
    x, hx, cx, w_ih, w_hh, b_ih, b_hh, w_hr = [a.detach() for a in args]
    out, hy, cy, ws = torch.ops.genfast.lstm_forward(x, hx, cx, w_ih, w_hh, b_ih, b_hh, w_hr, None, False, True)
    torch.library.opcheck(torch.ops.genfast.lstm_backward.default,
                          (torch.randn_like(out), torch.randn_like(hy), torch.randn_like(cy), x, hx, cx, w_ih, w_hh,
                           w_hr, out, ws, None, False))


def test_lstm_torch_compile_fullgraph():
    torch.manual_seed(8)

    class Model(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lstm = gnn.LSTM(6, 8, 2, batch_first=True)
            self.head = torch.nn.Linear(8, 1)

        def forward(self, x):
            out, (h, c) = self.lstm(x)
            return self.head(out[:, -1]) + h.sum() + c.sum()

    model = Model()
    x = torch.randn(3, 5, 6, requires_grad=True)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    expected = model(x)
    got = compiled(x)
    torch.testing.assert_close(got, expected)
    got.sum().backward()


# ---------------------------------------------------------------- bad input
def test_lstm_bad_input_errors():
    m = gnn.LSTM(4, 5)
    with pytest.raises(RuntimeError, match="input.size\\(-1\\) must be equal to input_size"):
        m(torch.randn(3, 2, 6))
    with pytest.raises(ValueError, match="2D or 3D"):
        m(torch.randn(3, 2, 4, 1))
    with pytest.raises((RuntimeError, ValueError), match="dtype|type"):
        m(torch.randn(3, 2, 4, dtype=torch.float64))
    with pytest.raises(RuntimeError, match="Expected hidden"):
        m(torch.randn(3, 2, 4), (torch.randn(1, 3, 5), torch.randn(1, 2, 5)))
    with pytest.raises(ValueError, match="empty batch"):
        m(torch.randn(3, 0, 4))
    with pytest.raises(ValueError, match="sequence length 0"):
        m(torch.randn(0, 2, 4))
    # The op itself names its argument.
    x = torch.randn(3, 2, 4)
    with pytest.raises(RuntimeError, match="hx: expected shape"):
        torch.ops.genfast.lstm_forward(x, torch.randn(3, 5), torch.randn(2, 5), m.weight_ih_l0, m.weight_hh_l0,
                                       None, None, None, None, False, False)
    with pytest.raises(RuntimeError, match="w_hh: dtype"):
        torch.ops.genfast.lstm_forward(x, torch.randn(2, 5), torch.randn(2, 5), m.weight_ih_l0,
                                       m.weight_hh_l0.double(), None, None, None, None, False, False)
    with pytest.raises(RuntimeError, match="float32 and float64"):
        torch.ops.genfast.lstm_forward(x.half(), torch.randn(2, 5).half(), torch.randn(2, 5).half(),
                                       m.weight_ih_l0.half(), m.weight_hh_l0.half(), None, None, None, None, False,
                                       False)
    with pytest.raises(RuntimeError, match="batch_sizes: must be non-increasing"):
        torch.ops.genfast.lstm_forward(torch.randn(4, 4), torch.randn(2, 5), torch.randn(2, 5), m.weight_ih_l0,
                                       m.weight_hh_l0, None, None, None, torch.tensor([1, 3]), False, False)


def test_lstm_non_contiguous_input_just_works():
    torch.manual_seed(9)
    ref = torch.nn.LSTM(4, 6)
    mine = clone_module(ref, gnn.LSTM)
    x = torch.randn(4, 5, 3, 2)[..., 0].transpose(0, 1)[:, :, :].contiguous()
    x = torch.randn(5, 8, 4)[:, ::2]  # (5, 4, 4), strided batch dim
    assert not x.is_contiguous()
    torch.testing.assert_close(mine(x)[0], ref(x)[0], atol=2e-5, rtol=1e-4)


def test_lstm_nan_propagates():
    m = gnn.LSTM(3, 4)
    x = torch.randn(4, 2, 3)
    x[1, 0, 0] = float("nan")
    out, (h, c) = m(x)
    assert torch.isnan(out[1:, 0]).all()  # sequence 0 is NaN from step 1 on
    assert not torch.isnan(out[:, 1]).any()  # sequence 1 is untouched
    assert not torch.isnan(out[0]).any()

@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("with_hx", [False, True])
def test_lstm_reduced_precision_runs_in_float32_on_cpu(dtype, with_hx):
    """bfloat16 / float16 on the CPU: computed in float32 and rounded once (see rnn_parity), so within
    2 units of roundoff of float64 on the same rounded weights: outputs, states, every gradient."""
    assert_reduced_precision_layer_and_cell(gnn.LSTM, gnn.LSTMCell, 2, dtype, with_hx)


_SIMD_LEVEL_CHECK = """
import torch, genfast._C as C, genfast.nn
from genfast import reference, ops
torch.manual_seed(0)
weights = [torch.randn(s, dtype=torch.float64) for s in [(132, 7), (132, 9), (132,), (132,), (9, 33)]]
for T, N in [(4, 20), (1, 1), (1, 3)]:
    args = [torch.randn(s, dtype=torch.float64) for s in [(T, N, 7), (N, 9), (N, 33)]] + weights
    exact = reference.lstm_layer(*args)
    for got, want in zip(ops.lstm(*args), exact):
        torch.testing.assert_close(got, want)
    # float32: within a few times the error of the fp32 reference, both against fp64
    args32 = [t.float() for t in args]
    for got, ref32, want in zip(ops.lstm(*args32), reference.lstm_layer(*args32), exact):
        ours, theirs = (got.double() - want).abs().max(), (ref32.double() - want).abs().max()
        assert ours <= 4 * theirs + 1e-6, (T, N, ours.item(), theirs.item())
for rows in (1, 2, 5):
    x, w = torch.randn(rows, 37, dtype=torch.float64), torch.randn(21, 37, dtype=torch.float64)
    torch.testing.assert_close(torch.ops.genfast.decode_linear(x, w, None), x @ w.T)
print(C.simd_level())
"""


def test_lstm_every_simd_level_agrees():
    """The baseline and AVX2 copies of the kernels give the reference's numbers too: a sequence (packed
    panels), decode steps of 1 and 3 rows (weights read in place by dot products), and decode_linear."""
    code = _SIMD_LEVEL_CHECK
    for level in ("baseline", "avx2"):
        env = dict(os.environ, GENFAST_SIMD=level)
        done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr
        assert done.stdout.strip() in (level, "baseline")


from genfast import ops as genfast_ops  # noqa: E402  (after the genfast.nn import above loaded _C)
