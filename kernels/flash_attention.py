"""FlashAttention-2 in Triton: forward and backward kernels and their launchers.

    from genfast.kernels import flash_attention as fa
    out, lse = fa.forward(q, k, v, causal=True, scale=0.125)          # (B, H, N, D), lse (B, H, N)
    dq, dk, dv = fa.backward(grad_out, q, k, v, out, lse, causal=True, scale=0.125)

These are the CUDA kernels of ``torch.ops.genfast.attention_forward`` / ``attention_backward``,
registered in genfast/ops/attention.py; the op's autograd (csrc/attention_autograd.cpp) is the
one that pairs them. Differentiable use goes through the op (genfast.ops.attention.attention_forward,
or genfast.nn.functional.scaled_dot_product_attention on CUDA tensors).

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
  (The FlashAttention-2 library aligns bottom-right when Lq != Lk; this op does not.) With top-left
  alignment every query row sees key 0, so no row is fully masked unless Lk == 0; then the output is
  zeros and so are the gradients, as torch gives.
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

import torch
import triton
import triton.language as tl
from torch import Tensor

__all__ = ["forward", "backward", "MAX_HEAD_DIM"]

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

# Keyed on the padded head dim, causality and both lengths (the tutorial keys on the length too).
_AUTOTUNE_KEY = ["seqlen_q", "seqlen_k", "BLOCK_D", "IS_CAUSAL"]


# --------------------------------------------------------------------------------------------------
# Forward
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


@triton.autotune(configs=_CONFIGS, key=_AUTOTUNE_KEY, prune_configs_by=_PRUNE)
@triton.jit
def _flash_attention_forward_kernel(
    q_ptr, k_ptr, v_ptr, out_ptr, lse_ptr,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_ob, stride_oh, stride_om, stride_od,
    num_q_heads, seqlen_q, seqlen_k, head_dim, qk_scale_log2,
    GROUP_SIZE: tl.constexpr,
    IS_CAUSAL: tl.constexpr,
    BLOCK_D: tl.constexpr,
    ACC_DTYPE: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    UPCAST_BF16: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
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
    lse_ptr += batch_head.to(tl.int64) * seqlen_q

    rows = block_m * BLOCK_M + tl.arange(0, BLOCK_M)
    dims = tl.arange(0, BLOCK_D)
    row_valid = rows < seqlen_q
    dim_valid = dims < head_dim

    q = tl.load(q_ptr + rows[:, None] * stride_qm + dims[None, :] * stride_qd,
                mask=row_valid[:, None] & dim_valid[None, :], other=0.0)

    row_max = tl.full([BLOCK_M], float("-inf"), dtype=ACC_DTYPE)
    row_sum = tl.zeros([BLOCK_M], dtype=ACC_DTYPE)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=ACC_DTYPE)

    # Top-left causal: the last row of this block sees keys up to its own index.
    key_end = seqlen_k
    if IS_CAUSAL:
        key_end = tl.minimum(seqlen_k, (block_m + 1) * BLOCK_M)

    for key_start in range(0, key_end, BLOCK_N):
        cols = key_start + tl.arange(0, BLOCK_N)
        col_valid = cols < seqlen_k
        kv_mask = col_valid[:, None] & dim_valid[None, :]
        k = tl.load(k_ptr + cols[:, None] * stride_kn + dims[None, :] * stride_kd, mask=kv_mask, other=0.0)
        v = tl.load(v_ptr + cols[:, None] * stride_vn + dims[None, :] * stride_vd, mask=kv_mask, other=0.0)

        scores = _dot(q, tl.trans(k), None, ACC_DTYPE, DOT_PRECISION, UPCAST_BF16) * qk_scale_log2
        visible = col_valid[None, :]
        if IS_CAUSAL:
            visible = visible & (cols[None, :] <= rows[:, None])
        scores = tl.where(visible, scores, float("-inf"))

        new_max = tl.maximum(row_max, tl.max(scores, 1))
        # A row that has seen no visible key yet keeps max -inf; subtract 0 instead so that
        # exp2(-inf - -inf) never makes a NaN.
        safe_max = tl.where(new_max == float("-inf"), 0.0, new_max)
        probs = tl.exp2(scores - safe_max[:, None])
        rescale = tl.exp2(row_max - safe_max)
        row_sum = row_sum * rescale + tl.sum(probs, 1)
        acc = acc * rescale[:, None]
        acc = _dot(probs.to(v.dtype), v, acc, ACC_DTYPE, DOT_PRECISION, UPCAST_BF16)
        row_max = new_max

    # Rows with no visible key (only when Lk == 0) have row_sum == 0: output zeros, lse = -inf.
    empty = row_sum == 0.0
    out = acc / tl.where(empty, 1.0, row_sum)[:, None]
    lse = tl.where(empty, float("-inf"), (row_max + tl.log2(tl.where(empty, 1.0, row_sum))) / 1.4426950408889634)
    tl.store(out_ptr + rows[:, None] * stride_om + dims[None, :] * stride_od, out.to(out_ptr.dtype.element_ty),
             mask=row_valid[:, None] & dim_valid[None, :])
    tl.store(lse_ptr + rows, lse.to(lse_ptr.dtype.element_ty), mask=row_valid)


# --------------------------------------------------------------------------------------------------
# Backward
# --------------------------------------------------------------------------------------------------

@triton.jit
def _flash_attention_backward_preprocess_kernel(
    out_ptr, grad_out_ptr, delta_ptr,
    stride_ob, stride_oh, stride_om, stride_od,
    stride_gb, stride_gh, stride_gm, stride_gd,
    num_q_heads, seqlen_q, head_dim,
    BLOCK_D: tl.constexpr,
    ACC_DTYPE: tl.constexpr,
    BLOCK_M: tl.constexpr,
):
    """delta_i = sum_d dO_id * O_id: the row term of the softmax gradient, dS = P * (dP - delta)."""
    block_m = tl.program_id(0)
    batch_head = tl.program_id(1)
    batch = batch_head // num_q_heads
    head = batch_head % num_q_heads
    rows = block_m * BLOCK_M + tl.arange(0, BLOCK_M)
    dims = tl.arange(0, BLOCK_D)
    mask = (rows < seqlen_q)[:, None] & (dims < head_dim)[None, :]
    out = tl.load(out_ptr + batch.to(tl.int64) * stride_ob + head.to(tl.int64) * stride_oh
                  + rows[:, None] * stride_om + dims[None, :] * stride_od, mask=mask, other=0.0)
    grad_out = tl.load(grad_out_ptr + batch.to(tl.int64) * stride_gb + head.to(tl.int64) * stride_gh
                       + rows[:, None] * stride_gm + dims[None, :] * stride_gd, mask=mask, other=0.0)
    delta = tl.sum(out.to(ACC_DTYPE) * grad_out.to(ACC_DTYPE), 1)
    tl.store(delta_ptr + batch_head.to(tl.int64) * seqlen_q + rows, delta, mask=rows < seqlen_q)


@triton.autotune(configs=_CONFIGS, key=_AUTOTUNE_KEY, prune_configs_by=_PRUNE)
@triton.jit
def _flash_attention_backward_dkdv_kernel(
    q_ptr, k_ptr, v_ptr, grad_out_ptr, lse_ptr, delta_ptr, grad_k_ptr, grad_v_ptr,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_gb, stride_gh, stride_gm, stride_gd,
    stride_dkb, stride_dkh, stride_dkn, stride_dkd,
    stride_dvb, stride_dvh, stride_dvn, stride_dvd,
    num_q_heads, num_kv_heads, seqlen_q, seqlen_k, head_dim, scale, qk_scale_log2,
    GROUP_SIZE: tl.constexpr,
    IS_CAUSAL: tl.constexpr,
    BLOCK_D: tl.constexpr,
    ACC_DTYPE: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    UPCAST_BF16: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """One block of keys of one K/V head; walks every query block of every query head in its group."""
    if ACC_DTYPE == tl.float32:  # see the forward kernel
        scale, qk_scale_log2 = tl.cast(scale, tl.float32), tl.cast(qk_scale_log2, tl.float32)
    block_n = tl.program_id(0)
    batch_head = tl.program_id(1)
    batch = batch_head // num_kv_heads
    kv_head = batch_head % num_kv_heads

    cols = block_n * BLOCK_N + tl.arange(0, BLOCK_N)
    dims = tl.arange(0, BLOCK_D)
    col_valid = cols < seqlen_k
    dim_valid = dims < head_dim
    kv_mask = col_valid[:, None] & dim_valid[None, :]

    k = tl.load(k_ptr + batch.to(tl.int64) * stride_kb + kv_head.to(tl.int64) * stride_kh
                + cols[:, None] * stride_kn + dims[None, :] * stride_kd, mask=kv_mask, other=0.0)
    v = tl.load(v_ptr + batch.to(tl.int64) * stride_vb + kv_head.to(tl.int64) * stride_vh
                + cols[:, None] * stride_vn + dims[None, :] * stride_vd, mask=kv_mask, other=0.0)

    grad_k = tl.zeros([BLOCK_N, BLOCK_D], dtype=ACC_DTYPE)
    grad_v = tl.zeros([BLOCK_N, BLOCK_D], dtype=ACC_DTYPE)

    # Top-left causal: query rows before this block's first key see none of it.
    query_begin = 0
    if IS_CAUSAL:
        query_begin = (block_n * BLOCK_N // BLOCK_M) * BLOCK_M

    for group_member in range(GROUP_SIZE):
        q_head = kv_head * GROUP_SIZE + group_member
        q_base = q_ptr + batch.to(tl.int64) * stride_qb + q_head.to(tl.int64) * stride_qh
        g_base = grad_out_ptr + batch.to(tl.int64) * stride_gb + q_head.to(tl.int64) * stride_gh
        row_stats = (batch.to(tl.int64) * num_q_heads + q_head) * seqlen_q
        for query_start in range(query_begin, seqlen_q, BLOCK_M):
            rows = query_start + tl.arange(0, BLOCK_M)
            row_valid = rows < seqlen_q
            q_mask = row_valid[:, None] & dim_valid[None, :]
            q = tl.load(q_base + rows[:, None] * stride_qm + dims[None, :] * stride_qd, mask=q_mask, other=0.0)
            grad_out = tl.load(g_base + rows[:, None] * stride_gm + dims[None, :] * stride_gd,
                               mask=q_mask, other=0.0)
            lse = tl.load(lse_ptr + row_stats + rows, mask=row_valid, other=0.0)
            delta = tl.load(delta_ptr + row_stats + rows, mask=row_valid, other=0.0)

            # Transposed tile (keys x queries) so that dV += P^T dO and dK += dS^T Q need no transpose.
            scores_t = _dot(k, tl.trans(q), None, ACC_DTYPE, DOT_PRECISION, UPCAST_BF16)
            probs_t = tl.exp2(scores_t * qk_scale_log2 - (lse * 1.4426950408889634)[None, :])
            visible = col_valid[:, None] & row_valid[None, :]
            if IS_CAUSAL:
                visible = visible & (cols[:, None] <= rows[None, :])
            probs_t = tl.where(visible, probs_t, 0.0)

            grad_v = _dot(probs_t.to(grad_out.dtype), grad_out, grad_v, ACC_DTYPE, DOT_PRECISION, UPCAST_BF16)
            grad_probs_t = _dot(v, tl.trans(grad_out), None, ACC_DTYPE, DOT_PRECISION, UPCAST_BF16)
            grad_scores_t = probs_t * (grad_probs_t - delta[None, :])
            grad_k = _dot(grad_scores_t.to(q.dtype), q, grad_k, ACC_DTYPE, DOT_PRECISION, UPCAST_BF16)

    grad_k = grad_k * scale
    tl.store(grad_k_ptr + batch.to(tl.int64) * stride_dkb + kv_head.to(tl.int64) * stride_dkh
             + cols[:, None] * stride_dkn + dims[None, :] * stride_dkd,
             grad_k.to(grad_k_ptr.dtype.element_ty), mask=kv_mask)
    tl.store(grad_v_ptr + batch.to(tl.int64) * stride_dvb + kv_head.to(tl.int64) * stride_dvh
             + cols[:, None] * stride_dvn + dims[None, :] * stride_dvd,
             grad_v.to(grad_v_ptr.dtype.element_ty), mask=kv_mask)


@triton.autotune(configs=_CONFIGS, key=_AUTOTUNE_KEY, prune_configs_by=_PRUNE)
@triton.jit
def _flash_attention_backward_dq_kernel(
    q_ptr, k_ptr, v_ptr, grad_out_ptr, lse_ptr, delta_ptr, grad_q_ptr,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_gb, stride_gh, stride_gm, stride_gd,
    stride_dqb, stride_dqh, stride_dqm, stride_dqd,
    num_q_heads, seqlen_q, seqlen_k, head_dim, scale, qk_scale_log2,
    GROUP_SIZE: tl.constexpr,
    IS_CAUSAL: tl.constexpr,
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

    rows = block_m * BLOCK_M + tl.arange(0, BLOCK_M)
    dims = tl.arange(0, BLOCK_D)
    row_valid = rows < seqlen_q
    dim_valid = dims < head_dim
    q_mask = row_valid[:, None] & dim_valid[None, :]

    q = tl.load(q_ptr + batch.to(tl.int64) * stride_qb + q_head.to(tl.int64) * stride_qh
                + rows[:, None] * stride_qm + dims[None, :] * stride_qd, mask=q_mask, other=0.0)
    grad_out = tl.load(grad_out_ptr + batch.to(tl.int64) * stride_gb + q_head.to(tl.int64) * stride_gh
                       + rows[:, None] * stride_gm + dims[None, :] * stride_gd, mask=q_mask, other=0.0)
    lse = tl.load(lse_ptr + batch_head.to(tl.int64) * seqlen_q + rows, mask=row_valid, other=0.0)
    delta = tl.load(delta_ptr + batch_head.to(tl.int64) * seqlen_q + rows, mask=row_valid, other=0.0)
    lse_log2 = lse * 1.4426950408889634

    k_base = k_ptr + batch.to(tl.int64) * stride_kb + kv_head.to(tl.int64) * stride_kh
    v_base = v_ptr + batch.to(tl.int64) * stride_vb + kv_head.to(tl.int64) * stride_vh
    grad_q = tl.zeros([BLOCK_M, BLOCK_D], dtype=ACC_DTYPE)

    key_end = seqlen_k
    if IS_CAUSAL:
        key_end = tl.minimum(seqlen_k, (block_m + 1) * BLOCK_M)

    for key_start in range(0, key_end, BLOCK_N):
        cols = key_start + tl.arange(0, BLOCK_N)
        col_valid = cols < seqlen_k
        kv_mask = col_valid[:, None] & dim_valid[None, :]
        k = tl.load(k_base + cols[:, None] * stride_kn + dims[None, :] * stride_kd, mask=kv_mask, other=0.0)
        v = tl.load(v_base + cols[:, None] * stride_vn + dims[None, :] * stride_vd, mask=kv_mask, other=0.0)

        scores = _dot(q, tl.trans(k), None, ACC_DTYPE, DOT_PRECISION, UPCAST_BF16)
        probs = tl.exp2(scores * qk_scale_log2 - lse_log2[:, None])
        visible = row_valid[:, None] & col_valid[None, :]
        if IS_CAUSAL:
            visible = visible & (cols[None, :] <= rows[:, None])
        probs = tl.where(visible, probs, 0.0)

        grad_probs = _dot(grad_out, tl.trans(v), None, ACC_DTYPE, DOT_PRECISION, UPCAST_BF16)
        grad_scores = probs * (grad_probs - delta[:, None])
        grad_q = _dot(grad_scores.to(k.dtype), k, grad_q, ACC_DTYPE, DOT_PRECISION, UPCAST_BF16)

    grad_q = grad_q * scale
    tl.store(grad_q_ptr + batch.to(tl.int64) * stride_dqb + q_head.to(tl.int64) * stride_dqh
             + rows[:, None] * stride_dqm + dims[None, :] * stride_dqd,
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


def _flash_attention_forward(q: Tensor, k: Tensor, v: Tensor, causal: bool, scale: float) -> tuple[Tensor, Tensor]:
    """(out (B, Hq, Lq, D) in q's dtype, lse (B, Hq, Lq): natural-log logsumexp of the scaled scores,
    float32 (float64 for float64 inputs); -inf for rows that see no key)."""
    batch, num_q_heads, seqlen_q, head_dim = q.shape
    num_kv_heads, seqlen_k = k.shape[1], k.shape[2]
    out, lse = _forward_outputs(q)
    if out.numel() == 0:
        return out, lse

    def grid(meta):
        return (triton.cdiv(seqlen_q, meta["BLOCK_M"]), batch * num_q_heads)

    _flash_attention_forward_kernel[grid](
        q, k, v, out, lse,
        *q.stride(), *k.stride(), *v.stride(), *out.stride(),
        num_q_heads, seqlen_q, seqlen_k, head_dim, scale * _LOG2E,
        GROUP_SIZE=num_q_heads // num_kv_heads,
        IS_CAUSAL=causal,
        BLOCK_D=_block_d(head_dim),
        ACC_DTYPE=_acc_dtype(q.dtype),
        DOT_PRECISION=_dot_precision(q.dtype),
        UPCAST_BF16=_upcast_bf16(q.dtype),
    )
    return out, lse


def _flash_attention_backward(grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
                              causal: bool, scale: float) -> tuple[Tensor, Tensor, Tensor]:
    """(dq, dk, dv) for _flash_attention_forward, recomputing the probabilities from lse."""
    batch, num_q_heads, seqlen_q, head_dim = q.shape
    num_kv_heads, seqlen_k = k.shape[1], k.shape[2]
    grad_q, grad_k, grad_v = _backward_outputs(q, k, v)
    if seqlen_q == 0 or seqlen_k == 0 or batch == 0 or num_q_heads == 0:
        # No query sees any key: every gradient is an empty sum.
        return grad_q.zero_(), grad_k.zero_(), grad_v.zero_()

    block_d = _block_d(head_dim)
    acc_dtype = _acc_dtype(q.dtype)
    delta = torch.empty_like(lse)
    preprocess_block_m = 16 if _INTERPRETED else 64
    _flash_attention_backward_preprocess_kernel[(triton.cdiv(seqlen_q, preprocess_block_m), batch * num_q_heads)](
        out, grad_out, delta,
        *out.stride(), *grad_out.stride(),
        num_q_heads, seqlen_q, head_dim,
        BLOCK_D=block_d, ACC_DTYPE=acc_dtype, BLOCK_M=preprocess_block_m,
    )

    common = dict(GROUP_SIZE=num_q_heads // num_kv_heads, IS_CAUSAL=causal, BLOCK_D=block_d,
                  ACC_DTYPE=acc_dtype, DOT_PRECISION=_dot_precision(q.dtype),
                  UPCAST_BF16=_upcast_bf16(q.dtype))

    def dkdv_grid(meta):
        return (triton.cdiv(seqlen_k, meta["BLOCK_N"]), batch * num_kv_heads)

    _flash_attention_backward_dkdv_kernel[dkdv_grid](
        q, k, v, grad_out, lse, delta, grad_k, grad_v,
        *q.stride(), *k.stride(), *v.stride(), *grad_out.stride(), *grad_k.stride(), *grad_v.stride(),
        num_q_heads, num_kv_heads, seqlen_q, seqlen_k, head_dim, scale, scale * _LOG2E,
        **common,
    )

    def dq_grid(meta):
        return (triton.cdiv(seqlen_q, meta["BLOCK_M"]), batch * num_q_heads)

    _flash_attention_backward_dq_kernel[dq_grid](
        q, k, v, grad_out, lse, delta, grad_q,
        *q.stride(), *k.stride(), *v.stride(), *grad_out.stride(), *grad_q.stride(),
        num_q_heads, seqlen_q, seqlen_k, head_dim, scale, scale * _LOG2E,
        **common,
    )
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


def forward(q: Tensor, k: Tensor, v: Tensor, causal: bool = False, scale: float | None = None
            ) -> tuple[Tensor, Tensor]:
    """softmax(q k^T * scale [+ causal mask]) v without materialising the score matrix, and its row logsumexp.

    q: (B, Hq, Lq, D); k, v: (B, Hk, Lk, D) with Hq % Hk == 0 (GQA/MQA when Hk < Hq).
    causal: top-left aligned, as torch's ``is_causal`` (query i sees keys 0..i).
    scale: defaults to 1/sqrt(D).
    Returns out (B, Hq, Lq, D) in q's dtype and lse (B, Hq, Lq): the natural-log logsumexp of the
    scaled scores, float32 (float64 for float64 inputs), -inf for rows that see no key.
    """
    _check_inputs(q, k, v)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    return _flash_attention_forward(q, k, v, bool(causal), scale)


def backward(grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, causal: bool = False,
             scale: float | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """(dq, dk, dv) of forward's output for grad_out (B, Hq, Lq, D), recomputing the probabilities from lse.

    Deterministic: every gradient element is written by one program, with no atomics.
    """
    _check_inputs(q, k, v)
    if grad_out.shape != out.shape or out.shape != q.shape or lse.shape != q.shape[:3]:
        raise ValueError(f"flash_attention backward: grad_out {tuple(grad_out.shape)} and out {tuple(out.shape)} "
                         f"must have q's shape {tuple(q.shape)}, lse {tuple(lse.shape)} must be {tuple(q.shape[:3])}")
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    return _flash_attention_backward(grad_out, q, k, v, out, lse, bool(causal), scale)
