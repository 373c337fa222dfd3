// Fused LSTM over a whole sequence on the CPU: one layer, one direction per call.
//
// Forward: for each step one parallel pass in which every thread owns a panel of 16
// hidden units: it multiplies [x_t | h_{t-1}] by its packed slice of [W_ih | W_hh]^T (all
// four gates of its units, both weights stacked in one panel) and applies the cell update
// to that tile while it is still in L1. No (T*N, 4H) input projection is materialised.
// With two rows per step, or weights too large for the cache, G = X W_ih^T + b is instead
// one GEMM first and the steps multiply h_{t-1} by W_hh's panels alone (project_input_first).
// A decode step (a few rows in all) or a single sequence does the same with W_hh read in
// place, the recurrent part by dot products (read_weight_in_place).
// With proj_size a second pass per step computes h_t = W_hr r_t.
//
// Backward (BPTT) mirrors it: per step, one pass computes dh = dG_{t+1} W_hh for a
// thread's units and the cell backward for them; the weight gradients are then
// large GEMMs over all steps.
//
// Workspace (filled when train=true): [activated gates i,f,g,o (S, 4H) | c_t (S, H) |
// r_t = o * tanh(c_t) (S, H), only with projection].
#include <torch/library.h>

#include "cpu/gemm_entry.h"
#include "cpu/rnn_common.h"
#include "cpu/simd.h"
#include "gate_math.h"

namespace genfast::cpu {
namespace {

constexpr int64_t kGates = 4;
constexpr int64_t kWidth = kGates * kUnits;  // columns in a forward weight panel

// ---------------------------------------------------------------- forward
template <typename T>
struct ForwardStep {
  const T* h_prev;   // (N, Hout) state read by this step
  const T* x;        // (n, I) input rows of this step, multiplied in the step with the stacked panels; or
                     // nullptr when gx already holds X W_ih^T (the in-place path)
  const T* packed;   // panels of ((I + Hout) x kWidth): [W_ih | W_hh]^T, gates of 16 units side by side; or
                     // nullptr:
  const T* w_hh;     // (4H, Hout) unpacked, read in place by dot products (few steps and rows)
  const T* gx;       // rows gx_stride apart added to the product: X W_ih^T + b for this step's rows, or
                     // b_ih + b_hh (gx_stride = 0) when x is multiplied in the step
  int64_t gx_stride;
  int64_t I;
  T* c;                 // (N, H) cell state, updated in place
  T* h_out;             // (n, H) rows receiving o*tanh(c): the output, or r_t when projecting
  T* h_next;            // (N, Hout) next state, or nullptr when projecting (the projection writes it)
  T* saved_gates;       // (n, 4H) or nullptr
  T* saved_c;           // (n, H) or nullptr
  int64_t H, Hout, ld_h_out;
};

struct ForwardTile {
  template <typename T>
  static GENFAST_INLINE void run(const ForwardStep<T>* s, int64_t panel, int64_t r0, int64_t r1, T* acc) {
    const int64_t H = s->H;
    const int64_t j0 = panel * kUnits;
    const int64_t units = std::min(kUnits, H - j0);
    if (s->x) {
      const int64_t K = s->I + s->Hout;
      gemm_panel_stacked<T>(r1 - r0, s->I, s->x + r0 * s->I, s->I, s->Hout, s->h_prev + r0 * s->Hout, s->Hout,
                            s->packed + panel * K * kWidth, kWidth, acc, kWidth);
    } else {
      for (int64_t m = r0; m < std::min(r1, r0 + kPrefetchRows); ++m)
        prefetch_gate_row(s->gx + m * s->gx_stride + j0, kGates, H);
      recurrent_tile<T, kGates>(s->packed, s->w_hh, s->h_prev, s->Hout, H, panel, r0, r1, acc);
    }
    rows(units, s, j0, r0, r1, acc);
  }

  template <typename T>
  static GENFAST_INLINE void rows(int64_t units, const ForwardStep<T>* s, int64_t j0, int64_t r0, int64_t r1, T* acc) {
    const int64_t H = s->H;
    for (int64_t m = r0; m < r1; ++m, acc += kWidth) {
      if (s->gx_stride && m + kPrefetchRows < r1)
        prefetch_gate_row(s->gx + (m + kPrefetchRows) * s->gx_stride + j0, kGates, H);
      const T* gx = s->gx + m * s->gx_stride + j0;
      T* c = s->c + m * H + j0;
      T* h = s->h_out + m * s->ld_h_out + j0;
      T act[kGates][kUnits], unused[kUnits];
      T* h_next = s->h_next ? s->h_next + m * s->Hout + j0 : unused;  // projecting: phase 2 writes the state
      cells(units, acc, gx, H, c, h, h_next, act);
      if (s->saved_gates) {  // training: keep what backward needs
        T* g = s->saved_gates + m * kGates * H + j0;
        for (int64_t gate = 0; gate < kGates; ++gate)
          for (int64_t u = 0; u < units; ++u) g[gate * H + u] = act[gate][u];
        T* c_saved = s->saved_c + m * H + j0;
        for (int64_t u = 0; u < units; ++u) c_saved[u] = c[u];
      }
    }
  }

  // The fused cell update of one row of 16 units: a branch-free loop over restrict
  // pointers, which the compiler vectorises (exp/tanh are polynomials, gate_math.h).
  template <typename T>
  static GENFAST_INLINE void cells(int64_t units, const T* __restrict__ acc, const T* __restrict__ gx, int64_t H,
                                   T* __restrict__ c, T* __restrict__ h, T* __restrict__ h_next,
                                   T (*__restrict__ act)[kUnits]) {
    T h_tmp[kUnits];
    for (int64_t u = 0; u < units; ++u) {
      const auto cell = gates::lstm_cell<T>(acc[u] + gx[u], acc[kUnits + u] + gx[H + u],
                                            acc[2 * kUnits + u] + gx[2 * H + u], acc[3 * kUnits + u] + gx[3 * H + u],
                                            c[u]);
      c[u] = cell.c;
      h[u] = cell.h;
      h_tmp[u] = cell.h;
      act[1][u] = cell.f;
      act[2][u] = cell.g;
      act[3][u] = cell.o;
      act[0][u] = cell.i;
    }
    for (int64_t u = 0; u < units; ++u) h_next[u] = h_tmp[u];
  }
};

// h_t = r_t W_hr^T for `Hout` columns in panels of 16.
template <typename T>
struct ProjectStep {
  const T* r;           // (n, H)
  const T* packed_whr;  // panels of (H x kUnits): W_hr^T
  T* out;               // (n, Hout) output rows
  T* h_next;            // (N, Hout)
  int64_t H, Hout;
};

struct ProjectTile {
  template <typename T>
  static GENFAST_INLINE void run(const ProjectStep<T>* s, int64_t panel, int64_t r0, int64_t r1, T* acc) {
    gemm_panel<T>(r1 - r0, s->H, s->r + r0 * s->H, s->H, s->packed_whr + panel * s->H * kUnits, kUnits, acc, kUnits);
    const int64_t j0 = panel * kUnits;
    const int64_t cols = std::min(kUnits, s->Hout - j0);
    for (int64_t m = r0; m < r1; ++m, acc += kUnits)
      for (int64_t u = 0; u < cols; ++u) {
        s->out[m * s->Hout + j0 + u] = acc[u];
        s->h_next[m * s->Hout + j0 + u] = acc[u];
      }
  }
};

// x != nullptr: packed holds the stacked [W_ih | W_hh] panels and gx is the bias row (b_ih + b_hh, or
// zeros). x == nullptr: gx holds X W_ih^T + b for every row, and packed (or w_hh in place) W_hh alone.
template <typename T>
void forward_loop(const Schedule& sc, bool reverse, const T* x, int64_t I, const T* gx, const T* packed,
                  const T* w_hh, const T* packed_whr, T* out,
                  T* hbuf, T* c, T* ws, T* r_tmp, int64_t H, int64_t Hout) {
  const bool project = packed_whr != nullptr;
  const int64_t N = sc.batch, S = sc.rows;
  const int64_t threads = at::get_num_threads();
  // A row block never exceeds max(N, rows per micro-kernel) rows.
  std::vector<T> scratch(threads * (N + 16) * kWidth);
  T* saved_gates = ws;
  T* saved_c = ws ? ws + S * kGates * H : nullptr;
  T* saved_r = (ws && project) ? ws + S * (kGates + 1) * H : nullptr;
  const double step_flops = 2.0 * N * ((x ? I : 0) + Hout) * kGates * H + (project ? 2.0 * N * Hout * H : 0.0);
  for_each_step(sc.steps, step_flops, [&](int64_t s, const StepTeam& team) {
    const int64_t t = reverse ? sc.steps - 1 - s : s;
    const int64_t n = sc.active[t], off = sc.offset[t];
    T* h_prev = hbuf + (s % 2) * N * Hout;
    T* h_next = hbuf + ((s + 1) % 2) * N * Hout;
    const ForwardStep<T> step{h_prev,
                              x ? x + off * I : nullptr,
                              packed,
                              w_hh,
                              x ? gx : gx + off * kGates * H,
                              x ? 0 : kGates * H,
                              I,
                              c,
                              project ? (saved_r ? saved_r + off * H : r_tmp) : out + off * Hout,
                              project ? nullptr : h_next,
                              saved_gates ? saved_gates + off * kGates * H : nullptr,
                              saved_c ? saved_c + off * H : nullptr,
                              H,
                              Hout,
                              project ? H : Hout};
    run_tiles<ForwardTile>(team, ceil_div(H, kUnits), n, &step, scratch.data(), kWidth);
    if (project) {
      team.sync();  // the projection reads every unit of r_t
      const ProjectStep<T> proj{step.h_out, packed_whr, out + off * Hout, h_next, H, Hout};
      run_tiles<ProjectTile>(team, ceil_div(Hout, kUnits), n, &proj, scratch.data(), kWidth);
    }
  });
}

// ---------------------------------------------------------------- backward
template <typename T>
struct BackwardStep {
  const T* dG_prev;      // (n_prev, 4H) gate gradients of the step processed just before, or nullptr
  const T* packed_whh;   // panels of (4H x kUnits): W_hh columns (hidden outputs) in natural order; or
                         // nullptr:
  const T* w_hh_t;       // (Hout, 4H): W_hh^T, rows read in place by dot products (one sequence)
  const T* grad_out;     // (n, Hout) rows of dL/d output
  const T* gates;        // (n, 4H) saved activations
  const T* c_cur;        // (n, H) saved c_t
  const T* c_prev;       // (n_prev_fwd, H) saved c of the previous forward step, or nullptr
  const T* cx;           // (N, H)
  const T* dh_total;     // projecting: (n, Hout) total dL/dh_t from phase A; else nullptr
  const T* packed_whr;   // projecting: panels of (Hout x kUnits): W_hr columns
  T* dh_state;           // (N, Hout) gradient reaching h from outside the recurrence (dL/dh_T at first)
  T* dc_state;           // (N, H) dL/dc carried between steps
  T* dG;                 // (n, 4H) gate gradients of this step (pre-activation)
  T* dh_total_out;       // projecting, phase A: where dh_total goes
  int64_t n, n_prev, n_prev_fwd, H, Hout;
};

// The cell backward of one row of units: branch-free over restrict pointers, so it vectorises.
template <typename T>
GENFAST_INLINE void cell_backward_units(int64_t units, int64_t H, const T* __restrict__ d_h, T* __restrict__ dc,
                                        const T* __restrict__ g, const T* __restrict__ c_prev,
                                        const T* __restrict__ c_cur, T* __restrict__ dG) {
  for (int64_t u = 0; u < units; ++u) {
    const auto grad = gates::lstm_cell_backward<T>(d_h[u], dc[u], g[u], g[H + u], g[2 * H + u], g[3 * H + u],
                                                   c_prev[u], c_cur[u]);
    dG[u] = grad.d_i;
    dG[H + u] = grad.d_f;
    dG[2 * H + u] = grad.d_g;
    dG[3 * H + u] = grad.d_o;
    dc[u] = grad.d_c_prev;
  }
}

template <typename T>
GENFAST_INLINE void cell_backward_row(const BackwardStep<T>* s, int64_t m, int64_t j0, int64_t units, const T* d_h) {
  const int64_t H = s->H;
  const T* c_prev = m < s->n_prev_fwd ? s->c_prev + m * H + j0 : s->cx + m * H + j0;
  cell_backward_units(units, H, d_h, s->dc_state + m * H + j0, s->gates + m * kGates * H + j0, c_prev,
                      s->c_cur + m * H + j0, s->dG + m * kGates * H + j0);
}

// dL/dh_t for a panel of h's columns: output gradient + what reached h from outside
// + dG_{prev} W_hh (rows active in the previous processed step). Rows no longer
// active only collect the recurrent term: that is the gradient of their initial state.
// Returns false for rows that are not active (nothing more to do for them).
template <typename T>
GENFAST_INLINE bool total_dh_row(const BackwardStep<T>* s, int64_t m, int64_t j0, int64_t cols, const T* rec,
                                 T* d_h) {
  T* dh = s->dh_state + m * s->Hout + j0;
  if (m >= s->n) {
    if (m < s->n_prev)
      for (int64_t u = 0; u < cols; ++u) dh[u] += rec[u];
    return false;
  }
  static constexpr T zeros[kUnits] = {};
  const T* r = m < s->n_prev ? rec : zeros;
  const T* go = s->grad_out + m * s->Hout + j0;
  for (int64_t u = 0; u < cols; ++u) {
    d_h[u] = go[u] + dh[u] + r[u];
    dh[u] = T(0);
  }
  return true;
}

template <typename T>
GENFAST_INLINE void recurrent_gemm(const BackwardStep<T>* s, int64_t panel, int64_t r0, int64_t r1, T* acc) {
  const int64_t rows = std::min(r1, s->n_prev) - r0;
  if (rows > 0)
    backward_recurrent_tile<T>(s->packed_whh, s->w_hh_t, s->dG_prev + r0 * kGates * s->H, kGates * s->H, s->Hout,
                               panel, rows, acc);
}

// What the cell backward of row m reads from the forward's saved state (and writes to
// dG), fetched ahead like the forward's input projection (prefetch_gate_row).
template <typename T>
GENFAST_INLINE void prefetch_backward_row(const BackwardStep<T>* s, int64_t m, int64_t j0) {
  const int64_t H = s->H;
  prefetch_gate_row(s->gates + m * kGates * H + j0, kGates, H);
  prefetch_gate_row(s->c_cur + m * H + j0, 1, 0);
  if (m < s->n_prev_fwd) prefetch_gate_row(s->c_prev + m * H + j0, 1, 0);
  prefetch_gate_row(s->grad_out + m * s->Hout + j0, 1, 0);
  prefetch_gate_row(s->dG + m * kGates * H + j0, kGates, H);
}

// Without projection: h's columns are the hidden units, so one tile does it all.
struct BackwardTile {
  template <typename T>
  static GENFAST_INLINE void run(const BackwardStep<T>* s, int64_t panel, int64_t r0, int64_t r1, T* acc) {
    const int64_t j0 = panel * kUnits, units = std::min(kUnits, s->H - j0);
    for (int64_t m = r0; m < std::min({r1, r0 + kPrefetchRows, s->n}); ++m) prefetch_backward_row(s, m, j0);
    recurrent_gemm(s, panel, r0, r1, acc);
    rows(units, s, j0, r0, r1, acc);
  }

  template <typename T>
  static GENFAST_INLINE void rows(int64_t units, const BackwardStep<T>* s, int64_t j0, int64_t r0, int64_t r1,
                                  const T* acc) {
    T d_h[kUnits];
    for (int64_t m = r0; m < r1; ++m) {
      if (m + kPrefetchRows < std::min(r1, s->n)) prefetch_backward_row(s, m + kPrefetchRows, j0);
      if (total_dh_row(s, m, j0, units, acc + (m - r0) * kUnits, d_h)) cell_backward_row(s, m, j0, units, d_h);
    }
  }
};

// With projection, phase A: total dL/dh_t over Hout columns.
struct BackwardProjectA {
  template <typename T>
  static GENFAST_INLINE void run(const BackwardStep<T>* s, int64_t panel, int64_t r0, int64_t r1, T* acc) {
    recurrent_gemm(s, panel, r0, r1, acc);
    const int64_t j0 = panel * kUnits, cols = std::min(kUnits, s->Hout - j0);
    for (int64_t m = r0; m < r1; ++m)
      total_dh_row(s, m, j0, cols, acc + (m - r0) * kUnits, s->dh_total_out + m * s->Hout + j0);
  }
};

// Phase B: dL/dr_t = dh_t W_hr over the hidden units, then the cell backward.
struct BackwardProjectB {
  template <typename T>
  static GENFAST_INLINE void run(const BackwardStep<T>* s, int64_t panel, int64_t r0, int64_t r1, T* acc) {
    gemm_panel<T>(r1 - r0, s->Hout, s->dh_total + r0 * s->Hout, s->Hout, s->packed_whr + panel * s->Hout * kUnits,
                  kUnits, acc, kUnits);
    const int64_t j0 = panel * kUnits, units = std::min(kUnits, s->H - j0);
    for (int64_t m = r0; m < r1; ++m) cell_backward_row(s, m, j0, units, acc + (m - r0) * kUnits);
  }
};

template <typename T>
void backward_loop(const Schedule& sc, bool reverse, const T* grad_out, const T* ws, const T* cx,
                   const T* packed_whh, const T* w_hh_t, const T* packed_whr, T* dG, T* dh_state, T* dc_state,
                   T* dh_total, int64_t H, int64_t Hout) {
  const bool project = packed_whr != nullptr;
  const int64_t N = sc.batch, S = sc.rows;
  const int64_t threads = at::get_num_threads();
  std::vector<T> scratch(threads * (N + 16) * kUnits);
  const T* saved_gates = ws;
  const T* saved_c = ws + S * kGates * H;
  // One pass more than there are steps: the last one (n = 0) only adds dG_0 W_hh to
  // the gradient of the initial state.
  const double step_flops = 2.0 * N * kGates * H * Hout;
  for_each_step(sc.steps + 1, step_flops, [&](int64_t s, const StepTeam& team) {
    const auto pass = sc.backward_pass(s, reverse);
    const int64_t n = pass.n, off = pass.offset, prev_t = pass.prev_t, n_prev = pass.n_prev, fwd_prev = pass.fwd_prev;
    const BackwardStep<T> step{prev_t >= 0 ? dG + sc.offset[prev_t] * kGates * H : nullptr,
                               packed_whh,
                               w_hh_t,
                               grad_out + off * Hout,
                               saved_gates + off * kGates * H,
                               saved_c + off * H,
                               fwd_prev >= 0 ? saved_c + sc.offset[fwd_prev] * H : nullptr,
                               cx,
                               dh_total ? dh_total + off * Hout : nullptr,
                               packed_whr,
                               dh_state,
                               dc_state,
                               dG + off * kGates * H,
                               dh_total ? dh_total + off * Hout : nullptr,
                               n,
                               n_prev,
                               sc.active_at(fwd_prev),
                               H,
                               Hout};
    const int64_t rows = std::max(n, n_prev);
    if (!project) {
      run_tiles<BackwardTile>(team, ceil_div(H, kUnits), rows, &step, scratch.data(), kUnits);
    } else {
      run_tiles<BackwardProjectA>(team, ceil_div(Hout, kUnits), rows, &step, scratch.data(), kUnits);
      team.sync();  // phase B reads every column of dh_total
      if (n > 0) run_tiles<BackwardProjectB>(team, ceil_div(H, kUnits), n, &step, scratch.data(), kUnits);
    }
  });
}

// ---------------------------------------------------------------- op boundary
struct Dims {
  int64_t I, H, Hout;
};

Dims check_lstm(const at::Tensor& input, const Schedule& sc, const at::Tensor& hx, const at::Tensor& cx,
                const at::Tensor& w_ih, const at::Tensor& w_hh, const std::optional<at::Tensor>& b_ih,
                const std::optional<at::Tensor>& b_hh, const std::optional<at::Tensor>& w_hr) {
  check_input_dtype(input);
  TORCH_CHECK(w_ih.dim() == 2 && w_ih.size(0) % kGates == 0, "w_ih: expected a (4*hidden_size, input_size) matrix, got ",
              w_ih.sizes());
  Dims d{input.size(-1), w_ih.size(0) / kGates, 0};
  TORCH_CHECK(w_ih.size(1) == d.I, "input: has ", d.I, " features but w_ih expects input_size ", w_ih.size(1));
  TORCH_CHECK(w_hh.dim() == 2 && w_hh.size(0) == kGates * d.H, "w_hh: expected ", kGates * d.H, " rows, got ",
              w_hh.sizes());
  d.Hout = w_hh.size(1);
  if (w_hr.has_value()) {
    check_same(*w_hr, "w_hr", input);
    check_shape(*w_hr, "w_hr", {d.Hout, d.H});
  } else {
    TORCH_CHECK(d.Hout == d.H, "w_hh: expected shape (", kGates * d.H, ", ", d.H, ") without projection, got ",
                w_hh.sizes());
  }
  check_same(w_ih, "w_ih", input);
  check_same(w_hh, "w_hh", input);
  check_same(hx, "hx", input);
  check_same(cx, "cx", input);
  check_shape(hx, "hx", {sc.batch, d.Hout});
  check_shape(cx, "cx", {sc.batch, d.H});
  TORCH_CHECK(b_ih.has_value() == b_hh.has_value(), "b_ih, b_hh: give both biases or neither");
  if (b_ih.has_value()) {
    check_same(*b_ih, "b_ih", input);
    check_same(*b_hh, "b_hh", input);
    check_shape(*b_ih, "b_ih", {kGates * d.H});
    check_shape(*b_hh, "b_hh", {kGates * d.H});
  }
  return d;
}

// The stacked panels of the fused step: panel p holds rows [0, I) of W_ih^T and then rows [0, Hout) of
// W_hh^T, for the columns of all four gates of units [16p, 16p + 16), in gemm_panel's slice layout.
// With I = 0, W_hh's panels alone (the input projection computed before the loop).
template <typename T>
at::Tensor pack_forward_weights(const at::Tensor& w_ih, const at::Tensor& w_hh, int64_t H, int64_t I, int64_t Hout) {
  constexpr int64_t S = kSubWidth<T>;
  const int64_t panels = ceil_div(H, kUnits), K = I + Hout;
  at::Tensor packed = empty_large({panels * K * kWidth}, w_hh.options());
  const T* wi = w_ih.data_ptr<T>();
  const T* wh = w_hh.data_ptr<T>();
  T* out = packed.data_ptr<T>();
  at::parallel_for(0, panels, 1, [&](int64_t p0, int64_t p1) {
    for (int64_t p = p0; p < p1; ++p)
      for (int64_t col = 0; col < kWidth; ++col) {
        T* slice = out + p * K * kWidth + (col / S) * K * S + col % S;
        const int64_t j = p * kUnits + col % kUnits, n = (col / kUnits) * H + j;  // row of W_ih / W_hh
        for (int64_t k = 0; k < I; ++k) slice[k * S] = j < H ? wi[n * I + k] : T(0);
        for (int64_t k = 0; k < Hout; ++k) slice[(I + k) * S] = j < H ? wh[n * Hout + k] : T(0);
      }
  });
  return packed;
}

// Whether G = X W_ih^T + b for every step is one GEMM before the time loop (the steps then read the
// W_hh panels alone), rather than x_t multiplied inside each step against [W_ih | W_hh]. The stacked
// step saves a pass over G, but reads both weights again at every step. That is arithmetic when a
// step has rows enough and the weight stays in cache; with one or two rows the micro-kernel waits on
// its few accumulators over the longer K, and a weight beyond the cache comes from memory every
// step. Measured (in-process A/B, 2-core AMD EPYC, inference): batch 1-2, H 64-1024: 1.1-1.9x faster
// first; stacked weights of 19-34 MB at batch 8-32: 1.1-1.5x; at batch 64-128 0.96-1.04x; weights
// of 2-13 MB at batch 3-64: 0.89-1.02x. Past ~16 MB the weight left the cache: the VM's 32 MB L3
// slice is shared with other tenants (and sysconf reports the whole socket's, so it is not asked).
constexpr int64_t kStackedWeightCachedBytes = int64_t(16) << 20;

inline bool project_input_first(int64_t batch, int64_t stacked_weight_bytes) {
  return batch <= 2 || (batch <= 32 && stacked_weight_bytes > kStackedWeightCachedBytes);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> lstm_forward(
    const at::Tensor& input_, const at::Tensor& hx_, const at::Tensor& cx_, const at::Tensor& w_ih_,
    const at::Tensor& w_hh_, const std::optional<at::Tensor>& b_ih, const std::optional<at::Tensor>& b_hh,
    const std::optional<at::Tensor>& w_hr_, const std::optional<at::Tensor>& batch_sizes, bool reverse, bool train) {
  const Schedule sc = make_schedule(input_, batch_sizes);
  const Dims d = check_lstm(input_, sc, hx_, cx_, w_ih_, w_hh_, b_ih, b_hh, w_hr_);
  TORCH_CHECK(sc.steps > 0, "input: sequence length must be at least 1");
  TORCH_CHECK(sc.batch > 0, "input: batch size must be at least 1");
  const int64_t S = sc.rows, H = d.H, Hout = d.Hout;
  const at::Tensor x = input_.reshape({S, d.I}).contiguous();
  const at::Tensor w_ih = w_ih_.contiguous(), w_hh = w_hh_.contiguous();
  const bool project = w_hr_.has_value();
  // Few rows in all (a decode step) or one sequence: the weights are read in place, and the input
  // projection is one product first. Otherwise x_t is multiplied inside each step against the
  // stacked panels, unless the projection is better done first (see project_input_first).
  const bool in_place = read_weight_in_place(sc);
  const bool project_first =
      in_place || project_input_first(sc.batch, (d.I + Hout) * kGates * H * static_cast<int64_t>(x.element_size()));
  at::Tensor gx = project_first ? empty_large({S, kGates * H}, x.options()) : at::Tensor();
  const at::Tensor bias = b_ih.has_value() ? (*b_ih + *b_hh).contiguous()
                          : project_first ? at::Tensor()
                                          : at::zeros({kGates * H}, x.options());
  at::Tensor out = empty_large({S, Hout}, x.options());
  at::Tensor hbuf = hx_.unsqueeze(0).expand({2, sc.batch, Hout}).contiguous();
  at::Tensor cy = cx_.contiguous().clone();
  at::Tensor hy = at::empty({sc.batch, Hout}, x.options());
  at::Tensor ws = empty_cached({train ? S * (kGates + 1 + (project ? 1 : 0)) * H : 0}, x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "genfast::lstm_forward", [&] {
    at::Tensor packed;
    if (project_first)  // G = X W_ih^T + b_ih + b_hh for every row, one product before the loop.
      matmul<scalar_t>(S, kGates * H, d.I, x.data_ptr<scalar_t>(), d.I, w_ih.data_ptr<scalar_t>(), 1, d.I,
                       bias.defined() ? bias.data_ptr<scalar_t>() : nullptr, gx.data_ptr<scalar_t>(), kGates * H);
    if (!in_place)  // the steps' panels: [W_ih | W_hh], or W_hh alone when G was computed first
      packed = pack_forward_weights<scalar_t>(w_ih, w_hh, H, project_first ? 0 : d.I, Hout);
    at::Tensor packed_whr, r_tmp;
    if (project) {
      packed_whr = pack_columns<scalar_t>(w_hr_->contiguous(), /*transpose=*/true);
      if (!train) r_tmp = at::empty({sc.batch, H}, x.options());
    }
    forward_loop<scalar_t>(sc, reverse, project_first ? nullptr : x.data_ptr<scalar_t>(), d.I,
                           project_first ? gx.data_ptr<scalar_t>() : bias.data_ptr<scalar_t>(),
                           packed.defined() ? packed.data_ptr<scalar_t>() : nullptr, w_hh.data_ptr<scalar_t>(),
                           project ? packed_whr.data_ptr<scalar_t>() : nullptr, out.data_ptr<scalar_t>(),
                           hbuf.data_ptr<scalar_t>(), cy.data_ptr<scalar_t>(), train ? ws.data_ptr<scalar_t>() : nullptr,
                           r_tmp.defined() ? r_tmp.data_ptr<scalar_t>() : nullptr, H, Hout);
    gather_last_hidden<scalar_t>(sc, reverse, out.data_ptr<scalar_t>(), hy.data_ptr<scalar_t>(), Hout);
  });
  std::vector<int64_t> out_shape(input_.sizes().begin(), input_.sizes().end());
  out_shape.back() = Hout;
  return {out.view(out_shape), hy, cy, ws};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> lstm_backward(
    const at::Tensor& grad_output, const at::Tensor& grad_hy, const at::Tensor& grad_cy, const at::Tensor& input_,
    const at::Tensor& hx_, const at::Tensor& cx_, const at::Tensor& w_ih_, const at::Tensor& w_hh_,
    const std::optional<at::Tensor>& w_hr_, const at::Tensor& output, const at::Tensor& workspace,
    const std::optional<at::Tensor>& batch_sizes, bool reverse) {
  const Schedule sc = make_schedule(input_, batch_sizes);
  const Dims d = check_lstm(input_, sc, hx_, cx_, w_ih_, w_hh_, std::nullopt, std::nullopt, w_hr_);
  const int64_t S = sc.rows, H = d.H, Hout = d.Hout;
  const bool project = w_hr_.has_value();
  TORCH_CHECK(workspace.numel() == S * (kGates + 1 + (project ? 1 : 0)) * H,
              "workspace: wrong size; it must come from lstm_forward(..., train=True) on the same inputs");
  check_same(grad_output, "grad_output", input_);
  check_shape(grad_hy, "grad_hy", {sc.batch, Hout});
  check_shape(grad_cy, "grad_cy", {sc.batch, H});
  const at::Tensor x = input_.reshape({S, d.I}).contiguous();
  const at::Tensor go = grad_output.reshape({S, Hout}).contiguous();
  const at::Tensor out = output.reshape({S, Hout}).contiguous();
  const at::Tensor ws = workspace.contiguous(), hx = hx_.contiguous(), cx = cx_.contiguous();
  const at::Tensor w_ih = w_ih_.contiguous(), w_hh = w_hh_.contiguous();
  at::Tensor dG = empty_cached({S, kGates * H}, x.options());
  at::Tensor dh_state = grad_hy.contiguous().clone();
  at::Tensor dc_state = grad_cy.contiguous().clone();
  at::Tensor dh_total = project ? empty_cached({S, Hout}, x.options()) : at::Tensor();
  at::Tensor h_prev = empty_cached({S, Hout}, x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "genfast::lstm_backward", [&] {
    const BackwardWeight<scalar_t> whh(sc, w_hh);
    at::Tensor packed_whr = project ? pack_columns<scalar_t>(w_hr_->contiguous(), false) : at::Tensor();
    backward_loop<scalar_t>(sc, reverse, go.data_ptr<scalar_t>(), ws.data_ptr<scalar_t>(), cx.data_ptr<scalar_t>(),
                            whh.packed_data(), whh.transposed_data(),
                            project ? packed_whr.data_ptr<scalar_t>() : nullptr,
                            dG.data_ptr<scalar_t>(), dh_state.data_ptr<scalar_t>(), dc_state.data_ptr<scalar_t>(),
                            project ? dh_total.data_ptr<scalar_t>() : nullptr, H, Hout);
    gather_previous_hidden<scalar_t>(sc, reverse, out.data_ptr<scalar_t>(), hx.data_ptr<scalar_t>(),
                                     h_prev.data_ptr<scalar_t>(), Hout);
  });
  // Weight gradients: one large GEMM each over all steps.
  at::Tensor grad_input = empty_cached({S, d.I}, x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "genfast::lstm_backward_input", [&] {
    matmul<scalar_t>(S, d.I, kGates * H, dG.data_ptr<scalar_t>(), kGates * H, w_ih.data_ptr<scalar_t>(), d.I, 1,
                     nullptr, grad_input.data_ptr<scalar_t>(), d.I);
  });
  grad_input = grad_input.view(input_.sizes());
  at::Tensor grad_w_ih = gemm(dG.t(), x);
  at::Tensor grad_w_hh = gemm(dG.t(), h_prev);
  at::Tensor grad_bias = dG.sum(0);
  at::Tensor grad_w_hr = at::empty({0}, x.options());
  if (project) {
    const at::Tensor r = ws.narrow(0, S * (kGates + 1) * H, S * H).view({S, H});
    grad_w_hr = gemm(dh_total.t(), r);
  }
  return {grad_input, dh_state, dc_state, grad_w_ih, grad_w_hh, grad_bias, grad_w_hr};
}

}  // namespace

TORCH_LIBRARY_IMPL(genfast, CPU, m) {
  m.impl("lstm_forward", &lstm_forward);
  m.impl("lstm_backward", &lstm_backward);
}

}  // namespace genfast::cpu
