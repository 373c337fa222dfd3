"""Time loops split by rows (csrc/cpu/rnn_common.h, ``row_split``): on a padded batch whose step weights fit
in a core's own cache, each thread runs every step of its own rows, all their panels, with no barrier.

Each element is still computed by one thread in the same order as with one thread, so the outputs, final
states and input/state gradients must be bit-identical to a one-thread run; the weight gradients are GEMMs
over all rows after the loop (summation order may follow the thread count: float32 rounding, S * eps
relative). Checked for every CPU cell (the plain LSTM with and without a projection, the GRU both ways,
both LayerNorm cells), two layers, both directions, with regularisers, at a batch that splits (40 rows:
20 or 14 per thread) and, beside it, a packed batch of the same shape, which keeps the team of panels.
"""
from __future__ import annotations

import pytest
import torch
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence

import genfast.nn as gnn

T, N, I, H = 5, 40, 24, 40  # each step well above the one-thread threshold (2e5 flops), weights ~50 KB

MODULES = {
    "lstm": lambda **kw: gnn.LSTM(I, H, **kw),
    "lstm_proj": lambda **kw: gnn.LSTM(I, H, proj_size=24, **kw),
    "gru": lambda **kw: gnn.GRU(I, H, **kw),
    "gru_reset_before": lambda **kw: gnn.GRU(I, H, reset_after=False, **kw),
    "layernorm_lstm": lambda **kw: gnn.LayerNormLSTM(I, H, **kw),
    "layernorm_gru": lambda **kw: gnn.LayerNormGRU(I, H, **kw),
}
REGULARIZERS = {"lstm": dict(zoneout=0.2, recurrent_dropout=0.3), "gru": dict(zoneout=0.2, recurrent_dropout=0.3),
                "gru_reset_before": dict(zoneout=0.2, recurrent_dropout=0.3),
                "layernorm_lstm": dict(zoneout=0.2, cell_zoneout=0.1, recurrent_dropout=0.3),
                "layernorm_gru": dict(zoneout=0.2, recurrent_dropout=0.3)}


def _run(module, x, packed: bool):
    """Forward + backward with the masks drawn from one seed: (output, finals, {name: grad})."""
    torch.manual_seed(5)
    leaf = x.detach().clone().requires_grad_(True)
    inp = pack_padded_sequence(leaf, [T, T - 1, T - 3, 1] * (N // 4), enforce_sorted=False) if packed else leaf
    module.zero_grad(set_to_none=True)
    out, final = module(inp)
    out = out.data if isinstance(out, PackedSequence) else out
    finals = list(final) if isinstance(final, tuple) else [final]
    gen = torch.Generator().manual_seed(6)
    loss = sum((t * torch.randn(t.shape, generator=gen)).sum() for t in [out, *finals])
    loss.backward()
    grads = {name: p.grad.clone() for name, p in module.named_parameters()}
    grads["input"] = leaf.grad
    return out.detach(), [f.detach() for f in finals], grads


@pytest.mark.parametrize("packed", [False, True], ids=["padded-split", "packed-team"])
@pytest.mark.parametrize("regularized", [False, True], ids=["plain", "regularised"])
@pytest.mark.parametrize("name", list(MODULES))
def test_same_results_for_any_thread_count(name, regularized, packed):
    torch.manual_seed(4)
    kwargs = dict(num_layers=2, bidirectional=True)
    if regularized:
        if name == "lstm_proj":
            pytest.skip("the regularised LSTM with a projection is covered by test_rnn_regularizers")
        kwargs.update(REGULARIZERS[name])
    module = MODULES[name](**kwargs)
    x = torch.randn(T, N, I)
    previous = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        expected = _run(module, x, packed)
        for threads in (2, 3):
            torch.set_num_threads(threads)
            out, finals, grads = _run(module, x, packed)
            assert torch.equal(out, expected[0]), f"output differs with {threads} threads"
            for i, (a, b) in enumerate(zip(finals, expected[1])):
                assert torch.equal(a, b), f"final state {i} differs with {threads} threads"
            for key, grad in grads.items():
                if key == "input":
                    assert torch.equal(grad, expected[2][key]), f"input gradient differs with {threads} threads"
                else:  # one GEMM or column sum over all rows after the loop
                    torch.testing.assert_close(grad, expected[2][key], atol=1e-5, rtol=1e-5,
                                               msg=lambda m, k=key: f"grad {k} with {threads} threads: {m}")
    finally:
        torch.set_num_threads(previous)
