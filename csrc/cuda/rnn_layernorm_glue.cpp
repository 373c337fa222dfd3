// CUDA implementations of genfast::layernorm_{lstm,gru}_{forward,backward} (schemas:
// csrc/rnn_layernorm_registration.cpp; autograd and fake kernels shared with the CPU): the time loop
// over the torch-free kernels of csrc/cuda/rnn_layernorm.cu, with the schedule and checks the CPU
// uses (csrc/rnn/rnn_host.h, csrc/rnn/layernorm_host.h) and its workspace (rnn::LayerNormWorkspace).
// Products through ATen (cuBLAS) on the current stream, as csrc/cuda/rnn_glue.cpp does for the plain
// cells.
//
// Per step (processing order t = 0..T-1, or T-1..0 when `reverse`), with n_t active rows:
//   forward:  product = (h * r)[:n_t] @ W_hh^T, into the workspace's xhat_hh rows   (cuBLAS)
//             ln_*_forward_step: LN of the product, the gates, (LSTM) LN(c~_t), h_t  (one block per row)
//   backward: ln_*_backward_step: the cell's backward, the recurrent LN's -> d_product
//             dh[:n_t] (=, or += after a direct term) (d_product @ W_hh) * r          (cuBLAS)
// Before the forward loop: G = x W_ih^T (cuBLAS) and its LN, gain and bias (layer_norm_rows_forward).
// After the backward loop: the LN parameters' gradients (column sums, in AccT), the input side's LN
// backward (layer_norm_rows_backward), then grad_input, grad_w_ih, grad_w_hh (cuBLAS).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <optional>
#include <tuple>

#include "glue_types.h"
#include "rnn/layernorm_cells.h"
#include "rnn/layernorm_host.h"
#include "rnn/regularizers_host.h"
#include "rnn/rnn_host.h"
#include "rnn_layernorm_kernels.h"

namespace genfast {
namespace cuda {
namespace {

using at::Tensor;
using rnn::LayerNormGruCell;
using rnn::LayerNormLstmCell;

at::ScalarType acc_dtype(at::ScalarType dtype) { return dtype == at::kDouble ? at::kDouble : at::kFloat; }

// A section of the 1-D workspace as a (rows, width) matrix.
Tensor section(const Tensor& workspace, int64_t offset, int64_t rows, int64_t width) {
  return workspace.narrow(0, offset, rows * width).view({rows, width});
}

const std::optional<Tensor> kNone;

struct LnForwardResult {
  Tensor output, hy, cy, workspace;
};

template <typename Cell>
LnForwardResult ln_forward(const rnn::LayerArgs& a, const rnn::LayerNormParams& p, bool reverse, bool train,
                           const rnn::RegularizerArgs& regularizers) {
  constexpr int64_t G = Cell::kGates;
  constexpr bool kLstm = Cell::kCellState;
  const rnn::Schedule sc = rnn::make_schedule(a.input, a.batch_sizes);
  const rnn::Dims d = rnn::check_forward<Cell>(rnn::kCuda, a, sc);
  rnn::check_layer_norm_params(p, a.input, G, d.H);
  rnn::check_regularizers<Cell>(regularizers, a, sc, d);
  const int64_t S = sc.rows, H = d.H, N = sc.batch;
  const c10::cuda::CUDAGuard guard(a.input.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
  const auto options = a.input.options();
  const auto acc_options = options.dtype(acc_dtype(a.input.scalar_type()));
  const rnn::LayerNormWorkspace layout = Cell::workspace(S, H);

  const Tensor x2d = a.input.contiguous().view({S, d.I});
  const Tensor w_hh_t = a.w_hh.contiguous().t();
  const Tensor gates_x = at::mm(x2d, a.w_ih.t());  // (S, G*H): LN, gain and bias in place below
  // The input side's bias: the LSTM's sides add, so both biases go there; the GRU keeps b_hh on the
  // recurrent side (r multiplies it).
  Tensor x_bias;
  if (a.b_ih.has_value()) x_bias = kLstm ? (*a.b_ih + *a.b_hh).contiguous() : a.b_ih->contiguous();
  const Tensor b_hh = !kLstm && a.b_hh.has_value() ? a.b_hh->contiguous() : Tensor();
  const Tensor gamma_ih = p.ln_ih_weight.contiguous(), gamma_hh = p.ln_hh_weight.contiguous();
  const Tensor gamma_c = kLstm ? p.ln_cell_weight->contiguous() : Tensor();
  const Tensor beta_c = kLstm ? p.ln_cell_bias->contiguous() : Tensor();
  Tensor workspace = at::empty({train ? layout.size : 0}, options);
  // Not training: the product of one step in a scratch; training: in the workspace's xhat_hh rows.
  const Tensor step_product = train ? Tensor() : at::empty({N, G * H}, options);
  Tensor output = at::empty(rnn::output_shape(a.input, H), options);
  const Tensor out2d = output.view({S, H});
  Tensor h_state = a.hx.clone(at::MemoryFormat::Contiguous);
  Tensor c_state, scratch;
  if (kLstm) {
    c_state = at::empty({N, H}, acc_options);
    c_state.copy_(*a.cx);
    scratch = at::empty({N, 2 * H}, acc_options);
  }
  const Tensor zoneout = contiguous_or_undefined(regularizers.zoneout);
  const Tensor cell_zoneout = contiguous_or_undefined(regularizers.cell_zoneout);
  const Tensor recurrent_mask = contiguous_or_undefined(regularizers.recurrent_mask);
  // Recurrent dropout: h * r, what the products read (the carried h_state stays unmasked).
  const Tensor h_masked = recurrent_mask.defined() ? at::mul(h_state, recurrent_mask) : Tensor();
  const Tensor& h_product = recurrent_mask.defined() ? h_masked : h_state;

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.input.scalar_type(), "genfast::layernorm_rnn_forward_cuda",
                                  [&] {
    using K = typename KernelType<scalar_t>::type;
    K* ws = train ? data<K>(workspace) : nullptr;
    LayerNormRowsArgs<K> input_side;
    input_side.rows = S;
    input_side.width = G * H;
    input_side.values = data<K>(gates_x);
    input_side.gain = data<K>(gamma_ih);
    input_side.bias = data_or_null<K>(x_bias);
    if (train) {
      input_side.xhat = ws + layout.xhat_ih;
      input_side.rstd = ws + layout.rstd_ih;
    }
    C10_CUDA_CHECK(layer_norm_rows_forward<K>(input_side, stream));

    for (int64_t s = 0; s < sc.steps; ++s) {
      const int64_t t = sc.forward_step(s, reverse);
      const int64_t rows = sc.active[t], off = sc.offset[t];
      Tensor product = train ? section(workspace, layout.xhat_hh + off * G * H, rows, G * H)
                             : step_product.narrow(0, 0, rows);
      at::mm_out(product, h_product.narrow(0, 0, rows), w_hh_t);

      LnForwardStepArgs<K> step;
      step.rows = rows;
      step.hidden = H;
      step.gates_x = data<K>(gates_x) + off * G * H;
      step.product = data<K>(product);
      step.gamma_hh = data<K>(gamma_hh);
      step.b_hh = data_or_null<K>(b_hh);
      step.gamma_c = data_or_null<K>(gamma_c);
      step.beta_c = data_or_null<K>(beta_c);
      step.c_state = data_or_null<AccT<K>>(c_state);
      step.scratch = data_or_null<AccT<K>>(scratch);
      step.h_state = data<K>(h_state);
      step.h_out = data<K>(out2d) + off * H;
      if (train) {
        step.saved = ws + layout.gates + off * Cell::kSaved * H;
        step.rstd_hh = ws + layout.rstd_hh + off;
        if (kLstm) {
          step.saved_c = ws + layout.cell + off * H;
          step.cell_hat = ws + layout.cell_hat + off * H;
          step.rstd_c = ws + layout.rstd_cell + off;
        }
      }
      if (zoneout.defined()) step.zoneout = data<K>(zoneout) + off * H;
      if (cell_zoneout.defined()) step.cell_zoneout = data<K>(cell_zoneout) + off * H;
      step.recurrent_mask = data_or_null<K>(recurrent_mask);
      step.h_masked = data_or_null<K>(h_masked);
      if constexpr (kLstm) {
        C10_CUDA_CHECK(ln_lstm_forward_step<K>(step, stream));
      } else {
        C10_CUDA_CHECK(ln_gru_forward_step<K>(step, stream));
      }
    }
  });
  // Row n's h_state was last written at the last step it is active in: its final state.
  Tensor cy = kLstm ? c_state.to(a.input.scalar_type()) : Tensor();
  return {output, h_state, cy, workspace};
}

struct LnBackwardResult {
  Tensor grad_input, grad_hx, grad_cx, grad_w_ih, grad_w_hh, grad_b_ih, grad_b_hh, grad_ln_ih, grad_ln_hh,
      grad_ln_cell_weight, grad_ln_cell_bias;
};

// Column sums of d * x over the rows (the gradient of a gain whose normalised input is x), in AccT.
Tensor weighted_column_sums(const Tensor& d_acc, const Tensor& x, at::ScalarType dtype) {
  return (d_acc * x.to(d_acc.scalar_type())).sum(0).to(dtype);
}

template <typename Cell>
LnBackwardResult ln_backward(const rnn::LayerArgs& a, const rnn::LayerNormParams& p, const rnn::BackwardArgs& g,
                             bool reverse, const rnn::RegularizerArgs& regularizers) {
  constexpr int64_t G = Cell::kGates;
  constexpr bool kLstm = Cell::kCellState;
  const rnn::Schedule sc = rnn::make_schedule(a.input, a.batch_sizes);
  const rnn::Dims d = rnn::check_layer_norm_backward<Cell>(rnn::kCuda, a, p, g, sc);
  rnn::check_regularizers<Cell>(regularizers, a, sc, d);
  const int64_t S = sc.rows, H = d.H, N = sc.batch;
  const c10::cuda::CUDAGuard guard(a.input.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
  const auto options = a.input.options();
  const auto dtype = a.input.scalar_type();
  const auto acc_options = options.dtype(acc_dtype(dtype));
  const rnn::LayerNormWorkspace layout = Cell::workspace(S, H);

  const Tensor x2d = a.input.contiguous().view({S, d.I});
  const Tensor go2d = g.grad_output.contiguous().view({S, H});
  const Tensor out2d = g.output.contiguous().view({S, H});
  const Tensor hx_c = a.hx.contiguous();
  const Tensor cx_c = kLstm ? a.cx->contiguous() : Tensor();
  const Tensor ws = g.workspace.contiguous();
  const Tensor w_hh_c = a.w_hh.contiguous();
  const Tensor gamma_ih = p.ln_ih_weight.contiguous(), gamma_hh = p.ln_hh_weight.contiguous();
  const Tensor gamma_c = kLstm ? p.ln_cell_weight->contiguous() : Tensor();
  const Tensor beta_c = kLstm ? p.ln_cell_bias->contiguous() : Tensor();
  Tensor dh_state = g.grad_hy.clone(at::MemoryFormat::Contiguous);
  Tensor dc_state;
  if (kLstm) {
    dc_state = at::empty({N, H}, acc_options);
    dc_state.copy_(*g.grad_cy);
  }
  const Tensor d_pre = at::empty({S, G * H}, options);                             // input side (LSTM: both)
  const Tensor d_pre_h = kLstm ? d_pre : at::empty({S, G * H}, options);           // GRU: recurrent side
  const Tensor d_product = at::empty({S, G * H}, options);                         // dL/d(W_hh h * r)
  const Tensor d_y = kLstm ? at::empty({S, H}, acc_options) : Tensor();            // LSTM: dL/dy
  const Tensor scratch = at::empty({N, G * H}, acc_options);
  const Tensor h_prev = at::empty({S, H}, options);
  const Tensor zoneout = contiguous_or_undefined(regularizers.zoneout);
  const Tensor cell_zoneout = contiguous_or_undefined(regularizers.cell_zoneout);
  const Tensor recurrent_mask = contiguous_or_undefined(regularizers.recurrent_mask);
  // Recurrent dropout: d_product @ W_hh = dL/d(h * r), before it is multiplied by r.
  const Tensor recurrent_grad = recurrent_mask.defined() ? at::empty({N, H}, options) : Tensor();
  // The kernel leaves a direct part of dL/dh_{t-1} in dh_state (the GRU's z dL/dh, zoneout's k dL/dh)
  // that the recurrent product adds to; otherwise the product overwrites it.
  const bool direct = !kLstm || zoneout.defined();

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "genfast::layernorm_rnn_backward_cuda", [&] {
    using K = typename KernelType<scalar_t>::type;
    const K* w = data<K>(ws);
    for (int64_t s = 0; s < sc.steps; ++s) {
      const auto pass = sc.backward_pass(s, reverse);
      const int64_t rows = pass.n, off = pass.offset;
      const int64_t prev_off = pass.fwd_prev >= 0 ? sc.offset[pass.fwd_prev] : 0;

      LnBackwardStepArgs<K> step;
      step.rows = rows;
      step.hidden = H;
      step.prev_rows = sc.active_at(pass.fwd_prev);
      step.grad_out = data<K>(go2d) + off * H;
      step.d_h = data<K>(dh_state);
      step.d_c = data_or_null<AccT<K>>(dc_state);
      step.saved = w + layout.gates + off * Cell::kSaved * H;
      step.xhat_hh = w + layout.xhat_hh + off * G * H;
      step.rstd_hh = w + layout.rstd_hh + off;
      if (kLstm) {
        step.cell_hat = w + layout.cell_hat + off * H;
        step.rstd_c = w + layout.rstd_cell + off;
        step.gamma_c = data<K>(gamma_c);
        step.beta_c = data<K>(beta_c);
        step.c_prev = w + layout.cell + prev_off * H;  // the carried c_{t-1} (zoned under cell zoneout)
        step.cx = data<K>(cx_c);
        step.d_y = data<AccT<K>>(d_y) + off * H;
      }
      step.gamma_hh = data<K>(gamma_hh);
      step.output_prev = data<K>(out2d) + prev_off * H;
      step.hx = data<K>(hx_c);
      step.h_prev_dst = data<K>(h_prev) + off * H;
      step.d_pre = data<K>(d_pre) + off * G * H;
      step.d_pre_h = data<K>(d_pre_h) + off * G * H;
      step.d_product = data<K>(d_product) + off * G * H;
      step.scratch = data<AccT<K>>(scratch);
      if (zoneout.defined()) step.zoneout = data<K>(zoneout) + off * H;
      if (cell_zoneout.defined()) step.cell_zoneout = data<K>(cell_zoneout) + off * H;
      step.recurrent_mask = data_or_null<K>(recurrent_mask);
      if constexpr (kLstm) {
        C10_CUDA_CHECK(ln_lstm_backward_step<K>(step, stream));
      } else {
        C10_CUDA_CHECK(ln_gru_backward_step<K>(step, stream));
      }

      // dL/dh_{t-1} = d_product @ W_hh (times r under recurrent dropout) (+ the direct part).
      Tensor dh_rows = dh_state.narrow(0, 0, rows);
      const Tensor d_product_rows = d_product.narrow(0, off, rows);
      if (recurrent_mask.defined()) {
        Tensor rec = recurrent_grad.narrow(0, 0, rows);
        at::mm_out(rec, d_product_rows, w_hh_c);
        if (direct)
          dh_rows.addcmul_(rec, recurrent_mask.narrow(0, 0, rows));
        else
          at::mul_out(dh_rows, rec, recurrent_mask.narrow(0, 0, rows));
      } else if (direct) {
        dh_rows.addmm_(d_product_rows, w_hh_c);
      } else {
        at::mm_out(dh_rows, d_product_rows, w_hh_c);
      }
    }
  });

  LnBackwardResult r;
  // The LN parameters' gradients, column sums in AccT, before d_pre becomes dL/d(W_ih x) in place.
  const Tensor xhat_ih = section(ws, layout.xhat_ih, S, G * H), xhat_hh = section(ws, layout.xhat_hh, S, G * H);
  const Tensor d_pre_acc = d_pre.to(acc_dtype(dtype));
  r.grad_ln_ih = weighted_column_sums(d_pre_acc, xhat_ih, dtype);
  r.grad_b_ih = d_pre_acc.sum(0).to(dtype);
  if (kLstm) {
    r.grad_ln_hh = weighted_column_sums(d_pre_acc, xhat_hh, dtype);
    r.grad_b_hh = r.grad_b_ih;
    r.grad_ln_cell_weight = weighted_column_sums(d_y, section(ws, layout.cell_hat, S, H), dtype);
    r.grad_ln_cell_bias = d_y.sum(0).to(dtype);
  } else {
    const Tensor d_pre_h_acc = d_pre_h.to(acc_dtype(dtype));
    r.grad_ln_hh = weighted_column_sums(d_pre_h_acc, xhat_hh, dtype);
    r.grad_b_hh = d_pre_h_acc.sum(0).to(dtype);
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "genfast::layernorm_rnn_backward_input_cuda", [&] {
    using K = typename KernelType<scalar_t>::type;
    LayerNormRowsBackwardArgs<K> input_side;
    input_side.rows = S;
    input_side.width = G * H;
    input_side.d = data<K>(d_pre);
    input_side.gain = data<K>(gamma_ih);
    input_side.xhat = data<K>(ws) + layout.xhat_ih;
    input_side.rstd = data<K>(ws) + layout.rstd_ih;
    C10_CUDA_CHECK(layer_norm_rows_backward<K>(input_side, stream));
  });
  r.grad_input = g.input_grad ? at::mm(d_pre, a.w_ih).view(a.input.sizes()) : rnn::skipped_input_grad(a.input);
  r.grad_hx = dh_state;
  r.grad_cx = kLstm ? dc_state.to(dtype) : Tensor();
  r.grad_w_ih = at::mm(d_pre.t(), x2d);
  r.grad_w_hh = at::mm(d_product.t(), h_prev);
  return r;
}

// ---------------------------------------------------------------- the ops
std::tuple<Tensor, Tensor, Tensor, Tensor> layernorm_lstm_forward_cuda(
    const Tensor& input, const Tensor& hx, const Tensor& cx, const Tensor& w_ih, const Tensor& w_hh,
    const std::optional<Tensor>& b_ih, const std::optional<Tensor>& b_hh, const Tensor& ln_ih_weight,
    const Tensor& ln_hh_weight, const Tensor& ln_cell_weight, const Tensor& ln_cell_bias,
    const std::optional<Tensor>& batch_sizes, bool reverse, bool train, const std::optional<Tensor>& zoneout,
    const std::optional<Tensor>& cell_zoneout, const std::optional<Tensor>& recurrent_mask) {
  const LnForwardResult r = ln_forward<LayerNormLstmCell>(
      {input, hx, &cx, w_ih, w_hh, b_ih, b_hh, kNone, batch_sizes},
      {ln_ih_weight, ln_hh_weight, &ln_cell_weight, &ln_cell_bias}, reverse, train,
      {zoneout, cell_zoneout, recurrent_mask});
  return {r.output, r.hy, r.cy, r.workspace};
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor>
layernorm_lstm_backward_cuda(const Tensor& grad_output, const Tensor& grad_hy, const Tensor& grad_cy,
                             const Tensor& input, const Tensor& hx, const Tensor& cx, const Tensor& w_ih,
                             const Tensor& w_hh, const Tensor& ln_ih_weight, const Tensor& ln_hh_weight,
                             const Tensor& ln_cell_weight, const Tensor& ln_cell_bias, const Tensor& output,
                             const Tensor& workspace, const std::optional<Tensor>& batch_sizes, bool reverse,
                             const std::optional<Tensor>& zoneout, const std::optional<Tensor>& cell_zoneout,
                             const std::optional<Tensor>& recurrent_mask, bool input_grad) {
  const LnBackwardResult r = ln_backward<LayerNormLstmCell>(
      {input, hx, &cx, w_ih, w_hh, kNone, kNone, kNone, batch_sizes},
      {ln_ih_weight, ln_hh_weight, &ln_cell_weight, &ln_cell_bias},
      {grad_output, grad_hy, &grad_cy, output, workspace, 0, input_grad}, reverse, {zoneout, cell_zoneout, recurrent_mask});
  return {r.grad_input, r.grad_hx,    r.grad_cx,    r.grad_w_ih,           r.grad_w_hh,
          r.grad_b_ih,  r.grad_ln_ih, r.grad_ln_hh, r.grad_ln_cell_weight, r.grad_ln_cell_bias};
}

std::tuple<Tensor, Tensor, Tensor> layernorm_gru_forward_cuda(
    const Tensor& input, const Tensor& hx, const Tensor& w_ih, const Tensor& w_hh, const std::optional<Tensor>& b_ih,
    const std::optional<Tensor>& b_hh, const Tensor& ln_ih_weight, const Tensor& ln_hh_weight,
    const std::optional<Tensor>& batch_sizes, bool reverse, bool train, const std::optional<Tensor>& zoneout,
    const std::optional<Tensor>& recurrent_mask) {
  const LnForwardResult r =
      ln_forward<LayerNormGruCell>({input, hx, nullptr, w_ih, w_hh, b_ih, b_hh, kNone, batch_sizes},
                                   {ln_ih_weight, ln_hh_weight, nullptr, nullptr}, reverse, train,
                                   {zoneout, kNone, recurrent_mask});
  return {r.output, r.hy, r.workspace};
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> layernorm_gru_backward_cuda(
    const Tensor& grad_output, const Tensor& grad_hy, const Tensor& input, const Tensor& hx, const Tensor& w_ih,
    const Tensor& w_hh, const Tensor& ln_ih_weight, const Tensor& ln_hh_weight, const Tensor& output,
    const Tensor& workspace, const std::optional<Tensor>& batch_sizes, bool reverse,
    const std::optional<Tensor>& zoneout, const std::optional<Tensor>& recurrent_mask, bool input_grad) {
  const LnBackwardResult r =
      ln_backward<LayerNormGruCell>({input, hx, nullptr, w_ih, w_hh, kNone, kNone, kNone, batch_sizes},
                                    {ln_ih_weight, ln_hh_weight, nullptr, nullptr},
                                    {grad_output, grad_hy, nullptr, output, workspace, 0, input_grad}, reverse,
                                    {zoneout, kNone, recurrent_mask});
  return {r.grad_input, r.grad_hx,   r.grad_w_ih,  r.grad_w_hh,
          r.grad_b_ih,  r.grad_b_hh, r.grad_ln_ih, r.grad_ln_hh};
}

}  // namespace
}  // namespace cuda
}  // namespace genfast

TORCH_LIBRARY_IMPL(genfast, CUDA, m) {
  m.impl("layernorm_lstm_forward", &genfast::cuda::layernorm_lstm_forward_cuda);
  m.impl("layernorm_lstm_backward", &genfast::cuda::layernorm_lstm_backward_cuda);
  m.impl("layernorm_gru_forward", &genfast::cuda::layernorm_gru_forward_cuda);
  m.impl("layernorm_gru_backward", &genfast::cuda::layernorm_gru_backward_cuda);
}
