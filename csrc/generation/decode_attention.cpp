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

#include "generation/decode_attention.h"
#include "cpu/simd.h"

namespace genfast::generation::decode_attention {

namespace {

template <typename T>
using acc_t = std::conditional_t<std::is_same_v<T, double>, double, float>;

// Below this many cache elements read per call, stay on one thread.
constexpr int64_t kSerialElements = 1 << 18;

template <typename T>
struct Problem {
  const T *q, *k, *v;
  T* out;
  int64_t heads_q, group, dim, dim_v, length;
  double scale;
  int64_t ks_b, ks_h, ks_r, vs_b, vs_h, vs_r;
};

// Dot product with 8 independent partial sums, so the compiler can keep them in one
// vector register (a single running sum would serialise on the add latency).
template <typename T, typename A>
GENFAST_INLINE A dot(const A* x, const T* y, int64_t n) {
  A part[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  int64_t d = 0;
  for (; d + 8 <= n; d += 8)
    for (int l = 0; l < 8; ++l) part[l] += x[d + l] * static_cast<A>(y[d + l]);
  A sum = ((part[0] + part[1]) + (part[2] + part[3])) + ((part[4] + part[5]) + (part[6] + part[7]));
  for (; d < n; ++d) sum += x[d] * static_cast<A>(y[d]);
  return sum;
}

// Tasks [begin, end) of (batch, query head); compiled per SIMD level by simd_dispatch.
struct DecodeKernel {
  template <typename T>
  static GENFAST_INLINE void run(const Problem<T>* p, acc_t<T>* scratch, int64_t begin, int64_t end) {
    using A = acc_t<T>;
    A* query = scratch;
    A* scores = scratch + p->dim;
    A* acc = scores + p->length;
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / p->heads_q, g = (task % p->heads_q) / p->group;
      const T* qrow = p->q + task * p->dim;
      for (int64_t d = 0; d < p->dim; ++d) query[d] = static_cast<A>(qrow[d]);
      const T* kbase = p->k + b * p->ks_b + g * p->ks_h;
      const T* vbase = p->v + b * p->vs_b + g * p->vs_h;
      A max_score = -std::numeric_limits<A>::infinity();
      for (int64_t j = 0; j < p->length; ++j) {
        scores[j] = dot<T, A>(query, kbase + j * p->ks_r, p->dim) * static_cast<A>(p->scale);
        max_score = std::max(max_score, scores[j]);
      }
      for (int64_t d = 0; d < p->dim_v; ++d) acc[d] = 0;
      A total = 0;
      for (int64_t j = 0; j < p->length; ++j) {
        const A w = std::exp(scores[j] - max_score);
        total += w;
        const T* vrow = vbase + j * p->vs_r;
        for (int64_t d = 0; d < p->dim_v; ++d) acc[d] += w * static_cast<A>(vrow[d]);
      }
      T* orow = p->out + task * p->dim_v;
      const A inv = A(1) / total;
      for (int64_t d = 0; d < p->dim_v; ++d) orow[d] = static_cast<T>(acc[d] * inv);
    }
  }
};

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
    const Problem<scalar_t> p{qc.const_data_ptr<scalar_t>(), k_cache.const_data_ptr<scalar_t>(),
                              v_cache.const_data_ptr<scalar_t>(), out.mutable_data_ptr<scalar_t>(),
                              heads_q, group, dim, dim_v, length, scale,
                              k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
                              v_cache.stride(0), v_cache.stride(1), v_cache.stride(2)};
    at::parallel_for(0, tasks, grain, [&](int64_t begin, int64_t end) {
      std::vector<A> scratch(dim + length + dim_v);
      genfast::cpu::simd_dispatch<DecodeKernel>(&p, scratch.data(), begin, end);
    });
  });
  return out;
}

}  // namespace genfast::generation::decode_attention

TORCH_LIBRARY_IMPL(genfast, CPU, m) {
  m.impl("decode_attention", &genfast::generation::decode_attention::decode_attention);
}
