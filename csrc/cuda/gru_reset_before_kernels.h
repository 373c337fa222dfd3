// Launchers for the element-wise kernels of the GRU with the reset gate before the recurrent product
// (rnn::GruResetBeforeCell, csrc/rnn/cells.h; kernels in csrc/cuda/gru_reset_before.cu, time loop in
// csrc/cuda/gru_reset_before_glue.cpp). torch-free: raw device pointers, sizes and a stream.
//
// A step is two dependent products, each followed by one of these kernels (one thread per row and
// hidden unit, gate math in AccT<T>):
//   forward:  gates_h = h W_h{r,z}^T  -> forward_reset:  r, z, r*h       (saved)
//             gates_h = (r*h) W_hn^T  -> forward_update: n (saved), h_t
//   backward: backward_update: dG_z, dG_n, d_h <- z dL/dh_t, h_{t-1} gathered
//             d_rh = dG_n W_hn        -> backward_reset: dG_r, d_h += r d_rh
//             then the glue adds dG_{r,z} W_h{r,z} to d_h.
// Regularisers (csrc/rnn/regularizers.h), each null when off. Recurrent dropout: both products read
// h_{t-1} * m (forward_reset's h_prev is that buffer, forward_update's the carried h), forward_update
// writes h_t * m for the next step, backward_reset multiplies d_rh by m and backward_update gathers
// h_{t-1} * m for dW_h{r,z}; the glue multiplies dG_{r,z} W_h{r,z} by m. Zoneout: forward_update zones
// h_t out against the carried h_{t-1}; backward_update splits dL/dh_t around the cell's backward.
#pragma once

#include <cstdint>

#include "rnn_kernels.h"

namespace genfast {
namespace cuda {

template <typename T>
struct ResetBeforeForwardArgs {
  int64_t rows = 0;            // active batch rows at this step
  int64_t hidden = 0;          // H
  const T* gates_x = nullptr;  // rows x 3H: W_ih x + b_ih + b_hh for this step's rows
  const T* gates_h = nullptr;  // contiguous: rows x 2H (forward_reset) or rows x H (forward_update)
  const T* h_prev = nullptr;   // batch x H: h_{t-1}
  T* saved = nullptr;          // rows x 4H: r, z, n, r*h (the workspace's rows, or a step buffer)
  T* h_dst = nullptr;          // forward_update: rows x H output rows
  T* h_dst2 = nullptr;         // forward_update: batch x H next state (may be h_prev: a thread reads first)
  const T* zoneout = nullptr;         // forward_update: rows x H, the weight of h_{t-1} in h_t
  const T* recurrent_mask = nullptr;  // forward_update: batch x H, m
  T* h_masked_dst = nullptr;          // forward_update: batch x H, receives h_t * m
};

template <typename T>
struct ResetBeforeBackwardArgs {
  int64_t rows = 0;
  int64_t hidden = 0;
  int64_t prev_rows = 0;        // rows active at the previous forward step; later rows start from hx
  const T* grad_out = nullptr;  // rows x H: dL/doutput
  T* d_h = nullptr;             // batch x H: what reached h_t besides the output gradient; left holding
                                // the direct part of dL/dh_{t-1}
  const T* saved = nullptr;     // rows x 4H from the forward step
  const T* h_prev = nullptr;    // prev_rows x H: output of the previous forward step
  const T* hx = nullptr;        // batch x H
  const T* d_rh = nullptr;      // backward_reset: rows x H, dG_n W_hn
  T* d_gates = nullptr;         // rows x 3H: dL/d(pre-activations), both sides
  T* h_prev_dst = nullptr;      // backward_update: rows x H, h_{t-1} gathered for W_hh's gradient
  const T* zoneout = nullptr;         // backward_update: rows x H
  const T* recurrent_mask = nullptr;  // batch x H
};

template <typename T>
cudaError_t reset_before_forward_reset(const ResetBeforeForwardArgs<T>& args, cudaStream_t stream);
template <typename T>
cudaError_t reset_before_forward_update(const ResetBeforeForwardArgs<T>& args, cudaStream_t stream);
template <typename T>
cudaError_t reset_before_backward_update(const ResetBeforeBackwardArgs<T>& args, cudaStream_t stream);
template <typename T>
cudaError_t reset_before_backward_reset(const ResetBeforeBackwardArgs<T>& args, cudaStream_t stream);

}  // namespace cuda
}  // namespace genfast
