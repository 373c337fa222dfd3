// What the CPU and CUDA layer-normalised RNN ops share on the host beyond csrc/rnn/rnn_host.h: the LN
// parameters and their checks, and the backward's checks (the workspace is rnn::LayerNormWorkspace,
// not the plain cells' layout). Used by csrc/cpu/rnn_layernorm.cpp and csrc/cuda/rnn_layernorm_glue.cpp.
#pragma once

#include <ATen/ATen.h>

#include <vector>

#include "rnn/layernorm_cells.h"
#include "rnn/rnn_host.h"

namespace genfast {
namespace rnn {

// The LN parameters of a cell: gains of both sides (gates*H) and, for the LSTM, the cell's gain and bias (H).
struct LayerNormParams {
  const at::Tensor& ln_ih_weight;
  const at::Tensor& ln_hh_weight;
  const at::Tensor* ln_cell_weight;
  const at::Tensor* ln_cell_bias;
};

inline void check_layer_norm_vector(const at::Tensor& t, const char* name, const at::Tensor& input, int64_t size) {
  check_same(t, name, input);
  check_shape(t, name, {size});
}

inline void check_layer_norm_params(const LayerNormParams& p, const at::Tensor& input, int64_t gates, int64_t H) {
  check_layer_norm_vector(p.ln_ih_weight, "ln_ih_weight", input, gates * H);
  check_layer_norm_vector(p.ln_hh_weight, "ln_hh_weight", input, gates * H);
  if (p.ln_cell_weight) check_layer_norm_vector(*p.ln_cell_weight, "ln_cell_weight", input, H);
  if (p.ln_cell_bias) check_layer_norm_vector(*p.ln_cell_bias, "ln_cell_bias", input, H);
}

// The backward's checks: the layer's (check_layer), the LN parameters', and those of the gradients,
// the output and the workspace (Cell::workspace's size: regularisers add nothing to it).
template <typename Cell>
Dims check_layer_norm_backward(const Backend& backend, const LayerArgs& a, const LayerNormParams& p,
                               const BackwardArgs& b, const Schedule& sc) {
  const Dims d = check_layer<Cell>(backend, a, sc);
  check_layer_norm_params(p, a.input, Cell::kGates, d.H);
  const std::vector<int64_t> out_shape = output_shape(a.input, d.H);
  check_same(b.output, "output", a.input);
  check_shape(b.output, "output", out_shape);
  check_same(b.grad_output, "grad_output", a.input);
  check_shape(b.grad_output, "grad_output", out_shape);
  check_same(b.grad_hy, "grad_hy", a.input);
  check_shape(b.grad_hy, "grad_hy", {sc.batch, d.H});
  if (Cell::kCellState) {
    check_same(*b.grad_cy, "grad_cy", a.input);
    check_shape(*b.grad_cy, "grad_cy", {sc.batch, d.H});
  }
  check_same(b.workspace, "workspace", a.input);
  const int64_t expected = Cell::workspace(sc.rows, d.H).size;
  TORCH_CHECK(b.workspace.dim() == 1 && b.workspace.numel() == expected, "workspace: has ", b.workspace.numel(),
              " elements, not ", expected, "; it must come from ", Cell::kName,
              "_forward(..., train=True) on the same inputs");
  return d;
}

}  // namespace rnn
}  // namespace genfast
