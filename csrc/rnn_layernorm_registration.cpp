// The schemas of the layer-normalised recurrent ops (issue 19), a fragment of torch.ops.genfast
// declared apart from the core's (csrc/registration.cpp). Kernels: csrc/cpu/rnn_layernorm.cpp;
// autograd: csrc/rnn_layernorm_autograd.cpp; fake kernels: genfast/ops/layernorm_rnn.py. The cells'
// equations and workspace: csrc/rnn/layernorm_cells.h.
#include <torch/library.h>

#include <string>
#include <vector>

#include "rnn/layernorm_cells.h"

namespace genfast::rnn {
namespace {

// [H-wide values, scalars] the training workspace of `cell` holds per row of the sequence.
std::vector<int64_t> layernorm_rnn_workspace_layout(const std::string& cell) {
  if (cell == LayerNormLstmCell::kName)
    return {LayerNormWorkspace::wide_per_row(LayerNormLstmCell::kGates, LayerNormLstmCell::kSaved, true),
            LayerNormWorkspace::scalars_per_row(true)};
  if (cell == LayerNormGruCell::kName)
    return {LayerNormWorkspace::wide_per_row(LayerNormGruCell::kGates, LayerNormGruCell::kSaved, false),
            LayerNormWorkspace::scalars_per_row(false)};
  TORCH_CHECK(false, "cell: unknown layer-normalised RNN cell '", cell, "' (layernorm_lstm, layernorm_gru)");
}

}  // namespace
}  // namespace genfast::rnn

TORCH_LIBRARY_FRAGMENT(genfast, m) {
  // ---- LayerNormLSTM: one layer, one direction, the whole sequence ------------------------
  // input: (T, N, I) padded, or (S, I) packed with batch_sizes (int64, CPU, length T). Gains
  // ln_ih_weight, ln_hh_weight (4H), ln_cell_weight and bias ln_cell_bias (H).
  m.def(
      "layernorm_lstm_forward(Tensor input, Tensor hx, Tensor cx, Tensor w_ih, Tensor w_hh, Tensor? b_ih, "
      "Tensor? b_hh, Tensor ln_ih_weight, Tensor ln_hh_weight, Tensor ln_cell_weight, Tensor ln_cell_bias, "
      "Tensor? batch_sizes, bool reverse, bool train, Tensor? zoneout=None, Tensor? cell_zoneout=None, "
      "Tensor? recurrent_mask=None) -> (Tensor output, Tensor hy, Tensor cy, Tensor workspace)");
  m.def(
      "layernorm_lstm_backward(Tensor grad_output, Tensor grad_hy, Tensor grad_cy, Tensor input, Tensor hx, "
      "Tensor cx, Tensor w_ih, Tensor w_hh, Tensor ln_ih_weight, Tensor ln_hh_weight, Tensor ln_cell_weight, "
      "Tensor ln_cell_bias, Tensor output, Tensor workspace, Tensor? batch_sizes, bool reverse, "
      "Tensor? zoneout=None, Tensor? cell_zoneout=None, Tensor? recurrent_mask=None, bool input_grad=True) "
      "-> (Tensor grad_input, Tensor grad_hx, Tensor grad_cx, Tensor grad_w_ih, Tensor grad_w_hh, Tensor grad_bias, "
      "Tensor grad_ln_ih_weight, Tensor grad_ln_hh_weight, Tensor grad_ln_cell_weight, Tensor grad_ln_cell_bias)");
  // Regularisers, each optional, as the plain ops take them (csrc/registration.cpp, docs/design.md
  // "Regularisers"): zoneout, cell_zoneout (S, H) the weight of h_{t-1} (c_{t-1}) per row of the
  // sequence; recurrent_mask (N, H) multiplies h_{t-1} where it enters W_hh h_{t-1}. The workspace
  // keeps its size (under cell zoneout its cell slot holds the carried c_t). The backward takes the
  // forward's masks. input_grad=False skips grad_input (empty), as the plain ops do.
  // ---- LayerNormGRU (gates r, z, n as torch's GRU, on the normalised sides) ----------------
  m.def(
      "layernorm_gru_forward(Tensor input, Tensor hx, Tensor w_ih, Tensor w_hh, Tensor? b_ih, Tensor? b_hh, "
      "Tensor ln_ih_weight, Tensor ln_hh_weight, Tensor? batch_sizes, bool reverse, bool train, "
      "Tensor? zoneout=None, Tensor? recurrent_mask=None) -> (Tensor output, Tensor hy, Tensor workspace)");
  m.def(
      "layernorm_gru_backward(Tensor grad_output, Tensor grad_hy, Tensor input, Tensor hx, Tensor w_ih, "
      "Tensor w_hh, Tensor ln_ih_weight, Tensor ln_hh_weight, Tensor output, Tensor workspace, "
      "Tensor? batch_sizes, bool reverse, Tensor? zoneout=None, Tensor? recurrent_mask=None, bool input_grad=True) "
      "-> (Tensor grad_input, Tensor grad_hx, Tensor grad_w_ih, "
      "Tensor grad_w_hh, Tensor grad_b_ih, Tensor grad_b_hh, Tensor grad_ln_ih_weight, Tensor grad_ln_hh_weight)");
  // [H-wide values, scalars] per row of the training workspace of "layernorm_lstm" or
  // "layernorm_gru" (csrc/rnn/layernorm_cells.h), for the fake kernels.
  m.def("layernorm_rnn_workspace_layout(str cell) -> int[]");
}

// No tensor argument to dispatch on: one kernel for every backend.
TORCH_LIBRARY_IMPL(genfast, CompositeExplicitAutograd, m) {
  m.impl("layernorm_rnn_workspace_layout", &genfast::rnn::layernorm_rnn_workspace_layout);
}
