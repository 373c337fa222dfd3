// The recurrent cells as policies of the RNN core, shared by the CPU kernels (csrc/cpu/rnn.cpp)
// and the CUDA kernels (csrc/cuda/rnn_step.cuh). No torch headers here.
//
// A cell policy says
//   - its shape: kGates gate blocks of H columns each (PyTorch's order), whether it carries a cell
//     state c beside h (kCellState), and whether its pre-activations are simply the input side plus
//     the recurrent side (kSidesAdd: then [W_ih | W_hh] may be multiplied as one stacked weight,
//     b_ih + b_hh fold into one bias, and one gate gradient serves both weights), and whether
//     h_{t-1} enters h_t other than through W_hh (kDirectHidden: backward then adds a direct term);
//   - what its forward saves for backward (kSaved values of H per row; WorkspaceLayout below);
//   - its math, forward and backward, on scalars (forward / backward), called per unit by the CPU
//     loops (forward_units / backward_units: branch-free over restrict pointers, so they vectorise)
//     and per thread by the CUDA kernels (forward_thread / backward_thread). forward_units has one
//     argument list for every cell (a cell ignores what it does not use); backward_units has two,
//     chosen by kDirectHidden: a cell without a direct term takes the total dL/dh_t and the cell
//     state, a cell with one takes the parts of dL/dh_t and rewrites dh with its direct term.
// Optional capabilities of the core (the LSTM's projection w_hr) are traits (kProjection).
//
// Backward functions take the *activated* gates saved by the forward pass and return gradients
// with respect to the pre-activation values.
#pragma once

#include <cstdint>

#include "fast_math.h"

// The CPU unit loops are always inlined into the SIMD-targeted tiles that call them.
#define GENFAST_CELL_LOOP inline __attribute__((always_inline))

// The CUDA per-thread gate loops are unrolled; host compilers do not know the pragma.
#if defined(__CUDACC__)
#define GENFAST_UNROLL _Pragma("unroll")
#else
#define GENFAST_UNROLL
#endif

namespace genfast {
namespace rnn {

using math::sigmoid;
using math::tanh_;

// CPU: dst = src over one row of units (at most 16). A whole panel is one fixed-size copy, which the
// compiler turns into vector moves; GCC's loop distribution turns a plain copy loop into a call to memcpy,
// which costs more than the 16 values it moves (docs/performance.md §13.1, §2.10).
template <typename T>
GENFAST_CELL_LOOP void copy_units(int64_t units, const T* __restrict__ src, T* __restrict__ dst) {
  if (units == 16) {
    __builtin_memcpy(dst, src, 16 * sizeof(T));
    return;
  }
  for (int64_t u = 0; u < units; ++u) dst[u] = src[u];
}

// Where the training workspace (one 1-D buffer, the input's dtype) keeps what backward needs, for
// S rows of the (packed or flattened) sequence: [saved values (S, kSaved*H) | c_t (S, H) when the
// cell has a cell state | o*tanh(c_t) (S, H) when projecting]. The same on every backend.
struct WorkspaceLayout {
  int64_t saved = 0;       // offset of the per-row saved values (always 0)
  int64_t cell = 0;        // offset of c_t, or -1
  int64_t projected = 0;   // offset of the projection's input r_t, or -1
  int64_t size = 0;        // elements in all

  // H-wide values per row.
  static int64_t per_row(int64_t saved_values, bool cell_state, bool project) {
    return saved_values + (cell_state ? 1 : 0) + (project ? 1 : 0);
  }
  static WorkspaceLayout make(int64_t saved_values, bool cell_state, bool project, int64_t rows, int64_t hidden) {
    WorkspaceLayout w;
    int64_t at = rows * saved_values * hidden;
    w.cell = cell_state ? at : -1;
    if (cell_state) at += rows * hidden;
    w.projected = project ? at : -1;
    if (project) at += rows * hidden;
    w.size = at;
    return w;
  }
};

// ---- LSTM ------------------------------------------------------------------------
// Gates i, f, g, o. c_t = f c_{t-1} + i g, h_t = o tanh(c_t) (then h_t = W_hr h_t with a projection).
struct LstmCell {
  static constexpr const char* kName = "lstm";
  static constexpr int kGates = 4;
  static constexpr int kSaved = 4;  // activated i, f, g, o
  static constexpr bool kCellState = true;
  static constexpr bool kSidesAdd = true;
  static constexpr bool kDirectHidden = false;  // h_{t-1} reaches h_t only through W_hh
  static constexpr bool kProjection = true;

  template <typename T>
  struct Out {
    T i, f, g, o, c, h;
  };

  // c_prev by reference, so it is read where it is used, after the gates (the vectorised CPU loop
  // depends on it: a value loaded at the call stays live in a register across the gate math).
  template <typename T>
  static GENFAST_HD Out<T> forward(T pre_i, T pre_f, T pre_g, T pre_o, const T& c_prev) {
    Out<T> out;
    out.i = sigmoid<T>(pre_i);
    out.f = sigmoid<T>(pre_f);
    out.g = tanh_<T>(pre_g);
    out.o = sigmoid<T>(pre_o);
    out.c = out.f * c_prev + out.i * out.g;
    out.h = out.o * tanh_<T>(out.c);
    return out;
  }

  template <typename T>
  struct Grad {
    T d_i, d_f, d_g, d_o, d_c_prev;
  };

  // In: dL/dh_t (total), dL/dc_t from step t+1, the saved activated gates, c_{t-1} and c_t.
  template <typename T>
  static GENFAST_HD Grad<T> backward(T d_h, T d_c_next, T i, T f, T g, T o, T c_prev, T c) {
    const T tanh_c = tanh_<T>(c);
    const T d_c = d_c_next + d_h * o * (T(1) - tanh_c * tanh_c);
    Grad<T> grad;
    grad.d_o = d_h * tanh_c * o * (T(1) - o);
    grad.d_i = d_c * g * i * (T(1) - i);
    grad.d_f = d_c * c_prev * f * (T(1) - f);
    grad.d_g = d_c * i * (T(1) - g * g);
    grad.d_c_prev = d_c * f;
    return grad;
  }

  // CPU: one row of `units` hidden units. acc: the recurrent product (gate g at acc[g*Units]), gx:
  // the input side with both biases (gate g at gx[g*H]); c: the cell state, updated in place; h and
  // h_next receive h_t; act[s] the saved values. b_hh and h_prev are not used by this cell.
  template <int64_t Units, typename T>
  static GENFAST_CELL_LOOP void forward_units(int64_t units, const T* __restrict__ acc, const T* __restrict__ gx,
                                              const T* __restrict__ /*b_hh*/, int64_t H, T* __restrict__ c,
                                              const T* __restrict__ /*h_prev*/, T* __restrict__ h,
                                              T* __restrict__ h_next, T (*__restrict__ act)[Units]) {
    T h_tmp[Units];
    for (int64_t u = 0; u < units; ++u) {
      const auto cell = forward<T>(acc[u] + gx[u], acc[Units + u] + gx[H + u], acc[2 * Units + u] + gx[2 * H + u],
                                   acc[3 * Units + u] + gx[3 * H + u], c[u]);
      c[u] = cell.c;
      h[u] = cell.h;
      h_tmp[u] = cell.h;
      act[1][u] = cell.f;
      act[2][u] = cell.g;
      act[3][u] = cell.o;
      act[0][u] = cell.i;
    }
    copy_units<T>(units, h_tmp, h_next);
  }

  // CPU: the backward of one row of units. d_h: total dL/dh_t (formed by the core, or by the
  // projection's backward); dc: dL/dc, carried in place; g: the saved values; state_prev: c_{t-1};
  // c_cur: c_t; dG: the gate gradients (both sides: its recurrent gradient is dG W_hh alone).
  template <typename T>
  static GENFAST_CELL_LOOP void backward_units(int64_t units, int64_t H, const T* __restrict__ d_h,
                                               T* __restrict__ dc, const T* __restrict__ g,
                                               const T* __restrict__ state_prev, const T* __restrict__ c_cur,
                                               T* __restrict__ dG) {
    for (int64_t u = 0; u < units; ++u) {
      const auto grad = backward<T>(d_h[u], dc[u], g[u], g[H + u], g[2 * H + u], g[3 * H + u], state_prev[u], c_cur[u]);
      dG[u] = grad.d_i;
      dG[H + u] = grad.d_f;
      dG[2 * H + u] = grad.d_g;
      dG[3 * H + u] = grad.d_o;
      dc[u] = grad.d_c_prev;
    }
  }

  // CUDA: one (row, unit) per thread, in the accumulation type A. x, h: the input and recurrent
  // products of each gate, b_ih, b_hh: the biases (zeros when absent); c: the cell state in place.
  template <typename A>
  static GENFAST_HD void forward_thread(const A (&x)[kGates], const A (&h)[kGates], const A (&b_ih)[kGates],
                                        const A (&b_hh)[kGates], A& c, A /*h_prev*/, A& h_out, A (&saved)[kSaved]) {
    A pre[kGates];
GENFAST_UNROLL
    for (int gate = 0; gate < kGates; ++gate) pre[gate] = x[gate] + h[gate] + b_ih[gate] + b_hh[gate];
    const Out<A> out = forward<A>(pre[0], pre[1], pre[2], pre[3], c);
    c = out.c;
    h_out = out.h;
    saved[0] = out.i;
    saved[1] = out.f;
    saved[2] = out.g;
    saved[3] = out.o;
  }

  template <typename A>
  static GENFAST_HD void backward_thread(A d_h, A& d_c, const A (&saved)[kSaved], A state_prev, A c_cur,
                                         A (&d_x)[kGates], A (&/*d_hside*/)[kGates], A& /*d_h_direct*/) {
    const Grad<A> grad = backward<A>(d_h, d_c, saved[0], saved[1], saved[2], saved[3], state_prev, c_cur);
    d_c = grad.d_c_prev;
    d_x[0] = grad.d_i;
    d_x[1] = grad.d_f;
    d_x[2] = grad.d_g;
    d_x[3] = grad.d_o;
  }
};

// ---- GRU (PyTorch's convention) ---------------------------------------------------
// r = sigmoid(x_r + h_r), z = sigmoid(x_z + h_z), n = tanh(x_n + r * h_n), h' = (1 - z) n + z h,
// where x_* = W_i* x + b_i* and h_* = W_h* h + b_h*. r multiplies h_n, so the two sides of the n
// gate do not simply add: the recurrent side (with b_hh) is kept apart, and h_n is saved.
struct GruCell {
  static constexpr const char* kName = "gru";
  static constexpr int kGates = 3;
  static constexpr int kSaved = 4;  // activated r, z, n and h_n
  static constexpr bool kCellState = false;
  static constexpr bool kSidesAdd = false;
  static constexpr bool kDirectHidden = true;  // h' = ... + z h: backward adds z dh to dL/dh_{t-1}
  static constexpr bool kProjection = false;

  template <typename T>
  struct Out {
    T r, z, n, h;
  };

  // x_n, h_n and h_prev by reference, read where n and h' need them (see LstmCell::forward).
  template <typename T>
  static GENFAST_HD Out<T> forward(T x_r, T x_z, const T& x_n, T h_r, T h_z, const T& h_n, const T& h_prev) {
    Out<T> out;
    out.r = sigmoid<T>(x_r + h_r);
    out.z = sigmoid<T>(x_z + h_z);
    out.n = tanh_<T>(x_n + out.r * h_n);
    out.h = (T(1) - out.z) * out.n + out.z * h_prev;
    return out;
  }

  // Gradients w.r.t. the input-side pre-activations (d_r, d_z, d_xn), the recurrent ones (d_r, d_z,
  // d_hn) and the direct part of dL/dh_prev (z dh; the rest is dG_h W_hh).
  template <typename T>
  struct Grad {
    T d_r, d_z, d_xn, d_hn, d_h_prev;
  };

  template <typename T>
  static GENFAST_HD Grad<T> backward(T d_h, T r, T z, T n, T h_n, T h_prev) {
    Grad<T> grad;
    const T d_n_pre = d_h * (T(1) - z) * (T(1) - n * n);
    grad.d_z = d_h * (h_prev - n) * z * (T(1) - z);
    grad.d_xn = d_n_pre;
    grad.d_hn = d_n_pre * r;
    grad.d_r = d_n_pre * h_n * r * (T(1) - r);
    grad.d_h_prev = d_h * z;
    return grad;
  }

  // CPU: see LstmCell::forward_units. gx: the input side with b_ih; b_hh added to the recurrent
  // side here; h_prev: h_{t-1}. c is not used by this cell.
  template <int64_t Units, typename T>
  static GENFAST_CELL_LOOP void forward_units(int64_t units, const T* __restrict__ acc, const T* __restrict__ gx,
                                              const T* __restrict__ b, int64_t H, T* __restrict__ /*c*/,
                                              const T* __restrict__ h_prev, T* __restrict__ out,
                                              T* __restrict__ h_next, T (*__restrict__ act)[Units]) {
    // h_n = W_hn h + b_hn (saved for backward) first, so the cell reads it where n needs it.
    for (int64_t u = 0; u < units; ++u) act[3][u] = acc[2 * Units + u] + b[2 * H + u];
    for (int64_t u = 0; u < units; ++u) {
      const auto cell =
          forward<T>(gx[u], gx[H + u], gx[2 * H + u], acc[u] + b[u], acc[Units + u] + b[H + u], act[3][u], h_prev[u]);
      out[u] = cell.h;
      h_next[u] = cell.h;
      act[0][u] = cell.r;
      act[1][u] = cell.z;
      act[2][u] = cell.n;
    }
  }

  // CPU: the backward of one row of units. This cell rewrites dL/dh with its direct term in this
  // loop, so it forms the total here as well: d_h = go + dh + rec (output gradient, what reached h
  // from outside the recurrence, dG_h W_hh of the step processed before); dh leaves holding z d_h.
  // state_prev: h_{t-1}; dG (input side) and dG_h (recurrent side) the gate gradients.
  template <typename T>
  static GENFAST_CELL_LOOP void backward_units(int64_t units, int64_t H, const T* __restrict__ go,
                                               T* __restrict__ dh, const T* __restrict__ rec,
                                               const T* __restrict__ g, const T* __restrict__ state_prev,
                                               T* __restrict__ dG, T* __restrict__ dG_h) {
    for (int64_t u = 0; u < units; ++u) {
      const T d_h = go[u] + dh[u] + rec[u];
      const auto grad = backward<T>(d_h, g[u], g[H + u], g[2 * H + u], g[3 * H + u], state_prev[u]);
      dG[u] = grad.d_r;
      dG[H + u] = grad.d_z;
      dG[2 * H + u] = grad.d_xn;
      dG_h[u] = grad.d_r;
      dG_h[H + u] = grad.d_z;
      dG_h[2 * H + u] = grad.d_hn;
      dh[u] = grad.d_h_prev;
    }
  }

  // CUDA: see LstmCell::forward_thread. h_prev: h_{t-1}; c is not used by this cell.
  template <typename A>
  static GENFAST_HD void forward_thread(const A (&x)[kGates], const A (&h)[kGates], const A (&b_ih)[kGates],
                                        const A (&b_hh)[kGates], A& /*c*/, A h_prev, A& h_out, A (&saved)[kSaved]) {
    A x_part[kGates], h_part[kGates];
GENFAST_UNROLL
    for (int gate = 0; gate < kGates; ++gate) {
      x_part[gate] = x[gate] + b_ih[gate];
      h_part[gate] = h[gate] + b_hh[gate];
    }
    const Out<A> out = forward<A>(x_part[0], x_part[1], x_part[2], h_part[0], h_part[1], h_part[2], h_prev);
    h_out = out.h;
    saved[0] = out.r;
    saved[1] = out.z;
    saved[2] = out.n;
    saved[3] = h_part[2];
  }

  template <typename A>
  static GENFAST_HD void backward_thread(A d_h, A& /*d_c*/, const A (&saved)[kSaved], A state_prev, A /*c_cur*/,
                                         A (&d_x)[kGates], A (&d_hside)[kGates], A& d_h_direct) {
    const Grad<A> grad = backward<A>(d_h, saved[0], saved[1], saved[2], saved[3], state_prev);
    d_h_direct = grad.d_h_prev;
    d_x[0] = d_hside[0] = grad.d_r;
    d_x[1] = d_hside[1] = grad.d_z;
    d_x[2] = grad.d_xn;
    d_hside[2] = grad.d_hn;
  }
};

// ---- GRU with the reset gate before the recurrent product (Cho et al. 2014; Keras' reset_after=False)
// r = sigmoid(x_r + h_r), z = sigmoid(x_z + h_z), n = tanh(x_n + W_hn (r * h) + b_hn),
// h' = (1 - z) n + z h, where x_* = W_i* x + b_i* and h_* = W_h* h + b_h*; parameters as torch's GRU.
// The n gate's recurrent product reads r * h, so a step is two dependent products (kResetBefore):
// pass 1 multiplies h by W_hr and W_hz (kFirstGates blocks) and gives r, z and r * h; pass 2
// multiplies r * h by W_hn and gives n and h'. Every gate is input side + recurrent side, so b_ih + b_hh
// fold into one bias and one gate gradient serves both weights; W_hh's gradient is that gradient times
// h for the r, z rows and times r * h (saved) for the n rows. The backward mirrors the passes: pass 1
// forms dL/dh_t with dG_{r,z} W_h{r,z} of the step after and gives dG_z, dG_n; pass 2 forms
// d(r * h) = dG_n W_hn and gives dG_r and the direct part z dh + r d(r * h) of dL/dh_{t-1}.
// Its loops: csrc/cpu/gru_reset_before.cpp, csrc/cuda/gru_reset_before_glue.cpp.
struct GruResetBeforeCell {
  static constexpr const char* kName = "gru_reset_before";
  static constexpr int kGates = 3;
  static constexpr int kSaved = 4;  // activated r, z, n and r * h_{t-1} (slots below)
  static constexpr bool kCellState = false;
  static constexpr bool kSidesAdd = true;       // one bias b_ih + b_hh, one gate gradient
  static constexpr bool kDirectHidden = true;   // z dh + r d(r * h) reach dL/dh_{t-1} directly
  static constexpr bool kProjection = false;
  static constexpr bool kResetBefore = true;    // two dependent products per step
  static constexpr int kFirstGates = 2;         // gate blocks of pass 1's product: r, z
  static constexpr int kR = 0, kZ = 1, kN = 2, kRh = 3;  // saved slots

  template <typename T>
  struct Reset {
    T r, z, rh;
  };
  // Pass 1. pre_r, pre_z: the whole pre-activations (both sides and both biases).
  template <typename T>
  static GENFAST_HD Reset<T> forward_reset(T pre_r, T pre_z, T h_prev) {
    Reset<T> out;
    out.r = sigmoid<T>(pre_r);
    out.z = sigmoid<T>(pre_z);
    out.rh = out.r * h_prev;
    return out;
  }

  template <typename T>
  struct Update {
    T n, h;
  };
  // Pass 2. pre_n = x_n + b_in + W_hn (r * h) + b_hn.
  template <typename T>
  static GENFAST_HD Update<T> forward_update(T pre_n, T z, T h_prev) {
    Update<T> out;
    out.n = tanh_<T>(pre_n);
    out.h = (T(1) - z) * out.n + z * h_prev;
    return out;
  }

  // Backward of pass 2's update from the total dL/dh_t: the gradients of pre_z and pre_n, and the
  // first direct part of dL/dh_{t-1}, z dh.
  template <typename T>
  struct UpdateGrad {
    T d_z, d_n, d_h_prev;
  };
  template <typename T>
  static GENFAST_HD UpdateGrad<T> backward_update(T d_h, T z, T n, T h_prev) {
    UpdateGrad<T> grad;
    grad.d_n = d_h * (T(1) - z) * (T(1) - n * n);
    grad.d_z = d_h * (h_prev - n) * z * (T(1) - z);
    grad.d_h_prev = d_h * z;
    return grad;
  }

  // Backward of pass 1 from d_rh = dL/d(r * h) = dG_n W_hn: the gradient of pre_r and the second
  // direct part of dL/dh_{t-1}, r d_rh.
  template <typename T>
  struct ResetGrad {
    T d_r, d_h_prev;
  };
  template <typename T>
  static GENFAST_HD ResetGrad<T> backward_reset(T d_rh, T r, T h_prev) {
    ResetGrad<T> grad;
    grad.d_r = d_rh * h_prev * r * (T(1) - r);
    grad.d_h_prev = r * d_rh;
    return grad;
  }

  // CPU, forward pass 1 over one row of `units` units. acc: h_{t-1} W_h{r,z}^T (r at acc[0..],
  // z at acc[Units..]); gx: the input side with both biases (r at gx[0..], z at gx[H..]).
  template <int64_t Units, typename T>
  static GENFAST_CELL_LOOP void forward_reset_units(int64_t units, const T* __restrict__ acc,
                                                    const T* __restrict__ gx, int64_t H,
                                                    const T* __restrict__ h_prev, T* __restrict__ r,
                                                    T* __restrict__ z, T* __restrict__ rh) {
    for (int64_t u = 0; u < units; ++u) {
      const auto gates = forward_reset<T>(acc[u] + gx[u], acc[Units + u] + gx[H + u], h_prev[u]);
      r[u] = gates.r;
      z[u] = gates.z;
      rh[u] = gates.rh;
    }
  }

  // CPU, forward pass 2. acc: (r * h) W_hn^T; gx_n: the n block of the input side with both biases.
  template <typename T>
  static GENFAST_CELL_LOOP void forward_update_units(int64_t units, const T* __restrict__ acc,
                                                     const T* __restrict__ gx_n, const T* __restrict__ z,
                                                     const T* __restrict__ h_prev, T* __restrict__ n,
                                                     T* __restrict__ h, T* __restrict__ h_next) {
    for (int64_t u = 0; u < units; ++u) {
      const auto cell = forward_update<T>(acc[u] + gx_n[u], z[u], h_prev[u]);
      n[u] = cell.n;
      h[u] = cell.h;
      h_next[u] = cell.h;
    }
  }

  // CPU, backward pass 1. d_h = go + dh + rec (output gradient, what reached h from outside the
  // recurrence, dG_{r,z} W_h{r,z} of the step processed before); dh leaves holding z d_h.
  template <typename T>
  static GENFAST_CELL_LOOP void backward_update_units(int64_t units, const T* __restrict__ go, T* __restrict__ dh,
                                                      const T* __restrict__ rec, const T* __restrict__ z,
                                                      const T* __restrict__ n, const T* __restrict__ h_prev,
                                                      T* __restrict__ dG_z, T* __restrict__ dG_n) {
    for (int64_t u = 0; u < units; ++u) {
      const auto grad = backward_update<T>(go[u] + dh[u] + rec[u], z[u], n[u], h_prev[u]);
      dG_z[u] = grad.d_z;
      dG_n[u] = grad.d_n;
      dh[u] = grad.d_h_prev;
    }
  }

  // CPU, backward pass 2. d_rh: dG_n W_hn; dh gains r d_rh.
  template <typename T>
  static GENFAST_CELL_LOOP void backward_reset_units(int64_t units, const T* __restrict__ d_rh,
                                                     const T* __restrict__ r, const T* __restrict__ h_prev,
                                                     T* __restrict__ dh, T* __restrict__ dG_r) {
    for (int64_t u = 0; u < units; ++u) {
      const auto grad = backward_reset<T>(d_rh[u], r[u], h_prev[u]);
      dG_r[u] = grad.d_r;
      dh[u] += grad.d_h_prev;
    }
  }
};

// Per-row workspace values of a cell (the one definition behind every backend and the fake kernels).
template <typename Cell>
WorkspaceLayout workspace_layout(int64_t rows, int64_t hidden, bool project) {
  return WorkspaceLayout::make(Cell::kSaved, Cell::kCellState, project, rows, hidden);
}

}  // namespace rnn
}  // namespace genfast
