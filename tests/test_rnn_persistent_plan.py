"""The persistent RNN kernel's partition (csrc/rnn/persistent_plan.h, issue 20), checked on the CPU.

genfast._probe.persistent_rnn_plan runs the same make_plan the CUDA glue calls with the live device's
numbers; here it gets the numbers of an H200 and an A100 (cudaDeviceProp's values) and of made-up
devices at the edges. Checked: every hidden unit is owned by exactly one block, the shared memory,
registers and threads fit the budgets, the decision (and the reason's kind) matches an independent
re-derivation of the rules over many shapes, and hand-computed cases.
"""
from __future__ import annotations

import math

import pytest
import torch  # noqa: F401  (loads the torch libraries the probe links to)

import genfast._probe as probe  # built by setup.py next to genfast._C

# cudaDeviceProp of the GPUs the kernel is meant for (sharedMemPerBlockOptin = per SM less the 1 KiB a
# block reserves).
H200 = dict(sm_count=132, smem_per_sm=228 * 1024, smem_per_block=227 * 1024, smem_reserved_per_block=1024,
            regs_per_sm=65536, max_threads_per_sm=2048, max_blocks_per_sm=32, cooperative_launch=True)
A100 = dict(sm_count=108, smem_per_sm=164 * 1024, smem_per_block=163 * 1024, smem_reserved_per_block=1024,
            regs_per_sm=65536, max_threads_per_sm=2048, max_blocks_per_sm=32, cooperative_launch=True)
DEVICES = {"h200": H200, "a100": A100}
GATES = {"lstm": 4, "gru": 3}
REGS = 96  # the most ptxas reports for the kernel's instances (nvcc -Xptxas -v); the launch bounds cap it at 128


def plan(cell, H, N, element_bytes, device=H200, regs=REGS, **override):
    d = {**device, **override}
    return probe.persistent_rnn_plan(GATES[cell], H, N, element_bytes, d["sm_count"], d["smem_per_sm"],
                                     d["smem_per_block"], d["smem_reserved_per_block"], d["regs_per_sm"],
                                     d["max_threads_per_sm"], d["max_blocks_per_sm"], d["cooperative_launch"], regs)


def expected(G, H, N, E, d, regs):
    """The rules of persistent_plan.h written again: (fits, reason kind)."""
    vec = 16 // E
    if H % vec:
        return False, "H="
    U = math.ceil(H / d["sm_count"])
    grid = math.ceil(H / U)
    w = G * U * H * E
    if w > d["smem_per_block"]:
        return False, "weight"
    smem = w + N * H * E
    if smem > d["smem_per_block"]:
        return False, "h stage"
    warps = min(16, max(4, U * math.ceil(N / 4)))
    block_regs = math.ceil(regs * 32 / 256) * 256 * warps
    if block_regs > d["regs_per_sm"]:
        return False, "registers"
    per_sm = min(d["max_blocks_per_sm"], d["smem_per_sm"] // (smem + d["smem_reserved_per_block"]),
                 d["regs_per_sm"] // block_regs, d["max_threads_per_sm"] // (32 * warps))
    if per_sm * d["sm_count"] < grid:
        return False, "co-residency"
    return True, ""


def check_fitting_plan(p, G, H, N, E, d, regs):
    # Ownership: contiguous ranges covering [0, H) once each, none empty, at most one block per SM.
    units = p["block_units"]
    assert len(units) == p["grid"] <= d["sm_count"]
    owner = [0] * H
    for begin, end in units:
        assert 0 <= begin < end <= H
        assert end - begin <= p["units_per_block"]
        for j in range(begin, end):
            owner[j] += 1
    assert owner == [1] * H
    assert [b for b, _ in units] == sorted(b for b, _ in units)
    # Shared memory: the W slice (all gates of U units) and the h stage, within a block's and an SM's budget.
    U = p["units_per_block"]
    assert p["w_smem_bytes"] == G * U * H * E
    assert p["h_smem_bytes"] == N * H * E
    assert p["smem_bytes"] == p["w_smem_bytes"] + p["h_smem_bytes"] <= d["smem_per_block"]
    assert p["blocks_per_sm"] >= 1
    assert p["blocks_per_sm"] * (p["smem_bytes"] + d["smem_reserved_per_block"]) <= d["smem_per_sm"]
    # Threads and registers.
    assert p["threads"] % 32 == 0 and 128 <= p["threads"] <= p["max_threads"] == 512
    assert p["blocks_per_sm"] * p["threads"] <= d["max_threads_per_sm"]
    assert p["blocks_per_sm"] * p["threads"] * regs <= d["regs_per_sm"]
    assert p["blocks_per_sm"] * d["sm_count"] >= p["grid"]
    # Work and exchange: a tile is one unit x up to tile_rows batch rows; h_t goes out once, is read by every block.
    assert p["tiles_per_block"] == U * math.ceil(N / p["tile_rows"])
    assert H % p["vector_elements"] == 0 and p["vector_elements"] * E == 16
    assert p["exchange_bytes"] == N * H * E
    assert p["l2_read_bytes"] == p["grid"] * N * H * E


SHAPES = [(H, N) for H in (8, 16, 64, 96, 100, 128, 256, 500, 512, 768, 1000, 1024, 1536, 2048, 4096)
          for N in (1, 2, 7, 8, 16, 33, 64, 128, 256)]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("cell", GATES)
@pytest.mark.parametrize("element_bytes", (4, 2), ids=("fp32", "16bit"))
def test_plan_over_shapes(device, cell, element_bytes):
    d, G = DEVICES[device], GATES[cell]
    fitted = refused = 0
    for H, N in SHAPES:
        p = plan(cell, H, N, element_bytes, d)
        fits, kind = expected(G, H, N, element_bytes, d, REGS)
        assert p["fits"] == fits, (H, N, p["reason"])
        if fits:
            assert p["reason"] == ""
            check_fitting_plan(p, G, H, N, element_bytes, d, REGS)
            fitted += 1
        else:
            assert p["reason"].startswith(kind), (H, N, p["reason"])
            refused += 1
    assert fitted and refused  # the grid of shapes reaches both sides of the budget


# Hand-computed: (cell, H, N, bytes, device) -> fits, units per block, grid, smem bytes, reason kind.
HAND = [
    # LSTM H=1024 fp32: W_hh 16 MiB over 128 blocks of 8 units = 128 KiB each; h_{t-1} of 64 rows (256 KiB)
    # does not fit beside it.
    ("lstm", 1024, 64, 4, "h200", False, 8, 128, None, "h stage"),
    # ... with 8 rows (32 KiB) it does: 160 KiB of 227.
    ("lstm", 1024, 8, 4, "h200", True, 8, 128, 4 * 8 * 1024 * 4 + 8 * 1024 * 4, ""),
    # On an A100 (108 SMs): 10 units per block, 160 KiB of W slice; one row of h more passes 163 KiB.
    ("lstm", 1024, 1, 4, "a100", False, 10, 103, None, "h stage"),
    # LSTM H=2048 fp32: a 512 KiB W slice per block.
    ("lstm", 2048, 1, 4, "h200", False, 16, 128, None, "weight"),
    # bf16 H=512, N=64 (the main case): 16 KiB of W slice + 64 KiB of h.
    ("lstm", 512, 64, 2, "h200", True, 4, 128, 4 * 4 * 512 * 2 + 64 * 512 * 2, ""),
    ("gru", 512, 64, 2, "h200", True, 4, 128, 3 * 4 * 512 * 2 + 64 * 512 * 2, ""),
    # fp32 H=512, N=64: 32 + 128 KiB on an H200; on an A100 5 units per block make it 40 + 128 KiB > 163.
    ("lstm", 512, 64, 4, "h200", True, 4, 128, 4 * 4 * 512 * 4 + 64 * 512 * 4, ""),
    ("lstm", 512, 64, 4, "a100", False, 5, 103, None, "h stage"),
    # cuDNN's persistent case: fp16 LSTM H=768, N=16: 6 units per block, 36 + 24 KiB.
    ("lstm", 768, 16, 2, "h200", True, 6, 128, 4 * 6 * 768 * 2 + 16 * 768 * 2, ""),
    # H=100 is 25 fp32 vectors, not a whole number of 8-element 16-bit vectors.
    ("gru", 100, 4, 4, "h200", True, 1, 100, 3 * 100 * 4 + 4 * 100 * 4, ""),
    ("gru", 100, 4, 2, "h200", False, None, None, None, "H="),
]


@pytest.mark.parametrize("case", HAND, ids=lambda c: f"{c[0]}-h{c[1]}-n{c[2]}-{8 * c[3]}bit-{c[4]}")
def test_plan_hand_computed(case):
    cell, H, N, E, device, fits, U, grid, smem, kind = case
    p = plan(cell, H, N, E, DEVICES[device])
    assert p["fits"] == fits, p["reason"]
    assert p["reason"].startswith(kind)
    if U is not None:
        assert p["units_per_block"] == U and p["grid"] == grid
    if fits:
        assert p["smem_bytes"] == smem
        check_fitting_plan(p, GATES[cell], H, N, E, DEVICES[device], REGS)


def test_plan_counts_registers_per_warp():
    # bf16 LSTM H=512, N=64: 80 KiB + 1 KiB reserved fits twice in 228 KiB, and 512 threads x 64 registers
    # (2048 a warp) twice in 64K; at 89 registers a warp takes 96 x 32 = 3072 (allocated in
    # units of 256), so 16 warps take 48K and only one block is resident.
    p = plan("lstm", 512, 64, 2, regs=64)
    assert p["fits"] and p["threads"] == 512 and p["blocks_per_sm"] == 2
    p = plan("lstm", 512, 64, 2, regs=89)
    assert p["fits"] and p["blocks_per_sm"] == 1


def test_plan_refusals_name_their_cause():
    assert plan("lstm", 512, 8, 4, cooperative_launch=False)["reason"].startswith("device cannot launch cooperatively")
    # 255 registers x 32 lanes round to 8192 a warp; 16 warps need 128K of the SM's 64K.
    p = plan("lstm", 512, 64, 4, regs=255)
    assert not p["fits"] and p["reason"].startswith("registers")
    # A block that cannot share an SM with its reserve: no block is resident.
    p = plan("lstm", 512, 64, 4, smem_per_sm=150 * 1024)
    assert not p["fits"] and p["reason"].startswith("co-residency") and p["blocks_per_sm"] == 0
    p = plan("lstm", 512, 64, 4, max_threads_per_sm=256)
    assert not p["fits"] and p["reason"].startswith("co-residency")
    assert plan("lstm", 512, 0, 4)["reason"].startswith("empty problem")
    assert plan("lstm", 512, 8, 8)["reason"].startswith("element type of 8 bytes")
    assert plan("lstm", 512, 8, 4, sm_count=0)["reason"] == "device reports no SMs"
    weight = plan("lstm", 4096, 1, 4)["reason"]
    # 128 rows x 4096 x 4 bytes per block; W_hh 256 MiB.
    assert weight.startswith("weight") and "2048.0 KiB" in weight and "262144.0 KiB" in weight


def test_plan_grid_never_exceeds_the_sms():
    for sms in (1, 7, 108, 132):
        for H in (8, 64, 512, 1000, 1024):
            p = plan("gru", H, 1, 2 if H % 8 == 0 else 4, sm_count=sms)
            if p["fits"]:
                assert p["grid"] <= sms and p["grid"] * p["units_per_block"] >= H
                assert (p["grid"] - 1) * p["units_per_block"] < H  # no empty block


# ------------------------------------------------------------------ the kernel's schedule, emulated on the host
# genfast._probe.persistent_rnn_emulate runs csrc/cuda/rnn_persistent.cu's schedule in fp32 on the CPU with the
# kernel's own index math (persistent::Layout: which block owns which units, the W slice rows, the tiles, the
# step order and where h_{t-1} is read from) and cell policy; what it leaves unwritten is NaN. Against torch.nn
# on the CPU: the same function of the same weights, or a unit, row, gate or step is misplaced.
EMULATED = [  # (T, N, I, H, SMs): one unit per block; several with an uneven last block; rows beyond one tile
    (4, 3, 5, 8, 132),
    (5, 9, 7, 20, 3),    # U = 7: blocks of 7, 7, 6 units
    (3, 1, 4, 100, 7),   # U = 15: the last block 10 units
    (6, 5, 6, 64, 5),    # U = 13: the last block 12 units; N = 5 is a tile and a row
    (2, 17, 3, 12, 12),
]


@pytest.mark.parametrize("cell", GATES)
@pytest.mark.parametrize("shape", EMULATED, ids=lambda s: "t{}-n{}-i{}-h{}-sm{}".format(*s))
@pytest.mark.parametrize("reverse", [False, True], ids=["forward", "reverse"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
def test_emulated_schedule_matches_torch(cell, shape, reverse, bias):
    T, N, I, H, sms = shape
    torch.manual_seed(0)
    module = (torch.nn.LSTM if cell == "lstm" else torch.nn.GRU)(I, H, bias=bias).double()
    x = torch.randn(T, N, I, dtype=torch.float64)
    h0 = torch.randn(1, N, H, dtype=torch.float64) * 0.5
    c0 = torch.randn(1, N, H, dtype=torch.float64) * 0.5
    states = (h0, c0) if cell == "lstm" else h0
    # A reverse direction is the forward recurrence over the time-reversed input, its output reversed back.
    with torch.no_grad():
        out, final = module(x.flip(0) if reverse else x, states)
    expected_out = out.flip(0) if reverse else out
    expected_final = final if cell == "lstm" else (final,)

    gates_x = (x.reshape(T * N, I) @ module.weight_ih_l0.detach().T).float()
    b_ih = module.bias_ih_l0.detach().float() if bias else None
    b_hh = module.bias_hh_l0.detach().float() if bias else None
    output, h_last, c_last, workspace = probe.persistent_rnn_emulate(
        cell, gates_x, module.weight_hh_l0.detach().float(), b_ih, b_hh, h0[0].float(),
        c0[0].float() if cell == "lstm" else None, T, None, reverse, sms)
    # fp32 products of length H <= 100 and the CPU's polynomial sigmoid/tanh (2 ulp), over <= 6 steps.
    tol = dict(atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(output.view(T, N, H).double(), expected_out, **tol)
    torch.testing.assert_close(h_last.double(), expected_final[0][0], **tol)
    if cell == "lstm":
        torch.testing.assert_close(c_last.double(), expected_final[1][0], **tol)
    # Training: what the kernel saves for backward sits where the CPU op's per-step path puts it (the one
    # workspace layout of csrc/rnn/cells.h), with the same values.
    torch.testing.assert_close(workspace, cpu_op_workspace(cell, module, x, h0, c0, reverse), **tol)


def cpu_op_workspace(cell, module, x, h0, c0, reverse):
    import genfast.ops  # noqa: F401  (loads genfast._C, which registers the ops)

    w = [p.detach().float() for p in module.parameters()]
    w += [None] * (4 - len(w))  # no biases
    if cell == "lstm":
        result = torch.ops.genfast.lstm_forward(x.float(), h0[0].float(), c0[0].float(), *w, None, None, reverse, True)
    else:
        result = torch.ops.genfast.gru_forward(x.float(), h0[0].float(), *w, None, reverse, True)
    return result[-1]


def test_emulation_refuses_what_the_plan_refuses():
    with pytest.raises(RuntimeError, match="plan: H=6 is not a multiple of 4"):
        probe.persistent_rnn_emulate("gru", torch.zeros(2, 18), torch.zeros(18, 6), None, None, torch.zeros(2, 6),
                                     None, 1, None, False, 4)


@pytest.mark.parametrize("cell", GATES)
@pytest.mark.parametrize("lengths", [(6, 6, 3, 1), (5, 4, 4, 2, 2, 1), (3,)], ids=["4rows", "6rows", "1row"])
@pytest.mark.parametrize("sms", [3, 132])
def test_emulated_schedule_packed_matches_torch(cell, lengths, sms):
    # Packed input, both directions: rows leave the batch as their sequences end (forward), or join it from hx
    # (reverse); each row's final h is its output at its own last step. torch's bidirectional layer on the same
    # PackedSequence gives both directions' outputs and final states.
    from torch.nn.utils.rnn import pack_padded_sequence

    I, H, N, T = 5, 12, len(lengths), lengths[0]
    torch.manual_seed(1)
    module = (torch.nn.LSTM if cell == "lstm" else torch.nn.GRU)(I, H, bidirectional=True).double()
    x = torch.randn(T, N, I, dtype=torch.float64)
    h0 = torch.randn(2, N, H, dtype=torch.float64) * 0.5
    c0 = torch.randn(2, N, H, dtype=torch.float64) * 0.5
    packed = pack_padded_sequence(x, torch.tensor(lengths), enforce_sorted=True)
    with torch.no_grad():
        out, final = module(packed, (h0, c0) if cell == "lstm" else h0)
    finals = final if cell == "lstm" else (final,)
    for direction, suffix in enumerate(("", "_reverse")):
        weight = lambda name: getattr(module, name + suffix).detach()  # noqa: E731
        gates_x = (packed.data @ weight("weight_ih_l0").T).float()
        output, h_last, c_last, _ = probe.persistent_rnn_emulate(
            cell, gates_x, weight("weight_hh_l0").float(), weight("bias_ih_l0").float(), weight("bias_hh_l0").float(),
            h0[direction].float(), c0[direction].float() if cell == "lstm" else None, T, packed.batch_sizes,
            direction == 1, sms)
        tol = dict(atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(output.double(), out.data[:, direction * H:(direction + 1) * H], **tol)
        torch.testing.assert_close(h_last.double(), finals[0][direction], **tol)
        if cell == "lstm":
            torch.testing.assert_close(c_last.double(), finals[1][direction], **tol)


# ------------------------------------------------------------------ the switch and what genfast.info() says
def test_switch_and_info_report(monkeypatch):
    import os

    import genfast
    from genfast import _extension, rnn_persistent

    monkeypatch.delenv(rnn_persistent.ENV, raising=False)
    assert not rnn_persistent.is_enabled()
    with rnn_persistent.enabled():
        assert os.environ[rnn_persistent.ENV] == "1" and rnn_persistent.is_enabled()
        with rnn_persistent.enabled(False):
            assert not rnn_persistent.is_enabled()
        assert rnn_persistent.is_enabled()
    assert rnn_persistent.ENV not in os.environ  # restored: unset as before
    monkeypatch.setenv(rnn_persistent.ENV, "0")
    with rnn_persistent.enabled():
        pass
    assert os.environ[rnn_persistent.ENV] == "0"

    report = genfast.info(print_it=False)
    assert report["rnn_persistent"].startswith("off (GENFAST_RNN_PERSISTENT=1")
    with rnn_persistent.enabled():
        assert genfast.info(print_it=False)["rnn_persistent"].startswith("on")
    path = report["rnn_cuda_path"]
    if _extension.available() and _extension.load().cuda_built():
        assert path["path"] in ("none", "per-step", "persistent") and path["reason"]
    else:
        assert path == {"path": None, "reason": "genfast._C has no CUDA kernels", "persistent_layers": 0,
                        "persistent_backward_layers": 0}


# ------------------------------------------------------------------ the backward (BPTT) kernel's schedule, emulated
BACKWARD_SHAPES = [  # (T, N, I, H, SMs, shared memory per block): chunks of dG narrower than G*H where it is small
    (4, 3, 5, 8, 132, 227 * 1024),
    (5, 6, 7, 20, 3, 227 * 1024),
    (3, 5, 4, 24, 4, 3072),   # U = 6: W^T slice 6 x 96 x 4 B (LSTM) + acc 120 B; dG in chunks of 32 (GRU 60)
    (2, 9, 3, 12, 12, 1024),  # U = 1: chunks of 20 of the 48 (GRU 36) columns, the last one partial
]


@pytest.mark.parametrize("cell", GATES)
@pytest.mark.parametrize("shape", BACKWARD_SHAPES, ids=lambda s: "t{}-n{}-i{}-h{}-sm{}-smem{}".format(*s))
@pytest.mark.parametrize("reverse", [False, True], ids=["forward", "reverse"])
def test_emulated_backward_schedule_matches_torch_autograd(cell, shape, reverse):
    # The forward emulation's output and workspace feed the backward emulation; the weight and input gradients
    # then come from its gate gradients and gathered h_{t-1} as the CUDA glue forms them (one product each).
    T, N, I, H, sms, smem = shape
    torch.manual_seed(2)
    module = (torch.nn.LSTM if cell == "lstm" else torch.nn.GRU)(I, H).double()
    x = torch.randn(T, N, I, dtype=torch.float64, requires_grad=True)
    h0 = (torch.randn(1, N, H, dtype=torch.float64) * 0.5).requires_grad_()
    c0 = (torch.randn(1, N, H, dtype=torch.float64) * 0.5).requires_grad_()
    out, final = module(x.flip(0) if reverse else x, (h0, c0) if cell == "lstm" else h0)
    out = out.flip(0) if reverse else out
    finals = list(final) if cell == "lstm" else [final]
    gen = torch.Generator().manual_seed(3)
    weights = [torch.randn(t.shape, generator=gen, dtype=torch.float64) for t in [out, *finals]]
    sum((t * w).sum() for t, w in zip([out, *finals], weights)).backward()

    p = {name: v.detach() for name, v in module.named_parameters()}
    gates_x = (x.detach().reshape(T * N, I) @ p["weight_ih_l0"].T).float()
    output, _, _, workspace = probe.persistent_rnn_emulate(
        cell, gates_x, p["weight_hh_l0"].float(), p["bias_ih_l0"].float(), p["bias_hh_l0"].float(),
        h0.detach()[0].float(), c0.detach()[0].float() if cell == "lstm" else None, T, None, reverse, sms)
    d_gates, d_gates_h, h_prev, grad_hx, grad_cx, chunk = probe.persistent_rnn_emulate_backward(
        cell, weights[0].reshape(T * N, H).float(), weights[1][0].float(),
        weights[2][0].float() if cell == "lstm" else None, h0.detach()[0].float(),
        c0.detach()[0].float() if cell == "lstm" else None, p["weight_hh_l0"].float(), output, workspace, T,
        None, reverse, sms, smem)
    if smem < 8192:
        assert 0 < int(chunk) < GATES[cell] * H  # the dG columns really came in several chunks
    d_gates, d_gates_h, h_prev = d_gates.double(), d_gates_h.double(), h_prev.double()
    tol = dict(atol=2e-5, rtol=1e-4)
    torch.testing.assert_close((d_gates @ p["weight_ih_l0"]).view(T, N, I), x.grad, **tol)
    torch.testing.assert_close(d_gates.T @ x.detach().reshape(T * N, I), module.weight_ih_l0.grad, **tol)
    torch.testing.assert_close(d_gates_h.T @ h_prev, module.weight_hh_l0.grad, **tol)
    torch.testing.assert_close(d_gates.sum(0), module.bias_ih_l0.grad, **tol)
    torch.testing.assert_close(d_gates_h.sum(0), module.bias_hh_l0.grad, **tol)
    torch.testing.assert_close(grad_hx.double(), h0.grad[0], **tol)
    if cell == "lstm":
        torch.testing.assert_close(grad_cx.double(), c0.grad[0], **tol)


# ------------------------------------------------------------------ the backward kernel's partition
def backward_plan(cell, H, N, element_bytes, device=H200, regs=REGS, **override):
    d = {**device, **override}
    return probe.persistent_rnn_backward_plan(GATES[cell], H, N, element_bytes, d["sm_count"], d["smem_per_sm"],
                                              d["smem_per_block"], d["smem_reserved_per_block"], d["regs_per_sm"],
                                              d["max_threads_per_sm"], d["max_blocks_per_sm"],
                                              d["cooperative_launch"], regs)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("cell", GATES)
@pytest.mark.parametrize("element_bytes", (4, 2), ids=("fp32", "16bit"))
def test_backward_plan_over_shapes(device, cell, element_bytes):
    d, G = DEVICES[device], GATES[cell]
    for H, N in SHAPES:
        p, forward = backward_plan(cell, H, N, element_bytes, d), plan(cell, H, N, element_bytes, d)
        if not p["fits"]:
            assert p["reason"], (H, N)
            continue
        # The forward's partition of units; the W^T slice (G*H of each unit's W_hh column), the chunk of dG and the
        # fp32 accumulator within a block's budget; the chunk a whole number of vectors, at most G*H.
        assert p["units_per_block"] == forward["units_per_block"] and p["grid"] == forward["grid"]
        assert p["block_units"] == forward["block_units"]
        U, V, chunk = p["units_per_block"], 16 // element_bytes, p["chunk_columns"]
        assert p["w_smem_bytes"] == U * G * H * element_bytes and p["acc_smem_bytes"] == N * U * 4
        assert 0 < chunk <= G * H and chunk % V == 0
        assert p["h_smem_bytes"] == N * chunk * element_bytes
        assert p["smem_bytes"] == p["w_smem_bytes"] + p["h_smem_bytes"] + p["acc_smem_bytes"] <= d["smem_per_block"]
        # As wide as fits: one more vector would not.
        assert chunk == G * H or p["smem_bytes"] + N * V * element_bytes > d["smem_per_block"]
        assert p["blocks_per_sm"] * d["sm_count"] >= p["grid"]


def test_backward_plan_hand_computed():
    # bf16 LSTM H=512, N=64 on an H200: W^T slice 4 x 2048 x 2 = 16 KiB, acc 64 x 4 x 4 = 1 KiB; the rest of 227 KiB
    # holds 215040 / 128 = 1680 columns of dG's 2048.
    p = backward_plan("lstm", 512, 64, 2)
    assert p["fits"] and p["chunk_columns"] == 1680 and p["smem_bytes"] == 16384 + 64 * 1680 * 2 + 1024
    # fp32 LSTM H=1024, N=64, which the forward cannot stage: 128 KiB of W^T, 2 KiB of acc, dG in chunks of 388.
    assert not plan("lstm", 1024, 64, 4)["fits"]
    p = backward_plan("lstm", 1024, 64, 4)
    assert p["fits"] and p["chunk_columns"] == 388
    # H=2048 fp32: 512 KiB of W^T slice per block.
    assert backward_plan("lstm", 2048, 1, 4)["reason"].startswith("weight")
    assert backward_plan("gru", 100, 4, 2)["reason"].startswith("H=100 is not a multiple of 8")


@pytest.mark.parametrize("cell", GATES)
@pytest.mark.parametrize("lengths", [(6, 6, 3, 1), (5, 4, 4, 2, 2, 1)], ids=["4rows", "6rows"])
@pytest.mark.parametrize("smem", [227 * 1024, 1024], ids=["wide", "chunked"])
def test_emulated_backward_schedule_packed_matches_torch_autograd(cell, lengths, smem):
    # Packed, both directions of a bidirectional layer: rows join (forward's backward, walking back in time) or
    # leave (reverse) the active prefix; grad_hx of each row is what its first step passes back.
    from torch.nn.utils.rnn import pack_padded_sequence

    I, H, N, T = 5, 12, len(lengths), lengths[0]
    torch.manual_seed(4)
    module = (torch.nn.LSTM if cell == "lstm" else torch.nn.GRU)(I, H, bidirectional=True).double()
    x = torch.randn(T, N, I, dtype=torch.float64)
    packed = pack_padded_sequence(x, torch.tensor(lengths), enforce_sorted=True)
    data = packed.data.clone().requires_grad_()
    h0 = (torch.randn(2, N, H, dtype=torch.float64) * 0.5).requires_grad_()
    c0 = (torch.randn(2, N, H, dtype=torch.float64) * 0.5).requires_grad_()
    inp = torch.nn.utils.rnn.PackedSequence(data, packed.batch_sizes)
    out, final = module(inp, (h0, c0) if cell == "lstm" else h0)
    finals = list(final) if cell == "lstm" else [final]
    gen = torch.Generator().manual_seed(5)
    weights = [torch.randn(t.shape, generator=gen, dtype=torch.float64) for t in [out.data, *finals]]
    sum((t * w).sum() for t, w in zip([out.data, *finals], weights)).backward()

    tol = dict(atol=2e-5, rtol=1e-4)
    grad_data = torch.zeros_like(data)
    for direction, suffix in enumerate(("", "_reverse")):
        w = {name: getattr(module, name + suffix).detach() for name in
             ("weight_ih_l0", "weight_hh_l0", "bias_ih_l0", "bias_hh_l0")}
        grads = {name: getattr(module, name + suffix).grad for name in w}
        gates_x = (packed.data @ w["weight_ih_l0"].T).float()
        h_init = h0.detach()[direction].float()
        c_init = c0.detach()[direction].float() if cell == "lstm" else None
        output, _, _, workspace = probe.persistent_rnn_emulate(
            cell, gates_x, w["weight_hh_l0"].float(), w["bias_ih_l0"].float(), w["bias_hh_l0"].float(), h_init,
            c_init, T, packed.batch_sizes, direction == 1, 3)
        d_gates, d_gates_h, h_prev, grad_hx, grad_cx, _ = probe.persistent_rnn_emulate_backward(
            cell, weights[0][:, direction * H:(direction + 1) * H].float(), weights[1][direction].float(),
            weights[2][direction].float() if cell == "lstm" else None, h_init, c_init, w["weight_hh_l0"].float(),
            output, workspace, T, packed.batch_sizes, direction == 1, 3, smem)
        d_gates, d_gates_h, h_prev = d_gates.double(), d_gates_h.double(), h_prev.double()
        grad_data += d_gates @ w["weight_ih_l0"]
        torch.testing.assert_close(d_gates.T @ packed.data, grads["weight_ih_l0"], **tol)
        torch.testing.assert_close(d_gates_h.T @ h_prev, grads["weight_hh_l0"], **tol)
        torch.testing.assert_close(d_gates.sum(0), grads["bias_ih_l0"], **tol)
        torch.testing.assert_close(d_gates_h.sum(0), grads["bias_hh_l0"], **tol)
        torch.testing.assert_close(grad_hx.double(), h0.grad[direction], **tol)
        if cell == "lstm":
            torch.testing.assert_close(grad_cx.double(), c0.grad[direction], **tol)
    torch.testing.assert_close(grad_data, data.grad, **tol)
