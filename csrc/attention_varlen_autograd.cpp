// Autograd for variable-length attention (attention_varlen_forward), in C++ like the dense op's
// (csrc/attention_autograd.cpp). The backward recomputes the probabilities from the saved
// logsumexp and, under dropout, draws the same mask again from the saved seed. Gradients flow to
// q, k and v.
#include <torch/autograd.h>
#include <torch/library.h>

#include <ATen/core/dispatch/Dispatcher.h>

namespace genfast {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;
using OptTensor = std::optional<at::Tensor>;
using VarlenOutputs = std::tuple<at::Tensor, at::Tensor>;
using VarlenGrads = std::tuple<at::Tensor, at::Tensor, at::Tensor>;

struct VarlenAttentionFunction : public torch::autograd::Function<VarlenAttentionFunction> {
  static variable_list forward(AutogradContext* ctx, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                               const at::Tensor& cu_q, const at::Tensor& cu_k, int64_t max_q, int64_t max_k,
                               bool causal, double scale, int64_t window_left, int64_t window_right,
                               double dropout_p, const OptTensor& dropout_seed) {
    static auto op = c10::Dispatcher::singleton()
                         .findSchemaOrThrow("genfast::attention_varlen_forward", "")
                         .typed<VarlenOutputs(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                              const at::Tensor&, const at::Tensor&, int64_t, int64_t, bool, double,
                                              int64_t, int64_t, double, const OptTensor&)>();
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    auto [out, logsumexp] =
        op.call(q, k, v, cu_q, cu_k, max_q, max_k, causal, scale, window_left, window_right, dropout_p, dropout_seed);
    ctx->mark_non_differentiable({logsumexp});
    ctx->saved_data["max_q"] = max_q;
    ctx->saved_data["max_k"] = max_k;
    ctx->saved_data["causal"] = causal;
    ctx->saved_data["scale"] = scale;
    ctx->saved_data["window_left"] = window_left;
    ctx->saved_data["window_right"] = window_right;
    ctx->saved_data["dropout_p"] = dropout_p;
    ctx->save_for_backward({q, k, v, out, logsumexp, cu_q, cu_k, dropout_seed.value_or(at::Tensor())});
    return {out, logsumexp};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static auto op = c10::Dispatcher::singleton()
                         .findSchemaOrThrow("genfast::attention_varlen_backward", "")
                         .typed<VarlenGrads(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                            const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                            const at::Tensor&, const at::Tensor&, int64_t, int64_t, bool, double,
                                            int64_t, int64_t, double, const OptTensor&)>();
    const variable_list saved = ctx->get_saved_variables();
    const at::Tensor& seed = saved[7];
    auto [grad_q, grad_k, grad_v] = op.call(
        grads[0].contiguous(), saved[0], saved[1], saved[2], saved[3], saved[4], saved[5], saved[6],
        ctx->saved_data["max_q"].toInt(), ctx->saved_data["max_k"].toInt(), ctx->saved_data["causal"].toBool(),
        ctx->saved_data["scale"].toDouble(), ctx->saved_data["window_left"].toInt(),
        ctx->saved_data["window_right"].toInt(), ctx->saved_data["dropout_p"].toDouble(),
        seed.defined() ? OptTensor(seed) : std::nullopt);
    return {grad_q,       grad_k,       grad_v,       at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(),
            at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

VarlenOutputs attention_varlen_forward_autograd(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                                const at::Tensor& cu_q, const at::Tensor& cu_k, int64_t max_q,
                                                int64_t max_k, bool causal, double scale, int64_t window_left,
                                                int64_t window_right, double dropout_p, const OptTensor& seed) {
  const variable_list out = VarlenAttentionFunction::apply(q, k, v, cu_q, cu_k, max_q, max_k, causal, scale,
                                                           window_left, window_right, dropout_p, seed);
  return {out[0], out[1]};
}

}  // namespace

TORCH_LIBRARY_IMPL(genfast, Autograd, m) { m.impl("attention_varlen_forward", &attention_varlen_forward_autograd); }

}  // namespace genfast
