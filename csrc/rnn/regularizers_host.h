// The regularisers' tensors as every RNN op takes them (schema: csrc/registration.cpp; the math:
// csrc/rnn/regularizers.h; the design: docs/design.md "Regularisers"), and their checks, shared by
// the CPU and CUDA ops.
#pragma once

#include <ATen/ATen.h>

#include <optional>

#include "rnn/rnn_host.h"

namespace genfast {
namespace rnn {

// Each optional; none given is the plain cell.
//   zoneout         (S, H) per row of the (packed or flattened) sequence: the weight k of h_{t-1} in h_t
//   cell_zoneout    (S, H) the same for the cell state c (cells with one)
//   recurrent_mask  (N, Hout) multiplies h_{t-1} where it enters the recurrent product
struct RegularizerArgs {
  const std::optional<at::Tensor>& zoneout;
  const std::optional<at::Tensor>& cell_zoneout;
  const std::optional<at::Tensor>& recurrent_mask;

  bool any() const { return zoneout.has_value() || cell_zoneout.has_value() || recurrent_mask.has_value(); }
  // H-wide values per row the training workspace holds beyond the cell's layout: the carried c_t
  // under cell zoneout (the cell's slot keeps its own c~_t), at the end.
  int64_t extra_workspace_values() const { return cell_zoneout.has_value() ? 1 : 0; }
};

inline const std::optional<at::Tensor> kNoRegularizer;
inline const RegularizerArgs kNoRegularizers{kNoRegularizer, kNoRegularizer, kNoRegularizer};

template <typename Cell>
void check_regularizers(const RegularizerArgs& r, const LayerArgs& a, const Schedule& sc, const Dims& d) {
  if (!r.any()) return;
  TORCH_CHECK(!(Cell::kProjection && a.w_hr.has_value()),
              "zoneout, cell_zoneout, recurrent_mask: not supported with a projection (w_hr)");
  if (r.zoneout.has_value()) {
    check_same(*r.zoneout, "zoneout", a.input);
    check_shape(*r.zoneout, "zoneout", {sc.rows, d.H});
  }
  if (r.cell_zoneout.has_value()) {
    TORCH_CHECK(Cell::kCellState, "cell_zoneout: the ", Cell::kName, " cell has no cell state");
    check_same(*r.cell_zoneout, "cell_zoneout", a.input);
    check_shape(*r.cell_zoneout, "cell_zoneout", {sc.rows, d.H});
  }
  if (r.recurrent_mask.has_value()) {
    check_same(*r.recurrent_mask, "recurrent_mask", a.input);
    check_shape(*r.recurrent_mask, "recurrent_mask", {sc.batch, d.Hout});
  }
}

}  // namespace rnn
}  // namespace genfast
