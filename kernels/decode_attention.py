"""Decode-step attention in Triton (flash-decoding): one query token per (batch, head) against a KV cache.

    from genfast.kernels.decode_attention import decode_attention
    out = decode_attention(q, k_cache, v_cache, length, scale)   # q (B, Hq, D), caches (B, Hk, max_len, D|Dv)

``length`` is an int, or a one-element integer tensor on q's device that the kernels read from memory:
then no host value changes from one decode step to the next, so a CUDA graph can capture the call once
and replay it as the cache grows (genfast.generation.gpt2 does). Splits are then sized for max_len.

    out[b, h] = softmax(scale * K[b, g, :length] q[b, h]) V[b, g, :length],   g = h // (Hq // Hk)

The CUDA implementation of ``torch.ops.genfast.decode_attention`` (registered in
genfast/generation/ops/decode_attention.py); the CPU one is csrc/generation/decode_attention.cpp, with the same checks.

One query row per (batch, head) is too little work for one program when the context is long, so the
cache's first ``length`` rows are cut into ``num_splits`` chunks (Dao et al., "Flash-Decoding", 2023):

* split kernel, grid (B * Hq, num_splits): each program walks its chunk in tiles of BLOCK_N keys with
  the online softmax (running max, running sum, rescaled accumulator) and writes its normalised partial
  output and logsumexp (float32; float64 for float64 inputs).
* reduce kernel, grid (B * Hq,): out = sum_s exp(lse_s - max lse) o_s / sum_s exp(lse_s - max lse).

With one split the split kernel writes the final output itself and the reduce kernel is not launched.
num_splits grows with the length until the grid has ~2 programs per SM, each chunk >= 256 keys.

Products are elementwise multiplies and tl.sum (no tl.dot: one query row is below its 16-row minimum),
so float32 inputs are computed in IEEE float32, never TF32; half inputs are upcast and accumulated in
float32. Head dims up to 256, any value (tiles padded to a power of two and masked); any length >= 1.
Each query head reads its K/V rows itself: with GQA the group's heads share them through L2 only.
"""
from __future__ import annotations

import math
import os
import struct

import torch
import triton
import triton.language as tl
from torch import Tensor

__all__ = ["decode_attention", "MAX_HEAD_DIM", "num_splits_for"]

MAX_HEAD_DIM = 256
_INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") == "1"
_MIN_KEYS_PER_SPLIT = 256
_MAX_SPLITS = 128
_PROGRAMS_PER_SM = 2
_SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


@triton.jit(do_not_specialize=["length", "max_len", "chunk_len", "scale_bits"])
def _decode_attention_split_kernel(
    q_ptr, k_ptr, v_ptr, out_ptr, partial_out_ptr, partial_lse_ptr, length_ptr,
    stride_qb, stride_qh, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_ob, stride_oh, stride_od,
    num_q_heads, group_size, length, max_len, chunk_len, head_dim, head_dim_v, scale_bits,
    ACC_DTYPE: tl.constexpr, SINGLE_SPLIT: tl.constexpr, LENGTH_IN_MEMORY: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
):
    batch_head = tl.program_id(0)
    split = tl.program_id(1)
    num_splits = tl.num_programs(1)
    batch = batch_head // num_q_heads
    q_head = batch_head % num_q_heads
    kv_head = q_head // group_size
    # The scale arrives as a float64 bit pattern (Triton passes Python floats as float32).
    scale = scale_bits.to(tl.int64).to(tl.float64, bitcast=True).to(ACC_DTYPE)

    dims = tl.arange(0, BLOCK_D)
    dims_v = tl.arange(0, BLOCK_DV)
    dim_valid = dims < head_dim
    dim_v_valid = dims_v < head_dim_v
    q = tl.load(q_ptr + batch.to(tl.int64) * stride_qb + q_head.to(tl.int64) * stride_qh + dims * stride_qd,
                mask=dim_valid, other=0.0).to(ACC_DTYPE)
    k_base = k_ptr + batch.to(tl.int64) * stride_kb + kv_head.to(tl.int64) * stride_kh
    v_base = v_ptr + batch.to(tl.int64) * stride_vb + kv_head.to(tl.int64) * stride_vh

    if LENGTH_IN_MEMORY:
        # Clamped, because no host check saw this value: out-of-range lengths must not read past the cache.
        length = tl.minimum(tl.maximum(tl.load(length_ptr).to(tl.int32), 1), max_len)
    # This program's keys: [key_begin, key_end). Never empty when the launcher knows the length; with a
    # length in memory the splits cover max_len, and chunks past the length write no weight (below).
    key_begin = split * chunk_len
    key_end = tl.minimum(key_begin + chunk_len, length)
    running_max = tl.full([], float("-inf"), ACC_DTYPE)
    running_sum = tl.zeros([], ACC_DTYPE)
    acc = tl.zeros([BLOCK_DV], ACC_DTYPE)
    for tile_start in range(key_begin, key_end, BLOCK_N):
        keys = tile_start + tl.arange(0, BLOCK_N)
        key_valid = keys < key_end
        k = tl.load(k_base + keys.to(tl.int64)[:, None] * stride_kn + dims[None, :] * stride_kd,
                    mask=key_valid[:, None] & dim_valid[None, :], other=0.0).to(ACC_DTYPE)
        scores = tl.sum(k * q[None, :], 1) * scale
        scores = tl.where(key_valid, scores, float("-inf"))
        # Every tile holds >= 1 valid key, so new_max is finite and exp(-inf - new_max) = 0 on the first.
        new_max = tl.maximum(running_max, tl.max(scores, 0))
        probs = tl.exp(scores - new_max)
        rescale = tl.exp(running_max - new_max)
        v = tl.load(v_base + keys.to(tl.int64)[:, None] * stride_vn + dims_v[None, :] * stride_vd,
                    mask=key_valid[:, None] & dim_v_valid[None, :], other=0.0).to(ACC_DTYPE)
        running_sum = running_sum * rescale + tl.sum(probs, 0)
        acc = acc * rescale + tl.sum(probs[:, None] * v, 0)
        running_max = new_max

    # An empty chunk (key_begin >= length, only with LENGTH_IN_MEMORY; never chunk 0) has running_sum 0:
    # its partial output is written as 0 and its logsumexp as -inf, a weight of exactly 0 in the reduce.
    out = acc / tl.where(running_sum > 0, running_sum, 1.0)
    if SINGLE_SPLIT:
        tl.store(out_ptr + batch.to(tl.int64) * stride_ob + q_head.to(tl.int64) * stride_oh + dims_v * stride_od,
                 out.to(out_ptr.dtype.element_ty), mask=dim_v_valid)
    else:
        slot = batch_head.to(tl.int64) * num_splits + split
        tl.store(partial_out_ptr + slot * head_dim_v + dims_v, out, mask=dim_v_valid)
        has_keys = running_sum > 0
        lse = running_max + tl.log(tl.where(has_keys, running_sum, 1.0))
        tl.store(partial_lse_ptr + slot, tl.where(has_keys, lse, float("-inf")))


@triton.jit
def _decode_attention_reduce_kernel(
    partial_out_ptr, partial_lse_ptr, out_ptr,
    stride_ob, stride_oh, stride_od,
    num_q_heads, num_splits, head_dim_v,
    ACC_DTYPE: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_DV: tl.constexpr,
):
    batch_head = tl.program_id(0)
    batch = batch_head // num_q_heads
    q_head = batch_head % num_q_heads
    splits = tl.arange(0, BLOCK_S)
    dims_v = tl.arange(0, BLOCK_DV)
    split_valid = splits < num_splits
    dim_v_valid = dims_v < head_dim_v
    slots = batch_head.to(tl.int64) * num_splits + splits
    lse = tl.load(partial_lse_ptr + slots, mask=split_valid, other=float("-inf"))
    weights = tl.exp(lse - tl.max(lse, 0))  # every real split has a finite lse; padding gets 0
    partial = tl.load(partial_out_ptr + slots[:, None] * head_dim_v + dims_v[None, :],
                      mask=split_valid[:, None] & dim_v_valid[None, :], other=0.0)
    out = tl.sum(weights[:, None] * partial, 0) / tl.sum(weights, 0)
    tl.store(out_ptr + batch.to(tl.int64) * stride_ob + q_head.to(tl.int64) * stride_oh + dims_v * stride_od,
             out.to(out_ptr.dtype.element_ty), mask=dim_v_valid)


# --------------------------------------------------------------------------------------------------
# Launcher (torch-side; the kernels above know nothing of torch)
# --------------------------------------------------------------------------------------------------

_sm_counts: dict[int, int] = {}


def _multiprocessors(device: torch.device) -> int:
    if device.type != "cuda":
        return 8  # the interpreter on the CPU: any fixed value, so that long inputs still split
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _sm_counts:
        _sm_counts[index] = torch.cuda.get_device_properties(index).multi_processor_count
    return _sm_counts[index]


def num_splits_for(rows: int, length: int, device: torch.device) -> int:
    """Chunks per (batch, head): enough for ~2 programs per SM, each chunk >= 256 keys (1 when short)."""
    wanted = math.ceil(_PROGRAMS_PER_SM * _multiprocessors(device) / max(rows, 1))
    return max(1, min(wanted, length // _MIN_KEYS_PER_SPLIT, _MAX_SPLITS))


def _block_n(block_d: int) -> int:
    if _INTERPRETED:
        return 16
    return 64 if block_d <= 64 else 32  # keeps the BLOCK_N x BLOCK_D tile at <= 64 fp32 values a thread


def _check(q: Tensor, k_cache: Tensor, v_cache: Tensor, length: int | Tensor) -> None:
    # The C++ op's checks and messages (csrc/generation/decode_attention.cpp), minus the device, plus the head dim.
    op = "decode_attention"
    if q.dim() != 3:
        raise RuntimeError(f"{op}: q must be (batch, heads, dim), got {q.dim()} dims")
    if k_cache.dim() != 4:
        raise RuntimeError(f"{op}: k_cache must be (batch, heads_kv, max_len, dim), got {k_cache.dim()} dims")
    if v_cache.dim() != 4:
        raise RuntimeError(f"{op}: v_cache must be (batch, heads_kv, max_len, dim_v), got {v_cache.dim()} dims")
    if not (q.device == k_cache.device == v_cache.device):
        raise RuntimeError(f"{op}: q, k_cache and v_cache must be on one device, got {q.device}, "
                           f"{k_cache.device} and {v_cache.device}")
    if q.dtype not in _SUPPORTED_DTYPES:
        raise RuntimeError(f"{op}: q must be float16, bfloat16, float32 or float64, got {q.dtype}")
    if k_cache.dtype != q.dtype or v_cache.dtype != q.dtype:
        raise RuntimeError(f"{op}: q, k_cache and v_cache must share a dtype, got {q.dtype}, {k_cache.dtype} "
                           f"and {v_cache.dtype}")
    batch, heads_q, dim = q.shape
    _, heads_kv, max_len, _ = k_cache.shape
    if k_cache.shape[0] != batch or v_cache.shape[0] != batch:
        raise RuntimeError(f"{op}: batch of q ({batch}), k_cache ({k_cache.shape[0]}) and v_cache "
                           f"({v_cache.shape[0]}) differ")
    if v_cache.shape[1] != heads_kv or v_cache.shape[2] != max_len:
        raise RuntimeError(f"{op}: k_cache and v_cache must have the same heads and max_len, got "
                           f"{list(k_cache.shape)} and {list(v_cache.shape)}")
    if heads_kv <= 0 or heads_q % heads_kv != 0:
        raise RuntimeError(f"{op}: heads of q ({heads_q}) must be a multiple of the heads of the cache "
                           f"({heads_kv})")
    if k_cache.shape[3] != dim:
        raise RuntimeError(f"{op}: head dim of q ({dim}) and k_cache ({k_cache.shape[3]}) differ")
    if isinstance(length, Tensor):
        if length.numel() != 1 or length.dtype not in (torch.int32, torch.int64) or length.device != q.device:
            raise RuntimeError(f"{op}: a length tensor must hold one int32/int64 value on {q.device}, got "
                               f"{length.dtype} {tuple(length.shape)} on {length.device}")
    elif not 1 <= length <= max_len:
        raise RuntimeError(f"{op}: length must be in [1, max_len={max_len}], got {length}")
    if k_cache.stride(3) != 1 or v_cache.stride(3) != 1:
        raise RuntimeError(f"{op}: k_cache and v_cache must be contiguous in their last dim")
    if dim > MAX_HEAD_DIM or v_cache.shape[3] > MAX_HEAD_DIM:
        raise RuntimeError(f"{op}: head dims up to {MAX_HEAD_DIM} are supported, got {dim} and "
                           f"{v_cache.shape[3]}")


def decode_attention(q: Tensor, k_cache: Tensor, v_cache: Tensor, length: int | Tensor, scale: float, *,
                     num_splits: int | None = None) -> Tensor:
    """softmax(scale * K[:length] q) V[:length] for q (B, Hq, D), caches (B, Hk, max_len, D|Dv) -> (B, Hq, Dv).

    ``length``: an int in [1, max_len], or a one-element int32/int64 tensor on q's device, read by the
    kernels (never by the host: values outside [1, max_len] are clamped into it).
    ``num_splits`` overrides the heuristic (tests use it to force many chunks on short inputs); it is
    capped so that no chunk is empty (with a length tensor: so that chunk 0 is not).
    """
    length_in_memory = isinstance(length, Tensor)
    if not length_in_memory:
        length = int(length)
    _check(q, k_cache, v_cache, length)
    batch, heads_q, dim = q.shape
    heads_kv, dim_v = k_cache.shape[1], v_cache.shape[3]
    out = torch.empty((batch, heads_q, dim_v), dtype=q.dtype, device=q.device)
    if batch * heads_q == 0 or dim_v == 0:
        return out
    rows = batch * heads_q
    wide = q.dtype == torch.float64
    acc_dtype = tl.float64 if wide else tl.float32
    block_d = max(16, triton.next_power_of_2(dim))
    block_dv = max(16, triton.next_power_of_2(dim_v))
    block_n = _block_n(max(block_d, block_dv))

    max_len = k_cache.shape[2]
    split_over = max_len if length_in_memory else length  # the keys the chunks must cover
    splits = num_splits_for(rows, split_over, q.device) if num_splits is None else max(1, int(num_splits))
    # Chunks are whole tiles, and the count is recomputed so that none is empty.
    chunk_len = triton.cdiv(triton.cdiv(split_over, min(splits, split_over)), block_n) * block_n
    splits = triton.cdiv(split_over, chunk_len)
    if splits > 1:
        partial_out = torch.empty((rows, splits, dim_v), dtype=torch.float64 if wide else torch.float32,
                                  device=q.device)
        partial_lse = torch.empty((rows, splits), dtype=partial_out.dtype, device=q.device)
    else:
        partial_out = partial_lse = out  # unused: the split kernel writes out itself
    scale_bits = struct.unpack("<q", struct.pack("<d", float(scale)))[0]

    _decode_attention_split_kernel[(rows, splits)](
        q, k_cache, v_cache, out, partial_out, partial_lse, length if length_in_memory else out,
        *q.stride(), *k_cache.stride(), *v_cache.stride(), *out.stride(),
        heads_q, heads_q // heads_kv, 0 if length_in_memory else length, max_len, chunk_len, dim, dim_v,
        scale_bits, ACC_DTYPE=acc_dtype, SINGLE_SPLIT=splits == 1, LENGTH_IN_MEMORY=length_in_memory,
        BLOCK_N=block_n, BLOCK_D=block_d, BLOCK_DV=block_dv, num_warps=4)
    if splits > 1:
        _decode_attention_reduce_kernel[(rows,)](
            partial_out, partial_lse, out, *out.stride(), heads_q, splits, dim_v,
            ACC_DTYPE=acc_dtype, BLOCK_S=max(2, triton.next_power_of_2(splits)), BLOCK_DV=block_dv, num_warps=4)
    return out
