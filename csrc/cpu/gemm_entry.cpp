#include "cpu/gemm_entry.h"

namespace genfast::cpu {

at::Tensor gemm(const at::Tensor& a, const at::Tensor& b, const std::optional<at::Tensor>& bias) {
  return bias.has_value() ? at::addmm(*bias, a, b) : at::mm(a, b);
}

void gemm_out(at::Tensor& out, const at::Tensor& a, const at::Tensor& b, const std::optional<at::Tensor>& bias) {
  if (bias.has_value())
    at::addmm_out(out, *bias, a, b);
  else
    at::mm_out(out, a, b);
}

}  // namespace genfast::cpu
