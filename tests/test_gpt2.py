"""GPT-2 with a KV cache and HF-compatible generation, against transformers.GPT2LMHeadModel.

Small random configurations, built locally (nothing is downloaded). Tolerances: fp32
logits of magnitude ~1 through 2-3 layers, where genfast and HF differ only in the order
of floating-point sums (GEMM blocking, online vs. two-pass softmax, tanh-GELU written
differently): differences are ~1e-6, so 2e-5 absolute is tight yet stable.
"""
from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

from genfast import reference  # noqa: E402
from genfast.generation.gpt2 import GPT2, GPT2Config  # noqa: E402
from genfast.generation.sampling import apply_repetition_penalty, process_logits  # noqa: E402

from transformers import GPT2Config as HFConfig, GPT2LMHeadModel  # noqa: E402
from transformers.generation.logits_process import (  # noqa: E402
    LogitsProcessorList, RepetitionPenaltyLogitsProcessor, TemperatureLogitsWarper, TopKLogitsWarper,
    TopPLogitsWarper)

transformers.logging.set_verbosity_error()
ATOL = RTOL = 2e-5

CONFIGS = {
    "tiny": dict(n_layer=2, n_head=2, n_embd=32, vocab_size=100, n_positions=128),
    "inverse-layer-scale": dict(n_layer=3, n_head=4, n_embd=64, vocab_size=97, n_positions=96,
                                scale_attn_by_inverse_layer_idx=True, n_inner=96),
}


def make_hf(name="tiny", seed=0, **overrides) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    config = HFConfig(**{**CONFIGS[name], **overrides}, bos_token_id=0, eos_token_id=0)
    model = GPT2LMHeadModel(config).eval()
    # Larger-than-init weights so that tokens differ and greedy paths are not trivially flat.
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(3.0)
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = None
    return model


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    # Tiny models: intra-op threads only add fork/join cost, which on a busy CI machine can
    # be a scheduler time slice per op. Restored afterwards for the other test modules.
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def hf_tiny():
    return make_hf("tiny")


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_prefill_and_every_decode_step_match_hf(name):
    hf = make_hf(name)
    ours = GPT2.from_hf(hf)
    torch.manual_seed(1)
    ids = torch.randint(0, hf.config.vocab_size, (2, 24))
    with torch.no_grad():
        expected = hf(ids).logits
        torch.testing.assert_close(ours(ids), expected, atol=ATOL, rtol=RTOL)
        # Prefill 8 tokens into the cache, then feed the rest one at a time.
        cache = ours.new_cache(2, 24)
        got = [ours(ids[:, :8], cache)]
        for t in range(8, 24):
            got.append(ours(ids[:, t:t + 1], cache))
    torch.testing.assert_close(torch.cat(got, dim=1), expected, atol=ATOL, rtol=RTOL)


def test_cached_chunk_after_prefill_matches_full_recompute(hf_tiny):
    # A multi-token chunk appended to a non-empty cache takes the masked attention path.
    ours = GPT2.from_hf(hf_tiny)
    ids = torch.randint(0, 100, (3, 20), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        full = ours(ids)
        cache = ours.new_cache(3, 20)
        chunked = torch.cat([ours(ids[:, :5], cache), ours(ids[:, 5:12], cache), ours(ids[:, 12:], cache)], 1)
    torch.testing.assert_close(chunked, full, atol=ATOL, rtol=RTOL)


def test_greedy_32_tokens_equal_hf_generate(hf_tiny):
    ours = GPT2.from_hf(hf_tiny)
    ids = torch.randint(0, 100, (2, 6), generator=torch.Generator().manual_seed(3))
    expected = hf_tiny.generate(ids, max_new_tokens=32, do_sample=False)
    got = ours.generate(ids, max_new_tokens=32)
    assert got.shape == (2, 38)
    assert torch.equal(got, expected)
    assert len(set(got[0, 6:].tolist())) > 2, "greedy output is degenerate; the test would prove little"


def test_kv_cache_decoding_equals_full_recomputation(hf_tiny):
    ours = GPT2.from_hf(hf_tiny)
    ids = torch.randint(0, 100, (1, 5), generator=torch.Generator().manual_seed(4))
    got = ours.generate(ids, max_new_tokens=20)
    seq = ids
    with torch.no_grad():
        for _ in range(20):  # no cache: the whole sequence recomputed for every token
            seq = torch.cat([seq, ours(seq)[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(got, seq)


def test_decode_step_at_a_device_position_equals_the_cached_step(hf_tiny):
    # The step a CUDA graph captures (tests/test_generation_cuda.py replays it): the cache row and the
    # attended length come from a position tensor instead of cache.length. Same kernels, same logits.
    ours = GPT2.from_hf(hf_tiny)
    ours.fused_cpu_decode = False  # the cache.length steps too run the unfused blocks the position steps run
    ids = torch.randint(0, 100, (2, 6), generator=torch.Generator().manual_seed(8))
    with torch.no_grad():
        by_length, by_position = ours.new_cache(2, 12), ours.new_cache(2, 12)
        ours(ids[:, :4], by_length), ours(ids[:, :4], by_position)
        for t in (4, 5):
            expected = ours(ids[:, t:t + 1], by_length, last_only=True)
            got = ours(ids[:, t:t + 1], by_position, last_only=True, position=torch.tensor([t]))
            assert torch.equal(got, expected), t
    assert by_position.length == 4  # a position tensor neither reads nor advances cache.length
    assert torch.equal(by_position.k[:, :, :, :6], by_length.k[:, :, :, :6])
    with pytest.raises(ValueError, match="one token per row"):
        ours(ids[:, :2], by_position, position=torch.tensor([6]))
    with pytest.raises(ValueError, match="cuda_graph=True needs the model on a CUDA device"):
        ours.generate(ids, 3, cuda_graph=True)


def test_greedy_with_repetition_penalty_equals_hf(hf_tiny):
    ours = GPT2.from_hf(hf_tiny)
    ids = torch.randint(0, 100, (2, 4), generator=torch.Generator().manual_seed(5))
    expected = hf_tiny.generate(ids, max_new_tokens=24, do_sample=False, repetition_penalty=1.7)
    assert torch.equal(ours.generate(ids, max_new_tokens=24, repetition_penalty=1.7), expected)


@pytest.mark.parametrize("temperature,top_k,top_p,penalty", [
    (1.0, None, 1.0, 1.3),
    (0.7, 10, 1.0, 1.0),
    (1.0, None, 0.9, 1.0),
    (1.3, 20, 0.8, 1.2),
    (0.5, 3, 0.5, 0.8),
    (1.0, 200, 0.95, 1.0),   # top_k larger than the vocabulary
])
def test_processed_scores_equal_hf_logits_processors(temperature, top_k, top_p, penalty):
    gen = torch.Generator().manual_seed(6)
    scores = torch.randn(4, 100, generator=gen) * 3
    input_ids = torch.randint(0, 100, (4, 12), generator=gen)
    processors = LogitsProcessorList()
    if penalty != 1.0:
        processors.append(RepetitionPenaltyLogitsProcessor(penalty))
    if temperature != 1.0:
        processors.append(TemperatureLogitsWarper(temperature))
    if top_k:
        processors.append(TopKLogitsWarper(top_k))
    if top_p < 1.0:
        processors.append(TopPLogitsWarper(top_p))
    expected = processors(input_ids, scores.clone())
    got = process_logits(apply_repetition_penalty(scores, input_ids, penalty), temperature, top_k, top_p)
    assert torch.equal(torch.isinf(got), torch.isinf(expected)), "different tokens removed"
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-6)  # one division each: rounding only
    # The plain-PyTorch reference agrees too (it is the oracle for test_sampling.py).
    ref = reference.process_logits(reference.repetition_penalty(scores, input_ids, penalty), temperature,
                                   top_k or 0, top_p)
    torch.testing.assert_close(ref, expected, atol=1e-6, rtol=1e-6)


def test_num_return_sequences_matches_hf(hf_tiny):
    # top_k=1 makes sampling deterministic, so HF's own RNG does not matter and the row
    # layout (repeat_interleave of the prompts) can be compared exactly.
    ours = GPT2.from_hf(hf_tiny)
    ids = torch.randint(0, 100, (2, 5), generator=torch.Generator().manual_seed(7))
    expected = hf_tiny.generate(ids, max_new_tokens=10, do_sample=True, top_k=1, num_return_sequences=3)
    got = ours.generate(ids, max_new_tokens=10, do_sample=True, top_k=1, num_return_sequences=3)
    assert got.shape == (6, 15)
    assert torch.equal(got, expected)


def test_sampling_is_reproducible_and_varies_across_seeds(hf_tiny):
    ours = GPT2.from_hf(hf_tiny)
    ids = torch.randint(0, 100, (1, 4), generator=torch.Generator().manual_seed(8))
    run = lambda seed: ours.generate(ids, 16, do_sample=True, top_k=40, top_p=0.95, temperature=1.5,
                                     num_return_sequences=4, generator=torch.Generator().manual_seed(seed))
    a, b, c = run(0), run(0), run(1)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    assert torch.equal(a[:, :4], ids.expand(4, 4))


def test_eos_padding_and_early_stop_match_hf(hf_tiny):
    ours = GPT2.from_hf(hf_tiny)
    ids = torch.randint(0, 100, (3, 4), generator=torch.Generator().manual_seed(9))
    free = ours.generate(ids, max_new_tokens=12)
    eos = int(free[1, 4 + 3])  # a token row 1 emits at step 3 (other rows may emit it too, or never)
    expected = hf_tiny.generate(ids, max_new_tokens=12, do_sample=False, eos_token_id=eos, pad_token_id=99)
    got = ours.generate(ids, max_new_tokens=12, eos_token_id=eos, pad_token_id=99)
    assert torch.equal(got, expected)
    row = got[1, 4:].tolist()
    first = row.index(eos)
    assert all(t == 99 for t in row[first + 1:])
    # Every row finishing stops generation early, as in HF.
    stop_all = ours.generate(ids[1:2], max_new_tokens=12, eos_token_id=eos)
    assert stop_all.shape[1] == 4 + first + 1
    assert torch.equal(stop_all, hf_tiny.generate(ids[1:2], max_new_tokens=12, do_sample=False,
                                                  eos_token_id=eos))


def test_streamer_protocol(hf_tiny):
    ours = GPT2.from_hf(hf_tiny)
    calls = []

    class Recorder:
        def put(self, value):
            calls.append(("put", value.clone()))

        def end(self):
            calls.append(("end", None))

    ids = torch.randint(0, 100, (1, 3), generator=torch.Generator().manual_seed(10))
    out = ours.generate(ids, max_new_tokens=5, streamer=Recorder())
    assert [c[0] for c in calls] == ["put"] * 6 + ["end"]
    assert torch.equal(calls[0][1], ids)
    assert torch.equal(torch.cat([c[1] for c in calls[1:6]]), out[0, 3:])


def test_from_hf_local_directory_safetensors_and_bin(hf_tiny, tmp_path):
    hf_tiny.save_pretrained(tmp_path / "st")
    ids = torch.randint(0, 100, (1, 9), generator=torch.Generator().manual_seed(11))
    with torch.no_grad():
        expected = hf_tiny(ids).logits
        torch.testing.assert_close(GPT2.from_hf(tmp_path / "st")(ids), expected, atol=ATOL, rtol=RTOL)
        # The older format: pytorch_model.bin holding HF's state_dict (tied lm_head included).
        (tmp_path / "bin").mkdir()
        (tmp_path / "bin" / "config.json").write_text((tmp_path / "st" / "config.json").read_text())
        torch.save(hf_tiny.state_dict(), tmp_path / "bin" / "pytorch_model.bin")
        torch.testing.assert_close(GPT2.from_hf(str(tmp_path / "bin"))(ids), expected, atol=ATOL, rtol=RTOL)


def test_from_hf_missing_files_say_what_is_missing(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        GPT2.from_hf(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="config.json"):
        GPT2.from_hf(tmp_path)
    (tmp_path / "config.json").write_text('{"n_layer": 1, "n_head": 2, "n_embd": 8, "vocab_size": 10}')
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        GPT2.from_hf(tmp_path)


def test_bad_arguments_raise_clear_errors(hf_tiny):
    ours = GPT2.from_hf(hf_tiny)
    ids = torch.zeros(1, 4, dtype=torch.long)
    with pytest.raises(ValueError, match="num_return_sequences"):
        ours.generate(ids, 4, num_return_sequences=2)
    with pytest.raises(ValueError, match="n_positions"):
        ours.generate(ids, 200)
    with pytest.raises(ValueError, match="temperature"):
        ours.generate(ids, 4, do_sample=True, temperature=0.0)
    with pytest.raises(ValueError, match="top_p"):
        ours.generate(ids, 4, do_sample=True, top_p=1.5)
    with pytest.raises(ValueError, match="input_ids"):
        ours.generate(ids.float(), 4)
    with pytest.raises(ValueError, match="n_embd"):
        GPT2Config(n_embd=30, n_head=4)


def _write_tiny_tokenizer(directory):
    # Byte-level BPE over the letters a-z and the space marker "Ġ", a few merges, and
    # <|endoftext|>: enough for GPT2TokenizerFast to load from local files.
    import json

    letters = [chr(c) for c in range(ord("a"), ord("z") + 1)]
    vocab = {tok: i for i, tok in enumerate(letters + ["Ġ", "Ġt", "th", "Ġth", "he", "<|endoftext|>"])}
    (directory / "vocab.json").write_text(json.dumps(vocab))
    (directory / "merges.txt").write_text("#version: 0.2\nĠ t\nt h\nĠ th\nh e\n")


def _generate_cli(*args):
    import os
    import subprocess
    import sys

    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "genfast.generate", *args], capture_output=True, text=True,
                          env=env, timeout=120)


def test_generate_cli_streams_text_and_names_missing_files(tmp_path):
    hf = make_hf("tiny", vocab_size=32)
    hf.save_pretrained(tmp_path)
    r = _generate_cli("--model", str(tmp_path), "--prompt", "the cat", "--max-new-tokens", "5")
    assert r.returncode == 2 and "tokenizer.json (or vocab.json + merges.txt)" in r.stderr
    _write_tiny_tokenizer(tmp_path)
    r = _generate_cli("--model", str(tmp_path), "--prompt", "the cat", "--max-new-tokens", "6")
    assert r.returncode == 0, r.stderr
    from transformers import GPT2TokenizerFast

    tok = GPT2TokenizerFast.from_pretrained(str(tmp_path), local_files_only=True)
    ids = tok("the cat", return_tensors="pt").input_ids
    expected = hf.generate(ids, max_new_tokens=6, do_sample=False, eos_token_id=0)
    assert r.stdout.rstrip("\n") == tok.decode(expected[0])
    r = _generate_cli("--model", str(tmp_path), "--prompt", "the", "--max-new-tokens", "4", "--top-k", "5",
                      "--num-return-sequences", "2", "--seed", "0")
    assert r.returncode == 0, r.stderr
    assert r.stdout.count("=== sequence") == 2
    r = _generate_cli("--model", str(tmp_path / "absent"), "--prompt", "x")
    assert r.returncode == 2 and "does not exist" in r.stderr and "downloads nothing" in r.stderr


def test_inference_output_projection_follows_in_place_weight_updates(hf_tiny):
    # Inference uses a transposed copy of the tied embedding; it must never go stale.
    ours = GPT2.from_hf(hf_tiny)
    ids = torch.randint(0, 100, (1, 6), generator=torch.Generator().manual_seed(12))
    with torch.no_grad():
        ours(ids)  # builds the copy
        ours.wte.weight.mul_(0.5)
        inference = ours(ids)
    training_path = ours(ids)  # grad enabled, weight requires grad: F.linear on the live weight
    assert training_path.requires_grad
    torch.testing.assert_close(inference, training_path.detach(), atol=1e-6, rtol=1e-6)
