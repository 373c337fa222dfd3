// The regularisers the RNN core applies around any cell (docs/design.md, "Regularisers"), as
// torch-free math shared by the CPU loops (csrc/cpu/rnn_regularizers.h) and the CUDA step kernels
// (csrc/cuda/rnn_step.cuh). A cell knows nothing of them: the core zones out whatever h (and c) the
// cell produced, and multiplies h_{t-1} by the recurrent mask where it enters the recurrent product.
//
//   zoneout:            h_t = k * h_{t-1} + (1 - k) * h~_t, k per (row, unit, step): the weight of the
//                       previous value (a Bernoulli(p) draw in training, p itself in eval). The cell
//                       state c the same with its own k. h~_t and c~_t are what the cell computes from
//                       the carried h_{t-1}, c_{t-1} (h~_t = o tanh(c~_t) for the LSTM).
//   recurrent dropout:  the recurrent product reads h_{t-1} * r, r per (row, unit), one per call;
//                       the carried state is not masked.
#pragma once

#include <cstdint>

#include "rnn/cells.h"

namespace genfast {
namespace rnn {

// k * prev + (1 - k) * fresh: exactly prev at k = 1 and exactly fresh at k = 0.
template <typename T>
GENFAST_HD T zoneout(T keep, T prev, T fresh) {
  return keep * prev + (T(1) - keep) * fresh;
}

// The backward of zoneout for dL/d value_t = d: the part reaching the cell's fresh value, and
// the direct part reaching value_{t-1}.
template <typename T>
GENFAST_HD T zoneout_grad_fresh(T keep, T d) {
  return (T(1) - keep) * d;
}
template <typename T>
GENFAST_HD T zoneout_grad_prev(T keep, T d) {
  return keep * d;
}

// CPU: one row of units. value holds the fresh value and receives the zoned one; copy (if not
// nullptr) receives it too.
template <typename T>
GENFAST_CELL_LOOP void zoneout_units(int64_t units, const T* __restrict__ keep, const T* __restrict__ prev,
                                     T* __restrict__ value, T* __restrict__ copy) {
  for (int64_t u = 0; u < units; ++u) value[u] = zoneout<T>(keep[u], prev[u], value[u]);
  if (copy) copy_units<T>(units, value, copy);
}

// CPU: splits d (dL/d value_t, in place) into the fresh value's part (left in d) and adds the
// direct part to prev_grad, or stores it there when `store`.
template <typename T>
GENFAST_CELL_LOOP void zoneout_grad_units(int64_t units, const T* __restrict__ keep, T* __restrict__ d,
                                          T* __restrict__ prev_grad, bool store) {
  if (store)
    for (int64_t u = 0; u < units; ++u) prev_grad[u] = zoneout_grad_prev<T>(keep[u], d[u]);
  else
    for (int64_t u = 0; u < units; ++u) prev_grad[u] += zoneout_grad_prev<T>(keep[u], d[u]);
  for (int64_t u = 0; u < units; ++u) d[u] = zoneout_grad_fresh<T>(keep[u], d[u]);
}

// CPU: out = a * mask over one row of units.
template <typename T>
GENFAST_CELL_LOOP void mask_units(int64_t units, const T* __restrict__ a, const T* __restrict__ mask,
                                  T* __restrict__ out) {
  for (int64_t u = 0; u < units; ++u) out[u] = a[u] * mask[u];
}

}  // namespace rnn
}  // namespace genfast
