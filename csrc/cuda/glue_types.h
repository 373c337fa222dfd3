// What every CUDA glue file needs to hand torch tensors to the torch-free kernels: the kernels' element
// type for an ATen scalar type, a tensor's data as that type (null for an undefined tensor), and an optional
// argument made contiguous.
#pragma once

#include <ATen/ATen.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <optional>

namespace genfast {
namespace cuda {

// ATen's 16-bit scalar types are layout-compatible with CUDA's.
template <typename S>
struct KernelType {
  using type = S;
};
template <>
struct KernelType<at::Half> {
  using type = __half;
};
template <>
struct KernelType<at::BFloat16> {
  using type = __nv_bfloat16;
};

template <typename K>
K* data(const at::Tensor& t) {
  return reinterpret_cast<K*>(t.data_ptr());
}

template <typename K>
K* data_or_null(const at::Tensor& t) {
  return t.defined() ? data<K>(t) : nullptr;
}

inline at::Tensor contiguous_or_undefined(const std::optional<at::Tensor>& t) {
  return t.has_value() ? t->contiguous() : at::Tensor();
}

}  // namespace cuda
}  // namespace genfast
