"""genfast.routing: CUDA shapes where a genfast kernel was measured slower than the torch path go to that path.

Without a GPU: the decision function on every measured row of the H200 results (each row the kernel lost must
be routed to the torch path that won it, each row it won must not), every rule on synthetic facts, forcing, the
record that last_dispatch() and genfast.info() give, the facts the drop-ins pass, and the torch paths themselves
on the CPU (the same functions of the same inputs as the kernels and torch.nn). CPU calls never consult the rules.
The CUDA tests at the end skip without a device.
"""
from __future__ import annotations

import copy
import math
import os
import pathlib
import re
import subprocess
import sys

import pytest
import torch

import genfast
from genfast import reference, routing

ROOT = pathlib.Path(__file__).resolve().parents[1]
CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
# A kernel within 2% of the torch path is not routed: that is within the spread of repeated runs.
MARGIN = 0.98


@pytest.fixture(autouse=True)
def _fresh_record():
    saved = dict(routing._last)
    routing._last.clear()
    with routing.force_kernels(False):
        yield
    routing._last.clear()
    routing._last.update(saved)


def _read(relative: str) -> list[str]:
    return (ROOT / relative).read_text().splitlines()


# ---------------------------------------------------------------- the rules against the measurements
DECODE_ROW = re.compile(r"decode_attention (\w+) +B(\d+) H(\d+)/(\d+) D(\d+) L(\d+) +genfast +([\d.]+) +reference "
                        r"+([\d.]+) +torch_sdpa +([\d.]+) +launcher +([\d.]+)")
SAMPLING_ROW = re.compile(r"sampling_draw +B(\d+) V(\d+) t/k/p=\(([\d.]+), (\d+), ([\d.]+)\) +genfast +([\d.]+) "
                          r"+reference +([\d.]+)")
RNN_ROW = re.compile(r"(lstm|gru) +(\w+) +(?:T=(\d+) N=(\d+) I=H=\d+|decode N=(\d+) H=\d+) +(\w+) +torch +([\d.]+) "
                     r"+genfast +([\d.]+)")


def test_decode_attention_rows_route_to_the_torch_path_that_won():
    rows = [m for m in map(DECODE_ROW.search, _read(routing.GENERATION_H200)) if m]
    assert len(rows) == 8
    for m in rows:
        dtype = getattr(torch, m[1])
        b, hq, hkv, d, length = map(int, m.groups()[1:6])
        genfast_ms, reference_ms, sdpa_ms, launcher_ms = map(float, m.groups()[6:])
        kernel = min(genfast_ms, launcher_ms)  # eager calls reach the launcher directly
        best_torch, winner = min((reference_ms, "torch_math"), (sdpa_ms, "torch_sdpa"))
        rule = routing.decide("decode_attention", "cuda", dtype, batch=b, heads_q=hq, heads_kv=hkv, head_dim=d,
                              length=length)
        if best_torch < MARGIN * kernel:
            assert rule is not None and rule.winner == winner, m[0]
        else:
            assert rule is None, m[0]
        # The CUDA-graph path (length read on the device) is never routed.
        assert routing.decide("decode_attention", "cuda", dtype, batch=b, heads_q=hq, heads_kv=hkv, head_dim=d,
                              length=None) is None


def test_sampling_rows_all_lost_and_route_to_the_reference():
    rows = [m for m in map(SAMPLING_ROW.search, _read(routing.GENERATION_H200)) if m]
    assert len(rows) == 9
    for m in rows:
        genfast_ms, reference_ms = float(m[6]), float(m[7])
        assert reference_ms < MARGIN * genfast_ms, m[0]
        for op in ("sampling_draw", "sampling_filter"):
            rule = routing.decide(op, "cuda", torch.float32, rows=int(m[1]), vocab=int(m[2]))
            assert rule is not None and rule.winner == "torch_reference", m[0]


def test_rnn_rows_route_to_cudnn_where_genfast_lost():
    rows = [m for m in map(RNN_ROW.search, _read(routing.RNN_H200)) if m]
    assert len(rows) == 12
    for m in rows:
        cell, dtype = m[1], getattr(torch, m[2])
        steps, batch = (int(m[3]), int(m[4])) if m[3] else (1, int(m[5]))  # decode: one token a call
        torch_ms, genfast_ms = float(m[7]), float(m[8])
        rule = routing.decide("rnn", "cuda", dtype, cell=cell, steps=steps, batch=batch)
        if torch_ms < MARGIN * genfast_ms:
            assert rule is not None and rule.winner == "torch_cudnn", m[0]
        else:
            assert rule is None, m[0]


def test_every_rule_names_real_rows_of_its_measurement_file():
    for rule in routing.RULES:
        path, cited = rule.source.split(" lines ")
        lines = _read(path)
        numbers = []
        for part in cited.split(" (")[0].split(", "):
            first, _, last = part.partition("-")
            numbers += range(int(first), int(last or first) + 1)
        what = {"decode_attention": "decode_attention", "sampling_draw": "sampling_draw",
                "sampling_filter": "sampling_draw", "rnn": ("lstm", "gru")}[rule.op]
        for n in numbers:
            assert lines[n - 1].startswith(what), (rule.name, n, lines[n - 1])
        assert rule.evidence == "measured" or rule.evidence.startswith("inferred: "), rule.name
        assert set(rule.when) <= set(routing.CONDITIONS), rule.name
        if rule.evidence == "measured":  # a measured rule's dtypes are the dtypes of its rows
            for dtype in rule.dtypes:
                name = str(dtype).replace("torch.", "")
                assert all(name in lines[n - 1] for n in numbers) or rule.op.startswith("sampling"), rule.name


# ---------------------------------------------------------------- each rule on synthetic facts
def _attention(dtype, length=1024, batch=1, heads_q=12, heads_kv=12, head_dim=64, device="cuda"):
    return routing.decide("decode_attention", device, dtype, batch=batch, heads_q=heads_q, heads_kv=heads_kv,
                          head_dim=head_dim, length=length)


def test_decode_attention_rules_on_synthetic_shapes():
    for dtype in (torch.float16, torch.bfloat16):
        assert _attention(dtype).winner == "torch_sdpa"
        assert _attention(dtype, batch=32, heads_q=32, heads_kv=8, head_dim=128, length=32768).winner == "torch_sdpa"
        assert _attention(dtype, length=None) is None
        assert _attention(dtype, device="cpu") is None
    assert _attention(torch.bfloat16).evidence.startswith("inferred")
    # float32: plain matmuls up to the largest multi-head shape measured, the kernel beyond it and for GQA.
    assert _attention(torch.float32, length=16384).winner == "torch_math"
    assert _attention(torch.float32, length=16385) is None
    assert _attention(torch.float32, heads_q=32, heads_kv=8) is None
    assert _attention(torch.float32, length=None) is None
    assert _attention(torch.float64) is None  # not measured


def test_sampling_and_rnn_rules_on_synthetic_shapes():
    for op in ("sampling_draw", "sampling_filter"):
        assert routing.decide(op, "cuda", torch.float32, rows=3, vocab=500).name == f"{op}.float32"
        assert routing.decide(op, "cuda", torch.bfloat16, rows=3, vocab=500) is None  # not measured
        assert routing.decide(op, "cpu", torch.float32, rows=3, vocab=500) is None
    rnn = lambda dtype, steps, batch: routing.decide("rnn", "cuda", dtype, cell="lstm", steps=steps, batch=batch)
    assert rnn(torch.float32, 1, 1).name == "rnn.float32" and rnn(torch.float32, 500, 3).name == "rnn.float32"
    assert rnn(torch.bfloat16, 100, 64).name == "rnn.bfloat16.sequences"
    assert rnn(torch.bfloat16, 1, 1) is None and rnn(torch.bfloat16, 99, 64) is None
    assert rnn(torch.bfloat16, 100, 63) is None
    assert rnn(torch.float16, 100, 64) is None and rnn(torch.float64, 100, 64) is None


def test_forcing_and_the_dispatch_record():
    facts = dict(batch=1, heads_q=12, heads_kv=12, head_dim=64, length=1024)
    rule = routing.route("decode_attention", "cuda", torch.float16, "genfast-triton", **facts)
    record = routing.last_dispatch("decode_attention")
    assert rule.name == record["rule"] == "decode_attention.float16" and record["backend"] == "torch_sdpa"
    assert record["source"].startswith(routing.GENERATION_H200)
    with routing.force_kernels():
        assert routing.kernels_forced()
        assert routing.route("decode_attention", "cuda", torch.float16, "genfast-triton", **facts) is None
        assert routing.decide("decode_attention", "cuda", torch.float16, **facts) is rule  # decide ignores forcing
    assert routing.last_dispatch("decode_attention")["backend"] == "genfast-triton"
    assert "forced" in routing.last_dispatch("decode_attention")["reason"]
    assert not routing.kernels_forced()
    routing.route("sampling_draw", "cuda", torch.float16, "genfast-triton", rows=1, vocab=10)
    assert routing.last_dispatch("sampling_draw")["rule"] is None
    assert set(routing.last_dispatch()) == {"decode_attention", "sampling_draw"}
    assert routing.last_dispatch("rnn")["reason"] == "no call yet"


def test_environment_variable_forces_the_kernels():
    code = "from genfast import routing; import torch; print(routing.kernels_forced(), " \
           "routing.route('rnn', 'cuda', torch.float32, 'k', cell='lstm', steps=1, batch=1))"
    env = dict(os.environ, PYTHONPATH=str(ROOT), GENFAST_FORCE_KERNELS="1")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["True", "None"]


def test_info_lists_every_rule_with_its_measurement(capsys):
    report = genfast.info(print_it=True)
    assert len(report["routing"]) == len(routing.RULES) and report["routing_forced"] is False
    for rule, line in zip(routing.RULES, report["routing"]):
        assert line.startswith(rule.name + ":") and rule.source in line and rule.winner in line
    printed = capsys.readouterr().out
    assert all(rule.source in printed for rule in routing.RULES)


# ---------------------------------------------------------------- the drop-ins' facts and torch paths (CPU)
def _cache(batch, heads_q, heads_kv, max_len, dim, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    make = lambda *shape: torch.randn(*shape, generator=g).to(dtype)  # noqa: E731
    return make(batch, heads_q, dim), make(batch, heads_kv, max_len, dim), make(batch, heads_kv, max_len, dim)


def test_decode_attention_passes_its_shape_to_the_rules():
    from genfast.generation import decode

    q, k, v = _cache(1, 12, 12, 1100, 64, torch.float16)
    assert decode._routed_torch_path(q, k, v, 1024) is decode._torch_sdpa
    assert routing.last_dispatch("decode_attention")["rule"] == "decode_attention.float16"
    assert decode._routed_torch_path(q, k, v, torch.tensor([1024])) is None
    assert decode._routed_torch_path(q, k, v, 1101) is None  # out of range: the kernel raises its error
    assert decode._routed_torch_path(q, k[:, :6], v, 10) is None  # malformed: likewise
    q, k, v = _cache(1, 12, 12, 1100, 64)
    assert decode._routed_torch_path(q, k, v, 1024) is decode._torch_math
    q, k, v = _cache(1, 32, 8, 1100, 128)
    assert decode._routed_torch_path(q, k, v, 1024) is None


@pytest.mark.parametrize("heads_q,heads_kv", [(4, 4), (8, 2)])
def test_decode_attention_torch_paths_match_the_op(heads_q, heads_kv):
    from genfast.generation import decode
    from genfast.generation.ops.decode_attention import decode_attention as op

    q, k, v = _cache(3, heads_q, heads_kv, 50, 16, seed=heads_q)
    for length in (1, 17, 50):
        expected = op(q, k, v, length, 0.25)
        for path in (decode._torch_sdpa, decode._torch_math):
            # float32 on both sides, different summation orders: a few ulps of values of size ~1.
            torch.testing.assert_close(path(q, k, v, length, 0.25), expected, atol=1e-6, rtol=1e-5)


def test_sampling_torch_path_gives_the_ops_tokens(monkeypatch):
    from genfast.generation import sampling
    from genfast.generation.ops.sampling import sampling_draw, sampling_filter

    g = torch.Generator().manual_seed(3)
    logits = torch.randn(4, 5000, generator=g) * 3
    uniforms = torch.rand(4, generator=g, dtype=torch.float64)
    monkeypatch.setattr(sampling, "_routed_to_torch", lambda op, x: True)  # the route a CUDA call takes
    for settings in [(0.8, 0, 1.0), (1.0, 50, 0.9), (1.0, 0, 0.9)]:  # the benchmark's settings
        assert torch.equal(sampling.draw(logits, uniforms, *settings), sampling_draw(logits, uniforms, *settings))
        routed = sampling.process_logits(logits, *settings)
        assert torch.equal(routed.isinf(), sampling_filter(logits, *settings).isinf())
    with pytest.raises(ValueError, match="uniforms"):
        sampling.draw(logits, uniforms[:3])


def test_cpu_calls_do_not_consult_the_rules(monkeypatch):
    from genfast.generation import decode, sampling

    def refuse(*args, **kwargs):
        raise AssertionError("a CPU call consulted genfast.routing")

    monkeypatch.setattr(routing, "route", refuse)
    q, k, v = _cache(1, 4, 4, 20, 16)
    decode.decode_attention(q, k, v, 10, 0.25)
    logits = torch.randn(2, 100)
    sampling.sample(logits, 1.0, 5, 0.9)
    sampling.process_logits(logits, 1.0, 5, 0.9)
    lstm = genfast.nn.LSTM(8, 16)
    lstm(torch.randn(5, 2, 8))
    assert routing.last_dispatch() == {}


RNN_CONFIGS = [
    dict(num_layers=1),
    dict(num_layers=2, bidirectional=True, batch_first=True),
    dict(num_layers=2, bias=False, dropout=0.0),
    dict(num_layers=1, bidirectional=True, proj_size=5),
]


def test_rnn_passes_its_shape_to_the_rules():
    lstm = genfast.nn.LSTM(8, 16)
    states = [torch.zeros(1, 64, 16), torch.zeros(1, 64, 16)]
    assert lstm._routed_to_torch(torch.randn(100, 64, 8), states, None)  # rnn.float32, every shape
    assert routing.last_dispatch("rnn")["rule"] == "rnn.float32"
    half = genfast.nn.GRU(8, 16).to(torch.bfloat16)
    h = [torch.zeros(1, 64, 16, dtype=torch.bfloat16)]
    assert half._routed_to_torch(torch.randn(100, 64, 8, dtype=torch.bfloat16), h, None)
    assert not half._routed_to_torch(torch.randn(1, 64, 8, dtype=torch.bfloat16), h, None)
    batch_sizes = torch.tensor([64] * 99 + [3])  # packed: T=100 steps, N=64 rows
    assert half._routed_to_torch(torch.randn(int(batch_sizes.sum()), 8, dtype=torch.bfloat16), h, batch_sizes)
    # Weights in another dtype than the input: the kernel raises genfast's error.
    assert not lstm._routed_to_torch(torch.randn(100, 64, 8, dtype=torch.float64), states, None)

    class Variant(genfast.nn.LSTM):  # another cell: no torch equivalent
        pass

    assert not Variant(8, 16)._routed_to_torch(torch.randn(100, 64, 8), states, None)


@pytest.mark.parametrize("config", RNN_CONFIGS, ids=lambda c: "-".join(f"{k}{v}" for k, v in c.items()))
@pytest.mark.parametrize("cell", ["lstm", "gru"])
@pytest.mark.parametrize("packed", [False, True])
def test_rnn_torch_path_is_torch_nn_exactly(cell, config, packed, monkeypatch):
    # The routed path through the module's own input handling (batch_first, packing, default states) on
    # the CPU: torch._VF.lstm/gru on the same weights is torch.nn's computation, so outputs, final states and
    # every gradient are identical bit for bit.
    from genfast.nn import rnn

    if cell == "gru" and config.get("proj_size"):
        pytest.skip("GRU has no projection")
    monkeypatch.setattr(rnn._FusedRNNBase, "_run_layers", rnn._FusedRNNBase._run_torch)
    torch.manual_seed(0)
    theirs = (torch.nn.LSTM if cell == "lstm" else torch.nn.GRU)(6, 7, **config).double()
    ours = (genfast.nn.LSTM if cell == "lstm" else genfast.nn.GRU).from_torch(theirs)
    batch_first = config.get("batch_first", False)
    x = torch.randn(*((4, 5) if batch_first else (5, 4)), 6, dtype=torch.float64)  # N=4 rows, T=5 steps
    if packed:
        lengths = torch.tensor([5, 2, 4, 3])
        make_input = lambda t: torch.nn.utils.rnn.pack_padded_sequence(  # noqa: E731
            t, lengths, batch_first=batch_first, enforce_sorted=False)
    else:
        make_input = lambda t: t  # noqa: E731
    directions = 2 if config.get("bidirectional") else 1
    out_size = config.get("proj_size") or 7
    h0 = torch.randn(config["num_layers"] * directions, 4, out_size, dtype=torch.float64)
    c0 = torch.randn(config["num_layers"] * directions, 4, 7, dtype=torch.float64)
    results = []
    for module in (theirs, ours):
        inp = x.clone().requires_grad_()
        hx = (h0, c0) if cell == "lstm" else h0  # given states: permuted like the rows of a packed input
        out, state = module(make_input(inp), hx)
        out = out.data if packed else out
        states = list(state) if cell == "lstm" else [state]
        loss = out.pow(2).sum() + sum(s.pow(3).sum() for s in states)
        grads = torch.autograd.grad(loss, [inp, *module.parameters()])
        results.append((out, states, grads))
    (out_t, states_t, grads_t), (out_g, states_g, grads_g) = results
    assert torch.equal(out_t, out_g)
    assert all(torch.equal(a, b) for a, b in zip(states_t, states_g))
    assert all(torch.equal(a, b) for a, b in zip(grads_t, grads_g))


def test_benchmark_cases_time_the_kernel_and_the_routed_call():
    from genfast.bench import cases, providers

    names = {c.name: c for c in cases.cases("quick", device="cuda")}
    for name, case in names.items():
        if name.startswith(("gpu.decode_attention.", "gpu.rnn.")) or (
                name.startswith("gpu.sampling_draw.") and ".sweep." not in name):
            assert {"genfast", "routed"} <= set(case.subjects), name
    for kind in ("rnn", "decode_attention", "sampling_draw"):
        assert {"genfast", "routed"} <= set(providers.PROVIDERS[kind]), kind
    # "genfast" times the kernel with the rules off, "routed" the call as users make it.
    seen = []
    providers._kernels_forced(lambda: seen.append(routing.kernels_forced()))()
    assert seen == [True] and not routing.kernels_forced()


# ---------------------------------------------------------------- on a GPU
@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_rnn_torch_path_unbatched_input(cell, monkeypatch):
    from genfast.nn import rnn

    monkeypatch.setattr(rnn._FusedRNNBase, "_run_layers", rnn._FusedRNNBase._run_torch)
    torch.manual_seed(1)
    theirs = (torch.nn.LSTM if cell == "lstm" else torch.nn.GRU)(6, 7, num_layers=2)
    ours = (genfast.nn.LSTM if cell == "lstm" else genfast.nn.GRU).from_torch(theirs)
    x = torch.randn(5, 6)
    out_t, state_t = theirs(x)
    out_g, state_g = ours(x)
    assert torch.equal(out_t, out_g)
    for a, b in zip(*((s if isinstance(s, tuple) else (s,)) for s in (state_t, state_g))):
        assert torch.equal(a, b)


@CUDA
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_cuda_decode_attention_routes_and_agrees_with_the_kernel(dtype):
    from genfast.generation import decode

    q, k, v = (t.cuda() for t in _cache(1, 12, 12, 1100, 64, dtype))
    routed = decode.decode_attention(q, k, v, 1024, 0.125)
    expected_backend = "torch_math" if dtype == torch.float32 else "torch_sdpa"
    assert routing.last_dispatch("decode_attention")["backend"] == expected_backend
    with routing.force_kernels():
        kernel = decode.decode_attention(q, k, v, 1024, 0.125)
    assert routing.last_dispatch("decode_attention")["backend"] == "genfast-triton"
    tol = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}[dtype]
    torch.testing.assert_close(routed, kernel, atol=tol, rtol=tol)
    decode.decode_attention(q, k, v, torch.tensor([1024], device="cuda"), 0.125)  # CUDA graphs: the kernel
    assert routing.last_dispatch("decode_attention")["backend"] == "genfast-triton"


@CUDA
def test_cuda_sampling_routes_to_the_reference_with_the_kernels_tokens():
    from genfast.generation import sampling

    g = torch.Generator().manual_seed(5)
    logits = (torch.randn(8, 50257, generator=g) * 3).cuda()
    uniforms = torch.rand(8, generator=g, dtype=torch.float64).cuda()
    for settings in [(0.8, 0, 1.0), (1.0, 50, 0.9), (1.0, 0, 0.9)]:
        routed = sampling.draw(logits, uniforms, *settings)
        assert routing.last_dispatch("sampling_draw")["rule"] == "sampling_draw.float32"
        with routing.force_kernels():
            assert torch.equal(routed, sampling.draw(logits, uniforms, *settings)), settings


@CUDA
@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_cuda_rnn_float32_routes_to_cudnn_exactly(cell):
    torch.manual_seed(0)
    theirs = (torch.nn.LSTM if cell == "lstm" else torch.nn.GRU)(32, 64, num_layers=2).cuda()
    ours = (genfast.nn.LSTM if cell == "lstm" else genfast.nn.GRU).from_torch(theirs)
    x = torch.randn(20, 8, 32, device="cuda")
    out_t, _ = theirs(x)
    out_g, _ = ours(x)
    assert routing.last_dispatch("rnn")["rule"] == "rnn.float32"
    assert torch.equal(out_t, out_g)
    half = copy.deepcopy(ours).to(torch.bfloat16)
    half(torch.randn(1, 1, 32, device="cuda", dtype=torch.bfloat16))  # one token: the kernel won it
    assert routing.last_dispatch("rnn")["backend"] == "genfast-cuda"
    assert math.isfinite(float(out_g.sum()))


@CUDA
@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_cuda_rnn_routed_path_compiles_fullgraph(cell):
    # The routed module calls torch._VF.lstm/gru, which torch.compile traces (aten._cudnn_rnn has a fake kernel).
    torch.manual_seed(0)
    module = (genfast.nn.LSTM if cell == "lstm" else genfast.nn.GRU)(16, 32).cuda()
    x = torch.randn(10, 4, 16, device="cuda")
    expected, _ = module(x)
    assert routing.last_dispatch("rnn")["backend"] == "torch_cudnn"
    got, _ = torch.compile(module, fullgraph=True)(x)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


@CUDA
def test_cuda_gpt2_eager_decode_is_routed_and_graph_decode_is_not():
    from genfast.generation.gpt2 import GPT2, GPT2Config

    torch.manual_seed(0)
    model = GPT2(GPT2Config(vocab_size=500, n_positions=64, n_embd=64, n_layer=2, n_head=4)).eval().cuda()
    prompt = torch.randint(0, 500, (2, 5), device="cuda")
    model.generate(prompt, 5, cuda_graph=False)
    assert routing.last_dispatch("decode_attention")["rule"] == "decode_attention.float32.small_mha"
    routing._last.clear()
    model.generate(prompt, 5, cuda_graph=True)  # the captured step reads the length on the device
    assert routing.last_dispatch("decode_attention")["backend"] in ("genfast-triton", None)
