// y = x W^T (+ b) for a few rows of x: the linear layers of one decode step, where each
// sequence contributes one token. With so few rows the product is bound by reading the
// weight from memory (2 flops per 4-byte weight), so the kernel's only job is to stream
// W once, at the memory's bandwidth, split over the threads.
//
// W is in nn.Linear's layout (N, K), so y = F.linear(x, W, b). The work is genfast's matmul
// (csrc/cpu/gemm.cpp): its few-row path gives each thread a range of output features and takes
// dot products with the rows of x, reading its part of W front to back (sequential, so the
// hardware prefetcher keeps the memory busy); more rows than cpu::dot_path_max_rows(bytes of W)
// take its GEMM path. Why (N, K) and not a column-split (K, N): docs/design.md.
// Accumulation in the input dtype (float32 or float64), like torch's CPU addmm.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "cpu/gemm.h"
#include "cpu/simd.h"

namespace genfast::generation::decode_linear {

at::Tensor decode_linear(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias) {
  TORCH_CHECK(x.dim() == 2, "decode_linear: x must be 2-D (rows, in_features), got ", x.dim(), "-D");
  TORCH_CHECK(weight.dim() == 2, "decode_linear: weight must be 2-D, got ", weight.dim(), "-D");
  TORCH_CHECK(x.device().is_cpu() && weight.device().is_cpu(), "decode_linear: x and weight must be CPU tensors");
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble,
              "decode_linear: x must be float32 or float64, got ", x.scalar_type());
  TORCH_CHECK(weight.scalar_type() == x.scalar_type(), "decode_linear: weight dtype ", weight.scalar_type(),
              " does not match x dtype ", x.scalar_type());
  const int64_t K = x.size(1), N = weight.size(0);
  TORCH_CHECK(weight.size(1) == K, "decode_linear: weight must be (out_features, ", K, "), got ", weight.sizes());
  if (bias.has_value()) {
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == N, "decode_linear: bias must be (", N, ",), got ",
                bias->sizes());
    TORCH_CHECK(bias->scalar_type() == x.scalar_type() && bias->device().is_cpu(),
                "decode_linear: bias must be a CPU tensor of x's dtype");
  }
  const at::Tensor w = weight.contiguous();
  const at::Tensor xc = x.stride(1) == 1 ? x : x.contiguous();
  const at::Tensor b = bias.has_value() ? bias->contiguous() : at::Tensor();
  at::Tensor y = at::empty({x.size(0), N}, x.options());
  if (y.numel() == 0) return y;
  // B = W^T: column n of B is row n of W, contiguous (stride_k = 1), which is what lets
  // matmul read it in place by dot products for up to dot_path_max_rows rows.
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "decode_linear", [&] {
    cpu::matmul<scalar_t>(x.size(0), N, K, xc.const_data_ptr<scalar_t>(), xc.stride(0),
                          w.const_data_ptr<scalar_t>(), 1, K, b.defined() ? b.const_data_ptr<scalar_t>() : nullptr,
                          y.mutable_data_ptr<scalar_t>(), N);
  });
  return y;
}

int64_t decode_linear_max_rows(int64_t weight_bytes) {
  TORCH_CHECK(weight_bytes >= 0, "decode_linear_max_rows: weight_bytes must be >= 0, got ", weight_bytes);
  return cpu::dot_path_max_rows(weight_bytes);
}

}  // namespace genfast::generation::decode_linear

TORCH_LIBRARY_IMPL(genfast, CPU, m) {
  m.impl("decode_linear", &genfast::generation::decode_linear::decode_linear);
}

// No tensor argument to dispatch on: one kernel for every backend.
TORCH_LIBRARY_IMPL(genfast, CompositeExplicitAutograd, m) {
  m.impl("decode_linear_max_rows", &genfast::generation::decode_linear::decode_linear_max_rows);
}
