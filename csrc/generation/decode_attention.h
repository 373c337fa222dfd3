// The CPU decode-attention kernel (csrc/generation/decode_attention.cpp), for other CPU kernels that
// run it inside a fused step (csrc/generation/gpt2_decode.cpp).
#pragma once

#include <ATen/ATen.h>

namespace genfast::generation::decode_attention {

// softmax(scale * K[:length] q) V[:length] for q (B, Hq, D) and caches (B, Hk, max_len, D|Dv) -> (B, Hq, Dv).
at::Tensor decode_attention(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                            int64_t length, double scale);

}  // namespace genfast::generation::decode_attention
