// Autograd for the attention op, for every device: the CPU kernel (csrc/cpu/attention.cpp) and
// the Triton kernel registered for CUDA (genfast/ops/attention.py) share this one formula.
// In C++ for the reason given in rnn_autograd.cpp: a Python autograd wrapper adds a fixed cost to
// every call, even under no_grad, as large as the kernel of a decode-shaped call (docs/design.md).
//
// The backward recomputes the probabilities from the saved logsumexp (attention_backward).
// Gradients flow to q, k and v; not to attn_mask (genfast.nn.functional.scaled_dot_product_attention
// sends calls whose mask requires grad to torch) and not through logsumexp.
#include <torch/autograd.h>
#include <torch/library.h>

#include <ATen/core/dispatch/Dispatcher.h>

namespace genfast {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;
using OptTensor = std::optional<at::Tensor>;
using AttentionOutputs = std::tuple<at::Tensor, at::Tensor>;
using AttentionGrads = std::tuple<at::Tensor, at::Tensor, at::Tensor>;

struct AttentionFunction : public torch::autograd::Function<AttentionFunction> {
  static variable_list forward(AutogradContext* ctx, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                               const OptTensor& attn_mask, bool is_causal, double scale) {
    static auto op = c10::Dispatcher::singleton()
                         .findSchemaOrThrow("genfast::attention_forward", "")
                         .typed<AttentionOutputs(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                                 const OptTensor&, bool, double)>();
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    auto [out, logsumexp] = op.call(q, k, v, attn_mask, is_causal, scale);
    ctx->mark_non_differentiable({logsumexp});
    ctx->saved_data["is_causal"] = is_causal;
    ctx->saved_data["scale"] = scale;
    ctx->saved_data["mask_requires_grad"] = attn_mask.has_value() && attn_mask->requires_grad();
    ctx->save_for_backward({q, k, v, out, logsumexp, attn_mask.value_or(at::Tensor())});
    return {out, logsumexp};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    TORCH_CHECK(!ctx->saved_data["mask_requires_grad"].toBool(),
                "genfast attention_forward: no gradient for attn_mask; "
                "genfast.nn.functional.scaled_dot_product_attention routes such calls to torch");
    static auto op = c10::Dispatcher::singleton()
                         .findSchemaOrThrow("genfast::attention_backward", "")
                         .typed<AttentionGrads(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                               const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                               const OptTensor&, bool, double)>();
    const variable_list saved = ctx->get_saved_variables();
    const at::Tensor &q = saved[0], &k = saved[1], &v = saved[2], &out = saved[3], &logsumexp = saved[4],
                     &attn_mask = saved[5];
    // grads[0] is materialised (zeros) when the output was unused; grads[1] (logsumexp) is ignored.
    auto [grad_q, grad_k, grad_v] =
        op.call(grads[0].contiguous(), q, k, v, out, logsumexp,
                attn_mask.defined() ? OptTensor(attn_mask) : std::nullopt, ctx->saved_data["is_causal"].toBool(),
                ctx->saved_data["scale"].toDouble());
    return {grad_q, grad_k, grad_v, at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

AttentionOutputs attention_forward_autograd(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                            const OptTensor& attn_mask, bool is_causal, double scale) {
  const variable_list out = AttentionFunction::apply(q, k, v, attn_mask, is_causal, scale);
  return {out[0], out[1]};
}

}  // namespace

TORCH_LIBRARY_IMPL(genfast, Autograd, m) { m.impl("attention_forward", &attention_forward_autograd); }

}  // namespace genfast
