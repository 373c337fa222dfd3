// The layer-normalised recurrent cells (issue 19): LayerNormLSTM and LayerNormGRU. Their shapes,
// the training workspace both backends and the fake kernels share, and their scalar math. No
// torch headers here (see csrc/rnn/cells.h for the plain cells).
//
// LN(v) = (v - mean(v)) / sqrt(var(v) + 1e-5) over the last dimension, biased variance.
//
// LayerNormLSTM (gates i, f, g, o):
//   a = LN(W_ih x) * ln_ih_weight + LN(W_hh h) * ln_hh_weight + b_ih + b_hh
//   c' = sigmoid(f) c + sigmoid(i) tanh(g)
//   h' = sigmoid(o) tanh(LN(c') * ln_cell_weight + ln_cell_bias)
// LayerNormGRU (gates r, z, n):
//   x^ = LN(W_ih x) * ln_ih_weight + b_ih,  h^ = LN(W_hh h) * ln_hh_weight + b_hh
//   then torch's GRU on x^ and h^ (GruCell::forward).
//
// LN of a row needs the whole row, while a CPU thread (or a CUDA block) owns a panel of units. So a
// step is several passes: the recurrent product with partial moments of each (row, panel); then,
// once every panel's moments are in, normalisation and the gates (and for the LSTM, partial moments
// of c_t; then LN(c_t) and h_t). Partial moments (mean, M2 per part) combine as the within- plus
// between-part squared deviations (combine_moments), which keeps the variance accurate where
// sum-of-squares would cancel.
#pragma once

#include <cmath>
#include <cstdint>

#include "fast_math.h"
#include "rnn/cells.h"

namespace genfast {
namespace rnn {

constexpr double kLayerNormEps = 1e-5;

// Count, mean and sum of squared deviations (M2) of a set of values.
template <typename T>
struct Moments {
  T count, mean, m2;
};

// The moments of a row from those of its `parts` parts, partial[2p] = mean and partial[2p + 1] = M2 of
// part p, every part holding `full` values but the last, which holds `last`: mean = sum count_p mean_p /
// count, M2 = sum M2_p + sum count_p (mean_p - mean)^2 (Chan et al.'s result for many parts at once).
// One division per row, not one per part as pairwise merges take, and four independent accumulators
// in a fixed order: the same result whichever thread computes it.
template <typename T>
GENFAST_HD Moments<T> combine_moments(const T* partial, int64_t parts, T full, T last) {
  const int64_t body = parts - 1;
  T sum[4] = {T(0), T(0), T(0), T(0)};
  for (int64_t p = 0; p < body; ++p) sum[p % 4] += partial[2 * p];
  const T count = full * T(body) + last;
  const T mean = (((sum[0] + sum[1]) + (sum[2] + sum[3])) * full + partial[2 * body] * last) / count;
  T within[4] = {T(0), T(0), T(0), T(0)}, between[4] = {T(0), T(0), T(0), T(0)};
  for (int64_t p = 0; p < body; ++p) {
    const T d = partial[2 * p] - mean;
    within[p % 4] += partial[2 * p + 1];
    between[p % 4] += d * d;
  }
  const T d_last = partial[2 * body] - mean;
  const T m2 = ((within[0] + within[1]) + (within[2] + within[3])) + partial[2 * body + 1] +
               ((between[0] + between[1]) + (between[2] + between[3])) * full + d_last * d_last * last;
  return {count, mean, m2};
}

// 1 / sqrt(biased variance + eps) of a row's moments.
template <typename T>
GENFAST_HD T layer_norm_rstd(const Moments<T>& row) {
  return T(1) / std::sqrt(row.m2 / row.count + T(kLayerNormEps));
}

// Where the training workspace (one 1-D buffer, the input's dtype) keeps what backward needs, for S
// rows of the (packed or flattened) sequence, G gates of H units:
//   gates    (S, saved*H) activated gates (LSTM i, f, g, o; GRU r, z, n and h^_n)
//   xhat_ih  (S, G*H)     LN(W_ih x) before its gain
//   xhat_hh  (S, G*H)     LN(W_hh h_{t-1}) before its gain
//   cell     (S, H)       c_t                 (LSTM only)
//   cell_hat (S, H)       LN(c_t) before its gain  (LSTM only)
//   rstd_ih, rstd_hh (S) and rstd_cell (S, LSTM only): 1 / sqrt(var + eps) of each normalised row.
// The same on every backend; the fake kernels ask its size through
// genfast::layernorm_rnn_workspace_layout (values per row: H-wide, then scalars).
struct LayerNormWorkspace {
  int64_t gates = 0, xhat_ih = 0, xhat_hh = 0, cell = -1, cell_hat = -1, rstd_ih = 0, rstd_hh = 0, rstd_cell = -1;
  int64_t size = 0;

  static int64_t wide_per_row(int64_t gates, int64_t saved, bool cell_state) {
    return saved + 2 * gates + (cell_state ? 2 : 0);
  }
  static int64_t scalars_per_row(bool cell_state) { return cell_state ? 3 : 2; }

  static LayerNormWorkspace make(int64_t gates, int64_t saved, bool cell_state, int64_t rows, int64_t hidden) {
    LayerNormWorkspace w;
    int64_t at = 0;
    auto take = [&](int64_t width) {
      const int64_t start = at;
      at += rows * width;
      return start;
    };
    w.gates = take(saved * hidden);
    w.xhat_ih = take(gates * hidden);
    w.xhat_hh = take(gates * hidden);
    if (cell_state) {
      w.cell = take(hidden);
      w.cell_hat = take(hidden);
    }
    w.rstd_ih = take(1);
    w.rstd_hh = take(1);
    if (cell_state) w.rstd_cell = take(1);
    w.size = at;
    return w;
  }
};

// ---- LayerNormLSTM --------------------------------------------------------------------------
struct LayerNormLstmCell {
  static constexpr const char* kName = "layernorm_lstm";
  static constexpr int kGates = 4;
  static constexpr int kSaved = 4;  // activated i, f, g, o
  static constexpr bool kCellState = true;
  static constexpr bool kProjection = false;

  static LayerNormWorkspace workspace(int64_t rows, int64_t hidden) {
    return LayerNormWorkspace::make(kGates, kSaved, kCellState, rows, hidden);
  }

  template <typename T>
  struct Gates {
    T i, f, g, o, c;
  };

  // The gates from the pre-activations a (both sides normalised, gained and biased) and c_{t-1}
  // (by reference, read where it is used: see LstmCell::forward).
  template <typename T>
  static GENFAST_HD Gates<T> gates(T a_i, T a_f, T a_g, T a_o, const T& c_prev) {
    Gates<T> out;
    out.i = math::sigmoid<T>(a_i);
    out.f = math::sigmoid<T>(a_f);
    out.g = math::tanh_<T>(a_g);
    out.o = math::sigmoid<T>(a_o);
    out.c = out.f * c_prev + out.i * out.g;
    return out;
  }

  // h_t from the normalised cell state c^ and the output gate.
  template <typename T>
  static GENFAST_HD T hidden(T o, T cell_hat, T gain, T bias) {
    return o * math::tanh_<T>(cell_hat * gain + bias);
  }

  // Backward of h = o tanh(y), y = c^ gain + bias: dL/d(pre-activation of o) and dL/dy.
  template <typename T>
  struct OutputGrad {
    T d_o, d_y;
  };
  template <typename T>
  static GENFAST_HD OutputGrad<T> output_backward(T d_h, T o, T cell_hat, T gain, T bias) {
    const T tanh_y = math::tanh_<T>(cell_hat * gain + bias);
    return {d_h * tanh_y * o * (T(1) - o), d_h * o * (T(1) - tanh_y * tanh_y)};
  }

  // Backward of c = f c_prev + i g, given the total dL/dc: the pre-activation gradients of i, f, g
  // and dL/dc_prev.
  template <typename T>
  struct CellGrad {
    T d_i, d_f, d_g, d_c_prev;
  };
  template <typename T>
  static GENFAST_HD CellGrad<T> cell_backward(T d_c, T i, T f, T g, T c_prev) {
    return {d_c * g * i * (T(1) - i), d_c * c_prev * f * (T(1) - f), d_c * i * (T(1) - g * g), d_c * f};
  }
};

// ---- LayerNormGRU ---------------------------------------------------------------------------
// The gate math is GruCell's (csrc/rnn/cells.h) on the normalised sides x^ and h^.
struct LayerNormGruCell {
  static constexpr const char* kName = "layernorm_gru";
  static constexpr int kGates = 3;
  static constexpr int kSaved = 4;  // activated r, z, n and h^_n
  static constexpr bool kCellState = false;
  static constexpr bool kProjection = false;

  static LayerNormWorkspace workspace(int64_t rows, int64_t hidden) {
    return LayerNormWorkspace::make(kGates, kSaved, kCellState, rows, hidden);
  }
};

// The backward of LN for one row, given the row's sums of dx^ and dx^ * x^ over its `width` values:
// dL/dv = rstd (dx^ - mean(dx^) - x^ mean(dx^ x^)).
template <typename T>
GENFAST_HD T layer_norm_backward(T d_xhat, T xhat, T rstd, T mean_d, T mean_d_xhat) {
  return rstd * (d_xhat - mean_d - xhat * mean_d_xhat);
}

}  // namespace rnn
}  // namespace genfast
