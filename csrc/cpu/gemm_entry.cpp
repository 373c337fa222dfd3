// Routing of the non-fused CPU products (see gemm_entry.h).
//
// Rule: every float32 and float64 product runs on genfast's packed-panel kernel (matmul,
// cpu/gemm.h), whatever the layout of its operands: row-major or transposed A are read in
// place, B with any strides. Why (measured on the shapes genfast multiplies, table in
// docs/performance.md): it was faster than ATen's at::mm (MKL) on all of them but one (a tie
// within the noise), both dtypes;
// oneDNN's brgemm (ATen's cpublas::brgemm) has no float64, takes row-major operands only and
// was slower on the weight gradients. One kernel also keeps GENFAST_SIMD and the AVX-512
// emulation tests in charge of every product.
#include "cpu/gemm_entry.h"

#include "cpu/gemm.h"

namespace genfast::cpu {

template <typename T>
void gemm_out(int64_t M, int64_t N, int64_t K, const T* a, int64_t a_stride_m, int64_t a_stride_k, const T* b,
              int64_t b_stride_k, int64_t b_stride_n, T* c, int64_t ldc, bool accumulate) {
  matmul<T>(M, N, K, a, a_stride_m, a_stride_k, b, b_stride_k, b_stride_n, nullptr, c, ldc, accumulate);
}

template void gemm_out<float>(int64_t, int64_t, int64_t, const float*, int64_t, int64_t, const float*, int64_t,
                              int64_t, float*, int64_t, bool);
template void gemm_out<double>(int64_t, int64_t, int64_t, const double*, int64_t, int64_t, const double*, int64_t,
                               int64_t, double*, int64_t, bool);

namespace {

void gemm_into(at::Tensor& out, const at::Tensor& a_in, const at::Tensor& b, const std::optional<at::Tensor>& bias,
               at::Tensor* row_sums) {
  TORCH_CHECK(a_in.dim() == 2 && b.dim() == 2 && a_in.size(1) == b.size(0), "gemm: cannot multiply ", a_in.sizes(),
              " by ", b.sizes());
  TORCH_CHECK(out.sizes() == at::IntArrayRef({a_in.size(0), b.size(1)}), "gemm: out has shape ", out.sizes(),
              ", expected ", at::IntArrayRef({a_in.size(0), b.size(1)}));
  const auto dtype = a_in.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kDouble, "gemm: a must be float32 or float64, got ", dtype);
  TORCH_CHECK(b.scalar_type() == dtype && out.scalar_type() == dtype, "gemm: a, b and out must share a dtype, got ",
              dtype, ", ", b.scalar_type(), ", ", out.scalar_type());
  TORCH_CHECK(a_in.device().is_cpu() && b.device().is_cpu() && out.device().is_cpu(), "gemm: CPU tensors only");
  if (bias.has_value())
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == b.size(1) && bias->scalar_type() == dtype,
                "gemm: bias must be a vector of ", b.size(1), " values of dtype ", dtype);
  // The kernel reads A with its rows or its columns contiguous; a size-1 dim's stride is free.
  const int64_t M = a_in.size(0), K = a_in.size(1), N = b.size(1);
  const bool rows_ok = a_in.stride(1) == 1 || K <= 1, columns_ok = a_in.stride(0) == 1 || M <= 1;
  const at::Tensor a = rows_ok || columns_ok ? a_in : a_in.contiguous();
  const int64_t a_sm = rows_ok || !columns_ok ? std::max<int64_t>(a.stride(0), K) : 1;
  const int64_t a_sk = rows_ok || !columns_ok ? 1 : std::max<int64_t>(a.stride(1), M);
  const bool out_ok = out.stride(1) == 1 || N <= 1;
  at::Tensor dst = out_ok ? out : at::empty({M, N}, out.options());
  const at::Tensor bias_c = bias.has_value() ? bias->contiguous() : at::Tensor();
  AT_DISPATCH_FLOATING_TYPES(dtype, "genfast::gemm", [&] {
    matmul<scalar_t>(M, N, K, a.const_data_ptr<scalar_t>(), a_sm, a_sk, b.const_data_ptr<scalar_t>(), b.stride(0),
                     b.stride(1), bias_c.defined() ? bias_c.const_data_ptr<scalar_t>() : nullptr,
                     dst.data_ptr<scalar_t>(), std::max<int64_t>(dst.stride(0), N), /*accumulate=*/false,
                     row_sums != nullptr ? row_sums->data_ptr<scalar_t>() : nullptr);
  });
  if (!out_ok) out.copy_(dst);
}

}  // namespace

void gemm_out(at::Tensor& out, const at::Tensor& a, const at::Tensor& b, const std::optional<at::Tensor>& bias) {
  gemm_into(out, a, b, bias, nullptr);
}

at::Tensor gemm_with_row_sums(const at::Tensor& a, const at::Tensor& b, at::Tensor& row_sums) {
  TORCH_CHECK(a.dim() == 2 && b.dim() == 2, "gemm: a and b must be 2-D, got ", a.dim(), " and ", b.dim(), " dims");
  TORCH_CHECK(row_sums.dim() == 1 && row_sums.size(0) == a.size(0) && row_sums.is_contiguous() &&
                  row_sums.scalar_type() == a.scalar_type() && row_sums.device().is_cpu(),
              "gemm: row_sums must be a contiguous CPU vector of ", a.size(0), " values of dtype ", a.scalar_type());
  at::Tensor out = at::empty({a.size(0), b.size(1)}, a.options());
  gemm_into(out, a, b, std::nullopt, &row_sums);
  return out;
}

at::Tensor gemm(const at::Tensor& a, const at::Tensor& b, const std::optional<at::Tensor>& bias) {
  TORCH_CHECK(a.dim() == 2 && b.dim() == 2, "gemm: a and b must be 2-D, got ", a.dim(), " and ", b.dim(), " dims");
  at::Tensor out = at::empty({a.size(0), b.size(1)}, a.options());
  gemm_out(out, a, b, bias);
  return out;
}

}  // namespace genfast::cpu
