// Row-major GEMM tiles for the attention kernels (float and double), no torch here.
//
//   gemm_nt: C = alpha * A B^T + beta * C     A (m x k), B (n x k)
//   gemm_nn: C = alpha * A B   + beta * C     A (m x k), B (k x n)
//   gemm_tn: C = alpha * A^T B + beta * C     A (k x m), B (k x n)
//
// They call the BLAS that libtorch_cpu exports (MKL's sgemm_/dgemm_ in the x86 wheels),
// declared weak so the extension still loads against a torch built without them; then
// a plain loop nest is used instead (blas_available() says which, and the caller warns).
// A row-major matrix is a column-major one transposed, so each call swaps the operands.
#pragma once

#include <cstdint>

extern "C" {
void sgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k, const float* alpha,
            const float* a, const int* lda, const float* b, const int* ldb, const float* beta, float* c,
            const int* ldc) __attribute__((weak));
void dgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k, const double* alpha,
            const double* a, const int* lda, const double* b, const int* ldb, const double* beta, double* c,
            const int* ldc) __attribute__((weak));
}

namespace genfast::cpu::attention {

template <typename T>
inline bool blas_available();
template <>
inline bool blas_available<float>() {
  return sgemm_ != nullptr;
}
template <>
inline bool blas_available<double>() {
  return dgemm_ != nullptr;
}

// Column-major BLAS call, or the loop nest when no BLAS was found.
template <typename T>
inline void blas_gemm(char ta, char tb, int64_t m, int64_t n, int64_t k, T alpha, const T* a, int64_t lda,
                      const T* b, int64_t ldb, T beta, T* c, int64_t ldc) {
  if (blas_available<T>()) {
    const int m_ = static_cast<int>(m), n_ = static_cast<int>(n), k_ = static_cast<int>(k);
    const int lda_ = static_cast<int>(lda), ldb_ = static_cast<int>(ldb), ldc_ = static_cast<int>(ldc);
    if constexpr (sizeof(T) == 4) {
      sgemm_(&ta, &tb, &m_, &n_, &k_, &alpha, a, &lda_, b, &ldb_, &beta, c, &ldc_);
    } else {
      dgemm_(&ta, &tb, &m_, &n_, &k_, &alpha, a, &lda_, b, &ldb_, &beta, c, &ldc_);
    }
    return;
  }
  for (int64_t j = 0; j < n; ++j) {
    for (int64_t i = 0; i < m; ++i) {
      T sum = 0;
      for (int64_t p = 0; p < k; ++p) {
        const T av = ta == 'N' ? a[i + p * lda] : a[p + i * lda];
        const T bv = tb == 'N' ? b[p + j * ldb] : b[j + p * ldb];
        sum += av * bv;
      }
      c[i + j * ldc] = alpha * sum + (beta == T(0) ? T(0) : beta * c[i + j * ldc]);
    }
  }
}

template <typename T>
inline void gemm_nt(int64_t m, int64_t n, int64_t k, T alpha, const T* a, int64_t lda, const T* b, int64_t ldb,
                    T beta, T* c, int64_t ldc) {
  blas_gemm<T>('T', 'N', n, m, k, alpha, b, ldb, a, lda, beta, c, ldc);
}

template <typename T>
inline void gemm_nn(int64_t m, int64_t n, int64_t k, T alpha, const T* a, int64_t lda, const T* b, int64_t ldb,
                    T beta, T* c, int64_t ldc) {
  blas_gemm<T>('N', 'N', n, m, k, alpha, b, ldb, a, lda, beta, c, ldc);
}

template <typename T>
inline void gemm_tn(int64_t m, int64_t n, int64_t k, T alpha, const T* a, int64_t lda, const T* b, int64_t ldb,
                    T beta, T* c, int64_t ldc) {
  blas_gemm<T>('N', 'T', n, m, k, alpha, b, ldb, a, lda, beta, c, ldc);
}

}  // namespace genfast::cpu::attention
