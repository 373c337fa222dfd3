// The CPU time loops' hooks for the regularisers (zoneout of h and c, recurrent dropout; the math
// in csrc/rnn/regularizers.h, the design in docs/design.md "Regularisers"). Every hook is reached
// only when a step carries a RegularizerStep (the ops were given a mask); without one the loops in
// csrc/cpu/rnn.cpp run as before. The hooks work on whatever a cell produced (h, and c for cells with
// a cell state), so a cell gets the regularisers without code of its own.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <cstdint>

#include "cpu/simd.h"
#include "rnn/regularizers.h"
#include "rnn/regularizers_host.h"

namespace genfast::cpu {

// What one time step of a loop needs. Forward: all; backward: the masks.
template <typename T>
struct RegularizerStep {
  const T* h_product = nullptr;       // (N, Hout) h_{t-1} * r, read by the recurrent product; or nullptr
  T* h_product_next = nullptr;        // (N, Hout) receives h_t * r; or nullptr
  const T* recurrent_mask = nullptr;  // (N, Hout) r, or nullptr
  const T* zoneout = nullptr;         // (n, H) this step's rows of h's zoneout weights k, or nullptr
  const T* cell_zoneout = nullptr;    // (n, H) the same for c, or nullptr
  T* carried_c = nullptr;             // (n, H) training with cell zoneout: where the carried c_t goes
};

// The same for a whole loop, per step s at rows [off, off + n).
template <typename T>
struct RegularizerBuffers {
  T* h_product = nullptr;             // (2, N, Hout): h_{t-1} * r and h_t * r, alternating (recurrent dropout)
  const T* recurrent_mask = nullptr;  // (N, Hout)
  const T* zoneout = nullptr;         // (S, H)
  const T* cell_zoneout = nullptr;    // (S, H)
  T* carried_c = nullptr;             // (S, H): training with cell zoneout

  RegularizerStep<T> step(int64_t s, int64_t off, int64_t N, int64_t H, int64_t Hout) const {
    RegularizerStep<T> r;
    if (h_product) {
      r.h_product = h_product + (s % 2) * N * Hout;
      r.h_product_next = h_product + ((s + 1) % 2) * N * Hout;
    }
    r.recurrent_mask = recurrent_mask;
    r.zoneout = zoneout ? zoneout + off * H : nullptr;
    r.cell_zoneout = cell_zoneout ? cell_zoneout + off * H : nullptr;
    r.carried_c = carried_c ? carried_c + off * H : nullptr;
    return r;
  }
};

// The regularisers' tensors of one op call, contiguous, and (forward, recurrent dropout) the
// buffer of h * r the recurrent products read, both halves h_0 * r at first. hx: undefined in backward.
struct RegularizerTensors {
  at::Tensor zoneout, cell_zoneout, recurrent_mask, h_product;

  RegularizerTensors(const rnn::RegularizerArgs& r, const at::Tensor& hx) {
    if (r.zoneout.has_value()) zoneout = r.zoneout->contiguous();
    if (r.cell_zoneout.has_value()) cell_zoneout = r.cell_zoneout->contiguous();
    if (r.recurrent_mask.has_value()) {
      recurrent_mask = r.recurrent_mask->contiguous();
      // Both halves, as the state buffer: in reverse over packed input a sequence joins at a later
      // step and reads its initial state from whichever half that step reads.
      if (hx.defined()) h_product = at::mul(hx, recurrent_mask).unsqueeze(0).expand({2, hx.size(0), hx.size(1)}).contiguous();
    }
  }

  template <typename T>
  RegularizerBuffers<T> buffers(T* carried_c) const {
    auto ptr = [](const at::Tensor& t) { return t.defined() ? t.data_ptr<T>() : nullptr; };
    RegularizerBuffers<T> b;
    b.h_product = ptr(h_product);
    b.recurrent_mask = ptr(recurrent_mask);
    b.zoneout = ptr(zoneout);
    b.cell_zoneout = ptr(cell_zoneout);
    b.carried_c = cell_zoneout.defined() ? carried_c : nullptr;
    return b;
  }
};

// The zoneout weights of row m (units [j0, j0 + 16)), fetched ahead as the loops fetch their other row
// inputs (rnn_common.h, prefetch_gate_row): an (S, H) stream of its own, read once per pass.
template <typename T>
GENFAST_INLINE void prefetch_regularizer_row(const RegularizerStep<T>* r, int64_t m, int64_t j0, int64_t H) {
  for (const T* keep : {r->zoneout, r->cell_zoneout})
    if (keep) {
      __builtin_prefetch(keep + m * H + j0, 0, 3);
      __builtin_prefetch(keep + m * H + j0 + 15, 0, 3);
    }
}

// ---- forward: around the cell's update of row m (units [j0, j0 + units))

// Before the update: c_{t-1}, which the update overwrites in place and cell zoneout needs.
template <typename Cell, typename T>
GENFAST_INLINE void regularize_forward_before(const RegularizerStep<T>* r, const T* c, int64_t units, T* c_prev) {
  if (Cell::kCellState && r->cell_zoneout) rnn::copy_units<T>(units, c, c_prev);
}

// After the update (and after the workspace kept the cell's own c~_t): c and h zoned out, the
// carried c_t kept for backward, h_t * r written for the next step's product.
// h_prev: the carried h_{t-1} of this row; h: the output row; h_next: the next state's row.
template <typename Cell, typename T>
GENFAST_INLINE void regularize_forward_after(const RegularizerStep<T>* r, int64_t m, int64_t j0, int64_t units,
                                             int64_t H, int64_t Hout, const T* h_prev, const T* c_prev, T* c, T* h,
                                             T* h_next) {
  if (Cell::kCellState && r->cell_zoneout)
    rnn::zoneout_units<T>(units, r->cell_zoneout + m * H + j0, c_prev, c,
                          r->carried_c ? r->carried_c + m * H + j0 : nullptr);
  if (r->zoneout) rnn::zoneout_units<T>(units, r->zoneout + m * H + j0, h_prev, h, h_next);
  if (r->h_product_next)
    rnn::mask_units<T>(units, h_next, r->recurrent_mask + m * Hout + j0, r->h_product_next + m * Hout + j0);
}

// ---- backward

// The recurrent product of rows [r0, r0 + rows) is dL/d(h_{t-1} * r): times r it is dL/dh_{t-1}.
template <int64_t Width, typename T>
GENFAST_INLINE void mask_recurrent_rows(const RegularizerStep<T>* r, int64_t r0, int64_t rows, int64_t j0,
                                        int64_t cols, int64_t Hout, T* acc) {
  if (!r->recurrent_mask) return;
  for (int64_t m = r0; m < r0 + rows; ++m, acc += Width) {
    const T* mask = r->recurrent_mask + m * Hout + j0;
    for (int64_t u = 0; u < cols; ++u) acc[u] *= mask[u];
  }
}

// A cell without a direct hidden term (its backward takes the total dL/dh_t): d_h is the total of
// row m, and the core has zeroed dh_row (dL/dh_{t-1} from outside the recurrence). Zoneout sends
// k * d_h to h_{t-1} and (1 - k) * d_h to the cell; cell zoneout splits dL/dc_t the same way.
// cell_backward() runs the cell's backward on d_h and dc_row.
template <typename Cell, typename T, typename CellBackward>
GENFAST_INLINE void regularized_cell_backward(const RegularizerStep<T>* r, int64_t m, int64_t j0, int64_t units,
                                              int64_t H, T* d_h, T* dh_row, T* dc_row,
                                              const CellBackward& cell_backward) {
  if (r->zoneout) rnn::zoneout_grad_units<T>(units, r->zoneout + m * H + j0, d_h, dh_row, /*store=*/true);
  if (!(Cell::kCellState && r->cell_zoneout)) {
    cell_backward();
    return;
  }
  const T* keep = r->cell_zoneout + m * H + j0;
  T dc_next[16];
  rnn::copy_units<T>(units, dc_row, dc_next);
  for (int64_t u = 0; u < units; ++u) dc_row[u] = rnn::zoneout_grad_fresh<T>(keep[u], dc_next[u]);
  cell_backward();
  for (int64_t u = 0; u < units; ++u) dc_row[u] += rnn::zoneout_grad_prev<T>(keep[u], dc_next[u]);
}

// A cell with a direct hidden term (Cell::kDirectHidden) under h zoneout: its backward forms the
// total from (go, dh, rec) and rewrites dh with its direct term, so it is given the zoned part of
// the total alone, with dh zeroed, and the zoneout's direct part is added after.
// backward(d_fresh, direct, zeros) calls the cell's backward_units with those three in place of
// (grad_out row, dh row, recurrent row).
template <int64_t Units, typename T, typename DirectBackward>
GENFAST_INLINE void zoneout_direct_cell_backward(const RegularizerStep<T>* r, int64_t m, int64_t j0, int64_t units,
                                                 int64_t H, const T* go, T* dh, const T* rec,
                                                 const DirectBackward& backward) {
  const T* keep = r->zoneout + m * H + j0;
  static constexpr T zeros[Units] = {};
  T d_fresh[Units], direct[Units], to_prev[Units];
  for (int64_t u = 0; u < units; ++u) {
    const T total = go[u] + dh[u] + rec[u];
    d_fresh[u] = rnn::zoneout_grad_fresh<T>(keep[u], total);
    to_prev[u] = rnn::zoneout_grad_prev<T>(keep[u], total);
    direct[u] = T(0);
  }
  backward(static_cast<const T*>(d_fresh), static_cast<T*>(direct), static_cast<const T*>(zeros));
  for (int64_t u = 0; u < units; ++u) dh[u] = direct[u] + to_prev[u];
}

// h_{t-1} of every row, gathered for dW_hh, times r: the recurrent product read h_{t-1} * r.
template <typename T>
void mask_previous_hidden(const rnn::Schedule& sc, const T* mask, T* h_prev, int64_t Hout) {
  at::parallel_for(0, sc.steps, 1, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t)
      for (int64_t m = 0; m < sc.active[t]; ++m) {
        T* row = h_prev + (sc.offset[t] + m) * Hout;
        const T* r = mask + m * Hout;
        for (int64_t u = 0; u < Hout; ++u) row[u] *= r[u];
      }
  });
}

}  // namespace genfast::cpu
