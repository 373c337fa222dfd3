// Scalar exp, sigmoid and tanh for genfast's kernels, CPU and CUDA. On the CPU they are
// branch-free polynomials, so the loops that call them vectorise inside SIMD-targeted
// functions (std::exp and std::tanh are scalar library calls); on the device they are the
// CUDA library's functions. No torch headers here.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#if defined(__CUDACC__)
#define GENFAST_HD __host__ __device__ __forceinline__
#else
#define GENFAST_HD inline __attribute__((always_inline))
#endif

namespace genfast {
namespace math {

// exp for float on the CPU, the one the gate math and the attention softmax share: branch-free,
// so loops over it vectorise (std::exp calls do not). Max relative error about 1.3 ulp over
// the clamped range, whose ends keep 2^n a normal number; NaN in gives NaN out.
//  - n = round(x log2 e) comes from one multiply-add with the shifter 1.5 * 2^23 + 127: the sum's
//    low mantissa bits hold n + 127, so its bits shifted left by 23 are 2^n (plain arithmetic
//    and an integer shift, no floor or float-to-int conversion, on every ISA);
//  - Cody-Waite reduction r = x - n ln 2 with ln 2 split in two (n * 0.693359375 is exact);
//  - exp(r) by a degree-6 polynomial evaluated by Estrin's scheme (pairs, then r^2): three
//    dependent multiply-adds deep instead of six.
namespace detail {
// exp(x) for x within [-88, 88.3] (or NaN): the body of exp_fast(float) below, written once for
// float (V = float, U = uint32_t) and for GCC vectors of floats (U: the vector of uint32_t of the
// same size), which attention's explicit-vector softmax passes. Plain arithmetic, so it vectorises
// in a loop and contracts to FMAs where the target has them.
// By reference: a 32- or 64-byte vector passed or returned by value would change the ABI of
// this (untargeted) function; always inlined, it costs nothing.
template <typename V, typename U>
GENFAST_HD void exp_unclamped(const V& x, V& out) {
  constexpr float kShifter = 12582912.0f + 127.0f;
  const V t = x * 1.44269504088896341f + kShifter;
  const V n = t - kShifter;
  V r = x - n * 0.693359375f;
  r = r - n * -2.12194440e-4f;
  const V r2 = r * r;
  // exp(r) = 1 + r + r^2 (c2 + c3 r + r^2 (c4 + c5 r + r^2 (c6 + c7 r)))
  const V c67 = r * 1.9875691500e-4f + 1.3981999507e-3f;
  const V c45 = r * 8.3334519073e-3f + 4.1665795894e-2f;
  const V c23 = r * 1.6666665459e-1f + 5.0000001201e-1f;
  const V tail = (c67 * r2 + c45) * r2 + c23;
  const V p = tail * r2 + (r + 1.0f);
  // 2^n from t's bits (n + 127 = 0 gives 0). For NaN, p is NaN and so is the product.
  static_assert(sizeof(U) == sizeof(V), "U must be V's bits");
  U bits;
  std::memcpy(&bits, &t, sizeof(bits));
  bits <<= 23;
  V scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  out = p * scale;
}
}  // namespace detail

GENFAST_HD float exp_fast(float x) {
  // Clamp without losing NaN: comparisons with NaN are false, so NaN passes through.
  x = x < -87.3f ? -87.3f : x;
  x = x > 88.3f ? 88.3f : x;
  float y;
  detail::exp_unclamped<float, uint32_t>(x, y);
  return y;
}

// exp for double on the CPU: the same scheme in double precision. Cody-Waite reduction with
// fdlibm's split of ln 2 (n * ln2_hi is exact for |n| <= 2^11), then the Taylor polynomial of
// degree 13 on |r| <= ln2 / 2, whose truncation error (r^14 / 14!, 4e-18 relative) is far below
// an ulp; max relative error ~1 ulp from rounding. AVX2 has no double-to-int64 conversion, so
// 2^n comes from the bits of the rounded sum itself: 1.5 * 2^52 + n holds n in its low bits,
// and adding the bias and shifting left by 52 leaves exactly (n + 1023) << 52. Everything is
// add, multiply, compare and integer add/shift, so loops over it vectorise (std::exp and
// std::tanh are scalar library calls). The clamp keeps 2^n normal: exp(-708) = 3.3e-308,
// exp(709) = 8.2e307.
GENFAST_HD double exp_fast(double x) {
  x = x < -708.0 ? -708.0 : x;
  x = x > 709.0 ? 709.0 : x;
  const double shifted = x * 1.4426950408889634 + 6755399441055744.0;  // 1.5 * 2^52 + round(x / ln 2)
  const double n = shifted - 6755399441055744.0;
  double r = x - n * 6.93147180369123816490e-01;
  r = r - n * 1.90821492927058770002e-10;
  double p = 1.0 / 6227020800.0;  // 1/13!
  p = p * r + 1.0 / 479001600.0;
  p = p * r + 1.0 / 39916800.0;
  p = p * r + 1.0 / 3628800.0;
  p = p * r + 1.0 / 362880.0;
  p = p * r + 1.0 / 40320.0;
  p = p * r + 1.0 / 5040.0;
  p = p * r + 1.0 / 720.0;
  p = p * r + 1.0 / 120.0;
  p = p * r + 1.0 / 24.0;
  p = p * r + 1.0 / 6.0;
  p = p * r + 0.5;
  p = p * r + 1.0;
  p = p * r + 1.0;
  uint64_t bits;
  std::memcpy(&bits, &shifted, sizeof(bits));
  bits = (bits + 1023) << 52;
  double scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return p * scale;  // NaN in: p is NaN
}

template <typename T>
GENFAST_HD T exp_(T x) {
  return std::exp(x);
}

template <>
GENFAST_HD double exp_<double>(double x) {
#if defined(__CUDA_ARCH__)
  return ::exp(x);
#else
  return exp_fast(x);
#endif
}

template <>
GENFAST_HD float exp_<float>(float x) {
#if defined(__CUDA_ARCH__)
  return ::expf(x);
#else
  return exp_fast(x);
#endif
}

template <typename T>
GENFAST_HD T sigmoid(T x) {
  return T(1) / (T(1) + exp_<T>(-x));
}

// On the CPU: tanh(x) = 1 - 2 / (exp(2x) + 1): exact limits at +-inf, absolute error
// ~1e-7 near 0 in float, ~2e-16 in double. On the device: the CUDA library's tanhf / tanh
// (a few ulp), named explicitly per type so float never goes through the double-precision tanh.
template <typename T>
GENFAST_HD T tanh_(T x) {
#if defined(__CUDA_ARCH__)
  return ::tanh(x);
#else
  return T(1) - T(2) / (exp_<T>(T(2) * x) + T(1));
#endif
}

template <>
GENFAST_HD float tanh_<float>(float x) {
#if defined(__CUDA_ARCH__)
  return ::tanhf(x);
#else
  return 1.0f - 2.0f / (exp_<float>(2.0f * x) + 1.0f);
#endif
}

template <>
GENFAST_HD double tanh_<double>(double x) {
#if defined(__CUDA_ARCH__)
  return ::tanh(x);
#else
  return 1.0 - 2.0 / (exp_<double>(2.0 * x) + 1.0);
#endif
}

}  // namespace math
}  // namespace genfast
