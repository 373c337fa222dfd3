"""The RNN core's host-side definitions, shared by every cell and backend (csrc/rnn/rnn_host.h,
csrc/rnn/cells.h): the workspace layout and size (C++ kernels, fake kernels), the schedule of packed
batch sizes, and the argument checks."""
from __future__ import annotations

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

import genfast.ops  # noqa: F401  (loads the extension and registers the fake kernels)
from genfast import _extension

ops = torch.ops.genfast
GATES = {"lstm": 4, "gru": 3}


def _inputs(cell, T=3, N=2, I=3, H=4, proj=0, packed=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    G = GATES[cell]
    Hout = proj or H
    x = torch.randn(T, N, I, generator=g)
    batch_sizes = None
    if packed:
        batch_sizes = torch.tensor([N] * (T - 1) + [1])
        x = torch.cat([x[t, : int(b)] for t, b in enumerate(batch_sizes)])
    args = dict(input=x, hx=torch.randn(N, Hout, generator=g), cx=torch.randn(N, H, generator=g),
                w_ih=torch.randn(G * H, I, generator=g) * 0.5, w_hh=torch.randn(G * H, Hout, generator=g) * 0.5,
                b_ih=torch.randn(G * H, generator=g) * 0.5, b_hh=torch.randn(G * H, generator=g) * 0.5,
                w_hr=torch.randn(Hout, H, generator=g) * 0.5 if proj else None, batch_sizes=batch_sizes)
    return args


def _forward(cell, a, train=True, reverse=False):
    if cell == "lstm":
        return ops.lstm_forward(a["input"], a["hx"], a["cx"], a["w_ih"], a["w_hh"], a["b_ih"], a["b_hh"], a["w_hr"],
                                a["batch_sizes"], reverse, train)
    return ops.gru_forward(a["input"], a["hx"], a["w_ih"], a["w_hh"], a["b_ih"], a["b_hh"], a["batch_sizes"], reverse,
                           train)


CONFIGS = [("lstm", 0, False), ("lstm", 0, True), ("lstm", 2, False), ("lstm", 3, True), ("gru", 0, False),
           ("gru", 0, True)]


@pytest.mark.parametrize("cell,proj,packed", CONFIGS)
def test_workspace_size_is_one_definition(cell, proj, packed):
    """The kernel's workspace, the fake kernel's and rows * H * values_per_row agree."""
    a = _inputs(cell, proj=proj, packed=packed)
    workspace = _forward(cell, a)[-1]
    rows = a["input"].shape[0] if packed else a["input"].shape[0] * a["input"].shape[1]
    per_row = _extension.load().rnn_workspace_values_per_row(cell, bool(proj))
    assert workspace.numel() == rows * 4 * per_row
    with FakeTensorMode() as mode:
        fake = {k: (mode.from_tensor(v) if isinstance(v, torch.Tensor) else v)
                for k, v in a.items()}
        fake_workspace = _forward(cell, fake)[-1]
    assert fake_workspace.shape == workspace.shape
    assert _forward(cell, a, train=False)[-1].numel() == 0


def test_workspace_values_per_row_rejects_unknown_cells():
    C = _extension.load()
    with pytest.raises(RuntimeError, match="unknown RNN cell"):
        C.rnn_workspace_values_per_row("rnn_tanh", False)
    with pytest.raises(RuntimeError, match="no projection"):
        C.rnn_workspace_values_per_row("gru", True)


def test_gru_workspace_layout_is_r_z_n_hn_per_row():
    """One step from a known h: each row of the (S, 4H) workspace holds r, z, n and h_n = W_hn h + b_hn."""
    a = _inputs("gru", T=1, N=3, I=5, H=4)
    _, _, workspace = _forward("gru", a)
    H = 4
    x, h = a["input"][0], a["hx"]
    gi = x @ a["w_ih"].T + a["b_ih"]
    gh = h @ a["w_hh"].T + a["b_hh"]
    r = torch.sigmoid(gi[:, :H] + gh[:, :H])
    z = torch.sigmoid(gi[:, H:2 * H] + gh[:, H:2 * H])
    n = torch.tanh(gi[:, 2 * H:] + r * gh[:, 2 * H:])
    expected = torch.cat([r, z, n, gh[:, 2 * H:]], dim=1)
    torch.testing.assert_close(workspace.view(3, 4 * H), expected, rtol=1e-5, atol=1e-5)


def test_lstm_workspace_layout_is_gates_then_c_then_r():
    a = _inputs("lstm", T=1, N=3, I=5, H=4, proj=2)
    _, _, cy, workspace = _forward("lstm", a)
    H, S = 4, 3
    pre = a["input"][0] @ a["w_ih"].T + a["b_ih"] + a["hx"] @ a["w_hh"].T + a["b_hh"]
    i, f, g, o = torch.sigmoid(pre[:, :H]), torch.sigmoid(pre[:, H:2 * H]), torch.tanh(pre[:, 2 * H:3 * H]), \
        torch.sigmoid(pre[:, 3 * H:])
    c = f * a["cx"] + i * g
    torch.testing.assert_close(workspace[:S * 4 * H].view(S, 4 * H), torch.cat([i, f, g, o], 1), rtol=1e-5,
                               atol=1e-5)
    torch.testing.assert_close(workspace[S * 4 * H:S * 5 * H].view(S, H), c, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(workspace[S * 5 * H:].view(S, H), o * torch.tanh(c), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(cy, c, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------- schedule of packed batch sizes
@pytest.mark.parametrize("cell", ["lstm", "gru"])
@pytest.mark.parametrize("batch_sizes,rows,message", [
    (torch.tensor([1, 2]), 3, "batch_sizes: must be non-increasing"),
    (torch.tensor([2, 0]), 2, "batch_sizes: entries must be positive"),
    (torch.tensor([2, 1]), 4, "input: has 4 rows but batch_sizes sum to 3"),
    (torch.tensor([2, 1], dtype=torch.int32), 3, "batch_sizes: expected a 1-D int64 CPU tensor"),
    (torch.tensor([[2, 1]]), 3, "batch_sizes: expected a 1-D int64 CPU tensor"),
])
def test_packed_batch_sizes_are_checked_once_for_every_cell(cell, batch_sizes, rows, message):
    a = _inputs(cell, N=2)
    a["input"] = torch.randn(rows, 3)
    a["batch_sizes"] = batch_sizes
    with pytest.raises(RuntimeError, match=message):
        _forward(cell, a)


@pytest.mark.parametrize("cell", ["lstm", "gru"])
@pytest.mark.parametrize("reverse", [False, True])
def test_packed_schedule_matches_padded_runs(cell, reverse):
    """A packed batch whose sequences have lengths 3, 2, 1 runs each sequence as its own padded call."""
    a = _inputs(cell, T=3, N=3)
    lengths = [3, 2, 1]
    packed = torch.nn.utils.rnn.pack_padded_sequence(a["input"], torch.tensor(lengths))
    p = dict(a, input=packed.data, batch_sizes=packed.batch_sizes)
    out_packed, hy_packed = _forward(cell, p, train=False, reverse=reverse)[:2]
    out_padded, _ = torch.nn.utils.rnn.pad_packed_sequence(
        torch.nn.utils.rnn.PackedSequence(out_packed, packed.batch_sizes))
    for m, length in enumerate(lengths):
        one = dict(a, input=a["input"][:length, m:m + 1], hx=a["hx"][m:m + 1], cx=a["cx"][m:m + 1], batch_sizes=None)
        out, hy = _forward(cell, one, train=False, reverse=reverse)[:2]
        torch.testing.assert_close(out_padded[:length, m], out[:, 0], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(hy_packed[m], hy[0], rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------- argument checks
@pytest.mark.parametrize("cell", ["lstm", "gru"])
@pytest.mark.parametrize("override,message", [
    (lambda a: dict(hx=a["hx"][:1]), "hx: expected shape"),
    (lambda a: dict(w_hh=a["w_hh"].double()), "w_hh: dtype"),
    (lambda a: dict(w_hh=a["w_hh"][:, :3]), "w_hh: expected shape"),
    (lambda a: dict(w_ih=a["w_ih"][:, :2]), "w_ih expects input_size"),
    (lambda a: dict(b_hh=None), "b_ih, b_hh: give both biases or neither"),
    (lambda a: dict(b_ih=a["b_ih"][:5], b_hh=a["b_hh"][:5]), "b_ih: expected shape"),
    (lambda a: dict(input=a["input"].half(), hx=a["hx"].half(), cx=a["cx"].half(), w_ih=a["w_ih"].half(),
                    w_hh=a["w_hh"].half(), b_ih=a["b_ih"].half(), b_hh=a["b_hh"].half()), "float32 and float64"),
])
def test_argument_errors_name_the_argument_for_every_cell(cell, override, message):
    a = _inputs(cell)
    a.update(override(a))
    with pytest.raises(RuntimeError, match=message):
        _forward(cell, a)


def test_lstm_cell_state_is_checked():
    a = _inputs("lstm")
    a["cx"] = a["cx"][:, :3]
    with pytest.raises(RuntimeError, match="cx: expected shape"):
        _forward("lstm", a)


@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_backward_checks_the_workspace(cell):
    a = _inputs(cell)
    outputs = _forward(cell, a)
    out, hy, workspace = outputs[0], outputs[1], outputs[-1]
    wrong = workspace[:-1]
    if cell == "lstm":
        call = lambda ws: ops.lstm_backward(out, hy, outputs[2], a["input"], a["hx"], a["cx"], a["w_ih"], a["w_hh"],
                                            None, out, ws, None, False)
    else:
        call = lambda ws: ops.gru_backward(out, hy, a["input"], a["hx"], a["w_ih"], a["w_hh"], out, ws, None, False)
    with pytest.raises(RuntimeError, match=rf"workspace: .*{cell}_forward\(\.\.\., train=True\)"):
        call(wrong)
    grads = call(workspace)
    assert grads[0].shape == a["input"].shape
