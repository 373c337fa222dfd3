"""The fused sampling ops (torch.ops.genfast.sampling_filter / sampling_draw) against
genfast.reference.process_logits / draw_from_scores, on the same inputs and uniforms.

Kept/removed sets must agree exactly. Random continuous logits make ties and tokens
exactly on a top-p boundary events of probability ~0, so exact agreement is a fair
demand; kept scores are one division each (rounding only, 1e-6).
"""
from __future__ import annotations

import pytest
import torch

from genfast import reference
from genfast.generation.sampling import process_logits, sample
from genfast.generation.ops.sampling import sampling_draw, sampling_filter

SETTINGS = [  # (temperature, top_k, top_p)
    (1.0, 0, 1.0),
    (0.7, 0, 1.0),
    (1.0, 5, 1.0),
    (1.0, 1, 1.0),
    (1.0, 0, 0.9),
    (1.0, 0, 0.3),
    (1.0, 0, 0.0),    # top_p = 0 keeps exactly the largest (HF's min_tokens_to_keep)
    (1.4, 50, 0.95),
    (0.6, 7, 0.5),
    (1.0, 5000, 0.99),  # top_k beyond the vocabulary is a no-op
]


def logits_for(rows, vocab, dtype=torch.float32, seed=0, spread=3.0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(rows, vocab, generator=g, dtype=torch.float64) * spread).to(dtype)


@pytest.mark.parametrize("temperature,top_k,top_p", SETTINGS)
@pytest.mark.parametrize("vocab", [1, 37, 1000, 50257])
def test_filter_matches_reference(temperature, top_k, top_p, vocab):
    logits = logits_for(3, vocab, seed=vocab)
    got = sampling_filter(logits, temperature, top_k, top_p)
    expected = reference.process_logits(logits, temperature, top_k, top_p)
    assert torch.equal(torch.isinf(got), torch.isinf(expected))
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("temperature,top_k,top_p", SETTINGS)
def test_draw_matches_reference_for_the_same_uniforms(temperature, top_k, top_p):
    logits = logits_for(256, 500, seed=1)
    uniforms = torch.rand(256, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    got = sampling_draw(logits, uniforms, temperature, top_k, top_p)
    expected = reference.draw_from_scores(reference.process_logits(logits, temperature, top_k, top_p), uniforms)
    assert got.dtype == torch.int64
    assert torch.equal(got, expected)
    kept = torch.isfinite(reference.process_logits(logits, temperature, top_k, top_p))
    assert kept.gather(1, got[:, None]).all(), "drew a removed token"


def test_peaked_distribution_with_a_flat_tail():
    # Flat tail: the top-p cut falls among thousands of near-equal values (one bucket of the cut search).
    logits = torch.zeros(2, 3000)
    logits[:, :10] = 4.0
    logits += torch.rand(2, 3000, generator=torch.Generator().manual_seed(3)) * 1e-3
    got = sampling_filter(logits, 1.0, 0, 0.97)
    expected = reference.process_logits(logits, 1.0, 0, 0.97)
    assert torch.equal(torch.isinf(got), torch.isinf(expected))
    assert int(torch.isfinite(got[0]).sum()) > 256


@pytest.mark.parametrize("temperature,spread", [(3.0, 1.0), (1.0, 0.01)])
def test_flat_distribution_keeps_most_of_a_large_vocabulary(temperature, spread):
    # A high temperature (or nearly equal logits): top-p keeps ~45k of 50257 tokens, so the cut
    # search cannot lean on the top few, and the cut's bucket holds hundreds of tokens.
    logits = logits_for(2, 50257, seed=5, spread=spread)
    got = sampling_filter(logits, temperature, 0, 0.95)
    expected = reference.process_logits(logits, temperature, 0, 0.95)
    assert torch.equal(torch.isinf(got), torch.isinf(expected))
    assert int(torch.isfinite(got[0]).sum()) > 40000


def test_top_p_with_masked_tokens():
    logits = logits_for(3, 5000, seed=6)
    logits[:, ::3] = float("-inf")  # e.g. banned tokens: no mass, never kept
    for top_k in (0, 100):
        got = sampling_filter(logits, 1.0, top_k, 0.8)
        expected = reference.process_logits(logits, 1.0, top_k, 0.8)
        assert torch.equal(torch.isinf(got), torch.isinf(expected))
        assert not torch.isfinite(got[:, ::3]).any()


def test_top_p_cut_far_below_the_max():
    # Ten tokens at 0 and 1000 at -33 (each 4.7e-15 of the max's mass): a top_p this close to 1
    # puts the cut among the low tokens, past the range the cut search buckets finely. Where
    # exactly is rounding (the total itself is only good to ~1e-13 here), so the check is the
    # shape of the result: every high token, then some but not all low ones, by index.
    logits = torch.full((1, 1010), -33.0, dtype=torch.float64)
    logits[0, :10] = 0.0
    got = sampling_filter(logits, 1.0, 0, 1 - 1e-13)
    kept_low = int(torch.isfinite(got[0, 10:]).sum())
    assert torch.isfinite(got[0, :10]).all()
    assert 0 < kept_low < 1000
    assert torch.isfinite(got[0, 10:10 + kept_low]).all()  # equal values: the lowest indices first


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16, torch.float16])
def test_dtypes(dtype):
    logits = logits_for(4, 300, dtype=dtype, seed=4)
    got = sampling_filter(logits, 0.8, 20, 0.9)
    assert got.dtype == dtype
    expected = reference.process_logits(logits.double(), 0.8, 20, 0.9)
    # Half types: the filter decides in float32 on the widened values, so the mask agrees
    # with the fp64 reference; kept values are the division rounded to the dtype.
    assert torch.equal(torch.isinf(got), torch.isinf(expected))
    torch.testing.assert_close(got.double(), expected, atol=0, rtol=1e-2 if dtype != torch.float64 else 1e-12)
    uniforms = torch.rand(4, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    tokens = sampling_draw(logits, uniforms, 0.8, 20, 0.9)
    assert torch.isfinite(expected.gather(1, tokens[:, None])).all()


def test_empirical_distribution_matches_processed_probabilities():
    logits = torch.tensor([[2.0, 1.0, 0.5, 0.0, -1.0, -3.0]])
    rows = 40000
    tokens = sample(logits.expand(rows, 6), temperature=1.0, top_k=4, top_p=0.95,
                    generator=torch.Generator().manual_seed(6))
    freq = torch.bincount(tokens, minlength=6).double() / rows
    probs = torch.softmax(reference.process_logits(logits.double(), 1.0, 4, 0.95), -1)[0]
    # 40000 draws: binomial standard error <= 0.0025; 5 sigma.
    torch.testing.assert_close(freq, probs, atol=0.0125, rtol=0)


def test_seeded_generator_reproduces_tokens():
    logits = logits_for(8, 1000, seed=7)
    a = sample(logits, 1.2, 50, 0.9, generator=torch.Generator().manual_seed(0))
    b = sample(logits, 1.2, 50, 0.9, generator=torch.Generator().manual_seed(0))
    c = sample(logits, 1.2, 50, 0.9, generator=torch.Generator().manual_seed(1))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_opcheck():
    logits = logits_for(3, 64, seed=8)
    uniforms = torch.rand(3, dtype=torch.float64, generator=torch.Generator().manual_seed(9))
    torch.library.opcheck(torch.ops.genfast.sampling_filter.default, (logits, 0.9, 5, 0.8))
    torch.library.opcheck(torch.ops.genfast.sampling_draw.default, (logits, uniforms, 0.9, 5, 0.8))


def test_bad_inputs_raise_errors_naming_the_argument():
    logits = torch.randn(2, 10)
    u = torch.rand(2, dtype=torch.float64)
    with pytest.raises(RuntimeError, match="logits must be"):
        sampling_filter(torch.randn(10), 1.0, 0, 1.0)
    with pytest.raises(RuntimeError, match="floating point"):
        sampling_filter(torch.ones(2, 10, dtype=torch.long), 1.0, 0, 1.0)
    with pytest.raises(RuntimeError, match="temperature"):
        sampling_filter(logits, 0.0, 0, 1.0)
    with pytest.raises(RuntimeError, match="top_k"):
        sampling_filter(logits, 1.0, -1, 1.0)
    with pytest.raises(RuntimeError, match="top_p"):
        sampling_draw(logits, u, 1.0, 0, 1.5)
    with pytest.raises(RuntimeError, match="uniforms"):
        sampling_draw(logits, torch.rand(3, dtype=torch.float64), 1.0, 0, 1.0)
    with pytest.raises(RuntimeError, match="uniforms must lie in"):
        sampling_draw(logits, torch.tensor([0.5, 1.0], dtype=torch.float64), 1.0, 0, 1.0)
    with pytest.raises(RuntimeError, match="NaN"):
        sampling_filter(torch.tensor([[0.0, float("nan")]]), 1.0, 0, 1.0)
    with pytest.raises(RuntimeError, match="-inf"):
        sampling_draw(torch.full((1, 3), float("-inf")), u[:1], 1.0, 0, 1.0)
    # The Python API checks before dispatch, with the same names.
    with pytest.raises(ValueError, match="top_k"):
        process_logits(logits, top_k=2.5)
    with pytest.raises(ValueError, match="temperature"):
        sample(logits, temperature=float("inf"))
