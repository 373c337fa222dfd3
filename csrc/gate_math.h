// Gate math of the LSTM and GRU cells, forward and backward, written once for the
// CPU kernels (csrc/cpu/) and the CUDA kernels (csrc/cuda/). Plain inline functions
// on scalars: the CPU loops that call them are auto-vectorised inside SIMD-targeted
// functions, the CUDA kernels call them per thread. No torch headers here.
//
// Pre-activation gate values arrive already summed (W_ih x + b_ih + W_hh h + b_hh).
// Backward functions take the *activated* gates saved by the forward pass and return
// gradients with respect to the pre-activation values.
#pragma once

#include "fast_math.h"

namespace genfast {
namespace gates {

using math::exp_;
using math::exp_fast;
using math::sigmoid;
using math::tanh_;

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
