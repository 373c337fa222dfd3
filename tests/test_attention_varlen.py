"""Variable-length attention on the CPU (genfast.nn.functional.flash_attn_varlen, csrc/cpu/attention.cpp's
attention_varlen_* ops) against genfast.reference.attention_varlen (each sequence padded out and attended in
float64), and MultiheadAttention's key_padding_mask routed to it."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from genfast import reference
from genfast.nn import functional as gf
from genfast.nn.attention import MultiheadAttention
from genfast.ops import attention_varlen as ops
from tests import sdpa_dispatch
from tests.sdpa_dispatch import CPU_KERNEL, CPU_VARLEN

# Tolerances. float64: the kernel and the reference differ only in summation order (~1e-15 relative).
# float32: tiles of 128 / 256 keys, online rescaling and a polynomial exp (~2 ulp); with <= 300 keys the
# error grows like sqrt(L) * eps * |values| (~1e-6), so 2e-5 / 1e-4 leaves ~10x margin while a wrong
# window edge, offset or head moves outputs by ~1e-1 (as tests/test_attention.py).
TOL = {torch.float32: dict(atol=2e-5, rtol=1e-4), torch.float64: dict(atol=1e-10, rtol=1e-9)}


def expect_varlen(call):
    return sdpa_dispatch.expect_dispatch(call, CPU_VARLEN)


def packed(lens_q, lens_k, heads_q=4, heads_kv=2, dim=16, dim_v=None, dtype=torch.float64, grad=True):
    """Random packed q, k, v and the int32 offsets for sequences of lens_q queries and lens_k keys."""
    dim_v = dim if dim_v is None else dim_v
    q = torch.randn(sum(lens_q), heads_q, dim, dtype=dtype).requires_grad_(grad)
    k = torch.randn(sum(lens_k), heads_kv, dim, dtype=dtype).requires_grad_(grad)
    v = torch.randn(sum(lens_k), heads_kv, dim_v, dtype=dtype).requires_grad_(grad)
    cu = lambda lens: torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32)  # noqa: E731
    return q, k, v, cu(lens_q), cu(lens_k)


def check_against_reference(lens_q, lens_k, dtype=torch.float64, tol=None, heads=(4, 2), dim=16, dim_v=None,
                            **kwargs):
    """flash_attn_varlen's output and q/k/v gradients against the float64 reference on the same inputs."""
    q, k, v, cu_q, cu_k = packed(lens_q, lens_k, *heads, dim=dim, dim_v=dim_v, dtype=dtype)
    out = expect_varlen(lambda: gf.flash_attn_varlen(q, k, v, cu_q, cu_k, max(lens_q), max(lens_k), **kwargs))
    assert out.dtype == dtype and out.shape == (q.shape[0], q.shape[1], v.shape[2])
    q64, k64, v64 = (x.detach().double().requires_grad_() for x in (q, k, v))
    ref = reference.attention_varlen(q64, k64, v64, cu_q, cu_k, **kwargs)
    tol = TOL[dtype] if tol is None else tol
    torch.testing.assert_close(out.double(), ref, **tol)
    grad_out = torch.randn_like(ref)
    grads = torch.autograd.grad(out, (q, k, v), grad_out.to(dtype))
    ref_grads = torch.autograd.grad(ref, (q64, k64, v64), grad_out)
    for name, a, b in zip("qkv", grads, ref_grads):
        torch.testing.assert_close(a.double(), b, **tol, msg=lambda m, name=name: f"grad {name}: {m}")
    return out, grads


# Ragged batches: a length-1 sequence, a sequence without keys, one without queries, and sequences longer
# than one tile (96 queries / 128 keys forward, 128 / 256 backward) so the online rescaling and the tile
# skipping run.
RAGGED = [
    ([5, 1, 7, 3], [9, 4, 1, 6]),
    ([1, 1, 1], [1, 2, 3]),
    ([4, 3, 0, 2], [6, 0, 5, 2]),
    ([150, 33, 200], [300, 17, 140]),
]


@pytest.mark.parametrize("lens_q,lens_k", RAGGED)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("causal", [False, True])
def test_ragged_matches_reference(lens_q, lens_k, dtype, causal):
    torch.manual_seed(len(lens_q) + sum(lens_k))
    check_against_reference(lens_q, lens_k, dtype, causal=causal)


@pytest.mark.parametrize("window", [(0, 0), (3, -1), (-1, 2), (5, 4), (40, 7), (130, 0)])
@pytest.mark.parametrize("causal", [False, True])
def test_windows(window, causal):
    torch.manual_seed(sum(window) + causal)
    check_against_reference([150, 9, 1, 230], [260, 20, 5, 230], torch.float64, causal=causal, window_size=window)
    check_against_reference([150, 9, 230], [260, 20, 230], torch.float32, causal=causal, window_size=window)


def test_causal_bottom_right():
    """Lq < Lk: the last query sees every key; Lq > Lk: the first Lq - Lk queries see none and give 0."""
    torch.manual_seed(1)
    check_against_reference([3, 8], [8, 3], causal=True)
    q, k, v, cu_q, cu_k = packed([3, 8], [8, 3])
    out = gf.flash_attn_varlen(q, k, v, cu_q, cu_k, 8, 8, causal=True)
    full = gf.flash_attn_varlen(q, k, v, cu_q, cu_k, 8, 8)
    torch.testing.assert_close(out[2], full[2], **TOL[torch.float64])  # last query of sequence 0: no mask
    assert (out[3:3 + 5] == 0).all()  # sequence 1: queries 0..4 lie above the diagonal
    assert (out[3 + 5:] != 0).all()
    # Lq == Lk: bottom-right equals torch's top-left causal
    q, k, v, cu_q, cu_k = packed([6], [6])
    ours = gf.flash_attn_varlen(q, k, v, cu_q, cu_k, 6, 6, causal=True)
    theirs = torch.nn.functional.scaled_dot_product_attention(
        q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1), is_causal=True, enable_gqa=True)
    torch.testing.assert_close(ours, theirs.transpose(0, 1), **TOL[torch.float64])


@pytest.mark.parametrize("heads", [(1, 1), (6, 6), (6, 3), (6, 1)])
def test_gqa_and_value_dim(heads):
    torch.manual_seed(heads[0] * 7 + heads[1])
    check_against_reference([7, 20], [13, 31], heads=heads, dim=24, dim_v=40, causal=True)
    check_against_reference([7, 20], [13, 31], heads=heads, dim=8, dim_v=8)


def test_scale_and_strided_inputs():
    """An explicit scale; q, k, v as strided views of one packed (total, 3, H, D) projection."""
    torch.manual_seed(13)
    check_against_reference([9, 4], [9, 4], heads=(3, 3), scale=0.3, causal=True)
    lens = [9, 1, 14]
    qkv = torch.randn(sum(lens), 3, 4, 16, dtype=torch.float64, requires_grad=True)
    q, k, v = qkv.unbind(1)
    cu = torch.tensor([0, 9, 10, 24], dtype=torch.int32)
    out = gf.flash_attn_varlen(q, k, v, cu, cu, 14, 14, scale=0.3)
    ref = reference.attention_varlen(q, k, v, cu, cu, scale=0.3)
    torch.testing.assert_close(out, ref, **TOL[torch.float64])
    grad_out = torch.randn_like(ref)
    torch.testing.assert_close(torch.autograd.grad(out, qkv, grad_out)[0], torch.autograd.grad(ref, qkv, grad_out)[0],
                               **TOL[torch.float64])


def test_zero_keys_give_zero_output_and_gradients():
    torch.manual_seed(2)
    q, k, v, cu_q, cu_k = packed([3, 4, 2], [5, 0, 3])
    out = gf.flash_attn_varlen(q, k, v, cu_q, cu_k, 4, 5)
    assert (out[3:7] == 0).all() and (out[:3] != 0).all()
    _, lse = ops.attention_varlen_forward(q, k, v, cu_q, cu_k, 4, 5, False, 0.25, -1, -1, 0.0, None)
    assert lse[:, 3:7].isneginf().all() and lse[:, :3].isfinite().all()
    grad_q, grad_k, grad_v = torch.autograd.grad(out.sum(), (q, k, v))
    assert (grad_q[3:7] == 0).all() and (grad_q[:3] != 0).any()
    # an empty batch and a batch without any key
    q, k, v, cu_q, cu_k = packed([], [])
    assert gf.flash_attn_varlen(q, k, v, cu_q, cu_k, 0, 0).shape == (0, 4, 16)
    q, k, v, cu_q, cu_k = packed([2, 3], [0, 0])
    out = gf.flash_attn_varlen(q, k, v, cu_q, cu_k, 3, 0)
    assert (out == 0).all()
    assert all((g == 0).all() for g in torch.autograd.grad(out.sum(), (q, k, v)))


def test_gradcheck_fp64():
    torch.manual_seed(3)
    q, k, v, cu_q, cu_k = packed([2, 1, 4, 3], [3, 2, 0, 5], heads_q=4, heads_kv=2, dim=3, dim_v=5)
    for kwargs in [dict(), dict(causal=True), dict(window_size=(1, 1)), dict(causal=True, window_size=(2, -1))]:
        fn = lambda a, b, c: gf.flash_attn_varlen(a, b, c, cu_q, cu_k, 4, 5, **kwargs)  # noqa: E731
        expect_varlen(lambda: fn(q, k, v))
        assert torch.autograd.gradcheck(fn, (q, k, v))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_types_accumulate_in_fp32(dtype):
    torch.manual_seed(4)
    q, k, v, cu_q, cu_k = packed([20, 5, 40], [30, 5, 41], dtype=dtype)
    out = expect_varlen(lambda: gf.flash_attn_varlen(q, k, v, cu_q, cu_k, 40, 41, causal=True))
    assert out.dtype == dtype
    exact = reference.attention_varlen(q.double(), k.double(), v.double(), cu_q, cu_k, causal=True)
    # inputs exact in the half type, fp32 inside: the final rounding (bf16 2^-8, fp16 2^-11 relative) remains
    torch.testing.assert_close(out.double(), exact, atol=1e-2, rtol=1e-2)
    grads = torch.autograd.grad(out.float().sum(), (q, k, v))
    assert all(g.dtype == dtype and g.isfinite().all() for g in grads)


def test_dense_sdpa_unchanged_by_the_shared_tiles():
    """The dense op runs the same tile loop: a padded batch of one length equals varlen over it."""
    torch.manual_seed(5)
    q, k, v, cu_q, cu_k = packed([37, 37], [70, 70], heads_q=3, heads_kv=3, dtype=torch.float32, grad=False)
    ours = gf.flash_attn_varlen(q, k, v, cu_q, cu_k, 37, 70)
    dense = sdpa_dispatch.expect_dispatch(lambda: gf.scaled_dot_product_attention(
        q.view(2, 37, 3, 16).transpose(1, 2), k.view(2, 70, 3, 16).transpose(1, 2),
        v.view(2, 70, 3, 16).transpose(1, 2)), CPU_KERNEL)
    torch.testing.assert_close(ours, dense.transpose(1, 2).reshape(74, 3, 16), **TOL[torch.float32])


# ---- dropout ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("causal,window", [(False, (-1, -1)), (True, (-1, -1)), (False, (20, 3))])
def test_dropout_exact_against_reference_with_the_same_mask(causal, window):
    """The kernel's in-kernel mask (read back through the test hook) given to the reference: outputs and
    gradients agree to float64 rounding, so the backward regenerated the forward's mask."""
    torch.manual_seed(6)
    lens_q, lens_k = [5, 1, 130, 40], [9, 3, 200, 0]
    q, k, v, cu_q, cu_k = packed(lens_q, lens_k)
    p, seed = 0.3, torch.tensor([1234567], dtype=torch.int64)
    args = (cu_q, cu_k, max(lens_q), max(lens_k), causal, 0.25, window[0], window[1], p, seed)
    out, _ = ops.attention_varlen_forward(q, k, v, *args)
    z = ops.dropout_mask(len(lens_q), q.shape[1], max(lens_q), max(lens_k), p, seed)
    dropped = (z == 0).double().mean().item()
    assert abs(dropped - p) < 0.01, dropped
    q64, k64, v64 = (x.detach().clone().requires_grad_() for x in (q, k, v))
    ref = reference.attention_varlen(q64, k64, v64, cu_q, cu_k, causal, 0.25, window, dropout=z)
    torch.testing.assert_close(out, ref, **TOL[torch.float64])
    grad_out = torch.randn_like(ref)
    for name, a, b in zip("qkv", torch.autograd.grad(out, (q, k, v), grad_out),
                          torch.autograd.grad(ref, (q64, k64, v64), grad_out)):
        torch.testing.assert_close(a, b, **TOL[torch.float64], msg=lambda m, name=name: f"grad {name}: {m}")
    # and without the mask the reference disagrees: the test can fail
    assert not torch.allclose(out, reference.attention_varlen(q64, k64, v64, cu_q, cu_k, causal, 0.25, window))


def test_dropout_statistics_of_the_kernel():
    """With v the identity, each output row is that query's dropped probabilities P * Z: the kernel drops
    a fraction p of the positive ones and scales the rest by 1 / (1 - p), so each row's expectation is P."""
    torch.manual_seed(7)
    len_k, p = 64, 0.25
    lens = [len_k] * 8
    q, k, _, cu_q, cu_k = packed(lens, lens, heads_q=2, heads_kv=2, grad=False)
    v = torch.eye(len_k, dtype=torch.float64).repeat(len(lens), 1)[:, None, :].expand(-1, 2, -1).contiguous()
    probs = gf.flash_attn_varlen(q, k, v, cu_q, cu_k, len_k, len_k)
    torch.manual_seed(8)
    dropped = expect_varlen(lambda: gf.flash_attn_varlen(q, k, v, cu_q, cu_k, len_k, len_k, dropout_p=p))
    zeros = (dropped == 0).double().mean().item()
    n = dropped.numel()  # 65536 Bernoulli(p) draws: the binomial std of the fraction is ~0.0017
    assert abs(zeros - p) < 5 * math.sqrt(p * (1 - p) / n), zeros
    kept = dropped != 0
    torch.testing.assert_close(dropped[kept], probs[kept] / (1 - p), **TOL[torch.float64])
    # the same seed gives the same mask; another seed another one
    torch.manual_seed(8)
    assert torch.equal(gf.flash_attn_varlen(q, k, v, cu_q, cu_k, len_k, len_k, dropout_p=p), dropped)
    assert not torch.equal(gf.flash_attn_varlen(q, k, v, cu_q, cu_k, len_k, len_k, dropout_p=p), dropped)
    # p = 1 drops everything
    assert (gf.flash_attn_varlen(q, k, v, cu_q, cu_k, len_k, len_k, dropout_p=1.0) == 0).all()


# ---- op registration -----------------------------------------------------------------------------------

def test_opcheck():
    torch.manual_seed(9)
    q, k, v, cu_q, cu_k = packed([3, 0, 9], [13, 2, 5], heads_q=4, heads_kv=2, dim=8, dtype=torch.float32)
    seed = torch.tensor([42], dtype=torch.int64)
    for causal, window, p in [(False, (-1, -1), 0.0), (True, (-1, -1), 0.0), (False, (2, 3), 0.0),
                              (True, (4, -1), 0.2)]:
        args = (cu_q, cu_k, 9, 13, causal, 0.35, window[0], window[1], p, seed if p else None)
        torch.library.opcheck(torch.ops.genfast.attention_varlen_forward.default, (q, k, v, *args))
        with torch.no_grad():
            out, lse = ops.attention_varlen_forward(q, k, v, *args)
        torch.library.opcheck(torch.ops.genfast.attention_varlen_backward.default,
                              (torch.randn_like(out), q.detach(), k.detach(), v.detach(), out, lse, *args))
    torch.library.opcheck(torch.ops.genfast.attention_dropout_mask.default, (2, 3, 4, 5, 0.5, seed))


def test_torch_compile_fullgraph():
    torch.manual_seed(10)
    q, k, v, cu_q, cu_k = packed([5, 1, 12], [7, 3, 12], dtype=torch.float32)

    def fn(q, k, v):
        return gf.flash_attn_varlen(q, k, v, cu_q, cu_k, 12, 12, causal=True, window_size=(4, -1)).square().sum()

    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    grads_compiled = torch.autograd.grad(compiled(q, k, v), (q, k, v))
    grads_eager = torch.autograd.grad(expect_varlen(lambda: fn(q, k, v)), (q, k, v))
    for a, b in zip(grads_compiled, grads_eager):
        torch.testing.assert_close(a, b, **TOL[torch.float32])

    # dropout: the seed is drawn inside the graph from torch's generator, as in eager mode
    def dropped(q, k, v):
        return gf.flash_attn_varlen(q, k, v, cu_q, cu_k, 12, 12, dropout_p=0.3).square().sum()

    compiled = torch.compile(dropped, fullgraph=True, backend="aot_eager")
    torch.manual_seed(14)
    loss_compiled = compiled(q, k, v)
    grads_compiled = torch.autograd.grad(loss_compiled, (q, k, v))
    torch.manual_seed(14)
    loss_eager = dropped(q, k, v)
    torch.testing.assert_close(loss_compiled, loss_eager, **TOL[torch.float32])
    for a, b in zip(grads_compiled, torch.autograd.grad(loss_eager, (q, k, v))):
        torch.testing.assert_close(a, b, **TOL[torch.float32])


def test_bad_inputs_name_the_argument():
    q, k, v, cu_q, cu_k = packed([3, 4], [5, 6], grad=False)
    call = lambda **kw: gf.flash_attn_varlen(**{**dict(q=q, k=k, v=v, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k,  # noqa
                                                        max_seqlen_q=4, max_seqlen_k=6), **kw})
    cases = [
        (dict(q=q[None]), ValueError, "q must be 3-D"),
        (dict(k=k.float()), TypeError, "share a dtype"),
        (dict(q=q.long(), k=k.long(), v=v.long()), TypeError, "q must be float"),
        (dict(v=v[:-1]), ValueError, "v's"),
        (dict(k=k[..., :8], v=v[..., :8]), ValueError, "head_dim"),
        (dict(k=torch.randn(11, 3, 16, dtype=torch.float64), v=torch.randn(11, 3, 16, dtype=torch.float64)),
         ValueError, "multiple"),
        (dict(cu_seqlens_q=cu_q.long()), ValueError, "cu_seqlens_q must be a 1-D int32"),
        (dict(cu_seqlens_k=cu_k[:2]), ValueError, "same batch"),
        (dict(cu_seqlens_q=torch.tensor([0, 3, 6], dtype=torch.int32)), ValueError, r"cu_seqlens_q\[-1\] = 6"),
        (dict(cu_seqlens_k=torch.tensor([0, 9, 2], dtype=torch.int32)), ValueError, "cu_seqlens_k must not decrease"),
        (dict(cu_seqlens_k=torch.tensor([1, 5, 11], dtype=torch.int32)), ValueError, "cu_seqlens_k must start at 0"),
        (dict(max_seqlen_q=3), ValueError, "max_seqlen_q = 3"),
        (dict(max_seqlen_k=-1), ValueError, "max_seqlen_k must be an int"),
        (dict(window_size=(-2, 0)), ValueError, "window_size"),
        (dict(dropout_p=1.5), ValueError, "dropout_p"),
    ]
    for kwargs, error, match in cases:
        with pytest.raises(error, match=match):
            call(**kwargs)
    # the op checks the offsets itself too (it can be called without the wrapper)
    with pytest.raises(RuntimeError, match="max_seqlen_k"):
        ops.attention_varlen_forward(q, k, v, cu_q, cu_k, 4, 5, False, 1.0, -1, -1, 0.0, None)
    with pytest.raises(RuntimeError, match="dropout_seed"):
        ops.attention_varlen_forward(q, k, v, cu_q, cu_k, 4, 6, False, 1.0, -1, -1, 0.5, None)


# ---- MultiheadAttention: key padding at the end of each row runs varlen ------------------------------

def _mha_pair(dtype, **config):
    torch.manual_seed(11)
    theirs = nn.MultiheadAttention(32, 4, dtype=dtype, **config).eval()
    ours = MultiheadAttention(32, 4, dtype=dtype, **config).eval()
    ours.load_state_dict(theirs.state_dict())
    return ours, theirs


@pytest.mark.parametrize("batch_first", [False, True])
@pytest.mark.parametrize("float_mask", [False, True])
def test_mha_end_padding_runs_varlen(batch_first, float_mask):
    dtype = torch.float64
    ours, theirs = _mha_pair(dtype, batch_first=batch_first)
    bsz, tgt, src = 4, 6, 11
    shape = lambda n: (bsz, n, 32) if batch_first else (n, bsz, 32)  # noqa: E731
    query, key = torch.randn(*shape(tgt), dtype=dtype), torch.randn(*shape(src), dtype=dtype)
    lengths = torch.tensor([11, 3, 1, 7])
    padding = torch.arange(src)[None, :] >= lengths[:, None]  # True = padded key, torch's convention
    mask = torch.zeros(bsz, src, dtype=dtype).masked_fill(padding, float("-inf")) if float_mask else padding
    out, weights = sdpa_dispatch.expect_dispatch(
        lambda: ours(query, key, key, key_padding_mask=mask, need_weights=False), CPU_VARLEN, "key_padding_mask")
    ref, _ = theirs(query, key, key, key_padding_mask=mask, need_weights=False)
    assert weights is None
    torch.testing.assert_close(out, ref, **TOL[dtype])
    grads = torch.autograd.grad(out.square().sum(), list(ours.parameters()))
    ref_grads = torch.autograd.grad(ref.square().sum(), list(theirs.parameters()))
    for (name, _), a, b in zip(ours.named_parameters(), grads, ref_grads):
        torch.testing.assert_close(a, b, **TOL[dtype], msg=lambda m, name=name: f"{name}: {m}")


def test_mha_other_padding_keeps_the_dense_mask():
    dtype = torch.float64
    ours, theirs = _mha_pair(dtype)
    bsz, tgt, src = 3, 5, 9
    query, key = torch.randn(tgt, bsz, 32, dtype=dtype), torch.randn(src, bsz, 32, dtype=dtype)
    padding = torch.zeros(bsz, src, dtype=torch.bool)
    padding[0, 2] = True  # a hole in the middle of a row
    padding[1, -2:] = True
    float_mask = torch.zeros(bsz, src, dtype=dtype)
    float_mask[2, 4] = -3.0  # an additive value other than 0 / -inf: a real mask
    for mask in (padding, float_mask):
        out, _ = sdpa_dispatch.expect_dispatch(
            lambda: ours(query, key, key, key_padding_mask=mask, need_weights=False), CPU_KERNEL)
        ref, _ = theirs(query, key, key, key_padding_mask=mask, need_weights=False)
        torch.testing.assert_close(out, ref, **TOL[dtype])
    # with an attn_mask as well, the padding is merged into it (dense)
    attn_mask = torch.rand(tgt, src) > 0.3
    attn_mask[:, 0] = True
    end_padding = torch.arange(src)[None, :] >= torch.tensor([9, 4, 2])[:, None]
    out, _ = sdpa_dispatch.expect_dispatch(lambda: ours(query, key, key, key_padding_mask=end_padding,
                                                        attn_mask=attn_mask, need_weights=False), CPU_KERNEL)
    ref, _ = theirs(query, key, key, key_padding_mask=end_padding, attn_mask=attn_mask, need_weights=False)
    torch.testing.assert_close(out, ref, **TOL[dtype])


def test_mha_training_dropout_runs_in_the_varlen_kernel():
    ours, _ = _mha_pair(torch.float32, batch_first=True, dropout=0.5)
    ours.train()
    x = torch.randn(2, 7, 32)
    padding = torch.arange(7)[None, :] >= torch.tensor([7, 4])[:, None]
    torch.manual_seed(12)
    out = sdpa_dispatch.expect_dispatch(lambda: ours(x, x, x, key_padding_mask=padding, need_weights=False)[0],
                                        CPU_VARLEN)
    torch.manual_seed(12)
    torch.testing.assert_close(ours(x, x, x, key_padding_mask=padding, need_weights=False)[0], out, atol=0, rtol=0)
    ours.eval()
    assert not torch.allclose(ours(x, x, x, key_padding_mask=padding, need_weights=False)[0], out)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA is not available")
def test_mha_end_padding_runs_the_triton_varlen_kernel_on_cuda():
    """On CUDA the same route runs genfast.kernels.flash_attention.flash_attention_varlen (Triton)."""
    from tests.sdpa_dispatch import TRITON_VARLEN

    torch.manual_seed(15)
    theirs = nn.MultiheadAttention(64, 4, batch_first=True, device="cuda").eval()
    ours = MultiheadAttention(64, 4, batch_first=True, device="cuda").eval()
    ours.load_state_dict(theirs.state_dict())
    x = torch.randn(3, 40, 64, device="cuda")
    padding = torch.arange(40, device="cuda")[None, :] >= torch.tensor([40, 17, 3], device="cuda")[:, None]
    out, _ = sdpa_dispatch.expect_dispatch(lambda: ours(x, x, x, key_padding_mask=padding, need_weights=False),
                                           TRITON_VARLEN)
    ref, _ = theirs(x, x, x, key_padding_mask=padding, need_weights=False)
    # fp32 with IEEE products in the Triton kernel: rounding of sums over <= 40 keys
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)
