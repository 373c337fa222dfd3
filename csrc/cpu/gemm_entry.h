// The one entry point for the CPU kernels' non-fused matrix products: input projections,
// input and weight gradients, attention's unfused paths. Which GEMM runs underneath (ATen's,
// or genfast's packed kernel from gemm.h) is decided here and nowhere else.
#pragma once

#include <ATen/ATen.h>

#include <optional>

namespace genfast::cpu {

// a (M x K) @ b (K x N) [+ bias (N)] -> (M x N). a and b: 2-D float32 or float64 CPU tensors
// of one dtype, any strides (a transposed view is fine).
at::Tensor gemm(const at::Tensor& a, const at::Tensor& b, const std::optional<at::Tensor>& bias = std::nullopt);

// The same into out (M x N).
void gemm_out(at::Tensor& out, const at::Tensor& a, const at::Tensor& b,
            const std::optional<at::Tensor>& bias = std::nullopt);

}  // namespace genfast::cpu
