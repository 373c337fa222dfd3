"""torch.ops.genfast.decode_attention (one query token vs a KV cache) against
genfast.reference.attention on the cache's filled rows.

fp32: one dot product of length D and a softmax-weighted sum of `length` rows, summed in
a different order from the reference's matmuls: ~1e-6, hence 1e-5. fp64: 1e-12.
Half types accumulate in float32; the inputs are rounded to the dtype, so compare with
the reference on the same rounded inputs, to the output dtype's precision.
"""
from __future__ import annotations

import math

import pytest
import torch

from genfast import reference
from genfast.generation.ops.decode_attention import decode_attention

TOL = {torch.float32: 1e-5, torch.float64: 1e-12, torch.bfloat16: 2e-2, torch.float16: 2e-3}


@pytest.mark.parametrize("dtype", list(TOL))
@pytest.mark.parametrize("batch,heads_q,heads_kv,length,max_len,dim,dim_v", [
    (1, 12, 12, 1, 8, 64, 64),
    (2, 4, 4, 17, 40, 32, 32),
    (3, 8, 2, 33, 33, 16, 24),      # GQA, full cache, dim_v != dim
    (1, 2, 1, 300, 512, 64, 64),    # long enough to split across threads
])
def test_matches_reference(dtype, batch, heads_q, heads_kv, length, max_len, dim, dim_v):
    g = torch.Generator().manual_seed(length)
    q = torch.randn(batch, heads_q, dim, generator=g).to(dtype)
    k_cache = torch.randn(batch, heads_kv, max_len, dim, generator=g).to(dtype)
    v_cache = torch.randn(batch, heads_kv, max_len, dim_v, generator=g).to(dtype)
    scale = 1 / math.sqrt(dim)
    got = decode_attention(q, k_cache, v_cache, length, scale)
    wide = torch.float64
    expected = reference.attention(q.to(wide)[:, :, None], k_cache.to(wide)[:, :, :length],
                                   v_cache.to(wide)[:, :, :length], scale=scale, enable_gqa=True)[:, :, 0]
    assert got.dtype == dtype and got.shape == (batch, heads_q, dim_v)
    torch.testing.assert_close(got.to(wide), expected, atol=TOL[dtype], rtol=TOL[dtype])


def test_strided_cache_view_is_read_in_place():
    # A layer's slice of a (n_layer, B, H, max_len, D) buffer: batch/head strides are not compact.
    buffer = torch.randn(3, 2, 4, 16, 8)
    q = torch.randn(2, 4, 8)
    got = decode_attention(q, buffer[1], buffer[2], 9, 0.3)
    expected = reference.attention(q[:, :, None], buffer[1][:, :, :9], buffer[2][:, :, :9], scale=0.3)[:, :, 0]
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_generation_decode_attention_is_differentiable():
    # The op has no backward; genfast.generation.decode.decode_attention runs the differentiable
    # attention when autograd needs gradients, with the reference's gradients.
    from genfast.generation.decode import decode_attention as dispatching

    g = torch.Generator().manual_seed(11)
    q, k, v = (torch.randn(s, generator=g, dtype=torch.float64, requires_grad=True)
               for s in [(2, 4, 8), (2, 2, 10, 8), (2, 2, 10, 8)])
    out = dispatching(q, k, v, 7, 0.3)
    expected = reference.attention(q.unsqueeze(2), reference.repeat_kv_heads(k[:, :, :7], 4),
                                   reference.repeat_kv_heads(v[:, :, :7], 4), scale=0.3).squeeze(2)
    weights = torch.randn(out.shape, generator=g, dtype=torch.float64)
    got_grads = torch.autograd.grad((out * weights).sum(), (q, k, v))
    want_grads = torch.autograd.grad((expected * weights).sum(), (q, k, v))
    torch.testing.assert_close(out, expected)
    for got, want in zip(got_grads, want_grads):
        torch.testing.assert_close(got, want)
    assert got_grads[1][:, :, 7:].abs().max() == 0  # rows past the length are not attended


def test_opcheck():
    q = torch.randn(2, 4, 8)
    cache = torch.randn(2, 2, 10, 8)
    torch.library.opcheck(torch.ops.genfast.decode_attention.default, (q, cache, cache.clone(), 6, 0.5))


def test_bad_inputs():
    q, cache = torch.randn(1, 2, 8), torch.randn(1, 2, 10, 8)
    with pytest.raises(RuntimeError, match="length must be in"):
        decode_attention(q, cache, cache, 11, 1.0)
    with pytest.raises(RuntimeError, match="length must be in"):
        decode_attention(q, cache, cache, 0, 1.0)
    with pytest.raises(RuntimeError, match="q must be"):
        decode_attention(q[:, :, None], cache, cache, 3, 1.0)
    with pytest.raises(RuntimeError, match="multiple of the heads"):
        decode_attention(torch.randn(1, 3, 8), cache, cache, 3, 1.0)
    with pytest.raises(RuntimeError, match="share a dtype"):
        decode_attention(q.double(), cache, cache, 3, 1.0)
    with pytest.raises(RuntimeError, match="head dim"):
        decode_attention(torch.randn(1, 2, 4), cache, cache, 3, 1.0)
    with pytest.raises(RuntimeError, match="contiguous in their last dim"):
        decode_attention(q, cache.transpose(2, 3).contiguous().transpose(2, 3)[..., :8], cache, 3, 1.0)
