// CUDA implementations of genfast::{lstm,gru}_{forward,backward}: buffers and the time loop,
// written once over the cell policy (csrc/rnn/cells.h); the schedule, the argument checks and the
// workspace layout are the ones the CPU uses (csrc/rnn/rnn_host.h). Matrix products go through
// ATen (cuBLAS) on the current stream into buffers allocated before the loop; the fused
// element-wise work of each step is one launch of the torch-free kernels (rnn_step.cuh).
//
// Per step (processing order t = 0..T-1, or T-1..0 when `reverse`), with n_t active rows:
//   forward:  gates_h[:n_t] = h[:n_t] @ W_hh^T             (cuBLAS)
//             fused step kernel: bias, gates, state update   (rnn_step.cuh)
//             [projection] out_t = hcell @ W_hr^T; h[:n_t] = out_t
//   backward: fused step kernel: gate gradients, dc carried, h_{t-1} gathered
//             dh[:n_t] (=, or += after a cell's direct term) d_gates_h @ W_hh   (cuBLAS)
//   after the loop, one product each for grad_input, grad_w_ih, grad_w_hh (, grad_w_hr).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <optional>
#include <tuple>
#include <vector>

#include "glue_types.h"
#include "rnn/regularizers_host.h"
#include "rnn/rnn_host.h"
#include "rnn_kernels.h"
#include "rnn_persistent_glue.h"

namespace genfast {
namespace cuda {
namespace {

using at::Tensor;
using rnn::Dims;
using rnn::LayerArgs;
using rnn::Schedule;

at::ScalarType acc_dtype(at::ScalarType dtype) {
  return dtype == at::kDouble ? at::kDouble : at::kFloat;
}

struct ForwardResult {
  Tensor output, hy, cy, workspace;
};

template <typename Cell>
ForwardResult rnn_forward(const LayerArgs& a, bool reverse, bool train,
                          const rnn::RegularizerArgs& regularizers = rnn::kNoRegularizers) {
  constexpr int64_t G = Cell::kGates;
  const Schedule sc = rnn::make_schedule(a.input, a.batch_sizes);
  const Dims d = rnn::check_forward<Cell>(rnn::kCuda, a, sc);
  rnn::check_regularizers<Cell>(regularizers, a, sc, d);
  const bool projected = Cell::kProjection && a.w_hr.has_value();
  const int64_t S = sc.rows, H = d.H, H_out = d.Hout, N = sc.batch;
  const c10::cuda::CUDAGuard guard(a.input.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
  const auto options = a.input.options();

  // Everything the loop touches is allocated here, once.
  const Tensor x2d = a.input.contiguous().view({S, d.I});
  const Tensor w_hh_t = a.w_hh.contiguous().t();
  const Tensor w_hr_t = projected ? a.w_hr->contiguous().t() : Tensor();
  const Tensor b_ih_c = a.b_ih.has_value() ? a.b_ih->contiguous() : Tensor();
  const Tensor b_hh_c = a.b_hh.has_value() ? a.b_hh->contiguous() : Tensor();
  const Tensor gates_x = at::mm(x2d, a.w_ih.t());  // (S, G*H), all steps at once
  const Tensor gates_h = at::empty({N, G * H}, options);
  Tensor output = at::empty(rnn::output_shape(a.input, H_out), options);
  const Tensor out2d = output.view({S, H_out});
  Tensor h_state = a.hx.clone(at::MemoryFormat::Contiguous);
  Tensor c_state;
  if (Cell::kCellState) {
    c_state = at::empty({N, H}, options.dtype(acc_dtype(a.input.scalar_type())));
    c_state.copy_(*a.cx);
  }
  const rnn::WorkspaceLayout layout = rnn::workspace_layout<Cell>(S, H, projected);
  Tensor workspace =
      at::empty({train ? layout.size + regularizers.extra_workspace_values() * S * H : 0}, options);
  // Regularisers: the masks, and h * r for the recurrent products (recurrent dropout).
  const Tensor zoneout = regularizers.zoneout.has_value() ? regularizers.zoneout->contiguous() : Tensor();
  const Tensor cell_zoneout = regularizers.cell_zoneout.has_value() ? regularizers.cell_zoneout->contiguous() : Tensor();
  const Tensor recurrent_mask =
      regularizers.recurrent_mask.has_value() ? regularizers.recurrent_mask->contiguous() : Tensor();
  const Tensor h_masked = recurrent_mask.defined() ? at::mul(h_state, recurrent_mask) : Tensor();
  const Tensor& h_product = recurrent_mask.defined() ? h_masked : h_state;
  // The cell's h before projection: kept per step when training, else one scratch buffer.
  Tensor h_cell;
  if (projected) h_cell = train ? workspace.narrow(0, layout.projected, S * H).view({S, H}) : at::empty({N, H}, options);

  // Issue 20: the persistent kernel runs the whole loop instead, when GENFAST_RNN_PERSISTENT=1 and the layer
  // fits on chip (csrc/cuda/rnn_persistent_glue.h records which path ran and why).
  {
    PersistentLayer layer;
    layer.gates_x = gates_x;
    layer.w_hh = a.w_hh.contiguous();
    layer.b_ih = b_ih_c;
    layer.b_hh = b_hh_c;
    layer.hx = h_state;
    layer.c_state = c_state;
    layer.output = out2d;
    if (train) {
      layer.saved = workspace.narrow(0, 0, S * Cell::kSaved * H);
      if (Cell::kCellState) layer.saved_c = workspace.narrow(0, layout.cell, S * H);
    }
    layer.steps = sc.steps;
    layer.batch = N;
    layer.hidden = H;
    layer.reverse = reverse;
    const bool packed = a.batch_sizes.has_value() && a.batch_sizes->defined();
    if (packed) {
      layer.step_rows = sc.active;
      layer.step_offset = sc.offset;
    }
    layer.projected = projected;
    layer.regularized = zoneout.defined() || cell_zoneout.defined() || recurrent_mask.defined();
    if (run_persistent_forward<Cell>(layer)) {
      // Row n's final h is its output at the last step it is active in: the step processed last (t = 0
      // when reversed, where every row is active; packed forward: the row's own last step).
      if (packed) {
        std::vector<int64_t> last_row(N);
        for (int64_t t = 0; t < sc.steps; ++t)
          for (int64_t n = 0; n < sc.active[t]; ++n)
            if (!reverse || t == 0) last_row[n] = sc.offset[t] + n;
        h_state.copy_(out2d.index_select(0, at::tensor(last_row, at::kLong).to(out2d.device())));
      } else {
        h_state.copy_(out2d.narrow(0, reverse ? 0 : (sc.steps - 1) * N, N));
      }
      Tensor cy = Cell::kCellState ? c_state.to(a.input.scalar_type()) : Tensor();
      return {output, h_state, cy, workspace};
    }
  }

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.input.scalar_type(), "genfast::rnn_forward_cuda", [&] {
    using K = typename KernelType<scalar_t>::type;
    K* ws = train ? data<K>(workspace) : nullptr;
    for (int64_t p = 0; p < sc.steps; ++p) {
      const int64_t t = sc.forward_step(p, reverse);
      const int64_t rows = sc.active[t], off = sc.offset[t];
      Tensor gh_rows = gates_h.narrow(0, 0, rows);
      at::mm_out(gh_rows, h_product.narrow(0, 0, rows), w_hh_t);

      ForwardStepArgs<K> step;
      step.rows = rows;
      step.hidden = H;
      step.gates_x = data<K>(gates_x) + off * G * H;
      step.ld_gates_x = G * H;
      step.gates_h = data<K>(gates_h);
      step.b_ih = data_or_null<K>(b_ih_c);
      step.b_hh = data_or_null<K>(b_hh_c);
      step.c_state = data_or_null<AccT<K>>(c_state);
      step.h_prev = Cell::kCellState ? nullptr : data<K>(h_state);
      const int64_t cell_row = train ? off : 0;
      if (projected) {
        step.h_dst = data<K>(h_cell) + cell_row * H;
        step.ld_h_dst = H;
      } else {
        step.h_dst = data<K>(out2d) + off * H;
        step.ld_h_dst = H;
        step.h_dst2 = data<K>(h_state);
        step.ld_h_dst2 = H;
      }
      if (train) {
        step.saved = ws + off * Cell::kSaved * H;
        step.saved_c = Cell::kCellState ? ws + layout.cell + off * H : nullptr;
        if (cell_zoneout.defined()) step.carried_c = ws + layout.size + off * H;
      }
      if (zoneout.defined()) {
        step.zoneout = data<K>(zoneout) + off * H;
        step.h_prev = data<K>(h_state);
      }
      if (cell_zoneout.defined()) step.cell_zoneout = data<K>(cell_zoneout) + off * H;
      if (recurrent_mask.defined()) {
        step.recurrent_mask = data<K>(recurrent_mask);
        step.h_masked_dst = data<K>(h_masked);
      }
      C10_CUDA_CHECK((forward_step<Cell, K>(step, stream)));

      if (projected) {
        Tensor out_rows = out2d.narrow(0, off, rows);
        at::mm_out(out_rows, h_cell.narrow(0, cell_row, rows), w_hr_t);
        h_state.narrow(0, 0, rows).copy_(out_rows);
      }
    }
  });
  Tensor cy = Cell::kCellState ? c_state.to(a.input.scalar_type()) : Tensor();
  return {output, h_state, cy, workspace};
}

struct BackwardResult {
  Tensor grad_input, grad_hx, grad_cx, grad_w_ih, grad_w_hh, grad_b_ih, grad_b_hh, grad_w_hr;
};

template <typename Cell>
BackwardResult rnn_backward(const LayerArgs& a, const rnn::BackwardArgs& g, bool reverse,
                            const rnn::RegularizerArgs& regularizers = rnn::kNoRegularizers) {
  constexpr int64_t G = Cell::kGates;
  const Schedule sc = rnn::make_schedule(a.input, a.batch_sizes);
  const Dims d = rnn::check_backward<Cell>(rnn::kCuda, a, g, sc);
  rnn::check_regularizers<Cell>(regularizers, a, sc, d);
  TORCH_CHECK(g.extra_workspace_values == regularizers.extra_workspace_values(),
              "workspace: its layout does not match the regularisers given");
  const bool projected = Cell::kProjection && a.w_hr.has_value();
  const int64_t S = sc.rows, H = d.H, H_out = d.Hout, N = sc.batch, I = d.I;
  const c10::cuda::CUDAGuard guard(a.input.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
  const auto options = a.input.options();

  const Tensor x2d = a.input.contiguous().view({S, I});
  const Tensor go2d = g.grad_output.contiguous().view({S, H_out});
  const Tensor out2d = g.output.contiguous().view({S, H_out});
  const Tensor hx_c = a.hx.contiguous();
  const Tensor cx_c = Cell::kCellState ? a.cx->contiguous() : Tensor();
  const Tensor ws = g.workspace.contiguous();
  const Tensor w_hh_c = a.w_hh.contiguous();
  const Tensor w_hr_c = projected ? a.w_hr->contiguous() : Tensor();
  const rnn::WorkspaceLayout layout = rnn::workspace_layout<Cell>(S, H, projected);
  Tensor dh_state = g.grad_hy.clone(at::MemoryFormat::Contiguous);
  Tensor dc_state;
  if (Cell::kCellState) {
    dc_state = at::empty({N, H}, options.dtype(acc_dtype(a.input.scalar_type())));
    dc_state.copy_(*g.grad_cy);
  }
  const Tensor d_gates = at::empty({S, G * H}, options);
  const Tensor d_gates_h = Cell::kSidesAdd ? d_gates : at::empty({S, G * H}, options);
  const Tensor h_prev = at::empty({S, H_out}, options);
  // With a projection: dL/dh_out per row (for grad_w_hr) and dL/d(cell's h) per step.
  const Tensor dh_total = projected ? at::empty({S, H_out}, options) : Tensor();
  const Tensor d_h_cell = projected ? at::empty({N, H}, options) : Tensor();
  const Tensor zoneout = regularizers.zoneout.has_value() ? regularizers.zoneout->contiguous() : Tensor();
  const Tensor cell_zoneout = regularizers.cell_zoneout.has_value() ? regularizers.cell_zoneout->contiguous() : Tensor();
  const Tensor recurrent_mask =
      regularizers.recurrent_mask.has_value() ? regularizers.recurrent_mask->contiguous() : Tensor();
  // Recurrent dropout: the recurrent product dL/d(h_{t-1} * r), before it is multiplied by r.
  const Tensor recurrent_grad = recurrent_mask.defined() ? at::empty({N, H_out}, options) : Tensor();

  // Issue 20: the persistent backward kernel runs the whole loop instead, when GENFAST_RNN_PERSISTENT=1 and the
  // layer fits (csrc/cuda/rnn_persistent_glue.h); it fills d_gates, d_gates_h, h_prev and the state gradients.
  bool persistent = false;
  {
    PersistentBackwardLayer layer;
    layer.w_hh = w_hh_c;
    layer.grad_output = go2d;
    layer.hx = hx_c;
    layer.cx = cx_c;
    layer.output = out2d;
    layer.saved = ws.narrow(0, 0, S * Cell::kSaved * H);
    if (Cell::kCellState) layer.saved_c = ws.narrow(0, layout.cell, S * H);
    layer.dh_state = dh_state;
    layer.dc_state = dc_state;
    layer.d_gates = d_gates;
    layer.d_gates_h = d_gates_h;
    layer.h_prev = h_prev;
    layer.steps = sc.steps;
    layer.batch = N;
    layer.hidden = H;
    layer.reverse = reverse;
    if (a.batch_sizes.has_value() && a.batch_sizes->defined()) {
      layer.step_rows = sc.active;
      layer.step_offset = sc.offset;
    }
    layer.projected = projected;
    layer.regularized = zoneout.defined() || cell_zoneout.defined() || recurrent_mask.defined();
    persistent = run_persistent_backward<Cell>(layer);
  }

  if (!persistent)
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.input.scalar_type(), "genfast::rnn_backward_cuda", [&] {
    using K = typename KernelType<scalar_t>::type;
    const K* saved = data<K>(ws);
    // The state history the cell read: c_t saved by the forward, or its output h_t.
    const K* states = Cell::kCellState ? saved + layout.cell : data<K>(out2d);
    if (Cell::kCellState && cell_zoneout.defined()) states = saved + layout.size;  // the carried c_t, not c~_t
    const K* state_init = Cell::kCellState ? data<K>(cx_c) : data<K>(hx_c);
    for (int64_t s = 0; s < sc.steps; ++s) {
      const auto pass = sc.backward_pass(s, reverse);
      const int64_t rows = pass.n, off = pass.offset;
      const int64_t prev_rows = sc.active_at(pass.fwd_prev);
      const int64_t prev_off = pass.fwd_prev >= 0 ? sc.offset[pass.fwd_prev] : 0;

      BackwardStepArgs<K> step;
      step.rows = rows;
      step.hidden = H;
      step.hidden_out = H_out;
      if (projected) {
        Tensor total = dh_total.narrow(0, off, rows);
        at::add_out(total, go2d.narrow(0, off, rows), dh_state.narrow(0, 0, rows));
        Tensor d_cell_rows = d_h_cell.narrow(0, 0, rows);
        at::mm_out(d_cell_rows, total, w_hr_c);
        step.d_h = data<K>(d_h_cell);
        step.ld_d_h = H;
      } else {
        step.d_h = data<K>(go2d) + off * H;
        step.ld_d_h = H;
        step.d_h_extra = data<K>(dh_state);
        step.ld_d_h_extra = H;
      }
      step.d_c_state = data_or_null<AccT<K>>(dc_state);
      step.saved = saved + off * Cell::kSaved * H;
      step.saved_c = Cell::kCellState ? saved + layout.cell + off * H : nullptr;
      step.state_prev = states + prev_off * H;
      step.state_init = state_init;
      step.prev_rows = prev_rows;
      step.output_prev = data<K>(out2d) + prev_off * H_out;
      step.hx = data<K>(hx_c);
      step.h_prev_dst = data<K>(h_prev) + off * H_out;
      step.d_gates_x = data<K>(d_gates) + off * G * H;
      step.d_gates_h = Cell::kSidesAdd ? nullptr : data<K>(d_gates_h) + off * G * H;
      if (zoneout.defined()) step.zoneout = data<K>(zoneout) + off * H;
      if (cell_zoneout.defined()) step.cell_zoneout = data<K>(cell_zoneout) + off * H;
      if (recurrent_mask.defined()) step.recurrent_mask = data<K>(recurrent_mask);
      C10_CUDA_CHECK((backward_step<Cell, K>(step, stream)));

      // dL/dh_{t-1} = d_gates_h @ W_hh (+ the direct term the kernel wrote: the cell's, zoneout's),
      // times r under recurrent dropout.
      Tensor dh_rows = dh_state.narrow(0, 0, rows);
      const bool direct = Cell::kDirectHidden || zoneout.defined();
      if (recurrent_mask.defined()) {
        Tensor rec = recurrent_grad.narrow(0, 0, rows);
        at::mm_out(rec, d_gates_h.narrow(0, off, rows), w_hh_c);
        if (direct)
          dh_rows.addcmul_(rec, recurrent_mask.narrow(0, 0, rows));
        else
          at::mul_out(dh_rows, rec, recurrent_mask.narrow(0, 0, rows));
      } else if (direct) {
        dh_rows.addmm_(d_gates_h.narrow(0, off, rows), w_hh_c);
      } else {
        at::mm_out(dh_rows, d_gates_h.narrow(0, off, rows), w_hh_c);
      }
    }
  });

  BackwardResult r;
  r.grad_input = g.input_grad ? at::mm(d_gates, a.w_ih).view(a.input.sizes()) : rnn::skipped_input_grad(a.input);
  r.grad_hx = dh_state;
  r.grad_w_ih = at::mm(d_gates.t(), x2d);
  r.grad_w_hh = at::mm(d_gates_h.t(), h_prev);
  r.grad_b_ih = d_gates.sum(0);
  r.grad_b_hh = Cell::kSidesAdd ? r.grad_b_ih : d_gates_h.sum(0);
  r.grad_w_hr = projected ? at::mm(dh_total.t(), ws.narrow(0, layout.projected, S * H).view({S, H}))
                          : at::empty({0}, options);
  r.grad_cx = Cell::kCellState ? dc_state.to(a.input.scalar_type()) : Tensor();
  return r;
}

// ---------------------------------------------------------------- the ops
const std::optional<Tensor> kNone;

std::tuple<Tensor, Tensor, Tensor, Tensor> lstm_forward_cuda(
    const Tensor& input, const Tensor& hx, const Tensor& cx, const Tensor& w_ih, const Tensor& w_hh,
    const std::optional<Tensor>& b_ih, const std::optional<Tensor>& b_hh, const std::optional<Tensor>& w_hr,
    const std::optional<Tensor>& batch_sizes, bool reverse, bool train, const std::optional<Tensor>& zoneout,
    const std::optional<Tensor>& cell_zoneout, const std::optional<Tensor>& recurrent_mask) {
  const ForwardResult r = rnn_forward<rnn::LstmCell>({input, hx, &cx, w_ih, w_hh, b_ih, b_hh, w_hr, batch_sizes},
                                                     reverse, train, {zoneout, cell_zoneout, recurrent_mask});
  return {r.output, r.hy, r.cy, r.workspace};
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> lstm_backward_cuda(
    const Tensor& grad_output, const Tensor& grad_hy, const Tensor& grad_cy, const Tensor& input, const Tensor& hx,
    const Tensor& cx, const Tensor& w_ih, const Tensor& w_hh, const std::optional<Tensor>& w_hr, const Tensor& output,
    const Tensor& workspace, const std::optional<Tensor>& batch_sizes, bool reverse,
    const std::optional<Tensor>& zoneout, const std::optional<Tensor>& cell_zoneout,
    const std::optional<Tensor>& recurrent_mask, bool input_grad) {
  const rnn::RegularizerArgs reg{zoneout, cell_zoneout, recurrent_mask};
  const BackwardResult r = rnn_backward<rnn::LstmCell>(
      {input, hx, &cx, w_ih, w_hh, kNone, kNone, w_hr, batch_sizes},
      {grad_output, grad_hy, &grad_cy, output, workspace, reg.extra_workspace_values(), input_grad}, reverse, reg);
  return {r.grad_input, r.grad_hx, r.grad_cx, r.grad_w_ih, r.grad_w_hh, r.grad_b_ih, r.grad_w_hr};
}

std::tuple<Tensor, Tensor, Tensor> gru_forward_cuda(const Tensor& input, const Tensor& hx, const Tensor& w_ih,
                                                    const Tensor& w_hh, const std::optional<Tensor>& b_ih,
                                                    const std::optional<Tensor>& b_hh,
                                                    const std::optional<Tensor>& batch_sizes, bool reverse,
                                                    bool train, const std::optional<Tensor>& zoneout,
                                                    const std::optional<Tensor>& recurrent_mask) {
  const ForwardResult r = rnn_forward<rnn::GruCell>({input, hx, nullptr, w_ih, w_hh, b_ih, b_hh, kNone, batch_sizes},
                                                    reverse, train, {zoneout, kNone, recurrent_mask});
  return {r.output, r.hy, r.workspace};
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> gru_backward_cuda(
    const Tensor& grad_output, const Tensor& grad_hy, const Tensor& input, const Tensor& hx, const Tensor& w_ih,
    const Tensor& w_hh, const Tensor& output, const Tensor& workspace, const std::optional<Tensor>& batch_sizes,
    bool reverse, const std::optional<Tensor>& zoneout, const std::optional<Tensor>& recurrent_mask, bool input_grad) {
  const BackwardResult r = rnn_backward<rnn::GruCell>({input, hx, nullptr, w_ih, w_hh, kNone, kNone, kNone, batch_sizes},
                                                      {grad_output, grad_hy, nullptr, output, workspace, 0, input_grad},
                                                      reverse,
                                                      {zoneout, kNone, recurrent_mask});
  return {r.grad_input, r.grad_hx, r.grad_w_ih, r.grad_w_hh, r.grad_b_ih, r.grad_b_hh};
}

}  // namespace
}  // namespace cuda
}  // namespace genfast

TORCH_LIBRARY_IMPL(genfast, CUDA, m) {
  m.impl("lstm_forward", &genfast::cuda::lstm_forward_cuda);
  m.impl("lstm_backward", &genfast::cuda::lstm_backward_cuda);
  m.impl("gru_forward", &genfast::cuda::gru_forward_cuda);
  m.impl("gru_backward", &genfast::cuda::gru_backward_cuda);
}
