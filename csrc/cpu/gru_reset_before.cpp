// CPU implementation of genfast::gru_reset_before_{forward,backward}: the GRU whose reset gate acts
// before the recurrent product (rnn::GruResetBeforeCell, csrc/rnn/cells.h). One layer, one
// direction, the whole (padded or packed) sequence per call, on the core of csrc/cpu/rnn.cpp: the
// same schedule and checks (rnn_host.h), thread team, work partition, recurrent tiles and weight
// packing (rnn_common.h), and gemm entry point for the products outside the loop.
//
// What differs is the step: n = tanh(x_n + W_hn (r * h_{t-1}) + b_hn) needs r before its recurrent
// product, so each step is two passes separated by a barrier, as the LSTM's projection is:
//   pass 1: per panel of 16 units, h_{t-1} times the r and z columns of W_hh^T (32 columns), then
//           r, z and r * h_{t-1} for those units (written to the saved rows);
//   pass 2: per panel, (r * h_{t-1}) times the n columns of W_hn^T (16 columns), then n and h_t.
// The input projection G = X W_ih^T + b_ih + b_hh is one GEMM before the loop (every gate's sides add).
//
// Backward (BPTT), per step, two passes again:
//   pass 1: dL/dh_t = dL/doutput + (what reached h_t directly from step t+1) + dG_{r,z}(t+1) W_h{r,z}
//           for a panel of units, then dG_z, dG_n and the direct part z dL/dh_t;
//   pass 2: d(r * h) = dG_n W_hn for the panel, then dG_r and the direct part r d(r * h).
// One pass more than there are steps, as for every cell: the last only adds dG_{r,z}(0) W_h{r,z} to the
// initial state's gradient. The weight gradients are GEMMs over all steps after the loop: dW_ih = dG^T X,
// dW_h{r,z} = dG_{r,z}^T H_prev, dW_hn = dG_n^T (r * H_prev) from the saved r * h.
//
// Workspace (train=true): rnn::WorkspaceLayout of the cell, (S, 4H): r, z, n, r * h_{t-1}.
//
// Regularisers (optional masks; csrc/cpu/rnn_regularizers.h, the same hooks as the other cells'):
// recurrent dropout's h_{t-1} * m is what both products read, so pass 1 takes it for its product and
// for r * (h_{t-1} * m), the saved slot pass 2 multiplies by W_hn; z * h_{t-1} keeps the carried h.
// Zoneout acts on pass 2's h_t, which then also writes h_t * m for the next step. Backward: both
// recurrent products are dL/d(h_{t-1} * m), times m each (pass 1's dG_{r,z} W_h{r,z}, pass 2's d(r * h)
// before dG_r and r d(r * h), which then read the carried h), zoneout splits dL/dh_t around pass 1's
// cell backward, and dW_h{r,z} reads H_prev * m (dW_hn the saved r * (h * m) as before).
#include <torch/library.h>

#include "cpu/gemm_entry.h"
#include "cpu/rnn_common.h"
#include "cpu/rnn_regularizers.h"
#include "cpu/simd.h"
#include "rnn/cells.h"
#include "rnn/regularizers_host.h"
#include "rnn/rnn_host.h"

namespace genfast::cpu {
namespace {

using Cell = rnn::GruResetBeforeCell;
constexpr int64_t kGates = Cell::kGates;
constexpr int64_t kFirstWidth = Cell::kFirstGates * kUnits;  // pass 1's panel: r and z of 16 units

// Panels of the forward's products: panel p holds, for each of `gates` gate blocks of the
// (gates*H x K) row-major weight w, the rows of units [16p, 16p + 16) as columns of w^T.
template <typename T>
at::Tensor pack_unit_panels(const at::Tensor& w, int64_t gates, int64_t H) {
  const int64_t K = w.size(1), width = gates * kUnits, panels = ceil_div(H, kUnits);
  at::Tensor packed = empty_large({panels * K * width}, w.options());
  pack_panels_parallel<T>(
      w.data_ptr<T>(), 1, K, K, panels, width,
      [&](int64_t p, int64_t c) {
        const int64_t j = p * kUnits + c % kUnits;
        return j < H ? (c / kUnits) * H + j : int64_t(-1);
      },
      packed.data_ptr<T>());
  return packed;
}

// acc (rows x 16) = rows of a (lda apart, K wide) times the columns [16 panel, 16 panel + 16) of a
// (K x cols) matrix: its packed column panels, or (packed == nullptr) its transpose w_t (cols x K)
// read in place by dot products. backward_recurrent_tile with A's row stride free (a block of dG).
template <typename T>
GENFAST_INLINE void column_product(const T* packed, const T* w_t, const T* a, int64_t lda, int64_t K, int64_t cols,
                                   int64_t panel, int64_t rows, T* acc) {
  if (packed) {
    gemm_panel<T>(rows, K, a, lda, packed + panel * K * kUnits, kUnits, acc, kUnits);
    return;
  }
  const T* columns[kUnits];
  for (int64_t c = 0; c < kUnits; ++c) {
    const int64_t column = panel * kUnits + c;
    columns[c] = column < cols ? w_t + column * K : nullptr;
  }
  dot_panel<T>(rows, K, a, lda, columns, kUnits, acc, kUnits);
}

// ---------------------------------------------------------------- forward
template <typename T>
struct ForwardStep {
  const T* h_prev;     // (N, H) state read by this step
  const T* gx;         // (n, 3H) X W_ih^T + b_ih + b_hh for this step's rows
  const T* packed_rz;  // panels of (H x 32): the r, z rows of W_hh as columns; or nullptr:
  const T* packed_n;   // panels of (H x 16): W_hn^T; or nullptr:
  const T* w_hh;       // (3H, H) read in place by dot products (few steps and rows, or one sequence)
  T* saved;            // (n, 4H) r, z, n, r * h: the workspace rows (training) or a step buffer
  T* out;              // (n, H) output rows
  T* h_next;           // (N, H) next state
  int64_t H;
  const RegularizerStep<T>* reg = nullptr;  // zoneout / recurrent dropout, or nullptr
};

// Pass 1: r, z and r * h_{t-1} of a panel of units (h_{t-1} * m under recurrent dropout).
struct ResetTile {
  template <typename T>
  static GENFAST_INLINE void run(const ForwardStep<T>* s, int64_t panel, int64_t r0, int64_t r1, T* acc) {
    const int64_t H = s->H, j0 = panel * kUnits, units = std::min(kUnits, H - j0);
    for (int64_t m = r0; m < std::min(r1, r0 + kPrefetchRows); ++m)
      prefetch_gate_row(s->gx + m * kGates * H + j0, Cell::kFirstGates, H);
    const T* h_in = s->reg && s->reg->h_product ? s->reg->h_product : s->h_prev;
    recurrent_tile<T, Cell::kFirstGates>(s->packed_rz, s->w_hh, h_in, H, H, panel, r0, r1, acc);
    for (int64_t m = r0; m < r1; ++m, acc += kFirstWidth) {
      if (m + kPrefetchRows < r1) prefetch_gate_row(s->gx + (m + kPrefetchRows) * kGates * H + j0, Cell::kFirstGates, H);
      T* saved = s->saved + m * Cell::kSaved * H + j0;
      Cell::forward_reset_units<kUnits, T>(units, acc, s->gx + m * kGates * H + j0, H, h_in + m * H + j0,
                                           saved + Cell::kR * H, saved + Cell::kZ * H, saved + Cell::kRh * H);
    }
  }
};

// Pass 2: n and h_t of a panel of units, from (r * h_{t-1}) W_hn^T over every unit's r * h.
struct UpdateTile {
  template <typename T>
  static GENFAST_INLINE void run(const ForwardStep<T>* s, int64_t panel, int64_t r0, int64_t r1, T* acc) {
    const int64_t H = s->H, j0 = panel * kUnits, units = std::min(kUnits, H - j0);
    const int64_t ld_saved = Cell::kSaved * H;
    const T* rh = s->saved + r0 * ld_saved + Cell::kRh * H;
    if (s->reg)
      for (int64_t m = r0; m < std::min(r1, r0 + kPrefetchRows); ++m) prefetch_regularizer_row(s->reg, m, j0, H);
    if (s->packed_n) {
      gemm_panel<T>(r1 - r0, H, rh, ld_saved, s->packed_n + panel * H * kUnits, kUnits, acc, kUnits);
    } else {
      const T* rows[kUnits];
      for (int64_t c = 0; c < kUnits; ++c) rows[c] = c < units ? s->w_hh + (2 * H + j0 + c) * H : nullptr;
      dot_panel<T>(r1 - r0, H, rh, ld_saved, rows, kUnits, acc, kUnits);
    }
    for (int64_t m = r0; m < r1; ++m, acc += kUnits) {
      if (s->reg && m + kPrefetchRows < r1) prefetch_regularizer_row(s->reg, m + kPrefetchRows, j0, H);
      T* saved = s->saved + m * ld_saved + j0;
      Cell::forward_update_units<T>(units, acc, s->gx + m * kGates * H + 2 * H + j0, saved + Cell::kZ * H,
                                    s->h_prev + m * H + j0, saved + Cell::kN * H, s->out + m * H + j0,
                                    s->h_next + m * H + j0);
      if (s->reg)  // zoneout of h_t; h_t * m for the next step's products
        regularize_forward_after<Cell, T>(s->reg, m, j0, units, H, H, s->h_prev + m * H + j0, nullptr, nullptr,
                                          s->out + m * H + j0, s->h_next + m * H + j0);
    }
  }
};

template <typename T>
struct ForwardBuffers {
  const T* gx;         // (S, 3H)
  const T* packed_rz;  // or nullptr (W_hh read in place)
  const T* packed_n;
  const T* w_hh;
  T* out;              // (S, H)
  T* hbuf;             // (2, N, H): h_{t-1} and h_t, alternating
  T* ws;               // training workspace, or nullptr:
  T* step_saved;       // (N, 4H) the step's r, z, n, r * h without training
  const RegularizerBuffers<T>* reg = nullptr;  // zoneout / recurrent dropout, or nullptr
};

template <typename T>
void forward_loop(const Schedule& sc, bool reverse, const ForwardBuffers<T>& b, int64_t H) {
  const int64_t N = sc.batch, panels = ceil_div(H, kUnits);
  std::vector<T> scratch(at::get_num_threads() * (N + 16) * kFirstWidth);
  const double step_flops = 2.0 * N * H * kGates * H;
  for_each_step(sc.steps, step_flops, [&](int64_t s, const StepTeam& team) {
    const int64_t t = sc.forward_step(s, reverse);
    const int64_t n = sc.active[t], off = sc.offset[t];
    ForwardStep<T> step{b.hbuf + (s % 2) * N * H,
                              b.gx + off * kGates * H,
                              b.packed_rz,
                              b.packed_n,
                              b.w_hh,
                              b.ws ? b.ws + off * Cell::kSaved * H : b.step_saved,
                              b.out + off * H,
                              b.hbuf + ((s + 1) % 2) * N * H,
                              H};
    RegularizerStep<T> reg;
    if (b.reg) {
      reg = b.reg->step(s, off, N, H, H);
      step.reg = &reg;
    }
    run_tiles<ResetTile>(team, panels, n, &step, scratch.data(), kFirstWidth);
    team.sync();  // pass 2's product reads r * h of every unit
    run_tiles<UpdateTile>(team, panels, n, &step, scratch.data(), kUnits);
  }, row_split(sc, 3 * H * H * int64_t(sizeof(T)), static_cast<int64_t>(scratch.size())));
}

// ---------------------------------------------------------------- backward
template <typename T>
struct BackwardStep {
  const T* dG_prev;    // (n_prev, 3H) gate gradients of the step processed just before, or nullptr
  const T* packed_rz;  // panels of (2H x 16): W_h{r,z} columns; or nullptr:
  const T* rz_t;       // (H, 2H): W_h{r,z}^T read in place (one sequence)
  const T* packed_n;   // panels of (H x 16): W_hn columns; or nullptr:
  const T* n_t;        // (H, H): W_hn^T
  const T* grad_out;   // (n, H) rows of dL/doutput
  const T* saved;      // (n, 4H) r, z, n, r * h of this step
  const T* h_prev;     // (n_prev_fwd, H) output of the previous forward step, or nullptr
  const T* hx;         // (N, H) initial state (rows whose sequence starts here)
  T* dh_state;         // (N, H) what reached h from outside the recurrence
  T* dG;               // (n, 3H) this step's gate gradients (both sides)
  int64_t n, n_prev, n_prev_fwd, H;
  const RegularizerStep<T>* reg = nullptr;  // zoneout / recurrent dropout masks, or nullptr

  const T* h_prev_row(int64_t m) const { return (m < n_prev_fwd ? h_prev : hx) + m * H; }
};

// Pass 1: dL/dh_t of a panel of units, then dG_z, dG_n and z dL/dh_t. Rows that are no longer active
// only collect dG_{r,z} W_h{r,z}: the gradient of their initial state.
struct UpdateBackwardTile {
  template <typename T>
  static GENFAST_INLINE void run(const BackwardStep<T>* s, int64_t panel, int64_t r0, int64_t r1, T* acc) {
    const int64_t H = s->H, j0 = panel * kUnits, units = std::min(kUnits, H - j0);
    const int64_t ld = kGates * H;
    const int64_t prev_rows = std::min(r1, s->n_prev) - r0;
    if (s->reg)
      for (int64_t m = r0; m < std::min({r1, r0 + kPrefetchRows, s->n}); ++m) prefetch_regularizer_row(s->reg, m, j0, H);
    if (prev_rows > 0)
      column_product<T>(s->packed_rz, s->rz_t, s->dG_prev + r0 * ld, ld, Cell::kFirstGates * H, H, panel, prev_rows,
                        acc);
    if (s->reg) mask_recurrent_rows<kUnits>(s->reg, r0, prev_rows, j0, units, H, acc);
    static constexpr T zeros[kUnits] = {};
    for (int64_t m = r0; m < r1; ++m, acc += kUnits) {
      T* dh = s->dh_state + m * H + j0;
      if (s->reg && m + kPrefetchRows < std::min(r1, s->n)) prefetch_regularizer_row(s->reg, m + kPrefetchRows, j0, H);
      if (m >= s->n) {
        if (m < s->n_prev)
          for (int64_t u = 0; u < units; ++u) dh[u] += acc[u];
        continue;
      }
      const T* saved = s->saved + m * Cell::kSaved * H + j0;
      T* dG = s->dG + m * ld + j0;
      const T* rec = m < s->n_prev ? acc : zeros;
      if (s->reg && s->reg->zoneout) {  // the cell's backward on (1 - k) dL/dh_t; k dL/dh_t to h_{t-1}
        zoneout_direct_cell_backward<kUnits, T>(
            s->reg, m, j0, units, H, s->grad_out + m * H + j0, dh, rec,
            [&](const T* d_fresh, T* direct, const T* no_rec) __attribute__((always_inline)) {
              Cell::backward_update_units<T>(units, d_fresh, direct, no_rec, saved + Cell::kZ * H,
                                             saved + Cell::kN * H, s->h_prev_row(m) + j0, dG + Cell::kZ * H,
                                             dG + Cell::kN * H);
            });
        continue;
      }
      Cell::backward_update_units<T>(units, s->grad_out + m * H + j0, dh, rec, saved + Cell::kZ * H,
                                     saved + Cell::kN * H, s->h_prev_row(m) + j0, dG + Cell::kZ * H,
                                     dG + Cell::kN * H);
    }
  }
};

// Pass 2: d(r * h) = dG_n W_hn for a panel of units, then dG_r and r d(r * h) into dL/dh_{t-1}. Under
// recurrent dropout the product is dL/d(r * (h * m)): times m, the cell's backward of r * h applies.
struct ResetBackwardTile {
  template <typename T>
  static GENFAST_INLINE void run(const BackwardStep<T>* s, int64_t panel, int64_t r0, int64_t r1, T* acc) {
    const int64_t H = s->H, j0 = panel * kUnits, units = std::min(kUnits, H - j0);
    const int64_t ld = kGates * H;
    column_product<T>(s->packed_n, s->n_t, s->dG + r0 * ld + Cell::kN * H, ld, H, H, panel, r1 - r0, acc);
    if (s->reg) mask_recurrent_rows<kUnits>(s->reg, r0, r1 - r0, j0, units, H, acc);
    for (int64_t m = r0; m < r1; ++m, acc += kUnits) {
      const T* saved = s->saved + m * Cell::kSaved * H + j0;
      Cell::backward_reset_units<T>(units, acc, saved + Cell::kR * H, s->h_prev_row(m) + j0,
                                    s->dh_state + m * H + j0, s->dG + m * ld + Cell::kR * H + j0);
    }
  }
};

template <typename T>
struct BackwardBuffers {
  const T* grad_out;  // (S, H)
  const T* ws;        // the forward's workspace
  const T* out;       // (S, H) the forward's output
  const T* hx;        // (N, H)
  const T* packed_rz, *rz_t;  // BackwardWeight of W_h{r,z}
  const T* packed_n, *n_t;    // BackwardWeight of W_hn
  T* dG;              // (S, 3H)
  T* dh_state;        // (N, H)
  const RegularizerBuffers<T>* reg = nullptr;  // zoneout / recurrent dropout masks, or nullptr
};

template <typename T>
void backward_loop(const Schedule& sc, bool reverse, const BackwardBuffers<T>& b, int64_t H) {
  const int64_t N = sc.batch, panels = ceil_div(H, kUnits);
  std::vector<T> scratch(at::get_num_threads() * (N + 16) * kUnits);
  const double step_flops = 2.0 * N * kGates * H * H;
  for_each_step(sc.steps + 1, step_flops, [&](int64_t s, const StepTeam& team) {
    const auto pass = sc.backward_pass(s, reverse);
    BackwardStep<T> step{pass.prev_t >= 0 ? b.dG + sc.offset[pass.prev_t] * kGates * H : nullptr,
                               b.packed_rz,
                               b.rz_t,
                               b.packed_n,
                               b.n_t,
                               b.grad_out + pass.offset * H,
                               b.ws + pass.offset * Cell::kSaved * H,
                               pass.fwd_prev >= 0 ? b.out + sc.offset[pass.fwd_prev] * H : nullptr,
                               b.hx,
                               b.dh_state,
                               b.dG + pass.offset * kGates * H,
                               pass.n,
                               pass.n_prev,
                               sc.active_at(pass.fwd_prev),
                               H};
    RegularizerStep<T> reg;
    if (b.reg) {
      reg = b.reg->step(s, pass.offset, N, H, H);
      step.reg = &reg;
    }
    run_tiles<UpdateBackwardTile>(team, panels, std::max(pass.n, pass.n_prev), &step, scratch.data(), kUnits);
    if (pass.n > 0) {
      team.sync();  // pass 2's product reads dG_n of every unit
      run_tiles<ResetBackwardTile>(team, panels, pass.n, &step, scratch.data(), kUnits);
    }
  }, row_split(sc, 3 * H * H * int64_t(sizeof(T)), static_cast<int64_t>(scratch.size())));
}

// ---------------------------------------------------------------- op bodies
using rnn::Dims;
using rnn::LayerArgs;

const std::optional<at::Tensor> kNone;

std::tuple<at::Tensor, at::Tensor, at::Tensor> gru_reset_before_forward(
    const at::Tensor& input, const at::Tensor& hx, const at::Tensor& w_ih, const at::Tensor& w_hh,
    const std::optional<at::Tensor>& b_ih, const std::optional<at::Tensor>& b_hh,
    const std::optional<at::Tensor>& batch_sizes, bool reverse, bool train, const std::optional<at::Tensor>& zoneout,
    const std::optional<at::Tensor>& recurrent_mask) {
  const LayerArgs a{input, hx, nullptr, w_ih, w_hh, b_ih, b_hh, kNone, batch_sizes};
  const Schedule sc = rnn::make_schedule(input, batch_sizes);
  const Dims d = rnn::check_forward<Cell>(rnn::kCpu, a, sc);
  const rnn::RegularizerArgs regularizers{zoneout, kNone, recurrent_mask};
  rnn::check_regularizers<Cell>(regularizers, a, sc, d);
  const int64_t S = sc.rows, N = sc.batch, H = d.H;
  const at::Tensor x = input.reshape({S, d.I}).contiguous();
  const at::Tensor w_ih_c = w_ih.contiguous(), w_hh_c = w_hh.contiguous();
  // Every gate is input side + recurrent side: both biases go into G = X W_ih^T + b_ih + b_hh.
  at::Tensor gx = empty_large({S, kGates * H}, x.options());
  gemm_out(gx, x, w_ih_c.t(), b_ih.has_value() ? std::optional<at::Tensor>((*b_ih + *b_hh).contiguous()) : kNone);
  at::Tensor out = empty_large({S, H}, x.options());
  at::Tensor hbuf = hx.unsqueeze(0).expand({2, N, H}).contiguous();
  at::Tensor hy = at::empty({N, H}, x.options());
  at::Tensor ws = empty_cached({train ? rnn::workspace_layout<Cell>(S, H, false).size : 0}, x.options());
  at::Tensor step_saved = train ? at::Tensor() : at::empty({N, Cell::kSaved * H}, x.options());
  const bool in_place = read_weight_in_place(sc);
  const RegularizerTensors reg_tensors(regularizers, hx.contiguous());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "genfast::gru_reset_before_forward", [&] {
    at::Tensor packed_rz, packed_n;
    if (!in_place) {
      packed_rz = pack_unit_panels<scalar_t>(w_hh_c, Cell::kFirstGates, H);
      packed_n = pack_unit_panels<scalar_t>(w_hh_c.narrow(0, Cell::kN * H, H), 1, H);
    }
    auto ptr = [](const at::Tensor& t) { return t.defined() ? t.data_ptr<scalar_t>() : nullptr; };
    ForwardBuffers<scalar_t> buffers{gx.data_ptr<scalar_t>(), ptr(packed_rz),          ptr(packed_n),
                                     w_hh_c.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(),
                                     hbuf.data_ptr<scalar_t>(), train ? ws.data_ptr<scalar_t>() : nullptr,
                                     ptr(step_saved)};
    const RegularizerBuffers<scalar_t> reg = reg_tensors.buffers<scalar_t>(nullptr);
    if (regularizers.any()) buffers.reg = &reg;
    forward_loop<scalar_t>(sc, reverse, buffers, H);
    gather_last_hidden<scalar_t>(sc, reverse, out.data_ptr<scalar_t>(), hy.data_ptr<scalar_t>(), H);
  });
  return {out.view(rnn::output_shape(input, H)), hy, ws};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> gru_reset_before_backward(
    const at::Tensor& grad_output, const at::Tensor& grad_hy, const at::Tensor& input, const at::Tensor& hx,
    const at::Tensor& w_ih, const at::Tensor& w_hh, const at::Tensor& output, const at::Tensor& workspace,
    const std::optional<at::Tensor>& batch_sizes, bool reverse, const std::optional<at::Tensor>& zoneout,
    const std::optional<at::Tensor>& recurrent_mask, bool input_grad) {
  const LayerArgs a{input, hx, nullptr, w_ih, w_hh, kNone, kNone, kNone, batch_sizes};
  const Schedule sc = rnn::make_schedule(input, batch_sizes);
  const Dims d = rnn::check_backward<Cell>(rnn::kCpu, a, {grad_output, grad_hy, nullptr, output, workspace}, sc);
  const rnn::RegularizerArgs regularizers{zoneout, kNone, recurrent_mask};
  rnn::check_regularizers<Cell>(regularizers, a, sc, d);
  const RegularizerTensors reg_tensors(regularizers, at::Tensor());
  const int64_t S = sc.rows, H = d.H;
  const at::Tensor x = input.reshape({S, d.I}).contiguous();
  const at::Tensor go = grad_output.reshape({S, H}).contiguous();
  const at::Tensor out = output.reshape({S, H}).contiguous();
  const at::Tensor ws = workspace.contiguous(), hx_c = hx.contiguous();
  const at::Tensor w_ih_c = w_ih.contiguous(), w_hh_c = w_hh.contiguous();
  const at::Tensor w_rz = w_hh_c.narrow(0, 0, Cell::kFirstGates * H), w_n = w_hh_c.narrow(0, Cell::kN * H, H);
  at::Tensor dG = empty_cached({S, kGates * H}, x.options());
  at::Tensor dh_state = grad_hy.contiguous().clone();
  at::Tensor h_prev = empty_cached({S, H}, x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "genfast::gru_reset_before_backward", [&] {
    const BackwardWeight<scalar_t> rz(sc, w_rz), n(sc, w_n);
    BackwardBuffers<scalar_t> buffers{go.data_ptr<scalar_t>(),   ws.data_ptr<scalar_t>(),
                                      out.data_ptr<scalar_t>(),  hx_c.data_ptr<scalar_t>(),
                                      rz.packed_data(),          rz.transposed_data(),
                                      n.packed_data(),           n.transposed_data(),
                                      dG.data_ptr<scalar_t>(),   dh_state.data_ptr<scalar_t>()};
    const RegularizerBuffers<scalar_t> reg = reg_tensors.buffers<scalar_t>(nullptr);
    if (regularizers.any()) buffers.reg = &reg;
    backward_loop<scalar_t>(sc, reverse, buffers, H);
    gather_previous_hidden<scalar_t>(sc, reverse, out.data_ptr<scalar_t>(), hx_c.data_ptr<scalar_t>(),
                                     h_prev.data_ptr<scalar_t>(), H);
    // dW_h{r,z} = dG_{r,z}^T (H_prev * m): the products read h_{t-1} * m
    if (reg.recurrent_mask) mask_previous_hidden<scalar_t>(sc, reg.recurrent_mask, h_prev.data_ptr<scalar_t>(), H);
  });
  // The input and weight gradients: one large GEMM each over all steps.
  at::Tensor grad_input = rnn::skipped_input_grad(input);
  if (input_grad) {
    grad_input = empty_cached({S, d.I}, x.options());
    gemm_out(grad_input, dG, w_ih_c);
    grad_input = grad_input.view(input.sizes());
  }
  at::Tensor grad_w_hh = at::empty({kGates * H, H}, x.options());
  at::Tensor grad_w_rz = grad_w_hh.narrow(0, 0, Cell::kFirstGates * H);
  gemm_out(grad_w_rz, dG.narrow(1, 0, Cell::kFirstGates * H).t(), h_prev);
  at::Tensor grad_w_n = grad_w_hh.narrow(0, Cell::kN * H, H);
  const at::Tensor rh = ws.view({S, Cell::kSaved * H}).narrow(1, Cell::kRh * H, H);
  gemm_out(grad_w_n, dG.narrow(1, Cell::kN * H, H).t(), rh);
  at::Tensor grad_bias = at::empty({kGates * H}, x.options());
  at::Tensor grad_w_ih = gemm_with_row_sums(dG.t(), x, grad_bias);
  return {grad_input, dh_state, grad_w_ih, grad_w_hh, grad_bias};
}

}  // namespace

TORCH_LIBRARY_IMPL(genfast, CPU, m) {
  m.impl("gru_reset_before_forward", &gru_reset_before_forward);
  m.impl("gru_reset_before_backward", &gru_reset_before_backward);
}

}  // namespace genfast::cpu
