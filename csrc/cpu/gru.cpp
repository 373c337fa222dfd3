// Fused GRU over a whole sequence on the CPU: one layer, one direction per call.
// Same structure as csrc/cpu/lstm.cpp (read that first): the input projection for all
// steps as one GEMM, then per step one parallel pass in which a thread owns 16 hidden
// units, multiplies h_{t-1} by its packed slice of W_hh^T (gates r, z, n of its units)
// and applies the update in place.
//
// PyTorch's convention: n = tanh(W_in x + b_in + r * (W_hn h + b_hn)), so the hidden
// side of n (h_n = W_hn h + b_hn) is kept separately and saved for backward.
//
// Workspace (train=true): [activated r, z, n (S, 3H) | h_n (S, H)].
#include <torch/library.h>

#include "cpu/gemm_entry.h"
#include "cpu/rnn_common.h"
#include "cpu/simd.h"
#include "gate_math.h"

namespace genfast::cpu {
namespace {

constexpr int64_t kGates = 3;
constexpr int64_t kWidth = kGates * kUnits;

// ---------------------------------------------------------------- forward
template <typename T>
struct ForwardStep {
  const T* h_prev;      // (N, H)
  const T* packed_whh;  // panels of (H x kWidth): W_hh^T, gates of 16 units side by side; or nullptr:
  const T* w_hh;        // (3H, H) unpacked, read in place by dot products (few steps and rows)
  const T* gx;          // (n, 3H) W_ih x + b_ih for this step
  const T* b_hh;        // (3H)
  T* out;               // (n, H)
  T* h_next;            // (N, H)
  T* saved_rzn;         // (n, 3H) or nullptr
  T* saved_hn;          // (n, H) or nullptr
  int64_t H;
};

struct ForwardTile {
  template <typename T>
  static GENFAST_INLINE void run(const ForwardStep<T>* s, int64_t panel, int64_t r0, int64_t r1, T* acc) {
    const int64_t H = s->H;
    const int64_t j0 = panel * kUnits;
    const int64_t units = std::min(kUnits, H - j0);
    for (int64_t m = r0; m < std::min(r1, r0 + kPrefetchRows); ++m)
      prefetch_gate_row(s->gx + m * kGates * H + j0, kGates, H);
    recurrent_tile<T, kGates>(s->packed_whh, s->w_hh, s->h_prev, H, H, panel, r0, r1, acc);
    rows(units, s, j0, r0, r1, acc);
  }

  template <typename T>
  static GENFAST_INLINE void rows(int64_t units, const ForwardStep<T>* s, int64_t j0, int64_t r0, int64_t r1, T* acc) {
    const int64_t H = s->H;
    const T* b = s->b_hh + j0;
    for (int64_t m = r0; m < r1; ++m, acc += kWidth) {
      if (m + kPrefetchRows < r1) prefetch_gate_row(s->gx + (m + kPrefetchRows) * kGates * H + j0, kGates, H);
      const T* gx = s->gx + m * kGates * H + j0;
      const T* h_prev = s->h_prev + m * H + j0;
      T* out = s->out + m * H + j0;
      T* h_next = s->h_next + m * H + j0;
      T act[kGates + 1][kUnits];
      cells(units, acc, gx, b, H, h_prev, out, h_next, act);
      if (s->saved_rzn) {  // training: keep what backward needs
        T* rzn = s->saved_rzn + m * kGates * H + j0;
        for (int64_t gate = 0; gate < kGates; ++gate)
          for (int64_t u = 0; u < units; ++u) rzn[gate * H + u] = act[gate][u];
        T* hn_saved = s->saved_hn + m * H + j0;
        for (int64_t u = 0; u < units; ++u) hn_saved[u] = act[kGates][u];
      }
    }
  }

  // The fused update of one row of 16 units: branch-free over restrict pointers, so
  // the compiler vectorises it.
  template <typename T>
  static GENFAST_INLINE void cells(int64_t units, const T* __restrict__ acc, const T* __restrict__ gx,
                                   const T* __restrict__ b, int64_t H, const T* __restrict__ h_prev,
                                   T* __restrict__ out, T* __restrict__ h_next, T (*__restrict__ act)[kUnits]) {
    // h_n = W_hn h + b_hn (kept for backward) first, so the cell reads it where n needs it: see gru_cell.
    for (int64_t u = 0; u < units; ++u) act[3][u] = acc[2 * kUnits + u] + b[2 * H + u];
    for (int64_t u = 0; u < units; ++u) {
      const auto cell = gates::gru_cell<T>(gx[u], gx[H + u], gx[2 * H + u], acc[u] + b[u],
                                           acc[kUnits + u] + b[H + u], act[3][u], h_prev[u]);
      out[u] = cell.h;
      h_next[u] = cell.h;
      act[0][u] = cell.r;
      act[1][u] = cell.z;
      act[2][u] = cell.n;
    }
  }
};

template <typename T>
void forward_loop(const Schedule& sc, bool reverse, const T* gx, const T* packed_whh, const T* w_hh, const T* b_hh,
                  T* out, T* hbuf,
                  T* ws, int64_t H) {
  const int64_t N = sc.batch, S = sc.rows;
  const int64_t threads = at::get_num_threads();
  std::vector<T> scratch(threads * (N + 16) * kWidth);  // a row block never exceeds N + 16 rows
  for_each_step(sc.steps, 2.0 * N * H * kGates * H, [&](int64_t s, const StepTeam& team) {
    const int64_t t = reverse ? sc.steps - 1 - s : s;
    const int64_t n = sc.active[t], off = sc.offset[t];
    const ForwardStep<T> step{hbuf + (s % 2) * N * H,
                              packed_whh,
                              w_hh,
                              gx + off * kGates * H,
                              b_hh,
                              out + off * H,
                              hbuf + ((s + 1) % 2) * N * H,
                              ws ? ws + off * kGates * H : nullptr,
                              ws ? ws + S * kGates * H + off * H : nullptr,
                              H};
    run_tiles<ForwardTile>(team, ceil_div(H, kUnits), n, &step, scratch.data(), kWidth);
  });
}

// ---------------------------------------------------------------- backward
template <typename T>
struct BackwardStep {
  const T* dGh_prev;    // (n_prev, 3H) hidden-side gate gradients of the step processed before, or nullptr
  const T* packed_whh;  // panels of (3H x kUnits): W_hh columns; or nullptr:
  const T* w_hh_t;      // (H, 3H): W_hh^T, rows read in place by dot products (one sequence)
  const T* grad_out;    // (n, H)
  const T* rzn;         // (n, 3H) saved
  const T* hn;          // (n, H) saved
  const T* h_prev;      // (n_prev_fwd, H) output of the previous forward step, or nullptr
  const T* hx;          // (N, H)
  T* dh_state;          // (N, H) gradient reaching h other than through W_hh (dL/dh_T at first)
  T* dGx;               // (n, 3H) input-side gate gradients of this step
  T* dGh;               // (n, 3H) hidden-side gate gradients of this step
  int64_t n, n_prev, n_prev_fwd, H;
};

// What the cell backward of row m reads from the forward's saved state (and writes to
// dGx, dGh), fetched ahead like the forward's input projection (prefetch_gate_row).
template <typename T>
GENFAST_INLINE void prefetch_backward_row(const BackwardStep<T>* s, int64_t m, int64_t j0) {
  const int64_t H = s->H;
  prefetch_gate_row(s->rzn + m * kGates * H + j0, kGates, H);
  prefetch_gate_row(s->hn + m * H + j0, 1, 0);
  if (m < s->n_prev_fwd) prefetch_gate_row(s->h_prev + m * H + j0, 1, 0);
  prefetch_gate_row(s->grad_out + m * H + j0, 1, 0);
  prefetch_gate_row(s->dGx + m * kGates * H + j0, kGates, H);
  prefetch_gate_row(s->dGh + m * kGates * H + j0, kGates, H);
}

struct BackwardTile {
  template <typename T>
  static GENFAST_INLINE void run(const BackwardStep<T>* s, int64_t panel, int64_t r0, int64_t r1, T* acc) {
    const int64_t H = s->H;
    const int64_t j0 = panel * kUnits, units = std::min(kUnits, H - j0);
    for (int64_t m = r0; m < std::min({r1, r0 + kPrefetchRows, s->n}); ++m) prefetch_backward_row(s, m, j0);
    const int64_t gemm_rows = std::min(r1, s->n_prev) - r0;
    if (gemm_rows > 0)
      backward_recurrent_tile<T>(s->packed_whh, s->w_hh_t, s->dGh_prev + r0 * kGates * H, kGates * H, H, panel,
                                 gemm_rows, acc);
    rows(units, s, j0, r0, r1, acc);
  }

  template <typename T>
  static GENFAST_INLINE void rows(int64_t units, const BackwardStep<T>* s, int64_t j0, int64_t r0, int64_t r1,
                                  const T* acc) {
    const int64_t H = s->H;
    static constexpr T zeros[kUnits] = {};
    for (int64_t m = r0; m < r1; ++m, acc += kUnits) {
      if (m + kPrefetchRows < std::min(r1, s->n)) prefetch_backward_row(s, m + kPrefetchRows, j0);
      T* dh = s->dh_state + m * H + j0;
      if (m >= s->n) {  // no longer active: collect the gradient of its initial state
        if (m < s->n_prev)
          for (int64_t u = 0; u < units; ++u) dh[u] += acc[u];
        continue;
      }
      const T* rec = m < s->n_prev ? acc : zeros;
      const T* go = s->grad_out + m * H + j0;
      const T* g = s->rzn + m * kGates * H + j0;
      const T* hn = s->hn + m * H + j0;
      const T* h_prev = m < s->n_prev_fwd ? s->h_prev + m * H + j0 : s->hx + m * H + j0;
      cell_backward_units(units, H, go, dh, rec, g, hn, h_prev, s->dGx + m * kGates * H + j0,
                          s->dGh + m * kGates * H + j0);
    }
  }

  // Branch-free over restrict pointers, so it vectorises. dh holds what reached h
  // from outside the recurrence; it leaves holding the direct z * dh term.
  template <typename T>
  static GENFAST_INLINE void cell_backward_units(int64_t units, int64_t H, const T* __restrict__ go,
                                                 T* __restrict__ dh, const T* __restrict__ rec,
                                                 const T* __restrict__ g, const T* __restrict__ hn,
                                                 const T* __restrict__ h_prev, T* __restrict__ dGx,
                                                 T* __restrict__ dGh) {
    for (int64_t u = 0; u < units; ++u) {
      const T d_h = go[u] + dh[u] + rec[u];
      const auto grad = gates::gru_cell_backward<T>(d_h, g[u], g[H + u], g[2 * H + u], hn[u], h_prev[u]);
      dGx[u] = grad.d_r;
      dGx[H + u] = grad.d_z;
      dGx[2 * H + u] = grad.d_xn;
      dGh[u] = grad.d_r;
      dGh[H + u] = grad.d_z;
      dGh[2 * H + u] = grad.d_hn;
      dh[u] = grad.d_h_prev;
    }
  }
};

template <typename T>
void backward_loop(const Schedule& sc, bool reverse, const T* grad_out, const T* ws, const T* out, const T* hx,
                   const T* packed_whh, const T* w_hh_t, T* dGx, T* dGh, T* dh_state, int64_t H) {
  const int64_t N = sc.batch, S = sc.rows;
  const int64_t threads = at::get_num_threads();
  std::vector<T> scratch(threads * (N + 16) * kUnits);
  // One pass more than there are steps: the last one finishes dL/dh_0.
  for_each_step(sc.steps + 1, 2.0 * N * kGates * H * H, [&](int64_t s, const StepTeam& team) {
    const auto pass = sc.backward_pass(s, reverse);
    const int64_t n = pass.n, off = pass.offset, prev_t = pass.prev_t, n_prev = pass.n_prev, fwd_prev = pass.fwd_prev;
    const BackwardStep<T> step{prev_t >= 0 ? dGh + sc.offset[prev_t] * kGates * H : nullptr,
                               packed_whh,
                               w_hh_t,
                               grad_out + off * H,
                               ws + off * kGates * H,
                               ws + S * kGates * H + off * H,
                               fwd_prev >= 0 ? out + sc.offset[fwd_prev] * H : nullptr,
                               hx,
                               dh_state,
                               dGx + off * kGates * H,
                               dGh + off * kGates * H,
                               n,
                               n_prev,
                               sc.active_at(fwd_prev),
                               H};
    const int64_t rows = std::max(n, n_prev);
    run_tiles<BackwardTile>(team, ceil_div(H, kUnits), rows, &step, scratch.data(), kUnits);
  });
}

// ---------------------------------------------------------------- op boundary
int64_t check_gru(const at::Tensor& input, const Schedule& sc, const at::Tensor& hx, const at::Tensor& w_ih,
                  const at::Tensor& w_hh, const std::optional<at::Tensor>& b_ih,
                  const std::optional<at::Tensor>& b_hh) {
  check_input_dtype(input);
  TORCH_CHECK(w_ih.dim() == 2 && w_ih.size(0) % kGates == 0, "w_ih: expected a (3*hidden_size, input_size) matrix, got ",
              w_ih.sizes());
  const int64_t H = w_ih.size(0) / kGates;
  TORCH_CHECK(w_ih.size(1) == input.size(-1), "input: has ", input.size(-1), " features but w_ih expects input_size ",
              w_ih.size(1));
  check_same(w_ih, "w_ih", input);
  check_same(w_hh, "w_hh", input);
  check_same(hx, "hx", input);
  check_shape(w_hh, "w_hh", {kGates * H, H});
  check_shape(hx, "hx", {sc.batch, H});
  TORCH_CHECK(b_ih.has_value() == b_hh.has_value(), "b_ih, b_hh: give both biases or neither");
  if (b_ih.has_value()) {
    check_same(*b_ih, "b_ih", input);
    check_same(*b_hh, "b_hh", input);
    check_shape(*b_ih, "b_ih", {kGates * H});
    check_shape(*b_hh, "b_hh", {kGates * H});
  }
  return H;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> gru_forward(const at::Tensor& input_, const at::Tensor& hx_,
                                                           const at::Tensor& w_ih_, const at::Tensor& w_hh_,
                                                           const std::optional<at::Tensor>& b_ih,
                                                           const std::optional<at::Tensor>& b_hh,
                                                           const std::optional<at::Tensor>& batch_sizes, bool reverse,
                                                           bool train) {
  const Schedule sc = make_schedule(input_, batch_sizes);
  const int64_t H = check_gru(input_, sc, hx_, w_ih_, w_hh_, b_ih, b_hh);
  TORCH_CHECK(sc.steps > 0, "input: sequence length must be at least 1");
  TORCH_CHECK(sc.batch > 0, "input: batch size must be at least 1");
  const int64_t S = sc.rows;
  const at::Tensor x = input_.reshape({S, input_.size(-1)}).contiguous();
  const at::Tensor w_ih = w_ih_.contiguous(), w_hh = w_hh_.contiguous();
  at::Tensor gx = empty_large({S, kGates * H}, x.options());
  const int64_t I = input_.size(-1);
  const at::Tensor bias_ih = b_ih.has_value() ? b_ih->contiguous() : at::Tensor();
  at::Tensor bias_hh = b_hh.has_value() ? b_hh->contiguous() : at::zeros({kGates * H}, x.options());
  at::Tensor out = empty_large({S, H}, x.options());
  at::Tensor hbuf = hx_.unsqueeze(0).expand({2, sc.batch, H}).contiguous();
  at::Tensor hy = at::empty({sc.batch, H}, x.options());
  at::Tensor ws = empty_cached({train ? S * (kGates + 1) * H : 0}, x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "genfast::gru_forward", [&] {
    // W_ih x + b_ih for every step at once (b_hh stays apart: r multiplies W_hn h + b_hn).
    matmul<scalar_t>(S, kGates * H, I, x.data_ptr<scalar_t>(), I, w_ih.data_ptr<scalar_t>(), 1, I,
                     bias_ih.defined() ? bias_ih.data_ptr<scalar_t>() : nullptr, gx.data_ptr<scalar_t>(),
                     kGates * H);
    const int64_t panels = ceil_div(H, kUnits);
    at::Tensor packed;
    if (!read_weight_in_place(sc)) {
      packed = empty_large({panels * H * kWidth}, x.options());
      pack_panels_parallel<scalar_t>(w_hh.data_ptr<scalar_t>(), 1, H, H, panels, kWidth,
                                     [&](int64_t p, int64_t col) {
                                       const int64_t j = p * kUnits + col % kUnits;
                                       return j < H ? (col / kUnits) * H + j : -1;
                                     },
                                     packed.data_ptr<scalar_t>());
    }
    forward_loop<scalar_t>(sc, reverse, gx.data_ptr<scalar_t>(), packed.defined() ? packed.data_ptr<scalar_t>() : nullptr,
                           w_hh.data_ptr<scalar_t>(),
                           bias_hh.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(), hbuf.data_ptr<scalar_t>(),
                           train ? ws.data_ptr<scalar_t>() : nullptr, H);
    gather_last_hidden<scalar_t>(sc, reverse, out.data_ptr<scalar_t>(), hy.data_ptr<scalar_t>(), H);
  });
  std::vector<int64_t> out_shape(input_.sizes().begin(), input_.sizes().end());
  out_shape.back() = H;
  return {out.view(out_shape), hy, ws};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> gru_backward(
    const at::Tensor& grad_output, const at::Tensor& grad_hy, const at::Tensor& input_, const at::Tensor& hx_,
    const at::Tensor& w_ih_, const at::Tensor& w_hh_, const at::Tensor& output, const at::Tensor& workspace,
    const std::optional<at::Tensor>& batch_sizes, bool reverse) {
  const Schedule sc = make_schedule(input_, batch_sizes);
  const int64_t H = check_gru(input_, sc, hx_, w_ih_, w_hh_, std::nullopt, std::nullopt);
  const int64_t S = sc.rows;
  TORCH_CHECK(workspace.numel() == S * (kGates + 1) * H,
              "workspace: wrong size; it must come from gru_forward(..., train=True) on the same inputs");
  check_same(grad_output, "grad_output", input_);
  check_shape(grad_hy, "grad_hy", {sc.batch, H});
  const at::Tensor x = input_.reshape({S, input_.size(-1)}).contiguous();
  const at::Tensor go = grad_output.reshape({S, H}).contiguous();
  const at::Tensor out = output.reshape({S, H}).contiguous();
  const at::Tensor ws = workspace.contiguous(), hx = hx_.contiguous();
  const at::Tensor w_ih = w_ih_.contiguous(), w_hh = w_hh_.contiguous();
  at::Tensor dGx = empty_cached({S, kGates * H}, x.options());
  at::Tensor dGh = empty_cached({S, kGates * H}, x.options());
  at::Tensor dh_state = grad_hy.contiguous().clone();
  at::Tensor h_prev = empty_cached({S, H}, x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "genfast::gru_backward", [&] {
    const BackwardWeight<scalar_t> whh(sc, w_hh);
    backward_loop<scalar_t>(sc, reverse, go.data_ptr<scalar_t>(), ws.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(),
                            hx.data_ptr<scalar_t>(), whh.packed_data(), whh.transposed_data(),
                            dGx.data_ptr<scalar_t>(), dGh.data_ptr<scalar_t>(), dh_state.data_ptr<scalar_t>(), H);
    gather_previous_hidden<scalar_t>(sc, reverse, out.data_ptr<scalar_t>(), hx.data_ptr<scalar_t>(),
                                     h_prev.data_ptr<scalar_t>(), H);
  });
  const int64_t I = input_.size(-1);
  at::Tensor grad_input = empty_cached({S, I}, x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "genfast::gru_backward_input", [&] {
    matmul<scalar_t>(S, I, kGates * H, dGx.data_ptr<scalar_t>(), kGates * H, w_ih.data_ptr<scalar_t>(), I, 1, nullptr,
                     grad_input.data_ptr<scalar_t>(), I);
  });
  grad_input = grad_input.view(input_.sizes());
  return {grad_input, dh_state, gemm(dGx.t(), x), gemm(dGh.t(), h_prev), dGx.sum(0), dGh.sum(0)};
}

}  // namespace

TORCH_LIBRARY_IMPL(genfast, CPU, m) {
  m.impl("gru_forward", &gru_forward);
  m.impl("gru_backward", &gru_backward);
}

}  // namespace genfast::cpu
