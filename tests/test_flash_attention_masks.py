"""Masks, dropout, sliding windows and packed (varlen) batches in the Triton flash-attention kernels,
on the CPU under the Triton interpreter.

Run in its own process (the Makefile does): TRITON_INTERPRET must be set before triton is imported.
    TRITON_INTERPRET=1 python -m pytest tests/test_flash_attention_masks.py
The interpreted tile is 16 x 16, so lengths 17..40 cover partial tiles and several tiles per row.
The oracle below is plain PyTorch in float64 (genfast.reference's attention scores plus the window,
the empty-row rule and a given dropout mask), applied to the same rounded inputs.
"""
import math
import os

os.environ["TRITON_INTERPRET"] = "1"  # before triton or genfast.kernels is imported

import pytest  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from genfast import reference  # noqa: E402
from genfast.kernels import flash_attention as fa  # noqa: E402
from genfast.ops import attention as attention_op  # noqa: E402

pytestmark = pytest.mark.skipif(
    not fa._INTERPRETED,
    reason="genfast.kernels.flash_attention was imported before TRITON_INTERPRET=1 was set; run this file in its "
           "own process: TRITON_INTERPRET=1 python -m pytest tests/test_flash_attention_masks.py")


def _make(generator, dtype, *shape):
    return torch.randn(*shape, generator=generator, dtype=torch.float64).to(dtype)


def _dense_inputs(batch, q_heads, kv_heads, len_q, len_k, head_dim, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (_make(g, dtype, batch, q_heads, len_q, head_dim), _make(g, dtype, batch, kv_heads, len_k, head_dim),
            _make(g, dtype, batch, kv_heads, len_k, head_dim), _make(g, dtype, batch, q_heads, len_q, head_dim))


def _window_keep(len_q, len_k, window, causal, bottom_right=False):
    """(Lq, Lk) bool: query i sees key j when i + d - left <= j <= i + d + right (d = Lk - Lq bottom-right
    aligned, else 0); causal sets right = 0; -1 leaves a side open."""
    left, right = window
    if causal:
        right = 0
    i = torch.arange(len_q)[:, None] + (len_k - len_q if bottom_right else 0)
    j = torch.arange(len_k)[None, :]
    keep = torch.ones(len_q, len_k, dtype=torch.bool)
    if left >= 0:
        keep &= j >= i - left
    if right >= 0:
        keep &= j <= i + right
    return keep


def oracle(q, k, v, attn_mask=None, causal=False, window=(-1, -1), scale=None, keep=None, dropout_p=0.0,
           bottom_right=False):
    """Textbook attention: scores (reference.attention_scores, GQA) masked by the window, softmax with rows
    that see no key set to 0 (torch's rule for fully masked rows), the given dropout keep mask applied
    with the 1/(1-p) scale, times v."""
    scores = reference.attention_scores(q, k, attn_mask, False, scale, enable_gqa=True)
    scores = scores.masked_fill(~_window_keep(q.shape[-2], k.shape[-2], window, causal, bottom_right), float("-inf"))
    empty = scores.isneginf().all(dim=-1, keepdim=True)
    probs = torch.softmax(scores.masked_fill(empty, 0.0), dim=-1).masked_fill(empty, 0.0)
    if keep is not None:
        probs = probs * keep / (1.0 - dropout_p)
    return probs @ reference.repeat_kv_heads(v, q.shape[-3])


def _output_and_grads(fn, q, k, v, grad_out):
    q, k, v = (t.detach().clone().requires_grad_() for t in (q, k, v))
    out = fn(q, k, v)
    out.backward(grad_out.to(out.dtype))
    return out.detach(), q.grad, k.grad, v.grad


def _assert_close_fp64(ours, expected):
    # float64 kernels against a float64 oracle: both are sums of <= 40 (x heads) products, rounding
    # ~1e-15 relative; 1e-10 is far above that and far below any masking bug (errors ~1e-1).
    for name, got, want in zip(("out", "dq", "dk", "dv"), ours, expected):
        assert got.shape == want.shape and got.dtype == want.dtype, name
        assert torch.isfinite(got).all(), name
        torch.testing.assert_close(got, want, atol=1e-10, rtol=1e-10, msg=lambda m: f"{name}: {m}")


# ---- masks ------------------------------------------------------------------------------------------

B, HQ, HK, LQ, LK, D = 2, 2, 1, 17, 20, 16
MASK_SHAPES = [(LK,), (LQ, LK), (1, 1, 1, LK), (B, 1, LQ, LK), (1, HQ, 1, LK), (B, HQ, LQ, LK)]


def _mask(shape, kind, seed):
    g = torch.Generator().manual_seed(seed)
    keep = torch.rand(shape, generator=g) > 0.4
    if len(shape) >= 2 and shape[-2] == LQ:
        keep[..., 5, :] = False  # a fully masked query row
    if kind == "bool":
        return keep
    bias = torch.randn(shape, generator=g, dtype=torch.float64)
    return torch.where(keep, bias, float("-inf"))


@pytest.mark.parametrize("kind", ["bool", "additive"])
@pytest.mark.parametrize("shape", MASK_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_masks_of_every_broadcast_shape(shape, kind):
    q, k, v, grad_out = _dense_inputs(B, HQ, HK, LQ, LK, D, seed=len(shape))
    mask = _mask(shape, kind, seed=sum(shape))
    causal = len(shape) % 2 == 0  # half of the shapes with causal on top
    ours = _output_and_grads(lambda a, b, c: fa.flash_attention(a, b, c, attn_mask=mask, causal=causal), q, k, v,
                             grad_out)
    _assert_close_fp64(ours, _output_and_grads(lambda a, b, c: oracle(a, b, c, mask, causal), q, k, v, grad_out))


def test_fully_masked_rows_give_zero_like_torch():
    # Every key of rows 0 and 3 masked (bool), of row 4 at -inf (additive): output 0 and no gradient
    # through them, as torch's SDPA gives on the CPU; every other row matches torch too.
    q, k, v, grad_out = _dense_inputs(1, 2, 2, 6, 9, 16, seed=3)
    keep = torch.rand(6, 9, generator=torch.Generator().manual_seed(1)) > 0.3
    keep[0] = keep[3] = False
    additive = torch.where(keep, 0.5, float("-inf")).double()
    additive[4] = float("-inf")
    for mask in (keep, additive):
        ours = _output_and_grads(lambda a, b, c: fa.flash_attention(a, b, c, attn_mask=mask), q, k, v, grad_out)
        torchs = _output_and_grads(lambda a, b, c: F.scaled_dot_product_attention(a, b, c, attn_mask=mask),
                                   q, k, v, grad_out)
        empty_rows = [0, 3] if mask.dtype == torch.bool else [0, 3, 4]
        assert (ours[0][:, :, empty_rows] == 0).all() and (ours[1][:, :, empty_rows] == 0).all()
        _assert_close_fp64(ours, torchs)


def test_mask_is_read_through_strides_not_copied():
    # A transposed (non-contiguous) mask and a stride-0 expanded one give what their contiguous copies give.
    q, k, v, _ = _dense_inputs(1, 2, 2, 17, 17, 16, seed=4)
    base = torch.rand(17, 17, generator=torch.Generator().manual_seed(2)) > 0.5
    base.fill_diagonal_(True)
    for mask in (base.t(), base[None, None].expand(1, 2, 17, 17)):
        torch.testing.assert_close(fa.flash_attention(q, k, v, attn_mask=mask),
                                   fa.flash_attention(q, k, v, attn_mask=mask.contiguous()), atol=0, rtol=0)


# ---- windows ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("window,causal", [((3, 0), False), ((4, 2), False), ((-1, 2), False), ((2, -1), False),
                                           ((5, 7), True), ((0, 0), False)])
def test_sliding_windows(window, causal):
    # GQA, Lq < Lk, 40 keys = three key tiles: windows cut whole tiles out of each row block's walk.
    q, k, v, grad_out = _dense_inputs(1, 2, 1, 33, 40, 16, seed=5)
    ours = _output_and_grads(lambda a, b, c: fa.flash_attention(a, b, c, window_size=window, causal=causal),
                             q, k, v, grad_out)
    _assert_close_fp64(ours, _output_and_grads(lambda a, b, c: oracle(a, b, c, None, causal, window), q, k, v,
                                               grad_out))


def test_window_skips_the_tiles_outside_it():
    # 16 queries (one tile) with window (2, 2) see keys 0..17 only: the key tiles 32..63 are outside every
    # row's window. They hold NaN; a kernel that loaded them and masked afterwards would get NaN (0 * NaN
    # in P @ V), one that skips them (the loop bounds) matches the oracle on the first 32 keys.
    q, k, v, grad_out = _dense_inputs(1, 1, 1, 16, 64, 16, seed=6)
    k[:, :, 32:], v[:, :, 32:] = float("nan"), float("nan")
    ours = _output_and_grads(lambda a, b, c: fa.flash_attention(a, b, c, window_size=(2, 2)), q, k, v, grad_out)
    want = _output_and_grads(lambda a, b, c: oracle(a, b, c, window=(2, 2)), q, k[:, :, :32], v[:, :, :32], grad_out)
    for got, expected in zip(ours[:2], want[:2]):
        torch.testing.assert_close(got, expected, atol=1e-10, rtol=1e-10)
    for got, expected in zip(ours[2:], want[2:]):  # dK, dV: the first 32 keys as the oracle, 0 beyond
        torch.testing.assert_close(got[:, :, :32], expected, atol=1e-10, rtol=1e-10)
        assert (got[:, :, 32:] == 0).all()


def test_window_skips_the_tiles_before_it():
    # Bottom-right aligned (packed) 16 queries over 80 keys with window (2, 2) see keys 62..79: the key
    # tiles 0..47 lie before every row's window and hold NaN; the loop starts past them (forward and dQ),
    # and the dK/dV programs of those tiles visit no query block, so their gradients are 0.
    q, k, v, grad_out, cu_q, cu_k = _varlen_inputs([16], [80], q_heads=1, kv_heads=1, head_dim=16, seed=22)
    k[:48], v[:48] = float("nan"), float("nan")
    ours = _output_and_grads(lambda a, b, c: fa.flash_attention_varlen(a, b, c, cu_q, cu_k, 16, 80,
                                                                       window_size=(2, 2)), q, k, v, grad_out)
    want = _output_and_grads(lambda a, b, c: oracle(a.transpose(0, 1), b.transpose(0, 1), c.transpose(0, 1),
                                                    window=(2, 2), bottom_right=True).transpose(0, 1),
                             q, k[48:], v[48:], grad_out)
    for got, expected in zip(ours[:2], want[:2]):
        torch.testing.assert_close(got, expected, atol=1e-10, rtol=1e-10)
    for got, expected in zip(ours[2:], want[2:]):
        torch.testing.assert_close(got[48:], expected, atol=1e-10, rtol=1e-10)
        assert (got[:48] == 0).all()


# ---- dropout ----------------------------------------------------------------------------------------

def _same_seed_as_the_kernel(torch_seed):
    """The Philox key flash_attention draws after torch.manual_seed(torch_seed), and the generator reset."""
    torch.manual_seed(torch_seed)
    seed = fa.draw_dropout_seed("cpu")
    torch.manual_seed(torch_seed)
    return seed


@pytest.mark.parametrize("causal,with_mask", [(False, False), (True, True)])
def test_dropout_matches_the_oracle_given_the_kernels_mask(causal, with_mask):
    p = 0.3
    q, k, v, grad_out = _dense_inputs(2, 2, 1, 17, 33, 16, seed=7)
    mask = _mask((17, 33), "additive", seed=8) if with_mask else None
    seed = _same_seed_as_the_kernel(11)
    ours = _output_and_grads(lambda a, b, c: fa.flash_attention(a, b, c, attn_mask=mask, causal=causal, dropout_p=p),
                             q, k, v, grad_out)
    keep = fa.dropout_keep_mask(seed, 2, 2, 17, 33, p)
    assert 0 < keep.sum() < keep.numel()
    want = _output_and_grads(lambda a, b, c: oracle(a, b, c, mask, causal, keep=keep, dropout_p=p), q, k, v, grad_out)
    _assert_close_fp64(ours, want)
    # The mask depends on torch's generator: another torch seed gives another output.
    torch.manual_seed(12)
    assert not torch.equal(fa.flash_attention(q, k, v, causal=causal, attn_mask=mask, dropout_p=p), ours[0])


@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
def test_dropout_keep_rate_is_binomial(p):
    # 2 x 4 x 64 x 64 = 32768 Bernoulli(1 - p) draws: the keep count is within 5 standard deviations of
    # its mean (a false failure has probability < 1e-6); rows, columns and heads are not copies of each other.
    keep = fa.dropout_keep_mask(fa.draw_dropout_seed("cpu"), 2, 4, 64, 64, p)
    n = keep.numel()
    mean, sd = n * (1 - p), math.sqrt(n * p * (1 - p))
    assert abs(keep.sum().item() - mean) <= 5 * sd, (keep.sum().item(), mean, sd)
    flat = keep.reshape(8, 64, 64)
    assert not torch.equal(flat[0], flat[1]) and not torch.equal(flat[0, 0], flat[0, 1])
    assert not torch.equal(flat[0, :, 0], flat[0, :, 1])
    # Per-row rates spread like a binomial of 64 draws, not more (no row pattern); 5 sd on the variance
    # estimate of 512 rows.
    row_rates = flat.double().mean(-1).flatten()
    assert abs(row_rates.var().item() - p * (1 - p) / 64) <= 5 * math.sqrt(2 / 511) * p * (1 - p) / 64


def test_dropout_edge_probabilities():
    q, k, v, _ = _dense_inputs(1, 1, 1, 5, 7, 16, seed=9)
    torch.testing.assert_close(fa.flash_attention(q, k, v, dropout_p=0.0), oracle(q, k, v), atol=1e-12, rtol=1e-12)
    assert (fa.flash_attention(q, k, v, dropout_p=1.0) == 0).all()  # torch's SDPA gives 0 too


# ---- packed variable-length batches --------------------------------------------------------------------

def _varlen_inputs(lengths_q, lengths_k, q_heads, kv_heads, head_dim, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    total_q, total_k = sum(lengths_q), sum(lengths_k)
    cu = lambda lengths: torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    return (_make(g, dtype, total_q, q_heads, head_dim), _make(g, dtype, total_k, kv_heads, head_dim),
            _make(g, dtype, total_k, kv_heads, head_dim), _make(g, dtype, total_q, q_heads, head_dim),
            cu(lengths_q), cu(lengths_k))


def _varlen_oracle(q, k, v, cu_q, cu_k, causal, window, keep=None, dropout_p=0.0):
    """Each sequence alone through the oracle, bottom-right aligned, in (L, H, D) layout, then packed."""
    outs = []
    for b in range(cu_q.numel() - 1):
        qs, ks, vs = (t[c[b]:c[b + 1]].transpose(0, 1) for t, c in ((q, cu_q), (k, cu_k), (v, cu_k)))
        keep_b = None if keep is None else keep[b, :, :qs.shape[1], :ks.shape[1]]
        outs.append(oracle(qs, ks, vs, None, causal, window, keep=keep_b, dropout_p=dropout_p,
                           bottom_right=True).transpose(0, 1))
    return torch.cat(outs)


# Lengths include 1-row sequences, a sequence with 0 keys, one with 0 queries, Lq > Lk and Lq < Lk.
VARLEN_LENGTHS = ([1, 17, 5, 0, 33, 3], [1, 20, 0, 4, 18, 35])


@pytest.mark.parametrize("causal,window", [(False, (-1, -1)), (True, (-1, -1)), (True, (6, -1)), (False, (3, 2))])
def test_varlen_matches_each_sequence_alone(causal, window):
    q, k, v, grad_out, cu_q, cu_k = _varlen_inputs(*VARLEN_LENGTHS, q_heads=4, kv_heads=2, head_dim=24, seed=10)
    max_q, max_k = max(VARLEN_LENGTHS[0]), max(VARLEN_LENGTHS[1])
    ours = _output_and_grads(lambda a, b, c: fa.flash_attention_varlen(
        a, b, c, cu_q, cu_k, max_q, max_k, causal=causal, window_size=window), q, k, v, grad_out)
    want = _output_and_grads(lambda a, b, c: _varlen_oracle(a, b, c, cu_q, cu_k, causal, window), q, k, v, grad_out)
    _assert_close_fp64(ours, want)


def test_varlen_causal_is_bottom_right_and_matches_dense_when_lengths_agree():
    # One sequence with Lq = Lk: bottom-right and top-left coincide, so the packed call equals the dense one.
    q, k, v, _, cu_q, cu_k = _varlen_inputs([19], [19], q_heads=2, kv_heads=2, head_dim=16, seed=12)
    packed = fa.flash_attention_varlen(q, k, v, cu_q, cu_k, 19, 19, causal=True)
    dense = fa.flash_attention(*(t.transpose(0, 1)[None] for t in (q, k, v)), causal=True)
    torch.testing.assert_close(packed, dense[0].transpose(0, 1), atol=1e-12, rtol=1e-12)
    # Lq = 3 queries over Lk = 5 keys: the last query sees all 5 keys (bottom-right), the first sees 3.
    q, k, v, _, cu_q, cu_k = _varlen_inputs([3], [5], q_heads=1, kv_heads=1, head_dim=16, seed=13)
    out = fa.flash_attention_varlen(q, k, v, cu_q, cu_k, 3, 5, causal=True)
    torch.testing.assert_close(out[0, 0], torch.softmax(q[0, 0] @ k[:3, 0].T / 4, -1) @ v[:3, 0], atol=1e-12, rtol=0)
    torch.testing.assert_close(out[2, 0], torch.softmax(q[2, 0] @ k[:, 0].T / 4, -1) @ v[:, 0], atol=1e-12, rtol=0)


def test_varlen_dropout_matches_the_oracle_given_the_kernels_mask():
    p = 0.25
    q, k, v, grad_out, cu_q, cu_k = _varlen_inputs([1, 17, 6], [3, 17, 20], q_heads=2, kv_heads=1, head_dim=16,
                                                   seed=14)
    seed = _same_seed_as_the_kernel(21)
    ours = _output_and_grads(lambda a, b, c: fa.flash_attention_varlen(a, b, c, cu_q, cu_k, 17, 20, causal=True,
                                                                       dropout_p=p), q, k, v, grad_out)
    keep = fa.dropout_keep_mask(seed, 3, 2, 17, 20, p)
    want = _output_and_grads(lambda a, b, c: _varlen_oracle(a, b, c, cu_q, cu_k, True, (-1, -1), keep, p),
                             q, k, v, grad_out)
    _assert_close_fp64(ours, want)


# ---- low precision: our error against torch's, in the same dtype ------------------------------------

@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_masked_window_error_within_2x_torch(dtype):
    # FlashAttention's test style: both kernels' errors against the float64 oracle on the same rounded
    # inputs; ours may be at most 2x torch's SDPA (CPU, same dtype, the window passed as a bool mask) plus
    # a little absolute slack for entries where torch is exact by luck.
    q, k, v, grad_out = _dense_inputs(1, 2, 1, 33, 40, 64, dtype=dtype, seed=15)
    bias = (torch.randn(33, 40, generator=torch.Generator().manual_seed(16)) * 2).to(dtype)
    window = (9, 3)
    ours = _output_and_grads(lambda a, b, c: fa.flash_attention(a, b, c, attn_mask=bias, window_size=window),
                             q, k, v, grad_out)
    torch_mask = bias.masked_fill(~_window_keep(33, 40, window, False), float("-inf"))
    torchs = _output_and_grads(lambda a, b, c: F.scaled_dot_product_attention(
        a, b, c, attn_mask=torch_mask, enable_gqa=True), q, k, v, grad_out)
    want = _output_and_grads(lambda a, b, c: oracle(a, b, c, bias.double(), False, window),
                             *(t.double() for t in (q, k, v, grad_out)))
    slack = {torch.float16: 2.0 ** -11, torch.bfloat16: 2.0 ** -8}[dtype]
    for name, got, theirs, expected in zip(("out", "dq", "dk", "dv"), ours, torchs, want):
        assert got.dtype == dtype, name
        our_error = (got.double() - expected).abs().max().item()
        torch_error = (theirs.double() - expected).abs().max().item()
        scale = max(1.0, expected.abs().max().item())
        assert our_error <= 2 * torch_error + slack * scale, f"{name}: {our_error:.3g} > 2 x torch's {torch_error:.3g}"


def test_fp32_mask_window_and_dropout_together():
    q, k, v, grad_out = _dense_inputs(1, 2, 2, 20, 33, 32, dtype=torch.float32, seed=17)
    mask = torch.rand(1, 2, 20, 33, generator=torch.Generator().manual_seed(18)) > 0.2
    seed = _same_seed_as_the_kernel(19)
    ours = _output_and_grads(lambda a, b, c: fa.flash_attention(a, b, c, attn_mask=mask, window_size=(7, 4),
                                                                dropout_p=0.2), q, k, v, grad_out)
    keep = fa.dropout_keep_mask(seed, 1, 2, 20, 33, 0.2)
    want = _output_and_grads(lambda a, b, c: oracle(a, b, c, mask, False, (7, 4), keep=keep, dropout_p=0.2),
                             *(t.double() for t in (q, k, v, grad_out)))
    for name, got, expected in zip(("out", "dq", "dk", "dv"), ours, want):
        # IEEE fp32 products over <= 33 terms: ~1e-7 relative; 1e-5 of the scale leaves 10x+ margin.
        error = (got.double() - expected).abs().max().item()
        assert error <= 1e-5 * max(1.0, expected.abs().max().item()), (name, error)


# ---- the op route and errors ----------------------------------------------------------------------

def test_op_cuda_kernel_takes_a_mask_and_matches_the_cpu_op():
    # genfast.ops.attention's registered CUDA kernels (what masked SDPA calls run on a GPU) against the
    # C++ CPU op, with a broadcast bool mask and causal.
    q, k, v, grad = _dense_inputs(2, 4, 2, 9, 20, 24, seed=20)
    mask = torch.rand(1, 4, 9, 20, generator=torch.Generator().manual_seed(3)) > 0.3
    out, lse = attention_op.attention_forward_cuda(q, k, v, mask, True, 0.3)
    want_out, want_lse = torch.ops.genfast.attention_forward(q, k, v, mask, True, 0.3)
    torch.testing.assert_close(out, want_out, atol=1e-10, rtol=1e-10)
    finite = torch.isfinite(want_lse)
    assert torch.equal(finite, torch.isfinite(lse))
    torch.testing.assert_close(lse[finite], want_lse[finite], atol=1e-10, rtol=1e-10)
    grads = attention_op.attention_backward_cuda(grad, q, k, v, out, lse, mask, True, 0.3)
    want = torch.ops.genfast.attention_backward(grad, q, k, v, want_out, want_lse, mask, True, 0.3)
    for got, expected in zip(grads, want):
        torch.testing.assert_close(got, expected, atol=1e-10, rtol=1e-10)


def test_bad_arguments_are_refused_by_name():
    q, k, v, _ = _dense_inputs(1, 2, 1, 4, 5, 16)
    with pytest.raises(ValueError, match="attn_mask requires grad"):
        fa.flash_attention(q, k, v, attn_mask=torch.zeros(4, 5, dtype=torch.float64, requires_grad=True))
    with pytest.raises(ValueError, match="does not broadcast"):
        fa.flash_attention(q, k, v, attn_mask=torch.ones(4, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="attn_mask must be bool"):
        fa.flash_attention(q, k, v, attn_mask=torch.ones(4, 5, dtype=torch.int32))
    with pytest.raises(ValueError, match="window_size"):
        fa.flash_attention(q, k, v, window_size=(-2, 0))
    with pytest.raises(ValueError, match="dropout_p"):
        fa.flash_attention(q, k, v, dropout_p=1.5)
    qp, kp, vp, _, cu_q, cu_k = _varlen_inputs([2, 3], [2, 3], 2, 1, 16)
    with pytest.raises(ValueError, match="max_seqlen_q"):
        fa.flash_attention_varlen(qp, kp, vp, cu_q, cu_k, 2, 3)
    with pytest.raises(ValueError, match="cu_seqlens_k"):
        fa.flash_attention_varlen(qp, kp, vp, cu_q, torch.tensor([0, 3, 9], dtype=torch.int32), 3, 6)
    with pytest.raises(ValueError, match="same number of sequences"):
        fa.flash_attention_varlen(qp, kp, vp, cu_q, cu_k[:2], 3, 3)


def test_cuda_dispatch_keeps_masked_and_dropout_calls_in_the_kernel():
    # genfast.nn.functional's rule for CUDA tensors (checked on CPU tensors: the rule reads only shapes,
    # dtypes and flags): masks and dropout no longer hand off to torch; a mask that requires grad does.
    from genfast.nn import functional as gf

    q = torch.zeros(1, 2, 4, 16, dtype=torch.float16)
    mask = torch.ones(4, 4, dtype=torch.bool)
    assert gf._triton_unsupported(q, q, q, mask, 0.1, False) is None
    assert gf._triton_unsupported(q, q, q, torch.zeros(4, 4, dtype=torch.float16), 0.0, True) is None
    learned = torch.zeros(4, 4, dtype=torch.float16, requires_grad=True)
    assert "mask gradient" in gf._triton_unsupported(q, q, q, learned, 0.0, False)
    with torch.no_grad():
        assert gf._triton_unsupported(q, q, q, learned, 0.0, False) is None


def test_gradcheck_fp64_mask_window_dropout_and_varlen():
    # Finite differences against the backward kernels, with every feature on (the dropout mask fixed by
    # reseeding torch before each call, so every evaluation draws the same Philox key). fast_mode: random
    # projections of the Jacobian, a few kernel calls instead of one per input element (the interpreter
    # is slow); the exact gradient comparisons above check every element.
    g = torch.Generator().manual_seed(23)
    q, k, v = (torch.randn(1, heads, length, 4, generator=g, dtype=torch.float64, requires_grad=True)
               for heads, length in ((2, 3), (1, 5), (1, 5)))
    bias = torch.randn(3, 5, generator=g, dtype=torch.float64)

    def dense(a, b, c):
        torch.manual_seed(0)
        return fa.flash_attention(a, b, c, attn_mask=bias, window_size=(2, 1), dropout_p=0.3)

    assert torch.autograd.gradcheck(dense, (q, k, v), eps=1e-6, atol=1e-8, fast_mode=True)
    qp, kp, vp, _, cu_q, cu_k = _varlen_inputs([1, 3], [2, 4], q_heads=2, kv_heads=1, head_dim=4, seed=24)
    qp, kp, vp = (t.requires_grad_() for t in (qp, kp, vp))

    def packed(a, b, c):
        torch.manual_seed(1)
        return fa.flash_attention_varlen(a, b, c, cu_q, cu_k, 3, 4, causal=True, dropout_p=0.2)

    assert torch.autograd.gradcheck(packed, (qp, kp, vp), eps=1e-6, atol=1e-8, fast_mode=True)


def test_varlen_takes_strided_views_of_a_packed_qkv():
    # q, k, v as views of one (total, 3, H, D) tensor (a fused QKV projection's output): read through
    # their strides, the result equals that of contiguous copies exactly.
    qkv = torch.randn(25, 3, 2, 16, generator=torch.Generator().manual_seed(25), dtype=torch.float64)
    q, k, v = qkv.unbind(1)
    assert not q.is_contiguous()
    cu = torch.tensor([0, 7, 25], dtype=torch.int32)
    strided = fa.flash_attention_varlen(q, k, v, cu, cu, 18, 18, causal=True)
    copied = fa.flash_attention_varlen(q.contiguous(), k.contiguous(), v.contiguous(), cu, cu, 18, 18, causal=True)
    assert torch.equal(strided, copied)
