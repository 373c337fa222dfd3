// Fused logits processing and sampling for the CPU: temperature, top-k, top-p and the
// draw, one row at a time, with Hugging Face's semantics (see genfast/reference.py,
// process_logits / draw_from_scores, for the same thing in plain PyTorch):
//
//   x      = logits / temperature
//   top-k  keep x >= (k-th largest x)                       (ties at the k-th value kept)
//   top-p  over the top-k survivors, in descending order: keep a token while the
//          probability mass strictly before it is < top_p; the largest is always kept
//   draw   inverse CDF over the kept tokens in vocabulary order, with a uniform u in
//          [0, 1) given by the caller (drawn with torch from a torch.Generator, so a
//          seeded generator reproduces the tokens)
//
// No full-vocabulary sort: top-k is a selection (nth_element, O(V)); top-p buckets the
// candidates (the top-k survivors, or the whole row) by value and sorts only the bucket
// where the cut falls.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <type_traits>
#include <utility>
#include <vector>

namespace genfast::generation::sampling {

namespace {

// Accumulation type: double for double, float for everything else.
template <typename T>
using acc_t = std::conditional_t<std::is_same_v<T, double>, double, float>;

// Work below this many elements runs on the calling thread: an OpenMP fork/join costs
// more than it saves for one decode step, and on a busy machine it can cost a time slice.
constexpr int64_t kSerialElements = 1 << 16;

template <typename A>
struct RowScratch {
  std::vector<A> scaled;                      // x = logits / temperature
  std::vector<A> select;                      // copy for nth_element (top-k threshold)
  std::vector<std::pair<A, int64_t>> cands;   // top-p candidates (value, index)
  std::vector<uint8_t> keep;                  // kept mask, vocabulary order
  std::vector<double> mass;                   // exp(x - max) of kept tokens (top-p), vocabulary order
};

// Decides which tokens of one row survive; fills s.scaled and s.keep. Returns the max of x.
template <typename T, typename A>
A filter_row(const T* logits, int64_t vocab, A temperature, int64_t top_k, A top_p, RowScratch<A>& s) {
  s.scaled.resize(vocab);
  s.keep.assign(vocab, 1);
  A max_x = -std::numeric_limits<A>::infinity();
  bool has_nan = false;
  for (int64_t i = 0; i < vocab; ++i) {
    const A x = static_cast<A>(logits[i]) / temperature;
    s.scaled[i] = x;
    has_nan |= std::isnan(x);
    max_x = std::max(max_x, x);
  }
  TORCH_CHECK(!has_nan, "sampling: logits contain NaN");
  TORCH_CHECK(max_x > -std::numeric_limits<A>::infinity(),
              "sampling: every logit of a row is -inf; nothing can be sampled");

  // top-k: the k-th largest value is the threshold; everything below it goes.
  A kth = -std::numeric_limits<A>::infinity();
  const bool use_top_k = top_k > 0 && top_k < vocab;
  if (use_top_k) {
    s.select.assign(s.scaled.begin(), s.scaled.end());
    std::nth_element(s.select.begin(), s.select.begin() + (top_k - 1), s.select.end(), std::greater<A>());
    kth = s.select[top_k - 1];
    for (int64_t i = 0; i < vocab; ++i) s.keep[i] = s.scaled[i] >= kth;
  }
  if (!(top_p < A(1))) return max_x;

  // top-p needs the survivors' total mass, then the largest ones in descending order.
  // Masses are summed in double: thousands of float terms would drift by ~1e-5, enough
  // to move the top-p cut by a token. Each token's mass is computed once.
  s.mass.resize(vocab);
  double total = 0;
  for (int64_t i = 0; i < vocab; ++i) {
    s.mass[i] = s.keep[i] ? std::exp(static_cast<double>(s.scaled[i] - max_x)) : 0.0;
    total += s.mass[i];
  }
  const double mass_limit = static_cast<double>(top_p) * total;
  // The cut is the first token, in descending order, whose exclusive prefix mass reaches
  // the limit. Rather than sort the candidates (a flat distribution, at a high temperature,
  // keeps most of a 50k vocabulary), bucket them by value below the max: kBuckets buckets
  // kSpan / kBuckets wide (by x, so by mass), and one last bucket for everything lower.
  // Buckets above the one where the prefix mass reaches the limit are kept whole, those
  // below it dropped, and only the cut bucket's tokens are sorted and walked.
  constexpr int kBuckets = 512;
  constexpr double kSpan = 32.0;  // exp(-32) ~ 1e-14: the last bucket's tokens carry almost no mass
  const double per_bucket = kBuckets / kSpan;
  auto bucket_of = [&](A x) {
    const double depth = (static_cast<double>(max_x) - static_cast<double>(x)) * per_bucket;
    return depth < kBuckets ? static_cast<int>(depth) : kBuckets;  // -inf (and any NaN) go last
  };
  double bucket_mass[kBuckets + 1] = {};
  for (int64_t i = 0; i < vocab; ++i)
    if (s.keep[i]) bucket_mass[bucket_of(s.scaled[i])] += s.mass[i];
  int cut = 0;  // the bucket of the max holds the largest token: never empty
  double before_cut = 0;
  for (int b = 0; b <= kBuckets; ++b) {
    cut = b;
    if (before_cut + bucket_mass[b] >= mass_limit) break;
    before_cut += bucket_mass[b];
  }
  s.cands.clear();
  for (int64_t i = 0; i < vocab; ++i) {
    if (!s.keep[i]) continue;
    const int b = bucket_of(s.scaled[i]);
    if (b == cut) s.cands.emplace_back(s.scaled[i], i);
    s.keep[i] = b < cut;
  }
  // Descending value, ties by index (as a stable descending sort of the row).
  std::sort(s.cands.begin(), s.cands.end(), [](const std::pair<A, int64_t>& a, const std::pair<A, int64_t>& b) {
    return a.first > b.first || (a.first == b.first && a.second < b.second);
  });
  double before = before_cut;
  for (size_t r = 0; r < s.cands.size(); ++r) {
    if ((cut > 0 || r > 0) && before >= mass_limit) break;  // the largest token is always kept
    s.keep[s.cands[r].second] = 1;
    before += s.mass[s.cands[r].second];
  }
  return max_x;
}

struct Settings {
  double temperature;
  int64_t top_k;
  double top_p;
};

void check_settings(const at::Tensor& logits, const Settings& cfg, const char* op) {
  TORCH_CHECK(logits.dim() == 2, op, ": logits must be (batch, vocab), got ", logits.dim(), " dims");
  TORCH_CHECK(logits.device().is_cpu(), op, ": logits must be a CPU tensor, got ", logits.device());
  TORCH_CHECK(at::isFloatingType(logits.scalar_type()), op, ": logits must be floating point, got ",
              logits.scalar_type());
  TORCH_CHECK(logits.size(1) > 0, op, ": logits must have a non-empty vocabulary dimension");
  TORCH_CHECK(std::isfinite(cfg.temperature) && cfg.temperature > 0, op,
              ": temperature must be a positive finite number, got ", cfg.temperature);
  TORCH_CHECK(cfg.top_k >= 0, op, ": top_k must be >= 0 (0 disables it), got ", cfg.top_k);
  TORCH_CHECK(cfg.top_p >= 0 && cfg.top_p <= 1, op, ": top_p must be in [0, 1], got ", cfg.top_p);
}

int64_t grain_rows(int64_t vocab) { return std::max<int64_t>(1, kSerialElements / std::max<int64_t>(vocab, 1)); }

}  // namespace

// The processed scores: x where kept, -inf where removed (what HF's warpers return).
at::Tensor sampling_filter(const at::Tensor& logits_in, double temperature, int64_t top_k, double top_p) {
  const Settings cfg{temperature, top_k, top_p};
  check_settings(logits_in, cfg, "sampling_filter");
  const at::Tensor logits = logits_in.contiguous();
  at::Tensor out = at::empty_like(logits);
  const int64_t rows = logits.size(0), vocab = logits.size(1);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "sampling_filter", [&] {
    using A = acc_t<scalar_t>;
    const scalar_t* src = logits.const_data_ptr<scalar_t>();
    scalar_t* dst = out.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, rows, grain_rows(vocab), [&](int64_t begin, int64_t end) {
      RowScratch<A> scratch;
      for (int64_t r = begin; r < end; ++r) {
        filter_row<scalar_t, A>(src + r * vocab, vocab, static_cast<A>(cfg.temperature), cfg.top_k,
                                static_cast<A>(cfg.top_p), scratch);
        scalar_t* row = dst + r * vocab;
        for (int64_t i = 0; i < vocab; ++i)
          row[i] = scratch.keep[i] ? static_cast<scalar_t>(scratch.scaled[i])
                                   : static_cast<scalar_t>(-std::numeric_limits<A>::infinity());
      }
    });
  });
  return out;
}

// One token per row: filter, then the inverse CDF of the kept tokens at uniforms[row].
at::Tensor sampling_draw(const at::Tensor& logits_in, const at::Tensor& uniforms_in, double temperature,
                         int64_t top_k, double top_p) {
  const Settings cfg{temperature, top_k, top_p};
  check_settings(logits_in, cfg, "sampling_draw");
  TORCH_CHECK(uniforms_in.dim() == 1 && uniforms_in.size(0) == logits_in.size(0),
              "sampling_draw: uniforms must be (batch,) = (", logits_in.size(0), ",), got ", uniforms_in.sizes());
  TORCH_CHECK(uniforms_in.device().is_cpu(), "sampling_draw: uniforms must be a CPU tensor");
  TORCH_CHECK(at::isFloatingType(uniforms_in.scalar_type()), "sampling_draw: uniforms must be floating point, got ",
              uniforms_in.scalar_type());
  const at::Tensor logits = logits_in.contiguous();
  const at::Tensor uniforms = uniforms_in.to(at::kDouble).contiguous();
  const int64_t rows = logits.size(0), vocab = logits.size(1);
  at::Tensor tokens = at::empty({rows}, logits.options().dtype(at::kLong));
  const double* u = uniforms.const_data_ptr<double>();
  for (int64_t r = 0; r < rows; ++r)
    TORCH_CHECK(u[r] >= 0.0 && u[r] < 1.0, "sampling_draw: uniforms must lie in [0, 1), got ", u[r], " at row ", r);
  int64_t* out = tokens.mutable_data_ptr<int64_t>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "sampling_draw", [&] {
    using A = acc_t<scalar_t>;
    const scalar_t* src = logits.const_data_ptr<scalar_t>();
    at::parallel_for(0, rows, grain_rows(vocab), [&](int64_t begin, int64_t end) {
      RowScratch<A> scratch;
      for (int64_t r = begin; r < end; ++r) {
        const A max_x = filter_row<scalar_t, A>(src + r * vocab, vocab, static_cast<A>(cfg.temperature),
                                                cfg.top_k, static_cast<A>(cfg.top_p), scratch);
        double total = 0;  // double, as for top-p: the CDF over many small terms
        int64_t last_kept = 0;
        for (int64_t i = 0; i < vocab; ++i) {
          if (!scratch.keep[i]) continue;
          scratch.scaled[i] = std::exp(scratch.scaled[i] - max_x);  // reuse as unnormalised prob
          total += scratch.scaled[i];
          last_kept = i;
        }
        const double target = u[r] * total;
        int64_t chosen = last_kept;  // rounding can leave target >= the final running sum
        double running = 0;
        for (int64_t i = 0; i < vocab; ++i) {
          if (!scratch.keep[i]) continue;
          running += scratch.scaled[i];
          if (running > target) {
            chosen = i;
            break;
          }
        }
        out[r] = chosen;
      }
    });
  });
  return tokens;
}

}  // namespace genfast::generation::sampling

TORCH_LIBRARY_IMPL(genfast, CPU, m) {
  m.impl("sampling_filter", &genfast::generation::sampling::sampling_filter);
  m.impl("sampling_draw", &genfast::generation::sampling::sampling_draw);
}
