// y = x W^T (+ b) for a few rows of x: the linear layers of one decode step, where each
// sequence contributes one token. With so few rows the product is bound by reading the
// weight from memory (2 flops per 4-byte weight), so the kernel's only job is to stream
// W once, at the memory's bandwidth, split over the threads. MKL's GEMV reaches 12-19 GB/s
// here on GPT-2's matrices whatever the thread count; a plain parallel stream reaches more.
//
// W in nn.Linear's layout (N, K), so y = F.linear(x, W, b): a thread owns a range of output
// rows and takes dot products with the rows of x, reading its part of W front to back
// (sequential, so the hardware prefetcher keeps the memory busy). Measured on GPT-2's
// matrices at batch 1, 2 threads: 21 GB/s against 13-14 for torch's addmm / F.linear in
// either layout. (A row-major (K, N) weight would be read in pieces N apart, or need
// per-thread partial sums: measured slower, so the layout is fixed.)
// Accumulation in the input dtype (float32 or float64), like torch's CPU addmm.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "cpu/gemm.h"
#include "cpu/simd.h"

namespace genfast::cpu::decode_linear {

namespace {

constexpr int64_t kMaxRows = kMaxDotRows;  // rows of x per pass over W (more rows: another pass)
constexpr int64_t kRowBlock = 64;          // output features per dot_panel call

template <typename T>
struct Problem {
  const T* x;     // (M, K), rows lda apart
  const T* w;     // (N, K), contiguous
  const T* bias;  // (N,) or nullptr
  T* y;           // (M, N)
  int64_t M, K, N, lda;
};

template <typename T>
void dot_rows(const Problem<T>& p) {
  const int64_t blocks = (p.N + kRowBlock - 1) / kRowBlock;
  at::parallel_for(0, blocks, 1, [&](int64_t b0, int64_t b1) {
    const T* rows[kRowBlock];
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t n0 = b * kRowBlock, width = std::min(kRowBlock, p.N - n0);
      for (int64_t c = 0; c < width; ++c) rows[c] = p.w + (n0 + c) * p.K;
      for (int64_t m0 = 0; m0 < p.M; m0 += kMaxRows) {
        const int64_t count = std::min(kMaxRows, p.M - m0);
        T* y = p.y + m0 * p.N + n0;
        dot_panel<T>(count, p.K, p.x + m0 * p.lda, p.lda, rows, width, y, p.N);
        if (p.bias)
          for (int64_t m = 0; m < count; ++m)
            for (int64_t c = 0; c < width; ++c) y[m * p.N + c] += p.bias[n0 + c];
      }
    }
  });
}

}  // namespace

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
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "decode_linear", [&] {
    const Problem<scalar_t> p{xc.const_data_ptr<scalar_t>(), w.const_data_ptr<scalar_t>(),
                              b.defined() ? b.const_data_ptr<scalar_t>() : nullptr, y.mutable_data_ptr<scalar_t>(),
                              x.size(0), K, N, xc.stride(0)};
    dot_rows(p);
  });
  return y;
}

}  // namespace genfast::cpu::decode_linear

TORCH_LIBRARY_IMPL(genfast, CPU, m) { m.impl("decode_linear", &genfast::cpu::decode_linear::decode_linear); }
