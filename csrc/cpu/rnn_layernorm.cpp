// CPU implementations of genfast::layernorm_{lstm,gru}_{forward,backward}: the layer-normalised
// cells of csrc/rnn/layernorm_cells.h on the RNN core's machinery (csrc/cpu/rnn_common.h: the thread
// team, the partition of a step into panels of 16 units, the recurrent tiles, the weight packing).
//
// The input side LN(W_ih x) is one GEMM and one row-wise LN pass before the time loop (its backward
// one row-wise pass and the GEMMs after the loop). LN of the recurrent product needs its whole row,
// and a thread owns a panel of units, so a forward step is a chain of passes with a team.sync()
// between them:
//   A. the product W_hh h_{t-1} for the panel, kept raw, and its partial moments per (row, panel);
//   B. the row's moments combined (combine_moments), the product normalised in place, the gates and the
//      cell update; the LSTM keeps partial moments of c_t;
//   C. (LSTM) LN(c_t), h_t.
// The backward mirrors it per step: (1) dL/dh_t = grad_output + dh + dL/d(W_hh h_t) W_hh of the step
// processed before, the output gate and, for the LSTM, the partial sums of LN(c)'s backward;
// (2, LSTM) dL/dc, the other gates; then the partial sums of the recurrent LN's backward; (3) dL/d(W_hh h).
// Workspace (train=true): rnn::LayerNormWorkspace.
//
// Regularisers (docs/design.md "Regularisers" and its LN cells' section), with the shared math and
// buffers of csrc/rnn/regularizers.h and csrc/cpu/rnn_regularizers.h: pass A reads h_{t-1} * r
// (recurrent dropout); the pass that makes h~_t zones it out against the carried h_{t-1} and writes
// h_t * r for the next step; pass B (LSTM) zones out c~_t, keeps c~_t for pass C (LN(c~_t) feeds h~_t)
// and carries the zoned c_t, which the workspace's cell slot holds. The backward splits dL/dh_t and
// dL/dc_t by the zoneout weights and multiplies the recurrent product and the gathered h_{t-1} by r.
#include <torch/library.h>

#include <cstring>
#include <vector>

#include "cpu/gemm_entry.h"
#include "cpu/rnn_common.h"
#include "cpu/rnn_regularizers.h"
#include "cpu/simd.h"
#include "rnn/layernorm_cells.h"
#include "rnn/layernorm_host.h"
#include "rnn/rnn_host.h"

namespace genfast::cpu {
namespace {

using rnn::LayerNormGruCell;
using rnn::LayerNormLstmCell;
using rnn::Moments;

// The partial moments of a row's panel p cover `gates` values per unit of the panel.
template <typename T>
GENFAST_INLINE Moments<T> row_moments(const T* partial, int64_t panels, int64_t gates, int64_t H) {
  return rnn::combine_moments(partial, panels, T(gates * kUnits), T(gates * (H - (panels - 1) * kUnits)));
}

// The sums of a row's panels (LN backward's two reductions).
template <typename T>
GENFAST_INLINE void row_sums(const T* partial, int64_t panels, T& first, T& second) {
  first = T(0);
  second = T(0);
  for (int64_t p = 0; p < panels; ++p) {
    first += partial[2 * p];
    second += partial[2 * p + 1];
  }
}

// Floating-point sums do not vectorise as written (the compiler keeps their order), so the reductions
// below accumulate kUnits lanes side by side and add the lanes pairwise at the end: a fixed order,
// the same whichever thread runs it. The pairwise adds take the lanes as one GCC generic vector, so
// they stay in registers (vector halves and shuffles); written as loops over the array, they went
// through the stack, each level reading back a part of a wider store, which stalls.
template <typename T, int64_t Lanes>
struct LaneVector {
  typedef T type __attribute__((vector_size(Lanes * sizeof(T))));
};

template <typename T>
using Lanes = typename LaneVector<T, kUnits>::type;

template <typename T>
GENFAST_INLINE Lanes<T> load_lanes(const T (&lane)[kUnits]) {
  Lanes<T> v;
  std::memcpy(&v, lane, sizeof(v));
  return v;
}

template <typename T>
GENFAST_INLINE void store_lanes(T (&lane)[kUnits], const Lanes<T>& v) {
  std::memcpy(lane, &v, sizeof(v));
}

// A panel's units (at most kUnits) as one vector, zero past `units`. Arrays filled by a copy and then read
// by vector loops did not always stay vectors: GCC could split such a copy into 8-byte moves (or a
// sum into 8 + 4 + 2 + 1 + 1 lanes), and the wide load after the narrow stores then waits for them.
template <typename T>
GENFAST_INLINE Lanes<T> load_panel(const T* src, int64_t units) {
  Lanes<T> v = {};
  if (units == kUnits)
    std::memcpy(&v, src, sizeof(v));
  else
    for (int64_t u = 0; u < units; ++u) v[u] = src[u];
  return v;
}

template <typename T>
GENFAST_INLINE T sum_lanes(const Lanes<T>& v) {
  static_assert(kUnits == 16, "sum_lanes adds 16 lanes");
  using V8 = typename LaneVector<T, 8>::type;
  using V4 = typename LaneVector<T, 4>::type;
  using V2 = typename LaneVector<T, 2>::type;
  const V8 a = __builtin_shufflevector(v, v, 0, 1, 2, 3, 4, 5, 6, 7) +
               __builtin_shufflevector(v, v, 8, 9, 10, 11, 12, 13, 14, 15);
  const V4 b = __builtin_shufflevector(a, a, 0, 1, 2, 3) + __builtin_shufflevector(a, a, 4, 5, 6, 7);
  const V2 c = __builtin_shufflevector(b, b, 0, 1) + __builtin_shufflevector(b, b, 2, 3);
  return c[0] + c[1];
}

template <typename T>
GENFAST_INLINE T sum_lanes(const T (&lane)[kUnits]) {
  return sum_lanes<T>(load_lanes(lane));
}

// Mean and M2 of the first `units` values of each of Rows rows of kUnits (lanes past `units` hold
// zeros and are left out), stored at out[0], out[1].
template <int64_t Rows, typename T>
GENFAST_INLINE void panel_moments(const T (*v)[kUnits], int64_t units, T* out) {
  T lane[kUnits] = {};
  for (int64_t g = 0; g < Rows; ++g)
    for (int64_t u = 0; u < kUnits; ++u) lane[u] += v[g][u];
  const T mean = sum_lanes(lane) / T(Rows * units);
  // The padding lanes are left out by a factor of 0 (a select per lane compiled to scalar code).
  T keep[kUnits];
  for (int64_t u = 0; u < kUnits; ++u) keep[u] = u < units ? T(1) : T(0);
  T dev[kUnits] = {};
  for (int64_t g = 0; g < Rows; ++g)
    for (int64_t u = 0; u < kUnits; ++u) {
      const T d = (v[g][u] - mean) * keep[u];
      dev[u] += d * d;
    }
  out[0] = mean;
  out[1] = sum_lanes(dev);
}

// ---------------------------------------------------------------- forward
template <typename T>
struct LnForwardStep {
  const T* h_prev;    // (N, H) state read by this step
  const T* packed;    // panels of W_hh^T (gates of 16 units side by side), or nullptr: w_hh read in place
  const T* w_hh;      // (gates*H, H)
  const T* gx;        // (n, gates*H) input side: LN(W_ih x) ln_ih_weight + biases (LSTM b_ih + b_hh; GRU b_ih)
  const T* gamma_hh;  // (gates*H) ln_hh_weight
  const T* b_hh;      // GRU: (gates*H) recurrent bias (zeros when absent)
  const T* gamma_c;   // LSTM: (H) ln_cell_weight
  const T* beta_c;    // LSTM: (H) ln_cell_bias
  T* raw;             // (n, gates*H) W_hh h_{t-1}, normalised in place by pass B (xhat_hh)
  T* moments;         // (N, panels, 2) partial mean, M2 of raw per row and panel
  T* moments_c;       // LSTM: (N, panels, 2) of c_t
  T* rstd_hh;         // (n) or nullptr
  T* act;             // (n, saved*H) activated gates (the workspace, or a scratch when not training)
  T* c;               // LSTM: (N, H) cell state, updated in place
  T* saved_c;         // LSTM: (n, H) c_t, or nullptr
  T* cell_hat;        // LSTM: (n, H) LN(c_t), or nullptr
  T* rstd_c;          // LSTM: (n), or nullptr
  T* out;             // (n, H) output rows
  T* h_next;          // (N, H) next state
  int64_t H, panels;
  T* c_fresh = nullptr;                      // LSTM with cell zoneout: (N, H) c~_t for pass C, else nullptr
  const RegularizerStep<T>* reg = nullptr;   // zoneout / recurrent dropout (rnn_regularizers.h), or nullptr
};

// Zoneout of the fresh h~ of row m (local array h) against the carried h_{t-1}.
template <typename T>
GENFAST_INLINE void zoneout_hidden(const LnForwardStep<T>* s, int64_t m, int64_t j0, int64_t units, T* h) {
  if (s->reg && s->reg->zoneout)
    rnn::zoneout_units<T>(units, s->reg->zoneout + m * s->H + j0, s->h_prev + m * s->H + j0, h, nullptr);
}

// h_t * r of row m (recurrent dropout), which the next step's product reads.
template <typename T>
GENFAST_INLINE void mask_next_hidden(const LnForwardStep<T>* s, int64_t m, int64_t j0, int64_t units, const T* h) {
  if (s->reg && s->reg->h_product_next)
    rnn::mask_units<T>(units, h, s->reg->recurrent_mask + m * s->H + j0, s->reg->h_product_next + m * s->H + j0);
}

// The per-unit loops below work on local arrays of kUnits values (the panel's units, zero-padded
// past `units`), memory that cannot alias, so they vectorise. Loops that call exp run to `units`: a
// constant count of 16 is unrolled completely before vectorisation, and the exp's clamps then stay
// branches in scalar code.
// (A whole panel is copied with a constant count: a variable-length copy loop becomes a call to memmove.)
template <typename T>
GENFAST_INLINE void load_units(T* __restrict__ dst, const T* __restrict__ src, int64_t units) {
  if (units < kUnits)
    for (int64_t u = 0; u < kUnits; ++u) dst[u] = T(0);
  rnn::copy_units<T>(units, src, dst);
}

// Gates blocks of a row's panel (gate g at src[g * H]) into local arrays.
template <int64_t Gates, typename T>
GENFAST_INLINE void load_gates(T (*dst)[kUnits], const T* src, int64_t H, int64_t units) {
  for (int64_t g = 0; g < Gates; ++g) load_units(dst[g], src + g * H, units);
}

template <int64_t Gates, typename T>
GENFAST_INLINE void store_gates(T* dst, const T (*src)[kUnits], int64_t H, int64_t units) {
  for (int64_t g = 0; g < Gates; ++g) rnn::copy_units<T>(units, src[g], dst + g * H);
}

// Normalises a row's panel of the recurrent product in place: (v - mean) rstd.
template <int64_t Gates, typename T>
GENFAST_INLINE void normalise(T (&v)[Gates][kUnits], T mean, T rstd) {
  for (int64_t g = 0; g < Gates; ++g)
    for (int64_t u = 0; u < kUnits; ++u) v[g][u] = (v[g][u] - mean) * rstd;
}

// What a pass reads of a row's panel from memory that is out of the caches (the input side, written
// before the time loop; in the backward, the workspace the forward wrote), fetched ahead as the plain
// cells' tiles do (rnn_common.h, prefetch_gate_row): a pass with a recurrent product fetches the first
// kPrefetchRows rows of the pass after it before the product, and every pass fetches row
// m + kPrefetchRows while working on row m, so that the misses overlap with work.
template <int64_t Gates, typename T>
GENFAST_INLINE void prefetch_forward_row(const LnForwardStep<T>* s, int64_t m, int64_t j0) {
  prefetch_gate_row(s->gx + m * Gates * s->H + j0, Gates, s->H);
}

// The lines a row's panel of a pass writes (gates blocks of H), fetched for writing ahead of it.
template <typename T>
GENFAST_INLINE void prefetch_gate_row_write(T* row, int64_t gates, int64_t gate_stride) {
  for (int64_t g = 0; g < gates; ++g) {
    __builtin_prefetch(row + g * gate_stride, 1, 3);
    __builtin_prefetch(row + g * gate_stride + kUnits - 1, 1, 3);
  }
}

// What passes B and C write of a row's panel (fresh lines of the workspace and the output).
template <typename T>
GENFAST_INLINE void prefetch_gate_pass_writes(const LnForwardStep<T>* s, int64_t m, int64_t j0) {
  prefetch_gate_row_write(s->act + m * 4 * s->H + j0, 4, s->H);
  if (s->saved_c) prefetch_gate_row_write(s->saved_c + m * s->H + j0, 1, 0);
}

template <typename T>
GENFAST_INLINE void prefetch_output_pass_writes(const LnForwardStep<T>* s, int64_t m, int64_t j0) {
  prefetch_gate_row_write(s->out + m * s->H + j0, 1, 0);
  if (s->cell_hat) prefetch_gate_row_write(s->cell_hat + m * s->H + j0, 1, 0);
}

// Pass A: the recurrent product of a panel, raw, with its partial moments.
template <int64_t Gates>
struct LnProductTile {
  static constexpr int64_t kWidth = Gates * kUnits;

  template <typename T>
  static GENFAST_INLINE void run(const LnForwardStep<T>* s, int64_t panel, int64_t r0, int64_t r1, T* acc) {
    const int64_t H = s->H, j0 = panel * kUnits, units = std::min(kUnits, H - j0);
    const T* h_in = s->reg && s->reg->h_product ? s->reg->h_product : s->h_prev;  // h_{t-1} * r
    for (int64_t m = r0; m < std::min(r1, r0 + kPrefetchRows); ++m) {
      prefetch_forward_row<Gates>(s, m, j0);
      prefetch_gate_row_write(s->raw + m * Gates * H + j0, Gates, H);
      prefetch_gate_pass_writes(s, m, j0);
      prefetch_output_pass_writes(s, m, j0);
    }
    recurrent_tile<T, Gates>(s->packed, s->w_hh, h_in, H, H, panel, r0, r1, acc);
    for (int64_t m = r0; m < r1; ++m, acc += kWidth) {
      if (m + kPrefetchRows < r1) prefetch_gate_row_write(s->raw + (m + kPrefetchRows) * Gates * H + j0, Gates, H);
      // acc's columns past `units` are zero (the weight's padding).
      const T(*values)[kUnits] = reinterpret_cast<const T(*)[kUnits]>(acc);
      store_gates<Gates>(s->raw + m * Gates * H + j0, values, H, units);
      panel_moments<Gates>(values, units, s->moments + (m * s->panels + panel) * 2);
    }
  }
};

// The LSTM's gates over a panel's units (restrict pointers, a loop like the plain cells' forward_units).
template <typename T>
GENFAST_CELL_LOOP void lstm_gate_units(int64_t units, const T* __restrict__ a_i, const T* __restrict__ a_f,
                                       const T* __restrict__ a_g, const T* __restrict__ a_o, T* __restrict__ c,
                                       T* __restrict__ i, T* __restrict__ f, T* __restrict__ g, T* __restrict__ o) {
  for (int64_t u = 0; u < units; ++u) {
    const auto out = LayerNormLstmCell::gates<T>(a_i[u], a_f[u], a_g[u], a_o[u], c[u]);
    i[u] = out.i;
    f[u] = out.f;
    g[u] = out.g;
    o[u] = out.o;
    c[u] = out.c;
  }
}

// LSTM pass B: normalise the product, the gates, c_t and its partial moments.
struct LnLstmGateTile {
  template <typename T>
  static GENFAST_INLINE void run(const LnForwardStep<T>* s, int64_t panel, int64_t r0, int64_t r1, T* /*acc*/) {
    constexpr int64_t G = 4;
    const int64_t H = s->H, j0 = panel * kUnits, units = std::min(kUnits, H - j0);
    T gamma[G][kUnits];
    load_gates<G>(gamma, s->gamma_hh + j0, H, units);
    for (int64_t m = r0; m < r1; ++m) {
      if (m + kPrefetchRows < r1) {
        prefetch_forward_row<G>(s, m + kPrefetchRows, j0);
        prefetch_gate_pass_writes(s, m + kPrefetchRows, j0);
      }
      const Moments<T> row = row_moments(s->moments + m * s->panels * 2, s->panels, G, H);
      const T rstd = rnn::layer_norm_rstd(row);
      if (panel == 0 && s->rstd_hh) s->rstd_hh[m] = rstd;
      T xhat[G][kUnits], a[G][kUnits], act[G][kUnits], c[kUnits];
      load_gates<G>(xhat, s->raw + m * G * H + j0, H, units);
      load_gates<G>(a, s->gx + m * G * H + j0, H, units);
      load_units(c, s->c + m * H + j0, units);
      normalise<G>(xhat, row.mean, rstd);
      for (int64_t g = 0; g < G; ++g)
        for (int64_t u = 0; u < kUnits; ++u) a[g][u] += xhat[g][u] * gamma[g][u];
      T c_prev[kUnits];
      if (s->c_fresh) rnn::copy_units<T>(units, c, c_prev);
      lstm_gate_units<T>(units, a[0], a[1], a[2], a[3], c, act[0], act[1], act[2], act[3]);
      store_gates<G>(s->raw + m * G * H + j0, xhat, H, units);
      store_gates<G>(s->act + m * G * H + j0, act, H, units);
      for (int64_t u = units; u < kUnits; ++u) c[u] = T(0);
      panel_moments<1>(&c, units, s->moments_c + (m * s->panels + panel) * 2);  // of c~_t: LN(c~_t) makes h~_t
      if (s->c_fresh) {  // cell zoneout: c~_t kept for pass C, the zoned c_t carried
        rnn::copy_units<T>(units, c, s->c_fresh + m * H + j0);
        rnn::zoneout_units<T>(units, s->reg->cell_zoneout + m * H + j0, c_prev, c, nullptr);
      }
      rnn::copy_units<T>(units, c, s->c + m * H + j0);
      if (s->saved_c) rnn::copy_units<T>(units, c, s->saved_c + m * H + j0);
    }
  }
};

// LSTM pass C: LN(c_t) and h_t.
struct LnLstmOutputTile {
  template <typename T>
  static GENFAST_INLINE void run(const LnForwardStep<T>* s, int64_t panel, int64_t r0, int64_t r1, T* /*acc*/) {
    const int64_t H = s->H, j0 = panel * kUnits, units = std::min(kUnits, H - j0);
    T gamma[kUnits], beta[kUnits];
    load_units(gamma, s->gamma_c + j0, units);
    load_units(beta, s->beta_c + j0, units);
    for (int64_t m = r0; m < r1; ++m) {
      if (m + kPrefetchRows < r1) prefetch_output_pass_writes(s, m + kPrefetchRows, j0);
      const Moments<T> row = row_moments(s->moments_c + m * s->panels * 2, s->panels, 1, H);
      const T mean = row.mean, rstd = rnn::layer_norm_rstd(row);
      if (panel == 0 && s->rstd_c) s->rstd_c[m] = rstd;
      T hat[kUnits], o[kUnits], h[kUnits];
      load_units(hat, (s->c_fresh ? s->c_fresh : s->c) + m * H + j0, units);
      load_units(o, s->act + m * 4 * H + 3 * H + j0, units);
      for (int64_t u = 0; u < kUnits; ++u) hat[u] = (hat[u] - mean) * rstd;
      for (int64_t u = 0; u < units; ++u) h[u] = LayerNormLstmCell::hidden<T>(o[u], hat[u], gamma[u], beta[u]);
      zoneout_hidden(s, m, j0, units, h);
      rnn::copy_units<T>(units, h, s->out + m * H + j0);
      rnn::copy_units<T>(units, h, s->h_next + m * H + j0);
      mask_next_hidden(s, m, j0, units, h);
      if (s->cell_hat) rnn::copy_units<T>(units, hat, s->cell_hat + m * H + j0);
    }
  }
};

// GRU pass B: normalise the product, h^ = LN(.) ln_hh_weight + b_hh, the gates and h_t.
struct LnGruGateTile {
  template <typename T>
  static GENFAST_INLINE void run(const LnForwardStep<T>* s, int64_t panel, int64_t r0, int64_t r1, T* /*acc*/) {
    constexpr int64_t G = 3;
    const int64_t H = s->H, j0 = panel * kUnits, units = std::min(kUnits, H - j0);
    T gamma[G][kUnits];
    load_gates<G>(gamma, s->gamma_hh + j0, H, units);
    for (int64_t m = r0; m < r1; ++m) {
      if (m + kPrefetchRows < r1) {
        prefetch_forward_row<G>(s, m + kPrefetchRows, j0);
        prefetch_gate_pass_writes(s, m + kPrefetchRows, j0);
        prefetch_output_pass_writes(s, m + kPrefetchRows, j0);
      }
      const Moments<T> row = row_moments(s->moments + m * s->panels * 2, s->panels, G, H);
      const T rstd = rnn::layer_norm_rstd(row);
      if (panel == 0 && s->rstd_hh) s->rstd_hh[m] = rstd;
      T xhat[G][kUnits], hh[G][kUnits], act[4][kUnits], h[kUnits], h_copy[kUnits];
      load_gates<G>(xhat, s->raw + m * G * H + j0, H, units);
      normalise<G>(xhat, row.mean, rstd);
      for (int64_t g = 0; g < G; ++g)
        for (int64_t u = 0; u < kUnits; ++u) hh[g][u] = xhat[g][u] * gamma[g][u];
      // The plain GRU's unit loop on the normalised recurrent side (it adds b_hh): r, z, n, h^_n and h~_t.
      rnn::GruCell::forward_units<kUnits, T>(units, &hh[0][0], s->gx + m * G * H + j0, s->b_hh + j0, H, nullptr,
                                             s->h_prev + m * H + j0, h, h_copy, act);
      zoneout_hidden(s, m, j0, units, h);
      store_gates<G>(s->raw + m * G * H + j0, xhat, H, units);
      store_gates<4>(s->act + m * 4 * H + j0, act, H, units);
      rnn::copy_units<T>(units, h, s->out + m * H + j0);
      rnn::copy_units<T>(units, h, s->h_next + m * H + j0);
      mask_next_hidden(s, m, j0, units, h);
    }
  }
};

// ---------------------------------------------------------------- backward
template <typename T>
struct LnBackwardStep {
  const T* dhr_prev;    // (n_prev, gates*H) dL/d(W_hh h) of the step processed just before, or nullptr
  const T* packed_whh;  // panels of W_hh's columns, or nullptr:
  const T* w_hh_t;      // (H, gates*H) W_hh^T read in place (one sequence)
  const T* grad_out;    // (n, H)
  const T* act;         // (n, saved*H)
  const T* xhat_hh;     // (n, gates*H)
  const T* rstd_hh;     // (n)
  const T* cell_hat;    // LSTM: (n, H)
  const T* rstd_c;      // LSTM: (n)
  const T* gamma_c;     // LSTM: (H)
  const T* beta_c;      // LSTM: (H)
  const T* gamma_hh;    // (gates*H)
  const T* state_prev;  // rows < n_prev_fwd: the state the step read (LSTM c_{t-1}, GRU h_{t-1})
  const T* state_init;  // (N, H) cx or hx, for the other rows
  T* dh_state;          // (N, H) gradient reaching h from outside the recurrence
  T* dc_state;          // LSTM: (N, H) dL/dc carried between steps
  T* dA;                // (n, gates*H) input side's pre-activation gradient (LSTM: both sides)
  T* dA_h;              // (n, gates*H) gradient of the recurrent side after its gain (GRU: d h^; LSTM: = dA)
  T* dY;                // LSTM: (n, H) dL/d(LN(c) gain + bias)
  T* dhr;               // (n, gates*H) dL/d(W_hh h_{t-1}) of this step
  T* sums_c;            // LSTM: (N, panels, 2)
  T* sums_hh;           // (N, panels, 2)
  int64_t n, n_prev, n_prev_fwd, H, panels;
  const RegularizerStep<T>* reg = nullptr;  // zoneout / recurrent dropout masks, or nullptr
};

// dL/dh_t for one row of a panel from the recurrent product `rec` (rows < n_prev): returns false
// for rows no longer active, which only collect the gradient of their initial state.
template <typename T>
GENFAST_INLINE bool total_dh(const LnBackwardStep<T>* s, int64_t m, int64_t j0, int64_t units, const T* rec,
                             T (&d_h)[kUnits]) {
  T* dh = s->dh_state + m * s->H + j0;
  if (m >= s->n) {
    if (m < s->n_prev)
      for (int64_t u = 0; u < units; ++u) dh[u] += rec[u];
    return false;
  }
  Lanes<T> sum = load_panel(s->grad_out + m * s->H + j0, units) + load_panel(dh, units);
  if (m < s->n_prev) sum += load_panel(rec, kUnits);  // rec: zero past `units`
  store_lanes(d_h, sum);
  if (s->reg && s->reg->zoneout)  // k d_h straight to h_{t-1} (stored in dh), (1 - k) d_h to the cell
    rnn::zoneout_grad_units<T>(units, s->reg->zoneout + m * s->H + j0, d_h, dh, /*store=*/true);
  else
    for (int64_t u = 0; u < units; ++u) dh[u] = T(0);
  return true;
}

// What each backward pass reads of a row's panel from the workspace (see prefetch_forward_row).
// LSTM pass 1: grad_output, o and LN(c_t).
template <typename T>
GENFAST_INLINE void prefetch_lstm_output_row(const LnBackwardStep<T>* s, int64_t m, int64_t j0) {
  const int64_t H = s->H;
  prefetch_gate_row(s->grad_out + m * H + j0, 1, 0);
  prefetch_gate_row(s->act + m * 4 * H + 3 * H + j0, 1, 0);
  prefetch_gate_row(s->cell_hat + m * H + j0, 1, 0);
}

// The cell pass (LSTM pass 2, GRU pass 1): the other gates, the state the step read and LN(W_hh h)'s x^.
template <int64_t Gates, int64_t Read, typename T>
GENFAST_INLINE void prefetch_cell_row(const LnBackwardStep<T>* s, int64_t m, int64_t j0) {
  const int64_t H = s->H;
  prefetch_gate_row(s->act + m * 4 * H + j0, Read, H);
  prefetch_gate_row((m < s->n_prev_fwd ? s->state_prev : s->state_init) + m * H + j0, 1, 0);
  prefetch_gate_row(s->xhat_hh + m * Gates * H + j0, Gates, H);
}

template <int64_t Gates, typename T>
GENFAST_INLINE void backward_product(const LnBackwardStep<T>* s, int64_t panel, int64_t r0, int64_t r1, T* acc) {
  const int64_t rows = std::min(r1, s->n_prev) - r0;
  if (rows <= 0) return;
  backward_recurrent_tile<T>(s->packed_whh, s->w_hh_t, s->dhr_prev + r0 * Gates * s->H, Gates * s->H, s->H, panel,
                             rows, acc);
  // The product is dL/d(h_{t-1} * r): times r it is dL/dh_{t-1}.
  if (s->reg) mask_recurrent_rows<kUnits>(s->reg, r0, rows, panel * kUnits, std::min(kUnits, s->H - panel * kUnits),
                                          s->H, acc);
}

// The partial sums of the recurrent LN's backward for a row's panel: dx^ = dA_h ln_hh_weight.
template <int64_t Gates, typename T>
GENFAST_INLINE void recurrent_ln_sums(const LnBackwardStep<T>* s, int64_t m, int64_t panel,
                                      const T (&da)[Gates][kUnits], const T (&gamma)[Gates][kUnits],
                                      int64_t j0, int64_t units) {
  T xhat[Gates][kUnits];
  load_gates<Gates>(xhat, s->xhat_hh + m * Gates * s->H + j0, s->H, units);
  // As whole vectors: the same sums lane by lane as a loop over the arrays, which the compiler took
  // apart into 4-wide pieces and shuffles.
  Lanes<T> first = {}, second = {};  // lanes past `units`: da and gamma are zero there
  for (int64_t g = 0; g < Gates; ++g) {
    const Lanes<T> d = load_lanes(da[g]) * load_lanes(gamma[g]);
    first += d;
    second += d * load_lanes(xhat[g]);
  }
  s->sums_hh[(m * s->panels + panel) * 2] = sum_lanes<T>(first);
  s->sums_hh[(m * s->panels + panel) * 2 + 1] = sum_lanes<T>(second);
}

// LSTM pass 1: dL/dh_t, the output gate, dL/dy and the partial sums of LN(c)'s backward.
struct LnLstmBackwardOutputTile {
  template <typename T>
  static GENFAST_INLINE void run(const LnBackwardStep<T>* s, int64_t panel, int64_t r0, int64_t r1, T* acc) {
    const int64_t H = s->H, j0 = panel * kUnits, units = std::min(kUnits, H - j0);
    for (int64_t m = r0; m < std::min({r1, r0 + kPrefetchRows, s->n}); ++m) prefetch_lstm_output_row(s, m, j0);
    backward_product<4>(s, panel, r0, r1, acc);
    T gamma[kUnits], beta[kUnits];
    load_units(gamma, s->gamma_c + j0, units);
    load_units(beta, s->beta_c + j0, units);
    T d_h[kUnits];
    for (int64_t m = r0; m < r1; ++m) {
      if (m + kPrefetchRows < std::min(r1, s->n)) {
        prefetch_lstm_output_row(s, m + kPrefetchRows, j0);
        prefetch_gate_row_write(s->dY + (m + kPrefetchRows) * H + j0, 1, 0);
        prefetch_gate_row_write(s->dA + (m + kPrefetchRows) * 4 * H + j0, 4, H);
      }
      if (m < s->n) prefetch_cell_row<4, 3>(s, m, j0);  // pass 2's rows
      if (!total_dh(s, m, j0, units, acc + (m - r0) * kUnits, d_h)) continue;
      T o[kUnits], hat[kUnits], d_o[kUnits], dy[kUnits];
      load_units(o, s->act + m * 4 * H + 3 * H + j0, units);
      load_units(hat, s->cell_hat + m * H + j0, units);
      T first[kUnits] = {}, second[kUnits] = {};
      for (int64_t u = 0; u < units; ++u) {
        const auto grad = LayerNormLstmCell::output_backward<T>(d_h[u], o[u], hat[u], gamma[u], beta[u]);
        d_o[u] = grad.d_o;
        dy[u] = grad.d_y;
        first[u] = grad.d_y * gamma[u];
        second[u] = first[u] * hat[u];
      }
      rnn::copy_units<T>(units, d_o, s->dA + m * 4 * H + 3 * H + j0);
      rnn::copy_units<T>(units, dy, s->dY + m * H + j0);
      s->sums_c[(m * s->panels + panel) * 2] = sum_lanes(first);
      s->sums_c[(m * s->panels + panel) * 2 + 1] = sum_lanes(second);
    }
  }
};

// LSTM pass 2: dL/dc_t, the gates i, f, g, dL/dc_{t-1}, and the partial sums of the recurrent LN.
struct LnLstmBackwardCellTile {
  template <typename T>
  static GENFAST_INLINE void run(const LnBackwardStep<T>* s, int64_t panel, int64_t r0, int64_t r1, T* /*acc*/) {
    constexpr int64_t G = 4;
    const int64_t H = s->H, j0 = panel * kUnits, units = std::min(kUnits, H - j0);
    T gamma_c[kUnits], gamma[G][kUnits];
    load_units(gamma_c, s->gamma_c + j0, units);
    load_gates<G>(gamma, s->gamma_hh + j0, H, units);
    for (int64_t m = r0; m < r1; ++m) {
      prefetch_gate_row_write(s->dhr + m * G * H + j0, G, H);  // pass 3's
      T first, second;
      row_sums(s->sums_c + m * s->panels * 2, s->panels, first, second);
      const T mean_d = first / T(H), mean_dx = second / T(H), rstd = s->rstd_c[m];
      T hat[kUnits], dy[kUnits], act[3][kUnits], c_prev[kUnits], dc[kUnits], da[G][kUnits];
      load_units(hat, s->cell_hat + m * H + j0, units);
      load_units(dy, s->dY + m * H + j0, units);
      load_gates<3>(act, s->act + m * 4 * H + j0, H, units);
      load_units(c_prev, (m < s->n_prev_fwd ? s->state_prev : s->state_init) + m * H + j0, units);
      load_units(dc, s->dc_state + m * H + j0, units);
      load_units(da[3], s->dA + m * 4 * H + 3 * H + j0, units);
      T direct[kUnits] = {};  // cell zoneout: dL/dc_t = dc splits into (1 - k) dc to c~_t and k dc to c_{t-1}
      if (s->reg && s->reg->cell_zoneout) {
        const T* keep = s->reg->cell_zoneout + m * H + j0;
        for (int64_t u = 0; u < units; ++u) {
          direct[u] = rnn::zoneout_grad_prev<T>(keep[u], dc[u]);
          dc[u] = rnn::zoneout_grad_fresh<T>(keep[u], dc[u]);
        }
      }
      for (int64_t u = 0; u < kUnits; ++u) {
        const T d_c = dc[u] + rnn::layer_norm_backward(dy[u] * gamma_c[u], hat[u], rstd, mean_d, mean_dx);
        const auto grad = LayerNormLstmCell::cell_backward<T>(d_c, act[0][u], act[1][u], act[2][u], c_prev[u]);
        da[0][u] = grad.d_i;
        da[1][u] = grad.d_f;
        da[2][u] = grad.d_g;
        dc[u] = grad.d_c_prev + direct[u];
      }
      store_gates<3>(s->dA + m * 4 * H + j0, da, H, units);
      rnn::copy_units<T>(units, dc, s->dc_state + m * H + j0);
      recurrent_ln_sums<G>(s, m, panel, da, gamma, j0, units);
    }
  }
};

// GRU pass 1: dL/dh_t, the gates (both sides), dL/dh_{t-1}'s direct part, the recurrent LN's sums.
struct LnGruBackwardGateTile {
  template <typename T>
  static GENFAST_INLINE void run(const LnBackwardStep<T>* s, int64_t panel, int64_t r0, int64_t r1, T* acc) {
    constexpr int64_t G = 3;
    const int64_t H = s->H, j0 = panel * kUnits, units = std::min(kUnits, H - j0);
    for (int64_t m = r0; m < std::min({r1, r0 + kPrefetchRows, s->n}); ++m) {
      prefetch_gate_row(s->grad_out + m * H + j0, 1, 0);
      prefetch_cell_row<G, 4>(s, m, j0);
    }
    backward_product<G>(s, panel, r0, r1, acc);
    T gamma[G][kUnits];
    load_gates<G>(gamma, s->gamma_hh + j0, H, units);
    T d_h[kUnits];
    for (int64_t m = r0; m < r1; ++m) {
      if (m + kPrefetchRows < std::min(r1, s->n)) {
        prefetch_gate_row(s->grad_out + (m + kPrefetchRows) * H + j0, 1, 0);
        prefetch_cell_row<G, 4>(s, m + kPrefetchRows, j0);
        prefetch_gate_row_write(s->dA + (m + kPrefetchRows) * G * H + j0, G, H);
        prefetch_gate_row_write(s->dA_h + (m + kPrefetchRows) * G * H + j0, G, H);
      }
      if (m < s->n) prefetch_gate_row_write(s->dhr + m * G * H + j0, G, H);  // pass 3's
      if (!total_dh(s, m, j0, units, acc + (m - r0) * kUnits, d_h)) continue;
      T act[4][kUnits], h_prev[kUnits], dx[G][kUnits], dhh[G][kUnits], direct[kUnits];
      load_gates<4>(act, s->act + m * 4 * H + j0, H, units);
      load_units(h_prev, (m < s->n_prev_fwd ? s->state_prev : s->state_init) + m * H + j0, units);
      for (int64_t u = 0; u < kUnits; ++u) {
        const auto grad = rnn::GruCell::backward<T>(d_h[u], act[0][u], act[1][u], act[2][u], act[3][u], h_prev[u]);
        dx[0][u] = dhh[0][u] = grad.d_r;
        dx[1][u] = dhh[1][u] = grad.d_z;
        dx[2][u] = grad.d_xn;
        dhh[2][u] = grad.d_hn;
        direct[u] = grad.d_h_prev;
      }
      if (s->reg && s->reg->zoneout) {  // total_dh left zoneout's direct part in dh_state
        const T* zoned = s->dh_state + m * H + j0;
        for (int64_t u = 0; u < units; ++u) direct[u] += zoned[u];
      }
      store_gates<G>(s->dA + m * G * H + j0, dx, H, units);
      store_gates<G>(s->dA_h + m * G * H + j0, dhh, H, units);
      rnn::copy_units<T>(units, direct, s->dh_state + m * H + j0);
      recurrent_ln_sums<G>(s, m, panel, dhh, gamma, j0, units);
    }
  }
};

// The last pass of a backward step: dL/d(W_hh h_{t-1}) through the recurrent LN.
template <int64_t Gates>
struct LnRecurrentBackwardTile {
  template <typename T>
  static GENFAST_INLINE void run(const LnBackwardStep<T>* s, int64_t panel, int64_t r0, int64_t r1, T* /*acc*/) {
    const int64_t H = s->H, j0 = panel * kUnits, units = std::min(kUnits, H - j0);
    T gamma[Gates][kUnits];
    load_gates<Gates>(gamma, s->gamma_hh + j0, H, units);
    for (int64_t m = r0; m < r1; ++m) {
      T first, second;
      row_sums(s->sums_hh + m * s->panels * 2, s->panels, first, second);
      const T mean_d = first / T(Gates * H), mean_dx = second / T(Gates * H), rstd = s->rstd_hh[m];
      T da[Gates][kUnits], xhat[Gates][kUnits];
      load_gates<Gates>(da, s->dA_h + m * Gates * H + j0, H, units);
      load_gates<Gates>(xhat, s->xhat_hh + m * Gates * H + j0, H, units);
      for (int64_t g = 0; g < Gates; ++g)
        for (int64_t u = 0; u < kUnits; ++u)
          da[g][u] = rnn::layer_norm_backward(da[g][u] * gamma[g][u], xhat[g][u], rstd, mean_d, mean_dx);
      store_gates<Gates>(s->dhr + m * Gates * H + j0, da, H, units);
    }
  }
};

// ---------------------------------------------------------------- row-wise LN of the input side
// The sum of W values by lanes (see sum_lanes).
template <typename T, typename Value>
GENFAST_INLINE T sum_row(int64_t W, const Value& value) {
  T lane[kUnits] = {};
  int64_t k = 0;
  for (; k + kUnits <= W; k += kUnits)
    for (int64_t u = 0; u < kUnits; ++u) lane[u] += value(k + u);
  T sum = sum_lanes(lane);
  for (; k < W; ++k) sum += value(k);
  return sum;
}

// v (S, W) <- LN(v) gain + bias per row; xhat and rstd saved when given. The row passes here and below
// run through simd_dispatch, as the step tiles do (an at::parallel_for body is baseline x86-64 code).
struct InputLayerNormRows {
  template <typename T>
  static GENFAST_INLINE void run(int64_t r0, int64_t r1, int64_t W, T* v, const T* gain, const T* bias, T* xhat,
                                 T* rstd) {
    for (int64_t r = r0; r < r1; ++r) {
      T* __restrict__ row = v + r * W;
      const T mean = sum_row<T>(W, [&](int64_t k) { return row[k]; }) / T(W);
      const T m2 = sum_row<T>(W, [&](int64_t k) { return (row[k] - mean) * (row[k] - mean); });
      const T rs = rnn::layer_norm_rstd(Moments<T>{T(W), mean, m2});
      if (rstd) rstd[r] = rs;
      if (xhat) {
        T* __restrict__ xh = xhat + r * W;
        for (int64_t k = 0; k < W; ++k) xh[k] = (row[k] - mean) * rs;
      }
      for (int64_t k = 0; k < W; ++k) row[k] = (row[k] - mean) * rs * gain[k] + (bias ? bias[k] : T(0));
    }
  }
};

template <typename T>
void input_layer_norm(int64_t S, int64_t W, T* v, const T* gain, const T* bias, T* xhat, T* rstd) {
  at::parallel_for(0, S, 16, [&](int64_t begin, int64_t end) {
    simd_dispatch<InputLayerNormRows>(begin, end, W, v, gain, bias, xhat, rstd);
  });
}

// ---------------------------------------------------------------- after the backward loop
// The LN gains' and biases' gradients are column sums over all rows: sum d * x (and d * x2) and sum d.
// They are taken in one pass over d, per block of kSumRows rows into the block's own partial sums
// (blocks, 3, W): sum d * x, sum d * x2, sum d of each block of rows; these are then added in block
// order: a fixed order, whatever the thread count.
constexpr int64_t kSumRows = 64;

// One row of d into a block's sums (zeroed first for the block's first row).
template <typename T>
GENFAST_INLINE void add_column_sums(T* __restrict__ block, int64_t W, bool first, const T* __restrict__ d,
                                    const T* __restrict__ x, const T* __restrict__ x2) {
  T* __restrict__ dx = block;
  T* __restrict__ dx2 = block + W;
  T* __restrict__ sum = block + 2 * W;
  if (first)
    for (int64_t k = 0; k < 3 * W; ++k) block[k] = T(0);
  for (int64_t k = 0; k < W; ++k) {
    dx[k] += d[k] * x[k];
    sum[k] += d[k];
  }
  if (x2)
    for (int64_t k = 0; k < W; ++k) dx2[k] += d[k] * x2[k];
}

// The blocks' sums added in order: sum d * x, sum d * x2, sum d, each (W) and its own tensor (an op's
// outputs must not alias).
std::vector<at::Tensor> total_column_sums(const at::Tensor& partial) {
  const at::Tensor sum = partial.sum(0);
  return {sum[0].clone(), sum[1].clone(), sum[2].clone()};
}

at::Tensor empty_column_sums(int64_t S, int64_t W, const at::TensorOptions& opts) {
  return at::empty({ceil_div(S, kSumRows), 3, W}, opts);
}

// Blocks [b0, b1) of rows of d into their sums.
struct ColumnSumBlocks {
  template <typename T>
  static GENFAST_INLINE void run(int64_t b0, int64_t b1, int64_t S, int64_t W, const T* d, const T* x, const T* x2,
                                 T* partial) {
    for (int64_t r = b0 * kSumRows; r < std::min(S, b1 * kSumRows); ++r)
      add_column_sums<T>(partial + r / kSumRows * 3 * W, W, r % kSumRows == 0, d + r * W, x + r * W,
                         x2 ? x2 + r * W : nullptr);
  }
};

// Column sums of d * x (and d * x2) and of d over S rows of W (see add_column_sums).
template <typename T>
std::vector<at::Tensor> column_sums(int64_t S, int64_t W, const T* d, const T* x, const T* x2, const at::TensorOptions& opts) {
  const at::Tensor partial = empty_column_sums(S, W, opts);
  at::parallel_for(0, partial.size(0), 1, [&](int64_t b0, int64_t b1) {
    simd_dispatch<ColumnSumBlocks>(b0, b1, S, W, d, x, x2, partial.data_ptr<T>());
  });
  return total_column_sums(partial);
}

// d (S, W) <- dL/dv of v's row-wise LN, from dL/d(LN(v) gain) = d gain (d in place); before that, in the
// same pass, the column sums of d * xhat, d * x2 (if given) and d.
struct InputLayerNormBackwardBlocks {
  template <typename T>
  static GENFAST_INLINE void run(int64_t b0, int64_t b1, int64_t S, int64_t W, T* d, const T* gain, const T* xhat,
                                 const T* rstd, const T* x2, T* partial) {
    for (int64_t r = b0 * kSumRows; r < std::min(S, b1 * kSumRows); ++r) {
      T* __restrict__ row = d + r * W;
      const T* __restrict__ xh = xhat + r * W;
      add_column_sums<T>(partial + r / kSumRows * 3 * W, W, r % kSumRows == 0, row, xh, x2 ? x2 + r * W : nullptr);
      const T mean_d = sum_row<T>(W, [&](int64_t k) { return row[k] * gain[k]; }) / T(W);
      const T mean_dx = sum_row<T>(W, [&](int64_t k) { return row[k] * gain[k] * xh[k]; }) / T(W);
      for (int64_t k = 0; k < W; ++k)
        row[k] = rnn::layer_norm_backward(row[k] * gain[k], xh[k], rstd[r], mean_d, mean_dx);
    }
  }
};

template <typename T>
std::vector<at::Tensor> input_layer_norm_backward(int64_t S, int64_t W, T* d, const T* gain, const T* xhat, const T* rstd,
                                                  const T* x2, const at::TensorOptions& opts) {
  const at::Tensor partial = empty_column_sums(S, W, opts);
  at::parallel_for(0, partial.size(0), 1, [&](int64_t b0, int64_t b1) {
    simd_dispatch<InputLayerNormBackwardBlocks>(b0, b1, S, W, d, gain, xhat, rstd, x2, partial.data_ptr<T>());
  });
  return total_column_sums(partial);
}

// ---------------------------------------------------------------- weights
// W_hh (gates*H x H) as the forward's panels: panel p holds the columns of W_hh^T for every gate of
// units [16p, 16p + 16).
template <typename T>
at::Tensor pack_recurrent_weight(const at::Tensor& w_hh, int64_t gates, int64_t H) {
  const int64_t panels = ceil_div(H, kUnits), width = gates * kUnits;
  at::Tensor packed = empty_large({panels * H * width}, w_hh.options());
  pack_panels_parallel<T>(w_hh.data_ptr<T>(), 1, H, H, panels, width,
                          [&](int64_t p, int64_t c) {
                            const int64_t j = p * kUnits + c % kUnits;
                            return j < H ? (c / kUnits) * H + j : int64_t(-1);
                          },
                          packed.data_ptr<T>());
  return packed;
}

// ---------------------------------------------------------------- op bodies
using rnn::Dims;
using rnn::LayerArgs;
const std::optional<at::Tensor> kNone;

using rnn::LayerNormParams;

struct LnForwardResult {
  at::Tensor output, hy, cy, workspace;
};

template <typename Cell>
LnForwardResult ln_forward(const LayerArgs& a, const LayerNormParams& p, bool reverse, bool train,
                           const rnn::RegularizerArgs& regularizers) {
  constexpr int64_t G = Cell::kGates;
  constexpr bool kLstm = Cell::kCellState;
  const Schedule sc = rnn::make_schedule(a.input, a.batch_sizes);
  const Dims d = rnn::check_forward<Cell>(rnn::kCpu, a, sc);
  const int64_t S = sc.rows, H = d.H, N = sc.batch, panels = ceil_div(H, kUnits);
  rnn::check_layer_norm_params(p, a.input, G, H);
  rnn::check_regularizers<Cell>(regularizers, a, sc, d);
  const RegularizerTensors reg_tensors(regularizers, a.hx);
  // Cell zoneout: c~_t of a step, which pass C normalises, apart from the carried c_t.
  at::Tensor c_fresh = kLstm && regularizers.cell_zoneout.has_value() ? at::empty({N, H}, a.input.options()) : at::Tensor();
  const at::Tensor x = a.input.reshape({S, d.I}).contiguous();
  const at::Tensor w_ih = a.w_ih.contiguous(), w_hh = a.w_hh.contiguous();
  const auto opts = x.options();
  const rnn::LayerNormWorkspace layout = Cell::workspace(S, H);
  at::Tensor ws = empty_cached({train ? layout.size : 0}, opts);
  // The input side: W_ih x for every row, then LN, gain and bias in place.
  at::Tensor gx = empty_large({S, G * H}, opts);
  gemm_out(gx, x, w_ih.t());
  at::Tensor x_bias, h_bias;
  if (a.b_ih.has_value()) x_bias = kLstm ? (*a.b_ih + *a.b_hh).contiguous() : a.b_ih->contiguous();
  if (!kLstm) h_bias = a.b_hh.has_value() ? a.b_hh->contiguous() : at::zeros({G * H}, opts);
  const at::Tensor gamma_ih = p.ln_ih_weight.contiguous(), gamma_hh = p.ln_hh_weight.contiguous();
  const at::Tensor gamma_c = kLstm ? p.ln_cell_weight->contiguous() : at::Tensor();
  const at::Tensor beta_c = kLstm ? p.ln_cell_bias->contiguous() : at::Tensor();
  at::Tensor out = empty_large({S, H}, opts);
  at::Tensor hbuf = a.hx.unsqueeze(0).expand({2, N, H}).contiguous();
  at::Tensor cy = kLstm ? a.cx->contiguous().clone() : at::Tensor();
  at::Tensor hy = at::empty({N, H}, opts);
  at::Tensor moments = at::empty({2, N, panels, 2}, opts);
  // Not training: the raw product and the gates of one step in scratch rows.
  at::Tensor step_raw = train ? at::Tensor() : at::empty({N, G * H}, opts);
  at::Tensor step_act = train ? at::Tensor() : at::empty({N, Cell::kSaved * H}, opts);
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "genfast::layernorm_rnn_forward", [&] {
    using T = scalar_t;
    auto ptr = [](const at::Tensor& t) { return t.defined() ? t.data_ptr<T>() : nullptr; };
    T* w = train ? ws.data_ptr<T>() : nullptr;
    auto section = [&](int64_t offset) { return w && offset >= 0 ? w + offset : nullptr; };
    input_layer_norm<T>(S, G * H, gx.data_ptr<T>(), gamma_ih.data_ptr<T>(), ptr(x_bias), section(layout.xhat_ih),
                        section(layout.rstd_ih));
    const bool in_place = read_weight_in_place(sc);
    const at::Tensor packed = in_place ? at::Tensor() : pack_recurrent_weight<T>(w_hh, G, H);
    constexpr int64_t kWidth = G * kUnits;
    std::vector<T> scratch(at::get_num_threads() * (N + 16) * kWidth);
    const double step_flops = 2.0 * N * H * G * H;
    const RegularizerBuffers<T> reg = reg_tensors.buffers<T>(nullptr);
    for_each_step(sc.steps, step_flops, [&](int64_t s, const StepTeam& team) {
      const int64_t t = sc.forward_step(s, reverse);
      const int64_t n = sc.active[t], off = sc.offset[t];
      const RegularizerStep<T> reg_step = reg.step(s, off, N, H, H);
      LnForwardStep<T> step{hbuf.data_ptr<T>() + (s % 2) * N * H,
                                  ptr(packed),
                                  w_hh.data_ptr<T>(),
                                  gx.data_ptr<T>() + off * G * H,
                                  gamma_hh.data_ptr<T>(),
                                  ptr(h_bias),
                                  ptr(gamma_c),
                                  ptr(beta_c),
                                  w ? w + layout.xhat_hh + off * G * H : step_raw.data_ptr<T>(),
                                  moments.data_ptr<T>(),
                                  moments.data_ptr<T>() + N * panels * 2,
                                  w ? w + layout.rstd_hh + off : nullptr,
                                  w ? w + layout.gates + off * Cell::kSaved * H : step_act.data_ptr<T>(),
                                  ptr(cy),
                                  w && kLstm ? w + layout.cell + off * H : nullptr,
                                  w && kLstm ? w + layout.cell_hat + off * H : nullptr,
                                  w && kLstm ? w + layout.rstd_cell + off : nullptr,
                                  out.data_ptr<T>() + off * H,
                                  hbuf.data_ptr<T>() + ((s + 1) % 2) * N * H,
                                  H,
                                  panels};
      if (regularizers.any()) {
        step.c_fresh = ptr(c_fresh);
        step.reg = &reg_step;
      }
      run_tiles<LnProductTile<G>>(team, panels, n, &step, scratch.data(), kWidth);
      team.sync();  // pass B needs every panel's moments of a row
      if constexpr (kLstm) {
        run_tiles<LnLstmGateTile>(team, panels, n, &step, scratch.data(), kWidth);
        team.sync();  // pass C needs every panel's moments of c_t
        run_tiles<LnLstmOutputTile>(team, panels, n, &step, scratch.data(), kWidth);
      } else {
        run_tiles<LnGruGateTile>(team, panels, n, &step, scratch.data(), kWidth);
      }
    }, row_split(sc, G * H * H * int64_t(sizeof(T)), static_cast<int64_t>(scratch.size())));
    gather_last_hidden<T>(sc, reverse, out.data_ptr<T>(), hy.data_ptr<T>(), H);
  });
  return {out.view(rnn::output_shape(a.input, H)), hy, cy, ws};
}

struct LnBackwardResult {
  at::Tensor grad_input, grad_hx, grad_cx, grad_w_ih, grad_w_hh, grad_b_ih, grad_b_hh, grad_ln_ih, grad_ln_hh,
      grad_ln_cell_weight, grad_ln_cell_bias;
};

template <typename Cell>
LnBackwardResult ln_backward(const LayerArgs& a, const LayerNormParams& p, const rnn::BackwardArgs& g, bool reverse,
                             const rnn::RegularizerArgs& regularizers) {
  constexpr int64_t G = Cell::kGates;
  constexpr bool kLstm = Cell::kCellState;
  const Schedule sc = rnn::make_schedule(a.input, a.batch_sizes);
  const Dims d = rnn::check_layer_norm_backward<Cell>(rnn::kCpu, a, p, g, sc);
  rnn::check_regularizers<Cell>(regularizers, a, sc, d);
  const RegularizerTensors reg_tensors(regularizers, at::Tensor());
  const int64_t S = sc.rows, H = d.H, N = sc.batch, panels = ceil_div(H, kUnits);
  const auto opts = a.input.options();
  const rnn::LayerNormWorkspace layout = Cell::workspace(S, H);
  const at::Tensor x = a.input.reshape({S, d.I}).contiguous();
  const at::Tensor go = g.grad_output.reshape({S, H}).contiguous();
  const at::Tensor out = g.output.reshape({S, H}).contiguous();
  const at::Tensor ws = g.workspace.contiguous(), hx = a.hx.contiguous();
  const at::Tensor cx = kLstm ? a.cx->contiguous() : at::Tensor();
  const at::Tensor w_ih = a.w_ih.contiguous(), w_hh = a.w_hh.contiguous();
  const at::Tensor gamma_ih = p.ln_ih_weight.contiguous(), gamma_hh = p.ln_hh_weight.contiguous();
  const at::Tensor gamma_c = kLstm ? p.ln_cell_weight->contiguous() : at::Tensor();
  const at::Tensor beta_c = kLstm ? p.ln_cell_bias->contiguous() : at::Tensor();
  at::Tensor dA = empty_cached({S, G * H}, opts);
  at::Tensor dA_h = kLstm ? dA : empty_cached({S, G * H}, opts);
  at::Tensor dhr = empty_cached({S, G * H}, opts);
  at::Tensor dY = kLstm ? empty_cached({S, H}, opts) : at::Tensor();
  at::Tensor dh_state = g.grad_hy.contiguous().clone();
  at::Tensor dc_state = kLstm ? g.grad_cy->contiguous().clone() : at::Tensor();
  at::Tensor sums = at::empty({2, N, panels, 2}, opts);
  at::Tensor h_prev = empty_cached({S, H}, opts);
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "genfast::layernorm_rnn_backward", [&] {
    using T = scalar_t;
    auto ptr = [](const at::Tensor& t) { return t.defined() ? t.data_ptr<T>() : nullptr; };
    const T* w = ws.data_ptr<T>();
    const BackwardWeight<T> whh(sc, w_hh);
    constexpr int64_t kWidth = G * kUnits;
    std::vector<T> scratch(at::get_num_threads() * (N + 16) * kWidth);
    const double step_flops = 2.0 * N * H * G * H;
    const RegularizerBuffers<T> reg = reg_tensors.buffers<T>(nullptr);
    for_each_step(sc.steps + 1, step_flops, [&](int64_t s, const StepTeam& team) {
      const auto pass = sc.backward_pass(s, reverse);
      const int64_t off = pass.offset;
      const RegularizerStep<T> reg_step = reg.step(s, off, N, H, H);
      const int64_t fwd_prev_off = pass.fwd_prev >= 0 ? sc.offset[pass.fwd_prev] : 0;
      const T* state_prev = kLstm ? w + layout.cell + fwd_prev_off * H : out.data_ptr<T>() + fwd_prev_off * H;
      LnBackwardStep<T> step{pass.prev_t >= 0 ? dhr.data_ptr<T>() + sc.offset[pass.prev_t] * G * H : nullptr,
                                   whh.packed_data(),
                                   whh.transposed_data(),
                                   go.data_ptr<T>() + off * H,
                                   w + layout.gates + off * Cell::kSaved * H,
                                   w + layout.xhat_hh + off * G * H,
                                   w + layout.rstd_hh + off,
                                   kLstm ? w + layout.cell_hat + off * H : nullptr,
                                   kLstm ? w + layout.rstd_cell + off : nullptr,
                                   ptr(gamma_c),
                                   ptr(beta_c),
                                   gamma_hh.data_ptr<T>(),
                                   state_prev,
                                   kLstm ? cx.data_ptr<T>() : hx.data_ptr<T>(),
                                   dh_state.data_ptr<T>(),
                                   ptr(dc_state),
                                   dA.data_ptr<T>() + off * G * H,
                                   dA_h.data_ptr<T>() + off * G * H,
                                   kLstm ? dY.data_ptr<T>() + off * H : nullptr,
                                   dhr.data_ptr<T>() + off * G * H,
                                   sums.data_ptr<T>(),
                                   sums.data_ptr<T>() + N * panels * 2,
                                   pass.n,
                                   pass.n_prev,
                                   sc.active_at(pass.fwd_prev),
                                   H,
                                   panels};
      if (regularizers.any()) step.reg = &reg_step;
      const int64_t rows = std::max(pass.n, pass.n_prev);
      if constexpr (kLstm) {
        run_tiles<LnLstmBackwardOutputTile>(team, panels, rows, &step, scratch.data(), kWidth);
        if (pass.n == 0) return;
        team.sync();  // pass 2 needs every panel's sums of LN(c)'s backward
        run_tiles<LnLstmBackwardCellTile>(team, panels, pass.n, &step, scratch.data(), kWidth);
      } else {
        run_tiles<LnGruBackwardGateTile>(team, panels, rows, &step, scratch.data(), kWidth);
        if (pass.n == 0) return;
      }
      team.sync();  // the last pass needs every panel's sums of the recurrent LN's backward
      run_tiles<LnRecurrentBackwardTile<G>>(team, panels, pass.n, &step, scratch.data(), kWidth);
    }, row_split(sc, G * H * H * int64_t(sizeof(T)), static_cast<int64_t>(scratch.size())));
    gather_previous_hidden<T>(sc, reverse, out.data_ptr<T>(), hx.data_ptr<T>(), h_prev.data_ptr<T>(), H);
    if (reg.recurrent_mask) mask_previous_hidden<T>(sc, reg.recurrent_mask, h_prev.data_ptr<T>(), H);
  });
  LnBackwardResult r;
  // The LN gains' and biases' gradients (column sums), and dA becomes dL/d(W_ih x) through the input
  // side's LN, in place, in the same pass over dA (for the LSTM, dA is also the recurrent side's).
  at::Tensor d_xi = dA;
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "genfast::layernorm_rnn_backward_input", [&] {
    using T = scalar_t;
    const T* w = ws.data_ptr<T>();
    const std::vector<at::Tensor> input_side =
        input_layer_norm_backward<T>(S, G * H, d_xi.data_ptr<T>(), gamma_ih.data_ptr<T>(), w + layout.xhat_ih,
                                     w + layout.rstd_ih, kLstm ? w + layout.xhat_hh : nullptr, opts);
    r.grad_ln_ih = input_side[0];
    r.grad_b_ih = input_side[2];
    if (kLstm) {
      r.grad_ln_hh = input_side[1];
      r.grad_b_hh = r.grad_b_ih;
      const std::vector<at::Tensor> cell = column_sums<T>(S, H, dY.data_ptr<T>(), w + layout.cell_hat, nullptr, opts);
      r.grad_ln_cell_weight = cell[0];
      r.grad_ln_cell_bias = cell[2];
    } else {
      const std::vector<at::Tensor> recurrent_side = column_sums<T>(S, G * H, dA_h.data_ptr<T>(), w + layout.xhat_hh, nullptr, opts);
      r.grad_ln_hh = recurrent_side[0];
      r.grad_b_hh = recurrent_side[2];
    }
  });
  if (g.input_grad) {
    at::Tensor grad_input = empty_cached({S, d.I}, opts);
    gemm_out(grad_input, d_xi, w_ih);
    r.grad_input = grad_input.view(a.input.sizes());
  } else {
    r.grad_input = rnn::skipped_input_grad(a.input);
  }
  r.grad_hx = dh_state;
  r.grad_cx = dc_state;
  r.grad_w_ih = gemm(d_xi.t(), x);
  r.grad_w_hh = gemm(dhr.t(), h_prev);
  return r;
}

// ---------------------------------------------------------------- the ops
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> layernorm_lstm_forward(
    const at::Tensor& input, const at::Tensor& hx, const at::Tensor& cx, const at::Tensor& w_ih,
    const at::Tensor& w_hh, const std::optional<at::Tensor>& b_ih, const std::optional<at::Tensor>& b_hh,
    const at::Tensor& ln_ih_weight, const at::Tensor& ln_hh_weight, const at::Tensor& ln_cell_weight,
    const at::Tensor& ln_cell_bias, const std::optional<at::Tensor>& batch_sizes, bool reverse, bool train,
    const std::optional<at::Tensor>& zoneout, const std::optional<at::Tensor>& cell_zoneout,
    const std::optional<at::Tensor>& recurrent_mask) {
  const LnForwardResult r = ln_forward<LayerNormLstmCell>(
      {input, hx, &cx, w_ih, w_hh, b_ih, b_hh, kNone, batch_sizes},
      {ln_ih_weight, ln_hh_weight, &ln_cell_weight, &ln_cell_bias}, reverse, train,
      {zoneout, cell_zoneout, recurrent_mask});
  return {r.output, r.hy, r.cy, r.workspace};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor,
           at::Tensor>
layernorm_lstm_backward(const at::Tensor& grad_output, const at::Tensor& grad_hy, const at::Tensor& grad_cy,
                        const at::Tensor& input, const at::Tensor& hx, const at::Tensor& cx, const at::Tensor& w_ih,
                        const at::Tensor& w_hh, const at::Tensor& ln_ih_weight, const at::Tensor& ln_hh_weight,
                        const at::Tensor& ln_cell_weight, const at::Tensor& ln_cell_bias, const at::Tensor& output,
                        const at::Tensor& workspace, const std::optional<at::Tensor>& batch_sizes, bool reverse,
                        const std::optional<at::Tensor>& zoneout, const std::optional<at::Tensor>& cell_zoneout,
                        const std::optional<at::Tensor>& recurrent_mask, bool input_grad) {
  const LnBackwardResult r = ln_backward<LayerNormLstmCell>(
      {input, hx, &cx, w_ih, w_hh, kNone, kNone, kNone, batch_sizes},
      {ln_ih_weight, ln_hh_weight, &ln_cell_weight, &ln_cell_bias},
      {grad_output, grad_hy, &grad_cy, output, workspace, 0, input_grad}, reverse, {zoneout, cell_zoneout, recurrent_mask});
  return {r.grad_input, r.grad_hx,    r.grad_cx,    r.grad_w_ih,          r.grad_w_hh,
          r.grad_b_ih,  r.grad_ln_ih, r.grad_ln_hh, r.grad_ln_cell_weight, r.grad_ln_cell_bias};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> layernorm_gru_forward(
    const at::Tensor& input, const at::Tensor& hx, const at::Tensor& w_ih, const at::Tensor& w_hh,
    const std::optional<at::Tensor>& b_ih, const std::optional<at::Tensor>& b_hh, const at::Tensor& ln_ih_weight,
    const at::Tensor& ln_hh_weight, const std::optional<at::Tensor>& batch_sizes, bool reverse, bool train,
    const std::optional<at::Tensor>& zoneout, const std::optional<at::Tensor>& recurrent_mask) {
  const LnForwardResult r =
      ln_forward<LayerNormGruCell>({input, hx, nullptr, w_ih, w_hh, b_ih, b_hh, kNone, batch_sizes},
                                   {ln_ih_weight, ln_hh_weight, nullptr, nullptr}, reverse, train,
                                   {zoneout, kNone, recurrent_mask});
  return {r.output, r.hy, r.workspace};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
layernorm_gru_backward(const at::Tensor& grad_output, const at::Tensor& grad_hy, const at::Tensor& input,
                       const at::Tensor& hx, const at::Tensor& w_ih, const at::Tensor& w_hh,
                       const at::Tensor& ln_ih_weight, const at::Tensor& ln_hh_weight, const at::Tensor& output,
                       const at::Tensor& workspace, const std::optional<at::Tensor>& batch_sizes, bool reverse,
                       const std::optional<at::Tensor>& zoneout, const std::optional<at::Tensor>& recurrent_mask,
                       bool input_grad) {
  const LnBackwardResult r =
      ln_backward<LayerNormGruCell>({input, hx, nullptr, w_ih, w_hh, kNone, kNone, kNone, batch_sizes},
                                    {ln_ih_weight, ln_hh_weight, nullptr, nullptr},
                                    {grad_output, grad_hy, nullptr, output, workspace, 0, input_grad}, reverse,
                                    {zoneout, kNone, recurrent_mask});
  return {r.grad_input, r.grad_hx,   r.grad_w_ih,  r.grad_w_hh,
          r.grad_b_ih,  r.grad_b_hh, r.grad_ln_ih, r.grad_ln_hh};
}

}  // namespace

TORCH_LIBRARY_IMPL(genfast, CPU, m) {
  m.impl("layernorm_lstm_forward", &layernorm_lstm_forward);
  m.impl("layernorm_lstm_backward", &layernorm_lstm_backward);
  m.impl("layernorm_gru_forward", &layernorm_gru_forward);
  m.impl("layernorm_gru_backward", &layernorm_gru_backward);
}

}  // namespace genfast::cpu
