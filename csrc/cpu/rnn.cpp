// CPU implementations of genfast::{lstm,gru}_{forward,backward}: the time loops of every recurrent
// cell, forward and backward, and the op bodies around them, written once over the cell policy
// (csrc/rnn/cells.h). One layer, one direction, the whole (padded or packed) sequence per call. The
// schedule and the argument checks are shared with CUDA (csrc/rnn/rnn_host.h); the thread team, the
// partition of a step and the recurrent tiles are in csrc/cpu/rnn_common.h.
//
// Forward: for each step one parallel pass in which every thread owns a panel of 16 hidden units:
// it multiplies h_{t-1} by its packed slice of W_hh^T (all gates of its units) and applies the
// cell update to that tile while it is still in L1 (Cell::forward_units). The input projection
// G = X W_ih^T + b is one GEMM before the loop; for cells whose input and recurrent sides simply
// add (Cell::kSidesAdd), x_t may instead be multiplied inside the step against the stacked panels
// of [W_ih | W_hh] (see project_input_first). A decode step (a few rows in all) or a single
// sequence reads W_hh in place by dot products (read_weight_in_place). With a projection
// (Cell::kProjection, w_hr) a second pass per step computes h_t = W_hr r_t.
//
// Backward (BPTT) mirrors it: per step, one pass computes dh = dG_{t+1} W_hh for a thread's units
// and the cell backward for them (Cell::backward_units); the weight gradients are then large GEMMs
// over all steps (rnn_backward below).
//
// Workspace (train=true): rnn::WorkspaceLayout.
#include <torch/library.h>


#include "cpu/gemm_entry.h"
#include "cpu/rnn_common.h"
#include "cpu/rnn_regularizers.h"
#include "cpu/simd.h"
#include "rnn/cells.h"
#include "rnn/rnn_host.h"
#include "rnn/regularizers_host.h"

namespace genfast::cpu {
namespace {

// ---------------------------------------------------------------- forward
template <typename T>
struct ForwardStep {
  const T* h_prev;   // (N, Hout) state read by this step
  const T* x;        // (n, I) input rows of this step, multiplied in the step with the stacked panels; or
                     // nullptr when gx already holds X W_ih^T
  const T* packed;   // panels of ((I + Hout) x width): [W_ih | W_hh]^T, gates of 16 units side by side; or
                     // nullptr:
  const T* w_hh;     // (gates*H, Hout) unpacked, read in place by dot products (few steps and rows)
  const T* gx;       // rows gx_stride apart added to the product: X W_ih^T + b for this step's rows, or
                     // b_ih + b_hh (gx_stride = 0) when x is multiplied in the step
  int64_t gx_stride;
  const T* b_hh;     // (gates*H) recurrent-side bias of cells whose sides do not add, else nullptr
  int64_t I;
  T* c;              // (N, H) cell state, updated in place (cells with one), else nullptr
  T* h_out;          // (n, H) rows receiving h_t: the output, or r_t when projecting
  T* h_next;         // (N, Hout) next state, or nullptr when projecting (the projection writes it)
  T* saved;          // (n, saved*H) or nullptr
  T* saved_c;        // (n, H) or nullptr
  int64_t H, Hout, ld_h_out;
  const RegularizerStep<T>* reg = nullptr;  // zoneout / recurrent dropout (rnn_regularizers.h), or nullptr
};

template <typename Cell>
struct ForwardTile {
  static constexpr int64_t kGates = Cell::kGates;
  static constexpr int64_t kWidth = kGates * kUnits;

  template <typename T>
  static GENFAST_INLINE void run(const ForwardStep<T>* s, int64_t panel, int64_t r0, int64_t r1, T* acc) {
    const int64_t H = s->H;
    const int64_t j0 = panel * kUnits;
    const int64_t units = std::min(kUnits, H - j0);
    // The recurrent product's h_{t-1}: times the recurrent dropout mask when there is one.
    const T* h_in = s->reg && s->reg->h_product ? s->reg->h_product : s->h_prev;
    if (s->reg)
      for (int64_t m = r0; m < std::min(r1, r0 + kPrefetchRows); ++m) prefetch_regularizer_row(s->reg, m, j0, H);
    if (Cell::kSidesAdd && s->x) {
      const int64_t K = s->I + s->Hout;
      gemm_panel_stacked<T>(r1 - r0, s->I, s->x + r0 * s->I, s->I, s->Hout, h_in + r0 * s->Hout, s->Hout,
                            s->packed + panel * K * kWidth, kWidth, acc, kWidth);
    } else {
      for (int64_t m = r0; m < std::min(r1, r0 + kPrefetchRows); ++m)
        prefetch_gate_row(s->gx + m * s->gx_stride + j0, kGates, H);
      recurrent_tile<T, kGates>(s->packed, s->w_hh, h_in, s->Hout, H, panel, r0, r1, acc);
    }
    rows(units, s, j0, r0, r1, acc);
  }

  template <typename T>
  static GENFAST_INLINE void rows(int64_t units, const ForwardStep<T>* s, int64_t j0, int64_t r0, int64_t r1, T* acc) {
    const int64_t H = s->H;
    const T* b = Cell::kSidesAdd ? nullptr : s->b_hh + j0;
    for (int64_t m = r0; m < r1; ++m, acc += kWidth) {
      if ((!Cell::kSidesAdd || s->gx_stride) && m + kPrefetchRows < r1)
        prefetch_gate_row(s->gx + (m + kPrefetchRows) * s->gx_stride + j0, kGates, H);
      if (s->reg && m + kPrefetchRows < r1) prefetch_regularizer_row(s->reg, m + kPrefetchRows, j0, H);
      const T* gx = s->gx + m * s->gx_stride + j0;
      T* c = Cell::kCellState ? s->c + m * H + j0 : nullptr;
      const T* h_prev = Cell::kCellState ? nullptr : s->h_prev + m * s->Hout + j0;
      T* h = s->h_out + m * s->ld_h_out + j0;
      T act[Cell::kSaved][kUnits], unused[kUnits];
      T* h_next = (!Cell::kProjection || s->h_next) ? s->h_next + m * s->Hout + j0 : unused;  // projecting: phase 2
      T c_prev[kUnits];
      if (s->reg) regularize_forward_before<Cell>(s->reg, c, units, c_prev);
      Cell::template forward_units<kUnits, T>(units, acc, gx, b, H, c, h_prev, h, h_next, act);
      if (s->saved) {  // training: keep what backward needs
        T* g = s->saved + m * Cell::kSaved * H + j0;
        for (int64_t slot = 0; slot < Cell::kSaved; ++slot) rnn::copy_units<T>(units, act[slot], g + slot * H);
        if (Cell::kCellState) rnn::copy_units<T>(units, c, s->saved_c + m * H + j0);
      }
      if (s->reg)  // zoneout of what the cell produced; h_t * r for the next product
        regularize_forward_after<Cell>(s->reg, m, j0, units, H, s->Hout, s->h_prev + m * s->Hout + j0, c_prev, c, h,
                                       h_next);
    }
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

// The pointers a forward loop works on.
template <typename T>
struct ForwardBuffers {
  const T* x;           // (S, I) input, multiplied inside the steps (stacked panels); or nullptr:
  const T* gx;          // (S, gates*H) X W_ih^T + b computed before the loop, or the bias row when x is set
  const T* packed;      // the steps' weight panels, or nullptr (W_hh read in place)
  const T* w_hh;        // (gates*H, Hout)
  const T* b_hh;        // recurrent-side bias (cells whose sides do not add), else nullptr
  const T* packed_whr;  // projecting: panels of W_hr^T, else nullptr
  T* out;               // (S, Hout)
  T* hbuf;              // (2, N, Hout): h_{t-1} and h_t, alternating
  T* c;                 // (N, H) cell state, or nullptr
  T* ws;                // training workspace (rnn::WorkspaceLayout), or nullptr
  T* r_tmp;             // projecting without training: (N, H) for r_t
  const RegularizerBuffers<T>* reg = nullptr;  // zoneout / recurrent dropout, or nullptr
};

template <typename Cell, typename T>
void forward_loop(const Schedule& sc, bool reverse, const ForwardBuffers<T>& b, int64_t I, int64_t H, int64_t Hout) {
  constexpr int64_t kGates = Cell::kGates, kWidth = ForwardTile<Cell>::kWidth;
  const bool project = b.packed_whr != nullptr;
  const int64_t N = sc.batch, S = sc.rows;
  const int64_t threads = at::get_num_threads();
  // A row block never exceeds max(N, rows per micro-kernel) rows.
  std::vector<T> scratch(threads * (N + 16) * kWidth);
  const rnn::WorkspaceLayout layout = rnn::workspace_layout<Cell>(S, H, project);
  T* saved = b.ws;
  T* saved_c = (b.ws && Cell::kCellState) ? b.ws + layout.cell : nullptr;
  T* saved_r = (b.ws && project) ? b.ws + layout.projected : nullptr;
  const double step_flops = 2.0 * N * ((b.x ? I : 0) + Hout) * kGates * H + (project ? 2.0 * N * Hout * H : 0.0);
  const int64_t weight_bytes = (((b.x ? I : 0) + Hout) * kGates * H + (project ? Hout * H : 0)) * sizeof(T);
  for_each_step(sc.steps, step_flops, [&](int64_t s, const StepTeam& team) {
    const int64_t t = sc.forward_step(s, reverse);
    const int64_t n = sc.active[t], off = sc.offset[t];
    T* h_prev = b.hbuf + (s % 2) * N * Hout;
    T* h_next = b.hbuf + ((s + 1) % 2) * N * Hout;
    ForwardStep<T> step{h_prev,
                              b.x ? b.x + off * I : nullptr,
                              b.packed,
                              b.w_hh,
                              b.x ? b.gx : b.gx + off * kGates * H,
                              b.x ? 0 : kGates * H,
                              b.b_hh,
                              I,
                              b.c,
                              project ? (saved_r ? saved_r + off * H : b.r_tmp) : b.out + off * Hout,
                              project ? nullptr : h_next,
                              saved ? saved + off * Cell::kSaved * H : nullptr,
                              saved_c ? saved_c + off * H : nullptr,
                              H,
                              Hout,
                              project ? H : Hout};
    RegularizerStep<T> reg;
    if (b.reg) {
      reg = b.reg->step(s, off, N, H, Hout);
      step.reg = &reg;
    }
    run_tiles<ForwardTile<Cell>>(team, ceil_div(H, kUnits), n, &step, scratch.data(), kWidth);
    if constexpr (Cell::kProjection) {
      if (project) {
        team.sync();  // the projection reads every unit of r_t
        const ProjectStep<T> proj{step.h_out, b.packed_whr, b.out + off * Hout, h_next, H, Hout};
        run_tiles<ProjectTile>(team, ceil_div(Hout, kUnits), n, &proj, scratch.data(), kWidth);
      }
    }
  }, row_split(sc, weight_bytes, static_cast<int64_t>(scratch.size())));
}

// ---------------------------------------------------------------- backward
template <typename T>
struct BackwardStep {
  const T* dG_prev;      // (n_prev, gates*H) recurrent-side gate gradients of the step processed just before,
                         // or nullptr
  const T* packed_whh;   // panels of (gates*H x kUnits): W_hh columns (hidden outputs) in natural order; or
                         // nullptr:
  const T* w_hh_t;       // (Hout, gates*H): W_hh^T, rows read in place by dot products (one sequence)
  const T* grad_out;     // (n, Hout) rows of dL/d output
  const T* saved;        // (n, saved*H) what the forward saved
  const T* c_cur;        // (n, H) saved c_t (cells with a cell state), else nullptr
  const T* state_prev;   // (n_prev_fwd, H) the state the cell read at this step: the saved c (cells with a
                         // cell state) or the output h of the previous forward step; or nullptr
  const T* state_init;   // (N, H) the initial state of that kind: cx or hx
  const T* dh_total;     // projecting: (n, Hout) total dL/dh_t from phase A; else nullptr
  const T* packed_whr;   // projecting: panels of (Hout x kUnits): W_hr columns
  T* dh_state;           // (N, Hout) gradient reaching h from outside the recurrence (dL/dh_T at first)
  T* dc_state;           // (N, H) dL/dc carried between steps, or nullptr
  T* dG;                 // (n, gates*H) input-side gate gradients of this step (pre-activation)
  T* dG_h;               // (n, gates*H) recurrent-side ones (cells whose sides do not add), else nullptr
  T* dh_total_out;       // projecting, phase A: where dh_total goes
  int64_t n, n_prev, n_prev_fwd, H, Hout;
  const RegularizerStep<T>* reg = nullptr;  // zoneout / recurrent dropout masks, or nullptr
};

// The backward of row m of a step for a cell without a direct hidden term (d_h: the total dL/dh_t).
template <typename Cell, typename T>
GENFAST_INLINE void cell_backward_row(const BackwardStep<T>* s, int64_t m, int64_t j0, int64_t units, const T* d_h) {
  const int64_t H = s->H;
  const T* prev = m < s->n_prev_fwd ? s->state_prev + m * H + j0 : s->state_init + m * H + j0;
  Cell::backward_units(units, H, d_h, s->dc_state + m * H + j0, s->saved + m * Cell::kSaved * H + j0, prev,
                       s->c_cur + m * H + j0, s->dG + m * Cell::kGates * H + j0);
}

// The same for a cell with a direct term (Cell::kDirectHidden): it forms the total from its parts
// and rewrites dh_state in one loop. rec: dG_h W_hh of the step processed before, or zeros.
template <typename Cell, typename T>
GENFAST_INLINE void direct_cell_backward_row(const BackwardStep<T>* s, int64_t m, int64_t j0, int64_t units,
                                             const T* rec) {
  const int64_t H = s->H;
  const T* prev = m < s->n_prev_fwd ? s->state_prev + m * H + j0 : s->state_init + m * H + j0;
  Cell::backward_units(units, H, s->grad_out + m * s->Hout + j0, s->dh_state + m * s->Hout + j0, rec,
                       s->saved + m * Cell::kSaved * H + j0, prev, s->dG + m * Cell::kGates * H + j0,
                       s->dG_h + m * Cell::kGates * H + j0);
}

// The same under h zoneout: the cell gets the zoned part of the total (rnn_regularizers.h).
template <typename Cell, typename T>
GENFAST_INLINE void zoneout_direct_backward_row(const BackwardStep<T>* s, int64_t m, int64_t j0, int64_t units,
                                                const T* rec) {
  const int64_t H = s->H;
  const T* prev = m < s->n_prev_fwd ? s->state_prev + m * H + j0 : s->state_init + m * H + j0;
  zoneout_direct_cell_backward<kUnits, T>(
      s->reg, m, j0, units, H, s->grad_out + m * s->Hout + j0, s->dh_state + m * s->Hout + j0, rec,
      [&](const T* d_fresh, T* direct, const T* zeros) __attribute__((always_inline)) {
        Cell::backward_units(units, H, d_fresh, direct, zeros, s->saved + m * Cell::kSaved * H + j0, prev,
                             s->dG + m * Cell::kGates * H + j0, s->dG_h + m * Cell::kGates * H + j0);
      });
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

template <typename Cell, typename T>
GENFAST_INLINE void recurrent_gemm(const BackwardStep<T>* s, int64_t panel, int64_t r0, int64_t r1, T* acc) {
  constexpr int64_t G = Cell::kGates;
  const int64_t rows = std::min(r1, s->n_prev) - r0;
  if (rows > 0)
    backward_recurrent_tile<T>(s->packed_whh, s->w_hh_t, s->dG_prev + r0 * G * s->H, G * s->H, s->Hout, panel, rows,
                               acc);
}

// What the cell backward of row m reads from the forward's saved state (and writes to
// the gate gradients), fetched ahead like the forward's input projection (prefetch_gate_row).
template <typename Cell, typename T>
GENFAST_INLINE void prefetch_backward_row(const BackwardStep<T>* s, int64_t m, int64_t j0) {
  const int64_t H = s->H;
  constexpr int64_t G = Cell::kGates;
  prefetch_gate_row(s->saved + m * Cell::kSaved * H + j0, Cell::kSaved, H);
  if (Cell::kCellState) prefetch_gate_row(s->c_cur + m * H + j0, 1, 0);
  if (m < s->n_prev_fwd) prefetch_gate_row(s->state_prev + m * H + j0, 1, 0);
  prefetch_gate_row(s->grad_out + m * s->Hout + j0, 1, 0);
  prefetch_gate_row(s->dG + m * G * H + j0, G, H);
  if (!Cell::kSidesAdd) prefetch_gate_row(s->dG_h + m * G * H + j0, G, H);
  if (s->reg) prefetch_regularizer_row(s->reg, m, j0, H);
}

// Without projection: h's columns are the hidden units, so one tile does it all. A work item covers
// Panels consecutive panels of 16 units: their packed W_hh columns lie side by side in memory, so
// one gemm_panel call of width Panels*16 computes the recurrent product of all of them (with two,
// the AVX-512 micro-kernel covers both slices per call), then each panel's cell backward follows.
// acc rows are kWidth values apart.
template <typename Cell, int64_t Panels = 1>
struct BackwardTile {
  static constexpr int64_t kWidth = Panels * kUnits;

  template <typename T>
  static GENFAST_INLINE void run(const BackwardStep<T>* s, int64_t item, int64_t r0, int64_t r1, T* acc) {
    const int64_t p0 = item * Panels, panels = std::min(Panels, ceil_div(s->H, kUnits) - p0);
    for (int64_t q = 0; q < panels; ++q)
      for (int64_t m = r0; m < std::min({r1, r0 + kPrefetchRows, s->n}); ++m)
        prefetch_backward_row<Cell>(s, m, (p0 + q) * kUnits);
    if constexpr (Panels == 1) {
      recurrent_gemm<Cell>(s, p0, r0, r1, acc);
    } else {  // packed W_hh only (wide_backward_tiles)
      constexpr int64_t G = Cell::kGates;
      const int64_t prev_rows = std::min(r1, s->n_prev) - r0, K = G * s->H;
      if (prev_rows > 0)
        gemm_panel<T>(prev_rows, K, s->dG_prev + r0 * K, K, s->packed_whh + p0 * K * kUnits, panels * kUnits, acc,
                      kWidth);
    }
    for (int64_t q = 0; q < panels; ++q) {
      const int64_t j0 = (p0 + q) * kUnits, units = std::min(kUnits, s->H - j0);
      if (s->reg)
        mask_recurrent_rows<kWidth>(s->reg, r0, std::min(r1, s->n_prev) - r0, j0, units, s->Hout, acc + q * kUnits);
      rows(units, s, j0, r0, r1, acc + q * kUnits);
    }
  }

  template <typename T>
  static GENFAST_INLINE void rows(int64_t units, const BackwardStep<T>* s, int64_t j0, int64_t r0, int64_t r1,
                                  const T* acc) {
    if constexpr (Cell::kDirectHidden) {
      static constexpr T zeros[kUnits] = {};
      for (int64_t m = r0; m < r1; ++m, acc += kWidth) {
        if (m + kPrefetchRows < std::min(r1, s->n)) prefetch_backward_row<Cell>(s, m + kPrefetchRows, j0);
        if (m >= s->n) {  // no longer active: collect the gradient of its initial state
          T* dh = s->dh_state + m * s->Hout + j0;
          if (m < s->n_prev)
            for (int64_t u = 0; u < units; ++u) dh[u] += acc[u];
          continue;
        }
        if (s->reg && s->reg->zoneout) {
          zoneout_direct_backward_row<Cell>(s, m, j0, units, m < s->n_prev ? acc : zeros);
          continue;
        }
        direct_cell_backward_row<Cell>(s, m, j0, units, m < s->n_prev ? acc : zeros);
      }
    } else {
      T d_h[kUnits];
      for (int64_t m = r0; m < r1; ++m) {
        if (m + kPrefetchRows < std::min(r1, s->n)) prefetch_backward_row<Cell>(s, m + kPrefetchRows, j0);
        if (!total_dh_row(s, m, j0, units, acc + (m - r0) * kWidth, d_h)) continue;
        if (s->reg)
          regularized_cell_backward<Cell>(s->reg, m, j0, units, s->H, d_h, s->dh_state + m * s->Hout + j0,
                                          Cell::kCellState ? s->dc_state + m * s->H + j0 : nullptr,
                                          [&]() __attribute__((always_inline)) {
                                            cell_backward_row<Cell>(s, m, j0, units, d_h);
                                          });
        else
          cell_backward_row<Cell>(s, m, j0, units, d_h);
      }
    }
  }
};

// With projection, phase A: total dL/dh_t over Hout columns.
template <typename Cell>
struct BackwardProjectA {
  template <typename T>
  static GENFAST_INLINE void run(const BackwardStep<T>* s, int64_t panel, int64_t r0, int64_t r1, T* acc) {
    recurrent_gemm<Cell>(s, panel, r0, r1, acc);
    const int64_t j0 = panel * kUnits, cols = std::min(kUnits, s->Hout - j0);
    for (int64_t m = r0; m < r1; ++m)
      total_dh_row(s, m, j0, cols, acc + (m - r0) * kUnits, s->dh_total_out + m * s->Hout + j0);
  }
};

// Phase B: dL/dr_t = dh_t W_hr over the hidden units, then the cell backward.
template <typename Cell>
struct BackwardProjectB {
  template <typename T>
  static GENFAST_INLINE void run(const BackwardStep<T>* s, int64_t panel, int64_t r0, int64_t r1, T* acc) {
    gemm_panel<T>(r1 - r0, s->Hout, s->dh_total + r0 * s->Hout, s->Hout, s->packed_whr + panel * s->Hout * kUnits,
                  kUnits, acc, kUnits);
    const int64_t j0 = panel * kUnits, units = std::min(kUnits, s->H - j0);
    for (int64_t m = r0; m < r1; ++m) cell_backward_row<Cell>(s, m, j0, units, acc + (m - r0) * kUnits);
  }
};

// The pointers a backward loop works on.
template <typename T>
struct BackwardBuffers {
  const T* grad_out;    // (S, Hout)
  const T* ws;          // the forward's training workspace
  const T* out;         // (S, Hout) the forward's output
  const T* state_init;  // cx (cells with a cell state) or hx
  const T* packed_whh;  // BackwardWeight: packed W_hh columns, or nullptr:
  const T* w_hh_t;      // W_hh^T read in place
  const T* packed_whr;  // projecting: packed W_hr columns, else nullptr
  T* dG;                // (S, gates*H) input-side gate gradients
  T* dG_h;              // (S, gates*H) recurrent-side ones (== dG when the sides add)
  T* dh_state;          // (N, Hout)
  T* dc_state;          // (N, H) or nullptr
  T* dh_total;          // projecting: (S, Hout), else nullptr
  const RegularizerBuffers<T>* reg = nullptr;  // zoneout / recurrent dropout masks, or nullptr
};

// The most (hidden units x rows) of one backward step that a thread of a team of `threads` gets when
// work items are `panels_per_item` panels wide (run_tiles' assignment of partition()'s items).
inline int64_t largest_backward_share(int64_t H, int64_t rows, int64_t threads, int64_t panels_per_item) {
  const int64_t width = panels_per_item * kUnits;
  const Partition part = partition(ceil_div(H, width), rows, threads);
  const int64_t items = part.items(), chunk = ceil_div(items, threads);
  int64_t most = 0;
  for (int64_t t = 0; t < threads; ++t) {
    int64_t work = 0;
    for (int64_t item = std::min(items, t * chunk); item < std::min(items, (t + 1) * chunk); ++item) {
      const int64_t r0 = (item % part.row_blocks) * part.block, r1 = std::min(rows, r0 + part.block);
      const int64_t j0 = (item / part.row_blocks) * width;
      work += std::max<int64_t>(0, r1 - r0) * std::min(width, ceil_div(H - j0, kUnits) * kUnits);
    }
    most = std::max(most, work);
  }
  return most;
}

// Whether the backward's work items cover two panels (32 units) rather than one: the packed W_hh's
// two consecutive panels then go through one gemm_panel call, which the AVX-512 micro-kernel runs two
// float slices at a time (a 16-unit float panel is one slice; a double one is two already, and AVX2
// runs one slice per call). Only where no thread of the team gets more work than with 16-unit items:
// with few panels per thread the finer split balances the team better.
template <typename T>
inline bool wide_backward_tiles(bool packed, int64_t batch, int64_t H, int64_t threads) {
  if (!packed || sizeof(T) != 4 || simd_level() != SimdLevel::kAVX512 || H <= kUnits) return false;
  return largest_backward_share(H, batch, threads, 2) <= largest_backward_share(H, batch, threads, 1);
}

template <typename Cell, typename T>
void backward_loop(const Schedule& sc, bool reverse, const BackwardBuffers<T>& b, int64_t H, int64_t Hout) {
  constexpr int64_t kGates = Cell::kGates;
  const bool project = b.packed_whr != nullptr;
  const int64_t N = sc.batch, S = sc.rows;
  const int64_t threads = at::get_num_threads();
  const rnn::WorkspaceLayout layout = rnn::workspace_layout<Cell>(S, H, project);
  // The state history the cell read: c_t saved by the forward, or its output h_t.
  const T* states = Cell::kCellState ? b.ws + layout.cell : b.out;
  if (Cell::kCellState && b.reg && b.reg->carried_c) states = b.reg->carried_c;  // cell zoneout: c_t, not c~_t
  // One pass more than there are steps: the last one (n = 0) only adds dG_0 W_hh to
  // the gradient of the initial state.
  const double step_flops = 2.0 * N * kGates * H * Hout;
  const int64_t weight_bytes = (kGates * H * Hout + (project ? Hout * H : 0)) * int64_t(sizeof(T));
  const int64_t scratch_per_thread = (N + 16) * 2 * kUnits;  // room for the wide tiles
  const RowSplit split = row_split(sc, weight_bytes, threads * scratch_per_thread);
  const int loop_size = loop_threads(step_flops);
  const int64_t team_size = splits_rows(split, loop_size) ? 1 : loop_size;  // split: every panel of its rows
  const bool wide = !project && wide_backward_tiles<T>(b.packed_whh != nullptr, N, H, team_size);
  std::vector<T> scratch(threads * scratch_per_thread);
  for_each_step(sc.steps + 1, step_flops, [&](int64_t s, const StepTeam& team) {
    const auto pass = sc.backward_pass(s, reverse);
    const int64_t n = pass.n, off = pass.offset, prev_t = pass.prev_t, n_prev = pass.n_prev, fwd_prev = pass.fwd_prev;
    BackwardStep<T> step{prev_t >= 0 ? b.dG_h + sc.offset[prev_t] * kGates * H : nullptr,
                               b.packed_whh,
                               b.w_hh_t,
                               b.grad_out + off * Hout,
                               b.ws + off * Cell::kSaved * H,
                               Cell::kCellState ? b.ws + layout.cell + off * H : nullptr,
                               fwd_prev >= 0 ? states + sc.offset[fwd_prev] * H : nullptr,
                               b.state_init,
                               b.dh_total ? b.dh_total + off * Hout : nullptr,
                               b.packed_whr,
                               b.dh_state,
                               b.dc_state,
                               b.dG + off * kGates * H,
                               b.dG_h + off * kGates * H,
                               b.dh_total ? b.dh_total + off * Hout : nullptr,
                               n,
                               n_prev,
                               sc.active_at(fwd_prev),
                               H,
                               Hout};
    RegularizerStep<T> reg;
    if (b.reg) {
      reg = b.reg->step(s, off, N, H, Hout);
      step.reg = &reg;
    }
    const int64_t rows = std::max(n, n_prev);
    if (!Cell::kProjection || !project) {
      if (wide)
        run_tiles<BackwardTile<Cell, 2>>(team, ceil_div(H, 2 * kUnits), rows, &step, scratch.data(), 2 * kUnits);
      else
        run_tiles<BackwardTile<Cell>>(team, ceil_div(H, kUnits), rows, &step, scratch.data(), kUnits);
    } else if constexpr (Cell::kProjection) {
      run_tiles<BackwardProjectA<Cell>>(team, ceil_div(Hout, kUnits), rows, &step, scratch.data(), kUnits);
      team.sync();  // phase B reads every column of dh_total
      if (n > 0) run_tiles<BackwardProjectB<Cell>>(team, ceil_div(H, kUnits), n, &step, scratch.data(), kUnits);
    }
  }, split);
}

// ---------------------------------------------------------------- weights
// The forward steps' weight panels: panel p holds rows [0, I) of W_ih^T and then rows [0, Hout) of
// W_hh^T, for the columns of all gates of units [16p, 16p + 16), in gemm_panel's slice layout.
// With I = 0, W_hh's panels alone (the input projection computed before the loop).
template <typename T, int64_t Gates>
at::Tensor pack_forward_weights(const at::Tensor& w_ih, const at::Tensor& w_hh, int64_t H, int64_t I, int64_t Hout) {
  constexpr int64_t S = kSubWidth<T>;
  constexpr int64_t kWidth = Gates * kUnits;
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

// The last-level cache of one core's cluster (cpu0's level-3 slice), or 0 where it cannot be read.
inline int64_t last_level_cache_bytes() {
  static const int64_t bytes = sysfs_cache_bytes(3);
  return bytes;
}

// A stacked [W_ih | W_hh] weight up to this size is taken to stay in the cache from one step to the
// next (the multiply-in-step path reads it every step): half the last-level cache slice, the rest
// being G, the states and other tenants'; 16 MB where the cache size is unknown.
inline int64_t stacked_weight_cached_bytes() {
  static const int64_t bytes = [] {
    const int64_t llc = last_level_cache_bytes();
    return llc > 0 ? llc / 2 : int64_t(16) << 20;
  }();
  return bytes;
}
// At most this many rows a step, the input projection is one GEMM first: the micro-kernel over the
// longer stacked K waits on its few accumulators.
constexpr int64_t kProjectFirstMaxRows = 2;
// Up to this many rows a step, a stacked weight beyond the cache is projected first too; above, the
// arithmetic per weight byte hides the memory traffic of the stacked step.
constexpr int64_t kProjectFirstLargeWeightMaxRows = 32;

// Whether G = X W_ih^T + b for every step is one GEMM before the time loop (the steps then read the
// W_hh panels alone), rather than x_t multiplied inside each step against [W_ih | W_hh] (cells whose
// sides add only). The stacked step saves a pass over G, but reads both weights again at every step.
// Why these cut-offs: docs/design.md (RNN thresholds).
inline bool project_input_first(int64_t batch, int64_t stacked_weight_bytes) {
  return batch <= kProjectFirstMaxRows ||
         (batch <= kProjectFirstLargeWeightMaxRows && stacked_weight_bytes > stacked_weight_cached_bytes());
}

// ---------------------------------------------------------------- op bodies
using rnn::Dims;
using rnn::LayerArgs;

struct ForwardResult {
  at::Tensor output, hy, cy, workspace;
};

template <typename Cell>
ForwardResult rnn_forward(const LayerArgs& a, bool reverse, bool train,
                          const rnn::RegularizerArgs& regularizers = rnn::kNoRegularizers) {
  constexpr int64_t G = Cell::kGates;
  const Schedule sc = rnn::make_schedule(a.input, a.batch_sizes);
  const Dims d = rnn::check_forward<Cell>(rnn::kCpu, a, sc);
  rnn::check_regularizers<Cell>(regularizers, a, sc, d);
  const int64_t S = sc.rows, H = d.H, Hout = d.Hout;
  const at::Tensor x = a.input.reshape({S, d.I}).contiguous();
  const at::Tensor w_ih = a.w_ih.contiguous(), w_hh = a.w_hh.contiguous();
  const bool project = Cell::kProjection && a.w_hr.has_value();
  // Few rows in all (a decode step) or one sequence: the weights are read in place, and the input
  // projection is one product first. Otherwise, for cells whose sides add, x_t is multiplied inside
  // each step against the stacked panels, unless the projection is better done first.
  const bool in_place = read_weight_in_place(sc);
  const bool project_first =
      !Cell::kSidesAdd || in_place ||
      project_input_first(sc.batch, (d.I + Hout) * G * H * static_cast<int64_t>(x.element_size()));
  at::Tensor gx = project_first ? empty_large({S, G * H}, x.options()) : at::Tensor();
  // The input side's bias: b_ih + b_hh when the sides add (a zero row for the stacked step), else
  // b_ih, with b_hh added to the recurrent side in the step.
  at::Tensor x_bias, h_bias;
  if (Cell::kSidesAdd) {
    x_bias = a.b_ih.has_value() ? (*a.b_ih + *a.b_hh).contiguous()
             : project_first    ? at::Tensor()
                                : at::zeros({G * H}, x.options());
  } else {
    x_bias = a.b_ih.has_value() ? a.b_ih->contiguous() : at::Tensor();
    h_bias = a.b_hh.has_value() ? a.b_hh->contiguous() : at::zeros({G * H}, x.options());
  }
  at::Tensor out = empty_large({S, Hout}, x.options());
  at::Tensor hbuf = a.hx.unsqueeze(0).expand({2, sc.batch, Hout}).contiguous();
  at::Tensor cy = Cell::kCellState ? a.cx->contiguous().clone() : at::Tensor();
  at::Tensor hy = at::empty({sc.batch, Hout}, x.options());
  const int64_t ws_base = rnn::workspace_layout<Cell>(S, H, project).size;
  at::Tensor ws = empty_cached({train ? ws_base + regularizers.extra_workspace_values() * S * H : 0}, x.options());
  const RegularizerTensors reg_tensors(regularizers, a.hx);
  if (project_first)  // G = X W_ih^T + b for every row, one product before the loop.
    gemm_out(gx, x, w_ih.t(), x_bias.defined() ? std::optional<at::Tensor>(x_bias) : std::nullopt);
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "genfast::rnn_forward", [&] {
    at::Tensor packed;
    if (!in_place)  // the steps' panels: [W_ih | W_hh], or W_hh alone when G was computed first
      packed = pack_forward_weights<scalar_t, G>(w_ih, w_hh, H, project_first ? 0 : d.I, Hout);
    at::Tensor packed_whr, r_tmp;
    if (project) {
      packed_whr = pack_columns<scalar_t>(a.w_hr->contiguous(), /*transpose=*/true);
      if (!train) r_tmp = at::empty({sc.batch, H}, x.options());
    }
    auto ptr = [](const at::Tensor& t) { return t.defined() ? t.data_ptr<scalar_t>() : nullptr; };
    ForwardBuffers<scalar_t> buffers{project_first ? nullptr : x.data_ptr<scalar_t>(),
                                           project_first ? gx.data_ptr<scalar_t>() : x_bias.data_ptr<scalar_t>(),
                                           ptr(packed),
                                           w_hh.data_ptr<scalar_t>(),
                                           ptr(h_bias),
                                           ptr(packed_whr),
                                           out.data_ptr<scalar_t>(),
                                           hbuf.data_ptr<scalar_t>(),
                                           ptr(cy),
                                           train ? ws.data_ptr<scalar_t>() : nullptr,
                                           ptr(r_tmp)};
    const RegularizerBuffers<scalar_t> reg =
        reg_tensors.buffers<scalar_t>(train && regularizers.cell_zoneout.has_value() ? ws.data_ptr<scalar_t>() + ws_base
                                                                                     : nullptr);
    if (regularizers.any()) buffers.reg = &reg;
    forward_loop<Cell, scalar_t>(sc, reverse, buffers, d.I, H, Hout);
    gather_last_hidden<scalar_t>(sc, reverse, out.data_ptr<scalar_t>(), hy.data_ptr<scalar_t>(), Hout);
  });
  return {out.view(rnn::output_shape(a.input, Hout)), hy, cy, ws};
}

struct BackwardResult {
  at::Tensor grad_input, grad_hx, grad_cx, grad_w_ih, grad_w_hh, grad_b_ih, grad_b_hh, grad_w_hr;
};

template <typename Cell>
BackwardResult rnn_backward(const LayerArgs& a, const rnn::BackwardArgs& g, bool reverse,
                            const rnn::RegularizerArgs& regularizers = rnn::kNoRegularizers) {
  constexpr int64_t G = Cell::kGates;
  const Schedule sc = rnn::make_schedule(a.input, a.batch_sizes);
  const Dims d = rnn::check_backward<Cell>(rnn::kCpu, a, g, sc);
  rnn::check_regularizers<Cell>(regularizers, a, sc, d);
  TORCH_CHECK(g.extra_workspace_values == regularizers.extra_workspace_values(),
              "workspace: its layout does not match the regularisers given");
  const int64_t S = sc.rows, H = d.H, Hout = d.Hout;
  const bool project = Cell::kProjection && a.w_hr.has_value();
  const at::Tensor x = a.input.reshape({S, d.I}).contiguous();
  const at::Tensor go = g.grad_output.reshape({S, Hout}).contiguous();
  const at::Tensor out = g.output.reshape({S, Hout}).contiguous();
  const at::Tensor ws = g.workspace.contiguous(), hx = a.hx.contiguous();
  const at::Tensor cx = Cell::kCellState ? a.cx->contiguous() : at::Tensor();
  const at::Tensor w_ih = a.w_ih.contiguous(), w_hh = a.w_hh.contiguous();
  at::Tensor dG = empty_cached({S, G * H}, x.options());
  at::Tensor dG_h = Cell::kSidesAdd ? dG : empty_cached({S, G * H}, x.options());
  at::Tensor dh_state = g.grad_hy.contiguous().clone();
  at::Tensor dc_state = Cell::kCellState ? g.grad_cy->contiguous().clone() : at::Tensor();
  at::Tensor dh_total = project ? empty_cached({S, Hout}, x.options()) : at::Tensor();
  at::Tensor h_prev = empty_cached({S, Hout}, x.options());
  const RegularizerTensors reg_tensors(regularizers, at::Tensor());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "genfast::rnn_backward", [&] {
    const BackwardWeight<scalar_t> whh(sc, w_hh);
    at::Tensor packed_whr = project ? pack_columns<scalar_t>(a.w_hr->contiguous(), false) : at::Tensor();
    auto ptr = [](const at::Tensor& t) { return t.defined() ? t.data_ptr<scalar_t>() : nullptr; };
    BackwardBuffers<scalar_t> buffers{go.data_ptr<scalar_t>(),
                                            ws.data_ptr<scalar_t>(),
                                            out.data_ptr<scalar_t>(),
                                            Cell::kCellState ? cx.data_ptr<scalar_t>() : hx.data_ptr<scalar_t>(),
                                            whh.packed_data(),
                                            whh.transposed_data(),
                                            ptr(packed_whr),
                                            dG.data_ptr<scalar_t>(),
                                            dG_h.data_ptr<scalar_t>(),
                                            dh_state.data_ptr<scalar_t>(),
                                            ptr(dc_state),
                                            ptr(dh_total)};
    const int64_t ws_base = rnn::workspace_layout<Cell>(S, H, project).size;
    const RegularizerBuffers<scalar_t> reg =
        reg_tensors.buffers<scalar_t>(regularizers.cell_zoneout.has_value() ? ws.data_ptr<scalar_t>() + ws_base : nullptr);
    if (regularizers.any()) buffers.reg = &reg;
    backward_loop<Cell, scalar_t>(sc, reverse, buffers, H, Hout);
    gather_previous_hidden<scalar_t>(sc, reverse, out.data_ptr<scalar_t>(), hx.data_ptr<scalar_t>(),
                                     h_prev.data_ptr<scalar_t>(), Hout);
    if (reg.recurrent_mask) mask_previous_hidden<scalar_t>(sc, reg.recurrent_mask, h_prev.data_ptr<scalar_t>(), Hout);
  });
  // The input and weight gradients: one large GEMM each over all steps.
  BackwardResult r;
  if (g.input_grad) {
    at::Tensor grad_input = empty_cached({S, d.I}, x.options());
    gemm_out(grad_input, dG, w_ih);
    r.grad_input = grad_input.view(a.input.sizes());
  } else {
    r.grad_input = rnn::skipped_input_grad(a.input);
  }
  r.grad_hx = dh_state;
  r.grad_cx = dc_state;
  // Each bias gradient (the column sums of dG or dG_h) comes from the pass its weight gradient makes over dG.
  r.grad_b_ih = at::empty({G * H}, x.options());
  r.grad_w_ih = gemm_with_row_sums(dG.t(), x, r.grad_b_ih);
  if (Cell::kSidesAdd) {
    r.grad_w_hh = gemm(dG_h.t(), h_prev);
    r.grad_b_hh = r.grad_b_ih;
  } else {
    r.grad_b_hh = at::empty({G * H}, x.options());
    r.grad_w_hh = gemm_with_row_sums(dG_h.t(), h_prev, r.grad_b_hh);
  }
  r.grad_w_hr = at::empty({0}, x.options());
  if (project) {
    const rnn::WorkspaceLayout layout = rnn::workspace_layout<Cell>(S, H, true);
    r.grad_w_hr = gemm(dh_total.t(), ws.narrow(0, layout.projected, S * H).view({S, H}));
  }
  return r;
}

// ---------------------------------------------------------------- the ops
const std::optional<at::Tensor> kNone;

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> lstm_forward(
    const at::Tensor& input, const at::Tensor& hx, const at::Tensor& cx, const at::Tensor& w_ih,
    const at::Tensor& w_hh, const std::optional<at::Tensor>& b_ih, const std::optional<at::Tensor>& b_hh,
    const std::optional<at::Tensor>& w_hr, const std::optional<at::Tensor>& batch_sizes, bool reverse, bool train,
    const std::optional<at::Tensor>& zoneout, const std::optional<at::Tensor>& cell_zoneout,
    const std::optional<at::Tensor>& recurrent_mask) {
  const ForwardResult r = rnn_forward<rnn::LstmCell>({input, hx, &cx, w_ih, w_hh, b_ih, b_hh, w_hr, batch_sizes},
                                                     reverse, train, {zoneout, cell_zoneout, recurrent_mask});
  return {r.output, r.hy, r.cy, r.workspace};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> lstm_backward(
    const at::Tensor& grad_output, const at::Tensor& grad_hy, const at::Tensor& grad_cy, const at::Tensor& input,
    const at::Tensor& hx, const at::Tensor& cx, const at::Tensor& w_ih, const at::Tensor& w_hh,
    const std::optional<at::Tensor>& w_hr, const at::Tensor& output, const at::Tensor& workspace,
    const std::optional<at::Tensor>& batch_sizes, bool reverse, const std::optional<at::Tensor>& zoneout,
    const std::optional<at::Tensor>& cell_zoneout, const std::optional<at::Tensor>& recurrent_mask, bool input_grad) {
  const rnn::RegularizerArgs reg{zoneout, cell_zoneout, recurrent_mask};
  const BackwardResult r = rnn_backward<rnn::LstmCell>(
      {input, hx, &cx, w_ih, w_hh, kNone, kNone, w_hr, batch_sizes},
      {grad_output, grad_hy, &grad_cy, output, workspace, reg.extra_workspace_values(), input_grad}, reverse, reg);
  return {r.grad_input, r.grad_hx, r.grad_cx, r.grad_w_ih, r.grad_w_hh, r.grad_b_ih, r.grad_w_hr};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> gru_forward(const at::Tensor& input, const at::Tensor& hx,
                                                           const at::Tensor& w_ih, const at::Tensor& w_hh,
                                                           const std::optional<at::Tensor>& b_ih,
                                                           const std::optional<at::Tensor>& b_hh,
                                                           const std::optional<at::Tensor>& batch_sizes, bool reverse,
                                                           bool train, const std::optional<at::Tensor>& zoneout,
                                                           const std::optional<at::Tensor>& recurrent_mask) {
  const ForwardResult r = rnn_forward<rnn::GruCell>({input, hx, nullptr, w_ih, w_hh, b_ih, b_hh, kNone, batch_sizes},
                                                    reverse, train, {zoneout, kNone, recurrent_mask});
  return {r.output, r.hy, r.workspace};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> gru_backward(
    const at::Tensor& grad_output, const at::Tensor& grad_hy, const at::Tensor& input, const at::Tensor& hx,
    const at::Tensor& w_ih, const at::Tensor& w_hh, const at::Tensor& output, const at::Tensor& workspace,
    const std::optional<at::Tensor>& batch_sizes, bool reverse, const std::optional<at::Tensor>& zoneout,
    const std::optional<at::Tensor>& recurrent_mask, bool input_grad) {
  const BackwardResult r = rnn_backward<rnn::GruCell>({input, hx, nullptr, w_ih, w_hh, kNone, kNone, kNone, batch_sizes},
                                                      {grad_output, grad_hy, nullptr, output, workspace, 0, input_grad},
                                                      reverse,
                                                      {zoneout, kNone, recurrent_mask});
  return {r.grad_input, r.grad_hx, r.grad_w_ih, r.grad_w_hh, r.grad_b_ih, r.grad_b_hh};
}

}  // namespace

TORCH_LIBRARY_IMPL(genfast, CPU, m) {
  m.impl("lstm_forward", &lstm_forward);
  m.impl("lstm_backward", &lstm_backward);
  m.impl("gru_forward", &gru_forward);
  m.impl("gru_backward", &gru_backward);
}

}  // namespace genfast::cpu
