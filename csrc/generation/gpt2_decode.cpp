// One GPT-2 block for one new token per row (the decode step of generation), on the CPU:
//
//   h = LN_1(x);  q, k, v = h W_attn^T + b;  cache[position] = k, v
//   x = x + attention(q, cache[:position + 1]) W_proj^T + b
//   x = x + act(LN_2(x) W_fc^T + b) W_mlp^T + b
//
// At batch 1 the step is bound by reading the weights once (genfast's matmul, whose few-row
// path streams each weight at memory bandwidth), and what else it does is a few thousand
// flops. Why one op and not a dozen torch ops from Python: the per-op dispatch and interpreter
// overhead of that little else is a large share of a token (docs/design.md); here it is plain
// loops between the weight reads.
// Inference only (no autograd); float32 and float64, few rows (see genfast/generation/ops/gpt2_decode.py).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <torch/library.h>

#include <cmath>
#include <string>
#include <type_traits>

#include "generation/decode_attention.h"
#include "cpu/gemm.h"
#include "fast_math.h"

namespace genfast::generation::gpt2_decode {
namespace {

enum class Activation { kGeluTanh, kGelu, kRelu, kSilu };

Activation parse_activation(const std::string& name) {
  if (name == "gelu_tanh") return Activation::kGeluTanh;
  if (name == "gelu") return Activation::kGelu;
  if (name == "relu") return Activation::kRelu;
  if (name == "silu") return Activation::kSilu;
  TORCH_CHECK(false, "gpt2_decode_block: activation must be one of gelu_tanh, gelu, relu, silu; got '", name, "'");
}

template <typename T>
T activate(T x, Activation act) {
  switch (act) {
    case Activation::kGeluTanh: {
      constexpr double kSqrt2OverPi = 0.7978845608028654;
      return T(0.5) * x * (T(1) + std::tanh(T(kSqrt2OverPi) * (x + T(0.044715) * x * x * x)));
    }
    case Activation::kGelu: return T(0.5) * x * (T(1) + std::erf(x * T(M_SQRT1_2)));
    case Activation::kRelu: return x > T(0) ? x : T(0);
    case Activation::kSilu: return x / (T(1) + std::exp(-x));
  }
  return x;
}

// x = act(x) over n values. float's tanh-GELU is the same function written as a sigmoid,
// 0.5 x (1 + tanh(u)) = x / (1 + exp(-2u)), with genfast's polynomial exp, so the loop
// vectorises (std::tanh per element does not). The sigmoid form also has no cancellation where
// tanh(u) nears -1 (large negative x). Error: a few ulp of the result (exp_fast's ~2 ulp, one
// add, one divide).
template <typename T>
void activate_all(T* x, int64_t n, Activation act) {
  if constexpr (std::is_same_v<T, float>) {
    if (act == Activation::kGeluTanh) {
      constexpr float kMinus2Sqrt2OverPi = -2.0f * 0.7978845608028654f;
#pragma omp simd
      for (int64_t i = 0; i < n; ++i) {
        const float v = x[i];
        x[i] = v / (1.0f + genfast::math::exp_fast(kMinus2Sqrt2OverPi * (v + 0.044715f * v * v * v)));
      }
      return;
    }
  }
  for (int64_t i = 0; i < n; ++i) x[i] = activate<T>(x[i], act);
}

// out[m] = (x[m] - mean) / sqrt(var + eps) * weight + bias for each of `rows` rows of C values
// (biased variance, as torch.nn.LayerNorm), with the statistics accumulated in double.
template <typename T>
void layer_norm(const T* x, const T* weight, const T* bias, double eps, int64_t rows, int64_t C, T* out) {
  for (int64_t m = 0; m < rows; ++m) {
    const T* row = x + m * C;
    double sum = 0;
    for (int64_t c = 0; c < C; ++c) sum += row[c];
    const double mean = sum / C;
    double square = 0;
    for (int64_t c = 0; c < C; ++c) square += (row[c] - mean) * (row[c] - mean);
    const T inv = static_cast<T>(1.0 / std::sqrt(square / C + eps));
    const T mu = static_cast<T>(mean);
    for (int64_t c = 0; c < C; ++c) out[m * C + c] = (row[c] - mu) * inv * weight[c] + bias[c];
  }
}

// y (rows, N) = x (rows, K) W^T + b, W in nn.Linear's (N, K) layout.
template <typename T>
void linear(const T* x, const at::Tensor& weight, const at::Tensor& bias, int64_t rows, T* y) {
  const int64_t N = weight.size(0), K = weight.size(1);
  cpu::matmul<T>(rows, N, K, x, K, weight.const_data_ptr<T>(), 1, K, bias.const_data_ptr<T>(), y, N);
}

void check_parameter(const at::Tensor& t, const char* name, const at::Tensor& x) {
  TORCH_CHECK(t.scalar_type() == x.scalar_type() && t.device().is_cpu(), "gpt2_decode_block: ", name,
              " must be a CPU tensor of x's dtype (", x.scalar_type(), "), got ", t.scalar_type(), " on ", t.device());
  TORCH_CHECK(t.is_contiguous(), "gpt2_decode_block: ", name, " must be contiguous");
}

void check_vector(const at::Tensor& t, const char* name, int64_t size, const at::Tensor& x) {
  TORCH_CHECK(t.dim() == 1 && t.size(0) == size, "gpt2_decode_block: ", name, " must be (", size, ",), got ",
              t.sizes());
  check_parameter(t, name, x);
}

void check_linear(const at::Tensor& weight, const at::Tensor& bias, const std::string& name, int64_t out,
                  int64_t in, const at::Tensor& x) {
  const std::string weight_name = name + "_weight", bias_name = name + "_bias";
  TORCH_CHECK(weight.dim() == 2 && weight.size(0) == out && weight.size(1) == in, "gpt2_decode_block: ",
              weight_name, " must be (", out, ", ", in, "), got ", weight.sizes());
  check_parameter(weight, weight_name.c_str(), x);
  check_vector(bias, bias_name.c_str(), out, x);
}

}  // namespace

at::Tensor gpt2_decode_block(const at::Tensor& x, const at::Tensor& ln_1_weight, const at::Tensor& ln_1_bias,
                             const at::Tensor& attn_weight, const at::Tensor& attn_bias,
                             const at::Tensor& attn_proj_weight, const at::Tensor& attn_proj_bias,
                             const at::Tensor& ln_2_weight, const at::Tensor& ln_2_bias, const at::Tensor& fc_weight,
                             const at::Tensor& fc_bias, const at::Tensor& mlp_proj_weight,
                             const at::Tensor& mlp_proj_bias, at::Tensor& k_cache, at::Tensor& v_cache,
                             int64_t position, int64_t n_head, double scale, double eps,
                             const std::string& activation) {
  TORCH_CHECK(x.dim() == 2, "gpt2_decode_block: x must be (rows, n_embd), got ", x.dim(), " dims");
  TORCH_CHECK(x.device().is_cpu(), "gpt2_decode_block: x must be a CPU tensor, got ", x.device());
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble,
              "gpt2_decode_block: x must be float32 or float64, got ", x.scalar_type());
  const int64_t rows = x.size(0), C = x.size(1);
  TORCH_CHECK(rows > 0, "gpt2_decode_block: x has no rows");
  TORCH_CHECK(n_head > 0 && C % n_head == 0, "gpt2_decode_block: n_head (", n_head, ") must divide n_embd (", C,
              ")");
  TORCH_CHECK(fc_weight.dim() == 2, "gpt2_decode_block: fc_weight must be (inner, ", C, "), got ", fc_weight.sizes());
  const int64_t D = C / n_head, inner = fc_weight.size(0);
  check_vector(ln_1_weight, "ln_1_weight", C, x);
  check_vector(ln_1_bias, "ln_1_bias", C, x);
  check_vector(ln_2_weight, "ln_2_weight", C, x);
  check_vector(ln_2_bias, "ln_2_bias", C, x);
  check_linear(attn_weight, attn_bias, "attn", 3 * C, C, x);
  check_linear(attn_proj_weight, attn_proj_bias, "attn_proj", C, C, x);
  check_linear(fc_weight, fc_bias, "fc", inner, C, x);
  check_linear(mlp_proj_weight, mlp_proj_bias, "mlp_proj", C, inner, x);
  for (const at::Tensor* cache : {&k_cache, &v_cache}) {
    TORCH_CHECK(cache->dim() == 4 && cache->size(0) == rows && cache->size(1) == n_head && cache->size(3) == D,
                "gpt2_decode_block: k_cache and v_cache must be (", rows, ", ", n_head, ", max_len, ", D, "), got ",
                cache->sizes());
    TORCH_CHECK(cache->scalar_type() == x.scalar_type() && cache->device().is_cpu(),
                "gpt2_decode_block: the caches must be CPU tensors of x's dtype");
    TORCH_CHECK(cache->stride(3) == 1, "gpt2_decode_block: the caches must be contiguous in their last dim");
  }
  TORCH_CHECK(position >= 0 && position < k_cache.size(2) && v_cache.size(2) == k_cache.size(2),
              "gpt2_decode_block: position must be in [0, max_len=", k_cache.size(2), "), got ", position);
  const Activation act = parse_activation(activation);

  const at::Tensor input = x.contiguous();
  at::Tensor out = at::empty({rows, C}, x.options());
  at::Tensor normed = at::empty({rows, C}, x.options());
  at::Tensor qkv = at::empty({rows, 3 * C}, x.options());
  at::Tensor hidden = at::empty({rows, inner}, x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "gpt2_decode_block", [&] {
    using T = scalar_t;
    const T* x_in = input.const_data_ptr<T>();
    T* y = out.mutable_data_ptr<T>();
    T* h = normed.mutable_data_ptr<T>();
    T* f = hidden.mutable_data_ptr<T>();
    // Attention: the new token's key and value go into the cache row `position`, then its
    // query attends to rows [0, position].
    layer_norm<T>(x_in, ln_1_weight.const_data_ptr<T>(), ln_1_bias.const_data_ptr<T>(), eps, rows, C, h);
    linear<T>(h, attn_weight, attn_bias, rows, qkv.mutable_data_ptr<T>());
    const T* q_k_v = qkv.const_data_ptr<T>();
    for (int64_t m = 0; m < rows; ++m)
      for (int64_t head = 0; head < n_head; ++head) {
        T* k_row = k_cache.mutable_data_ptr<T>() + m * k_cache.stride(0) + head * k_cache.stride(1) +
                   position * k_cache.stride(2);
        T* v_row = v_cache.mutable_data_ptr<T>() + m * v_cache.stride(0) + head * v_cache.stride(1) +
                   position * v_cache.stride(2);
        std::copy_n(q_k_v + m * 3 * C + C + head * D, D, k_row);
        std::copy_n(q_k_v + m * 3 * C + 2 * C + head * D, D, v_row);
      }
    const at::Tensor q = qkv.view({rows, 3, n_head, D}).select(1, 0);
    const at::Tensor attended = decode_attention::decode_attention(q, k_cache, v_cache, position + 1, scale);
    linear<T>(attended.const_data_ptr<T>(), attn_proj_weight, attn_proj_bias, rows, y);
    for (int64_t i = 0; i < rows * C; ++i) y[i] += x_in[i];
    // MLP.
    layer_norm<T>(y, ln_2_weight.const_data_ptr<T>(), ln_2_bias.const_data_ptr<T>(), eps, rows, C, h);
    linear<T>(h, fc_weight, fc_bias, rows, f);
    activate_all<T>(f, rows * inner, act);
    linear<T>(f, mlp_proj_weight, mlp_proj_bias, rows, h);
    for (int64_t i = 0; i < rows * C; ++i) y[i] += h[i];
  });
  return out;
}

}  // namespace genfast::generation::gpt2_decode

TORCH_LIBRARY_IMPL(genfast, CPU, m) {
  m.impl("gpt2_decode_block", &genfast::generation::gpt2_decode::gpt2_decode_block);
}
