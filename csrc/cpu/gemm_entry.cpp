// Routing of the non-fused CPU products (see gemm_entry.h).
#include "cpu/gemm_entry.h"

#include "cpu/gemm.h"

namespace genfast::cpu {
namespace {

// genfast's packed kernel takes A with contiguous rows and B with any strides; other left
// operands (a transposed view, as in the weight gradients dG^T X) go to ATen.
bool packed_kernel_takes(const at::Tensor& out, const at::Tensor& a, const at::Tensor& b) {
  const auto dtype = a.scalar_type();
  return (dtype == at::kFloat || dtype == at::kDouble) && b.scalar_type() == dtype && out.scalar_type() == dtype &&
         a.stride(1) == 1 && out.is_contiguous();
}

}  // namespace

void gemm_out(at::Tensor& out, const at::Tensor& a, const at::Tensor& b, const std::optional<at::Tensor>& bias) {
  TORCH_CHECK(a.dim() == 2 && b.dim() == 2 && a.size(1) == b.size(0), "gemm: cannot multiply ", a.sizes(), " by ",
              b.sizes());
  TORCH_CHECK(out.sizes() == at::IntArrayRef({a.size(0), b.size(1)}), "gemm: out has shape ", out.sizes());
  if (!packed_kernel_takes(out, a, b)) {
    if (bias.has_value())
      at::addmm_out(out, *bias, a, b);
    else
      at::mm_out(out, a, b);
    return;
  }
  const at::Tensor bias_c = bias.has_value() ? bias->contiguous() : at::Tensor();
  AT_DISPATCH_FLOATING_TYPES(a.scalar_type(), "genfast::gemm", [&] {
    matmul<scalar_t>(a.size(0), b.size(1), a.size(1), a.const_data_ptr<scalar_t>(), a.stride(0),
                     b.const_data_ptr<scalar_t>(), b.stride(0), b.stride(1),
                     bias_c.defined() ? bias_c.const_data_ptr<scalar_t>() : nullptr, out.data_ptr<scalar_t>(),
                     out.stride(0));
  });
}

at::Tensor gemm(const at::Tensor& a, const at::Tensor& b, const std::optional<at::Tensor>& bias) {
  at::Tensor out = at::empty({a.size(0), b.size(1)}, a.options());
  gemm_out(out, a, b, bias);
  return out;
}

}  // namespace genfast::cpu
