// Autograd for the layer-normalised LSTM and GRU ops (csrc/rnn_layernorm_registration.cpp), in C++
// like the plain cells' (csrc/rnn_autograd.cpp): BPTT calls the *_backward op with what the forward
// saved (its inputs, its output and the workspace the kernel fills when train=true). Registered at
// the Autograd key, so torch.compile traces through it to the fake kernels
// (genfast/ops/layernorm_rnn.py).
#include <torch/autograd.h>
#include <torch/library.h>

#include "rnn_autograd.h"

namespace genfast {
namespace {

using namespace rnn_autograd;

// ---------------------------------------------------------------- LayerNormLSTM
using LnLstmOutputs = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>;
using LnLstmForward = LnLstmOutputs(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                    const at::Tensor&, const OptTensor&, const OptTensor&, const at::Tensor&,
                                    const at::Tensor&, const at::Tensor&, const at::Tensor&, const OptTensor&, bool,
                                    bool, const OptTensor&, const OptTensor&, const OptTensor&);
using LnLstmBackward =
    std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor,
               at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                       const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                       const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                       const at::Tensor&, const at::Tensor&, const OptTensor&, bool, const OptTensor&,
                                       const OptTensor&, const OptTensor&, bool);

struct LayerNormLSTMFunction : public torch::autograd::Function<LayerNormLSTMFunction> {
  static variable_list forward(AutogradContext* ctx, const at::Tensor& input, const at::Tensor& hx,
                               const at::Tensor& cx, const at::Tensor& w_ih, const at::Tensor& w_hh,
                               const OptTensor& b_ih, const OptTensor& b_hh, const at::Tensor& ln_ih_weight,
                               const at::Tensor& ln_hh_weight, const at::Tensor& ln_cell_weight,
                               const at::Tensor& ln_cell_bias, const OptTensor& batch_sizes, bool reverse,
                               bool train, const OptTensor& zoneout, const OptTensor& cell_zoneout,
                               const OptTensor& recurrent_mask) {
    static auto op = find_op<LnLstmForward>("genfast::layernorm_lstm_forward");
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    auto [output, hy, cy, workspace] =
        op.call(input, hx, cx, w_ih, w_hh, b_ih, b_hh, ln_ih_weight, ln_hh_weight, ln_cell_weight, ln_cell_bias,
                batch_sizes, reverse, train, zoneout, cell_zoneout, recurrent_mask);
    save_forward(ctx, workspace, reverse, b_ih.has_value(),
                 {input, hx, cx, w_ih, w_hh, ln_ih_weight, ln_hh_weight, ln_cell_weight, ln_cell_bias, output,
                  workspace, batch_sizes.value_or(at::Tensor()), zoneout.value_or(at::Tensor()),
                  cell_zoneout.value_or(at::Tensor()), recurrent_mask.value_or(at::Tensor())});
    return {output, hy, cy, workspace};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static auto op = find_op<LnLstmBackward>("genfast::layernorm_lstm_backward");
    const variable_list saved = ctx->get_saved_variables();
    const at::Tensor &input = saved[0], &hx = saved[1], &cx = saved[2], &w_ih = saved[3], &w_hh = saved[4],
                     &ln_ih = saved[5], &ln_hh = saved[6], &ln_cell_w = saved[7], &ln_cell_b = saved[8],
                     &output = saved[9], &workspace = saved[10], &batch_sizes = saved[11], &zoneout = saved[12],
                     &cell_zoneout = saved[13], &recurrent_mask = saved[14];
    check_workspace(workspace, "layernorm_lstm_forward");
    auto [grad_input, grad_hx, grad_cx, grad_w_ih, grad_w_hh, grad_bias, grad_ln_ih, grad_ln_hh, grad_ln_cell_w,
          grad_ln_cell_b] =
        op.call(zeros_if_undefined(grads[0], output), zeros_if_undefined(grads[1], hx),
                zeros_if_undefined(grads[2], cx), input, hx, cx, w_ih, w_hh, ln_ih, ln_hh, ln_cell_w, ln_cell_b,
                output, workspace, optional_of(batch_sizes), ctx->saved_data["reverse"].toBool(), optional_of(zoneout),
                optional_of(cell_zoneout), optional_of(recurrent_mask), needs_input_grad(ctx));
    return {input_grad_if_needed(ctx, grad_input),
            grad_hx,
            grad_cx,
            grad_w_ih,
            grad_w_hh,
            if_bias(ctx, grad_bias),
            if_bias(ctx, grad_bias),
            grad_ln_ih,
            grad_ln_hh,
            grad_ln_cell_w,
            grad_ln_cell_b,
            at::Tensor(),   // batch_sizes
            at::Tensor(),   // reverse
            at::Tensor(),   // train
            at::Tensor(),   // zoneout
            at::Tensor(),   // cell_zoneout
            at::Tensor()};  // recurrent_mask
  }
};

LnLstmOutputs layernorm_lstm_forward_autograd(const at::Tensor& input, const at::Tensor& hx, const at::Tensor& cx,
                                              const at::Tensor& w_ih, const at::Tensor& w_hh, const OptTensor& b_ih,
                                              const OptTensor& b_hh, const at::Tensor& ln_ih_weight,
                                              const at::Tensor& ln_hh_weight, const at::Tensor& ln_cell_weight,
                                              const at::Tensor& ln_cell_bias, const OptTensor& batch_sizes,
                                              bool reverse, bool train, const OptTensor& zoneout,
                                              const OptTensor& cell_zoneout, const OptTensor& recurrent_mask) {
  const variable_list out =
      LayerNormLSTMFunction::apply(input, hx, cx, w_ih, w_hh, b_ih, b_hh, ln_ih_weight, ln_hh_weight, ln_cell_weight,
                                   ln_cell_bias, batch_sizes, reverse, train, zoneout, cell_zoneout, recurrent_mask);
  return {out[0], out[1], out[2], out[3]};
}

// ---------------------------------------------------------------- LayerNormGRU
using LnGruOutputs = std::tuple<at::Tensor, at::Tensor, at::Tensor>;
using LnGruForward = LnGruOutputs(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                  const OptTensor&, const OptTensor&, const at::Tensor&, const at::Tensor&,
                                  const OptTensor&, bool, bool, const OptTensor&, const OptTensor&);
using LnGruBackward =
    std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>(
        const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
        const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
        const OptTensor&, bool, const OptTensor&, const OptTensor&, bool);

struct LayerNormGRUFunction : public torch::autograd::Function<LayerNormGRUFunction> {
  static variable_list forward(AutogradContext* ctx, const at::Tensor& input, const at::Tensor& hx,
                               const at::Tensor& w_ih, const at::Tensor& w_hh, const OptTensor& b_ih,
                               const OptTensor& b_hh, const at::Tensor& ln_ih_weight, const at::Tensor& ln_hh_weight,
                               const OptTensor& batch_sizes, bool reverse, bool train, const OptTensor& zoneout,
                               const OptTensor& recurrent_mask) {
    static auto op = find_op<LnGruForward>("genfast::layernorm_gru_forward");
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    auto [output, hy, workspace] = op.call(input, hx, w_ih, w_hh, b_ih, b_hh, ln_ih_weight, ln_hh_weight,
                                           batch_sizes, reverse, train, zoneout, recurrent_mask);
    save_forward(ctx, workspace, reverse, b_ih.has_value(),
                 {input, hx, w_ih, w_hh, ln_ih_weight, ln_hh_weight, output, workspace,
                  batch_sizes.value_or(at::Tensor()), zoneout.value_or(at::Tensor()),
                  recurrent_mask.value_or(at::Tensor())});
    return {output, hy, workspace};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static auto op = find_op<LnGruBackward>("genfast::layernorm_gru_backward");
    const variable_list saved = ctx->get_saved_variables();
    const at::Tensor &input = saved[0], &hx = saved[1], &w_ih = saved[2], &w_hh = saved[3], &ln_ih = saved[4],
                     &ln_hh = saved[5], &output = saved[6], &workspace = saved[7], &batch_sizes = saved[8],
                     &zoneout = saved[9], &recurrent_mask = saved[10];
    check_workspace(workspace, "layernorm_gru_forward");
    auto [grad_input, grad_hx, grad_w_ih, grad_w_hh, grad_b_ih, grad_b_hh, grad_ln_ih, grad_ln_hh] =
        op.call(zeros_if_undefined(grads[0], output), zeros_if_undefined(grads[1], hx), input, hx, w_ih, w_hh, ln_ih,
                ln_hh, output, workspace, optional_of(batch_sizes), ctx->saved_data["reverse"].toBool(),
                optional_of(zoneout), optional_of(recurrent_mask), needs_input_grad(ctx));
    return {input_grad_if_needed(ctx, grad_input),
            grad_hx,
            grad_w_ih,
            grad_w_hh,
            if_bias(ctx, grad_b_ih),
            if_bias(ctx, grad_b_hh),
            grad_ln_ih,
            grad_ln_hh,
            at::Tensor(),   // batch_sizes
            at::Tensor(),   // reverse
            at::Tensor(),   // train
            at::Tensor(),   // zoneout
            at::Tensor()};  // recurrent_mask
  }
};

LnGruOutputs layernorm_gru_forward_autograd(const at::Tensor& input, const at::Tensor& hx, const at::Tensor& w_ih,
                                            const at::Tensor& w_hh, const OptTensor& b_ih, const OptTensor& b_hh,
                                            const at::Tensor& ln_ih_weight, const at::Tensor& ln_hh_weight,
                                            const OptTensor& batch_sizes, bool reverse, bool train,
                                            const OptTensor& zoneout, const OptTensor& recurrent_mask) {
  const variable_list out = LayerNormGRUFunction::apply(input, hx, w_ih, w_hh, b_ih, b_hh, ln_ih_weight, ln_hh_weight,
                                                        batch_sizes, reverse, train, zoneout, recurrent_mask);
  return {out[0], out[1], out[2]};
}

}  // namespace

TORCH_LIBRARY_IMPL(genfast, Autograd, m) {
  m.impl("layernorm_lstm_forward", &layernorm_lstm_forward_autograd);
  m.impl("layernorm_gru_forward", &layernorm_gru_forward_autograd);
}

}  // namespace genfast
