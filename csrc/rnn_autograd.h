// What the RNN ops' autograd functions (csrc/rnn_autograd.cpp, csrc/rnn_layernorm_autograd.cpp) do around
// their cell-specific argument lists: call the forward op below autograd, save what backward needs, check
// that the forward kept its workspace, and shape the gradients autograd gets back.
#pragma once

#include <torch/autograd.h>

#include <ATen/core/dispatch/Dispatcher.h>

namespace genfast::rnn_autograd {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;
using OptTensor = std::optional<at::Tensor>;

inline at::Tensor zeros_if_undefined(const at::Tensor& grad, const at::Tensor& like) {
  return grad.defined() ? grad : at::zeros_like(like);
}

inline OptTensor optional_of(const at::Tensor& t) { return t.defined() ? OptTensor(t) : std::nullopt; }

template <typename Signature>
c10::TypedOperatorHandle<Signature> find_op(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Signature>();
}

// Gradients of outputs nobody used arrive undefined rather than as zeros: the workspace is as large
// as the saved gates, and zero-filling its gradient every backward is waste.
inline void save_forward(AutogradContext* ctx, const at::Tensor& workspace, bool reverse, bool has_bias,
                         const variable_list& saved) {
  ctx->set_materialize_grads(false);
  ctx->mark_non_differentiable({workspace});
  ctx->saved_data["reverse"] = reverse;
  ctx->saved_data["has_bias"] = has_bias;
  ctx->save_for_backward(saved);
}

inline void check_workspace(const at::Tensor& workspace, const char* op) {
  // sym_numel: under torch.compile with dynamic shapes the size is symbolic.
  TORCH_SYM_CHECK(workspace.sym_numel().sym_ne(0), "genfast::", op, ": backward needs the workspace that ", op,
                  "(..., train=True) fills; this forward ran with train=False (under no_grad, or with no input "
                  "requiring grad)");
}

// The bias gradients as autograd returns them: undefined for a layer without biases.
inline at::Tensor if_bias(AutogradContext* ctx, const at::Tensor& grad) {
  return ctx->saved_data["has_bias"].toBool() ? grad : at::Tensor();
}

// The backward ops skip the input's product when autograd needs no input gradient (the first layer of
// a stack fed by data: backward op argument input_grad=false); what they return in its place is empty,
// and autograd gets no gradient.
inline bool needs_input_grad(AutogradContext* ctx) { return ctx->needs_input_grad(0); }

inline at::Tensor input_grad_if_needed(AutogradContext* ctx, const at::Tensor& grad) {
  return needs_input_grad(ctx) ? grad : at::Tensor();
}

}  // namespace genfast::rnn_autograd
