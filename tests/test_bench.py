"""Tests of the benchmark suite itself (genfast.bench): arithmetic, interleaving, rows, outputs.

Timings are never asserted; these check what the suite computes from given timings,
and that the command produces a parseable table, JSON, CSV and PNG on tiny shapes; that the
peak probe (genfast._probe) answers, and that its absence is said; that the pytest-benchmark
files report the harness's samples; and that --ab runs two builds and aggregates them.
"""
from __future__ import annotations

import copy
import csv
import json
import os
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch
from torch import nn

from genfast.bench import ab, cases, flops, machine, providers, runner, suite, timing
from genfast.bench.__main__ import main

REPO = Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------- statistics and ratios
def test_summarize_median_quartiles_and_range():
    stats = timing.summarize([5.0, 1.0, 3.0, 2.0, 4.0])
    assert (stats.median, stats.q1, stats.q3, stats.min, stats.max, stats.n) == (3.0, 2.0, 4.0, 1.0, 5.0, 5)
    assert stats.iqr == 2.0
    with pytest.raises(ValueError, match="at least one sample"):
        timing.summarize([])


def test_speedup_is_the_median_of_per_round_ratios_not_a_ratio_of_medians():
    # Round 5 hit the subject with a slow outlier (drift); pairing keeps it out of the result.
    baseline = [2.0, 4.0, 6.0, 8.0, 100.0]
    subject = [1.0, 2.0, 3.0, 4.0, 1.0]
    assert timing.paired_ratios(baseline, subject) == [2.0, 2.0, 2.0, 2.0, 100.0]
    assert timing.speedup(baseline, subject).median == 2.0
    assert timing.summarize(baseline).median / timing.summarize(subject).median == 3.0
    with pytest.raises(ValueError, match="equal length"):
        timing.paired_ratios([1.0, 2.0], [1.0])


def test_gflops_arithmetic():
    assert timing.gflops(3e9, 0.5) == pytest.approx(6.0)


def test_flop_counts_follow_the_documented_formulas():
    # fastrnns LSTM: 2 * T*N * 4H * (I + H)
    assert flops.rnn("lstm", 100 * 64, 512, 512, training=False) == 2 * 6400 * 2048 * 1024
    assert flops.rnn("lstm", 10, 8, 4, training=True) == 3 * 2 * 10 * 16 * 12
    # no input gradient: the input's product (2 * steps * 4H * I) is not part of the step
    assert flops.rnn("lstm", 10, 8, 4, training=True, input_grad=False) == 3 * 2 * 10 * 16 * 12 - 2 * 10 * 16 * 8
    assert flops.rnn("gru", 10, 8, 4, training=False, input_grad=False) == 2 * 10 * 12 * 12
    assert flops.rnn("gru", 10, 8, 4, training=False) == 2 * 10 * 12 * 12
    assert flops.lstm_forward(10, 8, 4, proj_size=2) == 2 * 10 * 16 * 10 + 2 * 10 * 4 * 2
    full = flops.attention(8, 12, 1024, 1024, 64, causal=False, training=False)
    assert full == 4 * 8 * 12 * 1024 * 1024 * 64
    assert flops.attention(8, 12, 1024, 1024, 64, causal=True, training=False) == full / 2
    assert flops.attention(8, 12, 1024, 1024, 64, causal=False, training=True) == 3.5 * full  # fwd + bwd
    packed = cases.find("lstm.packed.inference")
    steps = int(providers.rnn_lengths(100, 64, 0).sum())
    assert packed.flops == flops.rnn("lstm", steps, 512, 512, training=False)
    # The training cases' input needs no gradient unless the case says so; the layers above the first always do.
    training = cases.find("lstm.fastrnns.training")
    assert training.flops == flops.rnn("lstm", 6400, 512, 512, training=True, input_grad=False)
    stacked = cases._gpu_rnn("lstm", "float32", "training", T=10, N=4, size=8, layers=3, bidirectional=True)
    first = flops.rnn("lstm", 40, 8, 8, training=True, input_grad=stacked.input_grad)
    assert stacked.flops == 2 * (first + 2 * flops.rnn("lstm", 40, 16, 8, training=True))


def test_packed_lengths_are_in_range_and_seeded():
    lengths = providers.rnn_lengths(99, 64, seed=0)
    assert lengths.min() >= 33 and lengths.max() == 99
    assert torch.equal(lengths, providers.rnn_lengths(99, 64, seed=0))


# ------------------------------------------------------------ interleaving on a fake clock
class FakeClock:
    """A clock that only moves when a fake op 'runs', by that op's scripted duration."""

    def __init__(self):
        self.now = 0.0
        self.calls: list[str] = []

    def __call__(self):
        return self.now

    def op(self, name: str, seconds: float):
        def run():
            self.calls.append(name)
            self.now += seconds
        return run


def test_run_interleaved_alternates_order_and_batches_short_calls():
    clock = FakeClock()
    fns = {"genfast": clock.op("genfast", 0.001), "torch": clock.op("torch", 0.004)}
    plan = timing.TimingPlan(warmup_calls=1, warmup_s=0.0, min_sample_s=0.004, min_rounds=5, budget_s=0.0)
    samples = timing.run_interleaved(fns, plan, timing.CpuTimer(clock))
    assert samples["genfast"] == pytest.approx([0.001] * 5)
    assert samples["torch"] == pytest.approx([0.004] * 5)
    timed = clock.calls[2:]  # after one warm-up call each
    # genfast is batched 4 calls per sample (0.004 s / 0.001 s), torch 1; order A B, B A, A B, ...
    assert timed[:10] == ["genfast"] * 4 + ["torch"] + ["torch"] + ["genfast"] * 4
    assert timed.count("genfast") == 20 and timed.count("torch") == 5


def test_run_interleaved_fills_the_time_budget_then_stops():
    clock = FakeClock()
    fns = {"a": clock.op("a", 0.01), "b": clock.op("b", 0.01)}
    plan = timing.TimingPlan(warmup_calls=1, warmup_s=0.0, min_sample_s=0.0, min_rounds=5, budget_s=1.0,
                             max_rounds=1000)
    samples = timing.run_interleaved(fns, plan, timing.CpuTimer(clock), first_call_s={"a": 0.01, "b": 0.01})
    assert len(samples["a"]) == len(samples["b"]) == 50  # 1 s budget / 0.02 s per round
    assert clock.calls.count("a") == 50  # the caller's first call counted as the warm-up


def test_finish_stats_from_injected_samples():
    case = cases.Case("fake.case.inference", "lstm", "rnn", "inference", {}, ("genfast",), ("torch", "slow"))
    result = runner.CaseResult(case, {
        "genfast": runner.ProviderResult("genfast", "subject", samples=[0.010, 0.020, 0.010, 0.010, 0.012]),
        "torch": runner.ProviderResult("torch", "baseline", samples=[0.020, 0.020, 0.030, 0.020, 0.024]),
        "slow": runner.ProviderResult("slow", "baseline", status="not built", reason="ImportError: nope"),
    }, {})
    runner.finish_stats(result, flops=1e9, peak_gflops=200.0)
    genfast = result.providers["genfast"]
    assert genfast.stats.median == 0.010
    assert genfast.gflops == pytest.approx(100.0)      # 1e9 FLOP / 0.010 s
    assert genfast.pct_peak == pytest.approx(50.0)      # of 200 GFLOP/s
    # per-round ratios: 2, 1, 3, 2, 2 -> median 2
    assert result.speedups["genfast"]["torch"].median == pytest.approx(2.0)
    assert "slow" not in result.speedups["genfast"]
    assert result.providers["slow"].stats is None


# ------------------------------------------------------------------------ fake genfast
def _fake_genfast_nn() -> dict[str, types.ModuleType]:
    """Stand-ins for genfast.nn (copies of the torch modules) so the 'built' path is exercised."""
    class _FromTorch:
        @staticmethod
        def from_torch(module):
            return copy.deepcopy(module)

    gnn = types.ModuleType("genfast.nn")
    gnn.LSTM, gnn.GRU = type("LSTM", (_FromTorch,), {}), type("GRU", (_FromTorch,), {})
    gnn.LSTMCell, gnn.GRUCell = nn.LSTMCell, nn.GRUCell
    functional = types.ModuleType("genfast.nn.functional")
    functional.scaled_dot_product_attention = torch.nn.functional.scaled_dot_product_attention
    gnn.functional = functional
    flash = types.ModuleType("genfast.kernels.flash_attention")
    flash.flash_attention = lambda q, k, v, *, causal=False, scale=None: None
    return {"genfast.nn": gnn, "genfast.nn.functional": functional, "genfast.kernels.flash_attention": flash}


@pytest.fixture
def fake_genfast(monkeypatch):
    for name, module in _fake_genfast_nn().items():
        monkeypatch.setitem(sys.modules, name, module)


@pytest.fixture
def no_genfast(monkeypatch):
    # A None entry makes `import genfast.nn` raise ImportError, as when it isn't built.
    for name in ("genfast.nn", "genfast.nn.functional", "genfast.kernels.flash_attention"):
        monkeypatch.setitem(sys.modules, name, None)


def _run_main(tmp_path, capsys, name_filter):
    paths = {k: tmp_path / f"out.{k}" for k in ("json", "png", "csv")}
    code = main(["--smoke", "--filter", name_filter, "--no-progress", "--device", "cpu", "--threads", "1",
                 "--json", str(paths["json"]), "--plot", str(paths["png"]), "--csv", str(paths["csv"])])
    assert code == 0
    out = capsys.readouterr().out
    document = json.loads(paths["json"].read_text())
    import matplotlib.image

    image = matplotlib.image.imread(paths["png"])
    assert image.ndim == 3 and image.shape[0] > 100
    with paths["csv"].open() as handle:
        rows = list(csv.DictReader(handle))
    return out, document, rows


def test_main_end_to_end_with_genfast_built(tmp_path, capsys, fake_genfast):
    out, document, rows = _run_main(tmp_path, capsys, "lstm.tiny.inference")
    assert "lstm.tiny.inference" in out and "threads: 1" in out and "peak (float32 GEMM" in out
    assert document["header"]["threads"] == 1
    (case,) = document["cases"]
    assert case["name"] == "lstm.tiny.inference"
    assert set(case["providers"]) == {"genfast", "torch", "cell_loop", "reference"}
    assert all(p["status"] == "ok" and len(p["samples_s"]) >= 5 for p in case["providers"].values())
    for baseline in ("torch", "cell_loop", "reference"):
        ratio = case["speedups"]["genfast"][baseline]["median"]
        samples = case["providers"]
        expected = timing.speedup(samples[baseline]["samples_s"], samples["genfast"]["samples_s"]).median
        assert ratio == pytest.approx(expected)
    genfast = case["providers"]["genfast"]
    assert genfast["gflops"] == pytest.approx(case["flops"] / genfast["stats_s"]["median"] / 1e9)
    assert genfast["pct_peak"] == pytest.approx(100 * genfast["gflops"] / document["peak"]["float32"]["gflops"])
    # the stand-in computes exactly what torch does
    assert case["checks"]["max_abs_diff"]["genfast vs torch"] <= 1e-6
    assert len(rows) == 4 and {r["provider"] for r in rows} == set(case["providers"])
    assert all(rows[0][k] for k in ("date", "cpu", "cores", "simd", "threads", "torch", "genfast"))
    torch_row = next(r for r in rows if r["provider"] == "torch")
    assert float(torch_row["genfast_speedup"]) == pytest.approx(case["speedups"]["genfast"]["torch"]["median"])


def test_main_shows_not_built_rows_when_genfast_import_fails(tmp_path, capsys, no_genfast):
    out, document, rows = _run_main(tmp_path, capsys, "gru.tiny_decode")
    (case,) = document["cases"]
    for subject in ("genfast", "genfast_cell"):
        assert case["providers"][subject]["status"] == "not built"
        assert "genfast.nn" in case["providers"][subject]["reason"]  # the import error, verbatim
    assert case["providers"]["torch"]["status"] == "ok"
    assert case["speedups"] == {}
    table_row = next(line for line in out.splitlines() if line.startswith("gru.tiny_decode.inference"))
    assert "not built" in table_row and "genfast.nn" in table_row
    assert {r["status"] for r in rows if r["role"] == "subject"} == {"not built"}


def test_attention_rows_memory_and_needs_cuda(tmp_path, capsys, fake_genfast):
    out, document, _ = _run_main(tmp_path, capsys, "attention.tiny.b1.h2.n16.d8.causal.inference")
    (case,) = document["cases"]
    assert case["providers"]["genfast_triton"]["status"] == "needs CUDA"
    for name in ("genfast", "torch_sdpa", "math"):
        provider = case["providers"][name]
        assert provider["status"] == "ok"
        assert provider["peak_memory_bytes"] > 0
    # the math path materialises the (16 x 16) scores per head; the fused kernel doesn't
    assert case["providers"]["math"]["peak_memory_bytes"] >= 2 * 16 * 16 * 4
    assert "needs CUDA" in out


def test_imdb_training_reports_loss_agreement(tmp_path, capsys, fake_genfast):
    out, document, _ = _run_main(tmp_path, capsys, "imdb.tiny.training")
    (case,) = document["cases"]
    loss = case["checks"]["loss_after_steps"]
    assert loss["steps"] == 3 and loss["abs_diff"] == abs(loss["genfast"] - loss["torch"])
    assert loss["abs_diff"] == 0.0  # the stand-in is a copy of the torch model, same numbers
    assert "loss after 3 steps" in out


def test_filter_list_and_no_match(capsys):
    assert main(["--smoke", "--filter", "gru.tiny", "--list"]) == 0
    names = capsys.readouterr().out.split()
    assert names and all("gru.tiny" in n for n in names)
    assert main(["--smoke", "--filter", "no-such-case", "--no-csv"]) == 2


def test_compile_timeout_becomes_a_skipped_row(monkeypatch):
    monkeypatch.setattr(providers, "COMPILE_TIMEOUT_S", 0.01)
    case = cases.find("lstm.tiny.inference")
    work = providers.make_rnn_workload(case, "cpu")
    with pytest.raises(providers.Unavailable) as raised:
        providers.compiled_reference_rnn(work)
    assert raised.value.status == "skipped" and "compile >" in raised.value.reason


def test_math_attention_refuses_to_materialise_huge_scores(monkeypatch):
    monkeypatch.setattr(providers, "MATH_SCORES_LIMIT_BYTES", 1000)
    work = providers.make_attention_workload(cases.find("attention.tiny.b1.h2.n16.d8.causal.inference"), "cpu")
    with pytest.raises(providers.Unavailable) as raised:
        providers.math_attention(work)  # 2 heads * 16 * 16 * 4 bytes = 2048 > 1000
    assert raised.value.status == "skipped" and "GiB of scores" in raised.value.reason


def test_every_case_name_is_unique_and_every_provider_exists():
    for device in ("cpu", "cuda"):
        for set_name in cases.SETS:
            selected = cases.cases(set_name, device=device)
            names = [c.name for c in selected]
            assert len(names) == len(set(names)), (set_name, device)
            for case in selected:
                assert device in case.devices
                assert set(case.providers) <= set(providers.PROVIDERS[case.kind]), case.name
                assert case.flops > 0 or case.kind in ("sampling", "sampling_draw"), case.name
                assert case.timer in ("events", "do_bench"), case.name
                assert os.path.isfile(REPO / "benchmarks" / f"bench_{case.op}.py"), case.name


def test_sets_by_device_gpu_session_cases_run_on_cuda_only():
    cpu_quick, cuda_quick = cases.cases("quick"), cases.cases("quick", device="cuda")
    assert cpu_quick and not any(c.name.startswith("gpu.") for c in cpu_quick)
    assert cuda_quick and all(c.name.startswith("gpu.") for c in cuda_quick)
    families = {c.name.split(".")[1] for c in cuda_quick}
    assert families == {"rnn", "attention", "decode_attention", "sampling_draw", "gpt2"}
    # the content of the former benchmarks/gpu_*.py scripts
    rnn = [c for c in cuda_quick if c.kind == "rnn"]
    assert {(c.params["cell"], c.params["dtype"]) for c in rnn} == {
        (cell, dtype) for cell in ("lstm", "gru") for dtype in ("float32", "bfloat16")} | {("lstm", "float16")}
    # issue 20: every gpu.rnn case has the persistent kernel's column, and its acceptance shapes are there
    assert all("persistent" in c.subjects for c in rnn)
    assert all(c.params.get("graph") for c in rnn if c.name.endswith(".graph"))
    names = {c.name for c in rnn}
    assert {"gpu.rnn.lstm.step.h512.float32.graph", "gpu.rnn.gru.step.h512.bfloat16.graph"} <= names
    assert {"gpu.rnn.lstm.t100.n1.h1024.float32.inference", "gpu.rnn.gru.t100.n8.h512.float32.inference",
            "gpu.rnn.lstm.t100.n64.h512.l2bi.bfloat16.training",
            "gpu.rnn.lstm.t1024.n16.h768.float16.training"} <= names
    attention = [c for c in cuda_quick if c.kind == "attention"]
    # masks, dropout and packed batches (issue 23): against SDPA's default backend, which takes them
    training_calls = [c for c in attention if {"mask", "dropout_p", "lengths"} & set(c.params)]
    assert {c.name.split(".")[2] for c in training_calls} == {"key_padding", "bias", "dropout", "varlen"}
    assert all(c.baselines == ("torch_sdpa",) and c.params["dtype"] == "bfloat16" for c in training_calls)
    attention = [c for c in attention if c not in training_calls]
    assert {(c.params["L"], c.params["D"]) for c in attention} == {(L, D) for L in (4096, 16384) for D in (64, 128)}
    assert all(c.timer == "do_bench" and c.params["dtype"] == "bfloat16" and c.baselines == ("torch_sdpa_flash",)
               for c in attention)
    full_lengths = {c.params["L"] for c in cases.cases("full", "gpu.attention.", "cuda") if "lengths" not in c.params}
    assert full_lengths == {1024, 4096, 16384}
    # the smoke copies of the gpu.* cases also run on the CPU
    smoke = cases.cases("smoke", "gpu.")
    assert {c.kind for c in smoke} == {"rnn", "attention", "decode_attention", "sampling_draw", "generation"}
    # --filter takes comma-separated alternatives
    both = cases.cases("smoke", "lstm.tiny.inference,gru.tiny.training")
    assert [c.name for c in both] == ["lstm.tiny.inference", "gru.tiny.training"]
    with pytest.raises(ValueError, match="device"):
        cases.cases("quick", device="tpu")
    # %peak: against the peak of the case's dtype on CUDA, the fp32 peak on the CPU
    from genfast.bench.__main__ import case_dtype

    assert {case_dtype(c, "cuda") for c in attention} == {"bfloat16"}
    assert {case_dtype(c, "cuda") for c in cuda_quick} == {"float32", "bfloat16", "float16"}
    assert {case_dtype(c, "cpu") for c in cuda_quick} == {"float32"}


def test_timer_for_and_do_bench_sampling(monkeypatch):
    assert type(timing.timer_for("cpu")) is timing.CpuTimer
    assert type(timing.timer_for("cpu", "do_bench")) is timing.CpuTimer
    with pytest.raises(ValueError, match="kind"):
        timing.timer_for("cuda", "stopwatch")
    # DoBenchTimer: a callable's first sample is one event-timed call; later samples ask do_bench
    # for about `inner` calls' worth of time (the last estimate x inner), median, in seconds.
    monkeypatch.setattr(timing.CudaTimer, "time_calls", lambda self, fn, inner: 0.004)
    timer = timing.DoBenchTimer()
    asked = []

    def fake_do_bench(fn, warmup, rep, grad_to_none, return_mode):
        asked.append((warmup, rep, return_mode))
        return 3.0  # ms

    timer._do_bench = fake_do_bench
    fn = lambda: None  # noqa: E731
    assert timer.time_calls(fn, 1) == 0.004 and asked == []
    assert timer.time_calls(fn, 5) == pytest.approx(0.003)
    assert asked == [(0, pytest.approx(20.0), "median")]
    timer.time_calls(fn, 2)
    assert asked[-1][1] == pytest.approx(6.0)  # 2 x the 3 ms just measured


def test_gpu_session_smoke_cases_run_on_the_cpu(tmp_path, capsys):
    # The real build: the gpu.* cases' code (stepwise decoding, input gradients, bf16, the
    # decode-attention and sampling-draw ops) runs at tiny sizes; CUDA-only providers say so.
    code = main(["--smoke", "--filter", "gpu.rnn.,gpu.decode_attention.,gpu.sampling_draw.,gpu.attention.",
                 "--no-progress", "--device", "cpu", "--threads", "1", "--no-csv", "--no-peak",
                 "--json", str(tmp_path / "gpu.json")])
    assert code == 0
    document = json.loads((tmp_path / "gpu.json").read_text())
    by_name = {c["name"]: c for c in document["cases"]}
    assert len(by_name) == 11 and "partial" not in document
    for case in by_name.values():
        for name, p in case["providers"].items():
            cuda_only = name in ("genfast_triton", "genfast_triton_varlen", "torch_sdpa_flash", "launcher",
                                 "whole_row", "persistent", "flashrnn")
            assert p["status"] == ("needs CUDA" if cuda_only else "ok"), (case["name"], name, p["reason"])
    decode = by_name["gpu.rnn.gru.decode5.h32.float32.inference"]
    assert decode["checks"]["max_abs_diff"]["genfast vs torch"] < 1e-5
    draw = by_name["gpu.sampling_draw.b1.v1000.t1.k50.p0.9"]
    assert draw["checks"]["max_abs_diff"]["genfast vs reference"] == 0.0  # same uniforms, same token
    attention = by_name["gpu.decode_attention.float32.b1.h4-2.d16.l100"]
    assert attention["checks"]["max_abs_diff"]["genfast vs reference"] < 1e-5
    # the masked calls' drop-in SDPA agrees with torch's on the CPU (dropout: not compared, own masks)
    for variant in ("key_padding", "bias"):
        masked = by_name[f"gpu.attention.{variant}.b2.h2.n40.d16.inference"]
        assert masked["checks"]["max_abs_diff"]["genfast vs torch_sdpa"] < 1e-5
    assert "max_abs_diff" not in by_name["gpu.attention.dropout.b2.h2.n40.d16.training"]["checks"]


# ------------------------------------------------------------------------------ peak probe
def test_peak_probe_reports_three_methods():
    import genfast._probe as probe  # built by setup.py next to genfast._C

    assert probe.packed_gemm_gflops(64, 96, 32, 2) > 0
    assert probe.brgemm_gflops(64, 96, 32, 2) > 0
    with pytest.raises(RuntimeError, match="must be positive"):
        probe.brgemm_gflops(0, 8, 8, 1)
    peak = machine.measure_peak("cpu", torch.float32, budget_s=0.0, shapes=((128, 128, 128),), repeats=1)
    assert set(peak["by_method"]) == {"torch.mm", "genfast packed", "aten brgemm"}
    assert peak["gflops"] == max(peak["by_method"].values()) == peak["all"][peak["source"]]
    assert peak["probe"] == "genfast._probe"


def test_peak_without_the_probe_falls_back_to_torch_mm_and_says_so(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "genfast._probe", None)
    monkeypatch.setattr(machine, "_warned_probe", False)
    peak = machine.measure_peak("cpu", torch.float32, budget_s=0.0, shapes=((128, 128, 128),), repeats=1)
    assert set(peak["by_method"]) == {"torch.mm"} and peak["probe"].startswith("missing")
    machine.measure_peak("cpu", torch.float32, budget_s=0.0, shapes=((128, 128, 128),), repeats=1)
    warnings = [line for line in capsys.readouterr().err.splitlines() if "genfast._probe is not built" in line]
    assert len(warnings) == 1  # one loud warning, not one per measurement


# --------------------------------------------------------------------- pytest-benchmark files
def test_replay_clock_gives_pytest_benchmark_the_harness_samples():
    clock = suite.ReplayClock([0.5, 0.25])
    durations = []
    for _ in range(3):  # what pytest-benchmark's runner does each round: timer(), target(), timer()
        start = clock()
        clock.advance()
        durations.append(clock() - start)
    assert durations == [0.5, 0.25, 0.5]


@pytest.mark.slow
def test_bench_files_report_the_harness_numbers(tmp_path):
    out = tmp_path / "pb.json"
    env = dict(os.environ, GENFAST_BENCH_SET="smoke", GENFAST_BENCH_DEVICE="cpu",
               GENFAST_BENCH_FILTER="lstm.tiny.inference", PYTHONPATH=str(REPO))
    done = subprocess.run([sys.executable, "-m", "pytest", "benchmarks/bench_lstm.py", "--benchmark-only", "-q",
                           "-p", "no:cacheprovider", f"--benchmark-json={out}"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    benchmarks = json.loads(out.read_text())["benchmarks"]
    assert {b["extra_info"]["provider"] for b in benchmarks} == {"genfast", "torch", "cell_loop", "reference"}
    for b in benchmarks:
        assert b["group"] == "lstm.tiny.inference"
        assert b["stats"]["rounds"] == b["extra_info"]["rounds"] >= 5
        assert b["stats"]["median"] == pytest.approx(b["extra_info"]["median_s"], rel=1e-9)
    genfast = next(b for b in benchmarks if b["extra_info"]["provider"] == "genfast")
    assert set(genfast["extra_info"]["speedups"]) == {"torch", "cell_loop", "reference"}


# ------------------------------------------------------------------------------------ --ab
def _fake_run(case_name, genfast_s, ratio):
    """One worker's JSON, reduced to what aggregate() reads."""
    return {"header": {}, "cases": [{
        "name": case_name, "unit": "ms", "providers": {"genfast": {"stats_s": {"median": genfast_s}}},
        "speedups": {"genfast": {"torch": {"median": ratio}}}}]}


def test_ab_aggregate_takes_medians_over_rounds():
    runs = {"A": [_fake_run("c", 1.0, 2.0), _fake_run("c", 2.0, 1.5), _fake_run("c", 1.0, 2.5)],
            "B": [_fake_run("c", 2.0, 1.0), _fake_run("c", 2.0, 1.0), _fake_run("c", 4.0, 1.0)]}
    (row,) = ab.aggregate(runs)
    assert (row["subject"], row["baseline"]) == ("genfast", "torch")
    assert row["ratio_A"] == pytest.approx(2.0) and row["ratio_B"] == pytest.approx(1.0)
    assert row["time_A_s"] == 1.0 and row["time_B_s"] == 2.0
    assert row["time_a_over_b"] == pytest.approx(0.5)  # rounds: 0.5, 1.0, 0.25
    assert "c" in ab.table([row]) and "0.500" in ab.table([row])


@pytest.mark.slow
def test_ab_runs_both_builds_alternating(tmp_path, capsys):
    # The same checkout as both builds: the machinery, not a comparison.
    code = main(["--smoke", "--filter", "gru.tiny.training", "--threads", "1", "--ab", str(REPO),
                 "--ab-rounds", "2", "--json", str(tmp_path / "ab.json")])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    rounds = [line for line in captured.err.splitlines() if line.startswith("[ab] round")]
    assert [line.split(": build ")[1][0] for line in rounds] == ["A", "B", "B", "A"]
    row_line = next(line for line in captured.out.splitlines() if line.startswith("gru.tiny.training"))
    assert "genfast" in row_line and "torch" in row_line
    document = json.loads((tmp_path / "ab.json").read_text())
    (row,) = document["rows"]
    assert row["rounds_A"] == row["rounds_B"] == 2
    assert row["ratio_A"] > 0 and row["ratio_B"] > 0 and row["time_a_over_b"] > 0
    assert len(document["runs"]["A"]) == len(document["runs"]["B"]) == 2


def test_ab_refuses_a_path_that_is_not_a_checkout(tmp_path, capsys):
    assert main(["--smoke", "--filter", "gru.tiny.training", "--ab", str(tmp_path)]) == 2
    assert "genfast/__init__.py" in capsys.readouterr().err


# ------------------------------------------------------------------------- shape sweep
def test_min_rounds_floor_gives_slow_calls_fewer_rounds():
    clock = FakeClock()
    fns = {"a": clock.op("a", 0.5), "b": clock.op("b", 0.5)}
    plan = timing.TimingPlan(warmup_calls=1, warmup_s=0.0, min_sample_s=0.0, min_rounds=5, budget_s=2.0,
                             min_rounds_floor=2)
    samples = timing.run_interleaved(fns, plan, timing.CpuTimer(clock))
    assert len(samples["a"]) == 2  # a round takes 1 s: 2 fit the 2 s budget, fewer than min_rounds
    fast = {"a": clock.op("a", 0.001), "b": clock.op("b", 0.001)}
    assert len(timing.run_interleaved(fast, plan, timing.CpuTimer(clock))["a"]) == 200  # budget-bound, max_rounds
    big = {"a": clock.op("a", 10.0)}
    assert len(timing.run_interleaved(big, plan, timing.CpuTimer(clock))["a"]) == 2  # never below the floor


def test_process_time_timer_reads_the_process_cpu_clock():
    import time

    timer = timing.ProcessTimeTimer()
    assert timer.clock is time.process_time
    busy = timer.time_calls(lambda: sum(range(20000)), 3)
    assert busy > 0


def test_sweep_shapes_grid_then_extras():
    from genfast.bench import sweep

    grid = sweep.shapes(extras=False)
    assert len(grid) == 2 * 2 * len(sweep.GRID_N) * len(sweep.GRID_H)
    assert {(s.T, s.packed) for s in grid} == {(50, False)}
    everything = sweep.shapes()
    extras = everything[len(grid):]
    assert {s.T for s in extras} >= {10, 200, 1000} and any(s.packed for s in extras)
    assert all(s.case().params["input_size"] == s.H for s in everything)


def test_tiny_sweep_writes_the_csv_and_one_heatmap_per_cell_and_mode(tmp_path, capsys, fake_genfast):
    from genfast.bench import sweep

    out = tmp_path / "sweep"
    code = main(["--sweep", "--sweep-out", str(out), "--sweep-n", "1,2", "--sweep-h", "4,8", "--sweep-t", "3",
                 "--sweep-no-extras", "--sweep-budget", "0", "--sweep-min-rounds", "1", "--threads", "1",
                 "--sweep-clock", "cpu"])
    assert code == 0
    with (out / "sweep.csv").open() as handle:
        reader = csv.DictReader(handle)
        assert tuple(reader.fieldnames) == sweep.COLUMNS
        rows = list(reader)
    assert len(rows) == 2 * 2 * 2 * 2  # cells x modes x N x H
    assert {(r["cell"], r["mode"], r["N"], r["H"], r["I"], r["T"]) for r in rows} == {
        (c, m, n, h, h, "3") for c in ("lstm", "gru") for m in ("inference", "training")
        for n in ("1", "2") for h in ("4", "8")}
    for r in rows:
        assert r["status"] == "ok" and float(r["ratio"]) > 0 and int(r["rounds"]) >= 1
        assert float(r["ratio_q1"]) <= float(r["ratio"]) <= float(r["ratio_q3"])
        assert float(r["ratio_best"]) > 0
        assert float(r["max_abs_diff"]) <= 1e-6  # the stand-in is a copy of the torch module
        assert r["threads"] == "1" and r["simd"] and r["clock"] == "cpu"
    import matplotlib.image

    for cell in ("lstm", "gru"):
        for mode in ("inference", "training"):
            image = matplotlib.image.imread(out / f"{cell}_{mode}.png")
            assert image.ndim == 3 and image.shape[0] > 100
    printed = capsys.readouterr().out
    assert "16/16 shapes measured" in printed and str(out / "sweep.csv") in printed


def test_sweep_heatmap_marks_only_cells_below_the_threshold(tmp_path):
    from genfast.bench import sweep

    rows = [{"cell": "lstm", "mode": "training", "T": "50", "N": str(n), "H": str(h), "packed": "0",
             "status": "ok", "ratio": str(ratio), "ratio_best": str(ratio * 2)}
            for (n, h), ratio in {(1, 32): 0.5, (1, 64): 1.0, (8, 32): 0.45, (8, 64): 2.0}.items()]
    assert sweep.heatmap(tmp_path / "h.png", rows, "lstm", "training", "t") == [(1, 32), (8, 32)]
    assert sweep.heatmap(tmp_path / "b.png", rows, "lstm", "training", "t", stat="ratio_best") == [(8, 32)]  # 0.9
    assert (tmp_path / "h.png").stat().st_size > 0
    assert sweep.heatmap(tmp_path / "none.png", rows, "gru", "training", "t") is None  # nothing to draw
    assert not (tmp_path / "none.png").exists()


def test_sweep_without_matplotlib_says_so(monkeypatch, tmp_path):
    from genfast.bench import sweep

    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(SystemExit, match="matplotlib, which is not installed"):
        main(["--sweep", "--sweep-out", str(tmp_path), "--sweep-n", "1", "--sweep-h", "4"])
    assert not (tmp_path / "sweep.csv").exists()  # refused before measuring anything
    with pytest.raises(SystemExit, match="--sweep-cells"):
        sweep._names("lstm,rnn", sweep.CELLS, "--sweep-cells")


def test_sweep_fma_width_predicts_from_the_avx512_ratio_and_the_peaks(tmp_path, capsys):
    """benchmarks/sweep_fma_width.py: a cell below the threshold under AVX2 is predicted below when its
    AVX-512 ratio times peak(AVX2) / peak(AVX-512) is; slowdown and efficiency from the two runs' numbers."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    try:
        import sweep_fma_width
    finally:
        sys.path.pop(0)
    header = "cell,mode,T,N,H,packed,ratio,genfast_ms,genfast_gflops,threads\n"
    wide, narrow = tmp_path / "wide.csv", tmp_path / "narrow.csv"
    wide.write_text(header + "lstm,inference,50,8,128,0,1.2,1.0,200,2\n"    # 1.2 * 0.5 = 0.6: the width
                             "lstm,training,50,8,128,0,2.5,1.0,200,2\n"     # 2.5 * 0.5 = 1.25: not the width
                             "gru,inference,50,8,128,0,3.0,1.0,200,2\n")    # at parity under AVX2: not listed
    narrow.write_text(header + "lstm,inference,50,8,128,0,0.6,2.0,100,2\n"
                               "lstm,training,50,8,128,0,0.9,4.0,50,2\n"
                               "gru,inference,50,8,128,0,1.1,2.0,100,2\n")
    sweep_fma_width.main([str(wide), str(narrow), "--peaks", "400,200"])
    out = capsys.readouterr().out
    assert "2 of 3 cells below 0.95 under AVX2" in out
    assert "lstm inference 50 8 128 0 | 1.20 | 0.60 | 0.60 | 0.50 | 1.00" in out
    assert "lstm training 50 8 128 0 | 2.50 | 0.90 | 1.25 | 0.25 | 0.50" in out
    assert "gru inference" not in out
    assert "predicted below 0.95: 1 of 2" in out
