// The one entry point for the CPU kernels' non-fused matrix products: input projections,
// input and weight gradients, attention's unfused paths. Which GEMM runs underneath is
// decided here and nowhere else (the rule and its reason: gemm_entry.cpp).
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <optional>

namespace genfast::cpu {

// a (M x K) @ b (K x N) [+ bias (N)] -> (M x N). a and b: 2-D float32 or float64 CPU tensors
// of one dtype, any strides (a transposed view is fine).
at::Tensor gemm(const at::Tensor& a, const at::Tensor& b, const std::optional<at::Tensor>& bias = std::nullopt);

// The same into out (M x N).
void gemm_out(at::Tensor& out, const at::Tensor& a, const at::Tensor& b,
            const std::optional<at::Tensor>& bias = std::nullopt);

// a @ b, and a's row sums (sum over k of a(m, k)) into row_sums (M values of a's dtype), taken in the
// same pass over a: a weight gradient dG^T X with its bias gradient, the column sums of dG.
at::Tensor gemm_with_row_sums(const at::Tensor& a, const at::Tensor& b, at::Tensor& row_sums);

// The raw-pointer form, for kernels that multiply tiles of their own buffers (attention's
// backward): C (M x N, rows ldc apart) = A B, or C += A B when accumulate. A(m, k) =
// a[m * a_stride_m + k * a_stride_k] with its rows or its columns contiguous (a_stride_k == 1
// or a_stride_m == 1); B(k, n) = b[k * b_stride_k + n * b_stride_n]. Inside a parallel region
// it runs on the calling thread. T: float or double.
template <typename T>
void gemm_out(int64_t M, int64_t N, int64_t K, const T* a, int64_t a_stride_m, int64_t a_stride_k, const T* b,
              int64_t b_stride_k, int64_t b_stride_n, T* c, int64_t ldc, bool accumulate);

}  // namespace genfast::cpu
