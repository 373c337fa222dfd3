// Autograd for the LSTM and GRU ops, in C++: backpropagation through time calls the
// *_backward op with what the forward saved (its inputs, its output and the workspace of
// activations that the kernel fills when train=true).
//
// Registered at the Autograd key, so it serves every backend (csrc/cpu/, csrc/cuda/) and
// torch.compile traces through it to the ops' fake kernels (genfast/ops/rnn.py). It is in
// C++ rather than torch.library.register_autograd because a Python wrapper's cost per call, even
// under no_grad, is of the order of a one-token decode step's kernel.
#include <torch/autograd.h>
#include <torch/library.h>

#include "rnn_autograd.h"

namespace genfast {
namespace {

using namespace rnn_autograd;

// ---------------------------------------------------------------- LSTM
using LSTMOutputs = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>;
using LSTMForward = LSTMOutputs(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                const at::Tensor&, const OptTensor&, const OptTensor&, const OptTensor&,
                                const OptTensor&, bool, bool, const OptTensor&, const OptTensor&, const OptTensor&);
using LSTMBackward = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>(
    const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
    const at::Tensor&, const at::Tensor&, const OptTensor&, const at::Tensor&, const at::Tensor&, const OptTensor&,
    bool, const OptTensor&, const OptTensor&, const OptTensor&, bool);

struct LSTMFunction : public torch::autograd::Function<LSTMFunction> {
  static variable_list forward(AutogradContext* ctx, const at::Tensor& input, const at::Tensor& hx,
                               const at::Tensor& cx, const at::Tensor& w_ih, const at::Tensor& w_hh,
                               const OptTensor& b_ih, const OptTensor& b_hh, const OptTensor& w_hr,
                               const OptTensor& batch_sizes, bool reverse, bool train, const OptTensor& zoneout,
                               const OptTensor& cell_zoneout, const OptTensor& recurrent_mask) {
    static auto op = find_op<LSTMForward>("genfast::lstm_forward");
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    auto [output, hy, cy, workspace] = op.call(input, hx, cx, w_ih, w_hh, b_ih, b_hh, w_hr, batch_sizes, reverse, train,
                                               zoneout, cell_zoneout, recurrent_mask);
    save_forward(ctx, workspace, reverse, b_ih.has_value(),
                 {input, hx, cx, w_ih, w_hh, w_hr.value_or(at::Tensor()), output, workspace,
                  batch_sizes.value_or(at::Tensor()), zoneout.value_or(at::Tensor()),
                  cell_zoneout.value_or(at::Tensor()), recurrent_mask.value_or(at::Tensor())});
    return {output, hy, cy, workspace};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static auto op = find_op<LSTMBackward>("genfast::lstm_backward");
    const variable_list saved = ctx->get_saved_variables();
    const at::Tensor &input = saved[0], &hx = saved[1], &cx = saved[2], &w_ih = saved[3], &w_hh = saved[4],
                     &w_hr = saved[5], &output = saved[6], &workspace = saved[7], &batch_sizes = saved[8],
                     &zoneout = saved[9], &cell_zoneout = saved[10], &recurrent_mask = saved[11];
    check_workspace(workspace, "lstm_forward");
    auto [grad_input, grad_hx, grad_cx, grad_w_ih, grad_w_hh, grad_bias, grad_w_hr] =
        op.call(zeros_if_undefined(grads[0], output), zeros_if_undefined(grads[1], hx),
                zeros_if_undefined(grads[2], cx), input, hx, cx, w_ih, w_hh, optional_of(w_hr), output, workspace,
                optional_of(batch_sizes), ctx->saved_data["reverse"].toBool(), optional_of(zoneout),
                optional_of(cell_zoneout), optional_of(recurrent_mask), needs_input_grad(ctx));
    // b_ih and b_hh get the same gradient tensor; the engine's AccumulateGrad copies it for all but
    // the last of them, so their .grad never share storage (tests/test_lstm.py checks).
    return {input_grad_if_needed(ctx, grad_input),
            grad_hx,
            grad_cx,
            grad_w_ih,
            grad_w_hh,
            if_bias(ctx, grad_bias),
            if_bias(ctx, grad_bias),
            w_hr.defined() ? grad_w_hr : at::Tensor(),
            at::Tensor(),   // batch_sizes
            at::Tensor(),   // reverse
            at::Tensor(),   // train
            at::Tensor(),   // zoneout
            at::Tensor(),   // cell_zoneout
            at::Tensor()};  // recurrent_mask
  }
};

LSTMOutputs lstm_forward_autograd(const at::Tensor& input, const at::Tensor& hx, const at::Tensor& cx,
                                  const at::Tensor& w_ih, const at::Tensor& w_hh, const OptTensor& b_ih,
                                  const OptTensor& b_hh, const OptTensor& w_hr, const OptTensor& batch_sizes,
                                  bool reverse, bool train, const OptTensor& zoneout, const OptTensor& cell_zoneout,
                                  const OptTensor& recurrent_mask) {
  const variable_list out = LSTMFunction::apply(input, hx, cx, w_ih, w_hh, b_ih, b_hh, w_hr, batch_sizes, reverse,
                                                train, zoneout, cell_zoneout, recurrent_mask);
  return {out[0], out[1], out[2], out[3]};
}

// ---------------------------------------------------------------- GRU
using GRUOutputs = std::tuple<at::Tensor, at::Tensor, at::Tensor>;
using GRUForward = GRUOutputs(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                              const OptTensor&, const OptTensor&, const OptTensor&, bool, bool, const OptTensor&,
                              const OptTensor&);
using GRUBackward = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>(
    const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
    const at::Tensor&, const at::Tensor&, const at::Tensor&, const OptTensor&, bool, const OptTensor&,
    const OptTensor&, bool);

struct GRUFunction : public torch::autograd::Function<GRUFunction> {
  static variable_list forward(AutogradContext* ctx, const at::Tensor& input, const at::Tensor& hx,
                               const at::Tensor& w_ih, const at::Tensor& w_hh, const OptTensor& b_ih,
                               const OptTensor& b_hh, const OptTensor& batch_sizes, bool reverse, bool train,
                               const OptTensor& zoneout, const OptTensor& recurrent_mask) {
    static auto op = find_op<GRUForward>("genfast::gru_forward");
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    auto [output, hy, workspace] =
        op.call(input, hx, w_ih, w_hh, b_ih, b_hh, batch_sizes, reverse, train, zoneout, recurrent_mask);
    save_forward(ctx, workspace, reverse, b_ih.has_value(),
                 {input, hx, w_ih, w_hh, output, workspace, batch_sizes.value_or(at::Tensor()),
                  zoneout.value_or(at::Tensor()), recurrent_mask.value_or(at::Tensor())});
    return {output, hy, workspace};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static auto op = find_op<GRUBackward>("genfast::gru_backward");
    const variable_list saved = ctx->get_saved_variables();
    const at::Tensor &input = saved[0], &hx = saved[1], &w_ih = saved[2], &w_hh = saved[3], &output = saved[4],
                     &workspace = saved[5], &batch_sizes = saved[6], &zoneout = saved[7],
                     &recurrent_mask = saved[8];
    check_workspace(workspace, "gru_forward");
    auto [grad_input, grad_hx, grad_w_ih, grad_w_hh, grad_b_ih, grad_b_hh] =
        op.call(zeros_if_undefined(grads[0], output), zeros_if_undefined(grads[1], hx), input, hx, w_ih, w_hh,
                output, workspace, optional_of(batch_sizes), ctx->saved_data["reverse"].toBool(), optional_of(zoneout),
                optional_of(recurrent_mask), needs_input_grad(ctx));
    return {input_grad_if_needed(ctx, grad_input),
            grad_hx,
            grad_w_ih,
            grad_w_hh,
            if_bias(ctx, grad_b_ih),
            if_bias(ctx, grad_b_hh),
            at::Tensor(),   // batch_sizes
            at::Tensor(),   // reverse
            at::Tensor(),   // train
            at::Tensor(),   // zoneout
            at::Tensor()};  // recurrent_mask
  }
};

GRUOutputs gru_forward_autograd(const at::Tensor& input, const at::Tensor& hx, const at::Tensor& w_ih,
                                const at::Tensor& w_hh, const OptTensor& b_ih, const OptTensor& b_hh,
                                const OptTensor& batch_sizes, bool reverse, bool train, const OptTensor& zoneout,
                                const OptTensor& recurrent_mask) {
  const variable_list out =
      GRUFunction::apply(input, hx, w_ih, w_hh, b_ih, b_hh, batch_sizes, reverse, train, zoneout, recurrent_mask);
  return {out[0], out[1], out[2]};
}

// ---------------------------------------------------------------- GRU, reset gate before the product
// The gru_* argument lists; its backward returns one bias gradient for b_ih and b_hh, as the LSTM's.
using GRUResetBeforeForward = GRUForward;
using GRUResetBeforeBackward = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>(
    const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
    const at::Tensor&, const at::Tensor&, const at::Tensor&, const OptTensor&, bool, const OptTensor&,
    const OptTensor&, bool);

struct GRUResetBeforeFunction : public torch::autograd::Function<GRUResetBeforeFunction> {
  static variable_list forward(AutogradContext* ctx, const at::Tensor& input, const at::Tensor& hx,
                               const at::Tensor& w_ih, const at::Tensor& w_hh, const OptTensor& b_ih,
                               const OptTensor& b_hh, const OptTensor& batch_sizes, bool reverse, bool train,
                               const OptTensor& zoneout, const OptTensor& recurrent_mask) {
    static auto op = find_op<GRUResetBeforeForward>("genfast::gru_reset_before_forward");
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    auto [output, hy, workspace] =
        op.call(input, hx, w_ih, w_hh, b_ih, b_hh, batch_sizes, reverse, train, zoneout, recurrent_mask);
    save_forward(ctx, workspace, reverse, b_ih.has_value(),
                 {input, hx, w_ih, w_hh, output, workspace, batch_sizes.value_or(at::Tensor()),
                  zoneout.value_or(at::Tensor()), recurrent_mask.value_or(at::Tensor())});
    return {output, hy, workspace};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static auto op = find_op<GRUResetBeforeBackward>("genfast::gru_reset_before_backward");
    const variable_list saved = ctx->get_saved_variables();
    const at::Tensor &input = saved[0], &hx = saved[1], &w_ih = saved[2], &w_hh = saved[3], &output = saved[4],
                     &workspace = saved[5], &batch_sizes = saved[6], &zoneout = saved[7],
                     &recurrent_mask = saved[8];
    check_workspace(workspace, "gru_reset_before_forward");
    auto [grad_input, grad_hx, grad_w_ih, grad_w_hh, grad_bias] =
        op.call(zeros_if_undefined(grads[0], output), zeros_if_undefined(grads[1], hx), input, hx, w_ih, w_hh,
                output, workspace, optional_of(batch_sizes), ctx->saved_data["reverse"].toBool(), optional_of(zoneout),
                optional_of(recurrent_mask), needs_input_grad(ctx));
    return {input_grad_if_needed(ctx, grad_input),
            grad_hx,
            grad_w_ih,
            grad_w_hh,
            if_bias(ctx, grad_bias),
            if_bias(ctx, grad_bias),
            at::Tensor(),   // batch_sizes
            at::Tensor(),   // reverse
            at::Tensor(),   // train
            at::Tensor(),   // zoneout
            at::Tensor()};  // recurrent_mask
  }
};

GRUOutputs gru_reset_before_forward_autograd(const at::Tensor& input, const at::Tensor& hx, const at::Tensor& w_ih,
                                             const at::Tensor& w_hh, const OptTensor& b_ih, const OptTensor& b_hh,
                                             const OptTensor& batch_sizes, bool reverse, bool train,
                                             const OptTensor& zoneout, const OptTensor& recurrent_mask) {
  const variable_list out = GRUResetBeforeFunction::apply(input, hx, w_ih, w_hh, b_ih, b_hh, batch_sizes, reverse,
                                                          train, zoneout, recurrent_mask);
  return {out[0], out[1], out[2]};
}

}  // namespace

TORCH_LIBRARY_IMPL(genfast, Autograd, m) {
  m.impl("lstm_forward", &lstm_forward_autograd);
  m.impl("gru_forward", &gru_forward_autograd);
  m.impl("gru_reset_before_forward", &gru_reset_before_forward_autograd);
}

}  // namespace genfast
