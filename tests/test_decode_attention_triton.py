"""The Triton flash-decoding kernels (genfast.kernels.decode_attention) on the CPU, under the Triton
interpreter, against genfast.reference.attention (float64) and the C++ op on the same inputs.

Run in its own process (the Makefile does): TRITON_INTERPRET must be set before triton is imported.
    TRITON_INTERPRET=1 python -m pytest tests/test_decode_attention_triton.py
The interpreted key tile is 16 rows, so lengths 1, 17 and 130 cover one partial tile, a full tile plus
a tail, and many tiles; ``num_splits`` forces chunking (and the reduce kernel) on short inputs.
The compiled kernels on a GPU, through the registered op: tests/test_generation_cuda.py.
"""
import os

os.environ["TRITON_INTERPRET"] = "1"  # before triton or genfast.kernels is imported

import math  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

import genfast.generation.ops  # noqa: E402,F401  (loads the C++ ops and the CUDA registrations)
from genfast import reference  # noqa: E402
from genfast.kernels import decode_attention as decode_module  # noqa: E402
from genfast.kernels.decode_attention import decode_attention, num_splits_for  # noqa: E402

pytestmark = pytest.mark.skipif(
    not decode_module._INTERPRETED,
    reason="genfast.kernels.decode_attention was imported before TRITON_INTERPRET=1 was set; run this file "
           "in its own process: TRITON_INTERPRET=1 python -m pytest tests/test_decode_attention_triton.py")

# Tolerances, relative to outputs of size ~1 (averages of standard-normal V rows):
# float32: a D-term dot product and a softmax-weighted sum of `length` rows, each rounding ~6e-8 per
#   term, growing like sqrt(terms): a few 1e-7 measured. 1e-5 is >10x that and far below a real bug
#   (a dropped tile, a wrong split weight or mask moves outputs by 1e-2 or more).
# float64: the same in float64, 1e-12.
# float16 / bfloat16: inputs are rounded to the dtype before the reference sees them, so the error is
#   the float32 accumulation plus the output's final rounding: half an ulp, 2^-11 (fp16) and 2^-8 (bf16)
#   relative; 2e-3 and 2e-2 allow outputs up to ~4 in size.
TOL = {torch.float32: 1e-5, torch.float64: 1e-12, torch.float16: 2e-3, torch.bfloat16: 2e-2}


def make_inputs(batch, heads_q, heads_kv, max_len, dim, dim_v, dtype, seed=0):
    generator = torch.Generator().manual_seed(seed)
    make = lambda *shape: torch.randn(*shape, generator=generator, dtype=torch.float64).to(dtype)
    return make(batch, heads_q, dim), make(batch, heads_kv, max_len, dim), make(batch, heads_kv, max_len, dim_v)


def expected_output(q, k_cache, v_cache, length, scale):
    wide = torch.float64
    return reference.attention(q.to(wide)[:, :, None], k_cache.to(wide)[:, :, :length],
                               v_cache.to(wide)[:, :, :length], scale=scale, enable_gqa=True)[:, :, 0]


# (batch, q heads, kv heads, length, max_len, D, Dv, num_splits)
CASES = [
    (1, 1, 1, 1, 1, 8, 8, None),        # one key
    (2, 4, 4, 17, 20, 64, 64, None),    # a tile and a 1-key tail, cache longer than length
    (1, 4, 2, 17, 17, 80, 80, 2),       # GQA, D=80 padded to 128, two splits (16 + 1 keys)
    (1, 2, 1, 130, 140, 8, 8, 9),       # MQA, many splits of one tile each, the last partial
    (2, 2, 2, 40, 48, 64, 24, 3),       # Dv != D
]


@pytest.mark.parametrize("batch,heads_q,heads_kv,length,max_len,dim,dim_v,num_splits", CASES)
def test_fp32_matches_float64_reference(batch, heads_q, heads_kv, length, max_len, dim, dim_v, num_splits):
    q, k_cache, v_cache = make_inputs(batch, heads_q, heads_kv, max_len, dim, dim_v, torch.float32, seed=length)
    scale = 1 / math.sqrt(dim)
    got = decode_attention(q, k_cache, v_cache, length, scale, num_splits=num_splits)
    assert got.dtype == torch.float32 and got.shape == (batch, heads_q, dim_v)
    torch.testing.assert_close(got.double(), expected_output(q, k_cache, v_cache, length, scale),
                               atol=TOL[torch.float32], rtol=TOL[torch.float32])
    # And the C++ op, the same op on the CPU (its own rounding: 2x the fp32 tolerance).
    torch.testing.assert_close(got, torch.ops.genfast.decode_attention(q, k_cache, v_cache, length, scale),
                               atol=2 * TOL[torch.float32], rtol=2 * TOL[torch.float32])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_other_dtypes(dtype):
    q, k_cache, v_cache = make_inputs(1, 4, 2, 40, 64, 64, dtype, seed=3)
    for num_splits in (1, 3):
        got = decode_attention(q, k_cache, v_cache, 37, 0.125, num_splits=num_splits)
        assert got.dtype == dtype
        torch.testing.assert_close(got.double(), expected_output(q, k_cache, v_cache, 37, 0.125),
                                   atol=TOL[dtype], rtol=TOL[dtype])


def test_heuristic_splits_a_long_context():
    # Few (batch, head) rows and a long cache: the heuristic must split, and the result must not change.
    device = torch.device("cpu")
    assert num_splits_for(rows=2, length=100, device=device) == 1          # short: one chunk
    assert num_splits_for(rows=64, length=4096, device=device) == 1        # grid already full
    splits = num_splits_for(rows=2, length=1024, device=device)
    assert splits > 1
    q, k_cache, v_cache = make_inputs(1, 2, 2, 1024, 8, 8, torch.float32, seed=4)
    got = decode_attention(q, k_cache, v_cache, 1024, 0.5)
    torch.testing.assert_close(got.double(), expected_output(q, k_cache, v_cache, 1024, 0.5),
                               atol=TOL[torch.float32], rtol=TOL[torch.float32])


@pytest.mark.parametrize("length,num_splits", [(1, None), (17, None), (17, 5), (33, 3), (48, 3)])
def test_length_read_from_memory_matches_int_length(length, num_splits):
    # The CUDA-graph path: the length is a tensor, splits are sized for max_len=48 (three 16-key chunks
    # with num_splits=3), and chunks past the length (all but chunk 0 at length 1 or 17) must weigh 0.
    q, k_cache, v_cache = make_inputs(1, 4, 2, 48, 24, 24, torch.float32, seed=length)
    for dtype in (torch.int64, torch.int32):
        got = decode_attention(q, k_cache, v_cache, torch.tensor([length], dtype=dtype), 0.2, num_splits=num_splits)
        torch.testing.assert_close(got.double(), expected_output(q, k_cache, v_cache, length, 0.2),
                                   atol=TOL[torch.float32], rtol=TOL[torch.float32])


def test_length_in_memory_is_clamped_to_the_cache():
    # No host check sees a length tensor's value: out-of-range values must read inside the cache.
    q, k_cache, v_cache = make_inputs(1, 2, 2, 20, 8, 8, torch.float32, seed=7)
    for value, clamped in [(0, 1), (-5, 1), (21, 20), (10**6, 20)]:
        got = decode_attention(q, k_cache, v_cache, torch.tensor(value), 0.5, num_splits=2)
        torch.testing.assert_close(got.double(), expected_output(q, k_cache, v_cache, clamped, 0.5),
                                   atol=TOL[torch.float32], rtol=TOL[torch.float32])
    with pytest.raises(RuntimeError, match="length tensor must hold one int32/int64"):
        decode_attention(q, k_cache, v_cache, torch.tensor([3.0]), 0.5)
    with pytest.raises(RuntimeError, match="length tensor must hold one int32/int64"):
        decode_attention(q, k_cache, v_cache, torch.tensor([3, 4]), 0.5)


def test_strided_views_are_read_in_place():
    # A layer's slice of a (n_layer, B, H, max_len, D) buffer, and q = x[:, :, 0] of a (B, H, T, D)
    # projection, as genfast.generation.gpt2 passes them.
    buffer = torch.randn(3, 2, 4, 16, 8, generator=torch.Generator().manual_seed(5))
    q = torch.randn(2, 4, 3, 8, generator=torch.Generator().manual_seed(6))[:, :, 0]
    got = decode_attention(q, buffer[1], buffer[2], 9, 0.3, num_splits=2)
    torch.testing.assert_close(got.double(), expected_output(q, buffer[1], buffer[2], 9, 0.3),
                               atol=TOL[torch.float32], rtol=TOL[torch.float32])


def test_bad_inputs_raise_clear_errors():
    q, k_cache, v_cache = make_inputs(1, 3, 2, 8, 8, 8, torch.float32)
    with pytest.raises(RuntimeError, match="multiple of the heads"):
        decode_attention(q, k_cache, v_cache, 4, 1.0)
    q, k_cache, v_cache = make_inputs(1, 2, 1, 8, 8, 8, torch.float32)
    with pytest.raises(RuntimeError, match="length must be in"):
        decode_attention(q, k_cache, v_cache, 0, 1.0)
    with pytest.raises(RuntimeError, match="length must be in"):
        decode_attention(q, k_cache, v_cache, 9, 1.0)
    with pytest.raises(RuntimeError, match="share a dtype"):
        decode_attention(q, k_cache.double(), v_cache, 4, 1.0)
    big = torch.zeros(1, 1, 300)
    with pytest.raises(RuntimeError, match="head dims up to 256"):
        decode_attention(big, torch.zeros(1, 1, 4, 300), torch.zeros(1, 1, 4, 300), 2, 1.0)


def test_op_has_a_cuda_kernel_registered():
    assert torch._C._dispatch_has_kernel_for_dispatch_key("genfast::decode_attention", "CUDA")


@pytest.mark.parametrize("length_in_memory", [False, True])
def test_the_direct_launch_equals_the_op(length_in_memory):
    # genfast.generation.decode.decode_attention skips the dispatcher for eager CUDA calls by calling
    # launch_cuda, the function registered as the op's CUDA kernel. Here that function runs on CPU tensors
    # (interpreted) and must give what the op gives there (the C++ kernel), for an int length and for the
    # CUDA-graph path's length tensor. The compiled pair on a GPU: tests/test_generation_cuda.py.
    from genfast.generation.ops.decode_attention import launch_cuda

    q, k_cache, v_cache = make_inputs(2, 4, 2, 600, 32, 32, torch.float32, seed=5)
    for length in (1, 257, 600):
        got = launch_cuda(q, k_cache, v_cache, torch.tensor([length]) if length_in_memory else length, 0.2)
        torch.testing.assert_close(got, torch.ops.genfast.decode_attention(q, k_cache, v_cache, length, 0.2),
                                   atol=2 * TOL[torch.float32], rtol=2 * TOL[torch.float32])
