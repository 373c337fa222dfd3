"""The recurrent cells under test, one table entry each, and the machinery that runs genfast
and its oracle (torch.nn, or genfast.reference at op level) on the same weights and inputs and
compares outputs, final states and every gradient.

Adding a cell to the tests means adding one ``Cell`` to ``CELLS``: its modules, its torch.nn
counterparts, its reference equations, its states and weights, and the adapters that put the
uniform arguments below into its op's schema. The tests in test_rnn.py are parameterised over it.

Uniform op-level arguments: ``states`` is a list of tensors in the cell's ``states`` order, ``w``
a dict over the cell's ``weights`` names (None where absent: no bias, no projection).
"""
from __future__ import annotations

import dataclasses
from typing import Callable

import torch
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence, pad_packed_sequence

import genfast.nn as gnn
from genfast import ops, reference

_ops = torch.ops.genfast


@dataclasses.dataclass(frozen=True)
class Cell:
    name: str
    module: type                 # genfast.nn layer, a drop-in for torch_module
    cell_module: type            # genfast.nn single-step cell, a drop-in for torch_cell
    torch_module: type
    torch_cell: type
    gates: int                   # rows of w_ih per hidden unit
    states: tuple[str, ...]      # op-level names of the recurrent states, the hidden state first
    weights: tuple[str, ...]     # op-level names of one layer's weights
    reference: Callable          # genfast.reference equations of one layer, one direction
    layer: Callable              # genfast.ops wrapper of one layer: (x, states, w, batch_sizes, reverse) -> (output, [states])
    forward_op: object           # torch.ops.genfast.<cell>_forward
    backward_op: object
    forward_args: Callable       # (x, states, w, batch_sizes, reverse, train) -> forward_op's arguments
    split_forward: Callable      # forward_op's result -> (output, [final states], workspace)
    backward_args: Callable      # (grad_out, grad_states, x, states, w, output, workspace, batch_sizes, reverse)
    split_backward: Callable     # backward_op's result -> {"input" | state | weight name: gradient}

    @property
    def has_cell_state(self) -> bool:
        return len(self.states) > 1

    @property
    def projection(self) -> bool:
        """Takes proj_size (an output projection w_hr)."""
        return "w_hr" in self.weights

    def state_sizes(self, hidden: int, proj: int = 0) -> list[int]:
        """Width of each state: the hidden state is proj_size wide when projecting, the others hidden."""
        return [proj or hidden] + [hidden] * (len(self.states) - 1)

    def module_states(self, states: list):
        """The hx argument of the module: a tuple (h, c) for a cell with a cell state, else h alone."""
        return tuple(states) if self.has_cell_state else states[0]

    def as_list(self, hx) -> list:
        return list(hx) if self.has_cell_state else [hx]


def _output_and_states(result):
    return result[0], list(result[1:])


LSTM = Cell(
    name="lstm", module=gnn.LSTM, cell_module=gnn.LSTMCell, torch_module=torch.nn.LSTM, torch_cell=torch.nn.LSTMCell,
    gates=4, states=("hx", "cx"), weights=("w_ih", "w_hh", "b_ih", "b_hh", "w_hr"),
    reference=reference.lstm_layer,
    layer=lambda x, s, w, batch_sizes=None, reverse=False: _output_and_states(ops.lstm(
        x, *s, w["w_ih"], w["w_hh"], w["b_ih"], w["b_hh"], w["w_hr"], batch_sizes=batch_sizes, reverse=reverse)),
    forward_op=_ops.lstm_forward, backward_op=_ops.lstm_backward,
    forward_args=lambda x, s, w, batch_sizes, reverse, train: (
        x, *s, w["w_ih"], w["w_hh"], w["b_ih"], w["b_hh"], w["w_hr"], batch_sizes, reverse, train),
    split_forward=lambda r: (r[0], [r[1], r[2]], r[3]),
    backward_args=lambda g_out, g_states, x, s, w, out, ws, batch_sizes, reverse: (
        g_out, *g_states, x, *s, w["w_ih"], w["w_hh"], w["w_hr"], out, ws, batch_sizes, reverse),
    # One bias gradient serves b_ih and b_hh (they enter the gates as a sum); w_hr's is empty without projection.
    split_backward=lambda r: dict(input=r[0], hx=r[1], cx=r[2], w_ih=r[3], w_hh=r[4], b_ih=r[5], b_hh=r[5], w_hr=r[6]),
)

GRU = Cell(
    name="gru", module=gnn.GRU, cell_module=gnn.GRUCell, torch_module=torch.nn.GRU, torch_cell=torch.nn.GRUCell,
    gates=3, states=("hx",), weights=("w_ih", "w_hh", "b_ih", "b_hh"),
    reference=reference.gru_layer,
    layer=lambda x, s, w, batch_sizes=None, reverse=False: _output_and_states(ops.gru(
        x, *s, w["w_ih"], w["w_hh"], w["b_ih"], w["b_hh"], batch_sizes=batch_sizes, reverse=reverse)),
    forward_op=_ops.gru_forward, backward_op=_ops.gru_backward,
    forward_args=lambda x, s, w, batch_sizes, reverse, train: (
        x, *s, w["w_ih"], w["w_hh"], w["b_ih"], w["b_hh"], batch_sizes, reverse, train),
    split_forward=lambda r: (r[0], [r[1]], r[2]),
    backward_args=lambda g_out, g_states, x, s, w, out, ws, batch_sizes, reverse: (
        g_out, *g_states, x, *s, w["w_ih"], w["w_hh"], out, ws, batch_sizes, reverse),
    split_backward=lambda r: dict(input=r[0], hx=r[1], w_ih=r[2], w_hh=r[3], b_ih=r[4], b_hh=r[5]),
)



# The GRU with the reset gate before the recurrent product (genfast.nn.GRU(reset_after=False)). torch.nn has
# no such module, so its oracle is genfast.reference's equations (gru_reset_before_layer / _cell) behind
# genfast.nn's argument handling (PackedSequence, batch_first, layers, directions), which the plain GRU's
# tests check against torch.nn. Both are initialised as torch.nn.GRU / GRUCell are.
class GRUResetBefore(gnn.GRU):
    def __init__(self, *args, reset_after: bool = False, **kwargs):
        super().__init__(*args, reset_after=reset_after, **kwargs)


class GRUCellResetBefore(gnn.GRUCell):
    def __init__(self, *args, reset_after: bool = False, **kwargs):
        super().__init__(*args, reset_after=reset_after, **kwargs)


class ReferenceGRUResetBefore(GRUResetBefore):
    """genfast.reference.gru_reset_before_layer per layer and direction (per sequence when packed)."""

    def _layer(self, input, states, weights, batch_sizes, reverse):
        w_ih, w_hh, b_ih, b_hh, _ = weights
        if batch_sizes is None:
            return reference.gru_reset_before_layer(input, states[0], w_ih, w_hh, b_ih, b_hh, reverse=reverse)
        padded, lengths = pad_packed_sequence(PackedSequence(input, batch_sizes))
        lengths = lengths.tolist()
        output, (h,) = reference.layer_over_lengths(reference.gru_reset_before_layer, padded, lengths, [states[0]],
                                                    w_ih, w_hh, b_ih, b_hh, reverse=reverse)
        return pack_padded_sequence(output, lengths).data, h


class ReferenceGRUCellResetBefore(torch.nn.GRUCell):
    """genfast.reference.gru_reset_before_cell on torch.nn.GRUCell's parameters and arguments."""

    reset_after = False

    def forward(self, input, hx=None):
        batched = input.dim() == 2
        x = input if batched else input.unsqueeze(0)
        h = x.new_zeros(x.shape[0], self.hidden_size) if hx is None else (hx if batched else hx.unsqueeze(0))
        h = reference.gru_reset_before_cell(x, h, self.weight_ih, self.weight_hh, self.bias_ih, self.bias_hh)
        return h if batched else h.squeeze(0)


GRU_RESET_BEFORE = Cell(
    name="gru_reset_before", module=GRUResetBefore, cell_module=GRUCellResetBefore,
    torch_module=ReferenceGRUResetBefore, torch_cell=ReferenceGRUCellResetBefore,
    gates=3, states=("hx",), weights=("w_ih", "w_hh", "b_ih", "b_hh"),
    reference=reference.gru_reset_before_layer,
    layer=lambda x, s, w, batch_sizes=None, reverse=False: _output_and_states(ops.gru_reset_before(
        x, *s, w["w_ih"], w["w_hh"], w["b_ih"], w["b_hh"], batch_sizes=batch_sizes, reverse=reverse)),
    forward_op=_ops.gru_reset_before_forward, backward_op=_ops.gru_reset_before_backward,
    forward_args=lambda x, s, w, batch_sizes, reverse, train: (
        x, *s, w["w_ih"], w["w_hh"], w["b_ih"], w["b_hh"], batch_sizes, reverse, train),
    split_forward=lambda r: (r[0], [r[1]], r[2]),
    backward_args=lambda g_out, g_states, x, s, w, out, ws, batch_sizes, reverse: (
        g_out, *g_states, x, *s, w["w_ih"], w["w_hh"], out, ws, batch_sizes, reverse),
    # One bias gradient serves b_ih and b_hh: every gate's pre-activation is their sum plus the products.
    split_backward=lambda r: dict(input=r[0], hx=r[1], w_ih=r[2], w_hh=r[3], b_ih=r[4], b_hh=r[4]),
)

CELLS = [LSTM, GRU, GRU_RESET_BEFORE]


# ---------------------------------------------------------------- tolerances
# float64: both sides compute the same equations with different summation orders; errors are
# ~1e-15 relative, so 1e-9 leaves room for long recurrences.
# float32: GEMM summation order differs (ours: sequential over K; oneDNN/MKL/cuDNN: blocked), and
# genfast's exp/tanh are polynomial approximations within 2 ulp, so each step adds a few ulp of
# relative error; over <= 12 steps and K <= 64 gradients stay within 2e-5 absolute / 1e-4
# relative for O(1) values (~170 ulp). Looser only where noted.
TOLERANCES = {torch.float64: dict(atol=1e-9, rtol=1e-7), torch.float32: dict(atol=2e-5, rtol=1e-4)}


# ---------------------------------------------------------------- module level: genfast.nn against torch.nn
def clone_module(torch_module, genfast_cls):
    g = genfast_cls.from_torch(torch_module)
    assert [n for n, _ in g.named_parameters()] == [n for n, _ in torch_module.named_parameters()]
    return g


def _leaf(t):
    return t.detach().clone().requires_grad_(True)


def _loss_weights(t, gen):
    """Fixed random weights for a weighted-sum loss: every element's gradient differs (catches transposes)."""
    return torch.randn(t.shape, generator=gen, dtype=torch.float64).to(t.device, t.dtype)


def forward_backward(module, make_input, hx=None):
    """Forward + backward of ``module`` on a fresh input; returns (output, [final states], {name: grad})."""
    inp = make_input()
    leaf_input = inp.data if isinstance(inp, PackedSequence) else inp
    states = None
    if hx is not None:
        states = tuple(_leaf(h) for h in hx) if isinstance(hx, tuple) else _leaf(hx)
    module.zero_grad(set_to_none=True)
    out, final = module(inp, states)
    out_t = out.data if isinstance(out, PackedSequence) else out
    finals = list(final) if isinstance(final, tuple) else [final]
    gen = torch.Generator().manual_seed(1234)
    loss = (out_t * _loss_weights(out_t, gen)).sum()
    for f in finals:
        loss = loss + (f * _loss_weights(f, gen)).sum()
    loss.backward()
    grads = {name: p.grad for name, p in module.named_parameters()}
    grads["input"] = leaf_input.grad
    if states is not None:
        for i, s in enumerate(states if isinstance(states, tuple) else (states,)):
            grads[f"hx{i}"] = s.grad
    return out_t.detach(), [f.detach() for f in finals], grads


def run_both(torch_module, genfast_module, make_input, hx=None):
    """Forward + backward of both modules on cloned inputs: [torch's results, genfast's results],
    each (output tensor, list of final-state tensors, {name: grad})."""
    return [forward_backward(module, make_input, hx) for module in (torch_module, genfast_module)]


def assert_same(results, dtype, scale=1.0):
    (out_t, fin_t, grad_t), (out_g, fin_g, grad_g) = results
    tol = {k: v * scale for k, v in TOLERANCES[dtype].items()}
    torch.testing.assert_close(out_g, out_t, **tol, msg=lambda m: "output: " + m)
    assert len(fin_g) == len(fin_t)
    for i, (a, b) in enumerate(zip(fin_g, fin_t)):
        torch.testing.assert_close(a, b, **tol, msg=lambda m, i=i: f"final state {i}: " + m)
    assert grad_t.keys() == grad_g.keys()
    for name in grad_t:
        assert (grad_t[name] is None) == (grad_g[name] is None), name
        if grad_t[name] is not None:
            torch.testing.assert_close(grad_g[name], grad_t[name], **tol, msg=lambda m, n=name: f"grad {n}: " + m)


def assert_same_for_any_thread_count(module, make_input, hx=None, thread_counts=(2, 3)):
    """Forward + backward agree between 1 thread and each of ``thread_counts``.

    In the time loops each element is computed by one thread, in the same order whatever the
    split, so outputs, states and the input and state gradients must be bit-identical. The weight
    gradients are single GEMMs over all steps, whose summation order over the S = T*N rows may
    depend on the thread count: float32 rounding, bounded by S * eps relative.
    3 threads also oversubscribe a 2-CPU machine and split the hidden units unevenly."""
    previous = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        expected = forward_backward(module, make_input, hx)
        for threads in thread_counts:
            torch.set_num_threads(threads)
            out, finals, grads = forward_backward(module, make_input, hx)
            assert torch.equal(out, expected[0]), f"output differs with {threads} threads"
            for i, (a, b) in enumerate(zip(finals, expected[1])):
                assert torch.equal(a, b), f"final state {i} differs with {threads} threads"
            assert grads.keys() == expected[2].keys()
            for name, grad in grads.items():
                if name.startswith(("weight", "bias")):
                    torch.testing.assert_close(grad, expected[2][name], atol=1e-5, rtol=1e-5,
                                               msg=lambda m, n=name: f"grad {n} with {threads} threads: " + m)
                else:
                    assert torch.equal(grad, expected[2][name]), f"grad {name} differs with {threads} threads"
    finally:
        torch.set_num_threads(previous)


def packed_input(lengths, input_size, dtype, enforce_sorted, seed=0, device="cpu"):
    """A function making the same PackedSequence (with a fresh leaf data tensor) each call."""
    gen = torch.Generator().manual_seed(seed)
    padded = torch.randn(max(lengths), len(lengths), input_size, generator=gen, dtype=dtype).to(device)

    def make():
        packed = pack_padded_sequence(padded, torch.tensor(lengths), enforce_sorted=enforce_sorted)
        # The packed data itself is the leaf, so both runs compare d(loss)/d(data).
        data = packed.data.detach().requires_grad_(True)
        return PackedSequence(data, packed.batch_sizes, packed.sorted_indices, packed.unsorted_indices)

    return make


def padded_input(x):
    """A function making a fresh leaf copy of ``x`` each call."""
    return lambda: x.clone().requires_grad_(True)


def random_states(cell, leading, hidden, proj=0, dtype=torch.float32, device="cpu", scale=1.0, generator=None):
    """The module's hx argument: states of shape (*leading, width), as a tuple or a tensor."""
    states = [torch.randn(*leading, width, dtype=dtype, generator=generator).to(device) * scale
              for width in cell.state_sizes(hidden, proj)]
    return cell.module_states(states)


def torch_module(cell, input_size, hidden, proj=0, **kwargs):
    """cell.torch_module(...), passing proj_size only where it is given."""
    if proj:
        kwargs["proj_size"] = proj
    return cell.torch_module(input_size, hidden, **kwargs)


# ---------------------------------------------------------------- op level: uniform arguments
def op_case(cell, *, steps, batch, input_size, hidden, proj=0, bias=True, packed=False, reverse=False,
            dtype=torch.float64, device="cpu", seed=0):
    """Weights, states and input for one layer and direction, in the uniform form. PyTorch's init
    range keeps the gates out of saturation; packed input has distinct non-increasing lengths from
    ``steps`` down to 1, so rows drop out (forward) and join (reverse)."""
    gen = torch.Generator().manual_seed(seed)
    scale = hidden ** -0.5
    hidden_out = proj or hidden

    def rand(*shape, factor=1.0):
        return ((torch.rand(*shape, generator=gen, dtype=torch.float64) * 2 - 1) * scale * factor).to(device, dtype)

    w = {"w_ih": rand(cell.gates * hidden, input_size), "w_hh": rand(cell.gates * hidden, hidden_out),
         "b_ih": rand(cell.gates * hidden) if bias else None, "b_hh": rand(cell.gates * hidden) if bias else None}
    if cell.projection:
        w["w_hr"] = rand(hidden_out, hidden) if proj else None
    states = [rand(batch, width, factor=0.5 / scale) for width in cell.state_sizes(hidden, proj)]
    x_padded = rand(steps, batch, input_size, factor=1 / scale)
    if packed:
        lengths = torch.linspace(steps, 1, batch).round().long().tolist() if batch > 1 else [steps]
        packed_x = pack_padded_sequence(x_padded, lengths)
        x, batch_sizes = packed_x.data, packed_x.batch_sizes
    else:
        lengths, x, batch_sizes = [steps] * batch, x_padded, None
    return dict(x=x, x_padded=x_padded, lengths=lengths, batch_sizes=batch_sizes, states=states, w=w,
                reverse=reverse, hidden=hidden)


def reference_for_case(cell, case, x_padded, states, w):
    """genfast.reference on the case (per sequence over its own length), laid out like the op's output."""
    weights = [w[name] for name in cell.weights]
    padded, finals = reference.layer_over_lengths(cell.reference, x_padded, case["lengths"], states, *weights,
                                                  reverse=case["reverse"])
    output = padded if case["batch_sizes"] is None else pack_padded_sequence(padded, case["lengths"]).data
    return output, finals


def run_forward_op(cell, case, train, **override):
    """cell.forward_op on the case (entries of ``override`` replacing the case's): (output, states, workspace)."""
    c = dict(case, **override)
    w = dict(c["w"], **{k: v for k, v in override.items() if k in c["w"]})
    states = [override.get(name, s) for name, s in zip(cell.states, c["states"])]
    return cell.split_forward(cell.forward_op(*cell.forward_args(c["x"], states, w, c["batch_sizes"], c["reverse"],
                                                                 train)))


# ---------------------------------------------------------------- bfloat16 / float16 on the CPU
# They run in float32 and round each result once (genfast.ops.rnn). Against float64 on the same
# rounded weights and inputs, every output, state and gradient is then off by that one rounding
# (at most u = the dtype's unit roundoff, relative) plus float32's error (~1e-6): within 2u of the
# largest magnitude.
UNIT_ROUNDOFF = {torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}


def _flatten(result):
    return [t for item in result for t in _flatten(item)] if isinstance(result, tuple) else [result]


def assert_reduced_precision_matches_float64(genfast_module, dtype, input_shape, state_shapes):
    """Runs ``genfast_module`` in ``dtype`` and a float64 copy of it on the same (rounded) inputs,
    backward through the same (rounded) loss weights; compares outputs, states and gradients."""
    gen = torch.Generator().manual_seed(7)
    rounded = lambda shape, g=gen: torch.randn(shape, generator=g, dtype=torch.float64).to(dtype)
    rounded_like = lambda o, g: rounded(o.shape, g).to(o.dtype)
    x, states = rounded(input_shape), [rounded(s) for s in state_shapes]
    results = []
    for run_dtype in (dtype, torch.float64):  # the float64 copy takes the rounded weights exactly
        module = genfast_module.to(run_dtype)
        leaves = [t.to(run_dtype, copy=True).requires_grad_(True) for t in (x, *states)]
        hx = None if not states else leaves[1] if len(states) == 1 else tuple(leaves[1:])
        module.zero_grad(set_to_none=True)
        outs = _flatten(module(leaves[0], hx))  # output and final states, or a cell's states
        loss_gen = torch.Generator().manual_seed(11)
        loss = sum((o * rounded_like(o, loss_gen)).sum() for o in outs)
        loss.backward()
        # cloned: the next .to() converts the parameters' .grad too
        grads = [t.grad.clone() for t in (*leaves, *module.parameters())]
        results.append(([o.detach() for o in outs], grads))
    (outs_r, grads_r), (outs_64, grads_64) = results
    u = UNIT_ROUNDOFF[dtype]
    assert len(outs_r + grads_r) == len(outs_64 + grads_64)
    for i, (got, want) in enumerate(zip(outs_r + grads_r, outs_64 + grads_64)):
        assert got.dtype == dtype, (i, got.dtype)
        bound = 2 * u * want.abs().max().item()
        error = (got.double() - want).abs().max().item()
        assert error <= bound, f"tensor {i}: error {error:.3g} > 2u * max|value| = {bound:.3g}"
