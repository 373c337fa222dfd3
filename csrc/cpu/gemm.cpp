// Packed-panel GEMM micro-kernels (see gemm.h), one copy per SIMD level.
#include "cpu/gemm.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <cstring>
#include <type_traits>
#include <vector>

#include "cpu/memory.h"
#include "cpu/simd.h"

namespace genfast::cpu {
namespace {

// GCC vectors of the machine's native width: VB = 16 (SSE), 32 (AVX2) or 64 bytes
// (AVX-512). A micro-kernel call covers 64 bytes of C columns, i.e. 64 / VB vectors.
// (Vector types need explicit specialisations: an alias template would silently drop
// the attribute on the dependent type.)
template <typename T, int VB>
struct VecOf;
#define GENFAST_VEC(T, VB)                                       \
  template <>                                                    \
  struct VecOf<T, VB> {                                          \
    typedef T type __attribute__((vector_size(VB), aligned(4))); /* unaligned loads */ \
  };
GENFAST_VEC(float, 16) GENFAST_VEC(float, 32) GENFAST_VEC(float, 64)
GENFAST_VEC(double, 16) GENFAST_VEC(double, 32) GENFAST_VEC(double, 64)
#undef GENFAST_VEC

// C[MR x S] (+)= [A1 | A2][MR x (K1 + K2)] * B[(K1 + K2) x S], S = kSubWidth<T> (64 bytes), B rows
// `ldb` apart: B's first K1 rows multiply A1, the next K2 rows A2 (K2 = 0 for a plain product). The
// two left operands let a caller multiply [x_t | h_{t-1}] by one stacked weight without copying
// them side by side. The MR x (64 / VB) accumulators stay in registers for both K loops.
// A's layout is a template argument (kColumnsA below), its element (m, k) at A[m * lda + k]
// (rows contiguous) or A[k * lda + m] (columns contiguous: a transposed view such as dG^T,
// whose MR values for one k are then adjacent).
template <typename T>
struct LeftOperands {
  int64_t K1;
  const T* A1;
  int64_t lda1;
  int64_t K2;
  const T* A2;
  int64_t lda2;
  bool accumulate = false;  // C += product instead of C = product

  template <bool kColumnsA>
  LeftOperands rows_from(int64_t m) const {
    if constexpr (kColumnsA) return {K1, A1 + m, lda1, 0, nullptr, 0, accumulate};
    return {K1, A1 + m * lda1, lda1, K2, A2 ? A2 + m * lda2 : A2, lda2, accumulate};
  }
};

// acc[MR][NS * 64 / VB] += A[MR x K] * B[K x NS*S]: NS slices of the panel at once, slice j at
// B + j * slice_stride. On AVX-512 two slices per call (NS = 2) let each broadcast of A feed two FMAs:
// one slice needs 13 loads for 12 FMAs per k, more than the load ports issue beside two FMA pipes.
template <typename T, int VB, int MR, bool kColumnsA, int NS = 1>
inline __attribute__((always_inline)) void accumulate_k(typename VecOf<T, VB>::type (&acc)[MR][NS * 64 / VB],
                                                        int64_t K, const T* A, int64_t lda, const T* B, int64_t ldb,
                                                        int64_t slice_stride) {
  using V = typename VecOf<T, VB>::type;
  constexpr int NV = 64 / VB;
  constexpr int L = VB / static_cast<int>(sizeof(T));
  for (int64_t k = 0; k < K; ++k) {
    V b[NS * NV];
#pragma GCC unroll 4
    for (int j = 0; j < NS; ++j)
#pragma GCC unroll 4
      for (int v = 0; v < NV; ++v) b[j * NV + v] = *reinterpret_cast<const V*>(B + j * slice_stride + k * ldb + v * L);
#pragma GCC unroll 16
    for (int r = 0; r < MR; ++r) {
      const T a = kColumnsA ? A[k * lda + r] : A[r * lda + k];
#pragma GCC unroll 8
      for (int v = 0; v < NS * NV; ++v) acc[r][v] += a * b[v];
    }
  }
}

// C[MR x NS*S] (+)= A * B over NS slices (see accumulate_k); C's slice j starts at C + j * S.
template <typename T, int VB, int MR, bool kColumnsA, int NS = 1>
inline __attribute__((always_inline)) void micro_kernel(const LeftOperands<T>& a, const T* B, int64_t ldb, T* C,
                                                        int64_t ldc, int64_t slice_stride = 0) {
  using V = typename VecOf<T, VB>::type;
  constexpr int NV = 64 / VB;
  constexpr int L = VB / static_cast<int>(sizeof(T));
  V acc[MR][NS * NV];
#pragma GCC unroll 16
  for (int r = 0; r < MR; ++r)
#pragma GCC unroll 8
    for (int v = 0; v < NS * NV; ++v) acc[r][v] = a.accumulate ? *reinterpret_cast<const V*>(C + r * ldc + v * L) : V{};
  accumulate_k<T, VB, MR, kColumnsA, NS>(acc, a.K1, a.A1, a.lda1, B, ldb, slice_stride);
  if (!kColumnsA && a.K2 > 0)
    accumulate_k<T, VB, MR, kColumnsA, NS>(acc, a.K2, a.A2, a.lda2, B + a.K1 * ldb, ldb, slice_stride);
#pragma GCC unroll 16
  for (int r = 0; r < MR; ++r)
#pragma GCC unroll 8
    for (int v = 0; v < NS * NV; ++v) *reinterpret_cast<V*>(C + r * ldc + v * L) = acc[r][v];
}

// The row loop over NS slices starting at `b` (C at c): full blocks of MR rows, then one call for the rest.
template <typename T, int VB, int MR, bool kColumnsA, int NS>
inline __attribute__((always_inline)) void slice_rows(int64_t M, const LeftOperands<T>& a, const T* b,
                                                      int64_t slice_stride, int64_t ldb, T* c, int64_t ldc) {
  const int64_t full = M / MR * MR, rest = M - full;
  for (int64_t m = 0; m < full; m += MR)
    micro_kernel<T, VB, MR, kColumnsA, NS>(a.template rows_from<kColumnsA>(m), b, ldb, c + m * ldc, ldc, slice_stride);
  if (rest == 0) return;
  const LeftOperands<T> tail = a.template rows_from<kColumnsA>(full);
  T* ct = c + full * ldc;
  // A switch over compile-time row counts keeps the tail in registers too.
  switch (rest) {
#define GENFAST_TAIL(R) \
  case R:               \
    if constexpr (R < MR) micro_kernel<T, VB, R, kColumnsA, NS>(tail, b, ldb, ct, ldc, slice_stride); \
    break;
    GENFAST_TAIL(1) GENFAST_TAIL(2) GENFAST_TAIL(3) GENFAST_TAIL(4) GENFAST_TAIL(5) GENFAST_TAIL(6)
    GENFAST_TAIL(7) GENFAST_TAIL(8) GENFAST_TAIL(9) GENFAST_TAIL(10) GENFAST_TAIL(11)
#undef GENFAST_TAIL
    default: break;
  }
}

// Slices per micro-kernel call: two where the register file holds 2 x MR accumulators (AVX-512).
template <int VB>
constexpr int kSlicesPerCall = VB == 64 ? 2 : 1;

// The panel: pairs of slices (AVX-512), then any slice left, each with every row of A.
template <typename T, int VB, int MR, bool kColumnsA>
inline __attribute__((always_inline)) void panel_rows(int64_t M, const LeftOperands<T>& a, const T* panel,
                                                      int64_t width, int64_t slice_stride, int64_t ldb, T* C,
                                                      int64_t ldc) {
  constexpr int64_t S = kSubWidth<T>;
  constexpr int NS = kSlicesPerCall<VB>;
  // Column slices outermost: their K x 16 blocks of the panel stay in cache while every row block of
  // A streams past them.
  int64_t s = 0;
  if constexpr (NS > 1)
    for (; s + NS * S <= width; s += NS * S)
      slice_rows<T, VB, MR, kColumnsA, NS>(M, a, panel + s / S * slice_stride, slice_stride, ldb, C + s, ldc);
  for (; s < width; s += S)
    slice_rows<T, VB, MR, kColumnsA, 1>(M, a, panel + s / S * slice_stride, slice_stride, ldb, C + s, ldc);
}

// The lanes of two vectors x, y regrouped in blocks of S lanes: even = x's even blocks then y's
// even blocks, odd = the odd ones. even + odd adds the two halves of each block's pair, keeping x's
// partial sums in the first half of the result and y's in the second.
template <typename T, typename V, int L, int S>
inline __attribute__((always_inline)) void add_block_pairs(const V& x, const V& y, V& sum) {
  using I = std::conditional_t<sizeof(T) == 4, int32_t, int64_t>;
  typedef I Mask __attribute__((vector_size(sizeof(V))));
  Mask even, odd;
#pragma GCC unroll 16
  for (int i = 0; i < L; ++i) {
    const int block = i / S, half = L / (2 * S);
    const int source = block < half ? 2 * block : L / S + 2 * (block - half);
    even[i] = source * S + i % S;
    odd[i] = even[i] + S;
  }
  sum = __builtin_shuffle(x, y, even) + __builtin_shuffle(x, y, odd);
}

// out[r] = the sum of v[r]'s L lanes, for R vectors (R a power of two). A transposing tree:
// each level adds pairs of vectors block-wise (add_block_pairs), halving the vectors and the lanes
// each source keeps, so R sums cost about 3R vector operations instead of R chains of L dependent
// scalar additions: as long as the dot products' own loop when K is a few times L (H = 128).
template <typename T, typename V, int L, int R>
inline __attribute__((always_inline)) void lane_sums(V (&v)[R], T* out) {
  int n = R, lanes = L;  // vectors left; lanes each source holds in them
  auto level = [&](auto block) {
    constexpr int S = decltype(block)::value;
#pragma GCC unroll 8
    for (int i = 0; i < n / 2; ++i) add_block_pairs<T, V, L, S>(v[2 * i], v[2 * i + 1], v[i]);
    n /= 2;
    lanes /= 2;
  };
  if constexpr (R >= 2 && L >= 2) level(std::integral_constant<int, L / 2>{});
  if constexpr (R >= 4 && L >= 4) level(std::integral_constant<int, L / 4>{});
  if constexpr (R >= 8 && L >= 8) level(std::integral_constant<int, L / 8>{});
  static_assert(R <= 8, "lane_sums: at most 8 vectors");
  const int per_vector = R / n;  // sources in each vector left, `lanes` lanes apiece
#pragma GCC unroll 8
  for (int j = 0; j < n; ++j)
#pragma GCC unroll 8
    for (int s = 0; s < per_vector; ++s) {
      T sum = v[j][s * lanes];
      for (int l = 1; l < lanes; ++l) sum += v[j][s * lanes + l];
      out[j * per_vector + s] = sum;
    }
}

// C[m][c] = dot(A row m, weight row c) for R weight rows c at once: each weight row is
// streamed once and used for all MB rows of A. The R * MB vector accumulators are
// independent chains: with one row of A (a decode step) a single chain would wait on
// the FMA latency every step, so R rows of W share the loop to keep the FMA units fed.
template <typename T, int VB, int MB, int R>
inline __attribute__((always_inline)) void dot_group(int64_t K, const T* A, int64_t lda, const T* const* rows, T* C,
                                                     int64_t ldc) {
  using V = typename VecOf<T, VB>::type;
  constexpr int L = VB / static_cast<int>(sizeof(T));
  const int64_t K_vec = K / L * L;
  V acc[R][MB];
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 8
    for (int m = 0; m < MB; ++m) acc[r][m] = V{};
  for (int64_t k = 0; k < K_vec; k += L) {
    V a[MB];
#pragma GCC unroll 8
    for (int m = 0; m < MB; ++m) a[m] = *reinterpret_cast<const V*>(A + m * lda + k);
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
      const V w = *reinterpret_cast<const V*>(rows[r] + k);
#pragma GCC unroll 8
      for (int m = 0; m < MB; ++m) acc[r][m] += w * a[m];
    }
  }
#pragma GCC unroll 8
  for (int m = 0; m < MB; ++m) {
    V sums[R];
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) sums[r] = acc[r][m];
    T dots[R];
    lane_sums<T, V, L, R>(sums, dots);
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
      T sum = dots[r];
      for (int64_t k = K_vec; k < K; ++k) sum += rows[r][k] * A[m * lda + k];
      C[m * ldc + r] = sum;
    }
  }
}

// Weight rows per group: R * MB accumulators, at most 8 (plus MB vectors of A, within 16 registers).
template <int MB>
constexpr int kDotGroup = MB == 1 ? 8 : MB == 2 ? 4 : MB <= 4 ? 2 : 1;

template <typename T, int VB, int MB>
inline __attribute__((always_inline)) void dot_rows(int64_t K, const T* A, int64_t lda, const T* const* rows,
                                                    int64_t width, T* C, int64_t ldc) {
  constexpr int R = kDotGroup<MB>;
  int64_t c = 0;
  while (c < width) {
    bool whole = c + R <= width;  // a full group of R weight rows, none of them absent
    for (int r = 0; whole && r < R; ++r) whole = rows[c + r] != nullptr;
    if (whole) {
      dot_group<T, VB, MB, R>(K, A, lda, rows + c, C + c, ldc);
      c += R;
      continue;
    }
    if (rows[c] == nullptr)
      for (int m = 0; m < MB; ++m) C[m * ldc + c] = T(0);
    else
      dot_group<T, VB, MB, 1>(K, A, lda, rows + c, C + c, ldc);
    ++c;
  }
}

template <typename T, int VB>
inline __attribute__((always_inline)) void dot_panel_rows(int64_t M, int64_t K, const T* A, int64_t lda,
                                                          const T* const* rows, int64_t width, T* C, int64_t ldc) {
  switch (M) {
#define GENFAST_DOT(R) \
  case R:              \
    return dot_rows<T, VB, R>(K, A, lda, rows, width, C, ldc);
    GENFAST_DOT(1) GENFAST_DOT(2) GENFAST_DOT(3) GENFAST_DOT(4) GENFAST_DOT(5) GENFAST_DOT(6) GENFAST_DOT(7)
    GENFAST_DOT(8)
#undef GENFAST_DOT
    default: break;
  }
}

template <typename T>
GENFAST_TARGET_AVX512 void dot_panel_avx512(int64_t M, int64_t K, const T* A, int64_t lda, const T* const* rows,
                                            int64_t width, T* C, int64_t ldc) {
  dot_panel_rows<T, 64>(M, K, A, lda, rows, width, C, ldc);
}
template <typename T>
GENFAST_TARGET_AVX2 void dot_panel_avx2(int64_t M, int64_t K, const T* A, int64_t lda, const T* const* rows,
                                        int64_t width, T* C, int64_t ldc) {
  dot_panel_rows<T, 32>(M, K, A, lda, rows, width, C, ldc);
}
template <typename T>
void dot_panel_baseline(int64_t M, int64_t K, const T* A, int64_t lda, const T* const* rows, int64_t width, T* C,
                        int64_t ldc) {
  dot_panel_rows<T, 16>(M, K, A, lda, rows, width, C, ldc);
}

// Rows per micro-kernel call: as many accumulators as the register file holds
// while leaving room for the B vector and the broadcast A value.
constexpr int kRowsAVX512 = 12;  // 12 of 32 zmm
constexpr int kRowsAVX2 = 6;     // 12 of 16 ymm (each 64-byte vector is two ymm)
constexpr int kRowsBaseline = 3; // 12 of 16 xmm

template <typename T, bool kColumnsA>
GENFAST_TARGET_AVX512 void gemm_panel_avx512(int64_t M, const LeftOperands<T>& a, const T* panel, int64_t width,
                      int64_t slice_stride, int64_t ldb, T* C, int64_t ldc) {
  panel_rows<T, 64, kRowsAVX512, kColumnsA>(M, a, panel, width, slice_stride, ldb, C, ldc);
}

template <typename T, bool kColumnsA>
GENFAST_TARGET_AVX2 void gemm_panel_avx2(int64_t M, const LeftOperands<T>& a, const T* panel, int64_t width,
                      int64_t slice_stride, int64_t ldb, T* C, int64_t ldc) {
  panel_rows<T, 32, kRowsAVX2, kColumnsA>(M, a, panel, width, slice_stride, ldb, C, ldc);
}

template <typename T, bool kColumnsA>
void gemm_panel_baseline(int64_t M, const LeftOperands<T>& a, const T* panel, int64_t width,
                      int64_t slice_stride, int64_t ldb, T* C, int64_t ldc) {
  panel_rows<T, 16, kRowsBaseline, kColumnsA>(M, a, panel, width, slice_stride, ldb, C, ldc);
}

}  // namespace

namespace {

// B element (k, c) at b[(c / S) * slice_stride + k * ldb + c % S], S = kSubWidth<T>.
template <typename T, bool kColumnsA = false>
void gemm_strided(int64_t M, const LeftOperands<T>& a, const T* B, int64_t width, int64_t slice_stride,
                  int64_t ldb, T* C, int64_t ldc) {
  if (M <= 0) return;
  if (a.K1 + a.K2 == 0) {
    if (!a.accumulate)
      for (int64_t m = 0; m < M; ++m) std::fill(C + m * ldc, C + m * ldc + width, T(0));
    return;
  }
  switch (simd_level()) {
    case SimdLevel::kAVX512: return gemm_panel_avx512<T, kColumnsA>(M, a, B, width, slice_stride, ldb, C, ldc);
    case SimdLevel::kAVX2: return gemm_panel_avx2<T, kColumnsA>(M, a, B, width, slice_stride, ldb, C, ldc);
    default: return gemm_panel_baseline<T, kColumnsA>(M, a, B, width, slice_stride, ldb, C, ldc);
  }
}

}  // namespace

template <typename T>
void gemm_panel(int64_t M, int64_t K, const T* A, int64_t lda, const T* panel, int64_t width, T* C, int64_t ldc) {
  gemm_strided<T>(M, {K, A, lda, 0, nullptr, 0}, panel, width, K * kSubWidth<T>, kSubWidth<T>, C, ldc);
}

template <typename T>
void gemm_panel_stacked(int64_t M, int64_t K1, const T* A1, int64_t lda1, int64_t K2, const T* A2, int64_t lda2,
                        const T* panel, int64_t width, T* C, int64_t ldc) {
  const int64_t K = K1 + K2;
  gemm_strided<T>(M, {K1, A1, lda1, K2, A2, lda2}, panel, width, K * kSubWidth<T>, kSubWidth<T>, C, ldc);
}

template <typename T>
void gemm_rowmajor(int64_t M, int64_t K, const T* A, int64_t lda, const T* B, int64_t width, T* C, int64_t ldc) {
  gemm_strided<T>(M, {K, A, lda, 0, nullptr, 0}, B, width, kSubWidth<T>, width, C, ldc);
}

template void gemm_rowmajor<float>(int64_t, int64_t, const float*, int64_t, const float*, int64_t, float*, int64_t);
template void gemm_rowmajor<double>(int64_t, int64_t, const double*, int64_t, const double*, int64_t, double*,
                                    int64_t);

template <typename T>
void dot_panel(int64_t M, int64_t K, const T* A, int64_t lda, const T* const* rows, int64_t width, T* C, int64_t ldc) {
  for (int64_t m0 = 0; m0 < M; m0 += kMaxDotRows) {
    const int64_t mb = std::min(kMaxDotRows, M - m0);
    const T* a = A + m0 * lda;
    T* c = C + m0 * ldc;
    switch (simd_level()) {
      case SimdLevel::kAVX512: dot_panel_avx512<T>(mb, K, a, lda, rows, width, c, ldc); break;
      case SimdLevel::kAVX2: dot_panel_avx2<T>(mb, K, a, lda, rows, width, c, ldc); break;
      default: dot_panel_baseline<T>(mb, K, a, lda, rows, width, c, ldc); break;
    }
  }
}

template void dot_panel<float>(int64_t, int64_t, const float*, int64_t, const float* const*, int64_t, float*, int64_t);
template void dot_panel<double>(int64_t, int64_t, const double*, int64_t, const double* const*, int64_t, double*,
                                int64_t);

template void gemm_panel<float>(int64_t, int64_t, const float*, int64_t, const float*, int64_t, float*, int64_t);
template void gemm_panel_stacked<float>(int64_t, int64_t, const float*, int64_t, int64_t, const float*, int64_t,
                                        const float*, int64_t, float*, int64_t);
template void gemm_panel_stacked<double>(int64_t, int64_t, const double*, int64_t, int64_t, const double*, int64_t,
                                         const double*, int64_t, double*, int64_t);
template void gemm_panel<double>(int64_t, int64_t, const double*, int64_t, const double*, int64_t, double*, int64_t);

namespace {

// Columns per panel (four micro-kernel slices) and rows per tile (a multiple of every
// level's micro-kernel rows) of matmul's (row block x panel) work items.
constexpr int64_t kPanelWidth = 64;
constexpr int64_t kTileRows = 96;
// K is multiplied in chunks of this many rows: a chunk of a row block of A (96 x 256) and of a
// panel (256 x 64) stay in L2 while the tile accumulates, however long K is (the weight
// gradients sum over every time step).
constexpr int64_t kKBlock = 256;

// matmul for a few rows of A with contiguous rows, B's columns contiguous (stride_k == 1): B is
// read once, so packing it would cost more than the product; dot products over its columns in
// place, each thread reading its range of columns front to back, at memory bandwidth.
template <typename T>
void matmul_dot(int64_t M, int64_t N, int64_t K, const T* A, int64_t lda, const T* b, int64_t stride_n,
                const T* bias, T* C, int64_t ldc) {
  const int64_t blocks = (N + kPanelWidth - 1) / kPanelWidth;
  at::parallel_for(0, blocks, 1, [&](int64_t b0, int64_t b1) {
    const T* columns[kPanelWidth];
    for (int64_t blk = b0; blk < b1; ++blk) {
      const int64_t c0 = blk * kPanelWidth, cols = std::min(kPanelWidth, N - c0);
      for (int64_t j = 0; j < cols; ++j) columns[j] = b + (c0 + j) * stride_n;
      dot_panel<T>(M, K, A, lda, columns, cols, C + c0, ldc);
      if (bias)
        for (int64_t m = 0; m < M; ++m)
          for (int64_t j = 0; j < cols; ++j) C[m * ldc + c0 + j] += bias[c0 + j];
    }
  });
}

// C (+)= A B (+ bias) on the packed-panel micro-kernel, (row block x panel) work items split over
// threads (run inline when called inside a parallel region, as attention does per tile). B is
// used in place when its rows are contiguous and a whole number of slices wide (b_in_place),
// else packed once into panels. K is walked in chunks of k_block (0: all of K at once), the
// first chunk writing the tile and the later ones adding to it.
// a_row_sums (kColumnsA only): A's row sums, taken from the copy of each row block (see matmul).
template <typename T, bool kColumnsA>
void matmul_panels(int64_t M, int64_t N, int64_t K, const T* A, int64_t lda, const T* b, int64_t stride_k,
                   int64_t stride_n, const T* bias, T* C, int64_t ldc, bool accumulate, bool b_in_place,
                   int64_t k_block, T* a_row_sums = nullptr) {
  constexpr int64_t S = kSubWidth<T>;
  const int64_t panels = (N + kPanelWidth - 1) / kPanelWidth;
  at::Tensor packed_buffer;
  const T* panel0 = b;
  int64_t panel_stride = kPanelWidth, slice_stride = S, ldb = stride_k;
  if (!b_in_place) {
    // Not a std::vector: that would zero every page before packing overwrites it.
    packed_buffer =
        empty_large({panels * K * kPanelWidth}, at::TensorOptions().dtype(c10::CppTypeToScalarType<T>::value));
    T* const packed = packed_buffer.data_ptr<T>();
    at::parallel_for(0, panels, 1, [&](int64_t p0, int64_t p1) {
      pack_panels<T>(b + p0 * kPanelWidth * stride_n, stride_k, stride_n, K, p1 - p0, kPanelWidth,
                     [&](int64_t p, int64_t c) { return (p0 + p) * kPanelWidth + c < N ? p * kPanelWidth + c : -1; },
                     packed + p0 * K * kPanelWidth);
    });
    panel0 = packed, panel_stride = K * kPanelWidth, slice_stride = K * S, ldb = S;
  }
  const int64_t kc = k_block > 0 ? std::min(k_block, K) : K;
  const int64_t row_blocks = (M + kTileRows - 1) / kTileRows;
  // Row-block-major: a thread's consecutive items share rows of A (in L2) while the panels
  // stream from L3.
  at::parallel_for(0, row_blocks * panels, 1, [&](int64_t begin, int64_t end) {
    std::vector<T> tile, a_block;
    int64_t a_block_r0 = -1;  // first row of A that a_block holds
    for (int64_t item = begin; item < end; ++item) {
      const int64_t r0 = (item / panels) * kTileRows, p = item % panels;
      const int64_t rows = std::min(kTileRows, M - r0), c0 = p * kPanelWidth, cols = std::min(kPanelWidth, N - c0);
      const T* a_rows = A;  // A(r0 + m, k) = a_rows[k * a_ld + m] (kColumnsA) or a_rows[m * a_ld + k]
      int64_t a_ld = lda;
      if constexpr (kColumnsA) {
        // A transposed view's columns are lda apart; with lda a multiple of 4 KB every k of a
        // chunk maps to the same L1 set. Copy the row block once into k-major rows of
        // kTileRows values (reused for all of the thread's panels of this row block).
        if (a_block_r0 != r0) {
          a_block.resize(K * kTileRows);
          // The row sums come from the copy made for the row block's first panel: exactly one thread
          // handles that item, and it always copies there (its previous item, if any, was another block).
          if (a_row_sums != nullptr && p == 0) {
            double sums[kTileRows] = {};
            for (int64_t k = 0; k < K; ++k) {
              const T* src = A + k * lda + r0;
              std::copy(src, src + rows, &a_block[k * kTileRows]);
              for (int64_t m = 0; m < rows; ++m) sums[m] += src[m];
            }
            for (int64_t m = 0; m < rows; ++m) a_row_sums[r0 + m] = static_cast<T>(sums[m]);
          } else {
            for (int64_t k = 0; k < K; ++k) std::copy(A + k * lda + r0, A + k * lda + r0 + rows, &a_block[k * kTileRows]);
          }
          a_block_r0 = r0;
        }
        a_rows = a_block.data(), a_ld = kTileRows;
      } else {
        a_rows = A + r0 * lda;
      }
      const int64_t width = (cols + S - 1) / S * S;
      // Whole slices and no bias: the micro-kernel writes (or adds to) C itself.
      const bool direct = cols == width && bias == nullptr;
      if (!direct && tile.empty()) tile.resize(kTileRows * kPanelWidth);
      T* dst = direct ? C + r0 * ldc + c0 : tile.data();
      const int64_t ldd = direct ? ldc : kPanelWidth;
      for (int64_t k0 = 0; k0 < K; k0 += kc) {
        const int64_t kn = std::min(kc, K - k0);
        const T* a = kColumnsA ? a_rows + k0 * a_ld : a_rows + k0;
        LeftOperands<T> ops{kn, a, a_ld, 0, nullptr, 0, k0 > 0 || (direct && accumulate)};
        gemm_strided<T, kColumnsA>(rows, ops, panel0 + p * panel_stride + k0 * ldb, width, slice_stride, ldb, dst,
                                   ldd);
      }
      if (direct) continue;
      for (int64_t r = 0; r < rows; ++r) {
        T* c = C + (r0 + r) * ldc + c0;
        const T* t = tile.data() + r * kPanelWidth;
        if (accumulate)
          for (int64_t j = 0; j < cols; ++j) c[j] += t[j];
        else
          std::copy(t, t + cols, c);
        if (bias)
          for (int64_t j = 0; j < cols; ++j) c[j] += bias[c0 + j];
      }
    }
  });
}

}  // namespace

template <typename T>
void matmul(int64_t M, int64_t N, int64_t K, const T* A, int64_t a_stride_m, int64_t a_stride_k, const T* b,
            int64_t stride_k, int64_t stride_n, const T* bias, T* C, int64_t ldc, bool accumulate, T* a_row_sums) {
  if (M <= 0) return;
  TORCH_CHECK(a_stride_k == 1 || a_stride_m == 1, "genfast matmul: A needs contiguous rows or columns");
  const bool rows_a = a_stride_k == 1;
  if (a_row_sums != nullptr && (rows_a || N <= 0 || K == 0)) {
    // Only the transposed-A product takes its row sums from its copy of A; otherwise one pass here.
    at::parallel_for(0, M, 16, [&](int64_t m0, int64_t m1) {
      for (int64_t m = m0; m < m1; ++m) {
        double sum = 0;
        for (int64_t k = 0; k < K; ++k) sum += A[m * a_stride_m + k * a_stride_k];
        a_row_sums[m] = static_cast<T>(sum);
      }
    });
    a_row_sums = nullptr;
  }
  if (N <= 0) return;
  if (K == 0) {
    for (int64_t m = 0; m < M; ++m)
      for (int64_t n = 0; n < N; ++n)
        C[m * ldc + n] = (accumulate ? C[m * ldc + n] : T(0)) + (bias ? bias[n] : T(0));
    return;
  }
  if (rows_a && !accumulate && stride_k == 1 && M <= dot_path_max_rows(N * K * static_cast<int64_t>(sizeof(T))))
    return matmul_dot<T>(M, N, K, A, a_stride_m, b, stride_n, bias, C, ldc);
  // B's rows contiguous and whole slices wide: the micro-kernel reads them in place (no packing
  // pass, nothing allocated), as fast as the packed panels on the products genfast makes.
  const bool b_in_place = stride_n == 1 && N % kSubWidth<T> == 0;
  if (rows_a)
    matmul_panels<T, false>(M, N, K, A, a_stride_m, b, stride_k, stride_n, bias, C, ldc, accumulate, b_in_place,
                            kKBlock);
  else
    matmul_panels<T, true>(M, N, K, A, a_stride_k, b, stride_k, stride_n, bias, C, ldc, accumulate, b_in_place,
                           kKBlock, a_row_sums);
}

template <typename T>
void matmul(int64_t M, int64_t N, int64_t K, const T* A, int64_t lda, const T* b, int64_t stride_k, int64_t stride_n,
            const T* bias, T* C, int64_t ldc) {
  matmul<T>(M, N, K, A, lda, 1, b, stride_k, stride_n, bias, C, ldc, false);
}

template void matmul<float>(int64_t, int64_t, int64_t, const float*, int64_t, const float*, int64_t, int64_t,
                            const float*, float*, int64_t);
template void matmul<double>(int64_t, int64_t, int64_t, const double*, int64_t, const double*, int64_t, int64_t,
                             const double*, double*, int64_t);
template void matmul<float>(int64_t, int64_t, int64_t, const float*, int64_t, int64_t, const float*, int64_t,
                            int64_t, const float*, float*, int64_t, bool, float*);
template void matmul<double>(int64_t, int64_t, int64_t, const double*, int64_t, int64_t, const double*, int64_t,
                             int64_t, const double*, double*, int64_t, bool, double*);

int64_t gemm_rows_per_kernel() {
  switch (simd_level()) {
    case SimdLevel::kAVX512: return kRowsAVX512;
    case SimdLevel::kAVX2: return kRowsAVX2;
    default: return kRowsBaseline;
  }
}

}  // namespace genfast::cpu
