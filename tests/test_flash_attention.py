"""The Triton flash-attention kernels on the CPU, under the Triton interpreter.

Run in its own process (the Makefile does): TRITON_INTERPRET must be set before triton is imported.
    TRITON_INTERPRET=1 python -m pytest tests/test_flash_attention.py
The interpreter executes every tile in numpy, so shapes are tiny; the interpreted tile is 16x16, so
lengths 1, 17, 33, 130 cover one partial tile, a full tile plus a 1-row tail, and many tiles.
The tests call the kernels' own launchers (tests/flash_kernels.py), which have no route to torch;
which backend the drop-in scaled_dot_product_attention takes on CUDA is checked in
test_flash_attention_cuda.py.
"""
import os

os.environ["TRITON_INTERPRET"] = "1"  # before triton or genfast.kernels is imported

import math  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from genfast import reference  # noqa: E402
from genfast.kernels import flash_attention as flash_module  # noqa: E402
from tests import flash_kernels  # noqa: E402
from tests.flash_kernels import flash_attention  # noqa: E402

pytestmark = pytest.mark.skipif(
    not flash_module._INTERPRETED,
    reason="genfast.kernels.flash_attention was imported before TRITON_INTERPRET=1 was set; "
           "run this file in its own process: TRITON_INTERPRET=1 python -m pytest tests/test_flash_attention.py")


def _inputs(batch, q_heads, kv_heads, len_q, len_k, head_dim, dtype=torch.float32, seed=0):
    generator = torch.Generator().manual_seed(seed)
    make = lambda *shape: torch.randn(*shape, generator=generator, dtype=torch.float64).to(dtype)
    q = make(batch, q_heads, len_q, head_dim)
    k = make(batch, kv_heads, len_k, head_dim)
    v = make(batch, kv_heads, len_k, head_dim)
    grad_out = make(batch, q_heads, len_q, head_dim)
    return q, k, v, grad_out


def _output_and_grads(fn, q, k, v, grad_out):
    q, k, v = (t.detach().clone().requires_grad_() for t in (q, k, v))
    out = fn(q, k, v)
    out.backward(grad_out.to(out.dtype))
    return out.detach(), q.grad, k.grad, v.grad


def _reference(q, k, v, grad_out, causal, scale=None):
    """float64 oracle on the same (already rounded) inputs."""
    return _output_and_grads(
        lambda a, b, c: reference.attention(a, b, c, is_causal=causal, scale=scale, enable_gqa=True),
        q.double(), k.double(), v.double(), grad_out.double())


# (batch, q heads, kv heads, Lq, Lk, head dim, causal)
FP32_CASES = [
    (1, 1, 1, 1, 1, 16, False),       # single query, single key
    (1, 1, 1, 1, 1, 16, True),
    (1, 2, 2, 17, 17, 24, True),      # D=24 padded to 32; Lq=Lk with a 1-row tail
    (1, 2, 1, 33, 17, 64, False),     # GQA (2 q heads per kv head), Lq > Lk
    (1, 2, 1, 17, 33, 16, True),      # GQA, causal with Lq < Lk (top-left: keys beyond i unseen)
    (1, 3, 3, 130, 17, 24, True),     # causal with Lq > Lk: rows >= Lk see every key
    (2, 1, 1, 130, 130, 80, True),    # D=80 padded to 128, many tiles, batch 2
    (1, 1, 1, 33, 130, 128, False),
    (1, 4, 1, 33, 130, 16, True),     # MQA
    (1, 2, 1, 17, 33, 96, False),
    (1, 1, 1, 17, 20, 112, True),
    (1, 1, 1, 17, 9, 256, False),     # largest head dim
    (1, 1, 1, 17, 9, 8, True),        # head dim below the 16-wide dot tile, padded
]


@pytest.mark.parametrize("batch,q_heads,kv_heads,len_q,len_k,head_dim,causal", FP32_CASES)
def test_fp32_matches_float64_reference(batch, q_heads, kv_heads, len_q, len_k, head_dim, causal):
    q, k, v, grad_out = _inputs(batch, q_heads, kv_heads, len_q, len_k, head_dim)
    ours = _output_and_grads(lambda a, b, c: flash_attention(a, b, c, causal=causal), q, k, v, grad_out)
    expected = _reference(q, k, v, grad_out, causal)
    for name, got, want in zip(("out", "dq", "dk", "dv"), ours, expected):
        assert got.dtype == torch.float32 and got.shape == want.shape, name
        # fp32 with IEEE products: each result is a sum of <= 130 (x 4 heads for dK/dV) products
        # accumulated in tiles of 16; rounding grows like ~sqrt(terms) * 6e-8 relative to the scale of
        # the result (a few 1e-7 measured). 1e-5 of the scale is >10x that, and far below any real bug
        # (a dropped tile or a wrong mask changes results at the 1e-1 level).
        tolerance = 1e-5 * max(1.0, want.abs().max().item())
        error = (got.double() - want).abs().max().item()
        assert error <= tolerance, f"{name}: max error {error:.3g} > {tolerance:.3g}"


def test_custom_scale_and_non_contiguous_inputs():
    # (B, L, H, D) tensors viewed as (B, H, L, D): the kernels take strides, nothing is copied.
    q, k, v, grad_out = _inputs(1, 2, 2, 33, 17, 64)
    q, k, v = (t.transpose(1, 2).contiguous().transpose(1, 2) for t in (q, k, v))
    assert not q.is_contiguous()
    scale = 0.3
    ours = _output_and_grads(lambda a, b, c: flash_attention(a, b, c, causal=True, scale=scale), q, k, v, grad_out)
    expected = _reference(q, k, v, grad_out, causal=True, scale=scale)
    for got, want in zip(ours, expected):
        torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=1e-5)  # same argument as above


@pytest.mark.parametrize("len_q,len_k", [(33, 17), (17, 33)])
def test_causal_alignment_is_torch_top_left(len_q, len_k):
    # Against torch's own SDPA (float64 math path) to pin the convention, not just our reference.
    q, k, v, _ = _inputs(1, 4, 2, len_q, len_k, 16, dtype=torch.float64)
    ours = flash_attention(q, k, v, causal=True)
    torch_out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    torch.testing.assert_close(ours, torch_out, atol=1e-12, rtol=1e-12)  # fp64 accumulation throughout


# Unit roundoff of the storage dtype.
_UNIT_ROUNDOFF = {torch.float16: 2.0 ** -11, torch.bfloat16: 2.0 ** -8}


@pytest.mark.parametrize("dtype,causal", [(torch.float16, True), (torch.bfloat16, False), (torch.bfloat16, True)])
def test_low_precision_matches_float64_reference(dtype, causal):
    q, k, v, grad_out = _inputs(1, 2, 1, 33, 40, 64, dtype=dtype)
    ours = _output_and_grads(lambda a, b, c: flash_attention(a, b, c, causal=causal), q, k, v, grad_out)
    expected = _reference(q, k, v, grad_out, causal)
    for name, got, want in zip(("out", "dq", "dk", "dv"), ours, expected):
        assert got.dtype == dtype, name
        # Accumulation is fp32; the error comes from three roundings to the storage dtype on each path
        # (P or dS before it enters a dot, and the stored result), each <= u relative to terms whose
        # magnitudes can sum to ~2x the result's max under cancellation (dP - delta): ~6u, so 8u.
        # Measured: up to ~2.8u for bf16, ~1.2u for fp16; torch's CPU SDPA in the same dtype: ~1.7u.
        tolerance = 8 * _UNIT_ROUNDOFF[dtype] * want.abs().max().item()
        error = (got.double() - want).abs().max().item()
        assert error <= tolerance, f"{dtype} {name}: max error {error:.3g} > {tolerance:.3g}"


def test_empty_keys_give_zeros_like_torch():
    # Lk == 0: every row sees no key. torch returns zeros (an empty sum), and zero gradients.
    q, k, v, grad_out = _inputs(1, 2, 1, 5, 0, 16)
    ours = _output_and_grads(lambda a, b, c: flash_attention(a, b, c), q, k, v, grad_out)
    torch_result = _output_and_grads(lambda a, b, c: F.scaled_dot_product_attention(a, b, c, enable_gqa=True),
                                     q, k, v, grad_out)
    for got, want in zip(ours, torch_result):
        assert got.shape == want.shape
        assert torch.equal(got, want)
    assert torch.equal(ours[0], torch.zeros_like(ours[0]))


def test_empty_queries():
    q, k, v, grad_out = _inputs(1, 2, 2, 0, 7, 16)
    out, dq, dk, dv = _output_and_grads(lambda a, b, c: flash_attention(a, b, c, causal=True), q, k, v, grad_out)
    assert out.shape == (1, 2, 0, 16) and dq.shape == q.shape
    assert torch.equal(dk, torch.zeros_like(k)) and torch.equal(dv, torch.zeros_like(v))


def test_backward_is_deterministic():
    q, k, v, grad_out = _inputs(1, 4, 1, 33, 33, 16)  # GQA: dK/dV sum over 4 query heads
    first = _output_and_grads(lambda a, b, c: flash_attention(a, b, c, causal=True), q, k, v, grad_out)
    second = _output_and_grads(lambda a, b, c: flash_attention(a, b, c, causal=True), q, k, v, grad_out)
    for a, b in zip(first, second):
        assert torch.equal(a, b)


@pytest.mark.parametrize("causal", [False, True])
def test_gradcheck_float64(causal):
    # float64 inputs accumulate in float64, so finite differences are meaningful. fast_mode checks a
    # random projection of the Jacobian (the interpreter is too slow for the full one).
    q, k, v, _ = _inputs(1, 2, 1, 5, 7, 16, dtype=torch.float64)
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    assert torch.autograd.gradcheck(lambda a, b, c: flash_attention(a, b, c, causal=causal), (q, k, v),
                                    fast_mode=True)


# opcheck and torch.compile of genfast::attention_forward / _backward with these kernels need a GPU
# (test_flash_attention_cuda.py): on CPU tensors the op runs its C++ kernel (test_attention.py).


def test_lse_is_the_row_logsumexp():
    q, k, v, _ = _inputs(1, 1, 1, 17, 20, 24, dtype=torch.float64)
    scale = 1 / math.sqrt(24)
    _, lse = flash_kernels.forward(q, k, v, True, scale)
    scores = reference.attention_scores(q, k, is_causal=True, scale=scale)
    torch.testing.assert_close(lse, torch.logsumexp(scores, dim=-1), atol=1e-12, rtol=1e-12)


# ---- argument checks --------------------------------------------------------------------------------

def _bad_call(**overrides):
    q, k, v, _ = _inputs(1, 4, 2, 5, 6, 16)
    args = {"q": q, "k": k, "v": v, **overrides}
    return flash_attention(args["q"], args["k"], args["v"])


@pytest.mark.parametrize("overrides,error,message", [
    (lambda q, k, v: {"q": q[0]}, ValueError, "q must have 4 dimensions"),
    (lambda q, k, v: {"k": k[0]}, ValueError, "k must have 4 dimensions"),
    (lambda q, k, v: {"v": v.unsqueeze(0)}, ValueError, "v must have 4 dimensions"),
    (lambda q, k, v: {"k": k[:, :1].expand(1, 3, 6, 16).contiguous(),
                      "v": v[:, :1].expand(1, 3, 6, 16).contiguous()}, ValueError, "multiple of the number"),
    (lambda q, k, v: {"k": k[..., :8], "v": v[..., :8]}, ValueError, "head dim of k and v"),
    (lambda q, k, v: {"v": v[..., :8]}, ValueError, "k and v must have the same shape"),
    (lambda q, k, v: {"k": k.repeat(2, 1, 1, 1), "v": v.repeat(2, 1, 1, 1)}, ValueError, "batch size of k"),
    (lambda q, k, v: {"k": k.half()}, ValueError, "k.dtype"),
    (lambda q, k, v: {"q": q.int(), "k": k.int(), "v": v.int()}, ValueError, "q.dtype must be one of"),
    (lambda q, k, v: {"q": torch.zeros(1, 1, 2, 257), "k": torch.zeros(1, 1, 2, 257),
                      "v": torch.zeros(1, 1, 2, 257)}, ValueError, "head dim"),
    (lambda q, k, v: {"q": torch.zeros(1, 1, 2, 0), "k": torch.zeros(1, 1, 2, 0),
                      "v": torch.zeros(1, 1, 2, 0)}, ValueError, "head dim"),
    (lambda q, k, v: {"v": v.to("meta")}, RuntimeError, "v is on meta"),
])
def test_bad_arguments_raise_naming_the_argument(overrides, error, message):
    q, k, v, _ = _inputs(1, 4, 2, 5, 6, 16)
    with pytest.raises(error, match=message):
        _bad_call(**overrides(q, k, v))
