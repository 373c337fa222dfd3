"""The Triton sampling kernels (genfast.kernels.sampling) on the CPU, under the Triton interpreter,
against the C++ op (torch.ops.genfast.sampling_*) and genfast.reference on the same inputs.

Run in its own process (the Makefile does): TRITON_INTERPRET must be set before triton is imported.
    TRITON_INTERPRET=1 python -m pytest tests/test_sampling_triton.py
Filtered scores must equal the C++ op's exactly (same -inf positions, same values: on CPU tensors both
divide in IEEE float32, as torch does; on a GPU the kernels multiply by the reciprocal, as torch does
there, which test_reciprocal_temperature_path checks here by forcing that path), and draws must pick the same token for the same uniform. The C++ op is the spec where
it and the reference differ: for ties at the top-p cut it keeps the lowest indices (its descending
walk orders ties by index), the reference keeps the highest (see test_top_p_ties_keep_lowest_indices).
Random continuous logits make such ties and cuts landing exactly on a prefix mass events of
probability ~0, so there exact agreement with the reference is demanded too.
The compiled kernels on a GPU, through the registered ops: tests/test_generation_cuda.py.
"""
import os

os.environ["TRITON_INTERPRET"] = "1"  # before triton or genfast.kernels is imported

import pytest  # noqa: E402
import torch  # noqa: E402

import genfast.generation.ops  # noqa: E402,F401  (loads the C++ ops and the CUDA registrations)
from genfast import reference  # noqa: E402
from genfast.kernels import sampling as sampling_module  # noqa: E402
from genfast.kernels.sampling import sampling_draw, sampling_filter  # noqa: E402

pytestmark = pytest.mark.skipif(
    not sampling_module._INTERPRETED,
    reason="genfast.kernels.sampling was imported before TRITON_INTERPRET=1 was set; run this file in "
           "its own process: TRITON_INTERPRET=1 python -m pytest tests/test_sampling_triton.py")

cpp = torch.ops.genfast

SETTINGS = [  # (temperature, top_k, top_p)
    (1.0, 0, 1.0),      # no filter
    (0.7, 0, 1.0),      # temperature only
    (1.0, 5, 1.0),
    (1.0, 1, 1.0),      # greedy
    (1.0, 0, 0.9),
    (1.0, 0, 0.0),      # top_p = 0 keeps exactly the largest
    (1.4, 50, 0.95),
    (0.6, 7, 0.5),
    (1.0, 5000, 0.3),   # top_k beyond the vocabulary is off
]


def logits_for(rows, vocab, dtype=torch.float32, seed=0, spread=3.0):
    generator = torch.Generator().manual_seed(seed)
    return (torch.randn(rows, vocab, generator=generator, dtype=torch.float64) * spread).to(dtype)


def uniforms_for(rows, seed=1):
    return torch.rand(rows, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def assert_same_scores(got, expected):
    assert got.dtype == expected.dtype and got.shape == expected.shape
    assert torch.equal(torch.isinf(got), torch.isinf(expected)), "different tokens removed"
    assert torch.equal(got, expected)


@pytest.mark.parametrize("temperature,top_k,top_p", SETTINGS)
@pytest.mark.parametrize("vocab", [1, 7, 1000])
def test_filter_and_draw_match_cpp_op_and_reference(temperature, top_k, top_p, vocab):
    logits = logits_for(2, vocab, seed=vocab)
    got = sampling_filter(logits, temperature, top_k, top_p)
    assert_same_scores(got, cpp.sampling_filter(logits, temperature, top_k, top_p))
    assert_same_scores(got, reference.process_logits(logits, temperature, top_k, top_p))
    uniforms = uniforms_for(2, seed=vocab)
    tokens = sampling_draw(logits, uniforms, temperature, top_k, top_p)
    assert tokens.dtype == torch.int64
    assert torch.equal(tokens, cpp.sampling_draw(logits, uniforms, temperature, top_k, top_p))
    assert torch.equal(tokens, reference.draw_from_scores(got, uniforms))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_reciprocal_temperature_path(monkeypatch, dtype):
    # The GPU's rounding (torch on CUDA: x * (1 / t), the reciprocal rounded to the accumulation type),
    # forced on CPU tensors: the scores must equal that expression exactly, and the draw must be the C++
    # op's draw on those scores (temperature 1 there: a division by 1 is exact).
    monkeypatch.setattr(sampling_module, "_divides_by_reciprocal", lambda logits: True)
    logits = logits_for(3, 1000, dtype=dtype, seed=9)
    temperature, top_k, top_p = 0.7, 40, 0.9
    scaled = logits * (1.0 / torch.tensor(temperature, dtype=dtype))
    assert not torch.equal(scaled, logits / temperature), "pick a temperature whose two roundings differ"
    got = sampling_filter(logits, temperature, top_k, top_p)
    assert_same_scores(got, cpp.sampling_filter(scaled, 1.0, top_k, top_p))
    uniforms = uniforms_for(3, seed=9)
    assert torch.equal(sampling_draw(logits, uniforms, temperature, top_k, top_p),
                       cpp.sampling_draw(scaled, uniforms, 1.0, top_k, top_p))


@pytest.mark.parametrize("temperature,top_k,top_p", [(1.0, 0, 1.0), (1.3, 40, 0.8)])
def test_many_tiles_with_a_partial_last_one(temperature, top_k, top_p):
    # block=128 on 1000 tokens: 7 full tiles and a 104-token tail, so every pass crosses tile bounds
    # (running tie ranks, running draw sums).
    logits = logits_for(2, 1000, seed=5)
    got = sampling_filter(logits, temperature, top_k, top_p, block=128)
    assert_same_scores(got, cpp.sampling_filter(logits, temperature, top_k, top_p))
    uniforms = uniforms_for(2, seed=6)
    assert torch.equal(sampling_draw(logits, uniforms, temperature, top_k, top_p, block=128),
                       cpp.sampling_draw(logits, uniforms, temperature, top_k, top_p))


def test_gpt2_vocabulary():
    logits = logits_for(1, 50257, seed=7)
    got = sampling_filter(logits, 0.9, 50, 0.9)
    assert_same_scores(got, cpp.sampling_filter(logits, 0.9, 50, 0.9))
    assert_same_scores(got, reference.process_logits(logits, 0.9, 50, 0.9))


@pytest.mark.parametrize("temperature,top_k,top_p", [(1.0, 0, 1.0), (1.2, 20, 0.7)])
def test_draws_match_for_many_uniforms_including_the_ends(temperature, top_k, top_p):
    rows, vocab = 32, 100
    logits = logits_for(1, vocab, seed=8).expand(rows, vocab).contiguous()
    extremes = torch.tensor([0.0, 1e-300, 1e-12, 0.5, 1 - 1e-12, torch.nextafter(torch.tensor(1.0, dtype=torch.float64),
                                                                                   torch.tensor(0.0, dtype=torch.float64))],
                            dtype=torch.float64)
    uniforms = torch.cat([extremes, uniforms_for(rows - len(extremes), seed=9)])
    tokens = sampling_draw(logits, uniforms, temperature, top_k, top_p)
    assert torch.equal(tokens, cpp.sampling_draw(logits, uniforms, temperature, top_k, top_p))
    scores = reference.process_logits(logits, temperature, top_k, top_p)
    assert torch.equal(tokens, reference.draw_from_scores(scores, uniforms))
    kept = torch.isfinite(scores)
    assert kept.gather(1, tokens[:, None]).all(), "drew a removed token"
    assert tokens[0] == kept[0].nonzero()[0, 0], "u = 0 must give the first kept token"
    assert tokens[len(extremes) - 1] == kept[0].nonzero()[-1, 0], "u -> 1 must give the last kept token"


def test_a_seeded_generator_reproduces_the_tokens():
    logits = logits_for(4, 300, seed=10)
    draws = [sampling_draw(logits, torch.rand(4, generator=torch.Generator().manual_seed(3), dtype=torch.float64),
                           0.9, 30, 0.9) for _ in range(2)]
    assert torch.equal(draws[0], draws[1])


# Ties: small integer logits repeat every value many times.
@pytest.mark.parametrize("temperature,top_k,top_p", [(1.0, 10, 1.0), (1.0, 0, 0.6), (0.5, 25, 0.5),
                                                     (1.0, 0, 0.0)])
def test_ties_match_cpp_op(temperature, top_k, top_p):
    generator = torch.Generator().manual_seed(11)
    logits = torch.randint(-4, 4, (3, 150), generator=generator).float()
    got = sampling_filter(logits, temperature, top_k, top_p, block=64)
    assert_same_scores(got, cpp.sampling_filter(logits, temperature, top_k, top_p))
    uniforms = torch.tensor([0.0, 0.37, 1 - 1e-9], dtype=torch.float64)
    assert torch.equal(sampling_draw(logits, uniforms, temperature, top_k, top_p, block=64),
                       cpp.sampling_draw(logits, uniforms, temperature, top_k, top_p))
    if top_p == 1.0:  # top-k keeps every tie at the k-th value, like the reference
        assert_same_scores(got, reference.process_logits(logits, temperature, top_k, top_p))


def test_top_p_ties_keep_lowest_indices():
    # Equal logits: every token has mass 1/8 exactly; the cut after 3 tokens (mass before the 4th is
    # 3/8 >= 0.3) falls inside the one tie group. The C++ op keeps indices 0..2; the reference, which
    # sorts ascending (stable) and drops from the bottom, would keep 5..7.
    logits = torch.zeros(1, 8)
    got = sampling_filter(logits, 1.0, 0, 0.3)
    assert_same_scores(got, cpp.sampling_filter(logits, 1.0, 0, 0.3))
    assert torch.isfinite(got[0]).nonzero().flatten().tolist() == [0, 1, 2]


def test_minus_zero_ties_with_plus_zero():
    logits = torch.tensor([[-0.0, 0.0, -1.0, 0.0, -0.0, -2.0]])
    for top_k, top_p in [(2, 1.0), (1, 1.0), (0, 0.5)]:
        assert_same_scores(sampling_filter(logits, 1.0, top_k, top_p), cpp.sampling_filter(logits, 1.0, top_k, top_p))


def test_masked_logits_at_minus_inf():
    logits = logits_for(2, 60, seed=12)
    logits[:, ::3] = float("-inf")  # a bad-words mask
    for settings in [(1.0, 0, 1.0), (1.0, 45, 1.0), (0.9, 0, 0.95), (1.0, 0, 1e-6)]:
        got = sampling_filter(logits, *settings)
        assert_same_scores(got, cpp.sampling_filter(logits, *settings))
        uniforms = torch.tensor([0.0, 0.999], dtype=torch.float64)
        assert torch.equal(sampling_draw(logits, uniforms, *settings), cpp.sampling_draw(logits, uniforms, *settings))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_other_dtypes_match_cpp_op(dtype):
    # Half types are filtered on their float32 values, like the C++ op; float64 stays float64.
    logits = logits_for(2, 300, dtype=dtype, seed=13)
    for settings in [(0.8, 0, 1.0), (1.0, 30, 0.9)]:
        got = sampling_filter(logits, *settings, block=128)
        assert_same_scores(got, cpp.sampling_filter(logits, *settings))
        uniforms = uniforms_for(2, seed=14)
        assert torch.equal(sampling_draw(logits, uniforms, *settings, block=128),
                           cpp.sampling_draw(logits, uniforms, *settings))


def test_top_p_rounds_to_float_like_the_cpp_op():
    # 1 - 1e-9 rounds to 1.0f: top-p is off for float logits, as in the C++ op.
    logits = logits_for(1, 50, seed=15)
    assert_same_scores(sampling_filter(logits, 1.0, 0, 1 - 1e-9), cpp.sampling_filter(logits, 1.0, 0, 1 - 1e-9))


@pytest.mark.filterwarnings("ignore:invalid value encountered")  # numpy, on the all -inf row
def test_bad_inputs_raise_clear_errors():
    logits = logits_for(2, 10)
    with pytest.raises(RuntimeError, match="NaN"):
        sampling_filter(torch.tensor([[0.0, float("nan")]]))
    with pytest.raises(RuntimeError, match="every logit of a row is -inf"):
        sampling_draw(torch.full((1, 4), float("-inf")), torch.zeros(1, dtype=torch.float64))
    with pytest.raises(RuntimeError, match=r"uniforms must lie in \[0, 1\)"):
        sampling_draw(logits, torch.tensor([0.5, 1.0], dtype=torch.float64))
    with pytest.raises(RuntimeError, match="temperature"):
        sampling_filter(logits, 0.0)
    with pytest.raises(RuntimeError, match="top_k"):
        sampling_filter(logits, 1.0, -1)
    with pytest.raises(RuntimeError, match="top_p"):
        sampling_filter(logits, 1.0, 0, 1.5)
    with pytest.raises(RuntimeError, match="uniforms must be"):
        sampling_draw(logits, torch.zeros(3, dtype=torch.float64))


# ---- top-k through candidates (the GPU default for small top_k: the kernels on the 2k + 64 largest)

@pytest.mark.parametrize("temperature,top_k,top_p", [(1.0, 1, 1.0), (0.7, 5, 1.0), (1.4, 50, 0.95),
                                                     (0.6, 7, 0.5), (1.0, 20, 0.0)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_top_k_candidates_give_the_whole_row_result(temperature, top_k, top_p, dtype):
    logits = logits_for(3, 1200, dtype, seed=top_k)
    uniforms = uniforms_for(3, seed=top_k)
    assert sampling_module._top_k_candidates(logits, temperature, top_k) is not None  # the path under test
    assert_same_scores(sampling_filter(logits, temperature, top_k, top_p, candidates=True),
                       sampling_filter(logits, temperature, top_k, top_p, candidates=False))
    assert torch.equal(sampling_draw(logits, uniforms, temperature, top_k, top_p, candidates=True),
                       sampling_draw(logits, uniforms, temperature, top_k, top_p, candidates=False))


def _equal_once_scaled():
    """Two adjacent float32 values a > b and a temperature t with a / t == b / t in float32."""
    # With a in [1, 2) and t in (1, 2), a / t keeps a's exponent about half the time, and the two
    # quotients, 1/t ulp apart before rounding, round to one float for ~1 - 1/t of the pairs.
    for i in range(1, 64):
        a = torch.tensor(1.0 + i / 64)
        b = torch.nextafter(a, torch.tensor(0.0))
        for t in (1.1, 1.3, 1.7):
            if torch.equal(a / t, b / t):
                return float(a), float(b), t
    raise AssertionError("no temperature merges a pair")


def test_top_k_candidates_fall_back_when_the_cut_is_inside_a_tie():
    # Raw ties at the k-th value: ~250 ones survive top-k, more than the 2k + 64 = 84 candidates hold.
    ties = torch.randint(0, 2, (3, 500), generator=torch.Generator().manual_seed(4)).float()
    assert sampling_module._top_k_candidates(ties, 1.0, 10) is None
    # Distinct raw values that the temperature makes equal: the k-th (a), and 80 tokens at b, which
    # survive top-k with it and reach past the 72 candidates.
    a, b, temperature = _equal_once_scaled()
    row = torch.full((1, 300), -5.0)
    row[0, :4] = torch.tensor([9.0, 8.0, 7.0, a])
    row[0, 100:180] = b
    assert sampling_module._top_k_candidates(row, temperature, 4) is None
    for logits, temperature, top_k in [(ties, 1.0, 10), (row, temperature, 4)]:
        expected = sampling_filter(logits, temperature, top_k, 0.9, candidates=False)
        assert_same_scores(sampling_filter(logits, temperature, top_k, 0.9, candidates=True), expected)
        uniforms = uniforms_for(logits.shape[0], seed=5)
        assert torch.equal(sampling_draw(logits, uniforms, temperature, top_k, 0.9, candidates=True),
                           sampling_draw(logits, uniforms, temperature, top_k, 0.9, candidates=False))
    kept = ~torch.isinf(sampling_filter(row, temperature, 4, 1.0, candidates=True))
    assert int(kept.sum()) == 84  # 9, 8, 7, a and the 80 b's, equal to a once scaled
    # A tie group inside the candidates needs no fallback: a and three b's.
    row[0, 103:180] = -5.0
    assert sampling_module._top_k_candidates(row, temperature, 4) is not None
    assert int((~torch.isinf(sampling_filter(row, temperature, 4, 1.0, candidates=True))).sum()) == 7


@pytest.mark.filterwarnings("ignore:invalid value encountered")  # numpy, on the all -inf row
def test_top_k_candidates_raise_the_same_errors():
    nan_row = logits_for(1, 100)
    nan_row[0, 37] = float("nan")
    with pytest.raises(RuntimeError, match="NaN"):
        sampling_filter(nan_row, 1.0, 5, 1.0, candidates=True)
    with pytest.raises(RuntimeError, match="NaN"):
        sampling_draw(nan_row, uniforms_for(1), 1.0, 5, 1.0, candidates=True)
    with pytest.raises(RuntimeError, match="every logit of a row is -inf"):
        sampling_draw(torch.full((1, 40), float("-inf")), torch.zeros(1, dtype=torch.float64), 1.0, 5, 1.0,
                      candidates=True)


def test_top_k_candidates_are_automatic_only_on_a_gpu():
    logits = logits_for(1, 50257)
    assert not sampling_module._use_candidates(None, logits, 50)            # CPU tensors: whole row
    assert not sampling_module._use_candidates(True, logits, 0)             # top-k off
    assert not sampling_module._use_candidates(True, logits, 50257)         # top-k off (k >= vocab)
    assert sampling_module._use_candidates(True, logits, 50)


def test_ops_have_a_cuda_kernel_registered():
    for name in ("sampling_filter", "sampling_draw"):
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"genfast::{name}", "CUDA"), name
