"""The CUDA kernels of genfast::layernorm_{lstm,gru}_{forward,backward} (issue 19: csrc/cuda/rnn_layernorm.cu,
csrc/cuda/rnn_layernorm_glue.cpp) against the CPU kernel and genfast.reference on the same weights, inputs
and masks: outputs, final states and every gradient (input, initial states, weights, biases, the LN gains
and biases, moved away from their initial values). Padded and packed, both directions, two layers,
bidirectional; zoneout, cell zoneout and recurrent dropout with the same masks on both sides; float64,
float32, and float16 / bfloat16 against the reference's own error in that dtype. Plus fp64 gradcheck and
opcheck on the device, and the errors. Every test is skipped without a CUDA device; with one, genfast._C
must have its CUDA kernels.

Tolerances (each justified, none tuned):
- float64: the CUDA op against the CPU op in float64 computes the same equations in other summation orders
  (block reductions, cuBLAS): FLOAT64_TOLERANCE of tests/test_rnn_layernorm.py (atol 1e-9, rtol 1e-7).
- float32: against float64 on the same (float32-rounded) values, each tensor's largest error below
  FLOAT32_BOUND (1e-4) times its largest magnitude, the bound and reasoning of the CPU's float32 tests: the
  CUDA kernels accumulate the LN moments and the gates in float32 as the CPU's do; TF32 is off here.
- float16 / bfloat16: these run natively on CUDA, storing every intermediate (the input side, the
  normalised product, the gates, the workspace) in the dtype, as the plain CUDA cells do. genfast's error
  against float64 must be at most twice the error of genfast.reference run in the same dtype on the device
  (torch's kernels, every op rounded to the dtype), plus a floor of two roundings of the largest value: the
  rule tests/test_rnn.py applies against cuDNN.
"""
from __future__ import annotations

import copy

import pytest
import torch
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

import genfast.nn.layernorm_rnn as gnn_ln
from genfast import _extension

from .mask_recorder import MaskRecorder
from .test_rnn_layernorm import CELLS, _op_args, _randomise, assert_close_to, reference_module
from .test_rnn_layernorm_regularizers import KINDS, make_masks, module_reference, op_layer


def mask_recorder(monkeypatch):
    return MaskRecorder(monkeypatch, gnn_ln._ln_ops, ("layernorm_lstm", "layernorm_gru"))


pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]
cells = pytest.mark.parametrize("cell", CELLS, ids=lambda c: c.name)
DEVICE = "cuda"


@pytest.fixture(autouse=True)
def _genfast_cuda_in_true_float32():
    """genfast's CUDA kernels must be built in; cuBLAS products in true float32 (no TF32)."""
    assert _extension.load().cuda_built(), "a CUDA device is present but genfast._C was built without CUDA kernels"
    saved = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = saved


def _loss_weights(tensors, seed):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(t.shape, generator=gen, dtype=torch.float64) for t in tensors]


# ---------------------------------------------------------------- op level
def op_results(cell, x, states, weights, batch_sizes, reverse, masks, device, dtype):
    """The op on `device` in `dtype` from the given values: ([output, *finals], [grad of x, states and
    every weight given]) on the CPU, of a fixed random loss summed in float64."""
    to = lambda t: t.detach().to(device, dtype).requires_grad_(True)  # noqa: E731
    xl, sl = to(x), [to(s) for s in states]
    wl = [None if w is None else to(w) for w in weights]
    out, finals = op_layer(cell, xl, sl, wl, batch_sizes, reverse, {k: m.to(device, dtype) for k, m in masks.items()})
    results = [out, *finals]
    loss = sum((t.double() * w.to(device)).sum() for t, w in zip(results, _loss_weights(results, 3)))
    loss.backward()
    inputs = [xl, *sl, *[w for w in wl if w is not None]]
    return [t.detach().cpu() for t in results], [t.grad.cpu() for t in inputs]


def _op_names(cell, bias=True):
    return ["input", *[f"state{i}" for i in range(cell.states)], "w_ih", "w_hh",
            *(["b_ih", "b_hh"] if bias else []), *cell.ln_names]


# (steps, batch, input_size, hidden): H = 20 fits one block of 32 threads; H = 300 needs two passes of a
# 256-thread block over the units, the last one partial, and a row of 3H / 4H values for the moments.
SIZES = {"small": (6, 5, 6, 20), "multipass": (4, 3, 33, 300)}
DIRECTIONS = [(False, False), (False, True), (True, False), (True, True)]


@cells
@pytest.mark.parametrize("packed, reverse", DIRECTIONS,
                         ids=["padded", "padded-reverse", "packed", "packed-reverse"])
@pytest.mark.parametrize("regularized", [False, True], ids=["plain", "masks"])
@pytest.mark.parametrize("sizes", list(SIZES.values()), ids=list(SIZES))
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
def test_op_matches_cpu_kernel(cell, packed, reverse, regularized, sizes, dtype):
    """The CUDA op in `dtype` against the CPU op in float64 on the same values and masks (every mask the
    cell takes: zoneout weights spread over [0, 1] with exact 0s and 1s in float64, 0/1 draws in float32)."""
    steps, batch, input_size, hidden = sizes
    x, states, weights, batch_sizes = _op_args(cell, steps, batch, input_size, hidden, packed, reverse, True,
                                               torch.float64, seed=hidden)
    rows = x.shape[0] * (1 if packed else batch)
    masks = (make_masks(cell, KINDS[cell.name], rows, batch, hidden, torch.float64,
                        fractional=dtype == torch.float64) if regularized else {})
    # Both sides start from the same values, rounded to dtype.
    rounded = lambda t: None if t is None else t.detach().to(dtype).double()  # noqa: E731
    x, states, weights = rounded(x), [rounded(s) for s in states], [rounded(w) for w in weights]
    masks = {k: rounded(m) for k, m in masks.items()}
    want = op_results(cell, x, states, weights, batch_sizes, reverse, masks, "cpu", torch.float64)
    got = op_results(cell, x, states, weights, batch_sizes, reverse, masks, DEVICE, dtype)
    for i, (a, b) in enumerate(zip(got[0], want[0], strict=True)):
        assert_close_to(a, b, dtype, "output" if i == 0 else f"final state {i - 1}")
    for name, a, b in zip(_op_names(cell), got[1], want[1], strict=True):
        assert_close_to(a, b, dtype, f"grad {name}")


@cells
@pytest.mark.parametrize("packed, reverse, regularized", [(False, False, False), (True, True, False),
                                                          (False, True, True), (True, False, True)],
                         ids=["padded", "packed-reverse", "padded-reverse-masks", "packed-masks"])
def test_gradcheck_on_cuda(cell, packed, reverse, regularized):
    """fp64 gradcheck of the CUDA backward against finite differences of the CUDA forward."""
    steps, batch, hidden = 3, 3, 5
    x, states, weights, batch_sizes = _op_args(cell, steps, batch, 2, hidden, packed, reverse, True, torch.float64,
                                               seed=11)
    rows = x.shape[0] * (1 if packed else batch)
    masks = make_masks(cell, KINDS[cell.name], rows, batch, hidden, torch.float64) if regularized else {}
    masks = {k: m.to(DEVICE) for k, m in masks.items()}
    inputs = [t.detach().to(DEVICE).requires_grad_(True) for t in [x, *states, *weights]]

    def fn(x, *rest):
        states, ws = list(rest[:cell.states]), list(rest[cell.states:])
        out, finals = op_layer(cell, x, states, ws, batch_sizes, reverse, masks)
        return (out, *finals)

    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-6)


@cells
@pytest.mark.parametrize("train", [True, False], ids=["train", "inference"])
def test_opcheck_on_cuda(cell, train):
    """The CUDA kernels against the shared schemas and fake kernels (packed, reverse, every mask)."""
    x, states, weights, batch_sizes = _op_args(cell, 3, 3, 2, 5, True, True, True, torch.float32, seed=1)
    masks = make_masks(cell, KINDS[cell.name], x.shape[0], 3, 5, torch.float32)
    cuda = lambda t: t.detach().to(DEVICE).requires_grad_(train)  # noqa: E731
    x, states, weights = cuda(x), [cuda(s) for s in states], [cuda(w) for w in weights]
    mask_args = tuple(masks[k].to(DEVICE) for k in KINDS[cell.name])
    args = (x, *states, *weights, batch_sizes, True, train, *mask_args)
    torch.library.opcheck(cell.forward_op.default, args)
    if not train:
        return
    detached = [a.detach() if isinstance(a, torch.Tensor) else a for a in args]
    result = cell.forward_op(*detached)
    output, finals, workspace = result[0], result[1:-1], result[-1]
    plain = [t.detach() for t in (x, *states)]
    w_ih, w_hh, ln = weights[0].detach(), weights[1].detach(), [w.detach() for w in weights[4:]]
    grads = [torch.randn_like(output), *[torch.randn_like(f) for f in finals]]
    torch.library.opcheck(cell.backward_op.default,
                          (*grads, *plain, w_ih, w_hh, *ln, output, workspace, batch_sizes, True, *mask_args))


# ---------------------------------------------------------------- module level
def module_results(cell, module, x, states, lengths, packed, reference=False):
    """Forward + backward of a fixed random loss (summed in float64) through the module, or with
    ``reference`` through genfast.reference on its parameters, on the module's device: {name: tensor on
    the CPU} for the padded output, the final states and every gradient."""
    device = next(module.parameters()).device
    module.zero_grad(set_to_none=True)
    xl = x.detach().to(device).requires_grad_(True)
    sl = [s.detach().to(device).requires_grad_(True) for s in states]
    if reference:
        out, finals = reference_module(cell, module, xl, sl, lengths)
    else:
        inp = pack_padded_sequence(xl, lengths, enforce_sorted=False) if packed else xl
        out, final = module(inp, tuple(sl) if cell.states == 2 else sl[0])
        if packed:
            out = pad_packed_sequence(out, total_length=x.shape[0])[0]
        finals = list(final) if cell.states == 2 else [final]
    results = [out, *finals]
    loss = sum((t.double() * w.to(device)).sum() for t, w in zip(results, _loss_weights(results, 99)))
    loss.backward()
    named = {"output": out, **{f"final state {i}": f for i, f in enumerate(finals)}, "grad input": xl.grad,
             **{f"grad state {i}": s.grad for i, s in enumerate(sl)},
             **{f"grad {n}": p.grad for n, p in module.named_parameters()}}
    return {k: v.detach().cpu() for k, v in named.items()}


# (steps, batch, input_size, hidden, layers, bidirectional, packed, bias)
MODULE_SHAPES = [
    (5, 4, 6, 20, 2, True, True, True),
    (7, 3, 5, 33, 1, False, False, False),
    (4, 5, 3, 300, 2, True, False, True),
]


def _module_inputs(cell, shape, dtype, seed=0):
    steps, batch, input_size, hidden, layers, bidirectional, packed, bias = shape
    torch.manual_seed(seed)
    module = _randomise(cell.module(input_size, hidden, layers, bias=bias, bidirectional=bidirectional),
                        seed=hidden).to(dtype)
    gen = torch.Generator().manual_seed(steps * 31 + batch)
    x = torch.randn(steps, batch, input_size, generator=gen, dtype=torch.float64).to(dtype)
    states = [0.5 * torch.randn(layers * (2 if bidirectional else 1), batch, hidden, generator=gen,
                                dtype=torch.float64).to(dtype) for _ in range(cell.states)]
    # Unsorted lengths, one of full length: the module sorts and unsorts.
    lengths = (torch.randint(1, steps + 1, (batch,), generator=gen).tolist() if packed else [steps] * batch)
    lengths[batch // 2] = steps
    return module, x, states, lengths


@cells
@pytest.mark.parametrize("shape", MODULE_SHAPES, ids=lambda s: "T{}N{}I{}H{}L{}{}{}{}".format(
    *s[:5], "bi" if s[5] else "", "packed" if s[6] else "", "" if s[7] else "nobias"))
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
def test_module_matches_reference(cell, shape, dtype):
    """The module on CUDA against genfast.reference in float64 on the CPU, on its own parameters."""
    module, x, states, lengths = _module_inputs(cell, shape, dtype)
    packed = shape[6]
    want = module_results(cell, copy.deepcopy(module).double(), x.double(), [s.double() for s in states], lengths,
                          packed, reference=True)
    got = module_results(cell, module.to(DEVICE), x, states, lengths, packed)
    assert got.keys() == want.keys()
    for name in want:
        assert_close_to(got[name], want[name], dtype, name)


MODULE_RATES = {"layernorm_lstm": dict(zoneout=0.2, cell_zoneout=0.3, recurrent_dropout=0.3, weight_dropout=0.4),
                "layernorm_gru": dict(zoneout=0.2, recurrent_dropout=0.3, weight_dropout=0.4)}


@cells
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
def test_regularized_module_matches_reference_with_its_masks(cell, training, packed, dtype, monkeypatch):
    """Every regulariser on, 2 layers, bidirectional: the module on CUDA (masks drawn from the CUDA
    generator, recorded) against the reference in float64 on the CPU given those very masks (training), or
    eval's semantics (zoneout's expectation, the dropouts off)."""
    torch.manual_seed(0)
    module = _randomise(cell.module(5, 18, num_layers=2, bidirectional=True, **MODULE_RATES[cell.name]),
                        seed=6).to(dtype).train(training)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(6, 4, 5, generator=gen, dtype=torch.float64).to(dtype)
    states = [0.5 * torch.randn(4, 4, 18, generator=gen, dtype=torch.float64).to(dtype) for _ in range(cell.states)]
    lengths = [6, 5, 3, 1] if packed else [6] * 4
    recorder = mask_recorder(monkeypatch)
    oracle = copy.deepcopy(module).double()
    got = module_results(cell, module.to(DEVICE), x, states, lengths, packed)
    # The masks the CUDA run drew, on the CPU for the reference.
    recorder.calls = [{k: v.cpu() for k, v in call.items()} for call in recorder.calls]
    recorder.dropout_masks = [m.cpu() for m in recorder.dropout_masks]
    if training:
        assert all(set(c["zoneout"].unique().tolist()) <= {0.0, 1.0} for c in recorder.calls)
    else:
        assert all("recurrent_mask" not in c for c in recorder.calls) and not recorder.dropout_masks
    xl = x.double().requires_grad_(True)
    sl = [s.double().requires_grad_(True) for s in states]
    batch_sizes = pack_padded_sequence(x, lengths).batch_sizes if packed else None
    out, finals = module_reference(cell, oracle, xl, sl, lengths, batch_sizes, recorder)
    results = [out, *finals]
    loss = sum((t * w).sum() for t, w in zip(results, _loss_weights(results, 99)))
    loss.backward()
    want = {"output": out, **{f"final state {i}": f for i, f in enumerate(finals)}, "grad input": xl.grad,
            **{f"grad state {i}": s.grad for i, s in enumerate(sl)},
            **{f"grad {n}": p.grad for n, p in oracle.named_parameters()}}
    assert got.keys() == want.keys()
    for name in want:
        assert_close_to(got[name], want[name].detach(), dtype, name)


@cells
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_reduced_precision_within_2x_of_reference_error(cell, dtype):
    """float16 / bfloat16 natively on CUDA, 2 layers, bidirectional, packed: genfast's error against
    float64 at most twice that of genfast.reference in the same dtype on the device, plus a floor."""
    shape = (20, 8, 32, 64, 2, True, True, True)
    module, x, states, lengths = _module_inputs(cell, shape, dtype)
    # The float64 oracle starts from the same rounded weights and inputs as both low-precision runs.
    oracle = module_results(cell, copy.deepcopy(module).double(), x.double(), [s.double() for s in states],
                            lengths, True, reference=True)
    theirs = module_results(cell, copy.deepcopy(module).to(DEVICE), x, states, lengths, True, reference=True)
    ours = module_results(cell, module.to(DEVICE), x, states, lengths, True)
    eps = torch.finfo(dtype).eps
    assert oracle.keys() == ours.keys() == theirs.keys()
    for key, exact in oracle.items():
        assert ours[key].dtype == dtype, key
        their_err = (theirs[key].double() - exact).abs().max().item()
        our_err = (ours[key].double() - exact).abs().max().item()
        floor = 2 * eps * max(1.0, exact.abs().max().item())
        assert our_err <= 2 * their_err + floor, (
            f"{key}: genfast error {our_err:.3g} > 2 x reference error {their_err:.3g} + floor {floor:.3g}")


@cells
def test_inference_equals_training_forward(cell):
    """train=False (the product in a scratch, nothing saved) computes what train=True does. Not asserted
    bitwise: cuBLAS may pick another kernel for the workspace's alignment, so the products may round in
    another order; FLOAT32_BOUND as the float32 tests."""
    module = _randomise(cell.module(6, 40, 2, bidirectional=True), seed=6).to(DEVICE)
    x = torch.randn(5, 3, 6, device=DEVICE)
    with torch.no_grad():
        out_eval, _ = module(x)
    out_train, _ = module(x.requires_grad_(True))
    assert_close_to(out_train.detach().cpu(), out_eval.cpu().double(), torch.float32, "output")


@cells
@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
def test_zoneout_one_keeps_the_initial_state(cell, packed):
    """zoneout = 1 in training: every h_t is h_0 (the output too), exactly."""
    torch.manual_seed(4)
    module = _randomise(cell.module(3, 10, zoneout=1.0, bidirectional=True), seed=4).to(DEVICE).train()
    x = torch.randn(5, 3, 3, device=DEVICE)
    h0 = torch.randn(2, 3, 10, device=DEVICE)
    hx = (h0, torch.randn(2, 3, 10, device=DEVICE)) if cell.states == 2 else h0
    lengths = [5, 4, 2]
    inp = pack_padded_sequence(x, lengths) if packed else x
    out, final = module(inp, hx)
    h_n = final[0] if cell.states == 2 else final
    assert torch.equal(h_n, h0)
    out = pad_packed_sequence(out)[0] if packed else out
    for n, length in enumerate(lengths if packed else [5] * 3):
        want = torch.cat([h0[0, n], h0[1, n]]).expand(length, -1)
        assert torch.equal(out[:length, n], want)


@cells
def test_errors_name_the_argument(cell):
    x, states, weights, batch_sizes = _op_args(cell, 2, 2, 3, 4, False, False, True, torch.float32, seed=0)
    cuda = lambda t: None if t is None else t.to(DEVICE)  # noqa: E731
    x, states, weights = cuda(x), [cuda(s) for s in states], [cuda(w) for w in weights]
    bad = list(weights)
    bad[4] = bad[4].cpu()  # ln_ih_weight on the wrong device
    with pytest.raises(RuntimeError, match="ln_ih_weight"):
        op_layer(cell, x, states, bad, None, False, {})
    bad = list(weights)
    bad[5] = bad[5].double()
    with pytest.raises(RuntimeError, match="ln_hh_weight"):
        op_layer(cell, x, states, bad, None, False, {})
    with pytest.raises(RuntimeError, match="zoneout"):
        op_layer(cell, x, states, weights, None, False, {"zoneout": torch.zeros(3, 4, device=DEVICE)})


def test_outputs_are_cuda_tensors_of_the_module_dtype():
    module = CELLS[0].module(4, 6, 2, batch_first=True, bidirectional=True).to(DEVICE, torch.float64)
    out, (h_n, c_n) = module(torch.randn(3, 5, 4, device=DEVICE, dtype=torch.float64))
    assert out.device.type == h_n.device.type == c_n.device.type == "cuda"
    assert out.dtype == h_n.dtype == c_n.dtype == torch.float64
    assert out.shape == (3, 5, 12) and h_n.shape == c_n.shape == (4, 3, 6)
