// The schemas of variable-length attention (issue 23), a fragment of torch.ops.genfast declared
// apart from the core's (csrc/registration.cpp). Kernels: csrc/cpu/attention.cpp (CPU; CUDA runs
// genfast.kernels.flash_attention.flash_attention_varlen from Python); autograd:
// csrc/attention_varlen_autograd.cpp; fake kernels: genfast/ops/attention_varlen.py.
#include <torch/library.h>

TORCH_LIBRARY_FRAGMENT(genfast, m) {
  // FlashAttention-2's packed layout: q (total_q, Hq, D), k (total_k, Hk, D), v (total_k, Hk, Dv) with
  // Hq % Hk == 0; sequence b owns rows [cu_seqlens[b], cu_seqlens[b + 1]) (int32, B + 1 offsets from 0).
  // Causal and the window (left, right; -1 unbounded) are aligned bottom-right: query i of a sequence
  // sees keys j with i + Lk - Lq - left <= j <= i + Lk - Lq + right (causal: right = 0). Dropout (p > 0)
  // draws its mask from dropout_seed (one int64) in the kernel; the backward draws the same one.
  // out (total_q, Hq, Dv); logsumexp (Hq, total_q), float32 for half inputs, else q's dtype.
  m.def(
      "attention_varlen_forward(Tensor q, Tensor k, Tensor v, Tensor cu_seqlens_q, Tensor cu_seqlens_k, "
      "int max_seqlen_q, int max_seqlen_k, bool causal, float scale, int window_left, int window_right, "
      "float dropout_p, Tensor? dropout_seed) -> (Tensor out, Tensor logsumexp)");
  m.def(
      "attention_varlen_backward(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor out, Tensor logsumexp, "
      "Tensor cu_seqlens_q, Tensor cu_seqlens_k, int max_seqlen_q, int max_seqlen_k, bool causal, float scale, "
      "int window_left, int window_right, float dropout_p, Tensor? dropout_seed) "
      "-> (Tensor grad_q, Tensor grad_k, Tensor grad_v)");
  // The dropout multipliers (0 or 1 / (1 - p), float64, (batch, heads, len_q, len_k)) that the attention
  // kernels draw for a seed, positions counted within each sequence: a test hook.
  m.def(
      "attention_dropout_mask(int batch, int heads, int len_q, int len_k, float dropout_p, Tensor dropout_seed) "
      "-> Tensor");
}
