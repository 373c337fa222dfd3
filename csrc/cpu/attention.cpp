// Fused scaled-dot-product attention for the CPU, FlashAttention-2 style.
//
// Forward: each task owns one (batch, query head, block of BQ query rows). It walks
// the keys in blocks of BK: S = scale * Q K^T (one GEMM), mask, online softmax
// (running row max m and row sum l; the accumulator is rescaled when m grows),
// acc += P V (one GEMM). Out = acc / l and logsumexp = m + log(l) are written at
// the end. Memory per thread is O(BQ * (BK + Dv)) plus the packed key side of one
// head, O(Lk * (D + Dv)); nothing of size Lq x Lk exists.
//
// The GEMMs whose right operand is key-side (K^T, V, V^T, K) run on genfast's packed-panel
// micro-kernel (cpu/gemm.h) with that operand packed once per (batch, kv head); the two
// backward products with a transposed left operand (dV, dK) go through the CPU kernels' GEMM
// entry point (cpu/gemm_entry.h).
//
// Backward recomputes P = exp(S - logsumexp) tile by tile. A task owns one
// (batch, key/value head): it accumulates dK and dV of that head without races
// and dQ of the query heads that share it (GQA), so no atomics are needed.
//
// The same kernels serve packed variable-length batches (attention_varlen_*: per-sequence row
// offsets, causal and sliding windows aligned bottom-right; key tiles outside a query block's
// window are skipped) and dropout drawn in the kernel from a counter-based hash of (seed,
// position), which the backward draws again instead of storing a mask.
//
// Rows whose keys are all masked produce 0 (and logsumexp -inf, zero gradients),
// as torch's CPU SDPA does in torch 2.13. NaN in a float mask gives a NaN row.
//
// bfloat16/float16 inputs are widened to float32 at the op boundary (O(L * D) extra
// memory) and the result narrowed back: fp32 accumulation throughout.
#include <ATen/Parallel.h>
#include <torch/library.h>
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#if defined(GENFAST_EMULATE_AVX512)
#define SIMDE_ENABLE_NATIVE_ALIASES  // the _mm512_* names in struct Avx512 resolve to SIMDe's (see simd.h)
#include <simde/x86/avx512.h>
// SIMDe 0.8.2 has no _mm512_reduce_add_ps.
inline float genfast_emulated_reduce_add_ps(simde__m512 v) {
  float lanes[16];
  simde_mm512_storeu_ps(lanes, v);
  float sum = 0.0f;
  for (float lane : lanes) sum += lane;
  return sum;
}
#define _mm512_reduce_add_ps(v) genfast_emulated_reduce_add_ps(v)
#endif
#endif

#include "cpu/gemm.h"
#include "cpu/gemm_entry.h"
#include "cpu/simd.h"
#include "fast_math.h"

namespace genfast::cpu::attention {

namespace {

// Backward tiles (the forward's are kFwdBlockQ x kFwdBlockK below).
constexpr int64_t kBlockQ = 128;  // query rows per tile
constexpr int64_t kBlockK = 256;  // key rows per tile

// Mask description, already broadcast to (B, Hq, Lq, Lk) through strides (0 where broadcast).
template <typename T>
struct Mask {
  enum Kind { kNone, kBool, kAdditive } kind = kNone;
  const bool* boolean = nullptr;
  const T* additive = nullptr;
  int64_t stride_b = 0, stride_h = 0, stride_q = 0, stride_k = 0;
};

// Dropout on the probabilities, drawn in the kernel. Row r = (b * heads_q + h) * len_q + i (i counted
// within the sequence) gets a 32-bit key, the top bits of splitmix64(seed + r * golden gamma); element j
// of the row is kept iff fmix32(key ^ j * golden32) (MurmurHash3's finalizer, a bijection of 32-bit
// words) is >= threshold. A pure function of the seed and the position, so the backward regenerates
// the same mask, which is never stored; 32-bit arithmetic, so the per-element hash vectorises.
struct Dropout {
  bool enabled = false;
  uint64_t seed = 0;
  uint32_t threshold = 0;  // p * 2^32 (capped at 2^32 - 1: p = 1 keeps nothing through keep_scale = 0)
  double keep_scale = 1;   // 1 / (1 - p); 0 when p = 1
};

inline uint32_t dropout_row_key(uint64_t seed, uint64_t row) {
  uint64_t z = seed + row * 0x9E3779B97F4A7C15ull;
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return static_cast<uint32_t>((z ^ (z >> 31)) >> 32);
}

Dropout make_dropout(double p, const c10::optional<at::Tensor>& seed) {
  Dropout d;
  if (p <= 0.0) return d;
  TORCH_CHECK(p <= 1.0, "attention: dropout_p must be in [0, 1], got ", p);
  TORCH_CHECK(seed.has_value() && seed->numel() == 1 && seed->scalar_type() == at::kLong,
              "attention: dropout_p > 0 needs dropout_seed, a one-element int64 tensor");
  d.enabled = true;
  d.seed = static_cast<uint64_t>(seed->item<int64_t>());
  d.threshold = static_cast<uint32_t>(std::min<double>(std::round(p * 4294967296.0), 4294967295.0));
  d.keep_scale = p < 1.0 ? 1.0 / (1.0 - p) : 0.0;
  return d;
}

// Row, head and batch strides (elements) of one operand; the last dim is contiguous. In a packed
// variable-length batch the batch stride is 0 and a sequence starts at row cu_seqlens[b].
struct Layout {
  int64_t sb = 0, sh = 0, sr = 0;
};

template <typename T>
struct Problem {
  // len_q / len_k: the sequences' length, or the longest one in a variable-length batch.
  int64_t batch, heads_q, heads_kv, len_q, len_k, dim_qk, dim_v;
  const T *q, *k, *v;
  // Strides (elements) of the batch, head and row dims; the last dim is contiguous.
  int64_t q_sb, q_sh, q_sr, k_sb, k_sh, k_sr, v_sb, v_sh, v_sr;
  // Outputs: out and grad_out share out's layout; logsumexp has row stride 1.
  Layout out, lse, grad_q, grad_k, grad_v;
  // Variable-length batch (FlashAttention's packed layout): sequence b owns query rows
  // [cu_q[b], cu_q[b + 1]) and key rows [cu_k[b], cu_k[b + 1]). Null for a dense batch.
  const int32_t* cu_q = nullptr;
  const int32_t* cu_k = nullptr;
  Mask<T> mask;
  // Query i of sequence b sees keys j with i + diag(b) - window_left <= j <= i + diag(b) + window_right
  // (-1: unbounded on that side). Causal is window_right = 0. diag(b) = 0 aligns causal top-left
  // (torch); bottom_right makes it len_k(b) - len_q(b) (FlashAttention-2 >= 2.1).
  int64_t window_left = -1, window_right = -1;
  bool bottom_right = false;
  T scale;
  Dropout dropout;

  int64_t q_begin(int64_t b) const { return cu_q ? cu_q[b] : 0; }
  int64_t k_begin(int64_t b) const { return cu_k ? cu_k[b] : 0; }
  int64_t q_len(int64_t b) const { return cu_q ? cu_q[b + 1] - cu_q[b] : len_q; }
  int64_t k_len(int64_t b) const { return cu_k ? cu_k[b + 1] - cu_k[b] : len_k; }
  int64_t diag(int64_t b) const { return bottom_right ? k_len(b) - q_len(b) : 0; }
  bool windowed() const { return window_left >= 0 || window_right >= 0; }
  // First element of row `row` of head h of sequence b in an operand laid out as `l`.
  static int64_t at(const Layout& l, int64_t b, int64_t h, int64_t row) { return b * l.sb + h * l.sh + row * l.sr; }
  // Keys [begin, end) that some query row in [i0, i1) of sequence b may see; begin is rounded down
  // to a multiple of `align` (the K^T panels' width); begin >= end when there are none.
  std::pair<int64_t, int64_t> key_range(int64_t b, int64_t i0, int64_t i1, int64_t align) const {
    const int64_t n = k_len(b), off = diag(b);
    const int64_t end = window_right >= 0 ? std::clamp<int64_t>(i1 + off + window_right, 0, n) : n;
    const int64_t begin = window_left >= 0 ? std::clamp<int64_t>(i0 + off - window_left, 0, n) : 0;
    return {begin / align * align, end};
  }
};

// Mask and window (causal included) applied to one score tile (rows i0.., keys j0.. of sequence b).
template <typename T>
void apply_mask(const Problem<T>& p, int64_t b, int64_t h, int64_t i0, int64_t rows, int64_t j0,
                int64_t cols, T* s, int64_t lds) {
  constexpr T kNegInf = -std::numeric_limits<T>::infinity();
  const Mask<T>& m = p.mask;
  // Branch-free, with the usual contiguous key dim apart so the additive loop vectorises. A
  // boolean mask adds 0 or -inf from a two-entry table, as torch adds the float mask it makes of
  // one: a branch (or a conditional store, which GCC makes of a select) per score mispredicts
  // on a random mask.
  const int64_t sk = m.stride_k;
  static constexpr T kBoolMaskAdd[2] = {kNegInf, T(0)};
  if (m.kind == Mask<T>::kAdditive) {
    for (int64_t r = 0; r < rows; ++r) {
      const T* row = m.additive + b * m.stride_b + h * m.stride_h + (i0 + r) * m.stride_q + j0 * sk;
      T* out = s + r * lds;
      if (sk == 1) {
#pragma omp simd
        for (int64_t c = 0; c < cols; ++c) out[c] += row[c];
      } else {
        for (int64_t c = 0; c < cols; ++c) out[c] += row[c * sk];
      }
    }
  } else if (m.kind == Mask<T>::kBool) {
    for (int64_t r = 0; r < rows; ++r) {
      const bool* row = m.boolean + b * m.stride_b + h * m.stride_h + (i0 + r) * m.stride_q + j0 * sk;
      T* out = s + r * lds;
      for (int64_t c = 0; c < cols; ++c) out[c] += kBoolMaskAdd[row[c * sk]];
    }
  }
  if (!p.windowed()) return;
  const int64_t off = p.diag(b), left = p.window_left, right = p.window_right;
  // The bounds rise with the row: the last row has the highest lower bound, the first the lowest upper one.
  const bool all_visible = (left < 0 || j0 >= i0 + rows - 1 + off - left) && (right < 0 || j0 + cols - 1 <= i0 + off + right);
  if (all_visible) return;
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t i = i0 + r;
    const int64_t lo = left >= 0 ? std::clamp<int64_t>(i + off - left - j0, 0, cols) : 0;
    const int64_t hi = right >= 0 ? std::clamp<int64_t>(i + off + right + 1 - j0, lo, cols) : cols;
    T* out = s + r * lds;
    for (int64_t c = 0; c < lo; ++c) out[c] = kNegInf;
    for (int64_t c = hi; c < cols; ++c) out[c] = kNegInf;
  }
}

// Row of a probability tile times its dropout multipliers (0 or keep), keys j0.. of the row with this key.
#define GENFAST_ALWAYS_INLINE inline __attribute__((always_inline))
template <typename T>
GENFAST_ALWAYS_INLINE void dropout_row_impl(T* row, int64_t cols, uint32_t key, uint32_t j0, uint32_t threshold,
                                            T keep) {
#pragma omp simd
  for (int64_t c = 0; c < cols; ++c) {
    uint32_t x = key ^ ((j0 + static_cast<uint32_t>(c)) * 0x9E3779B9u);
    x ^= x >> 16;
    x *= 0x85EBCA6Bu;
    x ^= x >> 13;
    x *= 0xC2B2AE35u;
    x ^= x >> 16;
    row[c] *= x >= threshold ? keep : T(0);
  }
}

#define GENFAST_DROPOUT_COPY(SUFFIX, TARGET)                                                                 \
  template <typename T>                                                                                     \
  TARGET void dropout_row_##SUFFIX(T* row, int64_t cols, uint32_t key, uint32_t j0, uint32_t threshold, T keep) { \
    dropout_row_impl<T>(row, cols, key, j0, threshold, keep);                                               \
  }

GENFAST_DROPOUT_COPY(baseline, )
GENFAST_DROPOUT_COPY(avx2, GENFAST_TARGET_AVX2)
GENFAST_DROPOUT_COPY(avx512, GENFAST_TARGET_AVX512)

// Dropout on a probability tile (rows i0.., keys j0.. of sequence b, query head h): each entry
// multiplied by 0 or 1 / (1 - p), the same draw wherever it is made (forward, backward, test hook).
template <typename T>
void apply_dropout(const Problem<T>& p, int64_t b, int64_t h, int64_t i0, int64_t rows, int64_t j0, int64_t cols,
                   T* s, int64_t lds) {
  static const auto dropout_row = [] {
    switch (simd_level()) {
      case SimdLevel::kAVX512: return dropout_row_avx512<T>;
      case SimdLevel::kAVX2: return dropout_row_avx2<T>;
      default: return dropout_row_baseline<T>;
    }
  }();
  const T keep = static_cast<T>(p.dropout.keep_scale);
  const uint64_t row0 = static_cast<uint64_t>((b * p.heads_q + h) * p.len_q + i0);
  for (int64_t r = 0; r < rows; ++r)
    dropout_row(s + r * lds, cols, dropout_row_key(p.dropout.seed, row0 + r), static_cast<uint32_t>(j0),
                p.dropout.threshold, keep);
}

// ---- softmax pieces, compiled per ISA ------------------------------------------------
// The *_impl templates are always inlined into the target-attributed wrappers below, so
// the `omp simd` loops vectorise to the width of each ISA (exp_ is fast_math.h's
// branch-free polynomial exp, the one the RNN gate math uses).

// One online-softmax step over a score tile: P = exp(S - m_new) in place (0 where the
// score is -inf), row sums folded into l, and alpha = exp(m_old - m_new) returned
// for rescaling the accumulator.
template <typename T>
GENFAST_ALWAYS_INLINE void online_softmax_impl(T* s, int64_t rows, int64_t cols, int64_t lds, T* m, T* l,
                                               T* alpha) {
  constexpr T kNegInf = -std::numeric_limits<T>::infinity();
  for (int64_t r = 0; r < rows; ++r) {
    T* row = s + r * lds;
    T tile_max = kNegInf;
#pragma omp simd reduction(max : tile_max)
    for (int64_t c = 0; c < cols; ++c) tile_max = row[c] > tile_max ? row[c] : tile_max;
    const T m_old = m[r];
    const T m_new = tile_max > m_old ? tile_max : m_old;
    // While every key so far is masked (m_new = -inf), subtract 0 so exp(-inf) = 0, not NaN.
    const T base = m_new == kNegInf ? T(0) : m_new;
    T sum = 0;
#pragma omp simd reduction(+ : sum)
    for (int64_t c = 0; c < cols; ++c) {
      const T x = row[c];
      const T e = genfast::math::exp_<T>(x - base);
      const T prob = x == kNegInf ? T(0) : e;  // the polynomial exp clamps: force exact 0
      row[c] = prob;
      sum += prob;
    }
    const T a = m_old == kNegInf ? T(0) : genfast::math::exp_<T>(m_old - base);
    alpha[r] = a;
    l[r] = l[r] * a + sum;
    m[r] = m_new;
  }
}

// Backward: P = exp(S - lse) (0 for masked scores and for fully masked rows), then
// dS = P * (dP - delta) written over dP.
template <typename T>
GENFAST_ALWAYS_INLINE void softmax_grad_impl(T* s, T* dp, int64_t rows, int64_t cols, int64_t ld, const T* lse,
                                             const T* delta) {
  constexpr T kNegInf = -std::numeric_limits<T>::infinity();
  for (int64_t r = 0; r < rows; ++r) {
    T* srow = s + r * ld;
    T* dprow = dp + r * ld;
    const T lse_r = lse[r];
    const T delta_r = delta[r];
    if (lse_r == kNegInf) {
      for (int64_t c = 0; c < cols; ++c) srow[c] = dprow[c] = T(0);
      continue;
    }
#pragma omp simd
    for (int64_t c = 0; c < cols; ++c) {
      const T x = srow[c];
      const T e = genfast::math::exp_<T>(x - lse_r);
      const T prob = x == kNegInf ? T(0) : e;
      srow[c] = prob;
      dprow[c] = prob * (dprow[c] - delta_r);
    }
  }
}

// acc = alpha * acc + pv, row by row (both rows x cols, contiguous rows): the online
// softmax's rescale fused with the accumulation of this tile's P V.
template <typename T>
GENFAST_ALWAYS_INLINE void rescale_add_impl(T* __restrict acc, const T* __restrict pv, int64_t rows, int64_t cols,
                                            const T* alpha) {
  for (int64_t r = 0; r < rows; ++r) {
    const T a = alpha[r];
    T* row = acc + r * cols;
    const T* add = pv + r * cols;
#pragma omp simd
    for (int64_t c = 0; c < cols; ++c) row[c] = a * row[c] + add[c];
  }
}

template <typename T>
struct SoftmaxKernels {
  void (*online_softmax)(T*, int64_t, int64_t, int64_t, T*, T*, T*);
  void (*softmax_grad)(T*, T*, int64_t, int64_t, int64_t, const T*, const T*);
  void (*rescale_add)(T*, const T*, int64_t, int64_t, const T*);
};

#define GENFAST_SOFTMAX_COPY(SUFFIX, TARGET)                                                             \
  template <typename T>                                                                                   \
  TARGET void online_softmax_##SUFFIX(T* s, int64_t rows, int64_t cols, int64_t lds, T* m, T* l, T* a) { \
    online_softmax_impl<T>(s, rows, cols, lds, m, l, a);                                                  \
  }                                                                                                       \
  template <typename T>                                                                                   \
  TARGET void softmax_grad_##SUFFIX(T* s, T* dp, int64_t rows, int64_t cols, int64_t ld, const T* lse,   \
                                    const T* delta) {                                                     \
    softmax_grad_impl<T>(s, dp, rows, cols, ld, lse, delta);                                              \
  }                                                                                                       \
  template <typename T>                                                                                   \
  TARGET void rescale_add_##SUFFIX(T* acc, const T* pv, int64_t rows, int64_t cols, const T* alpha) {    \
    rescale_add_impl<T>(acc, pv, rows, cols, alpha);                                                      \
  }

GENFAST_SOFTMAX_COPY(baseline, )
GENFAST_SOFTMAX_COPY(avx2, GENFAST_TARGET_AVX2)
GENFAST_SOFTMAX_COPY(avx512, GENFAST_TARGET_AVX512)


// ---- float softmax with explicit vectors (AVX2 / AVX-512) ------------------------------
// The float copies for AVX2 and AVX-512 use explicit vectors, which ran the softmax faster than
// the loops above auto-vectorised (docs/performance.md). exp is fast_math.h's, applied to GCC
// vectors (S::VF).
#if GENFAST_X86
struct Avx2 {
  using V = __m256;
  static constexpr int kWidth = 8;
  // The same lanes as a GCC vector, for fast_math.h's exp.
  typedef float VF __attribute__((vector_size(32)));
  typedef uint32_t VU __attribute__((vector_size(32)));
  GENFAST_TARGET_AVX2 static GENFAST_ALWAYS_INLINE VF to_vf(V x) {
    VF y;
    std::memcpy(&y, &x, sizeof(y));
    return y;
  }
  GENFAST_TARGET_AVX2 static GENFAST_ALWAYS_INLINE V from_vf(VF x) {
    V y;
    std::memcpy(&y, &x, sizeof(y));
    return y;
  }
  GENFAST_TARGET_AVX2 static GENFAST_ALWAYS_INLINE V load(const float* p) { return _mm256_loadu_ps(p); }
  GENFAST_TARGET_AVX2 static GENFAST_ALWAYS_INLINE void store(float* p, V v) { _mm256_storeu_ps(p, v); }
  GENFAST_TARGET_AVX2 static GENFAST_ALWAYS_INLINE V set1(float x) { return _mm256_set1_ps(x); }
  GENFAST_TARGET_AVX2 static GENFAST_ALWAYS_INLINE V vmax(V a, V b) { return _mm256_max_ps(a, b); }
  GENFAST_TARGET_AVX2 static GENFAST_ALWAYS_INLINE V vmin(V a, V b) { return _mm256_min_ps(a, b); }
  GENFAST_TARGET_AVX2 static GENFAST_ALWAYS_INLINE V add(V a, V b) { return _mm256_add_ps(a, b); }
  GENFAST_TARGET_AVX2 static GENFAST_ALWAYS_INLINE V sub(V a, V b) { return _mm256_sub_ps(a, b); }
  GENFAST_TARGET_AVX2 static GENFAST_ALWAYS_INLINE V mul(V a, V b) { return _mm256_mul_ps(a, b); }
  // Horizontal max / sum of the 8 lanes.
  GENFAST_TARGET_AVX2 static GENFAST_ALWAYS_INLINE float hmax(V v) {
    __m128 x = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    x = _mm_max_ps(x, _mm_movehl_ps(x, x));
    return _mm_cvtss_f32(_mm_max_ss(x, _mm_movehdup_ps(x)));
  }
  GENFAST_TARGET_AVX2 static GENFAST_ALWAYS_INLINE float hsum(V v) {
    __m128 x = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    x = _mm_add_ps(x, _mm_movehl_ps(x, x));
    return _mm_cvtss_f32(_mm_add_ss(x, _mm_movehdup_ps(x)));
  }
  // x where x != -inf, else 0
  GENFAST_TARGET_AVX2 static GENFAST_ALWAYS_INLINE V zero_if_neg_inf(V x, V value) {
    return _mm256_andnot_ps(_mm256_cmp_ps(x, set1(-std::numeric_limits<float>::infinity()), _CMP_EQ_OQ), value);
  }
};

struct Avx512 {
  using V = __m512;
  static constexpr int kWidth = 16;
  // The same lanes as a GCC vector, for fast_math.h's exp.
  typedef float VF __attribute__((vector_size(64)));
  typedef uint32_t VU __attribute__((vector_size(64)));
  GENFAST_TARGET_AVX512 static GENFAST_ALWAYS_INLINE VF to_vf(V x) {
    VF y;
    std::memcpy(&y, &x, sizeof(y));
    return y;
  }
  GENFAST_TARGET_AVX512 static GENFAST_ALWAYS_INLINE V from_vf(VF x) {
    V y;
    std::memcpy(&y, &x, sizeof(y));
    return y;
  }
  GENFAST_TARGET_AVX512 static GENFAST_ALWAYS_INLINE V load(const float* p) { return _mm512_loadu_ps(p); }
  GENFAST_TARGET_AVX512 static GENFAST_ALWAYS_INLINE void store(float* p, V v) { _mm512_storeu_ps(p, v); }
  GENFAST_TARGET_AVX512 static GENFAST_ALWAYS_INLINE V set1(float x) { return _mm512_set1_ps(x); }
  GENFAST_TARGET_AVX512 static GENFAST_ALWAYS_INLINE V vmax(V a, V b) { return _mm512_max_ps(a, b); }
  GENFAST_TARGET_AVX512 static GENFAST_ALWAYS_INLINE V vmin(V a, V b) { return _mm512_min_ps(a, b); }
  GENFAST_TARGET_AVX512 static GENFAST_ALWAYS_INLINE V add(V a, V b) { return _mm512_add_ps(a, b); }
  GENFAST_TARGET_AVX512 static GENFAST_ALWAYS_INLINE V sub(V a, V b) { return _mm512_sub_ps(a, b); }
  GENFAST_TARGET_AVX512 static GENFAST_ALWAYS_INLINE V mul(V a, V b) { return _mm512_mul_ps(a, b); }
  GENFAST_TARGET_AVX512 static GENFAST_ALWAYS_INLINE float hmax(V v) { return _mm512_reduce_max_ps(v); }
  GENFAST_TARGET_AVX512 static GENFAST_ALWAYS_INLINE float hsum(V v) { return _mm512_reduce_add_ps(v); }
  GENFAST_TARGET_AVX512 static GENFAST_ALWAYS_INLINE V zero_if_neg_inf(V x, V value) {
    const __mmask16 is_neg_inf =
        _mm512_cmp_ps_mask(x, set1(-std::numeric_limits<float>::infinity()), _CMP_EQ_OQ);
    return _mm512_mask_blend_ps(is_neg_inf, value, _mm512_setzero_ps());
  }
};

#pragma GCC push_options
#pragma GCC target("avx2,fma")
namespace avx2 {
using S = Avx2;
#include "cpu/attention_softmax.inc"
}  // namespace avx2
#pragma GCC pop_options

#pragma GCC push_options
GENFAST_PRAGMA_TARGET_AVX512
namespace avx512 {
using S = Avx512;
#include "cpu/attention_softmax.inc"
}  // namespace avx512
#pragma GCC pop_options
#endif

template <typename T>
SoftmaxKernels<T> softmax_kernels() {
#if GENFAST_X86
  if constexpr (std::is_same_v<T, float>) {
    switch (simd_level()) {
      case SimdLevel::kAVX512:
        return {avx512::online_softmax_f32, avx512::softmax_grad_f32, rescale_add_avx512<float>};
      case SimdLevel::kAVX2:
        return {avx2::online_softmax_f32, avx2::softmax_grad_f32, rescale_add_avx2<float>};
      default:
        break;
    }
  }
#endif
  switch (simd_level()) {
    case SimdLevel::kAVX512:
      return {online_softmax_avx512<T>, softmax_grad_avx512<T>, rescale_add_avx512<T>};
    case SimdLevel::kAVX2:
      return {online_softmax_avx2<T>, softmax_grad_avx2<T>, rescale_add_avx2<T>};
    default:
      return {online_softmax_baseline<T>, softmax_grad_baseline<T>, rescale_add_baseline<T>};
  }
}

// Runs body(begin, end) over contiguous ranges of tasks [0, tasks), one range per thread, cut so that
// the ranges' summed cost(task) is about equal. at::parallel_for cuts by count, but the tasks differ
// in size: sequences of different lengths in a variable-length batch, causal or windowed query blocks.
template <typename Cost, typename Body>
void parallel_for_balanced(int64_t tasks, const Cost& cost, const Body& body) {
  const int64_t parts = std::min<int64_t>(at::get_num_threads(), tasks);
  if (parts <= 1 || at::in_parallel_region()) {
    if (tasks > 0) body(0, tasks);
    return;
  }
  std::vector<double> prefix(tasks + 1, 0.0);
  for (int64_t t = 0; t < tasks; ++t) prefix[t + 1] = prefix[t] + cost(t);
  std::vector<int64_t> bounds(parts + 1, tasks);
  bounds[0] = 0;
  for (int64_t i = 1; i < parts; ++i)
    bounds[i] = std::lower_bound(prefix.begin(), prefix.end(), prefix[tasks] * i / parts) - prefix.begin();
  at::parallel_for(0, parts, 1, [&](int64_t first, int64_t last) {
    for (int64_t i = first; i < last; ++i)
      if (bounds[i] < bounds[i + 1]) body(bounds[i], bounds[i + 1]);
  });
}

// Work of query rows [i0, i0 + rows) of sequence b against the keys they may see, plus a per-row
// share for the softmax bookkeeping and the output: the cost that parallel_for_balanced evens out.
template <typename T>
double block_cost(const Problem<T>& p, int64_t b, int64_t i0, int64_t rows, int64_t align) {
  const auto [key_begin, key_end] = p.key_range(b, i0, i0 + rows, align);
  return static_cast<double>(rows) * static_cast<double>(std::max<int64_t>(key_end - key_begin, 0) + 32);
}

// ---- forward ---------------------------------------------------------------------------
//
// Both forward GEMMs run on genfast's register-blocked micro-kernel (cpu/gemm.h), which
// reads the right-hand operand as packed panels and A in place, so nothing is packed
// inside the tile loop (a general GEMM call would pack both operands every time, which at
// these tile sizes costs about as much as the FMAs):
//   S  = Q_tile (rows x D, read in place) * K^T panels   K^T packed once per (batch, kv head)
//   PV = P (rows x cols) * V rows                       V used in place when its rows are
//                                                       contiguous panel rows, else packed once
// Key-side panels are shared by every query block and every query head of a GQA group.

// Query rows per task: a multiple of every ISA's micro-kernel row count (3, 6, 12) so no
// row block ends in a slow partial tail. Keys per tile: 128 amortises the per-row softmax
// bookkeeping and the accumulator rescale (1/128 of the FMAs) while the K^T panels of one
// tile (D x 128) and the V tile stay in L1/L2.
constexpr int64_t kFwdBlockQ = 96;
constexpr int64_t kFwdBlockK = 128;

// A (len x dim) row-major matrix X with rows `stride` apart, transposed into gemm_panel
// panels: panel j holds rows [jW, jW + W) of X as a dim x W block, out[d][c] =
// factor * X[jW + c][d] (zero past len). For K^T (factor = scale: folding it in here
// saves a pass over every score tile) and, in the backward, V^T.
template <typename T>
void pack_transposed(const T* x, int64_t stride, int64_t len, int64_t dim, T factor, T* out) {
  constexpr int64_t W = kSubWidth<T>;
  const int64_t panels = (len + W - 1) / W;
  for (int64_t j = 0; j < panels; ++j) {
    T* panel = out + j * dim * W;
    for (int64_t c = 0; c < W; ++c) {
      const int64_t row = j * W + c;
      if (row >= len) {
        for (int64_t d = 0; d < dim; ++d) panel[d * W + c] = T(0);
        continue;
      }
      const T* src = x + row * stride;
      for (int64_t d = 0; d < dim; ++d) panel[d * W + c] = factor * src[d];
    }
  }
}

// X (len x dim, rows `stride` apart) as one len x width panel, rows zero-padded to width.
// Needed only when X's rows are not already contiguous and a whole number of vectors wide.
template <typename T>
void pack_rows(const T* x, int64_t stride, int64_t len, int64_t dim, int64_t width, T* out) {
  for (int64_t r = 0; r < len; ++r) {
    std::copy(x + r * stride, x + r * stride + dim, out + r * width);
    std::fill(out + r * width + dim, out + (r + 1) * width, T(0));
  }
}

template <typename T>
void forward_kernel(const Problem<T>& p, T* out, T* lse) {
  constexpr T kNegInf = -std::numeric_limits<T>::infinity();
  constexpr int64_t W = kSubWidth<T>;
  const SoftmaxKernels<T> sk = softmax_kernels<T>();
  const int64_t group = p.heads_q / p.heads_kv;
  const int64_t q_blocks = (p.len_q + kFwdBlockQ - 1) / kFwdBlockQ;
  const int64_t tasks = p.batch * p.heads_q * q_blocks;
  const int64_t key_panels = (p.len_k + W - 1) / W;
  const int64_t wv = (p.dim_v + W - 1) / W * W;  // PV's columns
  const int64_t row_step = gemm_rows_per_kernel();  // kFwdBlockQ is a multiple of it
  const int64_t causal_chunk = 4 * row_step;
  // V's rows already form a panel when they are contiguous and a whole number of vectors wide.
  const bool v_in_place = p.dim_v == wv && (p.v_sr == p.dim_v || p.len_k == 1);
  // A few query rows (a decode-shaped call): packing K^T for each head would cost more than the
  // product, so the scores are dot products over K's rows where they lie, with q pre-scaled.
  const bool k_in_place = p.len_q <= kMaxDotRows;
  const int64_t block_q = std::min(kFwdBlockQ, p.len_q);  // rows of the per-thread buffers
  const int64_t right = p.window_right;
  // Tasks run in (batch, head, query block) order and each thread gets a contiguous range,
  // so a thread packs the key side of each kv head it meets once, into its own buffers,
  // and reuses it for all query blocks (and GQA query heads) of that head that it owns.
  // In a variable-length batch the blocks past a sequence's end are empty tasks.
  const auto task_cost = [&](int64_t task) {
    const int64_t b = task / (q_blocks * p.heads_q), i0 = task % q_blocks * kFwdBlockQ;
    return i0 < p.q_len(b) ? block_cost(p, b, i0, std::min(kFwdBlockQ, p.q_len(b) - i0), W) : 0.0;
  };
  parallel_for_balanced(tasks, task_cost, [&](int64_t begin, int64_t end) {
    std::vector<T> kt(k_in_place ? 0 : key_panels * W * p.dim_qk), v_packed(v_in_place ? 0 : p.len_k * wv);
    std::vector<T> q_scaled(k_in_place ? block_q * p.dim_qk : 0);
    std::vector<T> scores(block_q * kFwdBlockK), pv(block_q * wv), acc(block_q * wv);
    std::vector<T> m(block_q), l(block_q), alpha(block_q);
    int64_t packed_head = -1;  // b * heads_kv + hk whose keys kt holds
    for (int64_t task = begin; task < end; ++task) {
      const int64_t qb = task % q_blocks;
      const int64_t h = (task / q_blocks) % p.heads_q;
      const int64_t b = task / (q_blocks * p.heads_q);
      const int64_t i0 = qb * kFwdBlockQ;
      const int64_t len_q = p.q_len(b), len_k = p.k_len(b);
      if (i0 >= len_q) continue;
      const int64_t hk = h / group;
      const T* k = p.k + b * p.k_sb + hk * p.k_sh + p.k_begin(b) * p.k_sr;
      const T* v = p.v + b * p.v_sb + hk * p.v_sh + p.k_begin(b) * p.v_sr;
      if (packed_head != b * p.heads_kv + hk) {
        packed_head = b * p.heads_kv + hk;
        if (!k_in_place) pack_transposed(k, p.k_sr, len_k, p.dim_qk, p.scale, kt.data());
        if (!v_in_place) pack_rows(v, p.v_sr, len_k, p.dim_v, wv, v_packed.data());
      }
      if (!v_in_place) v = v_packed.data();
      const int64_t rows = std::min(kFwdBlockQ, len_q - i0);
      const T* q = p.q + b * p.q_sb + h * p.q_sh + (p.q_begin(b) + i0) * p.q_sr;
      if (k_in_place)
        for (int64_t r = 0; r < rows; ++r)
          for (int64_t d = 0; d < p.dim_qk; ++d) q_scaled[r * p.dim_qk + d] = p.scale * q[r * p.q_sr + d];
      std::fill(m.begin(), m.end(), kNegInf);
      std::fill(l.begin(), l.end(), T(0));
      std::fill(acc.begin(), acc.end(), T(0));
      // Only the key tiles that meet this block's window (causal: keys up to the diagonal) are visited.
      const auto [key_begin, key_end] = p.key_range(b, i0, i0 + rows, W);
      const int64_t off = p.diag(b);
      for (int64_t j0 = key_begin; j0 < key_end; j0 += kFwdBlockK) {
        const int64_t cols = std::min(kFwdBlockK, key_end - j0);
        // One call per K^T panel: the panel (dim_qk x W) stays in L1 while the query rows
        // pass. Columns past `cols` in the last panel are padding; the softmax ignores them.
        // With a right window edge (causal), rows above the first one that sees a key of the
        // panel are skipped (whole micro-kernel row blocks only); apply_mask overwrites their
        // stale scores with -inf.
        for (int64_t c = 0; c < cols; c += W) {
          if (k_in_place) {
            const T* key_rows[W];
            for (int64_t j = 0; j < W; ++j) key_rows[j] = c + j < cols ? k + (j0 + c + j) * p.k_sr : nullptr;
            dot_panel<T>(rows, p.dim_qk, q_scaled.data(), p.dim_qk, key_rows, W, scores.data() + c, kFwdBlockK);
            continue;
          }
          const int64_t r0 =
              right >= 0 ? std::clamp<int64_t>(j0 + c - i0 - off - right, 0, rows) / row_step * row_step : 0;
          gemm_panel<T>(rows - r0, p.dim_qk, q + r0 * p.q_sr, p.q_sr, kt.data() + (j0 + c) * p.dim_qk, W,
                        scores.data() + r0 * kFwdBlockK + c, kFwdBlockK);
        }
        apply_mask(p, b, h, i0, rows, j0, cols, scores.data(), kFwdBlockK);
        sk.online_softmax(scores.data(), rows, cols, kFwdBlockK, m.data(), l.data(), alpha.data());
        // The row sums l take the probabilities before dropout; the accumulator those after.
        if (p.dropout.enabled) apply_dropout(p, b, h, i0, rows, j0, cols, scores.data(), kFwdBlockK);
        if (right >= 0 && j0 + cols - 1 > i0 + off + right) {
          // Tile crossing the right window edge (the diagonal, when causal): row r's
          // probabilities are exactly 0 past key i0 + r + off + right, so each chunk of rows
          // multiplies only the V rows its last row can see.
          for (int64_t r0 = 0; r0 < rows; r0 += causal_chunk) {
            const int64_t r1 = std::min(rows, r0 + causal_chunk);
            const int64_t depth = std::clamp<int64_t>(i0 + r1 + off + right - j0, 0, cols);
            gemm_rowmajor<T>(r1 - r0, depth, scores.data() + r0 * kFwdBlockK, kFwdBlockK, v + j0 * wv, wv,
                             pv.data() + r0 * wv, wv);
          }
        } else {
          gemm_rowmajor<T>(rows, cols, scores.data(), kFwdBlockK, v + j0 * wv, wv, pv.data(), wv);
        }
        sk.rescale_add(acc.data(), pv.data(), rows, wv, alpha.data());
      }
      T* o = out + Problem<T>::at(p.out, b, h, p.q_begin(b) + i0);
      T* row_lse = lse + Problem<T>::at(p.lse, b, h, p.q_begin(b) + i0);
      for (int64_t r = 0; r < rows; ++r) {
        // A row with every key masked (or none in its window, or a sequence without keys) has
        // l = 0: torch and FlashAttention return 0 there.
        const bool empty = l[r] == T(0);
        const T inv = empty ? T(0) : T(1) / l[r];
        for (int64_t c = 0; c < p.dim_v; ++c) o[r * p.out.sr + c] = acc[r * wv + c] * inv;
        row_lse[r] = empty ? kNegInf : m[r] + std::log(l[r]);
      }
    }
  });
}

// ---- backward --------------------------------------------------------------------------

template <typename T>
void backward_kernel(const Problem<T>& p, const T* grad_out, const T* out, const T* lse, T* grad_q, T* grad_k,
                     T* grad_v) {
  constexpr int64_t W = kSubWidth<T>;
  const SoftmaxKernels<T> sk = softmax_kernels<T>();
  const int64_t group = p.heads_q / p.heads_kv;
  const int64_t tasks = p.batch * p.heads_kv;
  const int64_t key_panels = (p.len_k + W - 1) / W;
  const int64_t wqk = (p.dim_qk + W - 1) / W * W;  // dQ tile's columns
  const int64_t o_sr = p.out.sr, dq_sr = p.grad_q.sr, dk_sr = p.grad_k.sr, dv_sr = p.grad_v.sr;
  // K's rows already form a panel (for dQ += dS K) when contiguous and whole vectors wide.
  const bool k_in_place = p.dim_qk == wqk && (p.k_sr == p.dim_qk || p.len_k == 1);
  const auto task_cost = [&](int64_t task) {
    const int64_t b = task / p.heads_kv, len_q = p.q_len(b);
    double cost = 0;
    for (int64_t i0 = 0; i0 < len_q; i0 += kBlockQ) cost += block_cost(p, b, i0, std::min(kBlockQ, len_q - i0), W);
    return cost * static_cast<double>(group);
  };
  parallel_for_balanced(tasks, task_cost, [&](int64_t begin, int64_t end) {
    std::vector<T> probs(kBlockQ * kBlockK), dprobs(kBlockQ * kBlockK), delta(kBlockQ);
    std::vector<T> kt(key_panels * W * p.dim_qk), vt(key_panels * W * p.dim_v), dq_tile(kBlockQ * wqk);
    std::vector<T> k_packed(k_in_place ? 0 : p.len_k * wqk);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t hk = task % p.heads_kv;
      const int64_t b = task / p.heads_kv;
      const int64_t len_q = p.q_len(b), len_k = p.k_len(b);
      if (len_q == 0 || len_k == 0) continue;  // no scores: the gradients stay 0
      const T* k = p.k + b * p.k_sb + hk * p.k_sh + p.k_begin(b) * p.k_sr;
      const T* v = p.v + b * p.v_sb + hk * p.v_sh + p.k_begin(b) * p.v_sr;
      T* dk = grad_k + Problem<T>::at(p.grad_k, b, hk, p.k_begin(b));
      T* dv = grad_v + Problem<T>::at(p.grad_v, b, hk, p.k_begin(b));
      // The GEMMs with a key-side right operand run on gemm_panel with this head's K^T,
      // V^T and K packed once. The scale is folded into K^T (S = scale Q K^T) and into V^T
      // and delta, which makes the dS that softmax_grad writes already scale * dS: the
      // dQ and dK products then need no alpha.
      pack_transposed(k, p.k_sr, len_k, p.dim_qk, p.scale, kt.data());
      pack_transposed(v, p.v_sr, len_k, p.dim_v, p.scale, vt.data());
      if (!k_in_place) pack_rows(k, p.k_sr, len_k, p.dim_qk, wqk, k_packed.data());
      const T* k_rows = k_in_place ? k : k_packed.data();
      for (int64_t h = hk * group; h < (hk + 1) * group; ++h) {
        for (int64_t i0 = 0; i0 < len_q; i0 += kBlockQ) {
          const int64_t rows = std::min(kBlockQ, len_q - i0);
          const int64_t row = p.q_begin(b) + i0;
          const T* q = p.q + b * p.q_sb + h * p.q_sh + row * p.q_sr;
          const T* dout = grad_out + Problem<T>::at(p.out, b, h, row);
          const T* o = out + Problem<T>::at(p.out, b, h, row);
          const T* row_lse = lse + Problem<T>::at(p.lse, b, h, row);
          T* dq = grad_q + Problem<T>::at(p.grad_q, b, h, row);
          // delta_i = scale * sum_c dO_ic O_ic  (scale * rowsum(P * dP), the softmax-Jacobian term;
          // with dropout O holds the dropped probabilities, and the identity still holds)
          for (int64_t r = 0; r < rows; ++r) {
            T sum = 0;
            for (int64_t c = 0; c < p.dim_v; ++c) sum += dout[r * o_sr + c] * o[r * o_sr + c];
            delta[r] = p.scale * sum;
          }
          const auto [key_begin, key_end] = p.key_range(b, i0, i0 + rows, W);
          for (int64_t j0 = key_begin; j0 < key_end; j0 += kBlockK) {
            const int64_t cols = std::min(kBlockK, key_end - j0);
            // S = scale Q K^T and scale dP = dO (scale V)^T, one K^T / V^T panel at a time
            // (padding columns past `cols` are ignored).
            for (int64_t c = 0; c < cols; c += W) {
              gemm_panel<T>(rows, p.dim_qk, q, p.q_sr, kt.data() + (j0 + c) * p.dim_qk, W, probs.data() + c,
                            kBlockK);
              gemm_panel<T>(rows, p.dim_v, dout, o_sr, vt.data() + (j0 + c) * p.dim_v, W, dprobs.data() + c,
                            kBlockK);
            }
            apply_mask(p, b, h, i0, rows, j0, cols, probs.data(), kBlockK);
            // Dropout: the gradient reaching P is dP * Z, and dV takes (P * Z)^T dO (Z: the mask scaled by 1 / (1 - p)).
            if (p.dropout.enabled) apply_dropout(p, b, h, i0, rows, j0, cols, dprobs.data(), kBlockK);
            sk.softmax_grad(probs.data(), dprobs.data(), rows, cols, kBlockK, row_lse, delta.data());
            if (p.dropout.enabled) apply_dropout(p, b, h, i0, rows, j0, cols, probs.data(), kBlockK);
            // dV += P^T dO ; dK += (scale dS)^T Q  (transposed left operands, read in place)
            gemm_out<T>(cols, p.dim_v, rows, probs.data(), 1, kBlockK, dout, o_sr, 1, dv + j0 * dv_sr, dv_sr,
                        /*accumulate=*/true);
            gemm_out<T>(cols, p.dim_qk, rows, dprobs.data(), 1, kBlockK, q, p.q_sr, 1, dk + j0 * dk_sr, dk_sr,
                        /*accumulate=*/true);
            // dQ += (scale dS) K, through a tile because gemm_panel overwrites its output.
            gemm_rowmajor<T>(rows, cols, dprobs.data(), kBlockK, k_rows + j0 * wqk, wqk, dq_tile.data(), wqk);
            for (int64_t r = 0; r < rows; ++r)
              for (int64_t d = 0; d < p.dim_qk; ++d) dq[r * dq_sr + d] += dq_tile[r * wqk + d];
          }
        }
      }
    }
  });
}

// ---- op boundary -----------------------------------------------------------------------

// Inputs for the kernels: float/double kept, half types widened to float; last dim contiguous.
at::Tensor kernel_input(const at::Tensor& t) {
  at::Tensor x = t;
  if (x.scalar_type() == at::kBFloat16 || x.scalar_type() == at::kHalf) x = x.to(at::kFloat);
  if (x.size(-1) > 1 && x.stride(-1) != 1) x = x.contiguous();
  return x;
}

void check_inputs(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                  const c10::optional<at::Tensor>& attn_mask) {
  TORCH_CHECK(q.dim() == 4, "attention: q must be (batch, heads, len_q, dim), got ", q.dim(), " dims");
  TORCH_CHECK(k.dim() == 4, "attention: k must be (batch, heads_kv, len_k, dim), got ", k.dim(), " dims");
  TORCH_CHECK(v.dim() == 4, "attention: v must be (batch, heads_kv, len_k, dim_v), got ", v.dim(), " dims");
  TORCH_CHECK(q.device().is_cpu() && k.device().is_cpu() && v.device().is_cpu(),
              "attention: q, k and v must be CPU tensors");
  const auto dtype = q.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kDouble || dtype == at::kBFloat16 || dtype == at::kHalf,
              "attention: q must be float32, float64, bfloat16 or float16, got ", dtype);
  TORCH_CHECK(k.scalar_type() == dtype && v.scalar_type() == dtype,
              "attention: q, k and v must share a dtype, got q ", dtype, ", k ", k.scalar_type(), ", v ",
              v.scalar_type());
  TORCH_CHECK(k.size(0) == q.size(0) && v.size(0) == q.size(0),
              "attention: q, k and v must have the same batch size, got ", q.size(0), ", ", k.size(0), ", ",
              v.size(0));
  TORCH_CHECK(v.size(1) == k.size(1), "attention: k and v must have the same number of heads, got ", k.size(1),
              " and ", v.size(1));
  TORCH_CHECK(k.size(1) > 0 && q.size(1) % k.size(1) == 0, "attention: the heads of q (", q.size(1),
              ") must be a multiple of the heads of k and v (", k.size(1), ")");
  TORCH_CHECK(v.size(2) == k.size(2), "attention: k and v must have the same length, got ", k.size(2), " and ",
              v.size(2));
  TORCH_CHECK(k.size(3) == q.size(3), "attention: q and k must have the same head dim, got ", q.size(3), " and ",
              k.size(3));
  if (attn_mask.has_value()) {
    const at::Tensor& mask = *attn_mask;
    TORCH_CHECK(mask.device().is_cpu(), "attention: attn_mask must be a CPU tensor");
    TORCH_CHECK(mask.scalar_type() == at::kBool || mask.scalar_type() == dtype,
                "attention: attn_mask must be bool or have q's dtype (", dtype, "), got ", mask.scalar_type());
    TORCH_CHECK(mask.dim() <= 4, "attention: attn_mask must have at most 4 dims, got ", mask.dim());
    const std::vector<int64_t> full{q.size(0), q.size(1), q.size(2), k.size(2)};
    const auto sizes = mask.sizes();
    for (int64_t d = 0; d < mask.dim(); ++d) {
      const int64_t want = full[4 - mask.dim() + d];
      TORCH_CHECK(sizes[d] == want || sizes[d] == 1, "attention: attn_mask of shape ", sizes,
                  " does not broadcast to (batch, heads, len_q, len_k) = ", at::IntArrayRef(full));
    }
  }
}

template <typename T>
Problem<T> make_problem(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& mask,
                        bool is_causal, double scale) {
  Problem<T> p;
  p.batch = q.size(0);
  p.heads_q = q.size(1);
  p.heads_kv = k.size(1);
  p.len_q = q.size(2);
  p.len_k = k.size(2);
  p.dim_qk = q.size(3);
  p.dim_v = v.size(3);
  p.q = q.data_ptr<T>();
  p.k = k.data_ptr<T>();
  p.v = v.data_ptr<T>();
  p.q_sb = q.stride(0), p.q_sh = q.stride(1), p.q_sr = q.stride(2);
  p.k_sb = k.stride(0), p.k_sh = k.stride(1), p.k_sr = k.stride(2);
  p.v_sb = v.stride(0), p.v_sh = v.stride(1), p.v_sr = v.stride(2);
  // A row stride must be at least the row length for the GEMMs' leading dimensions.
  if (p.len_q == 1) p.q_sr = std::max<int64_t>(p.q_sr, p.dim_qk);
  if (p.len_k == 1) p.k_sr = std::max<int64_t>(p.k_sr, p.dim_qk), p.v_sr = std::max<int64_t>(p.v_sr, p.dim_v);
  p.window_right = is_causal ? 0 : -1;  // top-left aligned, as torch
  p.scale = static_cast<T>(scale);
  // The outputs and gradients are contiguous (B, H, L, D); logsumexp (B, H, L).
  p.out = {p.heads_q * p.len_q * p.dim_v, p.len_q * p.dim_v, p.dim_v};
  p.lse = {p.heads_q * p.len_q, p.len_q, 1};
  p.grad_q = {p.heads_q * p.len_q * p.dim_qk, p.len_q * p.dim_qk, p.dim_qk};
  p.grad_k = {p.heads_kv * p.len_k * p.dim_qk, p.len_k * p.dim_qk, p.dim_qk};
  p.grad_v = {p.heads_kv * p.len_k * p.dim_v, p.len_k * p.dim_v, p.dim_v};
  if (mask.defined()) {
    const at::Tensor full = mask.expand({p.batch, p.heads_q, p.len_q, p.len_k});
    p.mask.stride_b = full.stride(0), p.mask.stride_h = full.stride(1);
    p.mask.stride_q = full.stride(2), p.mask.stride_k = full.stride(3);
    if (mask.scalar_type() == at::kBool) {
      p.mask.kind = Mask<T>::kBool;
      p.mask.boolean = full.data_ptr<bool>();
    } else {
      p.mask.kind = Mask<T>::kAdditive;
      p.mask.additive = full.data_ptr<T>();
    }
  }
  return p;
}

at::Tensor kernel_mask(const c10::optional<at::Tensor>& attn_mask, at::ScalarType kernel_dtype) {
  if (!attn_mask.has_value()) return at::Tensor();
  at::Tensor mask = *attn_mask;
  if (mask.scalar_type() != at::kBool && mask.scalar_type() != kernel_dtype) mask = mask.to(kernel_dtype);
  return mask;
}

std::tuple<at::Tensor, at::Tensor> attention_forward(const at::Tensor& q_in, const at::Tensor& k_in,
                                                     const at::Tensor& v_in,
                                                     const c10::optional<at::Tensor>& attn_mask, bool is_causal,
                                                     double scale) {
  check_inputs(q_in, k_in, v_in, attn_mask);
  const at::Tensor q = kernel_input(q_in), k = kernel_input(k_in), v = kernel_input(v_in);
  const at::Tensor mask = kernel_mask(attn_mask, q.scalar_type());
  const int64_t batch = q.size(0), heads = q.size(1), len_q = q.size(2);
  at::Tensor out = at::empty({batch, heads, len_q, v.size(3)}, q.options());
  at::Tensor lse = at::empty({batch, heads, len_q}, q.options());
  if (out.numel() > 0 || lse.numel() > 0) {
    AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "attention_forward", [&] {
      const Problem<scalar_t> p = make_problem<scalar_t>(q, k, v, mask, is_causal, scale);
      forward_kernel<scalar_t>(p, out.data_ptr<scalar_t>(), lse.data_ptr<scalar_t>());
    });
  }
  if (q_in.scalar_type() != q.scalar_type()) out = out.to(q_in.scalar_type());
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_backward(
    const at::Tensor& grad_out_in, const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& v_in,
    const at::Tensor& out_in, const at::Tensor& lse_in, const c10::optional<at::Tensor>& attn_mask, bool is_causal,
    double scale) {
  check_inputs(q_in, k_in, v_in, attn_mask);
  const std::vector<int64_t> out_shape{q_in.size(0), q_in.size(1), q_in.size(2), v_in.size(3)};
  TORCH_CHECK(grad_out_in.sizes() == at::IntArrayRef(out_shape), "attention_backward: grad_out must have shape ",
              at::IntArrayRef(out_shape), ", got ", grad_out_in.sizes());
  TORCH_CHECK(out_in.sizes() == at::IntArrayRef(out_shape), "attention_backward: out must have shape ",
              at::IntArrayRef(out_shape), ", got ", out_in.sizes());
  TORCH_CHECK(lse_in.sizes() == at::IntArrayRef({q_in.size(0), q_in.size(1), q_in.size(2)}),
              "attention_backward: logsumexp must have shape (batch, heads, len_q), got ", lse_in.sizes());
  const at::Tensor q = kernel_input(q_in), k = kernel_input(k_in), v = kernel_input(v_in);
  const auto kdtype = q.scalar_type();
  const at::Tensor grad_out = grad_out_in.to(kdtype).contiguous();
  const at::Tensor out = out_in.to(kdtype).contiguous();
  const at::Tensor lse = lse_in.to(kdtype).contiguous();
  const at::Tensor mask = kernel_mask(attn_mask, kdtype);
  at::Tensor grad_q = at::zeros(q.sizes(), q.options().memory_format(at::MemoryFormat::Contiguous));
  at::Tensor grad_k = at::zeros(k.sizes(), k.options().memory_format(at::MemoryFormat::Contiguous));
  at::Tensor grad_v = at::zeros(v.sizes(), v.options().memory_format(at::MemoryFormat::Contiguous));
  if (grad_q.numel() > 0 && k.size(2) > 0) {
    AT_DISPATCH_FLOATING_TYPES(kdtype, "attention_backward", [&] {
      const Problem<scalar_t> p = make_problem<scalar_t>(q, k, v, mask, is_causal, scale);
      backward_kernel<scalar_t>(p, grad_out.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(),
                                lse.data_ptr<scalar_t>(), grad_q.data_ptr<scalar_t>(), grad_k.data_ptr<scalar_t>(),
                                grad_v.data_ptr<scalar_t>());
    });
  }
  const auto dtype = q_in.scalar_type();
  return {grad_q.to(dtype), grad_k.to(dtype), grad_v.to(dtype)};
}

// ---- variable-length batches (FlashAttention's packed layout) ----------------------------
// q (total_q, Hq, D), k (total_k, Hk, D), v (total_k, Hk, Dv); sequence b owns rows
// [cu_seqlens[b], cu_seqlens[b + 1]). Causal and windows are aligned bottom-right (query i of a
// sequence sees key i + len_k - len_q, as FlashAttention-2 >= 2.1). out (total_q, Hq, Dv),
// logsumexp (Hq, total_q). The same kernels as the dense op, with per-sequence offsets.

void check_varlen(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& cu_q,
                  const at::Tensor& cu_k, int64_t max_q, int64_t max_k, int64_t window_left, int64_t window_right) {
  TORCH_CHECK(q.dim() == 3, "attention_varlen: q must be (total_q, heads, dim), got ", q.dim(), " dims");
  TORCH_CHECK(k.dim() == 3, "attention_varlen: k must be (total_k, heads_kv, dim), got ", k.dim(), " dims");
  TORCH_CHECK(v.dim() == 3, "attention_varlen: v must be (total_k, heads_kv, dim_v), got ", v.dim(), " dims");
  TORCH_CHECK(q.device().is_cpu() && k.device().is_cpu() && v.device().is_cpu(),
              "attention_varlen: q, k and v must be CPU tensors");
  const auto dtype = q.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kDouble || dtype == at::kBFloat16 || dtype == at::kHalf,
              "attention_varlen: q must be float32, float64, bfloat16 or float16, got ", dtype);
  TORCH_CHECK(k.scalar_type() == dtype && v.scalar_type() == dtype, "attention_varlen: q, k and v must share a dtype");
  TORCH_CHECK(v.size(0) == k.size(0) && v.size(1) == k.size(1),
              "attention_varlen: k and v must have the same total length and heads");
  TORCH_CHECK(k.size(1) > 0 && q.size(1) % k.size(1) == 0, "attention_varlen: the heads of q (", q.size(1),
              ") must be a multiple of the heads of k and v (", k.size(1), ")");
  TORCH_CHECK(k.size(2) == q.size(2), "attention_varlen: q and k must have the same head dim");
  for (const auto* cu : {&cu_q, &cu_k}) {
    const char* name = cu == &cu_q ? "cu_seqlens_q" : "cu_seqlens_k";
    TORCH_CHECK(cu->scalar_type() == at::kInt && cu->dim() == 1 && cu->device().is_cpu() && cu->is_contiguous(),
                "attention_varlen: ", name, " must be a contiguous 1-D int32 CPU tensor");
  }
  TORCH_CHECK(cu_q.numel() >= 1 && cu_q.numel() == cu_k.numel(),
              "attention_varlen: cu_seqlens_q and cu_seqlens_k must both hold batch + 1 offsets");
  TORCH_CHECK(window_left >= -1 && window_right >= -1, "attention_varlen: window sizes must be >= -1");
  const int64_t batch = cu_q.numel() - 1;
  const int32_t* oq = cu_q.data_ptr<int32_t>();
  const int32_t* ok = cu_k.data_ptr<int32_t>();
  TORCH_CHECK(oq[0] == 0 && ok[0] == 0, "attention_varlen: cu_seqlens_q and cu_seqlens_k must start at 0");
  for (int64_t b = 0; b < batch; ++b) {
    const int64_t lq = oq[b + 1] - oq[b], lk = ok[b + 1] - ok[b];
    TORCH_CHECK(lq >= 0 && lk >= 0, "attention_varlen: cu_seqlens must not decrease (sequence ", b, ")");
    TORCH_CHECK(lq <= max_q && lk <= max_k, "attention_varlen: sequence ", b, " has ", lq, " queries and ", lk,
                " keys, more than max_seqlen_q = ", max_q, " / max_seqlen_k = ", max_k);
  }
  TORCH_CHECK(oq[batch] == q.size(0), "attention_varlen: cu_seqlens_q[-1] = ", oq[batch], " but q has ", q.size(0),
              " rows");
  TORCH_CHECK(ok[batch] == k.size(0), "attention_varlen: cu_seqlens_k[-1] = ", ok[batch], " but k has ", k.size(0),
              " rows");
}

template <typename T>
Problem<T> make_varlen_problem(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& cu_q,
                               const at::Tensor& cu_k, int64_t max_q, int64_t max_k, bool causal, double scale,
                               int64_t window_left, int64_t window_right, const Dropout& dropout) {
  Problem<T> p;
  p.batch = cu_q.numel() - 1;
  p.heads_q = q.size(1);
  p.heads_kv = k.size(1);
  p.len_q = max_q;
  p.len_k = max_k;
  p.dim_qk = q.size(2);
  p.dim_v = v.size(2);
  p.q = q.data_ptr<T>();
  p.k = k.data_ptr<T>();
  p.v = v.data_ptr<T>();
  // q, k and v are contiguous here: a row is every head of one token.
  p.q_sb = 0, p.q_sh = p.dim_qk, p.q_sr = p.heads_q * p.dim_qk;
  p.k_sb = 0, p.k_sh = p.dim_qk, p.k_sr = p.heads_kv * p.dim_qk;
  p.v_sb = 0, p.v_sh = p.dim_v, p.v_sr = p.heads_kv * p.dim_v;
  p.out = {0, p.dim_v, p.heads_q * p.dim_v};
  p.lse = {0, q.size(0), 1};
  p.grad_q = {0, p.dim_qk, p.heads_q * p.dim_qk};
  p.grad_k = {0, p.dim_qk, p.heads_kv * p.dim_qk};
  p.grad_v = {0, p.dim_v, p.heads_kv * p.dim_v};
  p.cu_q = cu_q.data_ptr<int32_t>();
  p.cu_k = cu_k.data_ptr<int32_t>();
  p.window_left = window_left;
  p.window_right = causal ? 0 : window_right;
  p.bottom_right = true;
  p.scale = static_cast<T>(scale);
  p.dropout = dropout;
  return p;
}

at::Tensor varlen_input(const at::Tensor& t) { return kernel_input(t).contiguous(); }

std::tuple<at::Tensor, at::Tensor> attention_varlen_forward(
    const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& v_in, const at::Tensor& cu_q,
    const at::Tensor& cu_k, int64_t max_q, int64_t max_k, bool causal, double scale, int64_t window_left,
    int64_t window_right, double dropout_p, const c10::optional<at::Tensor>& dropout_seed) {
  check_varlen(q_in, k_in, v_in, cu_q, cu_k, max_q, max_k, window_left, window_right);
  const Dropout dropout = make_dropout(dropout_p, dropout_seed);
  const at::Tensor q = varlen_input(q_in), k = varlen_input(k_in), v = varlen_input(v_in);
  at::Tensor out = at::empty({q.size(0), q.size(1), v.size(2)}, q.options());
  at::Tensor lse = at::empty({q.size(1), q.size(0)}, q.options());
  if (out.numel() > 0 || lse.numel() > 0) {
    AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "attention_varlen_forward", [&] {
      const Problem<scalar_t> p = make_varlen_problem<scalar_t>(q, k, v, cu_q, cu_k, max_q, max_k, causal, scale,
                                                                window_left, window_right, dropout);
      forward_kernel<scalar_t>(p, out.data_ptr<scalar_t>(), lse.data_ptr<scalar_t>());
    });
  }
  if (q_in.scalar_type() != q.scalar_type()) out = out.to(q_in.scalar_type());
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_varlen_backward(
    const at::Tensor& grad_out_in, const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& v_in,
    const at::Tensor& out_in, const at::Tensor& lse_in, const at::Tensor& cu_q, const at::Tensor& cu_k, int64_t max_q,
    int64_t max_k, bool causal, double scale, int64_t window_left, int64_t window_right, double dropout_p,
    const c10::optional<at::Tensor>& dropout_seed) {
  check_varlen(q_in, k_in, v_in, cu_q, cu_k, max_q, max_k, window_left, window_right);
  const Dropout dropout = make_dropout(dropout_p, dropout_seed);
  const std::vector<int64_t> out_shape{q_in.size(0), q_in.size(1), v_in.size(2)};
  TORCH_CHECK(grad_out_in.sizes() == at::IntArrayRef(out_shape), "attention_varlen_backward: grad_out must have shape ",
              at::IntArrayRef(out_shape), ", got ", grad_out_in.sizes());
  TORCH_CHECK(out_in.sizes() == at::IntArrayRef(out_shape), "attention_varlen_backward: out must have shape ",
              at::IntArrayRef(out_shape), ", got ", out_in.sizes());
  TORCH_CHECK(lse_in.sizes() == at::IntArrayRef({q_in.size(1), q_in.size(0)}),
              "attention_varlen_backward: logsumexp must have shape (heads, total_q), got ", lse_in.sizes());
  const at::Tensor q = varlen_input(q_in), k = varlen_input(k_in), v = varlen_input(v_in);
  const auto kdtype = q.scalar_type();
  const at::Tensor grad_out = grad_out_in.to(kdtype).contiguous();
  const at::Tensor out = out_in.to(kdtype).contiguous();
  const at::Tensor lse = lse_in.to(kdtype).contiguous();
  at::Tensor grad_q = at::zeros(q.sizes(), q.options());
  at::Tensor grad_k = at::zeros(k.sizes(), k.options());
  at::Tensor grad_v = at::zeros(v.sizes(), v.options());
  if (grad_q.numel() > 0 && k.size(0) > 0) {
    AT_DISPATCH_FLOATING_TYPES(kdtype, "attention_varlen_backward", [&] {
      const Problem<scalar_t> p = make_varlen_problem<scalar_t>(q, k, v, cu_q, cu_k, max_q, max_k, causal, scale,
                                                                window_left, window_right, dropout);
      backward_kernel<scalar_t>(p, grad_out.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(),
                                lse.data_ptr<scalar_t>(), grad_q.data_ptr<scalar_t>(), grad_k.data_ptr<scalar_t>(),
                                grad_v.data_ptr<scalar_t>());
    });
  }
  const auto dtype = q_in.scalar_type();
  return {grad_q.to(dtype), grad_k.to(dtype), grad_v.to(dtype)};
}

// The dropout multipliers (0 or 1 / (1 - p)) the kernels draw for (batch, heads, len_q, len_k), as a
// float64 tensor: for tests that check the kernels against a reference given the same mask.
at::Tensor attention_dropout_mask(int64_t batch, int64_t heads, int64_t len_q, int64_t len_k, double dropout_p,
                                  const at::Tensor& dropout_seed) {
  TORCH_CHECK(batch >= 0 && heads >= 0 && len_q >= 0 && len_k >= 0, "attention_dropout_mask: sizes must be >= 0");
  TORCH_CHECK(dropout_p > 0.0, "attention_dropout_mask: dropout_p must be > 0, got ", dropout_p);
  Problem<double> p{};
  p.batch = batch, p.heads_q = heads, p.len_q = len_q, p.len_k = len_k;
  p.dropout = make_dropout(dropout_p, dropout_seed);
  at::Tensor z = at::ones({batch, heads, len_q, len_k}, at::kDouble);
  double* data = z.data_ptr<double>();
  for (int64_t b = 0; b < batch; ++b)
    for (int64_t h = 0; h < heads; ++h)
      apply_dropout(p, b, h, 0, len_q, 0, len_k, data + (b * heads + h) * len_q * len_k, len_k);
  return z;
}

}  // namespace

}  // namespace genfast::cpu::attention

TORCH_LIBRARY_IMPL(genfast, CPU, m) {
  m.impl("attention_forward", &genfast::cpu::attention::attention_forward);
  m.impl("attention_backward", &genfast::cpu::attention::attention_backward);
  m.impl("attention_varlen_forward", &genfast::cpu::attention::attention_varlen_forward);
  m.impl("attention_varlen_backward", &genfast::cpu::attention::attention_varlen_backward);
  m.impl("attention_dropout_mask", &genfast::cpu::attention::attention_dropout_mask);
}
