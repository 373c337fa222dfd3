// genfast's packed GEMM: the RNN step's recurrent products, attention's tiles and, through
// matmul, every non-fused product of the CPU kernels (reached via cpu/gemm_entry.h).
//
// The recurrent weight is reused at every time step, so it is packed once per call
// into column panels: panel p holds columns [p*W, p*W + W) of B (W = panel width, a
// multiple of kSubWidth<T>), stored as W / 16 contiguous K x 16 row-major slices. One call of gemm_panel then
// computes C (M x W) = A (M x K) * panel with a register-blocked micro-kernel; the
// caller fuses its epilogue (gate math) right after, while C is still in L1.
//
// The micro-kernel is compiled three times (baseline x86-64, AVX2+FMA, AVX-512) and
// picked at run time from genfast::cpu::simd_level().
#pragma once

#include <cstdint>

namespace genfast::cpu {

// Columns one micro-kernel call produces: one 64-byte vector (16 floats / 8 doubles).
template <typename T>
constexpr int64_t kSubWidth = 64 / static_cast<int64_t>(sizeof(T));

// Packs `num_panels` panels of width `width` from a K x ? matrix B, where
// source_column(p, c) gives B's column for column c of panel p (or -1: zero padding)
// and B(k, n) = b[k * stride_k + n * stride_n]. out must hold num_panels*K*width values.
// Within a panel, each 16-column slice is a contiguous K x 16 block, so the micro-kernel
// streams it sequentially.
template <typename T, typename ColumnMap>
void pack_panels(const T* b, int64_t stride_k, int64_t stride_n, int64_t K, int64_t num_panels, int64_t width,
                 ColumnMap source_column, T* out) {
  constexpr int64_t S = kSubWidth<T>;
  for (int64_t p = 0; p < num_panels; ++p) {
    T* panel = out + p * K * width;
    if (stride_n < stride_k) {
      // B's rows are contiguous (a row-major weight): walk them in order. Reading down a column
      // instead touches a new cache line for every value, and the same lines again for each of
      // the panel's columns.
      for (int64_t k = 0; k < K; ++k) {
        const T* row = b + k * stride_k;
        for (int64_t c = 0; c < width; ++c) {
          const int64_t n = source_column(p, c);
          panel[(c / S) * K * S + k * S + c % S] = n < 0 ? T(0) : row[n * stride_n];
        }
      }
      continue;
    }
    for (int64_t c = 0; c < width; ++c) {  // B's columns are contiguous: one column at a time
      T* slice = panel + (c / S) * K * S + c % S;
      const int64_t n = source_column(p, c);
      if (n < 0) {
        for (int64_t k = 0; k < K; ++k) slice[k * S] = T(0);
      } else {
        const T* src = b + n * stride_n;
        for (int64_t k = 0; k < K; ++k) slice[k * S] = src[k * stride_k];
      }
    }
  }
}

// C[M x width] = A[M x K] * panel[K x width] (C is overwritten; ldc >= width).
template <typename T>
void gemm_panel(int64_t M, int64_t K, const T* A, int64_t lda, const T* panel, int64_t width, T* C, int64_t ldc);

// C[M x width] = [A1 | A2] * panel, the panel's first K1 rows multiplying A1 (M x K1) and the next K2
// rows A2 (M x K2): one product over two left operands that live apart (the LSTM step's x_t and
// h_{t-1} against W_ih and W_hh packed into one panel).
template <typename T>
void gemm_panel_stacked(int64_t M, int64_t K1, const T* A1, int64_t lda1, int64_t K2, const T* A2, int64_t lda2,
                        const T* panel, int64_t width, T* C, int64_t ldc);

// The same product with B stored plainly: a K x width row-major matrix, rows ldb apart
// (for operands used in place, like attention's V tiles).
template <typename T>
void gemm_rowmajor(int64_t M, int64_t K, const T* A, int64_t lda, const T* B, int64_t width, T* C, int64_t ldc);

// C[m][c] = dot(A[m, 0:K], rows[c][0:K]) for m < M (M <= kMaxDotRows), c < width;
// rows[c] == nullptr gives 0. For a single time step (decode) the weight is used once,
// so packing it would cost more than the product: this reads it in place, once.
constexpr int64_t kMaxDotRows = 8;
template <typename T>
void dot_panel(int64_t M, int64_t K, const T* A, int64_t lda, const T* const* rows, int64_t width, T* C, int64_t ldc);

// matmul reads B in place by dot products (kMaxDotRows rows at a time) for at most this many
// rows of A: a weight read once from memory costs more to pack than the product with a few rows.
// A weight of at most kSmallWeightBytes sits in cache, where packing pays off sooner.
constexpr int64_t kMaxDotPathRows = 32;
constexpr int64_t kMaxDotPathRowsSmallWeight = 16;
constexpr int64_t kSmallWeightBytes = int64_t(1) << 20;

// The most rows of A for which matmul reads a B of `bytes` in place by dot products.
constexpr int64_t dot_path_max_rows(int64_t bytes) {
  return bytes <= kSmallWeightBytes ? kMaxDotPathRowsSmallWeight : kMaxDotPathRows;
}

// C (M x N) = A (M x K) * B (K x N) (+ bias over columns) [+ C if accumulate], whole and in
// parallel (inline when called inside a parallel region). A(m, k) = A[m * a_stride_m + k * a_stride_k]
// with rows or columns contiguous (a_stride_k == 1 or a_stride_m == 1: a transposed view such as
// dG^T is read in place); B(k, n) = b[k * stride_k + n * stride_n], any strides. B is packed once
// into 64-column panels (or read in place, see gemm.cpp), then (row block x panel) tiles are split
// over threads. With at most dot_path_max_rows rows of A and contiguous columns of B
// (stride_k == 1), B is read in place by dot products instead (a decode step,
// genfast::decode_linear): one pass over B at memory bandwidth.
// a_row_sums (M values), when given, also receives the sums of A's rows, sum over k of A(m, k), summed in
// double while A is read for the product: a weight gradient dG^T X and its bias gradient (the column sums
// of dG) in one pass over dG.
template <typename T>
void matmul(int64_t M, int64_t N, int64_t K, const T* A, int64_t a_stride_m, int64_t a_stride_k, const T* b,
            int64_t stride_k, int64_t stride_n, const T* bias, T* C, int64_t ldc, bool accumulate,
            T* a_row_sums = nullptr);

// The same for A with contiguous rows, lda apart, C overwritten.
template <typename T>
void matmul(int64_t M, int64_t N, int64_t K, const T* A, int64_t lda, const T* b, int64_t stride_k, int64_t stride_n,
            const T* bias, T* C, int64_t ldc);

// Rows of A the micro-kernel handles at once for the current SIMD level (a good
// row-block size is a multiple of this).
int64_t gemm_rows_per_kernel();

}  // namespace genfast::cpu
