"""The regularisers of genfast.nn.LSTM / GRU, both reset_after (issue 19, item 4): zoneout, cell zoneout,
recurrent dropout, weight dropout.

Op level: the fused kernels given explicit masks against genfast.reference given the same masks
(outputs, final states, every gradient; float64, float32, fp64 gradcheck, packed and reverse,
every weight path), opcheck. Module level: the masks the module draws (recorded) against the
reference, rates 0 against the plain module, zoneout 1, eval semantics, reproducibility, mask
statistics, torch.compile, errors.
"""
from __future__ import annotations

import math
import os
import pathlib
import subprocess
import sys

import pytest
import torch
from torch.nn.utils.rnn import pack_padded_sequence

import genfast.nn as gnn
import genfast.nn.rnn as gnn_rnn
from genfast import _extension, ops, reference

from .mask_recorder import MaskRecorder
from .rnn_cells import CELLS, LSTM, TOLERANCES, op_case

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
# The masks each cell takes; the LSTM's cell_zoneout exists only for a cell with a cell state.
KINDS = {"lstm": ("zoneout", "cell_zoneout", "recurrent_mask"), "gru": ("zoneout", "recurrent_mask"),
         "gru_reset_before": ("zoneout", "recurrent_mask")}
REGULARIZED_CELLS = [cell for cell in CELLS if cell.name in KINDS]  # the cells whose ops take the masks


def _cell(name):
    return next(c for c in CELLS if c.name == name)


# ---------------------------------------------------------------- op level
def make_masks(cell, case, kinds, dtype, device, seed=5, fractional=True):
    """Padded masks for ``kinds``: zoneout weights (T, N, H) and the recurrent mask (N, H).

    Zoneout weights are 0/1 draws (training) or, with ``fractional``, values across [0, 1] with
    exact 0s and 1s among them: the kernels take any weight (eval passes p), so both kinds test
    the same formula."""
    gen = torch.Generator().manual_seed(seed)
    T, N, H = case["x_padded"].shape[0], case["x_padded"].shape[1], case["hidden"]
    masks = {}
    for kind in kinds:
        if kind == "recurrent_mask":
            masks[kind] = (torch.rand(N, H, generator=gen, dtype=torch.float64) > 0.3).double() / 0.7
        else:
            u = torch.rand(T, N, H, generator=gen, dtype=torch.float64)
            if fractional:
                masks[kind] = torch.where(u < 0.3, 0.0, torch.where(u > 0.7, 1.0, (u - 0.3) / 0.4))
            else:
                masks[kind] = (u < 0.5).double()
    return {k: v.to(device, dtype) for k, v in masks.items()}


def op_masks(case, masks):
    """The masks as the op takes them: zoneout rows laid out like the (packed or flattened) sequence."""
    out = {}
    for kind, m in masks.items():
        if kind == "recurrent_mask":
            out[kind] = m
        elif case["batch_sizes"] is None:
            out[kind] = m.reshape(-1, m.shape[-1])
        else:
            out[kind] = pack_padded_sequence(m, case["lengths"]).data
    return out


def run_layer(cell, x, states, w, case, masks):
    """genfast.ops on one layer and direction with the masks: (output, [final states])."""
    weights = dict(w_ih=w["w_ih"], w_hh=w["w_hh"], b_ih=w["b_ih"], b_hh=w["b_hh"])
    if cell.name == "lstm":
        out, hy, cy = ops.lstm(x, *states, **weights, batch_sizes=case["batch_sizes"], reverse=case["reverse"],
                               **masks)
        return out, [hy, cy]
    layer = ops.gru if cell.name == "gru" else ops.gru_reset_before
    out, hy = layer(x, *states, **weights, batch_sizes=case["batch_sizes"], reverse=case["reverse"], **masks)
    return out, [hy]


def reference_layer(cell, x_padded, states, w, case, masks):
    """genfast.reference per sequence over its own length, with its rows of the masks, laid out as the op's output."""
    weights = [w[name] for name in ("w_ih", "w_hh", "b_ih", "b_hh")]
    outputs, finals = [], [[] for _ in states]
    for n, length in enumerate(case["lengths"]):
        seq_masks = {k: (m[n:n + 1] if k == "recurrent_mask" else m[:length, n:n + 1]) for k, m in masks.items()}
        out, *last = cell.reference(x_padded[:length, n:n + 1], *(s[n:n + 1] for s in states), *weights,
                                    reverse=case["reverse"], **seq_masks)
        outputs.append(out[:, 0])
        for kind, value in enumerate(last):
            finals[kind].append(value)
    padded = torch.nn.utils.rnn.pad_sequence(outputs)
    if case["batch_sizes"] is None:
        output = padded
    else:
        output = pack_padded_sequence(padded, case["lengths"]).data
    return output, [torch.cat(f) for f in finals]


def compare_with_reference(cell, case, masks, dtype, tol):
    """Forward + backward (weighted-sum loss) of the op and of the reference; every result compared."""
    leaves = lambda d: {k: (v.detach().clone().requires_grad_(True) if v is not None else None) for k, v in d.items()}
    results = []
    for side in ("op", "reference"):
        w = leaves(case["w"])
        states = [s.detach().clone().requires_grad_(True) for s in case["states"]]
        x_padded = case["x_padded"].detach().clone().requires_grad_(True)
        if side == "op":
            x = x_padded if case["batch_sizes"] is None else pack_padded_sequence(x_padded, case["lengths"]).data
            out, finals = run_layer(cell, x, states, w, case, op_masks(case, masks))
        else:
            out, finals = reference_layer(cell, x_padded, states, w, case, masks)
        gen = torch.Generator().manual_seed(3)
        loss = sum((t * torch.randn(t.shape, generator=gen, dtype=torch.float64).to(t)).sum() for t in [out, *finals])
        loss.backward()
        grads = {"input": x_padded.grad, **{f"state{i}": s.grad for i, s in enumerate(states)},
                 **{k: v.grad for k, v in w.items() if v is not None}}
        results.append(([out.detach(), *[f.detach() for f in finals]], grads))
    (outs_o, grads_o), (outs_r, grads_r) = results
    for i, (a, b) in enumerate(zip(outs_o, outs_r)):
        torch.testing.assert_close(a, b, **tol, msg=lambda m, i=i: f"{'output' if i == 0 else f'state {i - 1}'}: {m}")
    assert grads_o.keys() == grads_r.keys()
    for name in grads_o:
        torch.testing.assert_close(grads_o[name], grads_r[name], **tol, msg=lambda m, n=name: f"grad {n}: {m}")


REGULARIZER_SETS = [("zoneout",), ("cell_zoneout",), ("recurrent_mask",), ("zoneout", "cell_zoneout", "recurrent_mask")]


def _params():
    for cell in REGULARIZED_CELLS:
        for kinds in REGULARIZER_SETS:
            if all(k in KINDS[cell.name] for k in kinds):
                for packed in (False, True):
                    for reverse in (False, True):
                        yield pytest.param(cell, kinds, packed, reverse,
                                           id=f"{cell.name}-{'+'.join(kinds)}-{'packed' if packed else 'padded'}"
                                              f"{'-reverse' if reverse else ''}")


@pytest.mark.parametrize("cell, kinds, packed, reverse", list(_params()))
@pytest.mark.parametrize("device", DEVICES)
def test_op_matches_reference_fp64(cell, kinds, packed, reverse, device):
    case = op_case(cell, steps=7, batch=5, input_size=6, hidden=20, packed=packed, reverse=reverse,
                   dtype=torch.float64, device=device)
    compare_with_reference(cell, case, make_masks(cell, case, kinds, torch.float64, device), torch.float64,
                           TOLERANCES[torch.float64])


# Shapes on every path of the CPU loop: one sequence (W_hh read in place), a decode-sized call, the
# stacked [W_ih | W_hh] step (LSTM, batch > 2), the input projection first, hidden sizes across
# panels of 16 with a partial one, batch 13 split into row blocks.
SHAPES = [dict(steps=9, batch=1, input_size=5, hidden=24), dict(steps=1, batch=3, input_size=4, hidden=16),
          dict(steps=6, batch=2, input_size=7, hidden=33), dict(steps=8, batch=13, input_size=12, hidden=40),
          dict(steps=5, batch=6, input_size=3, hidden=70)]


@pytest.mark.parametrize("cell", REGULARIZED_CELLS, ids=lambda c: c.name)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "T{steps}N{batch}I{input_size}H{hidden}".format(**s))
@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
@pytest.mark.parametrize("device", DEVICES)
def test_op_matches_reference_fp32(cell, shape, packed, device):
    case = op_case(cell, **shape, packed=packed, dtype=torch.float32, device=device, seed=11)
    masks = make_masks(cell, case, KINDS[cell.name], torch.float32, device, fractional=False)
    compare_with_reference(cell, case, masks, torch.float32, TOLERANCES[torch.float32])


@pytest.mark.parametrize("cell", REGULARIZED_CELLS, ids=lambda c: c.name)
@pytest.mark.parametrize("packed, reverse", [(False, False), (True, True)], ids=["padded", "packed-reverse"])
@pytest.mark.parametrize("device", DEVICES)
def test_op_gradcheck_fp64(cell, packed, reverse, device):
    """Through the registered autograd, with fixed masks of every kind (fractional zoneout weights)."""
    case = op_case(cell, steps=4, batch=3, input_size=3, hidden=5, packed=packed, reverse=reverse, device=device)
    masks = op_masks(case, make_masks(cell, case, KINDS[cell.name], torch.float64, device))
    names = ("w_ih", "w_hh", "b_ih", "b_hh")
    inputs = [case["x"], *case["states"], *(case["w"][n] for n in names)]
    inputs = [t.detach().clone().requires_grad_(True) for t in inputs]
    n_states = len(case["states"])

    def fn(x, *rest):
        states, weights = list(rest[:n_states]), dict(zip(names, rest[n_states:]))
        out, finals = run_layer(cell, x, states, weights, case, masks)
        return (out, *finals)

    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-7)


@pytest.mark.parametrize("cell", REGULARIZED_CELLS, ids=lambda c: c.name)
@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
def test_opcheck(cell, packed):
    """torch.library.opcheck of the forward op with masks, and of the backward op on its workspace."""
    case = op_case(cell, steps=3, batch=3, input_size=4, hidden=6, packed=packed, dtype=torch.float32)
    masks = op_masks(case, make_masks(cell, case, KINDS[cell.name], torch.float32, "cpu"))
    mask_args = tuple(masks[k] for k in KINDS[cell.name])
    w = {k: (v.requires_grad_(True) if v is not None else None) for k, v in case["w"].items()}
    states = [s.requires_grad_(True) for s in case["states"]]
    args = cell.forward_args(case["x"].requires_grad_(True), states, w, case["batch_sizes"], False, True) + mask_args
    torch.library.opcheck(cell.forward_op.default, args)
    with torch.no_grad():
        result = cell.forward_op(*args)
    output, finals, workspace = cell.split_forward(result)
    if cell.name == "lstm":  # cell zoneout: one more (S, H) block, the carried c_t
        rows, hidden = case["x"].shape[0] * (1 if packed else case["x"].shape[1]), 6
        assert workspace.numel() == rows * hidden * (4 + 1 + 1)
    backward_args = cell.backward_args(torch.randn_like(output), [torch.randn_like(f) for f in finals], case["x"],
                                       case["states"], case["w"], output, workspace, case["batch_sizes"], False)
    torch.library.opcheck(cell.backward_op.default, tuple(t.detach() if isinstance(t, torch.Tensor) else t
                                                          for t in backward_args) + mask_args)


@pytest.mark.parametrize("cell", REGULARIZED_CELLS, ids=lambda c: c.name)
def test_op_mask_errors_name_the_argument(cell):
    case = op_case(cell, steps=3, batch=2, input_size=4, hidden=6, dtype=torch.float32)
    run = lambda **masks: run_layer(cell, case["x"], case["states"], case["w"], case, masks)
    with pytest.raises(RuntimeError, match="zoneout: expected shape"):
        run(zoneout=torch.zeros(5, 6))
    with pytest.raises(RuntimeError, match="recurrent_mask: expected shape"):
        run(recurrent_mask=torch.zeros(3, 6))
    with pytest.raises(RuntimeError, match="zoneout: dtype"):
        run(zoneout=torch.zeros(6, 6, dtype=torch.float64))
    if cell.name == "lstm":
        with pytest.raises(RuntimeError, match="not supported with a projection"):
            w_hr = torch.zeros(4, 6)
            ops.lstm(case["x"], case["states"][0][:, :4], case["states"][1], case["w"]["w_ih"],
                     torch.zeros(24, 4), w_hr=w_hr, zoneout=torch.zeros(6, 6))


# ---------------------------------------------------------------- module level
def module_reference(module, x, hx, recorder):
    """genfast.reference for a padded (T, N, I) multi-layer, bidirectional module, with the masks it drew."""
    cell = LSTM if isinstance(module, gnn.LSTM) else _cell("gru" if module.reset_after else "gru_reset_before")
    directions = 2 if module.bidirectional else 1
    states = [hx] if not isinstance(hx, tuple) else list(hx)
    layer_input, finals = x, [[] for _ in states]
    weight_masks = iter(recorder.dropout_masks[1::2] if module.recurrent_dropout and module.weight_dropout
                        else recorder.dropout_masks if module.weight_dropout else [])
    for layer in range(module.num_layers):
        outputs = []
        for direction in range(directions):
            index = layer * directions + direction
            suffix = f"_l{layer}" + ("_reverse" if direction else "")
            w = [getattr(module, f"{name}{suffix}") for name in ("weight_ih", "weight_hh", "bias_ih", "bias_hh")]
            if module.training and module.weight_dropout:
                w[1] = w[1] * next(weight_masks)
            call = recorder.calls[index]
            T, N = x.shape[0], x.shape[1]
            masks = {k: (v if k == "recurrent_mask" else v.view(T, N, -1)) for k, v in call.items()}
            out, *last = cell.reference(layer_input, *(s[index] for s in states), *w, reverse=direction == 1, **masks)
            outputs.append(out)
            for kind, value in enumerate(last):
                finals[kind].append(value)
        layer_input = torch.cat(outputs, dim=-1) if directions == 2 else outputs[0]
    return layer_input, [torch.stack(f) for f in finals]


MODULE_RATES = {"lstm": [dict(zoneout=0.3), dict(cell_zoneout=0.4), dict(recurrent_dropout=0.25),
                         dict(weight_dropout=0.5),
                         dict(zoneout=0.2, cell_zoneout=0.3, recurrent_dropout=0.3, weight_dropout=0.4)],
                "gru": [dict(zoneout=0.3), dict(recurrent_dropout=0.25), dict(weight_dropout=0.5),
                        dict(zoneout=0.2, recurrent_dropout=0.3, weight_dropout=0.4)]}
MODULE_RATES["gru_reset_before"] = MODULE_RATES["gru"]


def _module_params():
    for cell in REGULARIZED_CELLS:
        for rates in MODULE_RATES[cell.name]:
            yield pytest.param(cell, rates, id=cell.name + "-" + "+".join(rates))


def _make_module(cell, rates, dtype=torch.float64, **kwargs):
    torch.manual_seed(0)
    config = dict(num_layers=2, bidirectional=True) | kwargs
    return cell.module(5, 8, **config, **rates, dtype=dtype)


def _module_inputs(cell, dtype, T=6, N=4, I=5, H=8, layers=2, directions=2):
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(T, N, I, generator=gen, dtype=torch.float64).to(dtype)
    states = [torch.randn(layers * directions, N, H, generator=gen, dtype=torch.float64).to(dtype)
              for _ in cell.states]
    return x, states


@pytest.mark.parametrize("cell, rates", list(_module_params()))
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_module_matches_reference_with_its_masks(cell, rates, training, monkeypatch):
    """2 layers, bidirectional, float64: outputs, final states and every gradient against the
    reference run with the masks the module drew (training), or with eval's semantics (zoneout's
    expectation; the dropouts off)."""
    module = _make_module(cell, rates).train(training)
    x, states = _module_inputs(cell, torch.float64)
    recorder = MaskRecorder(monkeypatch, gnn_rnn.ops, ("lstm", "gru", "gru_reset_before"))
    results = []
    for side in ("genfast", "reference"):
        module.zero_grad(set_to_none=True)
        xl = x.clone().requires_grad_(True)
        sl = [s.clone().requires_grad_(True) for s in states]
        hx = cell.module_states(sl)
        if side == "genfast":
            out, final = module(xl, hx)
            finals = cell.as_list(final)
        else:
            out, finals = module_reference(module, xl, hx, recorder)
        gen = torch.Generator().manual_seed(2)
        loss = sum((t * torch.randn(t.shape, generator=gen, dtype=torch.float64)).sum() for t in [out, *finals])
        loss.backward()
        grads = {"input": xl.grad, **{f"state{i}": s.grad for i, s in enumerate(sl)},
                 **{n: p.grad.clone() for n, p in module.named_parameters()}}
        results.append(([out.detach(), *[f.detach() for f in finals]], grads))
    if not training:
        assert all("recurrent_mask" not in c for c in recorder.calls) and not recorder.dropout_masks
    (outs_g, grads_g), (outs_r, grads_r) = results
    for a, b in zip(outs_g, outs_r):
        torch.testing.assert_close(a, b, **TOLERANCES[torch.float64])
    for name in grads_g:
        torch.testing.assert_close(grads_g[name], grads_r[name], **TOLERANCES[torch.float64],
                                   msg=lambda m, n=name: f"grad {n}: {m}")


@pytest.mark.parametrize("cell", REGULARIZED_CELLS, ids=lambda c: c.name)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_every_rate_zero_is_the_plain_module(cell, training):
    rates = dict(zoneout=0.0, recurrent_dropout=0.0, weight_dropout=0.0) | (
        dict(cell_zoneout=0.0) if cell.name == "lstm" else {})
    regularized = _make_module(cell, rates, torch.float32).train(training)
    plain = _make_module(cell, {}, torch.float32).train(training)
    x, states = _module_inputs(cell, torch.float32)
    results = []
    for module in (regularized, plain):
        xl = x.clone().requires_grad_(True)
        out, final = module(xl, cell.module_states(states))
        (out.sum() + sum(f.sum() for f in cell.as_list(final))).backward()
        results.append([out, *cell.as_list(final), xl.grad, *(p.grad for p in module.parameters())])
    for a, b in zip(*results):
        assert torch.equal(a, b)


@pytest.mark.parametrize("cell", REGULARIZED_CELLS, ids=lambda c: c.name)
@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
def test_zoneout_one_keeps_the_initial_state(cell, packed):
    """zoneout = 1 in training: every output is h0 and h_n = h0 (cell_zoneout = 1: c_n = c0), exactly."""
    rates = dict(zoneout=1.0) | (dict(cell_zoneout=1.0) if cell.name == "lstm" else {})
    module = _make_module(cell, rates, torch.float32, num_layers=1, bidirectional=False).train()
    x, states = _module_inputs(cell, torch.float32, layers=1, directions=1)
    if packed:
        x = pack_padded_sequence(x, [6, 4, 4, 1])
    out, final = module(x, cell.module_states(states))
    out = torch.nn.utils.rnn.pad_packed_sequence(out)[0] if packed else out
    lengths = [6, 4, 4, 1] if packed else [6] * 4
    for n, length in enumerate(lengths):
        assert torch.equal(out[:length, n], states[0][0, n].expand(length, -1))
    for got, want in zip(cell.as_list(final), states):
        assert torch.equal(got, want)
    (out.sum() + sum(f.sum() for f in cell.as_list(final))).backward()  # the backward runs too
    assert all(torch.isfinite(p.grad).all() for p in module.parameters())


def test_lstm_zoneout_one_without_cell_zoneout_still_updates_c():
    module = _make_module(LSTM, dict(zoneout=1.0), torch.float32, num_layers=1, bidirectional=False).train()
    x, states = _module_inputs(LSTM, torch.float32, layers=1, directions=1)
    out, (h, c) = module(x, tuple(states))
    assert torch.equal(h, states[0]) and not torch.equal(c, states[1])


@pytest.mark.parametrize("cell", REGULARIZED_CELLS, ids=lambda c: c.name)
def test_dropouts_are_off_in_eval(cell):
    """recurrent and weight dropout act only in training: in eval the module is the plain one."""
    regularized = _make_module(cell, dict(recurrent_dropout=0.5, weight_dropout=0.5), torch.float32).eval()
    plain = _make_module(cell, {}, torch.float32).eval()
    x, states = _module_inputs(cell, torch.float32)
    (out_r, final_r), (out_p, final_p) = (m(x, cell.module_states(states)) for m in (regularized, plain))
    assert torch.equal(out_r, out_p)
    assert all(torch.equal(a, b) for a, b in zip(cell.as_list(final_r), cell.as_list(final_p)))


@pytest.mark.parametrize("cell, rates", list(_module_params()))
def test_manual_seed_reproduces_a_run(cell, rates):
    module = _make_module(cell, rates, torch.float32).train()
    x, states = _module_inputs(cell, torch.float32)

    def run(seed):
        torch.manual_seed(seed)
        module.zero_grad(set_to_none=True)
        out, final = module(x, cell.module_states(states))
        (out.sum() + sum(f.sum() for f in cell.as_list(final))).backward()
        return [out.detach(), *[p.grad.clone() for p in module.parameters()]]

    first, again, other = run(3), run(3), run(4)
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    assert not torch.equal(first[0], other[0])


@pytest.mark.parametrize("cell", REGULARIZED_CELLS, ids=lambda c: c.name)
def test_mask_rates(cell, monkeypatch):
    """The masks' statistics. For n independent Bernoulli(q) draws the observed fraction has standard
    deviation sqrt(q (1 - q) / n); every check allows 6 of them (a false failure about once in 5e8)."""
    rates = dict(zoneout=0.3, recurrent_dropout=0.2, weight_dropout=0.4) | (
        dict(cell_zoneout=0.6) if cell.name == "lstm" else {})
    module = cell.module(16, 64, **rates).train()
    recorder = MaskRecorder(monkeypatch, gnn_rnn.ops, ("lstm", "gru", "gru_reset_before"))
    torch.manual_seed(0)
    module(torch.randn(50, 40, 16))

    def check(fraction_of, values, q):
        n = values.numel()
        bound = 6 * math.sqrt(q * (1 - q) / n)
        assert abs(fraction_of(values) - q) <= bound, (fraction_of(values), q, bound)

    call = recorder.calls[0]
    check(lambda m: m.mean().item(), call["zoneout"], 0.3)
    assert set(call["zoneout"].unique().tolist()) <= {0.0, 1.0}
    if cell.name == "lstm":
        check(lambda m: m.mean().item(), call["cell_zoneout"], 0.6)
        assert not torch.equal(call["cell_zoneout"], call["zoneout"])
    recurrent, weight = recorder.dropout_masks
    assert recurrent.shape == (40, 64) and weight.shape == module.weight_hh_l0.shape
    for mask, p in ((recurrent, 0.2), (weight, 0.4)):
        values = mask.unique()
        assert len(values) == 2 and values[0] == 0 and math.isclose(values[1].item(), 1 / (1 - p), rel_tol=1e-6)
        check(lambda m: (m == 0).double().mean().item(), mask, p)


@pytest.mark.parametrize("cell", REGULARIZED_CELLS, ids=lambda c: c.name)
def test_masks_differ_per_layer_and_direction_and_call(cell, monkeypatch):
    module = _make_module(cell, dict(zoneout=0.5, recurrent_dropout=0.5), torch.float32).train()
    recorder = MaskRecorder(monkeypatch, gnn_rnn.ops, ("lstm", "gru", "gru_reset_before"))
    x, states = _module_inputs(cell, torch.float32)
    module(x)
    module(x)
    zoneouts = [c["zoneout"] for c in recorder.calls]
    assert len(zoneouts) == 8
    assert all(not torch.equal(a, b) for i, a in enumerate(zoneouts) for b in zoneouts[i + 1:])


@pytest.mark.parametrize("cell", REGULARIZED_CELLS, ids=lambda c: c.name)
def test_torch_compile_fullgraph(cell):
    """Captured whole with the regularisers on; eval with zoneout matches eager, and a training
    step runs forward and backward (zoneout = 1: the output is h0 whatever the draws)."""
    rates = dict(zoneout=0.3, recurrent_dropout=0.2, weight_dropout=0.3)
    module = _make_module(cell, rates, torch.float32).eval()
    x, states = _module_inputs(cell, torch.float32)
    compiled = torch.compile(module, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(x, cell.module_states(states))[0], module(x, cell.module_states(states))[0])
    keep = _make_module(cell, dict(zoneout=1.0, recurrent_dropout=0.2, weight_dropout=0.3), torch.float32,
                        num_layers=1, bidirectional=False).train()
    x1, states1 = _module_inputs(cell, torch.float32, layers=1, directions=1)
    compiled = torch.compile(keep, fullgraph=True, backend="aot_eager")
    xl = x1.clone().requires_grad_(True)
    out, _ = compiled(xl, cell.module_states(states1))
    assert torch.equal(out, states1[0].expand_as(out))
    out.sum().backward()
    assert xl.grad is not None and torch.isfinite(xl.grad).all()


def test_module_argument_errors():
    with pytest.raises(ValueError, match="zoneout must be a number in \\[0, 1\\]"):
        gnn.LSTM(4, 8, zoneout=1.5)
    with pytest.raises(ValueError, match="recurrent_dropout"):
        gnn.GRU(4, 8, recurrent_dropout=-0.1)
    with pytest.raises(ValueError, match="proj_size"):
        gnn.LSTM(4, 8, proj_size=4, zoneout=0.1)
    with pytest.raises(TypeError):
        gnn.GRU(4, 8, cell_zoneout=0.1)
    gnn.LSTM(4, 8, proj_size=4, weight_dropout=0.3)(torch.randn(3, 2, 4))  # DropConnect works with a projection
    assert "zoneout=0.2" in repr(gnn.GRU(4, 8, zoneout=0.2))


@pytest.mark.parametrize("cell", REGULARIZED_CELLS, ids=lambda c: c.name)
def test_bfloat16_on_cpu_runs_in_float32(cell, monkeypatch):
    """The reduced-precision path converts the masks with the rest (zoneout 1 still keeps h0 exactly)."""
    module = _make_module(cell, dict(zoneout=1.0, recurrent_dropout=0.3), torch.bfloat16, num_layers=1,
                          bidirectional=False).train()
    x, states = _module_inputs(cell, torch.bfloat16, layers=1, directions=1)
    out, _ = module(x, cell.module_states(states))
    assert out.dtype == torch.bfloat16 and torch.equal(out, states[0].expand_as(out))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("cell", REGULARIZED_CELLS, ids=lambda c: c.name)
@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
def test_cuda_matches_cpu_with_the_same_masks(cell, packed):
    results = []
    for device in ("cpu", "cuda"):
        case = op_case(cell, steps=6, batch=5, input_size=7, hidden=24, packed=packed, dtype=torch.float64,
                       device=device)
        masks = op_masks(case, make_masks(cell, case, KINDS[cell.name], torch.float64, device))
        x = case["x"].detach().clone().requires_grad_(True)
        w = {k: (v.detach().clone().requires_grad_(True) if v is not None else None) for k, v in case["w"].items()}
        out, finals = run_layer(cell, x, case["states"], w, case, masks)
        (out.sum() + sum(f.sum() for f in finals)).backward()
        results.append([t.cpu() for t in (out, *finals, x.grad, w["w_hh"].grad)])
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, **TOLERANCES[torch.float64])


@pytest.mark.parametrize("level", ["baseline", "avx2"])
def test_every_simd_level(level):
    """The fp32 comparisons with the reference, in a process capped at each other SIMD level: the hooks
    are inlined into every level's copy of the tiles."""
    if level == _extension.load().simd_level():
        pytest.skip(f"{level} is this process's SIMD level: the rest of this file runs it")
    env = dict(os.environ, GENFAST_SIMD=level)
    root = pathlib.Path(__file__).resolve().parents[1]
    done = subprocess.run([sys.executable, "-m", "pytest", __file__, "-q", "-x", "-p", "no:cacheprovider",
                           "-k", "fp32 and cpu"], cwd=root, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert " passed" in done.stdout
