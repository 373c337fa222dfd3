// Launchers for the fused LSTM / GRU time-step kernels (csrc/cuda/lstm.cu, gru.cu).
//
// These know nothing of torch: raw device pointers, sizes, row strides and a stream.
// The caller (csrc/cuda/rnn_glue.cpp) runs the matrix products (input projection for
// the whole sequence, the recurrent product for each step) and calls one of these per
// time step; each launch handles the `rows` active batch rows of that step.
//
// Element types: float, double, __half, __nv_bfloat16. Gate math runs in AccT<T>
// (float for the 16-bit types, else T itself). All matrices are row-major with the
// row strides given; "rows x W" below means `rows` rows of W elements.
//
// Previous-step state for backward: the step processed just before this one (in the
// direction of the sequence) had `prev_rows` active rows, whose saved values start at
// the `*_prev` pointers; row n < prev_rows takes its previous state from there, row
// n >= prev_rows (a sequence that starts at this step, only in the reverse direction
// of a packed batch) takes it from the initial state hx / cx.
#pragma once

#include <cstdint>

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

namespace genfast {
namespace cuda {

template <typename T>
struct Acc {
  using type = T;
};
template <>
struct Acc<__half> {
  using type = float;
};
template <>
struct Acc<__nv_bfloat16> {
  using type = float;
};
template <typename T>
using AccT = typename Acc<T>::type;

// ---- LSTM ------------------------------------------------------------------------
// Gate blocks are ordered i, f, g, o (PyTorch's order), each `hidden` wide.
template <typename T>
struct LstmForwardStep {
  int64_t rows = 0;    // active batch rows at this step
  int64_t hidden = 0;  // H
  const T* gates_x = nullptr;  // rows x 4H: W_ih x for this step's rows (no bias)
  int64_t ld_gates_x = 0;
  const T* gates_h = nullptr;  // rows x 4H: W_hh h_{t-1} (no bias), contiguous
  const T* b_ih = nullptr;     // 4H or null
  const T* b_hh = nullptr;     // 4H or null
  AccT<T>* c_state = nullptr;  // batch x H, read as c_{t-1}, overwritten with c_t
  T* h_dst = nullptr;          // rows x H: o * tanh(c_t) (before any projection)
  int64_t ld_h_dst = 0;
  T* h_dst2 = nullptr;  // optional second copy of o * tanh(c_t), same shape
  int64_t ld_h_dst2 = 0;
  T* saved_gates = nullptr;  // rows x 4H activated gates, or null (inference)
  T* saved_c = nullptr;      // rows x H: c_t, or null
};

template <typename T>
struct LstmBackwardStep {
  int64_t rows = 0;
  int64_t hidden = 0;      // H
  int64_t hidden_out = 0;  // H_out (H, or proj_size), <= H
  const T* d_h = nullptr;  // rows x H: dL/d(o * tanh c_t)
  int64_t ld_d_h = 0;
  const T* d_h_extra = nullptr;  // optional rows x H added to d_h (the recurrent part)
  int64_t ld_d_h_extra = 0;
  AccT<T>* d_c_state = nullptr;  // batch x H, read as dL/dc_t, overwritten with dL/dc_{t-1}
  const T* saved_gates = nullptr;  // rows x 4H from the forward step
  const T* saved_c = nullptr;      // rows x H: c_t
  const T* saved_c_prev = nullptr;  // prev_rows x H: c_{t-1} saved by the previous step
  int64_t prev_rows = 0;
  const T* cx = nullptr;  // batch x H initial cell state
  // h_{t-1} gathered into h_prev_dst (rows x H_out) for the W_hh gradient product.
  const T* output_prev = nullptr;  // prev_rows x H_out: the previous step's output
  const T* hx = nullptr;           // batch x H_out initial hidden state
  T* h_prev_dst = nullptr;
  T* d_gates = nullptr;  // rows x 4H: dL/d(pre-activation gates)
};

template <typename T>
cudaError_t lstm_forward_step(const LstmForwardStep<T>& step, cudaStream_t stream);
template <typename T>
cudaError_t lstm_backward_step(const LstmBackwardStep<T>& step, cudaStream_t stream);

// ---- GRU -------------------------------------------------------------------------
// Gate blocks r, z, n. Saved per row: r, z, n and h_n = W_hn h + b_hn (4H).
template <typename T>
struct GruForwardStep {
  int64_t rows = 0;
  int64_t hidden = 0;
  const T* gates_x = nullptr;  // rows x 3H: W_ih x (no bias)
  int64_t ld_gates_x = 0;
  const T* gates_h = nullptr;  // rows x 3H: W_hh h_{t-1} (no bias), contiguous
  const T* b_ih = nullptr;     // 3H or null
  const T* b_hh = nullptr;     // 3H or null
  T* h_state = nullptr;        // batch x H, read as h_{t-1}, overwritten with h_t
  T* output = nullptr;         // rows x H: h_t
  int64_t ld_output = 0;
  T* saved = nullptr;  // rows x 4H (r, z, n, h_n), or null (inference)
};

template <typename T>
struct GruBackwardStep {
  int64_t rows = 0;
  int64_t hidden = 0;
  const T* grad_output = nullptr;  // rows x H
  int64_t ld_grad_output = 0;
  // batch x H: read as the recurrent dL/dh_t, overwritten with the direct part of
  // dL/dh_{t-1} (z * dh); the caller then adds d_gates_h @ W_hh.
  T* d_h_state = nullptr;
  const T* saved = nullptr;  // rows x 4H from the forward step
  const T* output_prev = nullptr;  // prev_rows x H: h_{t-1} of continuing rows
  int64_t prev_rows = 0;
  const T* hx = nullptr;  // batch x H
  T* h_prev_dst = nullptr;  // rows x H: h_{t-1}, gathered for the W_hh gradient
  T* d_gates_x = nullptr;   // rows x 3H: dL/d(W_ih x + b_ih)
  T* d_gates_h = nullptr;   // rows x 3H: dL/d(W_hh h + b_hh)
};

template <typename T>
cudaError_t gru_forward_step(const GruForwardStep<T>& step, cudaStream_t stream);
template <typename T>
cudaError_t gru_backward_step(const GruBackwardStep<T>& step, cudaStream_t stream);

}  // namespace cuda
}  // namespace genfast
