"""FlashAttention-2 in Triton: forward and backward kernels and their launchers.

    from genfast.kernels import flash_attention as fa
    out, lse = fa.forward(q, k, v, causal=True, scale=0.125)          # (B, H, N, D), lse (B, H, N)
    dq, dk, dv = fa.backward(grad_out, q, k, v, out, lse, causal=True, scale=0.125)

These are the CUDA kernels of ``torch.ops.genfast.attention_forward`` / ``attention_backward``,
registered in genfast/ops/attention.py; the op's autograd (csrc/attention_autograd.cpp) is the
one that pairs them. Differentiable use goes through the op (genfast.ops.attention.attention_forward,
or genfast.nn.functional.scaled_dot_product_attention on CUDA tensors).

Training-code calls (issue 23), differentiable through their own autograd.Function:

    out = fa.flash_attention(q, k, v, causal=False, attn_mask=mask, dropout_p=0.1, window_size=(256, 0))
    out = fa.flash_attention_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_q, max_k, causal=True)

Algorithm (Dao, "FlashAttention-2", 2023):

* Forward: each program owns one block of query rows of one (batch, query head). It walks the key
  blocks, keeping a running row maximum ``m``, running denominator ``l`` and an unnormalised output
  accumulator (the online softmax), so the (Lq, Lk) score matrix never exists in memory. It saves
  the row logsumexp ``lse = m + log(l)`` (natural log, float32; float64 for float64 inputs).
* Backward: a preprocess kernel computes ``delta = rowsum(dO * O)``. One kernel owns a block of keys
  and walks the query blocks, recomputing ``P = exp(S - lse)`` to accumulate dK and dV in registers;
  a separate kernel owns a block of queries and walks the key blocks to accumulate dQ. Every output
  element is written by exactly one program, with no atomics, so the backward is deterministic
  (bitwise reproducible run to run).

Semantics (those of ``torch.nn.functional.scaled_dot_product_attention``):

* layout (B, H, L, D); any Lq, Lk (tails are masked, no multiple-of-block restriction); Lq != Lk.
* ``causal=True`` uses torch's TOP-LEFT alignment: query i sees keys 0..i, whatever Lq and Lk are.
  (The FlashAttention-2 library aligns bottom-right when Lq != Lk; the dense API does not, the
  packed one, flash_attention_varlen, does.) Rows that see no key (Lk == 0, a fully masked row, a
  window with no key in range) give zeros and zero gradients, as torch gives for fully masked rows.
* attn_mask (bool, True = attend, or additive) broadcastable to (B, Hq, Lq, Lk), read tile by tile
  through stride-0 views; no mask gradient.
* window_size (left, right): query i sees keys i + d - left .. i + d + right (d = 0 dense, Lk - Lq
  packed); causal is right = 0. Key tiles outside the window are not visited.
* dropout: Philox keyed by a seed drawn from torch's generator, counter = (key, query, batch*H + head);
  the backward regenerates the mask (dropout_keep_mask returns it, for tests).
* GQA / MQA: k and v may have Hk heads with Hq % Hk == 0; K/V head j serves the Hq/Hk consecutive
  query heads j*G .. j*G+G-1 (torch's ``enable_gqa=True``, i.e. ``repeat_interleave``). dK/dV sum over
  the group inside the dK/dV kernel, in a fixed order.
* head dim 1..256, any value: the tile is padded to the next power of two (at least 16) and the tail
  is masked.
* float16 / bfloat16 / float32 inputs, accumulated in float32 (float32 matmuls use IEEE precision,
  not TF32, so results match an fp32 reference); float64 is accepted too, accumulated in float64,
  so that the backward can be checked with fp64 gradcheck.

Double backward is not supported.

Under the Triton interpreter (TRITON_INTERPRET=1, read at import time) each kernel uses a single small
tile configuration so that CPU tests stay fast; on a GPU the tiles are autotuned (eight configurations
for Ampere/Hopper, pruned by shared memory; GENFAST_FLASH_AUTOTUNE=0 takes the first that fits).
"""
from __future__ import annotations

import math
import os
from typing import NamedTuple

import torch
import triton
import triton.language as tl
from torch import Tensor

__all__ = ["forward", "backward", "flash_attention", "flash_attention_varlen", "varlen_forward", "varlen_backward",
           "draw_dropout_seed", "dropout_keep_mask", "MAX_HEAD_DIM"]

MAX_HEAD_DIM = 256
_INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") == "1"
# GENFAST_FLASH_AUTOTUNE=0: take the first configuration that fits instead of timing all of them
# (each is a separate compile, seconds apiece); for correctness runs where tuning time is waste.
_AUTOTUNE = os.environ.get("GENFAST_FLASH_AUTOTUNE", "1") != "0"
_SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_LOG2E = 1.4426950408889634  # the kernels use exp2, so scores are carried in base 2


# --------------------------------------------------------------------------------------------------
# Tile configurations
# --------------------------------------------------------------------------------------------------

# (BLOCK_M, BLOCK_N, num_warps, num_stages). Ampere (sm80, 164 KB shared memory) favours 64-128 x 64
# tiles with 2-3 stages; Hopper (sm90, 227 KB) favours 128 x 64/128 tiles, 8 warps, 3-4 stages.
# Kept to eight so that first-call autotuning stays short (every kernel x length x head dim).
# The first one that fits is the untuned default (GENFAST_FLASH_AUTOTUNE=0), so it leads the list.
_HALF_SHAPES = [(128, 64, 8, 3), (64, 64, 4, 2), (64, 64, 4, 3), (64, 128, 4, 3), (128, 64, 4, 3),
                (128, 64, 8, 4), (128, 128, 8, 2), (128, 128, 8, 3)]
# float32/float64 inputs (IEEE products, no tensor cores): large tiles compile for minutes and spill,
# so only these, largest first; the first that fits is used, untuned. The smaller ones are for head
# dims up to 256, where 64 x 64 x 2 stages of fp32 need more shared memory than an SM has.
_WIDE_SHAPES = [(64, 64, 4, 2), (32, 32, 4, 2), (32, 32, 4, 1)]


def _gpu_configs() -> list[triton.Config]:
    shapes = _HALF_SHAPES + [shape for shape in _WIDE_SHAPES if shape not in _HALF_SHAPES]
    return [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s) for m, n, w, s in shapes]


_MAX_SHARED_MEMORY_BYTES = 227 * 1024  # sm90's opt-in limit; the autotuner drops what fails on smaller parts


def _shape(config: triton.Config) -> tuple[int, int, int, int]:
    return config.kwargs["BLOCK_M"], config.kwargs["BLOCK_N"], config.num_warps, config.num_stages


def _prune_for_head_dim(configs, named_args, **kwargs):
    """Drop configurations that cannot fit in shared memory at this head dim and element size.

    Estimate: num_stages copies of one BLOCK_M x D and one BLOCK_N x D tile (what the software
    pipeline buffers), plus 15% for the rest (what the backward dK/dV kernel needs beyond the plain
    estimate, with margin: docs/design.md). Whatever still fails to launch is scored as infinitely slow by the
    autotuner; untuned, the first that fits is used, so the estimate must not be low.
    """
    block_d = kwargs.get("BLOCK_D") or named_args.get("BLOCK_D") or 64
    q = named_args.get("q_ptr", kwargs.get("q_ptr"))
    element_size = q.element_size() if hasattr(q, "element_size") else 2

    def shared_bytes(config):
        block_m, block_n, _, stages = _shape(config)
        return 1.15 * (block_m + block_n) * block_d * element_size * stages

    if element_size >= 4:
        candidates = sorted((c for c in configs if _shape(c) in _WIDE_SHAPES), key=lambda c: _WIDE_SHAPES.index(_shape(c)))
        kept = [c for c in candidates if shared_bytes(c) <= _MAX_SHARED_MEMORY_BYTES][:1]
    else:
        kept = [c for c in configs if _shape(c) in _HALF_SHAPES and shared_bytes(c) <= _MAX_SHARED_MEMORY_BYTES]
    if not kept:
        return [min(configs, key=shared_bytes)]
    return kept if _AUTOTUNE else kept[:1]


if _INTERPRETED:
    # One small configuration: the interpreter runs tiles in numpy, and autotuning would re-run each
    # kernel once per configuration.
    _CONFIGS = [triton.Config({"BLOCK_M": 16, "BLOCK_N": 16}, num_warps=1, num_stages=1)]
    _PRUNE = None
else:
    _CONFIGS = _gpu_configs()
    _PRUNE = {"early_config_prune": _prune_for_head_dim}

# Keyed on the padded head dim, the masking flags and both lengths (the tutorial keys on the length too;
# for packed batches the lengths are the longest sequence's).
_AUTOTUNE_KEY = ["seqlen_q", "seqlen_k", "BLOCK_D", "HAS_LEFT", "HAS_RIGHT", "VARLEN", "MASK_KIND", "HAS_DROPOUT"]

# MASK_KIND values: no attn_mask, a boolean one (True = attend), an additive one.
_NO_MASK, _BOOL_MASK, _ADDITIVE_MASK = 0, 1, 2


# --------------------------------------------------------------------------------------------------
# Shared pieces: products, which (query, key) pairs are visible, dropout
# --------------------------------------------------------------------------------------------------

@triton.jit
def _dot(a, b, acc, ACC_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr, UPCAST_BF16: tl.constexpr):
    """a @ b (+ acc), accumulated in ACC_DTYPE.

    UPCAST_BF16 is set only under the Triton interpreter: its tl.dot multiplies bfloat16 operands as
    their raw uint16 bit patterns (triton 3.9; triton-lang/triton#11584). Upcasting to fp32 first is exact (a bf16 x bf16
    product fits in fp32) and gives what tensor cores compute.
    """
    if UPCAST_BF16:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    return tl.dot(a, b, acc, input_precision=DOT_PRECISION, out_dtype=ACC_DTYPE)


@triton.jit
def _masked_scores(scores, rows, cols, seqlen_q, seqlen_k, diagonal, window_left, window_right,
                   mask_ptr, stride_mm, stride_mn,
                   HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr, MASK_KIND: tl.constexpr):
    """Scores (base-2 units) with every pair that query row i may not see set to -inf.

    rows and cols are broadcast against each other (rows[:, None] with cols[None, :], or the transposed
    tile), so one helper serves the forward and both backward kernels. Query i sees key j when both
    are in range, i + diagonal - left <= j <= i + diagonal + right (bounds present when HAS_LEFT /
    HAS_RIGHT; causal is right = 0), and the mask allows it: a boolean mask (True = attend) hides the
    pair, an additive one is added (converted to base 2, as the scores are).
    """
    visible = (rows < seqlen_q) & (cols < seqlen_k)
    if HAS_LEFT:
        visible = visible & (cols >= rows + diagonal - window_left)
    if HAS_RIGHT:
        visible = visible & (cols <= rows + diagonal + window_right)
    if MASK_KIND == 1:
        allowed = tl.load(mask_ptr + rows.to(tl.int64) * stride_mm + cols.to(tl.int64) * stride_mn,
                          mask=visible, other=0)
        visible = visible & (allowed != 0)
    if MASK_KIND == 2:
        bias = tl.load(mask_ptr + rows.to(tl.int64) * stride_mm + cols.to(tl.int64) * stride_mn,
                       mask=visible, other=0.0)
        scores = scores + bias.to(scores.dtype) * 1.4426950408889634
    return tl.where(visible, scores, float("-inf"))


@triton.jit
def _dropout_keep(seed, batch_head, rows, cols, dropout_p):
    """Which (query, key) pairs dropout keeps: a Philox draw keyed by the 64-bit seed, with counter
    (key, query, batch * heads + head, 0), so it depends on nothing but the seed and the pair's
    coordinates (not on tiles or orientation) and the backward regenerates exactly the forward's mask."""
    rows_b = rows + cols * 0
    cols_b = cols + rows * 0
    zeros = rows_b * 0
    bits, _, _, _ = tl.philox(seed, cols_b, rows_b, zeros + batch_head, zeros)
    return tl.uint_to_uniform_float(bits) >= dropout_p


@triton.jit
def _dropout_mask_kernel(seed_ptr, keep_ptr, seqlen_q, seqlen_k, dropout_p,
                         BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """keep[bh, i, j] for a (batch * heads, Lq, Lk) tensor, by the attention kernels' own _dropout_keep."""
    block_m = tl.program_id(0)
    batch_head = tl.program_id(1)
    seed = tl.load(seed_ptr)
    rows = block_m * BLOCK_M + tl.arange(0, BLOCK_M)
    base = keep_ptr + batch_head.to(tl.int64) * seqlen_q * seqlen_k
    for key_start in range(0, seqlen_k, BLOCK_N):
        cols = key_start + tl.arange(0, BLOCK_N)
        keep = _dropout_keep(seed, batch_head, rows[:, None], cols[None, :], dropout_p)
        tl.store(base + rows[:, None].to(tl.int64) * seqlen_k + cols[None, :], keep.to(tl.int8),
                 mask=(rows[:, None] < seqlen_q) & (cols[None, :] < seqlen_k))


# --------------------------------------------------------------------------------------------------
# Forward
# --------------------------------------------------------------------------------------------------

@triton.autotune(configs=_CONFIGS, key=_AUTOTUNE_KEY, prune_configs_by=_PRUNE)
@triton.jit
def _flash_attention_forward_kernel(
    q_ptr, k_ptr, v_ptr, out_ptr, lse_ptr, mask_ptr, seed_ptr, cu_seqlens_q_ptr, cu_seqlens_k_ptr,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_ob, stride_oh, stride_om, stride_od,
    stride_lb, stride_lh,
    stride_mb, stride_mh, stride_mm, stride_mn,
    num_q_heads, seqlen_q, seqlen_k, head_dim, qk_scale_log2,
    window_left, window_right, dropout_p, dropout_scale,
    GROUP_SIZE: tl.constexpr,
    HAS_LEFT: tl.constexpr,
    HAS_RIGHT: tl.constexpr,
    VARLEN: tl.constexpr,
    MASK_KIND: tl.constexpr,
    HAS_DROPOUT: tl.constexpr,
    BLOCK_D: tl.constexpr,
    ACC_DTYPE: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    UPCAST_BF16: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """One block of query rows of one (batch or packed sequence, query head); walks the key blocks it can see."""
    block_m = tl.program_id(0)
    batch_head = tl.program_id(1)
    batch = batch_head // num_q_heads
    q_head = batch_head % num_q_heads
    kv_head = q_head // GROUP_SIZE
    if ACC_DTYPE == tl.float32:
        # Triton's launcher types a Python float argument as fp32, torch.compile types it as fp64, and
        # torch's mutation analysis of the kernel passes it as a constant Python float: tl.cast takes all
        # three. Without it an fp64 scale would promote the softmax and the accumulator to fp64 under
        # torch.compile. (Inline, not a helper: a jit call would round a Python float to fp32 first,
        # which the fp64 path must not.)
        qk_scale_log2 = tl.cast(qk_scale_log2, tl.float32)

    # 64-bit base offsets: B*H*L*D overflows int32 for long sequences.
    q_ptr += batch.to(tl.int64) * stride_qb + q_head.to(tl.int64) * stride_qh
    k_ptr += batch.to(tl.int64) * stride_kb + kv_head.to(tl.int64) * stride_kh
    v_ptr += batch.to(tl.int64) * stride_vb + kv_head.to(tl.int64) * stride_vh
    out_ptr += batch.to(tl.int64) * stride_ob + q_head.to(tl.int64) * stride_oh
    lse_ptr += batch.to(tl.int64) * stride_lb + q_head.to(tl.int64) * stride_lh
    mask_ptr += batch.to(tl.int64) * stride_mb + q_head.to(tl.int64) * stride_mh
    # Dense batches align the window top-left (torch's is_causal); packed sequences bottom-right
    # (FlashAttention-2's varlen), i.e. shifted by Lk - Lq.
    diagonal = 0
    if VARLEN:
        q_start = tl.load(cu_seqlens_q_ptr + batch)
        k_start = tl.load(cu_seqlens_k_ptr + batch)
        seqlen_q = tl.load(cu_seqlens_q_ptr + batch + 1) - q_start
        seqlen_k = tl.load(cu_seqlens_k_ptr + batch + 1) - k_start
        diagonal = seqlen_k - seqlen_q
        q_ptr += q_start.to(tl.int64) * stride_qm
        out_ptr += q_start.to(tl.int64) * stride_om
        lse_ptr += q_start.to(tl.int64)
        k_ptr += k_start.to(tl.int64) * stride_kn
        v_ptr += k_start.to(tl.int64) * stride_vn

    rows = block_m * BLOCK_M + tl.arange(0, BLOCK_M)
    dims = tl.arange(0, BLOCK_D)
    row_valid = rows < seqlen_q
    dim_valid = dims < head_dim

    q = tl.load(q_ptr + rows[:, None] * stride_qm + dims[None, :] * stride_qd,
                mask=row_valid[:, None] & dim_valid[None, :], other=0.0)

    row_max = tl.full([BLOCK_M], float("-inf"), dtype=ACC_DTYPE)
    row_sum = tl.zeros([BLOCK_M], dtype=ACC_DTYPE)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=ACC_DTYPE)
    if HAS_DROPOUT:
        seed = tl.load(seed_ptr)

    # Only the key blocks that some row of this block can see are visited (a window's outside is
    # skipped, not masked); a block past a packed sequence's end visits none.
    first_row = block_m * BLOCK_M
    last_row = tl.minimum(seqlen_q, first_row + BLOCK_M) - 1
    key_begin = 0
    key_end = seqlen_k
    if HAS_LEFT:
        key_begin = tl.maximum(first_row + diagonal - window_left, 0) // BLOCK_N * BLOCK_N
    if HAS_RIGHT:
        key_end = tl.minimum(seqlen_k, last_row + diagonal + window_right + 1)
    if VARLEN:
        key_end = tl.where(first_row < seqlen_q, key_end, 0)

    for key_start in range(key_begin, key_end, BLOCK_N):
        cols = key_start + tl.arange(0, BLOCK_N)
        col_valid = cols < seqlen_k
        kv_mask = col_valid[:, None] & dim_valid[None, :]
        k = tl.load(k_ptr + cols[:, None] * stride_kn + dims[None, :] * stride_kd, mask=kv_mask, other=0.0)
        v = tl.load(v_ptr + cols[:, None] * stride_vn + dims[None, :] * stride_vd, mask=kv_mask, other=0.0)

        scores = _dot(q, tl.trans(k), None, ACC_DTYPE, DOT_PRECISION, UPCAST_BF16) * qk_scale_log2
        scores = _masked_scores(scores, rows[:, None], cols[None, :], seqlen_q, seqlen_k, diagonal,
                                window_left, window_right, mask_ptr, stride_mm, stride_mn,
                                HAS_LEFT, HAS_RIGHT, MASK_KIND)

        new_max = tl.maximum(row_max, tl.max(scores, 1))
        # A row that has seen no visible key yet keeps max -inf; subtract 0 instead so that
        # exp2(-inf - -inf) never makes a NaN.
        safe_max = tl.where(new_max == float("-inf"), 0.0, new_max)
        probs = tl.exp2(scores - safe_max[:, None])
        rescale = tl.exp2(row_max - safe_max)
        row_sum = row_sum * rescale + tl.sum(probs, 1)
        acc = acc * rescale[:, None]
        if HAS_DROPOUT:
            # The normaliser sums every probability; only the kept ones reach the output.
            probs = tl.where(_dropout_keep(seed, batch_head, rows[:, None], cols[None, :], dropout_p), probs, 0.0)
        acc = _dot(probs.to(v.dtype), v, acc, ACC_DTYPE, DOT_PRECISION, UPCAST_BF16)
        row_max = new_max

    # Rows with no visible key (Lk == 0, every key masked, or a window with no key in range) have
    # row_sum == 0: output zeros, lse = -inf.
    empty = row_sum == 0.0
    out = acc / tl.where(empty, 1.0, row_sum)[:, None]
    if HAS_DROPOUT:
        out = out * dropout_scale
    lse = tl.where(empty, float("-inf"), (row_max + tl.log2(tl.where(empty, 1.0, row_sum))) / 1.4426950408889634)
    tl.store(out_ptr + rows[:, None] * stride_om + dims[None, :] * stride_od, out.to(out_ptr.dtype.element_ty),
             mask=row_valid[:, None] & dim_valid[None, :])
    tl.store(lse_ptr + rows, lse.to(lse_ptr.dtype.element_ty), mask=row_valid)


# --------------------------------------------------------------------------------------------------
# Backward
# --------------------------------------------------------------------------------------------------

@triton.jit
def _flash_attention_backward_preprocess_kernel(
    out_ptr, grad_out_ptr, delta_ptr, cu_seqlens_q_ptr,
    stride_ob, stride_oh, stride_om, stride_od,
    stride_gb, stride_gh, stride_gm, stride_gd,
    stride_lb, stride_lh,
    num_q_heads, seqlen_q, head_dim,
    VARLEN: tl.constexpr,
    BLOCK_D: tl.constexpr,
    ACC_DTYPE: tl.constexpr,
    BLOCK_M: tl.constexpr,
):
    """delta_i = sum_d dO_id * O_id: the row term of the softmax gradient, dS = P * (dP - delta).
    (With dropout O is the dropped output, and the identity still holds.) delta has lse's layout."""
    block_m = tl.program_id(0)
    batch_head = tl.program_id(1)
    batch = batch_head // num_q_heads
    head = batch_head % num_q_heads
    out_ptr += batch.to(tl.int64) * stride_ob + head.to(tl.int64) * stride_oh
    grad_out_ptr += batch.to(tl.int64) * stride_gb + head.to(tl.int64) * stride_gh
    delta_ptr += batch.to(tl.int64) * stride_lb + head.to(tl.int64) * stride_lh
    if VARLEN:
        q_start = tl.load(cu_seqlens_q_ptr + batch)
        seqlen_q = tl.load(cu_seqlens_q_ptr + batch + 1) - q_start
        out_ptr += q_start.to(tl.int64) * stride_om
        grad_out_ptr += q_start.to(tl.int64) * stride_gm
        delta_ptr += q_start.to(tl.int64)
    rows = block_m * BLOCK_M + tl.arange(0, BLOCK_M)
    dims = tl.arange(0, BLOCK_D)
    mask = (rows < seqlen_q)[:, None] & (dims < head_dim)[None, :]
    out = tl.load(out_ptr + rows[:, None] * stride_om + dims[None, :] * stride_od, mask=mask, other=0.0)
    grad_out = tl.load(grad_out_ptr + rows[:, None] * stride_gm + dims[None, :] * stride_gd, mask=mask, other=0.0)
    delta = tl.sum(out.to(ACC_DTYPE) * grad_out.to(ACC_DTYPE), 1)
    tl.store(delta_ptr + rows, delta, mask=rows < seqlen_q)


@triton.autotune(configs=_CONFIGS, key=_AUTOTUNE_KEY, prune_configs_by=_PRUNE)
@triton.jit
def _flash_attention_backward_dkdv_kernel(
    q_ptr, k_ptr, v_ptr, grad_out_ptr, lse_ptr, delta_ptr, grad_k_ptr, grad_v_ptr,
    mask_ptr, seed_ptr, cu_seqlens_q_ptr, cu_seqlens_k_ptr,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_gb, stride_gh, stride_gm, stride_gd,
    stride_dkb, stride_dkh, stride_dkn, stride_dkd,
    stride_dvb, stride_dvh, stride_dvn, stride_dvd,
    stride_lb, stride_lh,
    stride_mb, stride_mh, stride_mm, stride_mn,
    num_q_heads, num_kv_heads, seqlen_q, seqlen_k, head_dim, scale, qk_scale_log2,
    window_left, window_right, dropout_p, dropout_scale,
    GROUP_SIZE: tl.constexpr,
    HAS_LEFT: tl.constexpr,
    HAS_RIGHT: tl.constexpr,
    VARLEN: tl.constexpr,
    MASK_KIND: tl.constexpr,
    HAS_DROPOUT: tl.constexpr,
    BLOCK_D: tl.constexpr,
    ACC_DTYPE: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    UPCAST_BF16: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """One block of keys of one K/V head; walks the query blocks that can see it, of every query head in its group."""
    if ACC_DTYPE == tl.float32:  # see the forward kernel
        scale, qk_scale_log2 = tl.cast(scale, tl.float32), tl.cast(qk_scale_log2, tl.float32)
    block_n = tl.program_id(0)
    batch_kv_head = tl.program_id(1)
    batch = batch_kv_head // num_kv_heads
    kv_head = batch_kv_head % num_kv_heads

    k_ptr += batch.to(tl.int64) * stride_kb + kv_head.to(tl.int64) * stride_kh
    v_ptr += batch.to(tl.int64) * stride_vb + kv_head.to(tl.int64) * stride_vh
    grad_k_ptr += batch.to(tl.int64) * stride_dkb + kv_head.to(tl.int64) * stride_dkh
    grad_v_ptr += batch.to(tl.int64) * stride_dvb + kv_head.to(tl.int64) * stride_dvh
    q_ptr += batch.to(tl.int64) * stride_qb
    grad_out_ptr += batch.to(tl.int64) * stride_gb
    lse_ptr += batch.to(tl.int64) * stride_lb
    delta_ptr += batch.to(tl.int64) * stride_lb
    mask_ptr += batch.to(tl.int64) * stride_mb
    diagonal = 0
    if VARLEN:
        q_start = tl.load(cu_seqlens_q_ptr + batch)
        k_start = tl.load(cu_seqlens_k_ptr + batch)
        seqlen_q = tl.load(cu_seqlens_q_ptr + batch + 1) - q_start
        seqlen_k = tl.load(cu_seqlens_k_ptr + batch + 1) - k_start
        diagonal = seqlen_k - seqlen_q
        k_ptr += k_start.to(tl.int64) * stride_kn
        v_ptr += k_start.to(tl.int64) * stride_vn
        grad_k_ptr += k_start.to(tl.int64) * stride_dkn
        grad_v_ptr += k_start.to(tl.int64) * stride_dvn
        q_ptr += q_start.to(tl.int64) * stride_qm
        grad_out_ptr += q_start.to(tl.int64) * stride_gm
        lse_ptr += q_start.to(tl.int64)
        delta_ptr += q_start.to(tl.int64)

    cols = block_n * BLOCK_N + tl.arange(0, BLOCK_N)
    dims = tl.arange(0, BLOCK_D)
    col_valid = cols < seqlen_k
    dim_valid = dims < head_dim
    kv_mask = col_valid[:, None] & dim_valid[None, :]

    k = tl.load(k_ptr + cols[:, None] * stride_kn + dims[None, :] * stride_kd, mask=kv_mask, other=0.0)
    v = tl.load(v_ptr + cols[:, None] * stride_vn + dims[None, :] * stride_vd, mask=kv_mask, other=0.0)

    grad_k = tl.zeros([BLOCK_N, BLOCK_D], dtype=ACC_DTYPE)
    grad_v = tl.zeros([BLOCK_N, BLOCK_D], dtype=ACC_DTYPE)
    if HAS_DROPOUT:
        seed = tl.load(seed_ptr)

    # Only the query blocks whose rows can see some key of this block: query i sees key j when
    # j - diagonal - right <= i <= j - diagonal + left.
    first_col = block_n * BLOCK_N
    last_col = tl.minimum(seqlen_k, first_col + BLOCK_N) - 1
    query_begin = 0
    query_end = seqlen_q
    if HAS_RIGHT:
        query_begin = tl.maximum(first_col - diagonal - window_right, 0) // BLOCK_M * BLOCK_M
    if HAS_LEFT:
        query_end = tl.minimum(seqlen_q, last_col - diagonal + window_left + 1)
    if VARLEN:
        query_end = tl.where(first_col < seqlen_k, query_end, 0)

    for group_member in range(GROUP_SIZE):
        q_head = kv_head * GROUP_SIZE + group_member
        q_base = q_ptr + q_head.to(tl.int64) * stride_qh
        g_base = grad_out_ptr + q_head.to(tl.int64) * stride_gh
        row_stats = q_head.to(tl.int64) * stride_lh
        mask_base = mask_ptr + q_head.to(tl.int64) * stride_mh
        batch_head = batch * num_q_heads + q_head
        for query_start in range(query_begin, query_end, BLOCK_M):
            rows = query_start + tl.arange(0, BLOCK_M)
            row_valid = rows < seqlen_q
            q_mask = row_valid[:, None] & dim_valid[None, :]
            q = tl.load(q_base + rows[:, None] * stride_qm + dims[None, :] * stride_qd, mask=q_mask, other=0.0)
            grad_out = tl.load(g_base + rows[:, None] * stride_gm + dims[None, :] * stride_gd,
                               mask=q_mask, other=0.0)
            lse = tl.load(lse_ptr + row_stats + rows, mask=row_valid, other=0.0)
            delta = tl.load(delta_ptr + row_stats + rows, mask=row_valid, other=0.0)
            # Rows that saw no key (lse = -inf) get probabilities exp2(s - inf) = 0, not NaN.
            lse_log2 = tl.where(lse == float("-inf"), float("inf"), lse * 1.4426950408889634)

            # Transposed tile (keys x queries) so that dV += P^T dO and dK += dS^T Q need no transpose.
            scores_t = _dot(k, tl.trans(q), None, ACC_DTYPE, DOT_PRECISION, UPCAST_BF16) * qk_scale_log2
            scores_t = _masked_scores(scores_t, rows[None, :], cols[:, None], seqlen_q, seqlen_k, diagonal,
                                      window_left, window_right, mask_base, stride_mm, stride_mn,
                                      HAS_LEFT, HAS_RIGHT, MASK_KIND)
            probs_t = tl.exp2(scores_t - lse_log2[None, :])
            grad_probs_t = _dot(v, tl.trans(grad_out), None, ACC_DTYPE, DOT_PRECISION, UPCAST_BF16)
            if HAS_DROPOUT:
                keep_t = _dropout_keep(seed, batch_head, rows[None, :], cols[:, None], dropout_p)
                dropped_t = tl.where(keep_t, probs_t * dropout_scale, 0.0)
                grad_v = _dot(dropped_t.to(grad_out.dtype), grad_out, grad_v, ACC_DTYPE, DOT_PRECISION, UPCAST_BF16)
                grad_probs_t = tl.where(keep_t, grad_probs_t * dropout_scale, 0.0)
            else:
                grad_v = _dot(probs_t.to(grad_out.dtype), grad_out, grad_v, ACC_DTYPE, DOT_PRECISION, UPCAST_BF16)
            grad_scores_t = probs_t * (grad_probs_t - delta[None, :])
            grad_k = _dot(grad_scores_t.to(q.dtype), q, grad_k, ACC_DTYPE, DOT_PRECISION, UPCAST_BF16)

    grad_k = grad_k * scale
    tl.store(grad_k_ptr + cols[:, None] * stride_dkn + dims[None, :] * stride_dkd,
             grad_k.to(grad_k_ptr.dtype.element_ty), mask=kv_mask)
    tl.store(grad_v_ptr + cols[:, None] * stride_dvn + dims[None, :] * stride_dvd,
             grad_v.to(grad_v_ptr.dtype.element_ty), mask=kv_mask)


@triton.autotune(configs=_CONFIGS, key=_AUTOTUNE_KEY, prune_configs_by=_PRUNE)
@triton.jit
def _flash_attention_backward_dq_kernel(
    q_ptr, k_ptr, v_ptr, grad_out_ptr, lse_ptr, delta_ptr, grad_q_ptr,
    mask_ptr, seed_ptr, cu_seqlens_q_ptr, cu_seqlens_k_ptr,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_gb, stride_gh, stride_gm, stride_gd,
    stride_dqb, stride_dqh, stride_dqm, stride_dqd,
    stride_lb, stride_lh,
    stride_mb, stride_mh, stride_mm, stride_mn,
    num_q_heads, seqlen_q, seqlen_k, head_dim, scale, qk_scale_log2,
    window_left, window_right, dropout_p, dropout_scale,
    GROUP_SIZE: tl.constexpr,
    HAS_LEFT: tl.constexpr,
    HAS_RIGHT: tl.constexpr,
    VARLEN: tl.constexpr,
    MASK_KIND: tl.constexpr,
    HAS_DROPOUT: tl.constexpr,
    BLOCK_D: tl.constexpr,
    ACC_DTYPE: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    UPCAST_BF16: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """One block of query rows of one query head; walks the key blocks it can see."""
    if ACC_DTYPE == tl.float32:  # see the forward kernel
        scale, qk_scale_log2 = tl.cast(scale, tl.float32), tl.cast(qk_scale_log2, tl.float32)
    block_m = tl.program_id(0)
    batch_head = tl.program_id(1)
    batch = batch_head // num_q_heads
    q_head = batch_head % num_q_heads
    kv_head = q_head // GROUP_SIZE

    q_ptr += batch.to(tl.int64) * stride_qb + q_head.to(tl.int64) * stride_qh
    grad_out_ptr += batch.to(tl.int64) * stride_gb + q_head.to(tl.int64) * stride_gh
    grad_q_ptr += batch.to(tl.int64) * stride_dqb + q_head.to(tl.int64) * stride_dqh
    lse_ptr += batch.to(tl.int64) * stride_lb + q_head.to(tl.int64) * stride_lh
    delta_ptr += batch.to(tl.int64) * stride_lb + q_head.to(tl.int64) * stride_lh
    k_ptr += batch.to(tl.int64) * stride_kb + kv_head.to(tl.int64) * stride_kh
    v_ptr += batch.to(tl.int64) * stride_vb + kv_head.to(tl.int64) * stride_vh
    mask_ptr += batch.to(tl.int64) * stride_mb + q_head.to(tl.int64) * stride_mh
    diagonal = 0
    if VARLEN:
        q_start = tl.load(cu_seqlens_q_ptr + batch)
        k_start = tl.load(cu_seqlens_k_ptr + batch)
        seqlen_q = tl.load(cu_seqlens_q_ptr + batch + 1) - q_start
        seqlen_k = tl.load(cu_seqlens_k_ptr + batch + 1) - k_start
        diagonal = seqlen_k - seqlen_q
        q_ptr += q_start.to(tl.int64) * stride_qm
        grad_out_ptr += q_start.to(tl.int64) * stride_gm
        grad_q_ptr += q_start.to(tl.int64) * stride_dqm
        lse_ptr += q_start.to(tl.int64)
        delta_ptr += q_start.to(tl.int64)
        k_ptr += k_start.to(tl.int64) * stride_kn
        v_ptr += k_start.to(tl.int64) * stride_vn

    rows = block_m * BLOCK_M + tl.arange(0, BLOCK_M)
    dims = tl.arange(0, BLOCK_D)
    row_valid = rows < seqlen_q
    dim_valid = dims < head_dim
    q_mask = row_valid[:, None] & dim_valid[None, :]

    q = tl.load(q_ptr + rows[:, None] * stride_qm + dims[None, :] * stride_qd, mask=q_mask, other=0.0)
    grad_out = tl.load(grad_out_ptr + rows[:, None] * stride_gm + dims[None, :] * stride_gd, mask=q_mask, other=0.0)
    lse = tl.load(lse_ptr + rows, mask=row_valid, other=0.0)
    delta = tl.load(delta_ptr + rows, mask=row_valid, other=0.0)
    lse_log2 = tl.where(lse == float("-inf"), float("inf"), lse * 1.4426950408889634)  # see the dK/dV kernel

    grad_q = tl.zeros([BLOCK_M, BLOCK_D], dtype=ACC_DTYPE)
    if HAS_DROPOUT:
        seed = tl.load(seed_ptr)

    first_row = block_m * BLOCK_M
    last_row = tl.minimum(seqlen_q, first_row + BLOCK_M) - 1
    key_begin = 0
    key_end = seqlen_k
    if HAS_LEFT:
        key_begin = tl.maximum(first_row + diagonal - window_left, 0) // BLOCK_N * BLOCK_N
    if HAS_RIGHT:
        key_end = tl.minimum(seqlen_k, last_row + diagonal + window_right + 1)
    if VARLEN:
        key_end = tl.where(first_row < seqlen_q, key_end, 0)

    for key_start in range(key_begin, key_end, BLOCK_N):
        cols = key_start + tl.arange(0, BLOCK_N)
        col_valid = cols < seqlen_k
        kv_mask = col_valid[:, None] & dim_valid[None, :]
        k = tl.load(k_ptr + cols[:, None] * stride_kn + dims[None, :] * stride_kd, mask=kv_mask, other=0.0)
        v = tl.load(v_ptr + cols[:, None] * stride_vn + dims[None, :] * stride_vd, mask=kv_mask, other=0.0)

        scores = _dot(q, tl.trans(k), None, ACC_DTYPE, DOT_PRECISION, UPCAST_BF16) * qk_scale_log2
        scores = _masked_scores(scores, rows[:, None], cols[None, :], seqlen_q, seqlen_k, diagonal,
                                window_left, window_right, mask_ptr, stride_mm, stride_mn,
                                HAS_LEFT, HAS_RIGHT, MASK_KIND)
        probs = tl.exp2(scores - lse_log2[:, None])

        grad_probs = _dot(grad_out, tl.trans(v), None, ACC_DTYPE, DOT_PRECISION, UPCAST_BF16)
        if HAS_DROPOUT:
            keep = _dropout_keep(seed, batch_head, rows[:, None], cols[None, :], dropout_p)
            grad_probs = tl.where(keep, grad_probs * dropout_scale, 0.0)
        grad_scores = probs * (grad_probs - delta[:, None])
        grad_q = _dot(grad_scores.to(k.dtype), k, grad_q, ACC_DTYPE, DOT_PRECISION, UPCAST_BF16)

    grad_q = grad_q * scale
    tl.store(grad_q_ptr + rows[:, None] * stride_dqm + dims[None, :] * stride_dqd,
             grad_q.to(grad_q_ptr.dtype.element_ty), mask=q_mask)


# --------------------------------------------------------------------------------------------------
# Launch helpers (torch-side; the kernels above know nothing of torch)
# --------------------------------------------------------------------------------------------------

def _block_d(head_dim: int) -> int:
    # tl.dot needs every tile dimension >= 16.
    return max(16, triton.next_power_of_2(head_dim))


def _acc_dtype(dtype: torch.dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


def _stats_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _upcast_bf16(dtype: torch.dtype) -> bool:
    return _INTERPRETED and dtype == torch.bfloat16


def _dot_precision(dtype: torch.dtype) -> str:
    # fp32 inputs: IEEE products, so results track an fp32 reference instead of TF32's 10-bit mantissa.
    # fp16/bf16 ignore this knob (their tensor-core products are exact in fp32).
    if dtype in (torch.float32, torch.float64) or _upcast_bf16(dtype):
        return "ieee"
    return "tf32"


def _forward_outputs(q: Tensor) -> tuple[Tensor, Tensor]:
    out = torch.empty_like(q, memory_format=torch.contiguous_format)
    lse = torch.empty(q.shape[:3], dtype=_stats_dtype(q.dtype), device=q.device)
    return out, lse


def _backward_outputs(q: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    return tuple(torch.empty_like(t, memory_format=torch.contiguous_format) for t in (q, k, v))



class _Problem(NamedTuple):
    """What the kernels need beyond q, k, v: how rows are laid out and which pairs are visible.

    strides: each tensor's 4 strides in the kernels' (batch, head, row, dim) order; a packed tensor
    (total, H, D) has batch stride 0 and its rows are found through cu_seqlens_q / cu_seqlens_k.
    lse and delta are (B, Hq, Lq) for dense batches and (Hq, total_q) for packed ones.
    """
    batch: int
    num_q_heads: int
    num_kv_heads: int
    seqlen_q: int          # packed: the longest sequence (grid size and autotune key)
    seqlen_k: int
    head_dim: int
    scale: float
    window: tuple[int, int]  # (left, right), -1 = unbounded; causal already folded in as right = 0
    attn_mask: Tensor | None  # (B, Hq, Lq, Lk) view, stride 0 on broadcast dims; bool viewed as uint8
    dropout_p: float
    seed: Tensor | None      # int64 (1,): the Philox key of this call's dropout
    cu_seqlens_q: Tensor | None
    cu_seqlens_k: Tensor | None

    @property
    def varlen(self) -> bool:
        return self.cu_seqlens_q is not None


def _strides(t: Tensor, varlen: bool) -> tuple[int, ...]:
    if varlen:  # (total, H, D)
        return 0, t.stride(1), t.stride(0), t.stride(2)
    return tuple(t.stride())


def _lse_strides(lse: Tensor, varlen: bool) -> tuple[int, int]:
    return (0, lse.stride(0)) if varlen else (lse.stride(0), lse.stride(1))


def _mask_kind(attn_mask: Tensor | None) -> int:
    if attn_mask is None:
        return _NO_MASK
    return _BOOL_MASK if attn_mask.dtype == torch.uint8 else _ADDITIVE_MASK


def _special_args(problem: _Problem, q: Tensor) -> tuple[list, list, dict, list]:
    """(pointers after q/k/v/outputs, mask strides, constexprs, window and dropout scalars): what the
    forward, dK/dV and dQ kernels share."""
    mask = problem.attn_mask
    placeholder = q  # never read: the constexpr flags compile the reads out
    pointers = [mask if mask is not None else placeholder,
                problem.seed if problem.seed is not None else placeholder,
                problem.cu_seqlens_q if problem.varlen else placeholder,
                problem.cu_seqlens_k if problem.varlen else placeholder]
    mask_strides = list(mask.stride()) if mask is not None else [0, 0, 0, 0]
    left, right = problem.window
    keep_scale = 0.0 if problem.dropout_p >= 1.0 else 1.0 / (1.0 - problem.dropout_p)
    window_and_dropout = [max(left, 0), max(right, 0), problem.dropout_p, keep_scale]
    constexprs = dict(GROUP_SIZE=problem.num_q_heads // problem.num_kv_heads, HAS_LEFT=left >= 0,
                      HAS_RIGHT=right >= 0, VARLEN=problem.varlen, MASK_KIND=_mask_kind(mask),
                      HAS_DROPOUT=problem.dropout_p > 0.0, BLOCK_D=_block_d(problem.head_dim),
                      ACC_DTYPE=_acc_dtype(q.dtype), DOT_PRECISION=_dot_precision(q.dtype),
                      UPCAST_BF16=_upcast_bf16(q.dtype))
    return pointers, mask_strides, constexprs, window_and_dropout


def _launch_forward(q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, problem: _Problem) -> None:
    varlen = problem.varlen
    pointers, mask_strides, constexprs, window_and_dropout = _special_args(problem, q)

    def grid(meta):
        return (triton.cdiv(problem.seqlen_q, meta["BLOCK_M"]), problem.batch * problem.num_q_heads)

    _flash_attention_forward_kernel[grid](
        q, k, v, out, lse, *pointers,
        *_strides(q, varlen), *_strides(k, varlen), *_strides(v, varlen), *_strides(out, varlen),
        *_lse_strides(lse, varlen), *mask_strides,
        problem.num_q_heads, problem.seqlen_q, problem.seqlen_k, problem.head_dim, problem.scale * _LOG2E,
        *window_and_dropout,
        **constexprs,
    )


def _launch_backward(grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
                     grad_q: Tensor, grad_k: Tensor, grad_v: Tensor, problem: _Problem) -> None:
    varlen = problem.varlen
    pointers, mask_strides, constexprs, window_and_dropout = _special_args(problem, q)
    delta = torch.empty_like(lse)
    preprocess_block_m = 16 if _INTERPRETED else 64
    _flash_attention_backward_preprocess_kernel[
        (triton.cdiv(problem.seqlen_q, preprocess_block_m), problem.batch * problem.num_q_heads)](
        out, grad_out, delta, pointers[2],
        *_strides(out, varlen), *_strides(grad_out, varlen), *_lse_strides(lse, varlen),
        problem.num_q_heads, problem.seqlen_q, problem.head_dim,
        VARLEN=varlen, BLOCK_D=constexprs["BLOCK_D"], ACC_DTYPE=constexprs["ACC_DTYPE"], BLOCK_M=preprocess_block_m,
    )
    scales = (problem.scale, problem.scale * _LOG2E)
    common_strides = (*_strides(q, varlen), *_strides(k, varlen), *_strides(v, varlen), *_strides(grad_out, varlen))

    def dkdv_grid(meta):
        return (triton.cdiv(problem.seqlen_k, meta["BLOCK_N"]), problem.batch * problem.num_kv_heads)

    _flash_attention_backward_dkdv_kernel[dkdv_grid](
        q, k, v, grad_out, lse, delta, grad_k, grad_v, *pointers,
        *common_strides, *_strides(grad_k, varlen), *_strides(grad_v, varlen),
        *_lse_strides(lse, varlen), *mask_strides,
        problem.num_q_heads, problem.num_kv_heads, problem.seqlen_q, problem.seqlen_k, problem.head_dim, *scales,
        *window_and_dropout,
        **constexprs,
    )

    def dq_grid(meta):
        return (triton.cdiv(problem.seqlen_q, meta["BLOCK_M"]), problem.batch * problem.num_q_heads)

    _flash_attention_backward_dq_kernel[dq_grid](
        q, k, v, grad_out, lse, delta, grad_q, *pointers,
        *common_strides, *_strides(grad_q, varlen),
        *_lse_strides(lse, varlen), *mask_strides,
        problem.num_q_heads, problem.seqlen_q, problem.seqlen_k, problem.head_dim, *scales,
        *window_and_dropout,
        **constexprs,
    )


def _dense_problem(q: Tensor, k: Tensor, causal: bool, scale: float, attn_mask: Tensor | None,
                   dropout_p: float, seed: Tensor | None, window: tuple[int, int]) -> _Problem:
    batch, num_q_heads, seqlen_q, head_dim = q.shape
    num_kv_heads, seqlen_k = k.shape[1], k.shape[2]
    if attn_mask is not None:
        # A view: broadcast dims get stride 0, nothing is expanded in memory.
        attn_mask = attn_mask.expand(batch, num_q_heads, seqlen_q, seqlen_k)
        if attn_mask.dtype == torch.bool:
            attn_mask = attn_mask.view(torch.uint8)
    return _Problem(batch, num_q_heads, num_kv_heads, seqlen_q, seqlen_k, head_dim, scale,
                    _fold_causal(window, causal), attn_mask, float(dropout_p) if seed is not None else 0.0,
                    seed, None, None)


def _fold_causal(window: tuple[int, int], causal: bool) -> tuple[int, int]:
    """Causal is a window with right = 0 (as FlashAttention-2 defines their combination)."""
    left, right = (-1 if w is None or w < 0 else int(w) for w in window)
    return (left, 0) if causal else (left, right)


def _flash_attention_forward(q: Tensor, k: Tensor, v: Tensor, causal: bool, scale: float,
                             attn_mask: Tensor | None = None, dropout_p: float = 0.0, seed: Tensor | None = None,
                             window: tuple[int, int] = (-1, -1)) -> tuple[Tensor, Tensor]:
    """(out (B, Hq, Lq, D) in q's dtype, lse (B, Hq, Lq): natural-log logsumexp of the scaled scores,
    float32 (float64 for float64 inputs); -inf for rows that see no key)."""
    out, lse = _forward_outputs(q)
    if out.numel() == 0:
        return out, lse
    _launch_forward(q, k, v, out, lse, _dense_problem(q, k, causal, scale, attn_mask, dropout_p, seed, window))
    return out, lse


def _flash_attention_backward(grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
                              causal: bool, scale: float, attn_mask: Tensor | None = None, dropout_p: float = 0.0,
                              seed: Tensor | None = None, window: tuple[int, int] = (-1, -1)
                              ) -> tuple[Tensor, Tensor, Tensor]:
    """(dq, dk, dv) for _flash_attention_forward, recomputing the probabilities from lse (and the
    dropout mask from the seed)."""
    batch, num_q_heads, seqlen_q, _ = q.shape
    seqlen_k = k.shape[2]
    grad_q, grad_k, grad_v = _backward_outputs(q, k, v)
    if seqlen_q == 0 or seqlen_k == 0 or batch == 0 or num_q_heads == 0:
        # No query sees any key: every gradient is an empty sum.
        return grad_q.zero_(), grad_k.zero_(), grad_v.zero_()
    _launch_backward(grad_out, q, k, v, out, lse, grad_q, grad_k, grad_v,
                     _dense_problem(q, k, causal, scale, attn_mask, dropout_p, seed, window))
    return grad_q, grad_k, grad_v



# --------------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------------

def _check_inputs(q: Tensor, k: Tensor, v: Tensor) -> None:
    for name, tensor in (("q", q), ("k", k), ("v", v)):
        if not isinstance(tensor, Tensor):
            raise TypeError(f"flash_attention: {name} must be a Tensor, got {type(tensor).__name__}")
        if tensor.dim() != 4:
            raise ValueError(f"flash_attention: {name} must have 4 dimensions (B, H, L, D), "
                             f"got shape {tuple(tensor.shape)}")
    for name, tensor in (("k", k), ("v", v)):
        if tensor.dtype != q.dtype:
            raise ValueError(f"flash_attention: {name}.dtype ({tensor.dtype}) must match q.dtype ({q.dtype})")
        if tensor.device != q.device:
            raise RuntimeError(f"flash_attention: {name} is on {tensor.device} but q is on {q.device}")
    if not _INTERPRETED and q.device.type != "cuda":
        raise RuntimeError(f"flash_attention: q is on {q.device}, but the compiled Triton kernels need a GPU "
                           f"tensor (on CPU use genfast.reference.attention or torch's SDPA; TRITON_INTERPRET=1 "
                           f"runs these kernels on CPU slowly, for testing)")
    if q.dtype not in _SUPPORTED_DTYPES:
        raise ValueError(f"flash_attention: q.dtype must be one of float16, bfloat16, float32, float64; "
                         f"got {q.dtype}")
    if k.shape != v.shape:
        raise ValueError(f"flash_attention: k and v must have the same shape, got k {tuple(k.shape)} "
                         f"and v {tuple(v.shape)}")
    if k.shape[0] != q.shape[0]:
        raise ValueError(f"flash_attention: batch size of k ({k.shape[0]}) must match q ({q.shape[0]})")
    if k.shape[-1] != q.shape[-1]:
        raise ValueError(f"flash_attention: head dim of k and v ({k.shape[-1]}) must match q ({q.shape[-1]})")
    num_q_heads, num_kv_heads = q.shape[1], k.shape[1]
    if num_kv_heads == 0 or num_q_heads % num_kv_heads != 0:
        raise ValueError(f"flash_attention: number of q heads ({num_q_heads}) must be a multiple of the number "
                         f"of k/v heads ({num_kv_heads})")
    head_dim = q.shape[-1]
    if not 1 <= head_dim <= MAX_HEAD_DIM:
        raise ValueError(f"flash_attention: head dim (q.shape[-1] = {head_dim}) must be in 1..{MAX_HEAD_DIM}")


def forward(q: Tensor, k: Tensor, v: Tensor, causal: bool = False, scale: float | None = None,
            attn_mask: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """softmax(q k^T * scale [+ mask]) v without materialising the score matrix, and its row logsumexp.

    q: (B, Hq, Lq, D); k, v: (B, Hk, Lk, D) with Hq % Hk == 0 (GQA/MQA when Hk < Hq).
    causal: top-left aligned, as torch's ``is_causal`` (query i sees keys 0..i).
    scale: defaults to 1/sqrt(D).
    attn_mask: bool (True = attend) or additive, broadcastable to (B, Hq, Lq, Lk), read in place.
    Returns out (B, Hq, Lq, D) in q's dtype and lse (B, Hq, Lq): the natural-log logsumexp of the
    scaled scores, float32 (float64 for float64 inputs), -inf for rows that see no key.
    """
    _check_inputs(q, k, v)
    if attn_mask is not None:
        _check_mask(attn_mask, q, k, gradient_allowed=True)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    return _flash_attention_forward(q, k, v, bool(causal), scale, attn_mask)


def backward(grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, causal: bool = False,
             scale: float | None = None, attn_mask: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """(dq, dk, dv) of forward's output for grad_out (B, Hq, Lq, D), recomputing the probabilities from lse.

    Deterministic: every gradient element is written by one program, with no atomics.
    """
    _check_inputs(q, k, v)
    if grad_out.shape != out.shape or out.shape != q.shape or lse.shape != q.shape[:3]:
        raise ValueError(f"flash_attention backward: grad_out {tuple(grad_out.shape)} and out {tuple(out.shape)} "
                         f"must have q's shape {tuple(q.shape)}, lse {tuple(lse.shape)} must be {tuple(q.shape[:3])}")
    if attn_mask is not None:
        _check_mask(attn_mask, q, k, gradient_allowed=True)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    return _flash_attention_backward(grad_out, q, k, v, out, lse, bool(causal), scale, attn_mask)


# --------------------------------------------------------------------------------------------------
# Masks, dropout, windows and packed (variable-length) batches, differentiable
# --------------------------------------------------------------------------------------------------

def draw_dropout_seed(device: torch.device | str) -> Tensor:
    """The Philox key of one dropout call: an int64 (1,) tensor drawn from torch's default generator of
    ``device`` (CUDA's on a GPU; the CPU's under the interpreter), so torch.manual_seed makes dropout
    reproducible. It stays on the device (no host sync); the backward reuses it to regenerate the mask."""
    return torch.randint(0, 2 ** 62, (1,), dtype=torch.int64, device=device)


def dropout_keep_mask(seed: Tensor, batch: int, num_heads: int, seqlen_q: int, seqlen_k: int,
                      dropout_p: float) -> Tensor:
    """The keep mask (B, H, Lq, Lk), bool, that the kernels apply for this seed, computed by the
    kernels' own Philox code (test hook: the mask is never stored by the kernels themselves).

    For packed batches the kernels use the same indices with the sequence number as batch and
    positions within the sequence: ask for (B, Hq, max_seqlen_q, max_seqlen_k) and slice.
    """
    keep = torch.empty((batch, num_heads, seqlen_q, seqlen_k), dtype=torch.int8, device=seed.device)
    if keep.numel():
        block = 16 if _INTERPRETED else 64
        _dropout_mask_kernel[(triton.cdiv(seqlen_q, block), batch * num_heads)](
            seed, keep, seqlen_q, seqlen_k, float(dropout_p), BLOCK_M=block, BLOCK_N=block)
    return keep.bool()


def _check_window(window_size) -> tuple[int, int]:
    try:
        left, right = window_size
        left, right = int(left), int(right)
    except (TypeError, ValueError):
        raise ValueError(f"flash_attention: window_size must be a pair (left, right) of ints, got {window_size!r}")
    if left < -1 or right < -1:
        raise ValueError(f"flash_attention: window_size entries must be >= 0, or -1 for unbounded; got {window_size!r}")
    return left, right


def _check_dropout(dropout_p) -> float:
    dropout_p = float(dropout_p)
    if not 0.0 <= dropout_p <= 1.0:
        raise ValueError(f"flash_attention: dropout_p must be in [0, 1], got {dropout_p}")
    return dropout_p


def _check_mask(attn_mask: Tensor, q: Tensor, k: Tensor, gradient_allowed: bool = False) -> None:
    if not isinstance(attn_mask, Tensor):
        raise TypeError(f"flash_attention: attn_mask must be a Tensor or None, got {type(attn_mask).__name__}")
    if attn_mask.dtype != torch.bool and not attn_mask.dtype.is_floating_point:
        raise ValueError(f"flash_attention: attn_mask must be bool (True = attend) or floating point (added to "
                         f"the scores), got {attn_mask.dtype}")
    if attn_mask.device != q.device:
        raise RuntimeError(f"flash_attention: attn_mask is on {attn_mask.device} but q is on {q.device}")
    full = (q.shape[0], q.shape[1], q.shape[2], k.shape[2])
    if attn_mask.dim() > 4 or any(m not in (1, f) for m, f in zip(reversed(attn_mask.shape), reversed(full))):
        raise ValueError(f"flash_attention: attn_mask of shape {tuple(attn_mask.shape)} does not broadcast to "
                         f"(B, Hq, Lq, Lk) = {full}")
    if not gradient_allowed and attn_mask.requires_grad and torch.is_grad_enabled():
        raise ValueError("flash_attention: attn_mask requires grad, and the kernels give no gradient for the mask; "
                         "detach it (or use torch's scaled_dot_product_attention for a learned additive mask)")


class _FlashAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, causal, scale, attn_mask, dropout_p, window):
        seed = draw_dropout_seed(q.device) if dropout_p > 0.0 else None
        out, lse = _flash_attention_forward(q, k, v, causal, scale, attn_mask, dropout_p, seed, window)
        ctx.save_for_backward(q, k, v, out, lse, attn_mask, seed)
        ctx.causal, ctx.scale, ctx.dropout_p, ctx.window = causal, scale, dropout_p, window
        return out

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, out, lse, attn_mask, seed = ctx.saved_tensors
        grads = _flash_attention_backward(grad_out, q, k, v, out, lse, ctx.causal, ctx.scale, attn_mask,
                                          ctx.dropout_p, seed, ctx.window)
        return (*grads, None, None, None, None, None)


def flash_attention(q: Tensor, k: Tensor, v: Tensor, *, causal: bool = False, scale: float | None = None,
                    attn_mask: Tensor | None = None, dropout_p: float = 0.0,
                    window_size: tuple[int, int] = (-1, -1)) -> Tensor:
    """softmax(q k^T * scale + mask) v with dropout on the probabilities; differentiable in q, k, v.

    q (B, Hq, Lq, D); k, v (B, Hk, Lk, D) with Hq % Hk == 0 (GQA).
    causal: top-left aligned, as torch's ``is_causal``: query i sees keys 0..i.
    attn_mask: bool (True = attend) or additive (floating point, added to the scaled scores), any
        shape that broadcasts to (B, Hq, Lq, Lk); read tile by tile through stride-0 views, never
        expanded in memory. No gradient flows to it (a mask that requires grad is refused).
    dropout_p: dropout on the normalised probabilities, kept ones scaled by 1/(1-p), as torch's SDPA.
        The keep mask comes from Philox keyed by a seed drawn from torch's default generator of q's
        device (draw_dropout_seed); the backward regenerates it and nothing of size Lq x Lk is stored.
    window_size (left, right): query i sees keys j with i - left <= j <= i + right; -1 leaves that
        side unbounded. Key tiles outside the window are not visited. With causal=True the right
        bound is 0 (FlashAttention-2's rule), whatever ``right`` says.
    Rows that see no key (all masked, outside the window, or Lk == 0) give 0 and zero gradients,
    as torch's SDPA does for fully masked rows.
    """
    _check_inputs(q, k, v)
    window = _check_window(window_size)
    dropout_p = _check_dropout(dropout_p)
    if attn_mask is not None:
        _check_mask(attn_mask, q, k)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    return _FlashAttention.apply(q, k, v, bool(causal), scale, attn_mask, dropout_p, window)


# ---- packed variable-length batches (FlashAttention-2's varlen layout) ----

def _varlen_problem(q: Tensor, k: Tensor, cu_seqlens_q: Tensor, cu_seqlens_k: Tensor, max_seqlen_q: int,
                    max_seqlen_k: int, causal: bool, scale: float, window: tuple[int, int], dropout_p: float,
                    seed: Tensor | None) -> _Problem:
    return _Problem(cu_seqlens_q.shape[0] - 1, q.shape[1], k.shape[1], int(max_seqlen_q), int(max_seqlen_k),
                    q.shape[2], scale, _fold_causal(window, causal), None,
                    float(dropout_p) if seed is not None else 0.0, seed, cu_seqlens_q, cu_seqlens_k)


def varlen_forward(q: Tensor, k: Tensor, v: Tensor, cu_seqlens_q: Tensor, cu_seqlens_k: Tensor,
                   max_seqlen_q: int, max_seqlen_k: int, causal: bool, scale: float,
                   window: tuple[int, int] = (-1, -1), dropout_p: float = 0.0, seed: Tensor | None = None
                   ) -> tuple[Tensor, Tensor]:
    """(out (total_q, Hq, D), lse (Hq, total_q)) for packed sequences; rows no sequence covers are 0."""
    out = torch.zeros_like(q, memory_format=torch.contiguous_format)
    lse = torch.full((q.shape[1], q.shape[0]), float("-inf"), dtype=_stats_dtype(q.dtype), device=q.device)
    if out.numel() and cu_seqlens_q.shape[0] > 1 and max_seqlen_q > 0:
        _launch_forward(q, k, v, out, lse, _varlen_problem(q, k, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                                                           max_seqlen_k, causal, scale, window, dropout_p, seed))
    return out, lse


def varlen_backward(grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
                    cu_seqlens_q: Tensor, cu_seqlens_k: Tensor, max_seqlen_q: int, max_seqlen_k: int,
                    causal: bool, scale: float, window: tuple[int, int] = (-1, -1), dropout_p: float = 0.0,
                    seed: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """(dq, dk, dv) of varlen_forward; keys no query sees (and rows no sequence covers) get 0."""
    grads = tuple(torch.zeros_like(t, memory_format=torch.contiguous_format) for t in (q, k, v))
    if q.numel() and k.numel() and cu_seqlens_q.shape[0] > 1 and max_seqlen_q > 0 and max_seqlen_k > 0:
        _launch_backward(grad_out, q, k, v, out, lse, *grads,
                         _varlen_problem(q, k, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                                         causal, scale, window, dropout_p, seed))
    return grads


def _check_varlen(q: Tensor, k: Tensor, v: Tensor, cu_seqlens_q: Tensor, cu_seqlens_k: Tensor,
                  max_seqlen_q: int, max_seqlen_k: int) -> None:
    for name, tensor in (("q", q), ("k", k), ("v", v)):
        if not isinstance(tensor, Tensor) or tensor.dim() != 3:
            raise ValueError(f"flash_attention_varlen: {name} must be a 3-dimensional Tensor (total, heads, head dim), "
                             f"got {tuple(tensor.shape) if isinstance(tensor, Tensor) else type(tensor).__name__}")
    # The dense checks apply head for head: view as (1, H, total, D).
    _check_inputs(*(t.transpose(0, 1).unsqueeze(0) for t in (q, k, v)))
    for name, cu in (("cu_seqlens_q", cu_seqlens_q), ("cu_seqlens_k", cu_seqlens_k)):
        if not isinstance(cu, Tensor) or cu.dim() != 1 or cu.dtype not in (torch.int32, torch.int64) or cu.numel() < 1:
            raise ValueError(f"flash_attention_varlen: {name} must be a 1-dimensional int32 tensor of B+1 offsets")
        if cu.device != q.device:
            raise RuntimeError(f"flash_attention_varlen: {name} is on {cu.device} but q is on {q.device}")
    if cu_seqlens_q.shape != cu_seqlens_k.shape:
        raise ValueError(f"flash_attention_varlen: cu_seqlens_q ({cu_seqlens_q.numel()} offsets) and cu_seqlens_k "
                         f"({cu_seqlens_k.numel()}) must describe the same number of sequences")
    for name, value in (("max_seqlen_q", max_seqlen_q), ("max_seqlen_k", max_seqlen_k)):
        if int(value) < 0:
            raise ValueError(f"flash_attention_varlen: {name} must be >= 0, got {value}")
    if cu_seqlens_q.device.type == "cpu":  # cheap here; on a GPU it would cost a sync, so it is the caller's
        for name, cu, total, longest in (("cu_seqlens_q", cu_seqlens_q, q.shape[0], max_seqlen_q),
                                         ("cu_seqlens_k", cu_seqlens_k, k.shape[0], max_seqlen_k)):
            lengths = cu.diff()
            if cu[0] != 0 or (lengths < 0).any() or cu[-1] > total:
                raise ValueError(f"flash_attention_varlen: {name} must start at 0, not decrease, and end at most "
                                 f"at the {total} packed rows; got {cu.tolist()}")
            if lengths.numel() and lengths.max() > longest:
                raise ValueError(f"flash_attention_varlen: a sequence has {int(lengths.max())} rows, more than "
                                 f"{name.replace('cu_seqlens', 'max_seqlen')} = {longest}")


class _FlashAttentionVarlen(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal, scale, window,
                dropout_p):
        seed = draw_dropout_seed(q.device) if dropout_p > 0.0 else None
        out, lse = varlen_forward(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal, scale,
                                  window, dropout_p, seed)
        ctx.save_for_backward(q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, seed)
        ctx.args = (max_seqlen_q, max_seqlen_k, causal, scale, window, dropout_p)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, seed = ctx.saved_tensors
        max_seqlen_q, max_seqlen_k, causal, scale, window, dropout_p = ctx.args
        grads = varlen_backward(grad_out, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                                causal, scale, window, dropout_p, seed)
        return (*grads, *([None] * 8))


def flash_attention_varlen(q: Tensor, k: Tensor, v: Tensor, cu_seqlens_q: Tensor, cu_seqlens_k: Tensor,
                           max_seqlen_q: int, max_seqlen_k: int, *, causal: bool = False, scale: float | None = None,
                           window_size: tuple[int, int] = (-1, -1), dropout_p: float = 0.0) -> Tensor:
    """Attention over packed sequences (FlashAttention-2's flash_attn_varlen_func layout); differentiable in q, k, v.

    q (total_q, Hq, D), k and v (total_k, Hk, D), Hq % Hk == 0 (GQA). Sequence b is rows
    cu_seqlens_q[b]:cu_seqlens_q[b+1] of q and cu_seqlens_k[b]:cu_seqlens_k[b+1] of k and v
    (int32 offsets, B+1 of them, starting at 0); max_seqlen_q / max_seqlen_k bound the lengths
    (they size the grid: a longer sequence would be cut, so on the CPU it is refused).
    causal and window_size are aligned BOTTOM-RIGHT, as in FlashAttention-2 >= 2.1: query i of a
    sequence with Lq queries and Lk keys sees keys j with i + Lk - Lq - left <= j <= i + Lk - Lq + right
    (causal: right = 0). torch's ``is_causal`` is top-left; the two agree when Lq == Lk.
    Queries that see no key (a sequence of 0 keys, or the first Lq - Lk rows under causal) give 0.
    dropout_p: as in flash_attention; the keep mask of sequence b, head h, pair (i, j) is
    dropout_keep_mask(seed, B, Hq, max_seqlen_q, max_seqlen_k, p)[b, h, i, j].
    Returns out (total_q, Hq, D) in q's dtype.
    """
    _check_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k)
    window = _check_window(window_size)
    dropout_p = _check_dropout(dropout_p)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    cu_seqlens_q, cu_seqlens_k = cu_seqlens_q.to(torch.int32), cu_seqlens_k.to(torch.int32)
    return _FlashAttentionVarlen.apply(q, k, v, cu_seqlens_q, cu_seqlens_k, int(max_seqlen_q), int(max_seqlen_k),
                                       bool(causal), scale, window, dropout_p)
