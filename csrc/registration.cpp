// The one place the core's operator schemas are declared (TORCH_LIBRARY: the RNN and attention
// ops), plus the tiny pybind11 module that lets Python load this library and ask what was built.
// Generation's ops (sampling, decode attention, decode linear, the GPT-2 decode block) declare
// theirs apart, in csrc/generation/registration.cpp; nothing here refers to them.
//
// Each backend's kernel registers itself to the op, next to the kernel:
//   CPU    csrc/cpu/<op>.cpp         TORCH_LIBRARY_IMPL(genfast, CPU, m)
//   CUDA   csrc/cuda/<op>_glue.cpp   TORCH_LIBRARY_IMPL(genfast, CUDA, m)
//          or a Triton kernel: torch.library.register_kernel(..., "cuda") in genfast/ops/<op>.py
// Autograd: csrc/rnn_autograd.cpp for the RNN ops, csrc/attention_autograd.cpp for attention
// (every device). Fake (meta) kernels are registered from Python in genfast/ops/<op>.py.
#include <torch/extension.h>
#include <torch/library.h>

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
      "Tensor? b_ih, Tensor? b_hh, Tensor? w_hr, Tensor? batch_sizes, bool reverse, bool train, "
      "Tensor? zoneout=None, Tensor? cell_zoneout=None, Tensor? recurrent_mask=None) "
      "-> (Tensor output, Tensor hy, Tensor cy, Tensor workspace)");
  m.def(
      "lstm_backward(Tensor grad_output, Tensor grad_hy, Tensor grad_cy, Tensor input, Tensor hx, "
      "Tensor cx, Tensor w_ih, Tensor w_hh, Tensor? w_hr, Tensor output, Tensor workspace, "
      "Tensor? batch_sizes, bool reverse, Tensor? zoneout=None, Tensor? cell_zoneout=None, "
      "Tensor? recurrent_mask=None, bool input_grad=True) "
      "-> (Tensor grad_input, Tensor grad_hx, Tensor grad_cx, Tensor grad_w_ih, Tensor grad_w_hh, "
      "Tensor grad_bias, Tensor grad_w_hr)");
  // ---- GRU (PyTorch convention: gates r, z, n; n = tanh(Wx + b_in + r*(W_hn h + b_hn))) --
  m.def(
      "gru_forward(Tensor input, Tensor hx, Tensor w_ih, Tensor w_hh, Tensor? b_ih, Tensor? b_hh, "
      "Tensor? batch_sizes, bool reverse, bool train, Tensor? zoneout=None, Tensor? recurrent_mask=None) "
      "-> (Tensor output, Tensor hy, Tensor workspace)");
  m.def(
      "gru_backward(Tensor grad_output, Tensor grad_hy, Tensor input, Tensor hx, Tensor w_ih, "
      "Tensor w_hh, Tensor output, Tensor workspace, Tensor? batch_sizes, bool reverse, Tensor? zoneout=None, "
      "Tensor? recurrent_mask=None, bool input_grad=True) "
      "-> (Tensor grad_input, Tensor grad_hx, Tensor grad_w_ih, Tensor grad_w_hh, Tensor grad_b_ih, "
      "Tensor grad_b_hh)");
  // input_grad=False (every RNN backward op): the caller needs no gradient for the input, so its product
  // (dG W_ih, a sixth of a layer's training FLOPs at I = H) is skipped and grad_input is empty (0 elements).
  // Regularisers (every RNN op; docs/design.md "Regularisers", csrc/rnn/regularizers_host.h), each
  // optional: zoneout (S, H) the weight of h_{t-1} in h_t per row of the sequence (a 0/1 draw in
  // training, the probability in eval); cell_zoneout (S, H) the same for c; recurrent_mask (N, Hout)
  // multiplies h_{t-1} in the recurrent product. Under cell_zoneout the training workspace holds one
  // more (S, H) block, the carried c_t. The backward takes the forward's masks.
  // ---- GRU with the reset gate before the recurrent product (Keras' reset_after=False; rnn::GruResetBeforeCell):
  // n = tanh(W_in x + b_in + W_hn (r*h) + b_hn); gates and parameters otherwise as gru_*. Every gate's
  // pre-activation is input side + recurrent side, so one gradient serves b_ih and b_hh (grad_bias).
  // Regularisers as gru_*: recurrent_mask multiplies h_{t-1} where it enters both products, so W_hn
  // reads r * (h_{t-1} * recurrent_mask); z * h_{t-1} keeps the carried h.
  // Kernels: csrc/cpu/gru_reset_before.cpp, csrc/cuda/gru_reset_before_glue.cpp.
  m.def(
      "gru_reset_before_forward(Tensor input, Tensor hx, Tensor w_ih, Tensor w_hh, Tensor? b_ih, Tensor? b_hh, "
      "Tensor? batch_sizes, bool reverse, bool train, Tensor? zoneout=None, Tensor? recurrent_mask=None) "
      "-> (Tensor output, Tensor hy, Tensor workspace)");
  m.def(
      "gru_reset_before_backward(Tensor grad_output, Tensor grad_hy, Tensor input, Tensor hx, Tensor w_ih, "
      "Tensor w_hh, Tensor output, Tensor workspace, Tensor? batch_sizes, bool reverse, Tensor? zoneout=None, "
      "Tensor? recurrent_mask=None, bool input_grad=True) "
      "-> (Tensor grad_input, Tensor grad_hx, Tensor grad_w_ih, Tensor grad_w_hh, Tensor grad_bias)");
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
  m.def("cuda_built", &cuda_built, "whether the CUDA kernels were compiled in");
  m.def("cpu_cache_bytes", [] { return genfast::cpu::BufferCache::instance().cached_bytes(); },
        "bytes of freed large CPU buffers held for reuse (csrc/cpu/memory.h)");
  m.def("cpu_cache_limit_bytes", [] { return genfast::cpu::BufferCache::instance().limit_bytes(); },
        "the most the CPU buffer cache holds (GENFAST_CPU_CACHE_MB)");
  m.def("empty_cpu_cache", [] { genfast::cpu::BufferCache::instance().clear(); },
        "frees the cached CPU buffers (genfast.empty_cache())");
  m.def("rnn_workspace_values_per_row", &genfast::rnn::workspace_values_per_row, "H-wide values an RNN training workspace holds per row (csrc/rnn/cells.h)", pybind11::arg("cell"), pybind11::arg("projected"));
  m.def("cuda_archs", &cuda_archs, "CUDA architectures the kernels were compiled for");
}
