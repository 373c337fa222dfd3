"""The RNN backward ops skip the input's gradient product when autograd needs no input gradient
(``input_grad=False``: the first layer of a stack whose input is data, not an activation).

Checked for every cell (LSTM, GRU, the reset-before GRU, LayerNormLSTM, LayerNormGRU):
- op level: with input_grad=False, grad_input is empty and every other gradient is the one the op
  returns with input_grad=True; opcheck with the flag;
- autograd passes the flag per layer: False to the first layer's backward when the input needs no
  gradient, True to the layers above and whenever the input needs one (recorded at the dispatcher);
- module level: the parameter gradients do not depend on whether the input needs a gradient, and for
  the plain cells they match torch.nn's on an input without one;
- torch.compile(fullgraph=True) of a training step whose input needs no gradient.
"""
from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import genfast.nn as gnn
from tests import rnn_cells
from tests.test_rnn_layernorm import CELLS as LN_CELLS, _op_args as ln_op_args

_BACKWARD_OPS = {"lstm_backward", "gru_backward", "gru_reset_before_backward", "layernorm_lstm_backward",
                 "layernorm_gru_backward"}

MODULES = {
    "lstm": lambda **kw: gnn.LSTM(**kw),
    "gru": lambda **kw: gnn.GRU(**kw),
    "gru_reset_before": lambda **kw: gnn.GRU(reset_after=False, **kw),
    "layernorm_lstm": lambda **kw: gnn.LayerNormLSTM(**kw),
    "layernorm_gru": lambda **kw: gnn.LayerNormGRU(**kw),
}
TORCH_MODULES = {"lstm": torch.nn.LSTM, "gru": torch.nn.GRU}
modules = pytest.mark.parametrize("name", list(MODULES))


def _assert_same_gradients(with_flag, without_flag, what):
    """Every gradient but the input's: the same computation either way, so equal to the last bit."""
    assert len(with_flag) == len(without_flag)
    for i, (a, b) in enumerate(zip(with_flag, without_flag)):
        if i == 0:
            continue
        assert torch.equal(a, b), f"{what}: output {i} differs between input_grad=True and False"


# ---------------------------------------------------------------- op level
@pytest.mark.parametrize("cell", rnn_cells.CELLS, ids=lambda c: c.name)
@pytest.mark.parametrize("packed,reverse", [(False, False), (True, True)])
def test_plain_backward_op_skips_only_the_input_gradient(cell, packed, reverse):
    case = rnn_cells.op_case(cell, steps=4, batch=3, input_size=5, hidden=6, packed=packed, reverse=reverse,
                             dtype=torch.float32, seed=3)
    output, finals, workspace = rnn_cells.run_forward_op(cell, case, train=True)
    gen = torch.Generator().manual_seed(4)
    grads = [torch.randn(t.shape, generator=gen) for t in (output, *finals)]
    args = cell.backward_args(grads[0], grads[1:], case["x"], case["states"], case["w"], output, workspace,
                              case["batch_sizes"], case["reverse"])
    full = cell.backward_op(*args)
    skipped = cell.backward_op(*args, input_grad=False)
    assert full[0].shape == case["x"].shape
    assert skipped[0].numel() == 0
    _assert_same_gradients(full, skipped, cell.name)
    torch.library.opcheck(cell.backward_op.default, args, {"input_grad": False})


@pytest.mark.parametrize("cell", LN_CELLS, ids=lambda c: c.name)
@pytest.mark.parametrize("packed,reverse", [(False, False), (True, True)])
def test_layernorm_backward_op_skips_only_the_input_gradient(cell, packed, reverse):
    x, states, weights, batch_sizes = ln_op_args(cell, 4, 3, 5, 6, packed, reverse, True, torch.float32, seed=5)
    w_ih, w_hh, b_ih, b_hh, *ln = weights
    output, *finals, workspace = cell.forward_op(x, *states, w_ih, w_hh, b_ih, b_hh, *ln, batch_sizes, reverse, True)
    gen = torch.Generator().manual_seed(6)
    grads = [torch.randn(t.shape, generator=gen) for t in (output, *finals)]
    args = (*grads, x, *states, w_ih, w_hh, *ln, output, workspace, batch_sizes, reverse)
    full = cell.backward_op(*args)
    skipped = cell.backward_op(*args, input_grad=False)
    assert full[0].shape == x.shape
    assert skipped[0].numel() == 0
    _assert_same_gradients(full, skipped, cell.name)
    torch.library.opcheck(cell.backward_op.default, args, {"input_grad": False})


# ---------------------------------------------------------------- what autograd asks for
class _BackwardFlags(TorchDispatchMode):
    """Records input_grad of every genfast RNN backward op dispatched under it."""

    def __init__(self):
        super().__init__()
        self.flags = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func.namespace == "genfast" and func._schema.name.split("::")[-1] in _BACKWARD_OPS:
            schema_args = func._schema.arguments
            position = next(i for i, a in enumerate(schema_args) if a.name == "input_grad")
            flag = kwargs.get("input_grad", args[position] if len(args) > position else True)
            self.flags.append(bool(flag))
        return func(*args, **kwargs)


def _module_and_inputs(name, dtype=torch.float64, seed=0, **kwargs):
    torch.manual_seed(seed)
    module = MODULES[name](input_size=5, hidden_size=4, num_layers=2, bidirectional=True, **kwargs).to(dtype)
    gen = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(6, 3, 5, generator=gen, dtype=dtype)
    return module, x


def _loss(output, final):
    finals = final if isinstance(final, tuple) else (final,)
    gen = torch.Generator().manual_seed(7)
    weight = lambda t: torch.randn(t.shape, generator=gen, dtype=t.dtype)  # noqa: E731
    return (output * weight(output)).sum() + sum((f * weight(f)).sum() for f in finals)


@modules
def test_autograd_skips_the_input_gradient_of_the_first_layer_only(name):
    module, x = _module_and_inputs(name)
    for input_needs_grad, expected in ((False, [True, True, False, False]), (True, [True] * 4)):
        recorder = _BackwardFlags()
        with recorder:
            output, final = module(x.clone().requires_grad_(input_needs_grad))
            _loss(output, final).backward()
        # Backward runs the second layer's two directions, then the first layer's.
        assert recorder.flags == expected, (input_needs_grad, recorder.flags)


# ---------------------------------------------------------------- module level
@modules
def test_parameter_gradients_do_not_depend_on_the_input_needing_one(name):
    module, x = _module_and_inputs(name, seed=1)
    grads = {}
    for input_needs_grad in (True, False):
        module.zero_grad(set_to_none=True)
        leaf = x.clone().requires_grad_(input_needs_grad)
        _loss(*module(leaf)).backward()
        grads[input_needs_grad] = {n: p.grad.clone() for n, p in module.named_parameters()}
        assert (leaf.grad is not None) == input_needs_grad
    for n in grads[True]:
        assert torch.equal(grads[True][n], grads[False][n]), n


@pytest.mark.parametrize("name", list(TORCH_MODULES))
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_parameter_gradients_match_torch_without_input_gradient(name, dtype):
    torch.manual_seed(2)
    reference = TORCH_MODULES[name](5, 4, num_layers=2, bidirectional=True, batch_first=True).to(dtype)
    module = MODULES[name](input_size=5, hidden_size=4, num_layers=2, bidirectional=True, batch_first=True).to(dtype)
    module.load_state_dict(reference.state_dict())
    x = torch.randn(3, 6, 5, dtype=dtype)
    for m in (reference, module):
        _loss(*m(x)).backward()
    tolerance = rnn_cells.TOLERANCES[dtype]
    for (n, p), (_, q) in zip(reference.named_parameters(), module.named_parameters()):
        torch.testing.assert_close(q.grad, p.grad, **tolerance, msg=lambda m, n=n: f"{n}: {m}")


def test_torch_compile_fullgraph_training_step_without_input_gradient():
    torch.manual_seed(3)
    module = gnn.LSTM(5, 4, num_layers=2)
    x = torch.randn(6, 3, 5)

    def step(inp):
        output, (h, c) = module(inp)
        return output.square().sum() + h.sum() + c.sum()

    step(x).backward()
    eager = {n: p.grad.clone() for n, p in module.named_parameters()}
    module.zero_grad(set_to_none=True)
    torch.compile(step, fullgraph=True, backend="aot_eager")(x).backward()
    for n, p in module.named_parameters():
        assert torch.equal(p.grad, eager[n]), n  # the same kernels on the same values
