// Launchers of the persistent RNN forward kernel (csrc/cuda/rnn_persistent.cu, issue 20): the whole
// time loop of one layer and direction in one cooperative launch, each block keeping its slice of
// W_hh in shared memory for every step and the grid synchronising once per step. The partition is
// csrc/rnn/persistent_plan.h's; the caller (csrc/cuda/rnn_persistent_glue.cpp) makes the plan,
// runs the input projection for all steps before the launch and falls back to the per-step path
// (rnn_kernels.h) where the plan does not fit.
//
// Torch-free: raw device pointers, sizes and a stream. Element types float, __half and
// __nv_bfloat16, with float accumulation and a float cell state. Padded or packed sequences, no
// projection, no regularisers.
#pragma once

#include <cstdint>

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

namespace genfast {
namespace cuda {

template <typename T>
struct PersistentForwardArgs {
  int64_t steps = 0;   // T
  int64_t batch = 0;   // N
  int64_t hidden = 0;  // H
  bool reverse = false;         // process t = T-1 .. 0
  const T* w_hh = nullptr;      // G*H x H, row-major (torch's layout), 16-byte aligned
  const T* gates_x = nullptr;   // T*N x G*H: W_ih x of row (t*N + n), no bias
  const T* b_ih = nullptr;      // G*H or null
  const T* b_hh = nullptr;      // G*H or null
  const T* hx = nullptr;        // N x H, 16-byte aligned: h_{-1}
  float* c_state = nullptr;     // cells with a cell state: N x H, c_{-1} in, the last c out
  T* output = nullptr;          // T*N x H, 16-byte aligned: h_t at rows t*N.., read back as h_{t-1}
  T* saved = nullptr;           // training: T*N x kSaved*H (the cell's saved values), or null
  T* saved_c = nullptr;         // training, cells with a cell state: T*N x H, c_t, or null
  // Packed input (device arrays of T, or null when padded): rows active at step t and the row where step t
  // starts in gates_x, output and saved (S rows in all instead of T*N); persistent::Layout::rows / offset.
  const int64_t* step_rows = nullptr;
  const int64_t* step_offset = nullptr;
};

// The backward (BPTT) of one layer and direction, padded or packed, with what the forward saved: per step
// the cell's backward for every (row, unit), then, after the grid barrier, dL/dh_{t-1} = dG W_hh (+ the cell's
// direct term) for each block's units from its W_hh^T slice. The weight and input gradients are products of
// d_gates, d_gates_h and h_prev after it (the caller's).
template <typename T>
struct PersistentBackwardArgs {
  int64_t steps = 0, batch = 0, hidden = 0;
  bool reverse = false;
  const T* w_hh = nullptr;         // G*H x H
  const T* grad_output = nullptr;  // T*N x H
  const T* hx = nullptr;           // N x H
  const T* cx = nullptr;           // cells with a cell state: N x H
  const T* output = nullptr;       // T*N x H: the forward's h_t
  const T* saved = nullptr;        // T*N x kSaved*H: the forward's saved values
  const T* saved_c = nullptr;      // cells with a cell state: T*N x H, c_t
  float* dh_state = nullptr;       // N x H: dL/dh_T in, dL/dh_{-1} (grad_hx) out
  float* dc_state = nullptr;       // cells with a cell state: N x H, dL/dc_T in, grad_cx out
  T* d_gates = nullptr;            // T*N x G*H: gradients of the input-side pre-activations (16-byte aligned)
  T* d_gates_h = nullptr;          // T*N x G*H: of the recurrent side, cells whose sides do not add; else null
  T* h_prev = nullptr;             // T*N x H: h_{t-1} gathered for the W_hh gradient
  // Packed input, as in PersistentForwardArgs (S rows in all instead of T*N); null when padded.
  const int64_t* step_rows = nullptr;
  const int64_t* step_offset = nullptr;
};

// The launch the plan chose (persistent::Plan's fields of the same names; chunk_columns for the backward).
struct PersistentLaunch {
  int grid = 0;
  int threads = 0;
  int64_t units_per_block = 0;
  int64_t smem_bytes = 0;
  int64_t chunk_columns = 0;
};

template <typename Cell, typename T>
cudaError_t persistent_backward_occupancy(int threads, int64_t smem_bytes, int* regs_per_thread, int* blocks_per_sm);

template <typename Cell, typename T>
cudaError_t persistent_backward(const PersistentBackwardArgs<T>& args, const PersistentLaunch& launch,
                                cudaStream_t stream);

// The kernel's registers per thread and how many blocks of `threads` threads and `smem_bytes` of dynamic
// shared memory the runtime can keep resident per SM (0 when they do not fit at all).
template <typename Cell, typename T>
cudaError_t persistent_forward_occupancy(int threads, int64_t smem_bytes, int* regs_per_thread, int* blocks_per_sm);

// One cooperative launch for the whole sequence. Errors (cudaErrorCooperativeLaunchTooLarge among them)
// are returned before anything runs.
template <typename Cell, typename T>
cudaError_t persistent_forward(const PersistentForwardArgs<T>& args, const PersistentLaunch& launch,
                               cudaStream_t stream);

}  // namespace cuda
}  // namespace genfast
