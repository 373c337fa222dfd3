"""genfast attention (csrc/cpu/attention.cpp, genfast/nn/functional.py, genfast/nn/attention.py)
against torch's scaled_dot_product_attention and nn.MultiheadAttention on the same inputs."""
from __future__ import annotations

import math
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from genfast import reference
from genfast.nn import functional as gf
from genfast.nn.attention import MultiheadAttention, replace_attention
from genfast.ops import attention as ops
from tests import sdpa_dispatch
from tests.sdpa_dispatch import CPU_KERNEL, CPU_UNFUSED, HANDED_OFF

# Tolerances. float64: both sides are exact up to summation order, ~1e-15 relative.
# float32: the kernel sums in a different order (tiles of 128/256 keys, online rescaling)
# and uses a polynomial exp (~2 ulp); errors grow like sqrt(L) * eps * |values| for
# L <= 300 keys, so 2e-5 absolute / 1e-4 relative leaves a margin of ~10x over what
# we observe, while a wrong mask, scale or index gives errors of order 1e-1.
TOL = {torch.float32: dict(atol=2e-5, rtol=1e-4), torch.float64: dict(atol=1e-10, rtol=1e-9)}


def expect_dispatch(call, backend=CPU_KERNEL, reason=None):
    """call() through genfast's SDPA must have run ``backend``: the fused CPU kernel unless said."""
    return sdpa_dispatch.expect_dispatch(call, backend, reason)


def _randn(*shape, dtype=torch.float32, grad=True):
    return torch.randn(*shape, dtype=dtype).requires_grad_(grad)


def _compare(q, k, v, dtype, **kwargs):
    """Outputs and q/k/v gradients of genfast's and torch's SDPA on the same inputs."""
    q1, k1, v1 = (x.detach().clone().requires_grad_() for x in (q, k, v))
    ours = expect_dispatch(lambda: gf.scaled_dot_product_attention(q, k, v, **kwargs))
    theirs = F.scaled_dot_product_attention(q1, k1, v1, **kwargs)
    torch.testing.assert_close(ours, theirs, **TOL[dtype])
    grad_out = torch.randn_like(theirs)
    ours_grads = torch.autograd.grad(ours, (q, k, v), grad_out)
    theirs_grads = torch.autograd.grad(theirs, (q1, k1, v1), grad_out)
    for name, a, b in zip("qkv", ours_grads, theirs_grads):
        torch.testing.assert_close(a, b, **TOL[dtype], msg=lambda m, name=name: f"grad {name}: {m}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("head_dim", [8, 24, 64, 80, 128])
@pytest.mark.parametrize("causal", [False, True])
def test_matches_torch_shapes(dtype, head_dim, causal):
    torch.manual_seed(head_dim)
    # odd lengths, Lq != Lk both ways, Lk > one key tile (128 fwd, 256 bwd) so the online rescaling runs
    for len_q, len_k in [(37, 37), (70, 300), (300, 45)]:
        q = _randn(2, 3, len_q, head_dim, dtype=dtype)
        k = _randn(2, 3, len_k, head_dim, dtype=dtype)
        v = _randn(2, 3, len_k, head_dim, dtype=dtype)
        _compare(q, k, v, dtype, is_causal=causal)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("kind", ["bool", "float"])
@pytest.mark.parametrize("mask_shape", [(33, 270), (1, 3, 1, 270), (2, 1, 33, 270), (2, 3, 33, 270)])
def test_masks_broadcast(dtype, kind, mask_shape):
    torch.manual_seed(1)
    q, k, v = _randn(2, 3, 33, 16, dtype=dtype), _randn(2, 3, 270, 16, dtype=dtype), _randn(2, 3, 270, 16, dtype=dtype)
    keep = torch.rand(mask_shape) > 0.4
    if mask_shape[-2] != 1:
        keep[..., 5, :] = False  # a row with every key masked: torch gives 0 (and zero gradients)
    mask = keep if kind == "bool" else torch.where(keep, torch.randn(mask_shape), float("-inf")).to(dtype)
    _compare(q, k, v, dtype, attn_mask=mask)
    _compare(q, k, v, dtype, attn_mask=mask, is_causal=True)  # torch's CPU applies both


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("len_q", [1, 3, 40])
def test_few_and_many_query_rows(dtype, len_q):
    """Both sides of the kernel's choice between scoring a few query rows (a decode-shaped call) against
    K's rows in place and packing K^T (csrc/cpu/attention.cpp; the cut-off is a tuned constant, so the
    lengths sit far on either side of it): keys within one tile and past it, causal, a boolean mask,
    GQA, and a value dim that is not a whole number of vectors."""
    torch.manual_seed(5)
    for len_k in (1, 130, 300):
        q, k, v = _randn(2, 4, len_q, 24, dtype=dtype), _randn(2, 2, len_k, 24, dtype=dtype), _randn(2, 2, len_k, 40,
                                                                                                    dtype=dtype)
        _compare(q, k, v, dtype, enable_gqa=True)
        _compare(q, k, v, dtype, enable_gqa=True, is_causal=True)
        _compare(q, k, v, dtype, enable_gqa=True, attn_mask=torch.rand(len_q, len_k) > 0.3, scale=0.2)


def test_op_refuses_a_mask_gradient():
    """Called directly with a mask that requires grad, the op's backward says it has no mask gradient
    (scaled_dot_product_attention sends such calls to torch)."""
    q, k, v = _randn(1, 2, 5, 8), _randn(1, 2, 7, 8), _randn(1, 2, 7, 8)
    mask = torch.zeros(5, 7, requires_grad=True)
    out, _ = ops.attention_forward(q, k, v, mask, False, 0.3)
    with pytest.raises(RuntimeError, match="no gradient for attn_mask"):
        out.sum().backward()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_gqa_scale_and_value_dim(dtype):
    torch.manual_seed(2)
    q, k, v = _randn(2, 8, 41, 24, dtype=dtype), _randn(2, 2, 57, 24, dtype=dtype), _randn(2, 2, 57, 40, dtype=dtype)
    _compare(q, k, v, dtype, enable_gqa=True, scale=0.3)
    _compare(q, k, v, dtype, enable_gqa=True, is_causal=True)
    mask = torch.rand(41, 57) > 0.3
    _compare(q, k, v, dtype, enable_gqa=True, attn_mask=mask)


@pytest.mark.parametrize("shape_q,shape_kv", [
    ((19, 8), (23, 8)),                      # rank 2
    ((3, 19, 8), (3, 23, 8)),                # rank 3: (H, L, D)
    ((2, 3, 19, 8), (2, 3, 23, 8)),
    ((2, 2, 3, 19, 8), (2, 2, 3, 23, 8)),    # rank 5: two batch dims
    ((2, 1, 3, 19, 8), (1, 4, 3, 23, 8)),    # broadcast batch dims
])
def test_batch_dims(shape_q, shape_kv):
    torch.manual_seed(3)
    q, k, v = _randn(*shape_q), _randn(*shape_kv), _randn(*shape_kv)
    _compare(q, k, v, torch.float32)
    _compare(q, k, v, torch.float32, is_causal=True)


def test_fully_masked_rows_and_nan_mask():
    torch.manual_seed(4)
    q, k, v = _randn(1, 2, 6, 8), _randn(1, 2, 9, 8), _randn(1, 2, 9, 8)
    keep = torch.ones(6, 9, dtype=torch.bool)
    keep[2] = False
    out = expect_dispatch(lambda: gf.scaled_dot_product_attention(q, k, v, attn_mask=keep))
    assert torch.equal(out[:, :, 2], torch.zeros_like(out[:, :, 2]))
    _compare(q, k, v, torch.float32, attn_mask=keep)
    nan_mask = torch.zeros(6, 9)
    nan_mask[1, 3] = float("nan")
    ours = expect_dispatch(lambda: gf.scaled_dot_product_attention(q, k, v, attn_mask=nan_mask))
    theirs = F.scaled_dot_product_attention(q, k, v, attn_mask=nan_mask)
    assert ours[:, :, 1].isnan().all() and theirs[:, :, 1].isnan().all()
    torch.testing.assert_close(ours, theirs, equal_nan=True, **TOL[torch.float32])


def test_bfloat16_fp32_accumulation():
    torch.manual_seed(5)
    q, k, v = (torch.randn(2, 4, 50, 32, dtype=torch.bfloat16) for _ in range(3))
    ours = expect_dispatch(lambda: gf.scaled_dot_product_attention(q, k, v, is_causal=True))
    exact = reference.attention(q.double(), k.double(), v.double(), is_causal=True)
    assert ours.dtype == torch.bfloat16
    # inputs exact in bf16, fp32 inside: only the final rounding to bf16 (2^-8 relative) remains
    torch.testing.assert_close(ours.double(), exact, atol=1e-2, rtol=1e-2)


def test_gradcheck_fp64():
    torch.manual_seed(6)
    q, k, v = _randn(1, 4, 5, 3, dtype=torch.float64), _randn(1, 2, 7, 3, dtype=torch.float64), \
        _randn(1, 2, 7, 4, dtype=torch.float64)
    mask = torch.rand(4, 5, 7) > 0.3
    mask[:, :, 0] = True
    for kwargs in [dict(), dict(is_causal=True), dict(attn_mask=mask), dict(attn_mask=torch.randn(5, 7, dtype=torch.float64))]:
        sdpa = lambda a, b, c: gf.scaled_dot_product_attention(a, b, c, enable_gqa=True, **kwargs)  # noqa: E731
        expect_dispatch(lambda: sdpa(q, k, v))
        assert torch.autograd.gradcheck(sdpa, (q, k, v))


def test_opcheck():
    torch.manual_seed(7)
    q, k, v = _randn(2, 4, 9, 8), _randn(2, 2, 13, 8), _randn(2, 2, 13, 8)
    for mask, causal in [(None, False), (None, True), (torch.rand(9, 13) > 0.5, False), (torch.randn(1, 4, 9, 13), True)]:
        torch.library.opcheck(torch.ops.genfast.attention_forward.default, (q, k, v, mask, causal, 0.35))
        with torch.no_grad():
            out, lse = ops.attention_forward(q, k, v, mask, causal, 0.35)
        args = (torch.randn_like(out), q.detach(), k.detach(), v.detach(), out, lse, mask, causal, 0.35)
        torch.library.opcheck(torch.ops.genfast.attention_backward.default, args)


def test_torch_compile_fullgraph():
    torch.manual_seed(8)

    def block(x, w):
        q, k, v = (x @ w).chunk(3, dim=-1)
        shape = (x.shape[0], x.shape[1], 4, -1)
        q, k, v = (t.reshape(shape).transpose(1, 2) for t in (q, k, v))
        return gf.scaled_dot_product_attention(q, k, v, is_causal=True).sum()

    x, w = torch.randn(2, 17, 32), torch.randn(32, 96, requires_grad=True)
    compiled = torch.compile(block, fullgraph=True, backend="aot_eager")
    grad_compiled = torch.autograd.grad(compiled(x, w), w)[0]
    # (Nothing is recorded while torch.compile traces; the eager call shows the route.)
    grad_eager = torch.autograd.grad(expect_dispatch(lambda: block(x, w)), w)[0]
    torch.testing.assert_close(grad_compiled, grad_eager, **TOL[torch.float32])

    mha = MultiheadAttention(32, 4, batch_first=True)
    compiled_mha = torch.compile(mha, fullgraph=True, backend="aot_eager")
    eager = expect_dispatch(lambda: mha(x, x, x, need_weights=False))[0]
    torch.testing.assert_close(compiled_mha(x, x, x, need_weights=False)[0], eager, **TOL[torch.float32])


def test_dropout_in_distribution():
    # value = identity, so the output is the dropped-out probability matrix itself.
    torch.manual_seed(9)
    length, p = 64, 0.3
    q, k = torch.randn(1, 1, length, 16), torch.randn(1, 1, length, 16)
    v = torch.eye(length).reshape(1, 1, length, length)
    probs = torch.softmax(reference.attention_scores(q, k), dim=-1)
    dropped = expect_dispatch(lambda: gf.scaled_dot_product_attention(q, k, v, dropout_p=p), CPU_UNFUSED, "dropout_p")
    kept = dropped != 0
    torch.testing.assert_close(dropped[kept], (probs / (1 - p))[kept])
    # 4096 Bernoulli(0.7) draws: std of the kept fraction is 0.007; 5 sigma
    assert abs(kept.float().mean().item() - (1 - p)) < 0.036
    torch.manual_seed(10)
    first = gf.scaled_dot_product_attention(q, k, v, dropout_p=p)
    torch.manual_seed(10)
    assert torch.equal(first, gf.scaled_dot_product_attention(q, k, v, dropout_p=p))  # torch's generator


def test_bad_input():
    q, k, v = torch.randn(1, 4, 5, 8), torch.randn(1, 2, 6, 8), torch.randn(1, 2, 6, 8)
    with pytest.raises(RuntimeError, match="at least 2 dimensional"):
        gf.scaled_dot_product_attention(q[0, 0, 0], k[0, 0, 0], v[0, 0, 0])
    with pytest.raises(RuntimeError, match="enable_gqa"):
        gf.scaled_dot_product_attention(q, k, v)
    with pytest.raises(RuntimeError, match="divide"):
        gf.scaled_dot_product_attention(torch.randn(1, 3, 5, 8), k, v, enable_gqa=True)
    with pytest.raises(RuntimeError, match="embedding size"):
        gf.scaled_dot_product_attention(torch.randn(1, 2, 5, 4), k, v)
    with pytest.raises(RuntimeError, match="same sequence length"):
        gf.scaled_dot_product_attention(q, k, torch.randn(1, 2, 7, 8), enable_gqa=True)
    with pytest.raises(RuntimeError, match="attn_mask of shape"):
        gf.scaled_dot_product_attention(q, k, v, attn_mask=torch.ones(5, 5, dtype=torch.bool), enable_gqa=True)
    with pytest.raises(RuntimeError, match="attn_mask dtype"):
        gf.scaled_dot_product_attention(q, k, v, attn_mask=torch.ones(5, 6, dtype=torch.int64), enable_gqa=True)
    with pytest.raises(RuntimeError, match="same dtype"):
        gf.scaled_dot_product_attention(q, k.double(), v, enable_gqa=True)
    # and at the op boundary, naming the argument
    with pytest.raises(RuntimeError, match="q must be"):
        ops.attention_forward(q[0], k, v, None, False, 1.0)
    with pytest.raises(RuntimeError, match="attn_mask"):
        ops.attention_forward(q, k, v, torch.ones(3, 6, dtype=torch.bool), False, 1.0)


def test_peak_memory_is_linear_in_length():
    # In a fresh process: reset the RSS high-water mark, run the forward at N=8192, and
    # compare the peak growth with one N x N float32 matrix (256 MiB).
    script = textwrap.dedent("""
        import re, torch
        from genfast.ops.attention import attention_forward
        def status(field):
            return int(re.search(field + r":\\s+(\\d+) kB", open("/proc/self/status").read()).group(1)) * 1024
        q, k, v = (torch.randn(1, 1, 8192, 64) for _ in range(3))
        attention_forward(q[:, :, :256], k[:, :, :256], v[:, :, :256], None, False, 0.125)  # warm up
        before = status("VmRSS")
        open("/proc/self/clear_refs", "w").write("5")
        out, lse = attention_forward(q, k, v, None, False, 0.125)
        print(status("VmHWM") - before)
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    peak = int(result.stdout.strip().splitlines()[-1])
    # Output (2 MiB) + logsumexp + per-thread tiles: O(N). Allow 32 MiB, an eighth of N x N.
    assert peak < 32 * 2**20, f"forward grew RSS by {peak / 2**20:.1f} MiB"


# ---- MultiheadAttention -----------------------------------------------------------------

MHA_CONFIGS = [
    dict(),
    dict(batch_first=True),
    dict(bias=False),
    dict(add_bias_kv=True),
    dict(add_zero_attn=True),
    dict(kdim=12, vdim=20),
    dict(batch_first=True, add_bias_kv=True, add_zero_attn=True, kdim=12, vdim=20),
]


def _mha_pair(dtype=torch.float64, **config):
    torch.manual_seed(11)
    theirs = nn.MultiheadAttention(16, 4, dtype=dtype, **config)
    ours = MultiheadAttention(16, 4, dtype=dtype, **config)
    assert [n for n, _ in ours.named_parameters()] == [n for n, _ in theirs.named_parameters()]
    ours.load_state_dict(theirs.state_dict())
    return ours, theirs


@pytest.mark.filterwarnings("ignore:Support for mismatched key_padding_mask")
@pytest.mark.parametrize("config", MHA_CONFIGS)
@pytest.mark.parametrize("need_weights", [False, True])
def test_mha_matches_torch(config, need_weights):
    dtype = torch.float64  # fp64 so a mismatch anywhere is visible far above rounding
    ours, theirs = _mha_pair(dtype, **config)
    batch_first = config.get("batch_first", False)
    tgt, src, bsz = 7, 9, 3

    def inputs(length, dim):
        shape = (bsz, length, dim) if batch_first else (length, bsz, dim)
        return torch.randn(*shape, dtype=dtype)

    query, key, value = inputs(tgt, 16), inputs(src, config.get("kdim", 16)), inputs(src, config.get("vdim", 16))
    padding = torch.zeros(bsz, src, dtype=torch.bool)
    padding[1, -3:] = True
    masks = [dict(), dict(key_padding_mask=padding), dict(attn_mask=torch.rand(tgt, src) > 0.8),
             dict(attn_mask=torch.randn(bsz * 4, tgt, src, dtype=dtype), key_padding_mask=padding)]
    for kwargs in masks:
        if need_weights:  # the weights are an output: materialised (unfused), as torch does
            out, weights = ours(query, key, value, need_weights=need_weights, **kwargs)
        else:
            # A padding mask alone pads each row at the end: per-row key lengths (varlen), unless
            # add_bias_kv / add_zero_attn append a kept key after the padding.
            varlen = (list(kwargs) == ["key_padding_mask"] and not config.get("add_bias_kv")
                      and not config.get("add_zero_attn"))
            out, weights = expect_dispatch(lambda: ours(query, key, value, need_weights=need_weights, **kwargs),
                                           backend=sdpa_dispatch.CPU_VARLEN if varlen else CPU_KERNEL)
        ref_out, ref_weights = theirs(query, key, value, need_weights=need_weights, **kwargs)
        torch.testing.assert_close(out, ref_out, **TOL[dtype])
        if need_weights:
            torch.testing.assert_close(weights, ref_weights, **TOL[dtype])
        else:
            assert weights is None and ref_weights is None
        grads = torch.autograd.grad(out.sum(), list(ours.parameters()))
        ref_grads = torch.autograd.grad(ref_out.sum(), list(theirs.parameters()))
        for (name, _), a, b in zip(ours.named_parameters(), grads, ref_grads):
            torch.testing.assert_close(a, b, **TOL[dtype], msg=lambda m, name=name: f"{name}: {m}")


def test_mha_causal_unbatched_and_self_attention():
    ours, theirs = _mha_pair(torch.float32, batch_first=True)
    x = torch.randn(2, 11, 16)
    causal = nn.Transformer.generate_square_subsequent_mask(11)
    kwargs = dict(attn_mask=causal, is_causal=True, need_weights=False)
    torch.testing.assert_close(expect_dispatch(lambda: ours(x, x, x, **kwargs))[0], theirs(x, x, x, **kwargs)[0],
                               **TOL[torch.float32])
    kwargs = dict(attn_mask=causal)  # need_weights=True by default: unfused
    torch.testing.assert_close(ours(x, x, x, **kwargs)[0], theirs(x, x, x, **kwargs)[0], **TOL[torch.float32])
    torch.testing.assert_close(ours(x[0], x[0], x[0])[0], theirs(x[0], x[0], x[0])[0], **TOL[torch.float32])
    with pytest.raises(RuntimeError, match="Need attn_mask"):
        ours(x, x, x, is_causal=True)


def test_replace_attention_keeps_weights():
    torch.manual_seed(12)
    layer = nn.TransformerEncoderLayer(16, 4, dim_feedforward=32, dropout=0.0, batch_first=True)
    model = nn.Sequential(layer, nn.Linear(16, 3)).train()
    x = torch.randn(2, 9, 16)
    expected = model(x)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    replace_attention(model)
    assert isinstance(model[0].self_attn, MultiheadAttention)
    assert model[0].self_attn.in_proj_weight is layer.self_attn.in_proj_weight
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    torch.testing.assert_close(expect_dispatch(lambda: model(x)), expected, **TOL[torch.float32])
    single = nn.MultiheadAttention(16, 2)
    assert isinstance(replace_attention(single), MultiheadAttention)
    assert isinstance(MultiheadAttention.from_torch(single), nn.MultiheadAttention)


def test_missing_kernel_for_device_warns_once_and_records_reason():
    """No silent fallback: a device without a genfast kernel is said loudly (once), and recorded."""
    from genfast.nn import functional as gF

    q = torch.empty(1, 2, 3, 8, device="meta")
    with pytest.warns(UserWarning, match="no genfast kernel for device 'meta'"):
        out = expect_dispatch(lambda: gF.scaled_dot_product_attention(q, q, q), HANDED_OFF, "meta")
    assert out.shape == (1, 2, 3, 8)


def test_calls_genfast_does_not_take_go_to_torch_and_say_why():
    """A mask that requires grad (the kernel gives no mask gradient) and empty input are handed to torch's
    SDPA, recorded with the reason; the results are torch's."""
    torch.manual_seed(13)
    q, k, v = _randn(1, 2, 5, 8), _randn(1, 2, 7, 8), _randn(1, 2, 7, 8)
    mask = torch.randn(5, 7, requires_grad=True)
    ours = expect_dispatch(lambda: gf.scaled_dot_product_attention(q, k, v, attn_mask=mask), HANDED_OFF,
                           "attn_mask requires grad")
    torch.testing.assert_close(ours, F.scaled_dot_product_attention(q, k, v, attn_mask=mask), atol=0, rtol=0)
    with torch.no_grad():  # no gradient wanted: the mask is only an input, and the kernel takes it
        expect_dispatch(lambda: gf.scaled_dot_product_attention(q, k, v, attn_mask=mask))
    empty = torch.randn(1, 2, 0, 8)
    out = expect_dispatch(lambda: gf.scaled_dot_product_attention(empty, k, v, attn_mask=torch.zeros(0, 7)),
                          HANDED_OFF, "empty input")
    assert out.shape == (1, 2, 0, 8)
