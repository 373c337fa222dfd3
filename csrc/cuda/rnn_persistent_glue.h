// The choice between the persistent RNN forward kernel (rnn_persistent.h, issue 20) and the per-step
// path of csrc/cuda/rnn_glue.cpp, made once per layer and direction, and the record of it that
// torch.ops.genfast.rnn_cuda_path() (genfast.info()) reads. Opt-in until a GPU run measures it:
// GENFAST_RNN_PERSISTENT=1 in the environment, read at every call.
#pragma once

#include <ATen/ATen.h>

#include <string>
#include <vector>

namespace genfast {
namespace cuda {

// One layer and direction as the per-step path has it set up: the input projection done, the
// output and the states allocated. Undefined tensors are absent (bias, cell state, workspace).
struct PersistentLayer {
  at::Tensor gates_x;   // (T*N, G*H), the input's dtype
  at::Tensor w_hh;      // (G*H, H), contiguous
  at::Tensor b_ih, b_hh;
  at::Tensor hx;        // (N, H), contiguous
  at::Tensor c_state;   // (N, H) float, cx in, the last c out; cells with a cell state
  at::Tensor output;    // (S, H): h_t, rows offset[t]..
  at::Tensor saved;     // training: (S, kSaved*H) view of the workspace, else undefined
  at::Tensor saved_c;   // training, cells with a cell state: (S, H), else undefined
  int64_t steps = 0, batch = 0, hidden = 0;
  bool reverse = false;
  // Packed input: the rows active at each step and where each step starts (rnn::Schedule's active and
  // offset); empty when padded.
  std::vector<int64_t> step_rows, step_offset;
  // What the persistent kernel does not do (the per-step path runs, with the reason recorded).
  bool projected = false;
  bool regularized = false;
};

// Runs the layer on the persistent kernel when GENFAST_RNN_PERSISTENT=1 and the plan fits on the current
// device; returns false (and records why) when the per-step path must run instead.
template <typename Cell>
bool run_persistent_forward(const PersistentLayer& layer);

}  // namespace cuda
}  // namespace genfast
