"""genfast.nn.GRU / GRUCell with reset_after=False (the reset gate before the recurrent product) beyond the
parity suite of test_rnn.py, which runs every test on it against genfast.reference (tests/rnn_cells.py,
GRU_RESET_BEFORE): the module's flag, its repr and state_dict, and two checks that do not lean on
genfast.reference's equations."""
from __future__ import annotations

import pytest
import torch

import genfast.nn as gnn
from tests.rnn_cells import TOLERANCES


def test_flag_repr_and_state_dict_are_torch_grus():
    torch.manual_seed(0)
    ref = torch.nn.GRU(5, 7, num_layers=2, bidirectional=True)
    mine = gnn.GRU(5, 7, num_layers=2, bidirectional=True, reset_after=False)
    assert mine.reset_after is False and gnn.GRU(5, 7).reset_after is True
    assert "reset_after=False" in repr(mine) and "reset_after" not in repr(gnn.GRU(5, 7))
    assert list(mine.state_dict()) == list(ref.state_dict())
    mine.load_state_dict(ref.state_dict())
    cell = gnn.GRUCell(5, 7, reset_after=False)
    assert "reset_after=False" in repr(cell) and "reset_after" not in repr(gnn.GRUCell(5, 7))
    assert list(cell.state_dict()) == list(torch.nn.GRUCell(5, 7).state_dict())
    # from_torch keeps the flag of a genfast module, and torch's GRU has reset_after=True semantics
    assert gnn.GRU.from_torch(mine).reset_after is False
    assert gnn.GRU.from_torch(ref).reset_after is True
    assert gnn.GRUCell.from_torch(cell).reset_after is False


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_equals_torch_gru_when_the_reset_gate_is_open(dtype):
    """With r = 1 (W_hr = 0, b_hr large) both GRUs compute n = tanh(W_in x + b_in + W_hn h + b_hn), so
    reset_after=False must give torch.nn.GRU's outputs, states and gradients of every other parameter."""
    torch.manual_seed(1)
    ref = torch.nn.GRU(6, 20, num_layers=2, bidirectional=True, dtype=dtype)
    with torch.no_grad():
        for name, p in ref.named_parameters():
            if name.startswith("weight_hh"):
                p[:20].zero_()
            elif name.startswith("bias_hh"):
                p[:20].fill_(40.0)  # sigmoid(40 + O(1)) == 1 in float64 and float32
    mine = gnn.GRU.from_torch(ref)
    mine.reset_after = False
    x = torch.randn(9, 4, 6, dtype=dtype)
    h0 = torch.randn(4, 4, 20, dtype=dtype)
    results = []
    for module in (ref, mine):
        xl, hl = x.clone().requires_grad_(), h0.clone().requires_grad_()
        out, hn = module(xl, hl)
        gen = torch.Generator().manual_seed(2)
        loss = (out * torch.randn(out.shape, generator=gen, dtype=dtype)).sum() + (hn * hn).sum()
        module.zero_grad(set_to_none=True)
        loss.backward()
        grads = {n: p.grad for n, p in module.named_parameters()}
        results.append((out.detach(), hn.detach(), xl.grad, hl.grad, grads))
    tol = TOLERANCES[dtype]
    (out_t, hn_t, gx_t, gh_t, g_t), (out_g, hn_g, gx_g, gh_g, g_g) = results
    torch.testing.assert_close(out_g, out_t, **tol)
    torch.testing.assert_close(hn_g, hn_t, **tol)
    torch.testing.assert_close(gx_g, gx_t, **tol)
    torch.testing.assert_close(gh_g, gh_t, **tol)
    for name in g_t:  # the r gate's own gradients are 0 on both sides (r(1 - r) = 0)
        torch.testing.assert_close(g_g[name], g_t[name], **tol, msg=lambda m, n=name: f"{n}: {m}")
