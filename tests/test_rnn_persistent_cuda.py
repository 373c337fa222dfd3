"""The persistent CUDA LSTM/GRU forward kernel (issue 20) against torch.nn; skipped without a CUDA device.

The kernel is opt-in (GENFAST_RNN_PERSISTENT=1), so every test turns it on (or leaves it off) itself and
asks torch.ops.genfast.rnn_cuda_path() which path the layers took: a test of the persistent kernel fails
if the per-step path ran instead. The kernels are forced (genfast.routing's rules off) and TF32 is off, so
torch's side is true fp32 cuDNN.

Tolerances: fp32 as tests/rnn_cells.py's TOLERANCES (the kernel sums W_hh h in fp32 in its own order, and
the cell math is the per-step path's); bf16 and fp16 compare errors against a float64 oracle on the same
rounded weights and inputs: genfast's error at most twice cuDNN's plus two roundings of the largest value
(the rule of tests/test_rnn.py's reduced-precision test).
"""
from __future__ import annotations

import copy

import pytest
import torch
from torch.nn.utils.rnn import pack_padded_sequence

from genfast import _extension, rnn_persistent, routing
from tests.rnn_cells import GRU, LSTM, TOLERANCES, clone_module, op_case, run_forward_op, torch_module

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]
CELLS = {"lstm": LSTM, "gru": GRU}


@pytest.fixture(autouse=True)
def cuda_setup():
    assert _extension.load().cuda_built(), "a CUDA device is present but genfast._C was built without CUDA kernels"
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        with routing.force_kernels(), rnn_persistent.enabled():
            yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def modules(cell, I, H, dtype, **kwargs):
    torch.manual_seed(0)
    theirs = torch_module(CELLS[cell], I, H, **kwargs).to("cuda", dtype)
    return theirs, clone_module(copy.deepcopy(theirs), CELLS[cell].module)


def states(cell, layers, N, H, dtype, gen):
    s = [torch.randn(layers, N, H, generator=gen).to("cuda", dtype) * 0.5 for _ in CELLS[cell].states]
    return CELLS[cell].module_states(s)


def run(module, x, hx, train):
    """Output, final states and (train) the gradients of a fixed weighted loss, all as float64."""
    x = x.detach().clone().requires_grad_(train)
    hx = tuple(h.detach().clone().requires_grad_(train) for h in hx) if isinstance(hx, tuple) else \
        hx.detach().clone().requires_grad_(train)
    module.zero_grad(set_to_none=True)
    with torch.set_grad_enabled(train):
        out, final = module(x, hx)
    finals = list(final) if isinstance(final, tuple) else [final]
    results = {"output": out.detach().double()}
    results.update({f"final{i}": f.detach().double() for i, f in enumerate(finals)})
    if train:
        gen = torch.Generator().manual_seed(7)
        loss = sum((t.double() * torch.randn(t.shape, generator=gen, dtype=torch.float64).to(t.device)).sum()
                   for t in [out, *finals])
        loss.backward()
        results["grad_input"] = x.grad.double()
        for i, h in enumerate(hx if isinstance(hx, tuple) else (hx,)):
            results[f"grad_hx{i}"] = h.grad.double()
        results.update({f"grad_{n}": p.grad.double() for n, p in module.named_parameters()})
    return results


def persistent_layers():
    return rnn_persistent.last_path()["persistent_layers"]


def persistent_backward_layers():
    return rnn_persistent.last_path()["persistent_backward_layers"]


def require_plan(cell, H, N, dtype, backward=False):
    """Skip where this GPU cannot hold the layer on chip (csrc/rnn/persistent_plan.h with its numbers and the
    register cap of the kernel's launch bounds, so a layer this says fits also fits at the kernel's real count).
    backward=True: whether the backward kernel's plan fits (no skip)."""
    probe = pytest.importorskip("genfast._probe")
    d = torch.cuda.get_device_properties(0)
    per_sm = d.shared_memory_per_multiprocessor
    # Not every torch exposes these two: then the per-SM size less the 1 KiB a block reserves, and 64K registers.
    per_block = getattr(d, "shared_memory_per_block_optin", per_sm - 1024)
    regs = getattr(d, "regs_per_multiprocessor", 65536)
    plan_of = probe.persistent_rnn_backward_plan if backward else probe.persistent_rnn_plan
    plan = plan_of(CELLS[cell].gates, H, N, torch.finfo(dtype).bits // 8, d.multi_processor_count,
                   per_sm, per_block, 1024, regs, d.max_threads_per_multi_processor, 32, True, 128)
    if backward:
        return plan["fits"]
    if not plan["fits"]:
        pytest.skip(f"the layer does not fit on {d.name}: {plan['reason']}")


# (T, N, I, H): one block's worth, several units per block, N not a multiple of the 4-row tile, N = 1,
# the shapes (H = 512, N = 64; H = 1024 at N = 8).
SHAPES = [(5, 3, 16, 64), (9, 7, 24, 128), (12, 64, 64, 512), (4, 1, 32, 1024), (6, 8, 16, 1024), (3, 2, 8, 8)]
CONFIGS = [dict(num_layers=1, bidirectional=False, bias=True), dict(num_layers=2, bidirectional=True, bias=False)]


@pytest.mark.parametrize("cell", CELLS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "t{}-n{}-i{}-h{}".format(*s))
@pytest.mark.parametrize("config", CONFIGS, ids=["1layer", "2layer-bidir-nobias"])
@pytest.mark.parametrize("train", [False, True], ids=["inference", "training"])
def test_persistent_fp32_matches_torch(cell, shape, config, train):
    T, N, I, H = shape
    require_plan(cell, H, N, torch.float32)
    theirs, ours = modules(cell, I, H, torch.float32, **config)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(T, N, I, generator=gen).to("cuda")
    directions = 2 if config["bidirectional"] else 1
    hx = states(cell, config["num_layers"] * directions, N, H, torch.float32, gen)
    expected = run(theirs, x, hx, train)
    before, before_backward = persistent_layers(), persistent_backward_layers()
    got = run(ours, x, hx, train)
    layers = config["num_layers"] * directions
    assert persistent_layers() - before == layers, rnn_persistent.last_path()
    # Training: the persistent backward kernel too (padded input), wherever its own plan fits.
    if train and require_plan(cell, H, N, torch.float32, backward=True):
        assert persistent_backward_layers() - before_backward == layers, rnn_persistent.last_path()
    assert got.keys() == expected.keys()
    # Long dot products (K = H up to 1024) in a different order: scale the fp32 tolerance with sqrt(H / 64).
    scale = max(1.0, (H / 64) ** 0.5)
    tol = {k: v * scale for k, v in TOLERANCES[torch.float32].items()}
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], **tol, msg=lambda m, k=key: f"{key}: {m}")


@pytest.mark.parametrize("cell", CELLS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("shape", [(20, 8, 32, 64), (10, 64, 64, 512), (6, 16, 768, 768)],
                         ids=lambda s: "t{}-n{}-i{}-h{}".format(*s))
@pytest.mark.parametrize("train", [False, True], ids=["inference", "training"])
def test_persistent_half_within_2x_of_cudnn_error(cell, dtype, shape, train):
    T, N, I, H = shape
    require_plan(cell, H, N, dtype)
    theirs, _ = modules(cell, I, H, dtype)
    oracle_module = copy.deepcopy(theirs).double()
    ours = clone_module(copy.deepcopy(theirs), CELLS[cell].module)
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(T, N, I, generator=gen).to("cuda", dtype)
    hx = states(cell, 1, N, H, dtype, gen)
    hx64 = tuple(h.double() for h in hx) if isinstance(hx, tuple) else hx.double()
    with rnn_persistent.enabled(False):
        oracle = run(oracle_module, x.double(), hx64, train)
    their = run(theirs, x, hx, train)
    before, before_backward = persistent_layers(), persistent_backward_layers()
    our = run(ours, x, hx, train)
    assert persistent_layers() - before == 1, rnn_persistent.last_path()
    if train and require_plan(cell, H, N, dtype, backward=True):
        assert persistent_backward_layers() - before_backward == 1, rnn_persistent.last_path()
    eps = torch.finfo(dtype).eps
    for key, exact in oracle.items():
        their_err = (their[key] - exact).abs().max().item()
        our_err = (our[key] - exact).abs().max().item()
        floor = 2 * eps * max(1.0, exact.abs().max().item())
        assert our_err <= 2 * their_err + floor, \
            f"{key}: genfast {our_err:.3g} > 2 x cuDNN {their_err:.3g} + {floor:.3g}"


@pytest.mark.parametrize("reverse", [False, True], ids=["forward", "reverse"])
def test_persistent_op_results_and_workspace_match_the_per_step_path(reverse):
    # Same op, both paths: output, final states and the workspace (what backward reads: saved gates, c_t)
    # agree to fp32 rounding, so the layout is the same.
    cell = LSTM
    theirs, ours = modules("lstm", 16, 64, torch.float32)
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(7, 5, 16, generator=gen).to("cuda")
    hx = states("lstm", 1, 5, 64, torch.float32, gen)
    w = [p.detach() for p in theirs.parameters()]
    args = (x, hx[0][0], hx[1][0], w[0], w[1], w[2], w[3], None, None, reverse, True)
    with rnn_persistent.enabled(False):
        per_step = cell.forward_op(*args)
    assert rnn_persistent.last_path()["path"] == "per-step"
    persistent = cell.forward_op(*args)
    assert rnn_persistent.last_path()["path"] == "persistent", rnn_persistent.last_path()
    for a, b in zip(persistent, per_step):
        assert a.shape == b.shape
        torch.testing.assert_close(a, b, **TOLERANCES[torch.float32])


@pytest.mark.parametrize("cell", CELLS)
@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
@pytest.mark.parametrize("reverse", [False, True], ids=["forward", "reverse"])
def test_persistent_backward_op_matches_the_per_step_backward(cell, packed, reverse):
    # The backward op on the same forward results, both paths: every gradient agrees to fp32 rounding (the
    # persistent kernel carries dL/dh in fp32 and sums dG W_hh in its own order).
    c = CELLS[cell]
    case = op_case(c, steps=7, batch=6, input_size=10, hidden=64, packed=packed, reverse=reverse,
                   dtype=torch.float32, device="cuda", seed=9)
    output, finals, workspace = run_forward_op(c, case, train=True)
    gen = torch.Generator().manual_seed(10)
    grad_out = torch.randn(output.shape, generator=gen).to("cuda")
    grad_states = [torch.randn(f.shape, generator=gen).to("cuda") for f in finals]
    args = c.backward_args(grad_out, grad_states, case["x"], case["states"], case["w"], output, workspace,
                           case["batch_sizes"], reverse)
    with rnn_persistent.enabled(False):
        per_step = c.split_backward(c.backward_op(*args))
    before = persistent_backward_layers()
    persistent = c.split_backward(c.backward_op(*args))
    assert persistent_backward_layers() - before == 1, rnn_persistent.last_path()
    assert persistent.keys() == per_step.keys()
    for key in per_step:
        if per_step[key] is not None and per_step[key].numel():
            torch.testing.assert_close(persistent[key], per_step[key], **TOLERANCES[torch.float32],
                                       msg=lambda m, k=key: f"grad {k}: {m}")


@pytest.mark.parametrize("cell", CELLS)
def test_fallbacks_say_why(cell):
    theirs, ours = modules(cell, 8, 64, torch.float32)
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(6, 3, 8, generator=gen).to("cuda")
    # Off: the per-step path, saying so.
    with rnn_persistent.enabled(False):
        ours(x)
    assert rnn_persistent.last_path()["path"] == "per-step"
    assert "GENFAST_RNN_PERSISTENT" in rnn_persistent.last_path()["reason"]
    # A hidden size that is not a whole number of 16-byte vectors: the plan refuses, per-step runs.
    _, odd = modules(cell, 8, 30, torch.float32)
    odd(x)
    assert rnn_persistent.last_path()["path"] == "per-step"
    assert rnn_persistent.last_path()["reason"].startswith("plan: H=30 is not a multiple of 4")
    # float64: not a dtype of the kernel.
    _, wide = modules(cell, 8, 64, torch.float64)
    wide(x.double())
    assert rnn_persistent.last_path()["reason"].startswith("dtype")


@pytest.mark.parametrize("cell", CELLS)
@pytest.mark.parametrize("train", [False, True], ids=["inference", "training"])
def test_persistent_packed_matches_torch(cell, train):
    # Packed, unsorted lengths, 2-layer bidirectional: rows leave (forward) and join (reverse) the batch.
    theirs, ours = modules(cell, 12, 64, torch.float32, num_layers=2, bidirectional=True)
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(9, 6, 12, generator=gen).to("cuda")
    packed = pack_padded_sequence(x, torch.tensor([4, 9, 1, 7, 9, 3]), enforce_sorted=False)
    hx = states(cell, 4, 6, 64, torch.float32, gen)
    before = persistent_layers()

    def results(module):
        module.zero_grad(set_to_none=True)
        data = packed.data.detach().clone().requires_grad_(train)
        inp = torch.nn.utils.rnn.PackedSequence(data, packed.batch_sizes, packed.sorted_indices,
                                                packed.unsorted_indices)
        with torch.set_grad_enabled(train):
            out, final = module(inp, hx)
        finals = list(final) if isinstance(final, tuple) else [final]
        got = {"output": out.data.detach(), **{f"final{i}": f.detach() for i, f in enumerate(finals)}}
        if train:
            (out.data.sum() + sum(f.sum() for f in finals)).backward()
            got["grad_input"] = data.grad
            got.update({f"grad_{n}": p.grad for n, p in module.named_parameters()})
        return got

    before_backward = persistent_backward_layers()
    expected, got = results(theirs), results(ours)
    assert persistent_layers() - before == 4, rnn_persistent.last_path()
    assert "packed" in rnn_persistent.last_path()["reason"]
    if train:
        assert persistent_backward_layers() - before_backward == 4, rnn_persistent.last_path()
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], **TOLERANCES[torch.float32],
                                   msg=lambda m, k=key: f"{k}: {m}")


def test_lstm_projection_falls_back():
    theirs, ours = modules("lstm", 8, 64, torch.float32, proj_size=16)
    x = torch.randn(5, 2, 8, device="cuda")
    out, _ = ours(x)
    assert rnn_persistent.last_path()["reason"].startswith("proj_size")
    torch.testing.assert_close(out, theirs(x)[0], **TOLERANCES[torch.float32])
