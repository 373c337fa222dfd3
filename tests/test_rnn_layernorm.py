"""genfast.nn.LayerNormLSTM / LayerNormGRU and the genfast::layernorm_{lstm,gru}_* ops (issue 19)
against the textbook equations of genfast.reference (layernorm_lstm_layer, layernorm_gru_layer).

torch.nn has no such layers, so the oracle is the reference run on the module's own parameters:
outputs, final states and every gradient (input, initial states, each parameter, the LN gains and
biases included), with the gains and biases moved away from their initial values so that a kernel
which ignored them would fail. Plus fp64 gradcheck of the ops, opcheck, torch.compile(fullgraph),
thread-count invariance, parameter names and initialisation, and the errors.

Kept apart from tests/rnn_cells.py, whose table pairs each cell with a torch.nn counterpart.
"""
from __future__ import annotations

import copy
import dataclasses
import os
import pathlib
import subprocess
import sys
from typing import Callable

import pytest
import torch
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence, pad_packed_sequence

import genfast.nn as gnn
from genfast import _extension, reference
from genfast.ops import layernorm_rnn as ln_ops

_ops = torch.ops.genfast


@dataclasses.dataclass(frozen=True)
class LnCell:
    name: str
    module: type
    reference: Callable
    gates: int
    states: int                  # 2: (h, c); 1: h
    ln_names: tuple[str, ...]    # the LN parameters of one layer and direction, in the op's order
    forward_op: object
    backward_op: object

    def layer(self, x, states, weights, batch_sizes=None, reverse=False):
        fn = ln_ops.layernorm_lstm if self.states == 2 else ln_ops.layernorm_gru
        out = fn(x, *states, *weights, batch_sizes, reverse)
        return out[0], list(out[1:])


LSTM = LnCell("layernorm_lstm", gnn.LayerNormLSTM, reference.layernorm_lstm_layer, 4, 2,
              ("ln_ih_weight", "ln_hh_weight", "ln_cell_weight", "ln_cell_bias"),
              _ops.layernorm_lstm_forward, _ops.layernorm_lstm_backward)
GRU = LnCell("layernorm_gru", gnn.LayerNormGRU, reference.layernorm_gru_layer, 3, 1,
             ("ln_ih_weight", "ln_hh_weight"), _ops.layernorm_gru_forward, _ops.layernorm_gru_backward)
CELLS = [LSTM, GRU]
cells = pytest.mark.parametrize("cell", CELLS, ids=lambda c: c.name)


# float64: both sides compute the same equations in different orders (~1e-15 relative): assert_close.
# float32: the oracle is the reference in float64 on the same (float32-valued) parameters and inputs,
# so what is measured is genfast's own rounding. Each tensor's largest error must stay below
# FLOAT32_BOUND times its largest magnitude: float32's unit roundoff is 6e-8, and through <= 8 steps,
# 2 layers, sums over K <= 40 and each LN's rstd (up to ~3 here) the errors seen are up to 2e-5 of the
# largest gradient (a float32 reference itself is off by about half that); 1e-4 leaves 5x headroom.
# Elementwise rtol would not do: a gradient is a sum of O(10) terms, and its small elements carry the
# absolute error of the large ones.
FLOAT64_TOLERANCE = dict(atol=1e-9, rtol=1e-7)
FLOAT32_BOUND = 1e-4


def assert_close_to(got, want, dtype, what):
    if dtype == torch.float64:
        torch.testing.assert_close(got, want, **FLOAT64_TOLERANCE, msg=lambda m: f"{what}: " + m)
        return
    assert got.dtype == dtype and got.shape == want.shape, what
    error = (got.double() - want).abs().max().item()
    bound = FLOAT32_BOUND * max(want.abs().max().item(), 1e-2)
    assert error <= bound, f"{what}: error {error:.3g} > {FLOAT32_BOUND} * max|value| = {bound:.3g}"


def _randomise(module, seed):
    """Every parameter random; the LN gains around 1 (in [0.5, 1.5]) and biases around 0, far enough
    from 1 / 0 that ignoring one changes every result."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            noise = torch.rand(p.shape, generator=gen, dtype=torch.float64) * 2 - 1
            if name.startswith("ln_") and "weight" in name:
                p.copy_(1 + 0.5 * noise)
            elif name.startswith("ln_"):
                p.copy_(0.5 * noise)
            else:
                p.copy_(noise * module.hidden_size ** -0.5)
    return module


def reference_module(cell, module, x, states, lengths):
    """genfast.reference over the module's own parameters: x padded (T, N, I), states each
    (L*D, N, H); every sequence over its own length. Returns (padded output, [final states])."""
    directions = 2 if module.bidirectional else 1
    layer_input, finals = x, [[] for _ in states]
    for layer in range(module.num_layers):
        outputs = []
        for d in range(directions):
            index = layer * directions + d
            weights = module._layer_weights(index)
            out, last = reference.layer_over_lengths(cell.reference, layer_input, lengths,
                                                     [s[index] for s in states], *weights, reverse=d == 1)
            outputs.append(out)
            for kind, value in enumerate(last):
                finals[kind].append(value)
        layer_input = torch.cat(outputs, dim=-1)
    return layer_input, [torch.stack(f) for f in finals]


def run_and_grad(cell, module, x, states, lengths, packed, fused):
    """Forward + backward of a weighted-sum loss: (padded output, [finals], {name: grad})."""
    module.zero_grad(set_to_none=True)
    x = x.detach().clone().requires_grad_(True)
    states = [s.detach().clone().requires_grad_(True) for s in states]
    if fused:
        inp = pack_padded_sequence(x, lengths, enforce_sorted=False) if packed else x
        hx = tuple(states) if cell.states == 2 else states[0]
        out, final = module(inp, hx)
        if packed:
            out = pad_packed_sequence(out, total_length=x.shape[0])[0]
        finals = list(final) if cell.states == 2 else [final]
    else:
        out, finals = reference_module(cell, module, x, states, lengths)
    gen = torch.Generator().manual_seed(99)
    weight = lambda t: torch.randn(t.shape, generator=gen, dtype=torch.float64).to(t.dtype)  # noqa: E731
    loss = (out * weight(out)).sum() + sum((f * weight(f)).sum() for f in finals)
    loss.backward()
    grads = {name: p.grad.clone() for name, p in module.named_parameters()}
    grads["input"] = x.grad
    for i, s in enumerate(states):
        grads[f"state{i}"] = s.grad
    return out.detach(), [f.detach() for f in finals], grads


def assert_matches_reference(cell, module, x, states, lengths, packed, dtype):
    """genfast (in the module's dtype) against the reference in float64 on the same parameters."""
    got = run_and_grad(cell, module, x, states, lengths, packed, fused=True)
    oracle = copy.deepcopy(module).double()
    want = run_and_grad(cell, oracle, x.double(), [s.double() for s in states], lengths, packed, fused=False)
    assert_close_to(got[0], want[0], dtype, "output")
    for i, (a, b) in enumerate(zip(got[1], want[1])):
        assert_close_to(a, b, dtype, f"final state {i}")
    assert got[2].keys() == want[2].keys()
    for name in want[2]:
        assert_close_to(got[2][name], want[2][name], dtype, f"grad {name}")


# (steps, batch, input_size, hidden, layers, bidirectional, packed, bias): H below, at and above a
# panel of 16 units and not a multiple of it; one sequence; packed lengths that drop out.
SHAPES = [
    (5, 3, 4, 7, 1, False, False, True),
    (4, 2, 3, 16, 2, True, False, True),
    (6, 4, 5, 20, 1, True, True, True),
    (3, 1, 2, 33, 2, False, False, False),
    (7, 5, 6, 9, 2, True, True, True),
    (2, 3, 3, 5, 1, False, True, False),
]


@cells
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "T{}N{}I{}H{}L{}{}{}{}".format(
    *s[:5], "bi" if s[5] else "", "packed" if s[6] else "", "" if s[7] else "nobias"))
def test_module_matches_reference(cell, dtype, shape):
    steps, batch, input_size, hidden, layers, bidirectional, packed, bias = shape
    torch.manual_seed(0)
    module = _randomise(cell.module(input_size, hidden, layers, bias=bias, bidirectional=bidirectional).to(dtype),
                        seed=hidden)
    gen = torch.Generator().manual_seed(steps * 31 + batch)
    x = torch.randn(steps, batch, input_size, generator=gen, dtype=torch.float64).to(dtype)
    states = [torch.randn(layers * (2 if bidirectional else 1), batch, hidden, generator=gen,
                          dtype=torch.float64).to(dtype) * 0.5 for _ in range(cell.states)]
    if packed:  # distinct lengths, not sorted: the module sorts and unsorts
        lengths = torch.randperm(steps, generator=gen)[:batch].add(1).tolist() if batch <= steps else [steps] * batch
        lengths[0] = steps
    else:
        lengths = [steps] * batch
    assert_matches_reference(cell, module, x, states, lengths, packed, dtype)


@cells
def test_fuzzed_shapes_match_reference(cell):
    """Random shapes, float32: padded or packed, 1-2 layers, either direction count."""
    gen = torch.Generator().manual_seed(2026)
    for trial in range(6):
        steps, batch = int(torch.randint(1, 9, (1,), generator=gen)), int(torch.randint(1, 7, (1,), generator=gen))
        input_size, hidden = int(torch.randint(1, 12, (1,), generator=gen)), int(torch.randint(1, 40, (1,),
                                                                                              generator=gen))
        layers, bidirectional = int(torch.randint(1, 3, (1,), generator=gen)), bool(trial % 2)
        packed = trial % 3 == 1
        module = _randomise(cell.module(input_size, hidden, layers, bidirectional=bidirectional), seed=trial)
        x = torch.randn(steps, batch, input_size, generator=gen)
        states = [torch.randn(layers * (2 if bidirectional else 1), batch, hidden, generator=gen) * 0.5
                  for _ in range(cell.states)]
        lengths = (torch.randint(1, steps + 1, (batch,), generator=gen).tolist() if packed else [steps] * batch)
        lengths[0] = steps
        assert_matches_reference(cell, module, x, states, lengths, packed, torch.float32)


@cells
def test_batch_first_and_default_states(cell):
    torch.manual_seed(3)
    module = _randomise(cell.module(5, 12, 2, batch_first=True, bidirectional=True), seed=3)
    x = torch.randn(4, 6, 5)  # (N, T, I)
    out, final = module(x)
    zeros = [torch.zeros(4, 4, 12, dtype=torch.float64) for _ in range(cell.states)]
    want_out, want_finals = reference_module(cell, copy.deepcopy(module).double(), x.double().transpose(0, 1),
                                             zeros, [6] * 4)
    assert_close_to(out, want_out.transpose(0, 1), torch.float32, "output")
    finals = list(final) if cell.states == 2 else [final]
    for a, b in zip(finals, want_finals):
        assert_close_to(a, b, torch.float32, "final state")


@cells
def test_unbatched_input(cell):
    module = _randomise(cell.module(3, 8), seed=5)
    x = torch.randn(4, 3)
    out, final = module(x)
    out_b, final_b = module(x.unsqueeze(1))
    torch.testing.assert_close(out, out_b.squeeze(1), rtol=0, atol=0)
    assert out.shape == (4, 8)


@cells
def test_inference_equals_training_forward(cell):
    """train=False (no workspace, scratch buffers) computes the same as train=True."""
    module = _randomise(cell.module(6, 20, 2, bidirectional=True), seed=6)
    x = torch.randn(5, 3, 6)
    with torch.no_grad():
        out_eval, _ = module(x)
    out_train, _ = module(x.requires_grad_(True))
    assert torch.equal(out_eval, out_train.detach())


# ---------------------------------------------------------------- op level
def _op_args(cell, steps, batch, input_size, hidden, packed, reverse, bias, dtype, seed, requires_grad=False):
    gen = torch.Generator().manual_seed(seed)
    rand = lambda *shape, scale=1.0: ((torch.rand(*shape, generator=gen, dtype=torch.float64) * 2 - 1)  # noqa: E731
                                      * scale).to(dtype).requires_grad_(requires_grad)
    s = hidden ** -0.5
    G = cell.gates
    x_padded = (torch.rand(steps, batch, input_size, generator=gen, dtype=torch.float64) * 2 - 1).to(dtype)
    if packed:
        lengths = torch.linspace(steps, 1, batch).round().long().tolist() if batch > 1 else [steps]
        p = pack_padded_sequence(x_padded, lengths)
        x, batch_sizes = p.data, p.batch_sizes
    else:
        x, batch_sizes = x_padded, None
    x = x.clone().requires_grad_(requires_grad)
    states = [rand(batch, hidden, scale=0.5) for _ in range(cell.states)]
    weights = [rand(G * hidden, input_size, scale=s), rand(G * hidden, hidden, scale=s),
               rand(G * hidden, scale=s) if bias else None, rand(G * hidden, scale=s) if bias else None]
    ln = [(1 + rand(G * hidden, scale=0.5).detach()).requires_grad_(requires_grad),
          (1 + rand(G * hidden, scale=0.5).detach()).requires_grad_(requires_grad)]
    if cell.states == 2:
        ln += [(1 + rand(hidden, scale=0.5).detach()).requires_grad_(requires_grad), rand(hidden, scale=0.5)]
    return x, states, weights + ln, batch_sizes


GRADCHECK_CASES = [  # (steps, batch, input_size, hidden, packed, reverse, bias)
    (3, 2, 3, 5, False, False, True),
    (3, 3, 2, 18, True, True, True),
    (2, 1, 2, 4, False, True, False),
    (4, 3, 2, 3, True, False, True),
]


@cells
@pytest.mark.parametrize("case", GRADCHECK_CASES, ids=str)
def test_gradcheck(cell, case):
    steps, batch, input_size, hidden, packed, reverse, bias = case
    x, states, weights, batch_sizes = _op_args(cell, steps, batch, input_size, hidden, packed, reverse, bias,
                                               torch.float64, seed=hidden, requires_grad=True)
    inputs = [x, *states, *[w for w in weights if w is not None]]
    present = [w is not None for w in weights]

    def fn(x, *rest):
        states, rest = list(rest[:cell.states]), iter(rest[cell.states:])
        ws = [next(rest) if here else None for here in present]
        out, finals = cell.layer(x, states, ws, batch_sizes, reverse)
        return (out, *finals)

    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-7)


@cells
@pytest.mark.parametrize("packed,reverse,train", [(False, False, True), (True, True, True), (False, False, False)])
def test_opcheck(cell, packed, reverse, train):
    x, states, weights, batch_sizes = _op_args(cell, 3, 3, 2, 5, packed, reverse, True, torch.float32, seed=1,
                                               requires_grad=train)
    if cell.states == 2:
        w_ih, w_hh, b_ih, b_hh, *ln = weights
        args = (x, *states, w_ih, w_hh, b_ih, b_hh, *ln, batch_sizes, reverse, train)
    else:
        args = (x, *states, *weights, batch_sizes, reverse, train)
    torch.library.opcheck(cell.forward_op.default, args)
    if not train:
        return
    detached = [a.detach() if isinstance(a, torch.Tensor) else a for a in args]
    result = cell.forward_op(*detached)
    output, finals, workspace = result[0], result[1:-1], result[-1]
    x, *rest = detached
    states_d = rest[:cell.states]
    w_ih, w_hh = rest[cell.states], rest[cell.states + 1]
    ln = rest[cell.states + 4:cell.states + 4 + len(cell.ln_names)]
    grads = [torch.randn_like(output), *[torch.randn_like(f) for f in finals]]
    torch.library.opcheck(cell.backward_op.default,
                          (*grads, x, *states_d, w_ih, w_hh, *ln, output, workspace, batch_sizes, reverse))


@cells
def test_torch_compile_fullgraph(cell):
    torch.manual_seed(8)

    class Model(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.rnn = _randomise(cell.module(6, 8, 2, batch_first=True, bidirectional=True), seed=8)
            self.head = torch.nn.Linear(16, 1)

        def forward(self, x):
            out, hx = self.rnn(x)
            states = list(hx) if cell.states == 2 else [hx]
            return self.head(out[:, -1]).sum() + sum(s.pow(2).sum() for s in states)

    model = Model()
    x = torch.randn(3, 5, 6)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    results = []
    for fn in (model, compiled):
        leaf = x.clone().requires_grad_(True)
        value = fn(leaf)
        results.append([value.detach(), *torch.autograd.grad(value, [leaf, *model.parameters()])])
    for got, expected in zip(results[1], results[0]):
        torch.testing.assert_close(got, expected)


@cells
def test_same_results_for_any_thread_count(cell):
    """Each element of a step is computed by one thread in a fixed order whatever the split, so the
    output, states and input/state gradients are bit-identical; the weight and LN gradients are
    reductions over all rows whose order may follow the thread count (float32 rounding)."""
    module = _randomise(cell.module(40, 48, 1), seed=11)
    x = torch.randn(6, 9, 40)
    states = [torch.randn(1, 9, 48) * 0.5 for _ in range(cell.states)]
    previous = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        expected = run_and_grad(cell, module, x, states, [6] * 9, False, fused=True)
        for threads in (2, 3):
            torch.set_num_threads(threads)
            got = run_and_grad(cell, module, x, states, [6] * 9, False, fused=True)
            assert torch.equal(got[0], expected[0]), f"output differs with {threads} threads"
            for a, b in zip(got[1], expected[1]):
                assert torch.equal(a, b), f"final state differs with {threads} threads"
            for name, grad in got[2].items():
                if name == "input" or name.startswith("state"):
                    assert torch.equal(grad, expected[2][name]), f"grad {name} differs with {threads} threads"
                else:
                    torch.testing.assert_close(grad, expected[2][name], atol=1e-5, rtol=1e-5)
    finally:
        torch.set_num_threads(previous)


# ---------------------------------------------------------------- parameters and errors
def test_parameter_names_and_initialisation():
    lstm = gnn.LayerNormLSTM(3, 4, num_layers=2, bidirectional=True, forget_bias=1.0)
    names = [n for n, _ in lstm.named_parameters()]
    reference_names = [n for n, _ in torch.nn.LSTM(3, 4, num_layers=2, bidirectional=True).named_parameters()]
    assert names[:len(reference_names)] == reference_names
    ln = names[len(reference_names):]
    assert ln == [f"{p}_l{k}{s}" for k in range(2) for s in ("", "_reverse")
                  for p in ("ln_ih_weight", "ln_hh_weight", "ln_cell_weight", "ln_cell_bias")]
    assert lstm.ln_ih_weight_l1_reverse.shape == (16,) and lstm.ln_cell_bias_l0.shape == (4,)
    for name in ln:
        value = getattr(lstm, name)
        assert torch.equal(value, torch.full_like(value, 0.0 if "bias" in name else 1.0)), name
    # forget_bias: added to the f slice of bias_ih, which torch's init draws from U(-1/sqrt(H), 1/sqrt(H)).
    for name in ("bias_ih_l0", "bias_ih_l1_reverse"):
        b = getattr(lstm, name)
        assert (b[4:8] >= 0.5).all() and (b[:4].abs() <= 0.5).all() and (b[8:].abs() <= 0.5).all(), name
    assert (lstm.bias_hh_l0.abs() <= 0.5).all()

    gru = gnn.LayerNormGRU(3, 4, num_layers=1)
    assert [n for n, _ in gru.named_parameters()] == ["weight_ih_l0", "weight_hh_l0", "bias_ih_l0", "bias_hh_l0",
                                                      "ln_ih_weight_l0", "ln_hh_weight_l0"]
    assert gru.ln_hh_weight_l0.shape == (12,)
    state = gru.state_dict()
    copy = gnn.LayerNormGRU(3, 4)
    copy.load_state_dict(state)
    assert torch.equal(copy.weight_hh_l0, gru.weight_hh_l0)


def test_forget_bias_needs_a_bias():
    with pytest.raises(ValueError, match="forget_bias"):
        gnn.LayerNormLSTM(3, 4, bias=False, forget_bias=1.0)


@cells
def test_errors_name_the_argument(cell):
    x, states, weights, batch_sizes = _op_args(cell, 2, 2, 3, 4, False, False, True, torch.float32, seed=0)
    bad = list(weights)
    bad[4] = torch.ones(5)  # ln_ih_weight of the wrong size
    with pytest.raises(RuntimeError, match="ln_ih_weight"):
        cell.layer(x, states, bad)
    bad = list(weights)
    bad[5] = bad[5].double()
    with pytest.raises(RuntimeError, match="ln_hh_weight"):
        cell.layer(x, states, bad)
    module = cell.module(3, 4)
    with pytest.raises(ValueError, match="empty batch"):
        module(torch.randn(2, 0, 3))


@cells
def test_other_devices_are_a_clear_not_implemented(cell):
    """CPU and CUDA have kernels (tests/test_rnn_layernorm_cuda.py); another device is named in the error."""
    x, states, weights, batch_sizes = _op_args(cell, 2, 2, 3, 4, False, False, True, torch.float32, seed=0)
    meta = lambda t: None if t is None else t.to("meta")  # noqa: E731
    with pytest.raises(NotImplementedError, match="meta"):
        cell.layer(meta(x), [meta(s) for s in states], [meta(w) for w in weights])


@cells
def test_bfloat16_runs_in_float32(cell):
    """bfloat16 on the CPU runs in float32 and rounds the result once: against a float32 copy of the
    same (rounded) weights and input, the output is off by at most that rounding (2u of its largest
    magnitude, u = 2^-8, with room for float32's own error)."""
    module = _randomise(cell.module(4, 6), seed=2).bfloat16()
    x = torch.randn(3, 2, 4).bfloat16()
    got, _ = module(x)
    want, _ = copy.deepcopy(module).float()(x.float())
    assert got.dtype == torch.bfloat16
    error = (got.float() - want).abs().max().item()
    assert error <= 2 * 2.0 ** -8 * want.abs().max().item()


@pytest.mark.parametrize("level", ["baseline", "avx2"])
def test_every_simd_level(level):
    """The comparisons with the reference (every dtype and shape, fuzzed, packed, two layers) and the
    thread-count check, in a process capped at each other SIMD level: the LN tiles and the input side's
    row passes have a copy per level, and the rest of this file runs only this process's."""
    if level == _extension.load().simd_level():
        pytest.skip(f"{level} is this process's SIMD level: the rest of this file runs it")
    env = dict(os.environ, GENFAST_SIMD=level)
    root = pathlib.Path(__file__).resolve().parents[1]
    done = subprocess.run([sys.executable, "-m", "pytest", __file__, "-q", "-x", "-p", "no:cacheprovider", "-k",
                           "module_matches_reference or fuzzed or thread_count"], cwd=root, env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert " passed" in done.stdout
