// Device-side helpers of the RNN step kernels (rnn_step.cuh): element <-> accumulator
// conversions and the launch shape of the element-wise step kernels.
#pragma once

#include <cstdint>

#include "rnn_kernels.h"

namespace genfast {
namespace cuda {

__device__ __forceinline__ float to_acc(float x) { return x; }
__device__ __forceinline__ double to_acc(double x) { return x; }
__device__ __forceinline__ float to_acc(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_acc(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename T>
__device__ __forceinline__ T from_acc(AccT<T> x) {
  return x;
}
template <>
__device__ __forceinline__ __half from_acc<__half>(float x) {
  return __float2half_rn(x);
}
template <>
__device__ __forceinline__ __nv_bfloat16 from_acc<__nv_bfloat16>(float x) {
  return __float2bfloat16_rn(x);
}

// Bias element or zero when the layer has no bias.
template <typename T>
__device__ __forceinline__ AccT<T> bias_or_zero(const T* bias, int64_t index) {
  return bias == nullptr ? AccT<T>(0) : to_acc(bias[index]);
}

// One thread per (row, hidden unit): consecutive threads take consecutive hidden
// units of a row, so every gate-block read and state write is coalesced.
constexpr int kStepThreads = 256;

inline unsigned int step_blocks(int64_t elements) {
  return static_cast<unsigned int>((elements + kStepThreads - 1) / kStepThreads);
}

}  // namespace cuda
}  // namespace genfast
