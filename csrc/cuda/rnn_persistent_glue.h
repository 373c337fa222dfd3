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

// The backward of one layer and direction as rnn_backward has it set up.
struct PersistentBackwardLayer {
  at::Tensor w_hh;         // (G*H, H), contiguous
  at::Tensor grad_output;  // (T*N, H), contiguous
  at::Tensor hx, cx;       // (N, H), contiguous; cx for cells with a cell state
  at::Tensor output;       // (T*N, H): the forward's output
  at::Tensor saved;        // (T*N * kSaved*H) view of the workspace
  at::Tensor saved_c;      // cells with a cell state: (T*N * H) view of the workspace
  at::Tensor dh_state;     // (N, H), the input's dtype: grad_hy in, grad_hx out (the kernel carries it in fp32)
  at::Tensor dc_state;     // (N, H) float: grad_cy in, grad_cx out; cells with a cell state
  at::Tensor d_gates, d_gates_h;  // (T*N, G*H); d_gates_h the same tensor when the cell's sides add
  at::Tensor h_prev;       // (T*N, H)
  int64_t steps = 0, batch = 0, hidden = 0;
  bool reverse = false;
  std::vector<int64_t> step_rows, step_offset;  // packed input, as in PersistentLayer; empty when padded
  bool projected = false, regularized = false;
};

// Runs the backward on the persistent kernel when enabled and its plan fits (filling d_gates, d_gates_h, h_prev,
// dh_state, dc_state); returns false (and records why) when the per-step loop must run instead.
template <typename Cell>
bool run_persistent_backward(const PersistentBackwardLayer& layer);

}  // namespace cuda
}  // namespace genfast
