// Attention of one new query token per (batch, head) against a preallocated KV cache:
// the decode step of autoregressive generation.
//
//   out[b, h] = softmax(scale * K[b, g, :length] q[b, h]) V[b, g, :length],  g = h / (Hq / Hk)
//
// The cache is (B, Hk, max_len, D) and only its first `length` rows are read, so the
// caller passes the whole buffer (no slicing, no copy). One (batch, head) is a few
// thousand multiply-adds, so small problems run on the calling thread: an OpenMP
// fork/join would cost more than the work. Inference only (no autograd).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <type_traits>
#include <vector>

namespace genfast::cpu::decode_attention {

namespace {

template <typename T>
using acc_t = std::conditional_t<std::is_same_v<T, double>, double, float>;

// Below this many cache elements read per call, stay on one thread.
constexpr int64_t kSerialElements = 1 << 18;

}  // namespace

at::Tensor decode_attention(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                            int64_t length, double scale) {
  TORCH_CHECK(q.dim() == 3, "decode_attention: q must be (batch, heads, dim), got ", q.dim(), " dims");
  TORCH_CHECK(k_cache.dim() == 4, "decode_attention: k_cache must be (batch, heads_kv, max_len, dim), got ",
              k_cache.dim(), " dims");
  TORCH_CHECK(v_cache.dim() == 4, "decode_attention: v_cache must be (batch, heads_kv, max_len, dim_v), got ",
              v_cache.dim(), " dims");
  TORCH_CHECK(q.device().is_cpu() && k_cache.device().is_cpu() && v_cache.device().is_cpu(),
              "decode_attention: q, k_cache and v_cache must be CPU tensors");
  TORCH_CHECK(at::isFloatingType(q.scalar_type()), "decode_attention: q must be floating point, got ",
              q.scalar_type());
  TORCH_CHECK(k_cache.scalar_type() == q.scalar_type() && v_cache.scalar_type() == q.scalar_type(),
              "decode_attention: q, k_cache and v_cache must share a dtype, got ", q.scalar_type(), ", ",
              k_cache.scalar_type(), " and ", v_cache.scalar_type());
  const int64_t batch = q.size(0), heads_q = q.size(1), dim = q.size(2);
  const int64_t heads_kv = k_cache.size(1), max_len = k_cache.size(2), dim_v = v_cache.size(3);
  TORCH_CHECK(k_cache.size(0) == batch && v_cache.size(0) == batch, "decode_attention: batch of q (", batch,
              "), k_cache (", k_cache.size(0), ") and v_cache (", v_cache.size(0), ") differ");
  TORCH_CHECK(v_cache.size(1) == heads_kv && v_cache.size(2) == max_len,
              "decode_attention: k_cache and v_cache must have the same heads and max_len, got ", k_cache.sizes(),
              " and ", v_cache.sizes());
  TORCH_CHECK(heads_kv > 0 && heads_q % heads_kv == 0, "decode_attention: heads of q (", heads_q,
              ") must be a multiple of the heads of the cache (", heads_kv, ")");
  TORCH_CHECK(k_cache.size(3) == dim, "decode_attention: head dim of q (", dim, ") and k_cache (", k_cache.size(3),
              ") differ");
  TORCH_CHECK(length >= 1 && length <= max_len, "decode_attention: length must be in [1, max_len=", max_len,
              "], got ", length);
  TORCH_CHECK(k_cache.stride(3) == 1 && v_cache.stride(3) == 1,
              "decode_attention: k_cache and v_cache must be contiguous in their last dim");

  const at::Tensor qc = q.contiguous();
  at::Tensor out = at::empty({batch, heads_q, dim_v}, q.options());
  const int64_t group = heads_q / heads_kv;
  const int64_t tasks = batch * heads_q;
  const int64_t work_per_task = std::max<int64_t>(1, length * (dim + dim_v));
  const int64_t grain = std::max<int64_t>(1, kSerialElements / work_per_task);

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "decode_attention", [&] {
    using A = acc_t<scalar_t>;
    const scalar_t* qp = qc.const_data_ptr<scalar_t>();
    const scalar_t* kp = k_cache.const_data_ptr<scalar_t>();
    const scalar_t* vp = v_cache.const_data_ptr<scalar_t>();
    scalar_t* op = out.mutable_data_ptr<scalar_t>();
    const int64_t ks_b = k_cache.stride(0), ks_h = k_cache.stride(1), ks_r = k_cache.stride(2);
    const int64_t vs_b = v_cache.stride(0), vs_h = v_cache.stride(1), vs_r = v_cache.stride(2);
    at::parallel_for(0, tasks, grain, [&](int64_t begin, int64_t end) {
      std::vector<A> query(dim), scores(length), acc(dim_v);
      for (int64_t task = begin; task < end; ++task) {
        const int64_t b = task / heads_q, h = task % heads_q, g = h / group;
        const scalar_t* qrow = qp + task * dim;
        for (int64_t d = 0; d < dim; ++d) query[d] = static_cast<A>(qrow[d]);
        const scalar_t* kbase = kp + b * ks_b + g * ks_h;
        const scalar_t* vbase = vp + b * vs_b + g * vs_h;
        A max_score = -std::numeric_limits<A>::infinity();
        for (int64_t j = 0; j < length; ++j) {
          const scalar_t* krow = kbase + j * ks_r;
          A dot = 0;
          for (int64_t d = 0; d < dim; ++d) dot += query[d] * static_cast<A>(krow[d]);
          scores[j] = dot * static_cast<A>(scale);
          max_score = std::max(max_score, scores[j]);
        }
        std::fill(acc.begin(), acc.end(), A(0));
        A total = 0;
        for (int64_t j = 0; j < length; ++j) {
          const A p = std::exp(scores[j] - max_score);
          total += p;
          const scalar_t* vrow = vbase + j * vs_r;
          for (int64_t d = 0; d < dim_v; ++d) acc[d] += p * static_cast<A>(vrow[d]);
        }
        scalar_t* orow = op + task * dim_v;
        const A inv = A(1) / total;
        for (int64_t d = 0; d < dim_v; ++d) orow[d] = static_cast<scalar_t>(acc[d] * inv);
      }
    });
  });
  return out;
}

}  // namespace genfast::cpu::decode_attention

TORCH_LIBRARY_IMPL(genfast, CPU, m) {
  m.impl("decode_attention", &genfast::cpu::decode_attention::decode_attention);
}
