// The one place genfast's operator schemas are declared (TORCH_LIBRARY), plus the
// tiny pybind11 module that lets Python load this library and ask what was built.
//
// Implementations register themselves next to their kernels:
//   csrc/cpu/<op>.cpp   TORCH_LIBRARY_IMPL(genfast, CPU, m)
//   csrc/cuda/<op>_glue.cpp  TORCH_LIBRARY_IMPL(genfast, CUDA, m)
// Autograd: csrc/rnn_autograd.cpp for the RNN ops, csrc/attention_autograd.cpp for attention.
// Fake (meta) kernels are registered from Python in genfast/ops/.
#include <torch/extension.h>
#include <torch/library.h>

#include "cpu/gemm.h"
#include "cpu/memory.h"
#include "cpu/simd.h"
#include "rnn/rnn_host.h"

TORCH_LIBRARY(genfast, m) {
  // ---- LSTM: one layer, one direction, the whole sequence -------------------------
  // input: (T, N, I) padded, or (S, I) packed with batch_sizes (int64, CPU, length T).
  // workspace: what backward needs (empty unless `train`); its layout is the cell's (csrc/rnn/cells.h),
  // the same on every backend. Kernels: csrc/cpu/rnn.cpp, csrc/cuda/rnn_glue.cpp.
  m.def(
      "lstm_forward(Tensor input, Tensor hx, Tensor cx, Tensor w_ih, Tensor w_hh, "
      "Tensor? b_ih, Tensor? b_hh, Tensor? w_hr, Tensor? batch_sizes, bool reverse, bool train) "
      "-> (Tensor output, Tensor hy, Tensor cy, Tensor workspace)");
  m.def(
      "lstm_backward(Tensor grad_output, Tensor grad_hy, Tensor grad_cy, Tensor input, Tensor hx, "
      "Tensor cx, Tensor w_ih, Tensor w_hh, Tensor? w_hr, Tensor output, Tensor workspace, "
      "Tensor? batch_sizes, bool reverse) "
      "-> (Tensor grad_input, Tensor grad_hx, Tensor grad_cx, Tensor grad_w_ih, Tensor grad_w_hh, "
      "Tensor grad_bias, Tensor grad_w_hr)");
  // ---- GRU (PyTorch convention: gates r, z, n; n = tanh(Wx + b_in + r*(W_hn h + b_hn))) --
  m.def(
      "gru_forward(Tensor input, Tensor hx, Tensor w_ih, Tensor w_hh, Tensor? b_ih, Tensor? b_hh, "
      "Tensor? batch_sizes, bool reverse, bool train) -> (Tensor output, Tensor hy, Tensor workspace)");
  m.def(
      "gru_backward(Tensor grad_output, Tensor grad_hy, Tensor input, Tensor hx, Tensor w_ih, "
      "Tensor w_hh, Tensor output, Tensor workspace, Tensor? batch_sizes, bool reverse) "
      "-> (Tensor grad_input, Tensor grad_hx, Tensor grad_w_ih, Tensor grad_w_hh, Tensor grad_b_ih, "
      "Tensor grad_b_hh)");
  // ---- attention (csrc/cpu/attention.cpp) ------------------------------------------
  // ATTENTION_SCHEMAS
  // q (B, Hq, Lq, D), k (B, Hk, Lk, D), v (B, Hk, Lk, Dv) with Hq % Hk == 0 (GQA when unequal);
  // attn_mask bool (true = keep) or additive with q's dtype, broadcastable to (B, Hq, Lq, Lk);
  // causal is top-left aligned. logsumexp (B, Hq, Lq) is float32 for half inputs, else q's dtype.
  m.def(
      "attention_forward(Tensor q, Tensor k, Tensor v, Tensor? attn_mask, bool is_causal, float scale) "
      "-> (Tensor out, Tensor logsumexp)");
  m.def(
      "attention_backward(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor out, Tensor logsumexp, "
      "Tensor? attn_mask, bool is_causal, float scale) -> (Tensor grad_q, Tensor grad_k, Tensor grad_v)");
  // ---- sampling (csrc/cpu/sampling.cpp) --------------------------------------------
  // SAMPLING_SCHEMAS
  // logits (N, V) -> scores: logits / temperature, -inf where top-k / top-p remove (HF's warpers).
  m.def("sampling_filter(Tensor logits, float temperature, int top_k, float top_p) -> Tensor");
  // The same filter, then one token per row by inverse CDF at uniforms (N,) in [0, 1) -> int64 (N,).
  m.def("sampling_draw(Tensor logits, Tensor uniforms, float temperature, int top_k, float top_p) -> Tensor");
  // ---- decode attention (csrc/cpu/decode_attention.cpp): one query token vs a KV cache ---
  // q (B, Hq, D), caches (B, Hk, max_len, D|Dv), first `length` rows used -> (B, Hq, Dv).
  m.def("decode_attention(Tensor q, Tensor k_cache, Tensor v_cache, int length, float scale) -> Tensor");
  // ---- decode linear (csrc/cpu/decode_linear.cpp): F.linear for a few rows, W streamed once --
  // x (M, K), weight (N, K), bias (N,) -> (M, N).
  m.def("decode_linear(Tensor x, Tensor weight, Tensor? bias) -> Tensor");
  // ---- GPT-2 decode block (csrc/cpu/gpt2_decode.cpp): one pre-LN block for one token per row --
  // x (B, C) -> x after the block; writes k, v of the token into row `position` of the caches
  // (B, n_head, max_len, C / n_head) and attends to rows [0, position]. Weights in nn.Linear's
  // (out, in) layout; activation: gelu_tanh, gelu, relu or silu.
  m.def(
      "gpt2_decode_block(Tensor x, Tensor ln_1_weight, Tensor ln_1_bias, Tensor attn_weight, Tensor attn_bias, "
      "Tensor attn_proj_weight, Tensor attn_proj_bias, Tensor ln_2_weight, Tensor ln_2_bias, Tensor fc_weight, "
      "Tensor fc_bias, Tensor mlp_proj_weight, Tensor mlp_proj_bias, Tensor(a!) k_cache, Tensor(b!) v_cache, "
      "int position, int n_head, float scale, float eps, str activation) -> Tensor");
}

namespace {

bool cuda_built() {
#ifdef GENFAST_WITH_CUDA
  return true;
#else
  return false;
#endif
}

std::string cuda_archs() {
#ifdef GENFAST_CUDA_ARCHS
  return GENFAST_CUDA_ARCHS;
#else
  return "";
#endif
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "genfast compiled kernels; the operators live in torch.ops.genfast";
  m.def("simd_level", &genfast::cpu::simd_level_name, "SIMD level the CPU kernels dispatch to on this CPU");
  m.def("packed_gemm_gflops", &genfast::cpu::packed_gemm_gflops, "GFLOP/s of the RNN kernels' packed GEMM on M x N x K fp32",
        pybind11::arg("M"), pybind11::arg("N"), pybind11::arg("K"), pybind11::arg("repeats") = 5);
  m.def("cuda_built", &cuda_built, "whether the CUDA kernels were compiled in");
  m.def("dot_path_max_rows", &genfast::cpu::dot_path_max_rows,
        "the most rows for which the CPU matmul reads a weight of `bytes` in place (csrc/cpu/gemm.h)",
        pybind11::arg("bytes"));
  m.def("cpu_cache_bytes", [] { return genfast::cpu::BufferCache::instance().cached_bytes(); },
        "bytes of freed large CPU buffers held for reuse (csrc/cpu/memory.h)");
  m.def("cpu_cache_limit_bytes", [] { return genfast::cpu::BufferCache::instance().limit_bytes(); },
        "the most the CPU buffer cache holds (GENFAST_CPU_CACHE_MB)");
  m.def("empty_cpu_cache", [] { genfast::cpu::BufferCache::instance().clear(); },
        "frees the cached CPU buffers (genfast.empty_cache())");
  m.def("rnn_workspace_values_per_row", &genfast::rnn::workspace_values_per_row, "H-wide values an RNN training workspace holds per row (csrc/rnn/cells.h)", pybind11::arg("cell"), pybind11::arg("projected"));
  m.def("cuda_archs", &cuda_archs, "CUDA architectures the kernels were compiled for");
}
