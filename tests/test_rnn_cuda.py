"""CUDA LSTM/GRU: parity with cuDNN (torch.nn.LSTM / GRU) and with the textbook equations.

Skipped without a CUDA device. With one, the extension must have been built with
CUDA (a CPU-only build on a GPU machine fails here instead of skipping quietly).

Layers of checks:
  * op level (torch.ops.genfast.*, no module involved): fp64 forward and backward
    against genfast.reference on padded and packed input, both directions, with and
    without bias and projection; fp64 gradcheck through the registered autograd;
    opcheck; argument errors.
  * module level (genfast.nn.LSTM / GRU copied from torch modules with from_torch):
    fp32 outputs, final states and every gradient against cuDNN; fp16 / bf16 under
    the 2x-PyTorch-error rule against an fp64 cuDNN run.
"""
from __future__ import annotations

import copy

import pytest
import torch
from torch.nn.utils.rnn import pack_padded_sequence

from genfast import reference

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

DEVICE = "cuda"


@pytest.fixture(scope="module", autouse=True)
def _cuda_build_and_exact_fp32():
    from genfast import _extension

    ext = _extension.load()
    assert ext.cuda_built(), "a CUDA device is present but genfast._C was built without CUDA kernels"
    import genfast.ops  # noqa: F401  (registers autograd and fake kernels)

    # cuDNN RNNs use TF32 by default on Ampere+; the fp32 comparisons want true fp32.
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


# ---- op-level cases ---------------------------------------------------------------

def _make_case(kind, *, steps, batch, input_size, hidden, proj, bias, packed, reverse,
               dtype=torch.float64, seed=0):
    """Weights, states and input for one layer/direction; packed input uses distinct lengths."""
    gen = torch.Generator().manual_seed(seed)
    gates = 4 if kind == "lstm" else 3
    hidden_out = proj if proj else hidden
    scale = hidden ** -0.5  # PyTorch's init range: keeps gates out of saturation

    def rand(*shape):
        return ((torch.rand(*shape, generator=gen, dtype=torch.float64) * 2 - 1) * scale).to(DEVICE, dtype)

    case = {
        "w_ih": rand(gates * hidden, input_size),
        "w_hh": rand(gates * hidden, hidden_out),
        "b_ih": rand(gates * hidden) if bias else None,
        "b_hh": rand(gates * hidden) if bias else None,
        "w_hr": rand(hidden_out, hidden) if proj else None,
        "hx": rand(batch, hidden_out) / scale * 0.5,
        "cx": rand(batch, hidden) / scale * 0.5,
        "x_padded": rand(steps, batch, input_size) / scale,
        "reverse": reverse,
    }
    if packed:
        # Non-increasing lengths, longest = steps, shortest 1: exercises rows dropping out
        # (forward) and joining (reverse).
        lengths = torch.linspace(steps, 1, batch).round().long().tolist() if batch > 1 else [steps]
        case["lengths"] = lengths
        packed_x = pack_padded_sequence(case["x_padded"], lengths)
        case["input"], case["batch_sizes"] = packed_x.data, packed_x.batch_sizes
    else:
        case["lengths"] = [steps] * batch
        case["input"], case["batch_sizes"] = case["x_padded"], None
    return case


def _reference(kind, case, x_padded, hx, cx, w_ih, w_hh, b_ih, b_hh, w_hr):
    """genfast.reference run per sequence (its own length), laid out like the op's output."""
    outputs, hys, cys = [], [], []
    for n, length in enumerate(case["lengths"]):
        x_n = x_padded[:length, n : n + 1]
        if kind == "lstm":
            out, h, c = reference.lstm_layer(x_n, hx[n : n + 1], cx[n : n + 1], w_ih, w_hh, b_ih, b_hh,
                                             w_hr, reverse=case["reverse"])
            cys.append(c)
        else:
            out, h = reference.gru_layer(x_n, hx[n : n + 1], w_ih, w_hh, b_ih, b_hh, reverse=case["reverse"])
        outputs.append(out[:, 0])
        hys.append(h)
    padded = torch.nn.utils.rnn.pad_sequence(outputs)  # (T, N, H_out)
    output = padded if case["batch_sizes"] is None else pack_padded_sequence(padded, case["lengths"]).data
    return output, torch.cat(hys), (torch.cat(cys) if kind == "lstm" else None)


def _run_forward(kind, case, train):
    ops = torch.ops.genfast
    if kind == "lstm":
        return ops.lstm_forward(case["input"], case["hx"], case["cx"], case["w_ih"], case["w_hh"], case["b_ih"],
                                case["b_hh"], case["w_hr"], case["batch_sizes"], case["reverse"], train)
    return ops.gru_forward(case["input"], case["hx"], case["w_ih"], case["w_hh"], case["b_ih"], case["b_hh"],
                           case["batch_sizes"], case["reverse"], train)


OP_CASES = [
    # (packed, reverse, bias, proj)
    (False, False, True, 0),
    (False, True, True, 0),
    (True, False, True, 0),
    (True, True, True, 0),
    (True, True, False, 0),
    (False, False, False, 3),
    (True, True, True, 3),
    (True, False, True, 3),
]


def _op_case_id(params):
    packed, reverse, bias, proj = params
    return f"{'packed' if packed else 'padded'}-{'rev' if reverse else 'fwd'}-{'bias' if bias else 'nobias'}-proj{proj}"


KIND_CASES = [(kind, params) for kind in ("lstm", "gru") for params in OP_CASES
              if kind == "lstm" or not params[3]]  # GRU has no projection


@pytest.mark.parametrize("kind,params", KIND_CASES, ids=[f"{k}-{_op_case_id(p)}" for k, p in KIND_CASES])
@pytest.mark.parametrize("sizes", [(6, 4, 5, 7), (5, 3, 33, 300)], ids=["small", "multiblock"])
def test_op_forward_backward_fp64_matches_reference(kind, params, sizes):
    packed, reverse, bias, proj = params
    steps, batch, input_size, hidden = sizes
    case = _make_case(kind, steps=steps, batch=batch, input_size=input_size, hidden=hidden, proj=proj,
                      bias=bias, packed=packed, reverse=reverse)

    names = ["x_padded", "hx", "cx", "w_ih", "w_hh", "b_ih", "b_hh", "w_hr"]
    used = dict(case, cx=case["cx"] if kind == "lstm" else None)  # the GRU has no cell state
    leaves = {k: (used[k].clone().requires_grad_() if used[k] is not None else None) for k in names}
    ref_out, ref_h, ref_c = _reference(kind, case, *(leaves[k] for k in names))

    result = _run_forward(kind, case, train=True)
    # fp64 on both sides, same equations; differences are summation order only (~1e-15
    # relative), so 1e-10 leaves wide margin while catching any indexing mistake.
    tol = dict(rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(result[0], ref_out, **tol)
    torch.testing.assert_close(result[1], ref_h, **tol)
    if kind == "lstm":
        torch.testing.assert_close(result[2], ref_c, **tol)
    no_train = _run_forward(kind, case, train=False)
    assert no_train[-1].numel() == 0, "workspace must be empty when train=False"
    for a, b in zip(no_train[:-1], result[:-1]):
        torch.testing.assert_close(a, b, **tol)

    gen = torch.Generator(device=DEVICE).manual_seed(1)
    grad_out = torch.randn(ref_out.shape, generator=gen, device=DEVICE, dtype=torch.float64)
    grad_h = torch.randn(ref_h.shape, generator=gen, device=DEVICE, dtype=torch.float64)
    loss = (ref_out * grad_out).sum() + (ref_h * grad_h).sum()
    if kind == "lstm":
        grad_c = torch.randn(ref_c.shape, generator=gen, device=DEVICE, dtype=torch.float64)
        loss = loss + (ref_c * grad_c).sum()
    wrt = [k for k in names if leaves[k] is not None]
    ref_grads = dict(zip(wrt, torch.autograd.grad(loss, [leaves[k] for k in wrt])))
    ref_grad_input = ref_grads["x_padded"]
    if case["batch_sizes"] is not None:
        ref_grad_input = pack_padded_sequence(ref_grad_input, case["lengths"]).data

    ops = torch.ops.genfast
    if kind == "lstm":
        output, _, _, workspace = result
        g_in, g_hx, g_cx, g_wih, g_whh, g_bias, g_whr = ops.lstm_backward(
            grad_out, grad_h, grad_c, case["input"], case["hx"], case["cx"], case["w_ih"], case["w_hh"],
            case["w_hr"], output, workspace, case["batch_sizes"], reverse)
        torch.testing.assert_close(g_cx, ref_grads["cx"], **tol)
        if bias:
            torch.testing.assert_close(g_bias, ref_grads["b_ih"], **tol)
            torch.testing.assert_close(g_bias, ref_grads["b_hh"], **tol)
        assert g_bias.shape == (4 * hidden,)
        if proj:
            torch.testing.assert_close(g_whr, ref_grads["w_hr"], **tol)
        else:
            assert g_whr.numel() == 0
    else:
        output, _, workspace = result
        g_in, g_hx, g_wih, g_whh, g_bih, g_bhh = ops.gru_backward(
            grad_out, grad_h, case["input"], case["hx"], case["w_ih"], case["w_hh"], output, workspace,
            case["batch_sizes"], reverse)
        if bias:
            torch.testing.assert_close(g_bih, ref_grads["b_ih"], **tol)
            torch.testing.assert_close(g_bhh, ref_grads["b_hh"], **tol)
        assert g_bih.shape == g_bhh.shape == (3 * hidden,)
    torch.testing.assert_close(g_in, ref_grad_input, **tol)
    torch.testing.assert_close(g_hx, ref_grads["hx"], **tol)
    torch.testing.assert_close(g_wih, ref_grads["w_ih"], **tol)
    torch.testing.assert_close(g_whh, ref_grads["w_hh"], **tol)


GRADCHECK_CASES = [("lstm", False, False, 0), ("lstm", True, True, 0), ("lstm", True, False, 2),
                   ("gru", False, False, 0), ("gru", True, True, 0), ("gru", True, False, 0)]


@pytest.mark.parametrize("kind,packed,reverse,proj", GRADCHECK_CASES)
def test_op_gradcheck_fp64(kind, packed, reverse, proj):
    case = _make_case(kind, steps=4, batch=3, input_size=3, hidden=4, proj=proj, bias=True, packed=packed,
                      reverse=reverse)
    names = ["input", "hx", "cx", "w_ih", "w_hh", "b_ih", "b_hh", "w_hr"] if kind == "lstm" else \
        ["input", "hx", "w_ih", "w_hh", "b_ih", "b_hh"]
    names = [k for k in names if case[k] is not None]
    inputs = tuple(case[k].clone().requires_grad_() for k in names)

    def forward(*tensors):
        local = dict(case, **dict(zip(names, tensors)))
        result = _run_forward(kind, local, train=True)
        return tuple(result[:-1])  # everything but the workspace

    assert torch.autograd.gradcheck(forward, inputs, eps=1e-6, atol=1e-6)


@pytest.mark.parametrize("kind", ["lstm", "gru"])
@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
def test_opcheck(kind, packed):
    case = _make_case(kind, steps=4, batch=3, input_size=3, hidden=4, proj=0, bias=True, packed=packed,
                      reverse=False, dtype=torch.float32)
    ops = torch.ops.genfast
    if kind == "lstm":
        forward_args = (case["input"], case["hx"], case["cx"], case["w_ih"], case["w_hh"], case["b_ih"],
                        case["b_hh"], None, case["batch_sizes"], False, True)
        torch.library.opcheck(ops.lstm_forward.default, forward_args)
        output, hy, cy, workspace = ops.lstm_forward(*forward_args)
        backward_args = (torch.randn_like(output), torch.randn_like(hy), torch.randn_like(cy), case["input"],
                         case["hx"], case["cx"], case["w_ih"], case["w_hh"], None, output, workspace,
                         case["batch_sizes"], False)
        torch.library.opcheck(ops.lstm_backward.default, backward_args)
    else:
        forward_args = (case["input"], case["hx"], case["w_ih"], case["w_hh"], case["b_ih"], case["b_hh"],
                        case["batch_sizes"], False, True)
        torch.library.opcheck(ops.gru_forward.default, forward_args)
        output, hy, workspace = ops.gru_forward(*forward_args)
        backward_args = (torch.randn_like(output), torch.randn_like(hy), case["input"], case["hx"], case["w_ih"],
                         case["w_hh"], output, workspace, case["batch_sizes"], False)
        torch.library.opcheck(ops.gru_backward.default, backward_args)


def test_op_argument_errors_name_the_argument():
    case = _make_case("lstm", steps=3, batch=2, input_size=3, hidden=4, proj=0, bias=True, packed=False,
                      reverse=False, dtype=torch.float32)
    ops = torch.ops.genfast

    def call(**override):
        args = dict(case, **override)
        return ops.lstm_forward(args["input"], args["hx"], args["cx"], args["w_ih"], args["w_hh"], args["b_ih"],
                                args["b_hh"], args["w_hr"], args["batch_sizes"], False, True)

    with pytest.raises(RuntimeError, match="cx"):
        call(cx=case["cx"][:, :3])
    with pytest.raises(RuntimeError, match="hx"):
        call(hx=case["hx"].double())
    with pytest.raises(RuntimeError, match="b_hh"):
        call(b_hh=case["b_hh"][:5])
    with pytest.raises(RuntimeError, match="w_hh"):
        call(w_hh=case["w_hh"][:, :3])
    with pytest.raises(RuntimeError, match="batch_sizes"):
        call(input=case["input"].reshape(6, 3), batch_sizes=torch.tensor([1, 2, 2, 1]))
    with pytest.raises(RuntimeError, match="batch_sizes"):
        call(input=case["input"].reshape(6, 3), batch_sizes=torch.tensor([2, 2, 2], device=DEVICE))
    # Backward without the training workspace (train=False gives an empty one).
    output, hy, cy, empty_workspace = ops.lstm_forward(case["input"], case["hx"], case["cx"], case["w_ih"],
                                                       case["w_hh"], case["b_ih"], case["b_hh"], None, None,
                                                       False, False)
    with pytest.raises(RuntimeError, match="workspace"):
        ops.lstm_backward(output, hy, cy, case["input"], case["hx"], case["cx"], case["w_ih"], case["w_hh"],
                          None, output, empty_workspace, None, False)
    gru = _make_case("gru", steps=3, batch=2, input_size=3, hidden=4, proj=0, bias=True, packed=False,
                     reverse=False, dtype=torch.float32)
    with pytest.raises(RuntimeError, match="w_ih"):
        ops.gru_forward(gru["input"], gru["hx"], gru["w_ih"][:, :2], gru["w_hh"], None, None, None, False, False)


# ---- module level: against cuDNN ----------------------------------------------------

MODULE_CONFIGS = [
    # (kind, num_layers, bidirectional, batch_first, bias, proj_size, packed)
    ("lstm", 1, False, False, True, 0, False),
    ("lstm", 2, True, True, True, 0, False),
    ("lstm", 2, True, False, True, 0, True),
    ("lstm", 1, True, False, False, 5, True),
    ("lstm", 2, False, True, True, 6, False),
    ("gru", 1, False, False, True, 0, False),
    ("gru", 2, True, True, True, 0, False),
    ("gru", 2, True, False, False, 0, True),
]


def _config_id(config):
    kind, layers, bidir, batch_first, bias, proj, packed = config
    return (f"{kind}-L{layers}-{'bi' if bidir else 'uni'}-{'bf' if batch_first else 'tf'}"
            f"-{'bias' if bias else 'nobias'}-proj{proj}-{'packed' if packed else 'padded'}")


def _torch_module(kind, layers, bidir, batch_first, bias, proj, *, input_size, hidden, seed=0):
    torch.manual_seed(seed)
    if kind == "lstm":
        return torch.nn.LSTM(input_size, hidden, num_layers=layers, bias=bias, batch_first=batch_first,
                             bidirectional=bidir, proj_size=proj)
    return torch.nn.GRU(input_size, hidden, num_layers=layers, bias=bias, batch_first=batch_first,
                        bidirectional=bidir)


def _genfast_copy(kind, module):
    import genfast.nn

    cls = genfast.nn.LSTM if kind == "lstm" else genfast.nn.GRU
    return cls.from_torch(module)


def _run_module(module, kind, x, states, lengths, batch_first):
    """Run the module, returning (output tensor, final states) with states requiring grad."""
    if lengths is not None:
        x = pack_padded_sequence(x, lengths, batch_first=batch_first, enforce_sorted=False)
    out, final = module(x, states)
    out = out.data if lengths is not None else out
    return out, (final if kind == "lstm" else (final,))


def _module_inputs(kind, module, *, steps, batch, input_size, dtype, packed, batch_first, seed=0):
    gen = torch.Generator().manual_seed(seed)
    layers_dirs = module.num_layers * (2 if module.bidirectional else 1)
    hidden_out = getattr(module, "proj_size", 0) or module.hidden_size
    shape = (batch, steps, input_size) if batch_first else (steps, batch, input_size)
    x = torch.randn(*shape, generator=gen, dtype=torch.float64)
    h0 = torch.randn(layers_dirs, batch, hidden_out, generator=gen, dtype=torch.float64) * 0.5
    c0 = torch.randn(layers_dirs, batch, module.hidden_size, generator=gen, dtype=torch.float64) * 0.5
    # Unsorted lengths (enforce_sorted=False) to cover the module's sorting too.
    lengths = torch.randint(1, steps + 1, (batch,), generator=gen)
    lengths[batch // 2] = steps
    to = dict(device=DEVICE, dtype=dtype)
    states = (h0.to(**to), c0.to(**to)) if kind == "lstm" else h0.to(**to)
    return x.to(**to), states, (lengths if packed else None)


def _forward_backward(kind, module, x, states, lengths, batch_first, seed=1):
    """Outputs and every gradient (input, initial states, parameters) for a fixed random loss."""
    x = x.detach().clone().requires_grad_()
    states = tuple(s.detach().clone().requires_grad_() for s in (states if kind == "lstm" else (states,)))
    module.zero_grad(set_to_none=True)
    out, finals = _run_module(module, kind, x, states if kind == "lstm" else states[0], lengths, batch_first)
    gen = torch.Generator(device=DEVICE).manual_seed(seed)
    loss = (out.double() * torch.randn(out.shape, generator=gen, device=DEVICE, dtype=torch.float64)).sum()
    for final in finals:
        loss = loss + (final.double() * torch.randn(final.shape, generator=gen, device=DEVICE,
                                                    dtype=torch.float64)).sum()
    loss.backward()
    results = {"output": out.detach(), "grad_input": x.grad}
    for i, final in enumerate(finals):
        results[f"final_state{i}"] = final.detach()
    for i, s in enumerate(states):
        results[f"grad_state{i}"] = s.grad
    for name, param in module.named_parameters():
        results[f"grad_{name}"] = param.grad
    return results


@pytest.mark.parametrize("config", MODULE_CONFIGS, ids=_config_id)
def test_module_fp32_matches_cudnn(config):
    kind, layers, bidir, batch_first, bias, proj, packed = config
    torch_module = _torch_module(kind, layers, bidir, batch_first, bias, proj, input_size=10, hidden=16).to(DEVICE)
    ours = _genfast_copy(kind, copy.deepcopy(torch_module)).to(DEVICE)
    x, states, lengths = _module_inputs(kind, torch_module, steps=9, batch=5, input_size=10, dtype=torch.float32,
                                        packed=packed, batch_first=batch_first)
    expected = _forward_backward(kind, torch_module, x, states, lengths, batch_first)
    actual = _forward_backward(kind, ours, x, states, lengths, batch_first)
    assert expected.keys() == actual.keys()
    # Both sides compute in fp32 (TF32 off) with different summation orders and
    # different exp/tanh implementations: per-element differences are a few ulp of
    # the values, amplified through <= 9 recurrent steps and 2 layers; weight
    # gradients sum over S*H products. 2e-5 absolute on O(1) values is ~170 ulp.
    for key in expected:
        torch.testing.assert_close(actual[key], expected[key], rtol=1e-4, atol=2e-5, msg=lambda m: f"{key}: {m}")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("config", [MODULE_CONFIGS[0], MODULE_CONFIGS[2], MODULE_CONFIGS[3], MODULE_CONFIGS[6]],
                         ids=_config_id)
def test_module_low_precision_within_2x_of_cudnn_error(config, dtype):
    """genfast's error vs fp64 is at most 2x cuDNN's error in the same dtype (+ a floor)."""
    kind, layers, bidir, batch_first, bias, proj, packed = config
    base = _torch_module(kind, layers, bidir, batch_first, bias, proj, input_size=32, hidden=64).to(DEVICE)
    torch_low = copy.deepcopy(base).to(dtype)
    # The fp64 oracle starts from the same rounded weights and inputs as both low-precision runs.
    torch_64 = copy.deepcopy(torch_low).double()
    ours_low = _genfast_copy(kind, copy.deepcopy(torch_low)).to(DEVICE)
    x, states, lengths = _module_inputs(kind, base, steps=20, batch=8, input_size=32, dtype=dtype, packed=packed,
                                        batch_first=batch_first)
    states_64 = tuple(s.double() for s in states) if kind == "lstm" else states.double()
    oracle = _forward_backward(kind, torch_64, x.double(), states_64, lengths, batch_first)
    theirs = _forward_backward(kind, torch_low, x, states, lengths, batch_first)
    ours = _forward_backward(kind, ours_low, x, states, lengths, batch_first)
    eps = torch.finfo(dtype).eps
    for key, exact in oracle.items():
        their_err = (theirs[key].double() - exact).abs().max().item()
        our_err = (ours[key].double() - exact).abs().max().item()
        # Floor: a couple of roundings of the largest value, so an exact cuDNN result on
        # a tensor does not demand exactness from us.
        floor = 2 * eps * max(1.0, exact.abs().max().item())
        assert our_err <= 2 * their_err + floor, (
            f"{key}: genfast error {our_err:.3g} > 2 x cuDNN error {their_err:.3g} + floor {floor:.3g}")


def test_module_inference_no_grad_matches_cudnn():
    torch_module = _torch_module("lstm", 2, True, False, True, 0, input_size=10, hidden=16).to(DEVICE)
    ours = _genfast_copy("lstm", copy.deepcopy(torch_module)).to(DEVICE)
    x, states, _ = _module_inputs("lstm", torch_module, steps=7, batch=1, input_size=10, dtype=torch.float32,
                                  packed=False, batch_first=False)
    with torch.no_grad():
        expected_out, (expected_h, expected_c) = torch_module(x, states)
        out, (h, c) = ours(x, states)
    for a, b in [(out, expected_out), (h, expected_h), (c, expected_c)]:
        torch.testing.assert_close(a, b, rtol=1e-4, atol=2e-5)  # same reasoning as the fp32 test above
