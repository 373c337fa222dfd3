"""The FlashRNN baseline of the GPU benchmark (genfast.bench.providers.flashrnn_layer): torch.nn's weights mapped
to FlashRNN's layout give torch.nn's numbers. Checked on the CPU with FlashRNN's pure-PyTorch "vanilla" backend,
which shares the weight layout and gate order of its CUDA backends; skipped where the flashrnn package is absent
(it is not a test requirement: a GPU session carries its wheel, docs/design.md "Persistent RNN kernel")."""
from __future__ import annotations

import pytest
import torch

pytest.importorskip("flashrnn")
from genfast.bench.providers import flashrnn_layer  # noqa: E402


@pytest.mark.parametrize("cell", ["lstm", "gru"])
@pytest.mark.parametrize("shape", [(5, 3, 4, 8), (7, 2, 6, 16)], ids=lambda s: "t{}-n{}-i{}-h{}".format(*s))
def test_flashrnn_layer_matches_torch(cell, shape):
    T, N, I, H = shape
    torch.manual_seed(0)
    module = (torch.nn.LSTM if cell == "lstm" else torch.nn.GRU)(I, H)
    x = torch.randn(T, N, I)
    h0, c0 = torch.randn(1, N, H), torch.randn(1, N, H)
    with torch.no_grad():
        expected, final = module(x, (h0, c0) if cell == "lstm" else h0)
        params = dict(module.named_parameters())
        states = (torch.stack([h0[0], c0[0]]) if cell == "lstm" else h0).view(-1, N, 1, 1, H)
        out, last = flashrnn_layer(cell, params, x, states, backend="vanilla")
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-4)
    finals = final if cell == "lstm" else (final,)
    for i, f in enumerate(finals):  # FlashRNN's last states: (S, N, 1, 1, H)
        torch.testing.assert_close(last[i, :, 0, 0], f[0], atol=1e-5, rtol=1e-4)
