"""The regularisers of genfast.nn.LayerNormLSTM / LayerNormGRU (issue 19, item 4): zoneout, cell
zoneout, recurrent dropout and weight dropout, fused in the LN kernels.

Op level: genfast::layernorm_{lstm,gru}_* given explicit masks against genfast.reference's LN layers
given the same masks (outputs, final states, every gradient, the LN gains and biases included; padded,
packed, reverse), fp64 gradcheck, opcheck, mask errors. Module level: the masks the module draws
(recorded) against the reference, 2 layers, bidirectional, padded and packed, float64 and float32;
rates 0 against the plain module, zoneout 1, the dropouts off in eval, torch.manual_seed, torch.compile.
The mask semantics and drawing are genfast.nn.LSTM's (tests/test_rnn_regularizers.py tests the draws).
"""
from __future__ import annotations

import copy

import pytest
import torch
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence, pad_packed_sequence

import genfast.nn as gnn
import genfast.nn.layernorm_rnn as gnn_ln

from .mask_recorder import MaskRecorder
from .test_rnn_layernorm import CELLS, LSTM, _op_args, _randomise, assert_close_to

cells = pytest.mark.parametrize("cell", CELLS, ids=lambda c: c.name)
# The masks each cell's ops take (the GRU has no cell state).
KINDS = {"layernorm_lstm": ("zoneout", "cell_zoneout", "recurrent_mask"), "layernorm_gru": ("zoneout", "recurrent_mask")}


# ---------------------------------------------------------------- helpers
def padded_masks(masks, batch_sizes, steps, batch):
    """Op-layout masks (zoneout rows (S, H) of the flattened or packed sequence) as (T, N, H)."""
    out = {}
    for kind, m in masks.items():
        if kind == "recurrent_mask":
            out[kind] = m
        elif batch_sizes is None:
            out[kind] = m.view(steps, batch, -1)
        else:
            out[kind] = pad_packed_sequence(PackedSequence(m, batch_sizes), total_length=steps)[0]
    return out


def reference_layer(cell, x_padded, lengths, states, weights, masks, reverse):
    """genfast.reference's LN layer on each sequence over its own length, with its rows of the padded
    masks: (padded output (T, N, H), [final states (N, H)])."""
    outputs, finals = [], [[] for _ in states]
    for n, length in enumerate(lengths):
        seq_masks = {k: (m[n:n + 1] if k == "recurrent_mask" else m[:length, n:n + 1]) for k, m in masks.items()}
        out, *last = cell.reference(x_padded[:length, n:n + 1], *(s[n:n + 1] for s in states), *weights,
                                    reverse=reverse, **seq_masks)
        outputs.append(out[:, 0])
        for kind, value in enumerate(last):
            finals[kind].append(value)
    padded = torch.nn.utils.rnn.pad_sequence(outputs)
    padded = torch.cat([padded, padded.new_zeros(x_padded.shape[0] - padded.shape[0], *padded.shape[1:])])
    return padded, [torch.cat(f) for f in finals]


def make_masks(cell, kinds, rows, batch, hidden, dtype, seed=5, fractional=True):
    """Op-layout masks: zoneout weights (rows, H), 0/1 or, with ``fractional``, spread over [0, 1] with
    exact 0s and 1s among them (eval passes p: the kernels take any weight); the recurrent mask (N, H)
    of 0 and 1/0.7."""
    gen = torch.Generator().manual_seed(seed)
    masks = {}
    for kind in kinds:
        if kind == "recurrent_mask":
            masks[kind] = (torch.rand(batch, hidden, generator=gen, dtype=torch.float64) > 0.3).double() / 0.7
        else:
            u = torch.rand(rows, hidden, generator=gen, dtype=torch.float64)
            masks[kind] = (torch.where(u < 0.3, 0.0, torch.where(u > 0.7, 1.0, (u - 0.3) / 0.4)) if fractional
                           else (u < 0.5).double())
    return {k: v.to(dtype) for k, v in masks.items()}


def op_layer(cell, x, states, weights, batch_sizes, reverse, masks):
    fn = gnn_ln._ln_ops.layernorm_lstm if cell.states == 2 else gnn_ln._ln_ops.layernorm_gru
    out = fn(x, *states, *weights, batch_sizes, reverse, **masks)
    return out[0], list(out[1:])


# ---------------------------------------------------------------- op level
REGULARIZER_SETS = [("zoneout",), ("cell_zoneout",), ("recurrent_mask",), ("zoneout", "cell_zoneout", "recurrent_mask")]


def _op_params():
    for cell in CELLS:
        for kinds in REGULARIZER_SETS:
            if all(k in KINDS[cell.name] for k in kinds):
                for packed, reverse in ((False, False), (False, True), (True, False), (True, True)):
                    yield pytest.param(cell, kinds, packed, reverse,
                                       id=f"{cell.name}-{'+'.join(kinds)}-{'packed' if packed else 'padded'}"
                                          f"{'-reverse' if reverse else ''}")


@pytest.mark.parametrize("cell, kinds, packed, reverse", list(_op_params()))
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
def test_op_matches_reference(cell, kinds, packed, reverse, dtype):
    """Outputs, final states and every gradient (input, states, weights, biases, LN gains and biases)
    against the reference given the same masks; H = 20 spans a full and a partial panel of 16 units.
    float32 against the reference in float64 on the same values (assert_close_to's bound)."""
    steps, batch, hidden = 6, 5, 20
    x, states, weights, batch_sizes = _op_args(cell, steps, batch, 6, hidden, packed, reverse, True, torch.float64,
                                               seed=7)
    lengths = (torch.linspace(steps, 1, batch).round().long().tolist() if packed else [steps] * batch)
    x_padded = pad_packed_sequence(PackedSequence(x, batch_sizes))[0] if packed else x
    masks = make_masks(cell, kinds, x.shape[0] * (1 if packed else batch), batch, hidden, torch.float64,
                       fractional=dtype == torch.float64)
    results = []
    for side, dt in (("op", dtype), ("reference", torch.float64)):
        xl = (x if side == "op" else x_padded).detach().to(dt).requires_grad_(True)
        sl = [s.detach().to(dt).requires_grad_(True) for s in states]
        wl = [w.detach().to(dt).requires_grad_(True) for w in weights]
        if side == "op":
            out, finals = op_layer(cell, xl, sl, wl, batch_sizes, reverse, {k: m.to(dt) for k, m in masks.items()})
            out_padded = pad_packed_sequence(PackedSequence(out, batch_sizes))[0] if packed else out
        else:
            out_padded, finals = reference_layer(cell, xl, lengths, sl, wl,
                                                 padded_masks(masks, batch_sizes, steps, batch), reverse)
            out = pack_padded_sequence(out_padded, lengths).data if packed else out_padded
        gen = torch.Generator().manual_seed(3)
        loss = sum((t * torch.randn(t.shape, generator=gen, dtype=torch.float64).to(dt)).sum() for t in [out, *finals])
        loss.backward()
        grad_x = pack_padded_sequence(xl.grad, lengths).data if packed and side == "reference" else xl.grad
        results.append(([out.detach(), *[f.detach() for f in finals]],
                        [grad_x, *[s.grad for s in sl], *[w.grad for w in wl]]))
    (outs_o, grads_o), (outs_r, grads_r) = results
    for i, (a, b) in enumerate(zip(outs_o, outs_r)):
        assert_close_to(a, b, dtype, "output" if i == 0 else f"final state {i - 1}")
    names = ["input", *[f"state{i}" for i in range(cell.states)], "w_ih", "w_hh", "b_ih", "b_hh", *cell.ln_names]
    for name, a, b in zip(names, grads_o, grads_r, strict=True):
        assert_close_to(a, b, dtype, f"grad {name}")


@cells
@pytest.mark.parametrize("packed, reverse", [(False, False), (True, True)], ids=["padded", "packed-reverse"])
def test_gradcheck_with_masks(cell, packed, reverse):
    """fp64 gradcheck through the registered autograd with every mask of the cell (fractional
    zoneout weights); H = 18: a partial second panel."""
    x, states, weights, batch_sizes = _op_args(cell, 3, 3, 2, 18, packed, reverse, True, torch.float64, seed=4,
                                               requires_grad=True)
    masks = make_masks(cell, KINDS[cell.name], x.shape[0] * (1 if packed else 3), 3, 18, torch.float64)
    inputs = [x, *states, *weights]

    def fn(x, *rest):
        out, finals = op_layer(cell, x, list(rest[:cell.states]), list(rest[cell.states:]), batch_sizes, reverse,
                               masks)
        return (out, *finals)

    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-7)


@cells
@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
def test_opcheck_with_masks(cell, packed):
    x, states, weights, batch_sizes = _op_args(cell, 3, 3, 2, 5, packed, False, True, torch.float32, seed=1,
                                               requires_grad=True)
    masks = make_masks(cell, KINDS[cell.name], x.shape[0] * (1 if packed else 3), 3, 5, torch.float32)
    mask_args = tuple(masks[k] for k in KINDS[cell.name])
    args = (x, *states, *weights, batch_sizes, False, True) + mask_args
    torch.library.opcheck(cell.forward_op.default, args)
    detached = [a.detach() if isinstance(a, torch.Tensor) else a for a in args]
    result = cell.forward_op(*detached)
    output, finals, workspace = result[0], result[1:-1], result[-1]
    plain = cell.forward_op(*detached[:len(args) - len(mask_args)])
    assert workspace.numel() == plain[-1].numel()  # the masks do not change the workspace's size
    x_d, *rest = detached[:1 + cell.states + 4 + len(cell.ln_names)]
    states_d, (w_ih, w_hh) = rest[:cell.states], rest[cell.states:cell.states + 2]
    ln = rest[cell.states + 4:]
    grads = [torch.randn_like(output), *[torch.randn_like(f) for f in finals]]
    torch.library.opcheck(cell.backward_op.default,
                          (*grads, x_d, *states_d, w_ih, w_hh, *ln, output, workspace, batch_sizes, False) + mask_args)


@cells
def test_mask_errors_name_the_argument(cell):
    x, states, weights, _ = _op_args(cell, 3, 2, 4, 6, False, False, True, torch.float32, seed=0)
    run = lambda **masks: op_layer(cell, x, states, weights, None, False, masks)  # noqa: E731
    with pytest.raises(RuntimeError, match="zoneout: expected shape"):
        run(zoneout=torch.zeros(5, 6))
    with pytest.raises(RuntimeError, match="recurrent_mask: expected shape"):
        run(recurrent_mask=torch.zeros(3, 6))
    with pytest.raises(RuntimeError, match="zoneout: dtype"):
        run(zoneout=torch.zeros(6, 6, dtype=torch.float64))


# ---------------------------------------------------------------- module level
def module_reference(cell, module, x, states, lengths, batch_sizes, recorder):
    """The reference on the module's own parameters (float64 copies) with the masks it drew; x padded
    (T, N, I), states (L*D, N, H), lengths sorted (no permutation)."""
    directions = 2 if module.bidirectional else 1
    draws = iter(recorder.dropout_masks)
    layer_input, finals = x, [[] for _ in states]
    for layer in range(module.num_layers):
        outputs = []
        for d in range(directions):
            index = layer * directions + d
            w_ih, w_hh, *rest = module._layer_weights(index)
            if module.training and module.recurrent_dropout:
                next(draws)  # the recurrent mask: the op's recurrent_mask argument
            if module.training and module.weight_dropout:
                w_hh = w_hh * next(draws).to(w_hh.dtype)
            masks = {k: v.to(x.dtype) for k, v in recorder.calls[index].items()}
            masks = padded_masks(masks, batch_sizes, x.shape[0], x.shape[1])
            out, last = reference_layer(cell, layer_input, lengths, [s[index] for s in states], [w_ih, w_hh, *rest],
                                        masks, d == 1)
            outputs.append(out)
            for kind, value in enumerate(last):
                finals[kind].append(value)
        layer_input = torch.cat(outputs, dim=-1)
    return layer_input, [torch.stack(f) for f in finals]


MODULE_RATES = {"layernorm_lstm": [dict(zoneout=0.3), dict(cell_zoneout=0.4), dict(recurrent_dropout=0.25),
                                   dict(weight_dropout=0.5),
                                   dict(zoneout=0.2, cell_zoneout=0.3, recurrent_dropout=0.3, weight_dropout=0.4)],
                "layernorm_gru": [dict(zoneout=0.3), dict(recurrent_dropout=0.25), dict(weight_dropout=0.5),
                                  dict(zoneout=0.2, recurrent_dropout=0.3, weight_dropout=0.4)]}


def _module_params():
    for cell in CELLS:
        for rates in MODULE_RATES[cell.name]:
            yield pytest.param(cell, rates, id=cell.name + "-" + "+".join(rates))


def _module(cell, rates, dtype=torch.float64, **kwargs):
    torch.manual_seed(0)
    config = dict(num_layers=2, bidirectional=True) | kwargs
    return _randomise(cell.module(5, 18, **config, **rates), seed=6).to(dtype)


def _inputs(cell, dtype, T=6, N=4, I=5, H=18, layers=2, directions=2):
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(T, N, I, generator=gen, dtype=torch.float64).to(dtype)
    states = [0.5 * torch.randn(layers * directions, N, H, generator=gen, dtype=torch.float64).to(dtype)
              for _ in range(cell.states)]
    return x, states


def _hx(cell, states):
    return tuple(states) if cell.states == 2 else states[0]


def _finals(cell, final):
    return list(final) if cell.states == 2 else [final]


@pytest.mark.parametrize("cell, rates", list(_module_params()))
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
def test_module_matches_reference_with_its_masks(cell, rates, training, packed, dtype, monkeypatch):
    """2 layers, bidirectional, H = 18: outputs, final states and every gradient against the reference
    (float64) run with the masks the module drew (training), or with eval's semantics (zoneout's
    expectation, the dropouts off)."""
    module = _module(cell, rates, dtype).train(training)
    x, states = _inputs(cell, dtype)
    lengths = [6, 5, 3, 1] if packed else [6] * 4
    recorder = MaskRecorder(monkeypatch, gnn_ln._ln_ops, ("layernorm_lstm", "layernorm_gru"))
    results = []
    for side in ("genfast", "reference"):
        m = module if side == "genfast" else copy.deepcopy(module).double()
        m.zero_grad(set_to_none=True)
        dt = dtype if side == "genfast" else torch.float64
        xl = x.detach().to(dt).requires_grad_(True)
        sl = [s.detach().to(dt).requires_grad_(True) for s in states]
        if side == "genfast":
            inp = pack_padded_sequence(xl, lengths) if packed else xl
            out, final = m(inp, _hx(cell, sl))
            batch_sizes = inp.batch_sizes if packed else None
            out = pad_packed_sequence(out, total_length=x.shape[0])[0] if packed else out
            finals = _finals(cell, final)
        else:
            out, finals = module_reference(cell, m, xl, sl, lengths, batch_sizes, recorder)
        gen = torch.Generator().manual_seed(2)
        loss = sum((t * torch.randn(t.shape, generator=gen, dtype=torch.float64).to(dt)).sum()
                   for t in [out, *finals])
        loss.backward()
        grads = {"input": xl.grad, **{f"state{i}": s.grad for i, s in enumerate(sl)},
                 **{n: p.grad.clone() for n, p in m.named_parameters()}}
        results.append(([out.detach(), *[f.detach() for f in finals]], grads))
    if not training:
        assert all("recurrent_mask" not in c for c in recorder.calls) and not recorder.dropout_masks
    elif "zoneout" in rates:
        assert all(set(c["zoneout"].unique().tolist()) <= {0.0, 1.0} for c in recorder.calls)
    (outs_g, grads_g), (outs_r, grads_r) = results
    for i, (a, b) in enumerate(zip(outs_g, outs_r)):
        assert_close_to(a, b, dtype, "output" if i == 0 else f"final state {i - 1}")
    assert grads_g.keys() == grads_r.keys()
    for name in grads_g:
        assert_close_to(grads_g[name], grads_r[name], dtype, f"grad {name}")


@cells
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_every_rate_zero_is_the_plain_module(cell, training):
    rates = dict(zoneout=0.0, recurrent_dropout=0.0, weight_dropout=0.0) | (
        dict(cell_zoneout=0.0) if cell.states == 2 else {})
    regularized = _module(cell, rates, torch.float32).train(training)
    plain = _module(cell, {}, torch.float32).train(training)
    x, states = _inputs(cell, torch.float32)
    results = []
    for module in (regularized, plain):
        xl = x.clone().requires_grad_(True)
        out, final = module(xl, _hx(cell, states))
        (out.sum() + sum(f.sum() for f in _finals(cell, final))).backward()
        results.append([out, *_finals(cell, final), xl.grad, *(p.grad for p in module.parameters())])
    for a, b in zip(*results, strict=True):
        assert torch.equal(a, b)


@cells
@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
def test_zoneout_one_keeps_the_initial_state(cell, packed):
    """zoneout = 1 in training: every output is h0 and h_n = h0 (cell_zoneout = 1: c_n = c0), exactly,
    with recurrent dropout on too."""
    rates = dict(zoneout=1.0, recurrent_dropout=0.3) | (dict(cell_zoneout=1.0) if cell.states == 2 else {})
    module = _module(cell, rates, torch.float32, num_layers=1, bidirectional=False).train()
    x, states = _inputs(cell, torch.float32, layers=1, directions=1)
    lengths = [6, 4, 4, 1] if packed else [6] * 4
    out, final = module(pack_padded_sequence(x, lengths) if packed else x, _hx(cell, states))
    out = pad_packed_sequence(out)[0] if packed else out
    for n, length in enumerate(lengths):
        assert torch.equal(out[:length, n], states[0][0, n].expand(length, -1))
    for got, want in zip(_finals(cell, final), states, strict=True):
        assert torch.equal(got, want)
    (out.sum() + sum(f.sum() for f in _finals(cell, final))).backward()
    assert all(torch.isfinite(p.grad).all() for p in module.parameters())


def test_lstm_zoneout_one_without_cell_zoneout_still_updates_c():
    module = _module(LSTM, dict(zoneout=1.0), torch.float32, num_layers=1, bidirectional=False).train()
    x, states = _inputs(LSTM, torch.float32, layers=1, directions=1)
    out, (h, c) = module(x, tuple(states))
    assert torch.equal(h, states[0]) and not torch.equal(c, states[1])


@cells
def test_dropouts_are_off_in_eval(cell):
    regularized = _module(cell, dict(recurrent_dropout=0.5, weight_dropout=0.5), torch.float32).eval()
    plain = _module(cell, {}, torch.float32).eval()
    x, states = _inputs(cell, torch.float32)
    (out_r, final_r), (out_p, final_p) = (m(x, _hx(cell, states)) for m in (regularized, plain))
    assert torch.equal(out_r, out_p)
    assert all(torch.equal(a, b) for a, b in zip(_finals(cell, final_r), _finals(cell, final_p)))


@pytest.mark.parametrize("cell, rates", list(_module_params()))
def test_manual_seed_reproduces_a_run(cell, rates):
    module = _module(cell, rates, torch.float32).train()
    x, states = _inputs(cell, torch.float32)

    def run(seed):
        torch.manual_seed(seed)
        module.zero_grad(set_to_none=True)
        out, final = module(x, _hx(cell, states))
        (out.sum() + sum(f.sum() for f in _finals(cell, final))).backward()
        return [out.detach(), *[p.grad.clone() for p in module.parameters()]]

    first, again, other = run(3), run(3), run(4)
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    assert not torch.equal(first[0], other[0])


@cells
def test_torch_compile_fullgraph(cell):
    """Captured whole with the regularisers on: eval (zoneout's expectation) matches eager; a training
    step with every regulariser runs forward and backward, and with the same seed gives eager's
    output and gradients (the masks come from the same generator draws)."""
    rates = dict(zoneout=0.3, recurrent_dropout=0.2, weight_dropout=0.3) | (
        dict(cell_zoneout=0.2) if cell.states == 2 else {})
    module = _module(cell, rates, torch.float32).eval()
    x, states = _inputs(cell, torch.float32)
    compiled = torch.compile(module, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(x, _hx(cell, states))[0], module(x, _hx(cell, states))[0])
    module.train()
    results = []
    for fn in (module, torch.compile(module, fullgraph=True, backend="aot_eager")):
        torch.manual_seed(11)
        xl = x.clone().requires_grad_(True)
        out, final = fn(xl, _hx(cell, states))
        value = out.pow(2).sum() + sum(f.sum() for f in _finals(cell, final))
        results.append([value.detach(), *torch.autograd.grad(value, [xl, *module.parameters()])])
    for got, expected in zip(results[1], results[0], strict=True):
        torch.testing.assert_close(got, expected)


def test_module_argument_errors_and_repr():
    with pytest.raises(ValueError, match="zoneout must be a number in \\[0, 1\\]"):
        gnn.LayerNormLSTM(4, 8, zoneout=1.5)
    with pytest.raises(ValueError, match="recurrent_dropout"):
        gnn.LayerNormGRU(4, 8, recurrent_dropout=-0.1)
    with pytest.raises(TypeError):
        gnn.LayerNormGRU(4, 8, cell_zoneout=0.1)
    assert "zoneout=0.2" in repr(gnn.LayerNormGRU(4, 8, zoneout=0.2))
    assert "cell_zoneout=0.1" in repr(gnn.LayerNormLSTM(4, 8, cell_zoneout=0.1, forget_bias=1.0))


@cells
def test_bfloat16_runs_in_float32(cell):
    """The reduced-precision path converts the masks with the rest (zoneout 1 still keeps h0 exactly)."""
    module = _module(cell, dict(zoneout=1.0, recurrent_dropout=0.3), torch.bfloat16, num_layers=1,
                     bidirectional=False).train()
    x, states = _inputs(cell, torch.bfloat16, layers=1, directions=1)
    out, _ = module(x, _hx(cell, states))
    assert out.dtype == torch.bfloat16 and torch.equal(out, states[0].expand_as(out))


@cells
def test_same_results_for_any_thread_count_with_masks(cell):
    """As test_rnn_layernorm's thread-count test: outputs, states and input/state gradients are
    bit-identical for 1 and 2 threads with every mask given."""
    x, states, weights, batch_sizes = _op_args(cell, 5, 16, 8, 40, True, True, True, torch.float32, seed=9)
    masks = make_masks(cell, KINDS[cell.name], x.shape[0], 16, 40, torch.float32)
    threads = torch.get_num_threads()
    results = []
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            xl = x.clone().requires_grad_(True)
            sl = [s.clone().requires_grad_(True) for s in states]
            out, finals = op_layer(cell, xl, sl, weights, batch_sizes, True, masks)
            (out.pow(2).sum() + sum(f.pow(2).sum() for f in finals)).backward()
            results.append([out.detach(), *[f.detach() for f in finals], xl.grad, *[s.grad for s in sl]])
    finally:
        torch.set_num_threads(threads)
    for a, b in zip(*results, strict=True):
        assert torch.equal(a, b)
