"""The generation ops on CUDA tensors: torch.ops.genfast.sampling_filter / sampling_draw /
decode_attention dispatch to the compiled Triton kernels (kernels/sampling.py,
kernels/decode_attention.py), compared with the C++ CPU op and genfast.reference on the same inputs.
Skipped without a CUDA device; the same kernels are tested on the CPU under the Triton interpreter by
tests/test_sampling_triton.py and tests/test_decode_attention_triton.py.

Sampling: kept sets and values must equal the CPU op's exactly, and draws must agree. The GPU's float64
exp may differ from glibc's in the last bit, and its sums are trees instead of sequences, so a draw can
differ only when a uniform lies within ~1e-15 of a CDF step (probability ~1e-12 per draw here).
"""
import math

import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

if torch.cuda.is_available():
    import genfast.ops  # noqa: F401
    from genfast import reference
    from genfast.nn import generation

SETTINGS = [(1.0, 0, 1.0), (0.7, 0, 1.0), (1.0, 1, 1.0), (1.0, 50, 1.0), (1.0, 0, 0.9), (1.0, 0, 0.0),
            (1.4, 50, 0.95), (1.0, 100000, 0.5)]


def _logits(rows, vocab, dtype, seed):
    generator = torch.Generator().manual_seed(seed)
    return (torch.randn(rows, vocab, generator=generator, dtype=torch.float64) * 3).to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("vocab", [7, 50257, 151936])
def test_sampling_matches_cpu_op(dtype, vocab):
    logits = _logits(4, vocab, dtype, seed=vocab)
    uniforms = torch.rand(4, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    for settings in SETTINGS:
        got = torch.ops.genfast.sampling_filter(logits.cuda(), *settings).cpu()
        expected = torch.ops.genfast.sampling_filter(logits, *settings)
        assert torch.equal(torch.isinf(got), torch.isinf(expected)), settings
        assert torch.equal(got, expected), settings
        tokens = torch.ops.genfast.sampling_draw(logits.cuda(), uniforms.cuda(), *settings).cpu()
        assert torch.equal(tokens, torch.ops.genfast.sampling_draw(logits, uniforms, *settings)), settings


def test_sampling_ties_match_cpu_op():
    logits = torch.randint(-4, 4, (8, 3000), generator=torch.Generator().manual_seed(2)).float()
    uniforms = torch.rand(8, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    for settings in [(1.0, 10, 1.0), (1.0, 0, 0.6), (0.5, 25, 0.5)]:
        assert torch.equal(torch.ops.genfast.sampling_filter(logits.cuda(), *settings).cpu(),
                           torch.ops.genfast.sampling_filter(logits, *settings))
        assert torch.equal(torch.ops.genfast.sampling_draw(logits.cuda(), uniforms.cuda(), *settings).cpu(),
                           torch.ops.genfast.sampling_draw(logits, uniforms, *settings))


def test_generation_api_uses_the_op_without_warning(recwarn):
    logits = _logits(2, 1000, torch.float32, seed=4).cuda()
    scores = generation.process_logits(logits, 0.8, 40, 0.9)
    torch.testing.assert_close(scores, reference.process_logits(logits, 0.8, 40, 0.9), atol=0, rtol=0)
    generator = torch.Generator(device="cuda").manual_seed(5)
    first = generation.sample(logits, 0.8, 40, 0.9, generator=generator)
    again = generation.sample(logits, 0.8, 40, 0.9, generator=torch.Generator(device="cuda").manual_seed(5))
    assert torch.equal(first, again) and first.device.type == "cuda"
    assert not [w for w in recwarn.list if "genfast" in str(w.message)]


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.float16, 2e-3), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("batch,heads_q,heads_kv,length,dim", [
    (1, 12, 12, 1, 64), (4, 12, 12, 17, 64), (1, 32, 8, 4000, 128), (2, 8, 1, 30000, 80), (1, 4, 4, 999, 256)])
def test_decode_attention_matches_reference(dtype, tol, batch, heads_q, heads_kv, length, dim):
    # Tolerances as in tests/test_decode_attention_triton.py (fp32 IEEE products, half types: output ulp).
    generator = torch.Generator().manual_seed(length)
    make = lambda *shape: torch.randn(*shape, generator=generator).to(dtype)
    q, k_cache, v_cache = make(batch, heads_q, dim), make(batch, heads_kv, length + 5, dim), \
        make(batch, heads_kv, length + 5, dim)
    scale = 1 / math.sqrt(dim)
    got = torch.ops.genfast.decode_attention(q.cuda(), k_cache.cuda(), v_cache.cuda(), length, scale)
    expected = reference.attention(q.double()[:, :, None], k_cache.double()[:, :, :length],
                                   v_cache.double()[:, :, :length], scale=scale, enable_gqa=True)[:, :, 0]
    assert got.dtype == dtype and got.device.type == "cuda"
    torch.testing.assert_close(got.cpu().double(), expected, atol=tol, rtol=tol)
