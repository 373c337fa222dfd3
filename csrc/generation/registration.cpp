// The schemas of generation's operators, declared apart from the core's (csrc/registration.cpp)
// as a fragment of the same torch.ops.genfast namespace. Each CPU kernel registers itself next to
// its code (csrc/generation/<op>.cpp); the CUDA kernels are Triton, registered from
// genfast/generation/ops/<op>.py, which also holds the fake kernels. None of these ops has a
// backward: they serve inference (their callers in genfast/generation send autograd calls elsewhere).
#include <torch/library.h>

TORCH_LIBRARY_FRAGMENT(genfast, m) {
  // ---- sampling (sampling.cpp) --------------------------------------------------------
  // logits (N, V) -> scores: logits / temperature, -inf where top-k / top-p remove (HF's warpers).
  m.def("sampling_filter(Tensor logits, float temperature, int top_k, float top_p) -> Tensor");
  // The same filter, then one token per row by inverse CDF at uniforms (N,) in [0, 1) -> int64 (N,).
  m.def("sampling_draw(Tensor logits, Tensor uniforms, float temperature, int top_k, float top_p) -> Tensor");
  // ---- decode attention (decode_attention.cpp): one query token vs a KV cache ---------
  // q (B, Hq, D), caches (B, Hk, max_len, D|Dv), first `length` rows used -> (B, Hq, Dv).
  m.def("decode_attention(Tensor q, Tensor k_cache, Tensor v_cache, int length, float scale) -> Tensor");
  // ---- decode linear (decode_linear.cpp): F.linear for a few rows, W streamed once ----
  // x (M, K), weight (N, K), bias (N,) -> (M, N).
  m.def("decode_linear(Tensor x, Tensor weight, Tensor? bias) -> Tensor");
  // The most rows of x for which decode_linear reads a weight of `weight_bytes` in place (the
  // core matmul's dot-product path, csrc/cpu/gemm.h); callers send more rows to a GEMM.
  m.def("decode_linear_max_rows(int weight_bytes) -> int");
  // ---- GPT-2 decode block (gpt2_decode.cpp): one pre-LN block for one token per row ---
  // x (B, C) -> x after the block; writes k, v of the token into row `position` of the caches
  // (B, n_head, max_len, C / n_head) and attends to rows [0, position]. Weights in nn.Linear's
  // (out, in) layout; activation: gelu_tanh, gelu, relu or silu.
  m.def(
      "gpt2_decode_block(Tensor x, Tensor ln_1_weight, Tensor ln_1_bias, Tensor attn_weight, Tensor attn_bias, "
      "Tensor attn_proj_weight, Tensor attn_proj_bias, Tensor ln_2_weight, Tensor ln_2_bias, Tensor fc_weight, "
      "Tensor fc_bias, Tensor mlp_proj_weight, Tensor mlp_proj_bias, Tensor(a!) k_cache, Tensor(b!) v_cache, "
      "int position, int n_head, float scale, float eps, str activation) -> Tensor");
}
