// CPU implementations of genfast::{lstm,gru}_{forward,backward}: one layer, one direction, the
// whole (padded or packed) sequence. The op bodies are written once over the cell policy
// (csrc/rnn/cells.h): checks and schedule from csrc/rnn/rnn_host.h, buffers and weight packing
// here, the time loops in csrc/cpu/rnn_core.h. Workspace (train=true): rnn::WorkspaceLayout.
#include <torch/library.h>

#include "cpu/gemm_entry.h"
#include "cpu/rnn_core.h"
#include "rnn/rnn_host.h"

namespace genfast::cpu {
namespace {

using rnn::Dims;
using rnn::LayerArgs;

struct ForwardResult {
  at::Tensor output, hy, cy, workspace;
};

template <typename Cell>
ForwardResult rnn_forward(const LayerArgs& a, bool reverse, bool train) {
  constexpr int64_t G = Cell::kGates;
  const Schedule sc = rnn::make_schedule(a.input, a.batch_sizes);
  const Dims d = rnn::check_forward<Cell>(rnn::kCpu, a, sc);
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
  at::Tensor ws = empty_cached({train ? rnn::workspace_layout<Cell>(S, H, project).size : 0}, x.options());
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
    const ForwardBuffers<scalar_t> buffers{project_first ? nullptr : x.data_ptr<scalar_t>(),
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
    forward_loop<Cell, scalar_t>(sc, reverse, buffers, d.I, H, Hout);
    gather_last_hidden<scalar_t>(sc, reverse, out.data_ptr<scalar_t>(), hy.data_ptr<scalar_t>(), Hout);
  });
  return {out.view(rnn::output_shape(a.input, Hout)), hy, cy, ws};
}

struct BackwardResult {
  at::Tensor grad_input, grad_hx, grad_cx, grad_w_ih, grad_w_hh, grad_b_ih, grad_b_hh, grad_w_hr;
};

template <typename Cell>
BackwardResult rnn_backward(const LayerArgs& a, const rnn::BackwardArgs& g, bool reverse) {
  constexpr int64_t G = Cell::kGates;
  const Schedule sc = rnn::make_schedule(a.input, a.batch_sizes);
  const Dims d = rnn::check_backward<Cell>(rnn::kCpu, a, g, sc);
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
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "genfast::rnn_backward", [&] {
    const BackwardWeight<scalar_t> whh(sc, w_hh);
    at::Tensor packed_whr = project ? pack_columns<scalar_t>(a.w_hr->contiguous(), false) : at::Tensor();
    auto ptr = [](const at::Tensor& t) { return t.defined() ? t.data_ptr<scalar_t>() : nullptr; };
    const BackwardBuffers<scalar_t> buffers{go.data_ptr<scalar_t>(),
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
    backward_loop<Cell, scalar_t>(sc, reverse, buffers, H, Hout);
    gather_previous_hidden<scalar_t>(sc, reverse, out.data_ptr<scalar_t>(), hx.data_ptr<scalar_t>(),
                                     h_prev.data_ptr<scalar_t>(), Hout);
  });
  // The input and weight gradients: one large GEMM each over all steps.
  at::Tensor grad_input = empty_cached({S, d.I}, x.options());
  gemm_out(grad_input, dG, w_ih);
  BackwardResult r;
  r.grad_input = grad_input.view(a.input.sizes());
  r.grad_hx = dh_state;
  r.grad_cx = dc_state;
  r.grad_w_ih = gemm(dG.t(), x);
  r.grad_w_hh = gemm(dG_h.t(), h_prev);
  r.grad_b_ih = dG.sum(0);
  r.grad_b_hh = Cell::kSidesAdd ? r.grad_b_ih : dG_h.sum(0);
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
    const std::optional<at::Tensor>& w_hr, const std::optional<at::Tensor>& batch_sizes, bool reverse, bool train) {
  const ForwardResult r =
      rnn_forward<rnn::LstmCell>({input, hx, &cx, w_ih, w_hh, b_ih, b_hh, w_hr, batch_sizes}, reverse, train);
  return {r.output, r.hy, r.cy, r.workspace};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> lstm_backward(
    const at::Tensor& grad_output, const at::Tensor& grad_hy, const at::Tensor& grad_cy, const at::Tensor& input,
    const at::Tensor& hx, const at::Tensor& cx, const at::Tensor& w_ih, const at::Tensor& w_hh,
    const std::optional<at::Tensor>& w_hr, const at::Tensor& output, const at::Tensor& workspace,
    const std::optional<at::Tensor>& batch_sizes, bool reverse) {
  const BackwardResult r = rnn_backward<rnn::LstmCell>({input, hx, &cx, w_ih, w_hh, kNone, kNone, w_hr, batch_sizes},
                                                       {grad_output, grad_hy, &grad_cy, output, workspace}, reverse);
  return {r.grad_input, r.grad_hx, r.grad_cx, r.grad_w_ih, r.grad_w_hh, r.grad_b_ih, r.grad_w_hr};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> gru_forward(const at::Tensor& input, const at::Tensor& hx,
                                                           const at::Tensor& w_ih, const at::Tensor& w_hh,
                                                           const std::optional<at::Tensor>& b_ih,
                                                           const std::optional<at::Tensor>& b_hh,
                                                           const std::optional<at::Tensor>& batch_sizes, bool reverse,
                                                           bool train) {
  const ForwardResult r =
      rnn_forward<rnn::GruCell>({input, hx, nullptr, w_ih, w_hh, b_ih, b_hh, kNone, batch_sizes}, reverse, train);
  return {r.output, r.hy, r.workspace};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> gru_backward(
    const at::Tensor& grad_output, const at::Tensor& grad_hy, const at::Tensor& input, const at::Tensor& hx,
    const at::Tensor& w_ih, const at::Tensor& w_hh, const at::Tensor& output, const at::Tensor& workspace,
    const std::optional<at::Tensor>& batch_sizes, bool reverse) {
  const BackwardResult r = rnn_backward<rnn::GruCell>({input, hx, nullptr, w_ih, w_hh, kNone, kNone, kNone, batch_sizes},
                                                      {grad_output, grad_hy, nullptr, output, workspace}, reverse);
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
