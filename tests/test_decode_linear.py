"""torch.ops.genfast.decode_linear (F.linear for a few rows, the weight streamed once) and the
dispatching genfast.generation.decode.linear, against torch.nn.functional.linear.

Tolerance: each output is a length-K dot product summed in a different order from torch's
BLAS. Both are compared with an fp64 reference; genfast's error may be at most twice torch's
own fp32 error plus K ulp-sized terms (|x|,|w| ~ 1: about K * 2^-24 * sqrt(K) at worst).
fp64 inputs are compared at 1e-12.
"""
from __future__ import annotations

import sys

import pytest
import torch
import torch.nn.functional as F

from genfast.generation.decode import linear
from genfast.generation.ops.decode_linear import decode_linear, dot_path_rows


def _inputs(rows, in_features, out_features, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, in_features, generator=g, dtype=torch.float64).to(dtype)
    w = torch.randn(out_features, in_features, generator=g, dtype=torch.float64).to(dtype)
    b = torch.randn(out_features, generator=g, dtype=torch.float64).to(dtype)
    return x, w, b


def _check(got, x, w, b):
    expected = F.linear(x.double(), w.double(), None if b is None else b.double())
    assert got.dtype == x.dtype and got.shape == expected.shape
    if x.dtype == torch.float64:
        torch.testing.assert_close(got, expected, atol=1e-12, rtol=1e-12)
        return
    ours = (got.double() - expected).abs().max().item()
    theirs = (F.linear(x, w, b).double() - expected).abs().max().item()
    assert ours <= 2 * theirs + x.shape[1] * 2**-22, (ours, theirs)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("rows,in_features,out_features", [
    (1, 768, 2304), (1, 3072, 768), (3, 7, 5), (8, 100, 130), (1, 1, 1), (9, 33, 65), (20, 64, 17),
    # each row count's group of weight rows (8, 4, 2, 1 for 1, 2, 3-4, 5-8 rows) with tails in both dims
    (1, 37, 21), (2, 9, 13), (4, 23, 11), (5, 40, 7), (7, 17, 3),
])
@pytest.mark.parametrize("with_bias", [True, False])
def test_matches_linear(dtype, rows, in_features, out_features, with_bias):
    x, w, b = _inputs(rows, in_features, out_features, dtype, seed=rows + in_features)
    b = b if with_bias else None
    _check(decode_linear(x, w, b), x, w, b)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_every_row_count_of_both_paths(dtype):
    """Dot products, 8 rows at a time, up to dot_path_rows(weight) rows (csrc/cpu/gemm.h); beyond, the
    packed GEMM, whose micro-kernel covers 3, 6 or 12 rows (baseline, AVX2, AVX-512) and a switch the
    rest: rows up to past the limit plus 24 leave every remainder of each, 97 and 107 cross a 96-row
    tile. 70 columns end in a partial panel. A weight of another size (its own limit) too."""
    small = _inputs(1, 13, 70, dtype)[1]
    for rows in [*range(1, dot_path_rows(small) + 25), 97, 107]:
        x, w, b = _inputs(rows, 13, 70, dtype, seed=rows)
        _check(decode_linear(x, w, b), x, w, b)
    large = _inputs(1, 520, 520, dtype)[1]
    limit = dot_path_rows(large)
    for rows in (1, limit - 1, limit, limit + 1):
        x, w, b = _inputs(rows, 520, 520, dtype, seed=rows)
        _check(decode_linear(x, w, b), x, w, b)


def test_strided_input_and_weight():
    x, w, b = _inputs(4, 48, 40, torch.float32)
    x_strided = torch.randn(4, 96)[:, ::2].copy_(x)      # rows 96 apart, elements 2 apart
    w_t = w.t().contiguous().t()                           # a transposed view: (out, in) with strides (1, out)
    _check(decode_linear(x_strided, w_t, b), x, w, b)


def test_empty_inputs():
    assert decode_linear(torch.randn(0, 5), torch.randn(3, 5)).shape == (0, 3)
    out = decode_linear(torch.randn(2, 0), torch.randn(3, 0), torch.ones(3))
    torch.testing.assert_close(out, torch.ones(2, 3))


def test_opcheck():
    x, w, b = _inputs(2, 16, 24, torch.float32)
    torch.library.opcheck(torch.ops.genfast.decode_linear.default, (x, w, b))
    torch.library.opcheck(torch.ops.genfast.decode_linear.default, (x, w, None))


def test_bad_inputs():
    x, w, b = _inputs(2, 16, 24, torch.float32)
    with pytest.raises(RuntimeError, match="x must be 2-D"):
        decode_linear(x[0], w, b)
    with pytest.raises(RuntimeError, match=r"weight must be \(out_features, 16\)"):
        decode_linear(x, w.t().contiguous(), b)
    with pytest.raises(RuntimeError, match="does not match x dtype"):
        decode_linear(x, w.double(), b)
    with pytest.raises(RuntimeError, match="bias must be"):
        decode_linear(x, w, b[:5])
    with pytest.raises(RuntimeError, match="float32 or float64"):
        decode_linear(x.half(), w.half(), b.half())


def test_linear_dispatch_keeps_autograd_and_batch_dims():
    # Few rows without grad -> the op; with grad -> F.linear (the op has no autograd): same numbers.
    rows = 2 * (dot_path_rows(torch.empty(48, 32)) // 2)
    x, w, b = _inputs(rows, 32, 48, torch.float32)
    x3 = x.view(2, rows // 2, 32)
    _check(linear(x3, w, b).view(rows, 48), x, w, b)
    w_param = w.clone().requires_grad_()
    out = linear(x3, w_param, b)
    out.sum().backward()
    torch.testing.assert_close(w_param.grad, x.sum(0, keepdim=True).expand(48, 32).contiguous())


def test_dot_path_rows_is_the_ops_answer_for_the_weight_bytes():
    small, large = dot_path_rows(torch.empty(48, 192)), dot_path_rows(torch.empty(2048, 192))
    assert small >= 1 and large >= 1
    assert small == torch.ops.genfast.decode_linear_max_rows(48 * 192 * 4)
    assert large == torch.ops.genfast.decode_linear_max_rows(2048 * 192 * 4)
    assert dot_path_rows(torch.empty(192, 48)) == small  # same bytes, other shape
    assert dot_path_rows(torch.empty(48, 96, dtype=torch.float64)) == small
    with pytest.raises(RuntimeError, match="weight_bytes must be >= 0"):
        torch.ops.genfast.decode_linear_max_rows(-1)


@pytest.mark.parametrize("out_features", [48, 2048])  # 36 KB and 1.5 MB weights
def test_linear_takes_the_op_exactly_where_it_reads_the_weight_in_place(monkeypatch, out_features):
    limit = dot_path_rows(torch.empty(out_features, 192))
    module = sys.modules["genfast.generation.decode"]
    calls = []
    monkeypatch.setattr(module, "decode_linear", lambda *a: calls.append(1) or decode_linear(*a))
    for rows in (1, limit, limit + 1):
        x, w, b = _inputs(rows, 192, out_features, torch.float32)
        _check(linear(x, w, b), x, w, b)
    assert len(calls) == 2  # 1 and `limit` rows through the op, limit + 1 through F.linear
