"""Fused logits processing and sampling in Triton: temperature, top-k, top-p and the draw,
one program per row, without sorting the vocabulary.

    from genfast.kernels.sampling import sampling_filter, sampling_draw

The CUDA implementation of ``torch.ops.genfast.sampling_filter`` / ``sampling_draw`` (registered in
genfast/generation/ops/sampling.py); the CPU one is csrc/generation/sampling.cpp, and this file reproduces its
semantics, which are Hugging Face's (genfast.reference.process_logits / draw_from_scores):

    x      = logits / temperature, in float32 (float64 for float64 logits)
    top-k  keep x >= the k-th largest x (ties at the k-th value kept); 0 or k >= vocab: off
    top-p  over the top-k survivors in descending (value, then index) order, keep a token while
           the probability mass strictly before it is < top_p * total; the largest is always kept.
           Masses are exp(x - max) summed in float64, as the C++ op does.
    draw   inverse CDF over the kept tokens in vocabulary order at the caller's uniform u in [0, 1):
           the first kept token whose running mass (float32 weights, float64 sums) exceeds u * total,
           else the last kept token.

How, without a sort: every float maps to an unsigned integer key with the same order (flip the sign
bit of positives, every bit of negatives; -0.0 is first made +0.0 so that it ties with +0.0).

* top-k: the k-th largest key is the largest t with count(key >= t) >= k. It is found one 4-bit digit
  at a time from the top: each pass over the row counts the keys >= each of the 16 candidates for the
  next digit, so 32-bit keys take 8 passes (64-bit keys 16).
* top-p: the cut falls inside the group of tokens sharing one value v*; v* is the smallest candidate
  key whose mass strictly above is < limit = top_p * total, found the same way (16 masses per pass).
  Of the tokens equal to v*, the first c in vocabulary order are kept, where c counts j = 0, 1, ...
  with mass_above + j * w(v*) < limit; that is the C++ op's descending walk, whose ties are ordered
  by index.
* The draw's running sums are a block-wise scan continued across blocks.
* On a GPU, with a small top-k, the kernels run on the 2k + 64 largest logits of each row instead of
  the whole row (torch.topk first; see _top_k_candidates): one program per row is slow on a long row.

Rounding: the C++ op adds masses one at a time in sorted order; these kernels add them in a tree
(and multiply j * w(v*) for a tie group). All of it is float64, so the two agree unless a top-p limit
or a draw target lies within ~1e-15 (relative) of a prefix mass; exactly representable masses (equal
logits, integer-weight ties) agree exactly. The temperature is applied as torch applies
`logits / temperature` on the logits' device: a true (IEEE) division on the CPU, as the C++ op does, and
a product with the rounded reciprocal on a GPU, so a scaled logit on the GPU can differ from the C++
op's by one ulp, exactly as torch's own. The exponentials are float64, rounded to float32 where the
C++ op uses float32 exp.

Errors (NaN logits, a row with every logit -inf, a uniform outside [0, 1)) are detected in the
kernels, written to a per-row status, and raised by the launcher with the C++ op's messages; that
check reads one small tensor back, so each call synchronises with the device once.
"""
from __future__ import annotations

import math
import os
import struct

import torch
import triton
import triton.language as tl
from torch import Tensor
from triton.language.extra import libdevice

__all__ = ["sampling_filter", "sampling_draw"]

_INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") == "1"
# Tokens per tile. On a GPU the 16-way probe tiles and their per-lane sums are BLOCK x 16 float64 each
# in registers (2 x 32 per thread at 512 with 8 warps). The interpreter runs each tile in numpy, where bigger tiles mean fewer Python-level steps.
_DEFAULT_BLOCK = 2048 if _INTERPRETED else 512
_NUM_WARPS = 8
_DIGIT_BITS = 4  # 16 candidates per pass of the digit search

# float64 exp: libdevice's (__nv_exp, ~1 ulp) on a GPU; the interpreter has no libdevice, and numpy's is
# what it runs for tl.exp.
_LIBDEVICE_EXP64 = tl.constexpr(not _INTERPRETED)

# Per-row status codes written by the kernels (0 = fine).
_STATUS_NAN, _STATUS_ALL_NEG_INF, _STATUS_BAD_UNIFORM = 1, 2, 3


# --------------------------------------------------------------------------------------------------
# Kernel helpers
# --------------------------------------------------------------------------------------------------

@triton.jit
def _scaled_tile(logits_row, offsets, vocab, temperature, ACC_DTYPE: tl.constexpr, RECIPROCAL: tl.constexpr):
    """x = logit / temperature for one tile (accumulation precision), rounded as torch rounds
    `logits / temperature` on the tensors' device (see _launch_settings); masked lanes are -inf."""
    valid = offsets < vocab
    x = tl.load(logits_row + offsets, mask=valid, other=float("-inf")).to(ACC_DTYPE)
    if ACC_DTYPE == tl.float32:  # IEEE divisions: the default float32 '/' is approximate
        if RECIPROCAL:
            x = x * tl.math.div_rn(tl.full([], 1.0, tl.float32), temperature)
        else:
            x = tl.math.div_rn(x, temperature)
    else:
        if RECIPROCAL:
            x = x * (1.0 / temperature)
        else:
            x = x / temperature
    x = tl.where(x == 0.0, 0.0, x)  # -0.0 -> +0.0: equal values must share one key
    return x, valid


@triton.jit
def _round_to_bfloat16_in_float32(x):
    """x (float32) rounded to the nearest bfloat16, ties to even, still as float32. Only under the
    interpreter, whose float32 -> bfloat16 cast truncates (triton 3.9); GPUs round to nearest."""
    bits = x.to(tl.uint32, bitcast=True)
    bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def _ordered_key(x, KEY_DTYPE: tl.constexpr, KEY_BITS: tl.constexpr):
    """An unsigned integer with the same order as the float x (x has no NaN, no -0.0)."""
    bits = x.to(KEY_DTYPE, bitcast=True)
    sign = tl.full([], 1, KEY_DTYPE) << (KEY_BITS - 1)
    return tl.where((bits & sign) != 0, ~bits, bits | sign)


@triton.jit
def _weight(x, row_max):
    """exp(x - max) in float64: the difference in the accumulation precision, the exp in float64."""
    difference = (x - row_max).to(tl.float64)
    if _LIBDEVICE_EXP64:
        return libdevice.exp(difference)
    else:
        return tl.exp(difference)


@triton.jit
def _keep_mask(key, valid, cut_key, cut_ties, ties_before):
    """Kept lanes of a tile: key > cut_key, or key == cut_key among its first cut_ties in vocabulary
    order. Returns the mask and the running count of tokens equal to cut_key."""
    tie = valid & (key == cut_key)
    tie_int = tie.to(tl.int32)
    rank = ties_before + tl.cumsum(tie_int, 0) - tie_int
    keep = valid & ((key > cut_key) | (tie & (rank < cut_ties)))
    return keep, ties_before + tl.sum(tie_int, 0)


@triton.jit
def _filter_row(logits_row, vocab, temperature, top_k, top_p,
                USE_TOP_K: tl.constexpr, USE_TOP_P: tl.constexpr,
                ACC_DTYPE: tl.constexpr, KEY_DTYPE: tl.constexpr, KEY_BITS: tl.constexpr,
                BLOCK: tl.constexpr, RECIPROCAL: tl.constexpr):
    """Decides which tokens of one row survive. Returns (row_max, status, cut_key, cut_ties): the kept
    tokens are those with key > cut_key and the first cut_ties (in vocabulary order) with key == cut_key.
    """
    lanes = tl.arange(0, BLOCK)
    digits = tl.arange(0, 16).to(KEY_DTYPE)
    num_digits: tl.constexpr = KEY_BITS // 4

    # Every pass over the row keeps per-lane partial results and reduces them across lanes once, after
    # its loop: a reduction per tile would put a block-wide barrier in every iteration.

    # Pass 1: the row maximum, and whether there is a NaN.
    lane_max = tl.full([BLOCK], float("-inf"), ACC_DTYPE)
    lane_nans = tl.zeros([BLOCK], tl.int32)
    for start in range(0, vocab, BLOCK):
        x, valid = _scaled_tile(logits_row, start + lanes, vocab, temperature, ACC_DTYPE, RECIPROCAL)
        lane_nans += (valid & (x != x)).to(tl.int32)
        lane_max = tl.maximum(lane_max, tl.where(valid & (x == x), x, float("-inf")))
    row_max = tl.max(lane_max, 0)
    status = tl.where(tl.sum(lane_nans, 0) > 0, 1, tl.where(row_max == float("-inf"), 2, 0))

    # Everything is kept unless a filter says otherwise: every valid key is >= 1 (key 0 is a NaN).
    cut_key = tl.zeros([], KEY_DTYPE)
    cut_ties = vocab

    if USE_TOP_K:
        # Largest t with count(key >= t) >= top_k, one digit at a time from the top.
        # Candidate 0 of each digit keeps the prefix itself, for which the count is known to be >= k.
        prefix = tl.zeros([], KEY_DTYPE)
        shift = tl.full([], KEY_BITS - 4, KEY_DTYPE)
        for _ in range(num_digits):
            probes = prefix | (digits << shift)
            lane_counts = tl.zeros([BLOCK, 16], tl.int32)
            for start in range(0, vocab, BLOCK):
                x, valid = _scaled_tile(logits_row, start + lanes, vocab, temperature, ACC_DTYPE, RECIPROCAL)
                key = _ordered_key(x, KEY_DTYPE, KEY_BITS)
                lane_counts += (valid[:, None] & (key[:, None] >= probes[None, :])).to(tl.int32)
            counts = tl.sum(lane_counts, 0)
            best = tl.max(tl.where(counts >= top_k, digits, 0), 0)
            prefix = prefix | (best << shift)
            shift -= 4
        cut_key = prefix

    if USE_TOP_P:
        # The survivors' total mass (keys >= cut_key), and the top-p limit.
        lane_total = tl.zeros([BLOCK], tl.float64)
        for start in range(0, vocab, BLOCK):
            x, valid = _scaled_tile(logits_row, start + lanes, vocab, temperature, ACC_DTYPE, RECIPROCAL)
            candidate = valid & (_ordered_key(x, KEY_DTYPE, KEY_BITS) >= cut_key)
            lane_total += tl.where(candidate, _weight(x, row_max), 0.0)
        limit = top_p * tl.sum(lane_total, 0)

        # Largest t with mass(candidates with key > t) >= limit; the cut value is the next key up.
        # Holds for t = 0 (mass = total >= limit), so candidate 0 of each digit is always admissible.
        prefix = tl.zeros([], KEY_DTYPE)
        shift = tl.full([], KEY_BITS - 4, KEY_DTYPE)
        for _ in range(num_digits):
            probes = prefix | (digits << shift)
            lane_masses = tl.zeros([BLOCK, 16], tl.float64)
            for start in range(0, vocab, BLOCK):
                x, valid = _scaled_tile(logits_row, start + lanes, vocab, temperature, ACC_DTYPE, RECIPROCAL)
                key = _ordered_key(x, KEY_DTYPE, KEY_BITS)
                candidate = valid & (key >= cut_key)
                above = candidate[:, None] & (key[:, None] > probes[None, :])
                lane_masses += tl.where(above, _weight(x, row_max)[:, None], 0.0)
            masses = tl.sum(lane_masses, 0)
            best = tl.max(tl.where(masses >= limit, digits, 0), 0)
            prefix = prefix | (best << shift)
            shift -= 4
        # limit == 0 (top_p = 0) admits every t; then only the largest token is kept.
        max_key = _ordered_key(row_max, KEY_DTYPE, KEY_BITS)
        cut = tl.where(prefix >= max_key, max_key, prefix + 1)

        # Mass strictly above the cut value, and the weight of one token at it.
        lane_mass_above = tl.zeros([BLOCK], tl.float64)
        lane_tie_weight = tl.zeros([BLOCK], tl.float64)
        for start in range(0, vocab, BLOCK):
            x, valid = _scaled_tile(logits_row, start + lanes, vocab, temperature, ACC_DTYPE, RECIPROCAL)
            key = _ordered_key(x, KEY_DTYPE, KEY_BITS)
            weight = _weight(x, row_max)
            lane_mass_above += tl.where(valid & (key > cut), weight, 0.0)
            lane_tie_weight = tl.maximum(lane_tie_weight, tl.where(valid & (key == cut), weight, 0.0))
        mass_above = tl.sum(lane_mass_above, 0)
        tie_weight = tl.max(lane_tie_weight, 0)
        # The j-th token at the cut value (j = 0, 1, ...) is kept while mass_above + j * w < limit:
        # count those j, correcting the quotient's rounding by one either way. j = 0 is always kept.
        ties = vocab
        if tie_weight > 0.0:
            quotient = tl.minimum(tl.maximum((limit - mass_above) / tie_weight, 0.0), vocab * 1.0)
            ties = tl.math.ceil(quotient).to(tl.int32)
            if ties > 0:
                if mass_above + (ties - 1) * tie_weight >= limit:
                    ties -= 1
            if mass_above + ties * tie_weight < limit:
                ties += 1
        cut_key = cut
        cut_ties = tl.maximum(ties, 1)

    return row_max, status, cut_key, cut_ties


# --------------------------------------------------------------------------------------------------
# Kernels
# --------------------------------------------------------------------------------------------------

@triton.jit(do_not_specialize=["vocab", "temperature_bits", "top_k", "top_p_bits"])
def _sampling_filter_kernel(logits_ptr, out_ptr, status_ptr, vocab, stride_logits_row, stride_out_row,
                            temperature_bits, top_k, top_p_bits,
                            USE_TOP_K: tl.constexpr, USE_TOP_P: tl.constexpr,
                            ACC_DTYPE: tl.constexpr, KEY_DTYPE: tl.constexpr, KEY_BITS: tl.constexpr,
                            BLOCK: tl.constexpr, RECIPROCAL: tl.constexpr, ROUND_BF16: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    # Settings arrive as float64 bit patterns (Triton passes Python floats as float32), then round
    # to the accumulation type as the C++ op's static_cast does.
    temperature = temperature_bits.to(tl.int64).to(tl.float64, bitcast=True).to(ACC_DTYPE)
    top_p = top_p_bits.to(tl.int64).to(tl.float64, bitcast=True).to(ACC_DTYPE).to(tl.float64)
    logits_row = logits_ptr + row * stride_logits_row
    out_row = out_ptr + row * stride_out_row

    row_max, status, cut_key, cut_ties = _filter_row(
        logits_row, vocab, temperature, top_k, top_p, USE_TOP_K, USE_TOP_P, ACC_DTYPE, KEY_DTYPE, KEY_BITS,
        BLOCK, RECIPROCAL)
    tl.store(status_ptr + row, status)

    lanes = tl.arange(0, BLOCK)
    ties_before = tl.zeros([], tl.int32)
    for start in range(0, vocab, BLOCK):
        x, valid = _scaled_tile(logits_row, start + lanes, vocab, temperature, ACC_DTYPE, RECIPROCAL)
        keep, ties_before = _keep_mask(_ordered_key(x, KEY_DTYPE, KEY_BITS), valid, cut_key, cut_ties,
                                       ties_before)
        scores = tl.where(keep, x, float("-inf"))
        if ROUND_BF16:
            scores = _round_to_bfloat16_in_float32(scores)
        tl.store(out_row + start + lanes, scores.to(out_ptr.dtype.element_ty), mask=valid)


@triton.jit(do_not_specialize=["vocab", "temperature_bits", "top_k", "top_p_bits"])
def _sampling_draw_kernel(logits_ptr, uniforms_ptr, tokens_ptr, status_ptr, vocab, stride_logits_row,
                          temperature_bits, top_k, top_p_bits,
                          USE_TOP_K: tl.constexpr, USE_TOP_P: tl.constexpr,
                          ACC_DTYPE: tl.constexpr, KEY_DTYPE: tl.constexpr, KEY_BITS: tl.constexpr,
                          BLOCK: tl.constexpr, RECIPROCAL: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    temperature = temperature_bits.to(tl.int64).to(tl.float64, bitcast=True).to(ACC_DTYPE)
    top_p = top_p_bits.to(tl.int64).to(tl.float64, bitcast=True).to(ACC_DTYPE).to(tl.float64)
    logits_row = logits_ptr + row * stride_logits_row

    row_max, status, cut_key, cut_ties = _filter_row(
        logits_row, vocab, temperature, top_k, top_p, USE_TOP_K, USE_TOP_P, ACC_DTYPE, KEY_DTYPE, KEY_BITS,
        BLOCK, RECIPROCAL)
    uniform = tl.load(uniforms_ptr + row)
    status = tl.where((status == 0) & ((uniform < 0.0) | (uniform >= 1.0) | (uniform != uniform)), 3, status)
    tl.store(status_ptr + row, status)

    # Total kept mass and the last kept token. Weights are rounded to the accumulation type (the C++
    # op's exp is in float for float logits), sums are float64.
    lanes = tl.arange(0, BLOCK)
    lane_total = tl.zeros([BLOCK], tl.float64)
    lane_last_kept = tl.zeros([BLOCK], tl.int32)
    ties_before = tl.zeros([], tl.int32)
    for start in range(0, vocab, BLOCK):
        offsets = start + lanes
        x, valid = _scaled_tile(logits_row, offsets, vocab, temperature, ACC_DTYPE, RECIPROCAL)
        keep, ties_before = _keep_mask(_ordered_key(x, KEY_DTYPE, KEY_BITS), valid, cut_key, cut_ties,
                                       ties_before)
        weight = _weight(x, row_max).to(ACC_DTYPE).to(tl.float64)
        lane_total += tl.where(keep, weight, 0.0)
        lane_last_kept = tl.maximum(lane_last_kept, tl.where(keep, offsets, 0))
    last_kept = tl.max(lane_last_kept, 0)
    target = uniform * tl.sum(lane_total, 0)

    # The first kept token whose running mass exceeds the target; rounding can leave none.
    chosen = last_kept
    found = tl.zeros([], tl.int32)
    running = tl.zeros([], tl.float64)
    ties_before = tl.zeros([], tl.int32)
    start = tl.zeros([], tl.int32)
    while (start < vocab) & (found == 0):
        offsets = start + lanes
        x, valid = _scaled_tile(logits_row, offsets, vocab, temperature, ACC_DTYPE, RECIPROCAL)
        keep, ties_before = _keep_mask(_ordered_key(x, KEY_DTYPE, KEY_BITS), valid, cut_key, cut_ties,
                                       ties_before)
        weight = tl.where(keep, _weight(x, row_max).to(ACC_DTYPE).to(tl.float64), 0.0)
        cumulative = running + tl.cumsum(weight, 0)
        first = tl.min(tl.where(keep & (cumulative > target), offsets, vocab), 0)
        if first < vocab:
            chosen = first
            found = 1
        running += tl.sum(weight, 0)
        start += BLOCK
    tl.store(tokens_ptr + row, chosen.to(tl.int64))


# --------------------------------------------------------------------------------------------------
# Launchers (torch-side; the kernels above know nothing of torch)
# --------------------------------------------------------------------------------------------------

def _float64_bits(value: float) -> int:
    return struct.unpack("<q", struct.pack("<d", float(value)))[0]


def _check_settings(op: str, logits: Tensor, temperature: float, top_k: int, top_p: float) -> None:
    # The C++ op's checks and messages (csrc/generation/sampling.cpp::check_settings), minus the device.
    if logits.dim() != 2:
        raise RuntimeError(f"{op}: logits must be (batch, vocab), got {logits.dim()} dims")
    if not logits.is_floating_point():
        raise RuntimeError(f"{op}: logits must be floating point, got {logits.dtype}")
    if logits.shape[1] == 0:
        raise RuntimeError(f"{op}: logits must have a non-empty vocabulary dimension")
    if not (math.isfinite(temperature) and temperature > 0):
        raise RuntimeError(f"{op}: temperature must be a positive finite number, got {temperature}")
    if top_k < 0:
        raise RuntimeError(f"{op}: top_k must be >= 0 (0 disables it), got {top_k}")
    if not (0 <= top_p <= 1):
        raise RuntimeError(f"{op}: top_p must be in [0, 1], got {top_p}")


def _launch_settings(logits: Tensor, temperature: float, top_k: int, top_p: float, block: int | None) -> dict:
    wide = logits.dtype == torch.float64
    vocab = logits.shape[1]
    # The C++ op compares top_p, rounded to the accumulation type, with 1.
    top_p_acc = top_p if wide else float(torch.tensor(top_p, dtype=torch.float32))
    block = _DEFAULT_BLOCK if block is None else block
    if block < 16 or block & (block - 1):
        raise ValueError(f"block must be a power of two >= 16, got {block}")
    return dict(
        temperature_bits=_float64_bits(temperature), top_k=int(top_k), top_p_bits=_float64_bits(top_p),
        USE_TOP_K=0 < top_k < vocab, USE_TOP_P=top_p_acc < 1.0,
        ACC_DTYPE=tl.float64 if wide else tl.float32,
        KEY_DTYPE=tl.uint64 if wide else tl.uint32, KEY_BITS=64 if wide else 32,
        BLOCK=min(block, max(16, triton.next_power_of_2(vocab))),
        RECIPROCAL=_divides_by_reciprocal(logits),
    )


def _divides_by_reciprocal(logits: Tensor) -> bool:
    """Whether torch computes `logits / temperature` (a Python float) as logits * (1 / temperature).
    On CUDA it does (ATen's div_true_kernel_cuda, the reciprocal rounded to the accumulation type);
    on the CPU it divides. transformers' temperature is that expression, so matching it per device
    gives HF's tokens on each."""
    return logits.is_cuda


def _raise_for_status(op: str, status: Tensor, uniforms: Tensor | None = None) -> None:
    if not bool(status.any()):
        return
    row = int(torch.nonzero(status)[0, 0])
    code = int(status[row])
    if code == _STATUS_NAN:
        raise RuntimeError(f"{op}: logits contain NaN")
    if code == _STATUS_ALL_NEG_INF:
        raise RuntimeError(f"{op}: every logit of a row is -inf; nothing can be sampled")
    raise RuntimeError(f"{op}: uniforms must lie in [0, 1), got {float(uniforms[row])} at row {row}")


def _rows_contiguous(logits: Tensor) -> Tensor:
    return logits if logits.stride(1) == 1 else logits.contiguous()


# Top-k through candidates. One program per row walks the whole vocabulary ~20 times, on one SM, which
# is slow at batch 1 whatever the tile size or warp count (docs/performance.md). With a top-k filter only the k largest logits can be kept,
# so on a GPU the kernels run on the 2k + 64 largest of each row (torch.topk, a many-SM kernel), put back
# in vocabulary order: the same filter and draw over the same values, on a row of 2k + 64 instead of V.
# Top-k keeps every token equal to the k-th largest once scaled, so the candidates must hold that whole
# tie group: the extra k + 64 leave room for it (bfloat16 logits tie often), and if the smallest candidate
# still equals the k-th largest once scaled, the group may go on past them and the kernels run on the
# whole row instead.
_CANDIDATE_LIMIT = 1024  # top_k above this runs on the whole row


def _candidate_count(top_k: int, vocab: int) -> int:
    return min(vocab, 2 * top_k + 64)


def _use_candidates(candidates: bool | None, logits: Tensor, top_k: int) -> bool:
    vocab = logits.shape[1]
    if not 0 < top_k < vocab:
        return False  # top-k is off
    if candidates is None:  # automatic: on a GPU, when the candidates are a small part of the row
        return logits.is_cuda and top_k <= _CANDIDATE_LIMIT and 8 * _candidate_count(top_k, vocab) <= vocab
    return candidates


def _run_filter(logits: Tensor, temperature: float, top_k: int, top_p: float, block: int | None) -> tuple:
    rows, vocab = logits.shape
    out = torch.empty((rows, vocab), dtype=logits.dtype, device=logits.device)
    status = torch.zeros(rows, dtype=torch.int32, device=logits.device)
    _sampling_filter_kernel[(rows,)](logits, out, status, vocab, logits.stride(0), out.stride(0),
                                     **_launch_settings(logits, temperature, top_k, top_p, block),
                                     ROUND_BF16=_INTERPRETED and logits.dtype == torch.bfloat16,
                                     num_warps=_NUM_WARPS)
    return out, status


def _run_draw(logits: Tensor, uniforms: Tensor, temperature: float, top_k: int, top_p: float,
              block: int | None) -> tuple:
    rows, vocab = logits.shape
    tokens = torch.empty(rows, dtype=torch.int64, device=logits.device)
    status = torch.zeros(rows, dtype=torch.int32, device=logits.device)
    _sampling_draw_kernel[(rows,)](logits, uniforms, tokens, status, vocab, logits.stride(0),
                                   **_launch_settings(logits, temperature, top_k, top_p, block),
                                   num_warps=_NUM_WARPS)
    return tokens, status


def _top_k_candidates(logits: Tensor, temperature: float, top_k: int) -> tuple[Tensor, Tensor] | None:
    """(the 2k + 64 largest logits of each row in vocabulary order, their vocabulary indices), or None
    when some row's k-th largest equals its smallest candidate once scaled (see above)."""
    count = _candidate_count(top_k, logits.shape[1])
    values, index = torch.topk(logits, count, dim=1)  # descending; a NaN counts as the largest
    if count < logits.shape[1]:
        # The k-th and the last candidate scaled by the kernel itself (in the accumulation type, exactly
        # as the kernels scale a logit of this dtype), so "equal" is the kernels' equality. The status
        # of this call is not an error.
        accumulate = torch.float64 if logits.dtype == torch.float64 else torch.float32
        boundary, _ = _run_filter(values[:, [top_k - 1, count - 1]].to(accumulate), temperature, 0, 1.0, None)
        if bool((boundary[:, 0] == boundary[:, 1]).any()):
            return None
    index = index.sort(dim=1).values
    return logits.gather(1, index), index


def sampling_filter(logits: Tensor, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0, *,
                    block: int | None = None, candidates: bool | None = None) -> Tensor:
    """logits (N, V) / temperature, with -inf where top-k or top-p removes the token.

    ``block`` (tokens per tile, a power of two) is for tests that want many tiles on a small vocabulary.
    ``candidates``: run the kernels on the 2k + 64 largest logits of each row (default: on a GPU when
    top-k is on and small; see _CANDIDATE_LIMIT). The result is the same either way.
    """
    _check_settings("sampling_filter", logits, temperature, top_k, top_p)
    logits = _rows_contiguous(logits)
    if logits.shape[0] == 0:
        return torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)
    if _use_candidates(candidates, logits, top_k):
        found = _top_k_candidates(logits, temperature, top_k)
        if found is not None:
            candidate_logits, index = found
            scores, status = _run_filter(candidate_logits, temperature, top_k, top_p, block)
            _raise_for_status("sampling_filter", status)
            return torch.full_like(logits, float("-inf")).scatter_(1, index, scores)
    out, status = _run_filter(logits, temperature, top_k, top_p, block)
    _raise_for_status("sampling_filter", status)
    return out


def sampling_draw(logits: Tensor, uniforms: Tensor, temperature: float = 1.0, top_k: int = 0,
                  top_p: float = 1.0, *, block: int | None = None, candidates: bool | None = None) -> Tensor:
    """One int64 token per row of logits (N, V): the filter above, then the inverse CDF at uniforms (N,).
    ``block`` and ``candidates`` as for sampling_filter."""
    _check_settings("sampling_draw", logits, temperature, top_k, top_p)
    if uniforms.dim() != 1 or uniforms.shape[0] != logits.shape[0]:
        raise RuntimeError(f"sampling_draw: uniforms must be (batch,) = ({logits.shape[0]},), got "
                           f"{list(uniforms.shape)}")
    if not uniforms.is_floating_point():
        raise RuntimeError(f"sampling_draw: uniforms must be floating point, got {uniforms.dtype}")
    if uniforms.device != logits.device:
        raise RuntimeError(f"sampling_draw: uniforms must be on the logits' device ({logits.device}), "
                           f"got {uniforms.device}")
    logits = _rows_contiguous(logits)
    uniforms = uniforms.to(torch.float64).contiguous()
    if logits.shape[0] == 0:
        return torch.empty(0, dtype=torch.int64, device=logits.device)
    if _use_candidates(candidates, logits, top_k):
        found = _top_k_candidates(logits, temperature, top_k)
        if found is not None:
            candidate_logits, index = found
            chosen, status = _run_draw(candidate_logits, uniforms, temperature, top_k, top_p, block)
            _raise_for_status("sampling_draw", status, uniforms)
            return index.gather(1, chosen[:, None]).squeeze(1)
    tokens, status = _run_draw(logits, uniforms, temperature, top_k, top_p, block)
    _raise_for_status("sampling_draw", status, uniforms)
    return tokens
