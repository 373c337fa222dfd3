// Gate math of the LSTM and GRU cells, forward and backward, written once for the
// CPU kernels (csrc/cpu/) and the CUDA kernels (csrc/cuda/). Plain inline functions
// on scalars: the CPU loops that call them are auto-vectorised inside SIMD-targeted
// functions, the CUDA kernels call them per thread. No torch headers here.
//
// Pre-activation gate values arrive already summed (W_ih x + b_ih + W_hh h + b_hh).
// Backward functions take the *activated* gates saved by the forward pass and return
// gradients with respect to the pre-activation values.
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
namespace gates {

// exp for float on the CPU: Cody-Waite range reduction and a degree-6 polynomial,
// branch-free so loops over it vectorise (std::exp calls do not). Max relative
// error about 2 ulp over the clamped range; NaN in gives NaN out.
GENFAST_HD float exp_fast(float x) {
  // Clamp without losing NaN: comparisons with NaN are false, so NaN passes through.
  x = x < -87.3f ? -87.3f : x;
  x = x > 88.3f ? 88.3f : x;
  // Round to nearest by adding and subtracting 1.5 * 2^23: plain arithmetic, so it
  // vectorises on every ISA (floorf becomes a library call on baseline x86-64).
  const float n = (x * 1.44269504088896341f + 12582912.0f) - 12582912.0f;
  float r = x - n * 0.693359375f;
  r = r - n * -2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  // Scale by 2^n through the exponent bits. For NaN, n converts to some integer
  // and p is NaN, so the product stays NaN.
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return p * scale;
}

// exp for double on the CPU: the same scheme in double precision. Cody-Waite reduction with
// fdlibm's split of ln 2 (n * ln2_hi is exact for |n| <= 2^11), then the Taylor polynomial of
// degree 13 on |r| <= ln2 / 2, whose truncation error (r^14 / 14!, 4e-18 relative) is far below
// an ulp; max relative error ~1 ulp from rounding. AVX2 has no double-to-int64 conversion, so
// 2^n comes from the bits of the rounded sum itself: 1.5 * 2^52 + n holds n in its low bits,
// and adding the bias and shifting left by 52 leaves exactly (n + 1023) << 52. Everything is
// add, multiply, compare and integer add/shift, so loops over it vectorise (std::exp and
// std::tanh are scalar library calls: with them float64 LSTM gate math took more time than
// the GEMM). The clamp keeps 2^n normal: exp(-708) = 3.3e-308, exp(709) = 8.2e307.
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

// ---- LSTM ------------------------------------------------------------------------
// In: pre-activations of the four gates (PyTorch order i, f, g, o) and c_{t-1}.
// Out: the activated gates (kept for backward), c_t and h_t = o * tanh(c_t).
template <typename T>
struct LstmCellOut {
  T i, f, g, o, c, h;
};

// c_prev is taken by reference, so it is read where it is used, after the gates. Loaded
// first (by value, at the call), the vectorised CPU loop over this function ran 1.8x slower:
// 8 against 4.4 ns a unit in a standalone copy of lstm.cpp's cells() (float, AVX2, GCC 12);
// in the kernel, in-process A/B, LSTM inference T=100 at batch 4-32, hidden 64-128: x1.02-1.08.
template <typename T>
GENFAST_HD LstmCellOut<T> lstm_cell(T pre_i, T pre_f, T pre_g, T pre_o, const T& c_prev) {
  LstmCellOut<T> out;
  out.i = sigmoid<T>(pre_i);
  out.f = sigmoid<T>(pre_f);
  out.g = tanh_<T>(pre_g);
  out.o = sigmoid<T>(pre_o);
  out.c = out.f * c_prev + out.i * out.g;
  out.h = out.o * tanh_<T>(out.c);
  return out;
}

// In: dL/dh_t (total, from the output and from step t+1), dL/dc_t from step t+1,
// the saved activated gates, c_{t-1} and c_t. Out: dL/d(pre-activations), dL/dc_{t-1}.
template <typename T>
struct LstmCellGrad {
  T d_i, d_f, d_g, d_o, d_c_prev;
};

template <typename T>
GENFAST_HD LstmCellGrad<T> lstm_cell_backward(T d_h, T d_c_next, T i, T f, T g, T o, T c_prev, T c) {
  const T tanh_c = tanh_<T>(c);
  const T d_c = d_c_next + d_h * o * (T(1) - tanh_c * tanh_c);
  LstmCellGrad<T> grad;
  grad.d_o = d_h * tanh_c * o * (T(1) - o);
  grad.d_i = d_c * g * i * (T(1) - i);
  grad.d_f = d_c * c_prev * f * (T(1) - f);
  grad.d_g = d_c * i * (T(1) - g * g);
  grad.d_c_prev = d_c * f;
  return grad;
}

// ---- GRU (PyTorch's convention) ---------------------------------------------------
// r = sigmoid(x_r + h_r), z = sigmoid(x_z + h_z), n = tanh(x_n + r * h_n),
// h' = (1 - z) * n + z * h, where x_* = W_i* x + b_i* and h_* = W_h* h + b_h*.
template <typename T>
struct GruCellOut {
  T r, z, n, h;
};

// x_n, h_n and h_prev by reference, read where they are used (see lstm_cell): with them loaded
// before r and z, a standalone copy of gru.cpp's cells() took 7.9 ns a unit, against 3-3.8;
// in the kernel, in-process A/B, GRU T=100 at batch 4-32, hidden 64: x1.03-1.10.
template <typename T>
GENFAST_HD GruCellOut<T> gru_cell(T x_r, T x_z, const T& x_n, T h_r, T h_z, const T& h_n, const T& h_prev) {
  GruCellOut<T> out;
  out.r = sigmoid<T>(x_r + h_r);
  out.z = sigmoid<T>(x_z + h_z);
  out.n = tanh_<T>(x_n + out.r * h_n);
  out.h = (T(1) - out.z) * out.n + out.z * h_prev;
  return out;
}

// In: dL/dh' (total), saved r, z, n, h_n (= W_hn h + b_hn) and h_prev.
// Out: gradients w.r.t. the input-side pre-activations (d_xr, d_xz, d_xn), the
// hidden-side ones (d_hr = d_xr, d_hz = d_xz, d_hn), and the direct part of dL/dh_prev.
template <typename T>
struct GruCellGrad {
  T d_r, d_z, d_xn, d_hn, d_h_prev;
};

template <typename T>
GENFAST_HD GruCellGrad<T> gru_cell_backward(T d_h, T r, T z, T n, T h_n, T h_prev) {
  GruCellGrad<T> grad;
  const T d_n_pre = d_h * (T(1) - z) * (T(1) - n * n);
  grad.d_z = d_h * (h_prev - n) * z * (T(1) - z);
  grad.d_xn = d_n_pre;
  grad.d_hn = d_n_pre * r;
  grad.d_r = d_n_pre * h_n * r * (T(1) - r);
  grad.d_h_prev = d_h * z;
  return grad;
}

}  // namespace gates
}  // namespace genfast
