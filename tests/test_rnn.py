"""genfast's recurrent layers (genfast.nn.LSTM, GRU, LSTMCell, GRUCell and the genfast::<cell>_* ops)
against torch.nn on the same weights, and against the textbook equations of genfast.reference.

Parameterised over the cell (tests/rnn_cells.py, CELLS), the device (CPU; CUDA where one is present,
skipped otherwise) and the dtype. With a CUDA device present, the extension must have been built
with its CUDA kernels: a CPU-only build on a GPU machine fails here instead of skipping quietly.

Layers of checks:
  * module level (genfast.nn copied from torch.nn with from_torch): outputs, final states and every
    gradient (input, initial states, parameters) against torch.nn (oneDNN/MKL on the CPU, cuDNN on
    CUDA with TF32 off) in float32 and float64; float16 / bfloat16 by the rules of each device.
  * op level (torch.ops.genfast.*, no module): float64 forward and backward against genfast.reference
    on padded and packed input, both directions, with and without bias and projection; gradcheck
    through the registered autograd; opcheck; arguments named in errors.
"""
from __future__ import annotations

import copy
import os
import pathlib
import subprocess
import sys
import threading

import pytest
import torch
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence

import genfast.nn as gnn
from genfast import _extension, routing
from tests.rnn_cells import (CELLS, TOLERANCES, assert_reduced_precision_matches_float64, assert_same,
                             assert_same_for_any_thread_count, clone_module, op_case, packed_input,
                             padded_input, random_states, reference_for_case, run_both, run_forward_op, torch_module)

ROOT = pathlib.Path(__file__).resolve().parents[1]
FLOATS = [torch.float32, torch.float64]
HALVES = [torch.bfloat16, torch.float16]

CUDA = pytest.param("cuda", marks=[pytest.mark.cuda,
                                   pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")])
DEVICES = ["cpu", CUDA]


@pytest.fixture(params=DEVICES)
def device(request):
    """The device a test runs on. On CUDA: the kernels must be built in, and torch's side computes in
    true float32 (cuDNN RNNs and matmuls use TF32 by default on Ampere and later). genfast.routing's rules
    are off, so that the modules run genfast's CUDA kernels (tests/test_routing.py tests the routing)."""
    if request.param == "cpu":
        yield "cpu"
        return
    assert _extension.load().cuda_built(), "a CUDA device is present but genfast._C was built without CUDA kernels"
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        with routing.force_kernels():
            yield "cuda"
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


cells = pytest.mark.parametrize("cell", CELLS, ids=lambda c: c.name)


def per_cell(cases):
    """pytest params (cell, case) for every cell and every case dict it can run: a case with a
    projection (proj > 0) only for the cells that take one."""
    def case_id(case):
        return "-".join(str(v) if k == "case" else f"{k}{int(v) if isinstance(v, bool) else v}"
                        for k, v in case.items())
    return [pytest.param(cell, case, id=f"{cell.name}-{case_id(case)}")
            for cell in CELLS for case in cases if cell.projection or not case.get("proj")]


def _modules(cell, device, dtype, *, input_size, hidden, proj=0, seed=0, **kwargs):
    """A torch.nn module (seeded initialisation) and genfast's copy of it, both on ``device``."""
    torch.manual_seed(seed)
    ref = torch_module(cell, input_size, hidden, proj, dtype=dtype, **kwargs).to(device)
    return ref, clone_module(ref, cell.module)


# ---------------------------------------------------------------- module level, against torch.nn
# num_layers 1-3, every flag on in some case, sizes that are not multiples of 8 or 16 (below).
MODULE_CONFIGS = [
    dict(layers=1, bidirectional=False, batch_first=False, proj=0, bias=True),
    dict(layers=2, bidirectional=True, batch_first=False, proj=0, bias=True),
    dict(layers=3, bidirectional=False, batch_first=True, proj=0, bias=False),
    dict(layers=2, bidirectional=True, batch_first=True, proj=0, bias=False),
    dict(layers=2, bidirectional=True, batch_first=True, proj=0, bias=True),
    dict(layers=2, bidirectional=True, batch_first=True, proj=5, bias=True),
    dict(layers=1, bidirectional=False, batch_first=False, proj=7, bias=False),
    dict(layers=2, bidirectional=False, batch_first=True, proj=6, bias=True),
]


@pytest.mark.parametrize("cell,config", per_cell(MODULE_CONFIGS))
@pytest.mark.parametrize("dtype", FLOATS, ids=str)
@pytest.mark.parametrize("with_hx", [False, True])
def test_module_matches_torch(cell, config, device, dtype, with_hx):
    T, N, I, H = 7, 3, 11, 19
    layers, proj, batch_first = config["layers"], config["proj"], config["batch_first"]
    ref, mine = _modules(cell, device, dtype, input_size=I, hidden=H, proj=proj, num_layers=layers, bias=config["bias"],
                         batch_first=batch_first, bidirectional=config["bidirectional"])
    x = torch.randn((N, T, I) if batch_first else (T, N, I), dtype=dtype).to(device)
    directions = 2 if config["bidirectional"] else 1
    hx = random_states(cell, (layers * directions, N), H, proj, dtype, device) if with_hx else None
    assert_same(run_both(ref, mine, padded_input(x), hx), dtype)


@cells
@pytest.mark.parametrize("dtype", FLOATS, ids=str)
@pytest.mark.parametrize("T,N,I,H", [(1, 1, 3, 5), (1, 4, 8, 16), (5, 1, 2, 33), (4, 13, 9, 40), (3, 70, 6, 17)])
def test_module_shapes(cell, device, dtype, T, N, I, H):
    """Batch 1, sequence length 1, one-step batches of several rows, and sizes around the kernels'
    16-unit panels and row blocks."""
    ref, mine = _modules(cell, device, dtype, input_size=I, hidden=H, seed=1)
    x = torch.randn(T, N, I, dtype=dtype).to(device)
    assert_same(run_both(ref, mine, padded_input(x)), dtype)


PACKED_CONFIGS = [
    dict(layers=2, bidirectional=False, proj=0, bias=True),
    dict(layers=2, bidirectional=True, proj=0, bias=True),
    dict(layers=2, bidirectional=True, proj=0, bias=False),
    dict(layers=2, bidirectional=True, proj=4, bias=True),
    dict(layers=1, bidirectional=True, proj=5, bias=False),
]


@pytest.mark.parametrize("cell,config", per_cell(PACKED_CONFIGS))
@pytest.mark.parametrize("dtype", FLOATS, ids=str)
@pytest.mark.parametrize("enforce_sorted", [True, False])
def test_packed_sequence(cell, config, device, dtype, enforce_sorted):
    lengths = [6, 6, 4, 3, 1] if enforce_sorted else [6, 6, 4, 1, 3]
    proj, layers = config["proj"], config["layers"]
    ref, mine = _modules(cell, device, dtype, input_size=5, hidden=9, proj=proj, num_layers=layers,
                         bidirectional=config["bidirectional"], bias=config["bias"], seed=2)
    make = packed_input(lengths, 5, dtype, enforce_sorted, device=device)
    directions = 2 if config["bidirectional"] else 1
    hx = random_states(cell, (layers * directions, 5), 9, proj, dtype, device)
    assert_same(run_both(ref, mine, make, hx), dtype)
    out, _ = mine(make())
    assert isinstance(out, PackedSequence)


# Both sides of each choice the CPU forward makes between computing X W_ih^T for all steps before
# the time loop, or inside it with the recurrent product, and between reading W_hh in place (dot
# products) or as packed panels. The choices depend on the batch, the steps and the weights' size
# (machine-tuned thresholds in csrc/cpu); these shapes sit far on either side of each, and only
# results are asserted.
PATH_CASES = [
    dict(case="one-sequence", steps=6, batch=1, input_size=7, hidden=20, proj=6, layers=2, hx=True),
    dict(case="one-sequence", steps=6, batch=1, input_size=7, hidden=20, proj=0, layers=2, hx=True),
    dict(case="two-sequences-packed", steps=5, batch=2, input_size=7, hidden=20, proj=6, layers=2, hx=False),
    dict(case="two-sequences-packed", steps=5, batch=2, input_size=7, hidden=20, proj=0, layers=2, hx=False),
    dict(case="small-weights", steps=4, batch=8, input_size=64, hidden=64, proj=0, layers=1, hx=False),
    # (1024 + 1024) * gates * 1024 float32 values: 32 MB (LSTM), 24 MB (GRU)
    dict(case="large-weights", steps=3, batch=8, input_size=1024, hidden=1024, proj=0, layers=1, hx=False),
    dict(case="large-batch", steps=4, batch=96, input_size=24, hidden=40, proj=0, layers=1, hx=False),
]


@pytest.mark.parametrize("cell,path", per_cell(PATH_CASES))
def test_input_projection_and_weight_paths(cell, path):
    dtype = torch.float32 if path["case"] == "large-weights" else torch.float64
    ref, mine = _modules(cell, "cpu", dtype, input_size=path["input_size"], hidden=path["hidden"], proj=path["proj"],
                         num_layers=path["layers"], bidirectional=path["layers"] > 1, seed=3)
    if path["case"] == "two-sequences-packed":
        make = packed_input([path["steps"], 3], path["input_size"], dtype, enforce_sorted=False)
    else:
        make = padded_input(torch.randn(path["steps"], path["batch"], path["input_size"], dtype=dtype))
    directions = 2 if path["layers"] > 1 else 1
    hx = random_states(cell, (path["layers"] * directions, path["batch"]), path["hidden"], path["proj"],
                       dtype) if path["hx"] else None
    assert_same(run_both(ref, mine, make, hx), dtype)


@pytest.mark.parametrize("cell,config", per_cell([dict(input="padded", proj=0), dict(input="packed", proj=0),
                                                   dict(input="padded", proj=24)]))
def test_same_result_for_any_thread_count(cell, config):
    # Big enough per step that the CPU time loop runs on a team of threads (csrc/cpu/rnn_common.h).
    torch.manual_seed(4)
    mine = cell.module(24, 72, bidirectional=True, **({"proj_size": config["proj"]} if config["proj"] else {}))
    if config["input"] == "packed":
        make = packed_input([7, 7, 5, 5, 5, 4, 2, 1] * 4, 24, torch.float32, enforce_sorted=False)
    else:
        make = padded_input(torch.randn(7, 30, 24))
    assert_same_for_any_thread_count(mine, make)


@cells
def test_concurrent_calls_from_python_threads(cell):
    # Each CPU call runs its own team of threads; two at once must not disturb each other.
    torch.manual_seed(5)
    mine = cell.module(24, 72)
    inputs = [torch.randn(7, 30, 24, requires_grad=True) for _ in range(4)]

    def run(x):
        out, hx = mine(x)
        loss = (out * out).sum() + sum(s.sum() for s in cell.as_list(hx))
        grad_x, = torch.autograd.grad(loss, x)
        return out.detach(), grad_x

    expected = [run(x) for x in inputs]
    results = [None] * len(inputs)

    def worker(i):
        for _ in range(3):
            results[i] = run(inputs[i])

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(len(inputs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for (out, grad_x), (out_ref, grad_ref) in zip(results, expected):
        assert torch.equal(out, out_ref) and torch.equal(grad_x, grad_ref)


@cells
@pytest.mark.parametrize("dtype", FLOATS, ids=str)
@pytest.mark.parametrize("with_hx", [False, True])
def test_unbatched(cell, device, dtype, with_hx):
    ref, mine = _modules(cell, device, dtype, input_size=4, hidden=6, num_layers=2, bidirectional=True, seed=3)
    x = torch.randn(5, 4, dtype=dtype).to(device)
    hx = random_states(cell, (4,), 6, 0, dtype, device) if with_hx else None
    results = run_both(ref, mine, padded_input(x), hx)
    assert results[1][0].shape == (5, 12)
    assert_same(results, dtype)


@cells
@pytest.mark.parametrize("dtype", FLOATS, ids=str)
@pytest.mark.parametrize("batched", [True, False])
def test_cell_module(cell, device, dtype, batched):
    """LSTMCell / GRUCell: every state and every gradient (input, given states, each parameter)."""
    torch.manual_seed(4)
    ref = cell.torch_cell(7, 10, dtype=dtype).to(device)
    mine = cell.cell_module.from_torch(ref)
    x = torch.randn((3, 7) if batched else (7,), dtype=dtype).to(device)
    hx = random_states(cell, (3,) if batched else (), 10, 0, dtype, device)
    # float64: as TOLERANCES; float32: torch's default (one step, no recurrence to amplify rounding)
    tol = dict(atol=1e-9, rtol=1e-7) if dtype == torch.float64 else {}
    for given in (None, hx):
        results = []
        for module in (ref, mine):
            leaves = [t.clone().requires_grad_(True) for t in [x] + ([] if given is None else cell.as_list(given))]
            module.zero_grad(set_to_none=True)
            states = None if given is None else cell.module_states(leaves[1:])
            outs = cell.as_list(module(leaves[0], states))
            gen = torch.Generator().manual_seed(6)
            loss = sum((o * torch.randn(o.shape, generator=gen, dtype=dtype).to(device)).sum() for o in outs)
            loss.backward()
            results.append([o.detach() for o in outs] + [t.grad for t in leaves] +
                           [p.grad for p in module.parameters()])
        assert len(results[0]) == len(results[1])
        for i, (a, b) in enumerate(zip(results[1], results[0])):
            torch.testing.assert_close(a, b, **tol, msg=lambda m, i=i: f"tensor {i}: {m}")


@cells
def test_state_dict_round_trip_and_init(cell):
    kwargs = dict(num_layers=2, bidirectional=True, **({"proj_size": 4} if cell.projection else {}))
    torch.manual_seed(5)
    mine = cell.module(8, 12, **kwargs)
    torch.manual_seed(5)
    ref = cell.torch_module(8, 12, **kwargs)
    # Same initialisation from the same seed, same names and shapes both ways.
    assert len(list(mine.named_parameters())) == len(list(ref.named_parameters()))
    for (n1, p1), (n2, p2) in zip(mine.named_parameters(), ref.named_parameters()):
        assert n1 == n2
        torch.testing.assert_close(p1, p2)
    ref2 = cell.torch_module(8, 12, **kwargs)
    ref2.load_state_dict(mine.state_dict())
    mine.load_state_dict(ref.state_dict())


@cells
@pytest.mark.parametrize("bias", [True, False])
def test_follows_reassigned_weights_and_dtype_changes(cell, bias):
    """The modules read RNNBase's _flat_weights (as torch.nn does): a weight assigned anew, or the
    module converted with .double(), must be what the next forward uses."""
    ref, mine = _modules(cell, "cpu", torch.float32, input_size=3, hidden=5, proj=2 if cell.projection else 0,
                         num_layers=2, bidirectional=True, bias=bias, seed=9)
    new = torch.randn_like(ref.weight_hh_l1_reverse)
    ref.weight_hh_l1_reverse = torch.nn.Parameter(new.clone())
    mine.weight_hh_l1_reverse = torch.nn.Parameter(new.clone())
    ref.double()
    mine.double()
    x = torch.randn(4, 2, 3, dtype=torch.float64)
    assert_same(run_both(ref, mine, padded_input(x)), torch.float64)


def test_replace_rnns_keeps_weights():
    torch.manual_seed(6)
    model = torch.nn.Sequential()
    model.add_module("emb", torch.nn.Embedding(20, 8))
    model.add_module("lstm", torch.nn.LSTM(8, 6, batch_first=True))
    inner = torch.nn.Module()
    inner.cell = torch.nn.LSTMCell(3, 4)
    inner.gru = torch.nn.GRU(3, 4)
    inner.gru_cell = torch.nn.GRUCell(3, 4)
    model.add_module("inner", inner)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    tokens = torch.randint(0, 20, (2, 5))
    expected, _ = model.lstm(model.emb(tokens))
    gnn.replace_rnns(model)
    assert type(model.lstm) is gnn.LSTM and type(model.inner.cell) is gnn.LSTMCell
    assert type(model.inner.gru) is gnn.GRU and type(model.inner.gru_cell) is gnn.GRUCell
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, before[k])
    got, _ = model.lstm(model.emb(tokens))
    torch.testing.assert_close(got, expected, **TOLERANCES[torch.float32])


@cells
def test_dropout_between_layers(cell, device):
    torch.manual_seed(7)
    m = cell.module(4, 8, 3, dropout=0.5).to(device)
    x = torch.randn(5, 2, 4).to(device)
    m.eval()
    a, _ = m(x)
    b, _ = m(x)
    torch.testing.assert_close(a, b)  # eval: deterministic
    m.train()
    c, _ = m(x)
    d, _ = m(x)
    assert not torch.equal(c, d)  # training: dropout masks differ between calls
    # With dropout 0 in training, the result equals eval mode.
    m0 = cell.module(4, 8, 3, dropout=0.0).to(device)
    m0.load_state_dict(m.state_dict())
    torch.testing.assert_close(m0.train()(x)[0], m0.eval()(x)[0])


@cells
def test_bias_gradients_accumulate_in_their_own_storage(cell, device):
    """A second backward accumulates in place into .grad: b_ih's and b_hh's gradients (one tensor in the
    LSTM op) must not share storage, and both must come out as torch.nn's."""
    ref, mine = _modules(cell, device, torch.float32, input_size=3, hidden=4, seed=10)
    for _ in range(2):
        x = torch.randn(2, 1, 3).to(device)
        for m in (ref, mine):
            m(x)[0].sum().backward()
    assert mine.bias_ih_l0.grad.data_ptr() != mine.bias_hh_l0.grad.data_ptr()
    for name in ("bias_ih_l0", "bias_hh_l0", "weight_hh_l0"):
        torch.testing.assert_close(getattr(mine, name).grad, getattr(ref, name).grad, **TOLERANCES[torch.float32])


@cells
def test_torch_compile_fullgraph(cell, device):
    torch.manual_seed(8)

    class Model(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.rnn = cell.module(6, 8, 2, batch_first=True, bidirectional=True)
            self.head = torch.nn.Linear(16, 1)

        def forward(self, x):
            out, hx = self.rnn(x)
            return self.head(out[:, -1]).sum() + sum(s.pow(2).sum() for s in cell.as_list(hx))

    model = Model().to(device)
    x = torch.randn(3, 5, 6).to(device)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    results = []
    for fn in (model, compiled):
        leaf = x.clone().requires_grad_(True)
        value = fn(leaf)
        results.append([value.detach(), *torch.autograd.grad(value, [leaf, *model.parameters()])])
    for got, expected in zip(results[1], results[0]):
        torch.testing.assert_close(got, expected)


@cells
def test_non_contiguous_input_just_works(cell, device):
    ref, mine = _modules(cell, device, torch.float32, input_size=4, hidden=6, seed=9)
    x = torch.randn(5, 8, 4).to(device)[:, ::2]  # (5, 4, 4), strided batch dim
    assert not x.is_contiguous()
    torch.testing.assert_close(mine(x)[0], ref(x)[0], **TOLERANCES[torch.float32])


@cells
def test_nan_propagates(cell, device):
    m = cell.module(3, 4).to(device)
    x = torch.randn(4, 2, 3).to(device)
    x[1, 0, 0] = float("nan")
    out, _ = m(x)
    assert torch.isnan(out[1:, 0]).all()  # sequence 0 is NaN from step 1 on
    assert not torch.isnan(out[:, 1]).any()  # sequence 1 is untouched
    assert not torch.isnan(out[0]).any()


@cells
def test_inference_under_no_grad_matches_torch(cell, device):
    """No autograd: the forward keeps no workspace. Batch 1, two bidirectional layers, given states."""
    ref, mine = _modules(cell, device, torch.float32, input_size=10, hidden=16, num_layers=2, bidirectional=True)
    x = torch.randn(7, 1, 10).to(device)
    hx = random_states(cell, (4, 1), 16, 0, torch.float32, device, scale=0.5)
    with torch.no_grad():
        expected_out, expected_hx = ref(x, hx)
        out, got_hx = mine(x, hx)
    for a, b in zip([out, *cell.as_list(got_hx)], [expected_out, *cell.as_list(expected_hx)]):
        torch.testing.assert_close(a, b, **TOLERANCES[torch.float32])


@cells
def test_module_bad_input_errors(cell, device):
    m = cell.module(4, 5).to(device)
    x = torch.randn(3, 2, 4).to(device)
    with pytest.raises(RuntimeError, match="input.size\\(-1\\) must be equal to input_size"):
        m(torch.randn(3, 2, 6).to(device))
    with pytest.raises(ValueError, match="2D or 3D"):
        m(x.unsqueeze(-1))
    with pytest.raises((RuntimeError, ValueError), match="dtype|type"):
        m(x.double())
    with pytest.raises(RuntimeError, match="Expected hidden"):
        # the hidden state of batch 3 against an input of batch 2
        m(x, random_states(cell, (1, 3), 5, device=device))
    with pytest.raises(ValueError, match="empty batch"):
        m(torch.randn(3, 0, 4).to(device))
    with pytest.raises(ValueError, match="sequence length 0"):
        m(torch.randn(0, 2, 4).to(device))


# ---------------------------------------------------------------- bfloat16 / float16
@cells
@pytest.mark.parametrize("dtype", HALVES, ids=str)
@pytest.mark.parametrize("with_hx", [False, True])
def test_reduced_precision_runs_in_float32_on_cpu(cell, dtype, with_hx):
    """bfloat16 / float16 on the CPU: computed in float32 and rounded once (tests/rnn_cells.py), so within
    2 units of roundoff of float64 on the same rounded weights: outputs, states, every gradient. A
    bidirectional layer over (7, 3, 5) and a cell step over (3, 5), hidden size 6."""
    torch.manual_seed(3)
    states = len(cell.states) if with_hx else 0
    assert_reduced_precision_matches_float64(cell.module(5, 6, bidirectional=True), dtype, (7, 3, 5),
                                             [(2, 3, 6)] * states)
    assert_reduced_precision_matches_float64(cell.cell_module(5, 6), dtype, (3, 5), [(3, 6)] * states)


def _forward_backward_in_float64_loss(cell, module, x, hx, lengths, batch_first, seed=1):
    """Output, final states and every gradient for a fixed random loss summed in float64."""
    x = x.detach().clone().requires_grad_()
    states = [s.detach().clone().requires_grad_() for s in cell.as_list(hx)]
    module.zero_grad(set_to_none=True)
    inp = x if lengths is None else pack_padded_sequence(x, lengths, batch_first=batch_first, enforce_sorted=False)
    out, finals = module(inp, cell.module_states(states))
    out = out.data if lengths is not None else out
    finals = cell.as_list(finals)
    gen = torch.Generator().manual_seed(seed)
    weight = lambda t: torch.randn(t.shape, generator=gen, dtype=torch.float64).to(t.device)  # noqa: E731
    loss = (out.double() * weight(out)).sum() + sum((f.double() * weight(f)).sum() for f in finals)
    loss.backward()
    results = {"output": out.detach(), "grad_input": x.grad}
    results.update({f"final_state{i}": f.detach() for i, f in enumerate(finals)})
    results.update({f"grad_state{i}": s.grad for i, s in enumerate(states)})
    results.update({f"grad_{name}": p.grad for name, p in module.named_parameters()})
    return results


HALF_CONFIGS = [
    dict(layers=1, bidirectional=False, batch_first=False, bias=True, proj=0, packed=False),
    dict(layers=2, bidirectional=True, batch_first=False, bias=True, proj=0, packed=True),
    dict(layers=2, bidirectional=True, batch_first=False, bias=False, proj=0, packed=True),
    dict(layers=1, bidirectional=True, batch_first=False, bias=False, proj=5, packed=True),
    dict(layers=2, bidirectional=True, batch_first=True, bias=True, proj=0, packed=False),
]


@pytest.mark.parametrize("device", [CUDA], indirect=True)
@pytest.mark.parametrize("cell,config", per_cell(HALF_CONFIGS))
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_reduced_precision_on_cuda_within_2x_of_cudnn_error(cell, config, device, dtype):
    """float16 / bfloat16 on CUDA run natively: genfast's error against float64 is at most twice
    cuDNN's error in the same dtype (plus a floor)."""
    torch.manual_seed(0)
    base = torch_module(cell, 32, 64, config["proj"], num_layers=config["layers"], bias=config["bias"],
                        batch_first=config["batch_first"], bidirectional=config["bidirectional"]).to(device)
    torch_low = copy.deepcopy(base).to(dtype)
    # The float64 oracle starts from the same rounded weights and inputs as both low-precision runs.
    torch_64 = copy.deepcopy(torch_low).double()
    ours_low = clone_module(copy.deepcopy(torch_low), cell.module)
    steps, batch = 20, 8
    gen = torch.Generator().manual_seed(0)
    shape = (batch, steps, 32) if config["batch_first"] else (steps, batch, 32)
    x = torch.randn(*shape, generator=gen, dtype=torch.float64).to(device, dtype)
    directions = 2 if config["bidirectional"] else 1
    hx = [s.to(dtype) for s in cell.as_list(random_states(cell, (config["layers"] * directions, batch), 64,
                                                          config["proj"], torch.float64, device, scale=0.5,
                                                          generator=gen))]
    lengths = None
    if config["packed"]:  # unsorted lengths (enforce_sorted=False), one of full length
        lengths = torch.randint(1, steps + 1, (batch,), generator=gen)
        lengths[batch // 2] = steps
    run = lambda module, inp, states: _forward_backward_in_float64_loss(  # noqa: E731
        cell, module, inp, cell.module_states(states), lengths, config["batch_first"])
    oracle = run(torch_64, x.double(), [s.double() for s in hx])
    theirs = run(torch_low, x, hx)
    ours = run(ours_low, x, hx)
    eps = torch.finfo(dtype).eps
    assert oracle.keys() == ours.keys() == theirs.keys()
    for key, exact in oracle.items():
        their_err = (theirs[key].double() - exact).abs().max().item()
        our_err = (ours[key].double() - exact).abs().max().item()
        # Floor: a couple of roundings of the largest value, so an exact cuDNN result on a tensor
        # does not demand exactness from us.
        floor = 2 * eps * max(1.0, exact.abs().max().item())
        assert our_err <= 2 * their_err + floor, (
            f"{key}: genfast error {our_err:.3g} > 2 x cuDNN error {their_err:.3g} + floor {floor:.3g}")


# ---------------------------------------------------------------- op level, against genfast.reference
OP_CASES = [
    dict(packed=False, reverse=False, bias=True, proj=0),
    dict(packed=False, reverse=True, bias=True, proj=0),
    dict(packed=False, reverse=True, bias=False, proj=0),
    dict(packed=True, reverse=False, bias=True, proj=0),
    dict(packed=True, reverse=True, bias=True, proj=0),
    dict(packed=True, reverse=True, bias=False, proj=0),
    dict(packed=False, reverse=False, bias=False, proj=3),
    dict(packed=False, reverse=True, bias=True, proj=3),
    dict(packed=True, reverse=True, bias=True, proj=3),
    dict(packed=True, reverse=False, bias=True, proj=3),
]


@pytest.mark.parametrize("cell,params", per_cell(OP_CASES))
@pytest.mark.parametrize("sizes", [(6, 4, 5, 7), (5, 3, 33, 300)], ids=["small", "multiblock"])
def test_op_forward_backward_fp64_matches_reference(cell, params, sizes, device):
    steps, batch, input_size, hidden = sizes
    case = op_case(cell, steps=steps, batch=batch, input_size=input_size, hidden=hidden, device=device, **params)
    leaf = lambda t: None if t is None else t.clone().requires_grad_()  # noqa: E731
    x_leaf, state_leaves = leaf(case["x_padded"]), [leaf(s) for s in case["states"]]
    w_leaves = {k: leaf(v) for k, v in case["w"].items()}
    ref_out, ref_states = reference_for_case(cell, case, x_leaf, state_leaves, w_leaves)

    output, states, workspace = run_forward_op(cell, case, train=True)
    # float64 on both sides, same equations; differences are summation order only (~1e-15
    # relative), so 1e-10 leaves wide margin while catching any indexing mistake.
    tol = dict(rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(output, ref_out, **tol)
    assert len(states) == len(ref_states) == len(cell.states)
    for name, got, want in zip(cell.states, states, ref_states):
        torch.testing.assert_close(got, want, **tol, msg=lambda m, n=name: f"final {n}: {m}")
    no_train = run_forward_op(cell, case, train=False)
    assert no_train[2].numel() == 0, "workspace must be empty when train=False"
    for a, b in zip([no_train[0], *no_train[1]], [output, *states]):
        torch.testing.assert_close(a, b, **tol)

    gen = torch.Generator().manual_seed(1)
    rand_like = lambda t: torch.randn(t.shape, generator=gen, dtype=torch.float64).to(device)  # noqa: E731
    grad_out, grad_states = rand_like(ref_out), [rand_like(s) for s in ref_states]
    loss = (ref_out * grad_out).sum() + sum((s * g).sum() for s, g in zip(ref_states, grad_states))
    wrt = {"x": x_leaf, **dict(zip(cell.states, state_leaves)), **{k: v for k, v in w_leaves.items() if v is not None}}
    ref_grads = dict(zip(wrt, torch.autograd.grad(loss, list(wrt.values()))))
    if case["batch_sizes"] is not None:
        ref_grads["x"] = pack_padded_sequence(ref_grads["x"], case["lengths"]).data

    grads = cell.split_backward(cell.backward_op(*cell.backward_args(
        grad_out, grad_states, case["x"], case["states"], case["w"], output, workspace, case["batch_sizes"],
        case["reverse"])))
    torch.testing.assert_close(grads["input"], ref_grads["x"], **tol, msg=lambda m: f"grad input: {m}")
    for name in (*cell.states, *cell.weights):
        if name in ref_grads:
            torch.testing.assert_close(grads[name], ref_grads[name], **tol, msg=lambda m, n=name: f"grad {n}: {m}")
        elif name.startswith("b_"):  # no bias: the op still returns a bias gradient of the bias's shape
            assert grads[name].shape == (cell.gates * hidden,), name
        else:  # no projection: an empty w_hr gradient
            assert grads[name].numel() == 0, name


# (packed, reverse, bias, proj); gradcheck's tolerance as each device's suite had it
GRADCHECK_CASES = [
    dict(packed=False, reverse=False, bias=True, proj=0),
    dict(packed=False, reverse=True, bias=False, proj=0),
    dict(packed=True, reverse=False, bias=True, proj=0),
    dict(packed=True, reverse=True, bias=True, proj=0),
    dict(packed=False, reverse=False, bias=True, proj=2),
    dict(packed=True, reverse=False, bias=True, proj=2),
    dict(packed=True, reverse=True, bias=True, proj=2),
]
GRADCHECK_ATOL = {"cpu": 1e-7, "cuda": 1e-6}


@pytest.mark.parametrize("cell,params", per_cell(GRADCHECK_CASES))
def test_op_gradcheck_fp64(cell, params, device):
    """Through genfast.ops (the registered autograd: forward op, then backward op), every differentiable
    argument: input, states, weights."""
    case = op_case(cell, steps=3, batch=3, input_size=2, hidden=3, device=device, seed=1, **params)
    names = ["x", *cell.states, *[k for k, v in case["w"].items() if v is not None]]
    values = [case["x"], *case["states"], *[v for v in case["w"].values() if v is not None]]

    def fn(*tensors):
        given = dict(zip(names, tensors))
        w = {k: given.get(k) for k in case["w"]}
        output, states = cell.layer(given["x"], [given[s] for s in cell.states], w, batch_sizes=case["batch_sizes"],
                                    reverse=case["reverse"])
        return (output, *states)

    inputs = tuple(v.clone().requires_grad_() for v in values)
    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=GRADCHECK_ATOL[device])


OPCHECK_CASES = [
    dict(packed=False, reverse=False, proj=0, train=True),
    dict(packed=False, reverse=False, proj=2, train=True),
    dict(packed=True, reverse=True, proj=0, train=True),
    dict(packed=False, reverse=False, proj=0, train=False),  # inference: no workspace, nothing asks for gradients
]


@pytest.mark.parametrize("cell,params", per_cell(OPCHECK_CASES))
def test_opcheck(cell, params, device):
    """torch.library.opcheck of the forward op, and of the backward op on the forward's workspace."""
    case = op_case(cell, steps=3, batch=3, input_size=2, hidden=5, packed=params["packed"], reverse=params["reverse"],
                   proj=params["proj"], dtype=torch.float32, device=device, seed=2)
    train = params["train"]
    grad = lambda t: None if t is None else t.clone().requires_grad_(train)  # noqa: E731
    x, states, w = grad(case["x"]), [grad(s) for s in case["states"]], {k: grad(v) for k, v in case["w"].items()}
    forward_args = cell.forward_args(x, states, w, case["batch_sizes"], case["reverse"], train)
    torch.library.opcheck(cell.forward_op.default, forward_args)
    if not train:
        return
    detached = lambda t: None if t is None else t.detach()  # noqa: E731
    x, states, w = detached(x), [detached(s) for s in states], {k: detached(v) for k, v in w.items()}
    output, finals, workspace = cell.split_forward(cell.forward_op(*cell.forward_args(
        x, states, w, case["batch_sizes"], case["reverse"], True)))
    torch.library.opcheck(cell.backward_op.default, cell.backward_args(
        torch.randn_like(output), [torch.randn_like(f) for f in finals], x, states, w, output, workspace,
        case["batch_sizes"], case["reverse"]))


@cells
def test_backward_needs_the_training_workspace(cell, device):
    """A forward with train=False keeps no workspace: autograd through it, or the backward op given its
    empty workspace, is a clear error naming what to do."""
    case = op_case(cell, steps=2, batch=2, input_size=3, hidden=4, dtype=torch.float32, device=device, seed=4)
    leaf = lambda t: None if t is None else t.clone().requires_grad_()  # noqa: E731
    x, states, w = leaf(case["x"]), [leaf(s) for s in case["states"]], {k: leaf(v) for k, v in case["w"].items()}
    output, finals, workspace = cell.split_forward(cell.forward_op(*cell.forward_args(x, states, w, None, False,
                                                                                      False)))
    assert workspace.numel() == 0
    with pytest.raises(RuntimeError, match=rf"{cell.name}_forward\(\.\.\., train=True\)"):
        output.sum().backward()
    with pytest.raises(RuntimeError, match="workspace"):
        cell.backward_op(*cell.backward_args(output.detach(), [f.detach() for f in finals], case["x"], case["states"],
                                             case["w"], output.detach(), workspace, None, False))


@cells
def test_op_argument_errors_name_the_argument(cell, device):
    H = 4
    case = op_case(cell, steps=3, batch=2, input_size=3, hidden=H, dtype=torch.float32, device=device)
    w, states = case["w"], dict(zip(cell.states, case["states"]))
    bad = [
        *[(dict(**{name: s[:, :H - 1]}), rf"{name}\b.*shape") for name, s in states.items()],
        (dict(hx=states["hx"].double()), r"hx\b.*dtype"),
        (dict(w_hh=w["w_hh"].double()), r"w_hh\b.*dtype"),
        (dict(b_hh=w["b_hh"][:5]), r"b_hh\b.*shape"),
        (dict(w_hh=w["w_hh"][:, :H - 1]), r"w_hh\b.*(shape|must be)"),
        (dict(w_ih=w["w_ih"][:, :2]), r"w_ih\b.*input_size"),
        (dict(x=case["x"].reshape(6, 3), batch_sizes=torch.tensor([1, 2, 2, 1])), r"batch_sizes\b.*non-increasing"),
    ]
    if device == "cpu":  # the CPU kernels compute in float32 or float64 (genfast.ops upcasts halves before)
        halves = dict(x=case["x"].half(), **{n: s.half() for n, s in states.items()},
                      **{k: v.half() for k, v in w.items() if v is not None})
        bad.append((halves, "float32 and float64"))
    else:
        bad.append((dict(x=case["x"].reshape(6, 3), batch_sizes=torch.tensor([2, 2, 2], device=device)),
                    r"batch_sizes\b.*CPU"))
    for override, message in bad:
        with pytest.raises(RuntimeError, match=message):
            run_forward_op(cell, case, False, **override)


# ---------------------------------------------------------------- every CPU SIMD level
_SIMD_LEVEL_CHECK = """
import torch, genfast._C as C
from tests.rnn_cells import CELLS, op_case, reference_for_case, run_forward_op
for cell in CELLS:
    for T, N in [(4, 20), (1, 1), (1, 3)]:
        case = op_case(cell, steps=T, batch=N, input_size=7, hidden=33, proj=9 if cell.projection else 0)
        out, states, _ = run_forward_op(cell, case, False)
        exact = reference_for_case(cell, case, case["x"], case["states"], case["w"])
        torch.testing.assert_close([out, *states], [exact[0], *exact[1]])
        # float32: within a few times the error of the float32 reference, both against float64
        case32 = dict(case, x=case["x"].float(), states=[s.float() for s in case["states"]],
                      w={k: None if v is None else v.float() for k, v in case["w"].items()})
        out32, states32, _ = run_forward_op(cell, case32, False)
        ref32 = reference_for_case(cell, case32, case32["x"], case32["states"], case32["w"])
        for got, theirs, want in zip([out32, *states32], [ref32[0], *ref32[1]], [exact[0], *exact[1]]):
            ours, theirs = (got.double() - want).abs().max(), (theirs.double() - want).abs().max()
            assert ours <= 4 * theirs + 1e-6, (cell.name, T, N, ours.item(), theirs.item())
for rows, K in [(1, 37), (2, 37), (5, 37), (1, 128), (3, 128)]:
    x, w = torch.randn(rows, K, dtype=torch.float64), torch.randn(21, K, dtype=torch.float64)
    torch.testing.assert_close(torch.ops.genfast.decode_linear(x, w, None), x @ w.T)
    # float32: K additions in another order than the float64 reference, each rounding by at most 2^-24 of
    # a partial sum of size ~sqrt(K): K * 2^-20 is 16 / sqrt(K) times their worst case
    torch.testing.assert_close(torch.ops.genfast.decode_linear(x.float(), w.float(), None), (x @ w.T).float(),
                               rtol=0, atol=K * 2**-20)
print(C.simd_level())
"""


@pytest.mark.parametrize("level", ["baseline", "avx2"])
def test_every_simd_level_agrees(level):
    """The baseline and AVX2 copies of the kernels give the reference's numbers too, for every cell: a
    sequence, and one-step calls of 1 and 3 rows; and decode_linear. The level this process runs is
    checked by every other test here, so only the others need a process of their own."""
    if level == _extension.load().simd_level():
        pytest.skip(f"{level} is this process's SIMD level: the rest of this file runs it")
    env = dict(os.environ, GENFAST_SIMD=level)
    done = subprocess.run([sys.executable, "-c", _SIMD_LEVEL_CHECK], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() in (level, "baseline")
