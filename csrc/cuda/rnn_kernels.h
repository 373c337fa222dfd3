// Launchers for the fused RNN time-step kernels (csrc/cuda/rnn_step.cuh, instantiated per cell in
// csrc/cuda/lstm.cu and gru.cu), templated over the cell policy (csrc/rnn/cells.h).
//
// These know nothing of torch: raw device pointers, sizes, row strides and a stream.
// The caller (csrc/cuda/rnn_glue.cpp) runs the matrix products (input projection for
// the whole sequence, the recurrent product for each step) and calls one of these per
// time step; each launch handles the `rows` active batch rows of that step.
//
// Element types: float, double, __half, __nv_bfloat16. Gate math runs in AccT<T>
// (float for the 16-bit types, else T itself). All matrices are row-major with the
// row strides given; "rows x W" below means `rows` rows of W elements. G = Cell::kGates gate
// blocks of H columns each; the forward saves Cell::kSaved values of H per row.
//
// Previous-step state for backward: the step processed just before this one (in the
// direction of the sequence) had `prev_rows` active rows, whose saved values start at
// the `*_prev` pointers; row n < prev_rows takes its previous state from there, row
// n >= prev_rows (a sequence that starts at this step, only in the reverse direction
// of a packed batch) takes it from the initial state.
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

template <typename T>
struct ForwardStepArgs {
  int64_t rows = 0;    // active batch rows at this step
  int64_t hidden = 0;  // H
  const T* gates_x = nullptr;  // rows x G*H: W_ih x for this step's rows (no bias)
  int64_t ld_gates_x = 0;
  const T* gates_h = nullptr;  // rows x G*H: W_hh h_{t-1} (no bias), contiguous
  const T* b_ih = nullptr;     // G*H or null
  const T* b_hh = nullptr;     // G*H or null
  AccT<T>* c_state = nullptr;  // cells with a cell state: batch x H, read as c_{t-1}, overwritten with c_t
  const T* h_prev = nullptr;   // cells without: batch x H, h_{t-1}
  T* h_dst = nullptr;          // rows x H: the cell's h_t (before any projection)
  int64_t ld_h_dst = 0;
  T* h_dst2 = nullptr;  // optional second copy of h_t, same shape (may be h_prev: each thread reads first)
  int64_t ld_h_dst2 = 0;
  T* saved = nullptr;    // rows x kSaved*H, or null (inference)
  T* saved_c = nullptr;  // cells with a cell state: rows x H, c_t, or null
  // Regularisers (csrc/rnn/regularizers.h), each null when off. With zoneout h_prev is set for
  // every cell; under cell zoneout saved_c keeps the cell's own c~_t and carried_c the zoned c_t.
  const T* zoneout = nullptr;         // rows x H: the weight of h_{t-1} in h_t
  const T* cell_zoneout = nullptr;    // rows x H: the same for c
  T* carried_c = nullptr;             // rows x H, or null (inference)
  const T* recurrent_mask = nullptr;  // batch x H: r
  T* h_masked_dst = nullptr;          // batch x H: receives h_t * r, the next step's product input
};

template <typename T>
struct BackwardStepArgs {
  int64_t rows = 0;
  int64_t hidden = 0;      // H
  int64_t hidden_out = 0;  // H_out (H, or proj_size), <= H
  const T* d_h = nullptr;  // rows x H: dL/dh_t of the cell (before any projection)
  int64_t ld_d_h = 0;
  // Optional rows x H added to d_h (the recurrent part). Cells with a direct term
  // (Cell::kDirectHidden) overwrite it with that term; the caller then adds d_gates_h @ W_hh.
  T* d_h_extra = nullptr;
  int64_t ld_d_h_extra = 0;
  AccT<T>* d_c_state = nullptr;  // cells with a cell state: batch x H, dL/dc_t in, dL/dc_{t-1} out
  const T* saved = nullptr;      // rows x kSaved*H from the forward step
  const T* saved_c = nullptr;    // cells with a cell state: rows x H, c_t
  // The state the cell read: prev_rows x H from the previous step (saved c_{t-1}, or the output
  // h_{t-1}), and its initial value batch x H (cx, or hx).
  const T* state_prev = nullptr;
  const T* state_init = nullptr;
  int64_t prev_rows = 0;
  // h_{t-1} gathered into h_prev_dst (rows x H_out) for the W_hh gradient product.
  const T* output_prev = nullptr;  // prev_rows x H_out: the previous step's output
  const T* hx = nullptr;           // batch x H_out initial hidden state
  T* h_prev_dst = nullptr;
  T* d_gates_x = nullptr;  // rows x G*H: dL/d(input-side pre-activations)
  T* d_gates_h = nullptr;  // rows x G*H: dL/d(recurrent side), cells whose sides do not add; else null
  // Regularisers, each null when off. zoneout: d_h_extra receives the direct part (k * dL/dh_t,
  // plus the cell's own direct term), so the caller adds the recurrent product to it. cell_zoneout
  // splits dL/dc the same way. recurrent_mask (batch x H_out): h_prev_dst receives h_{t-1} * r.
  const T* zoneout = nullptr;         // rows x H
  const T* cell_zoneout = nullptr;    // rows x H
  const T* recurrent_mask = nullptr;  // batch x H_out
};

template <typename Cell, typename T>
cudaError_t forward_step(const ForwardStepArgs<T>& step, cudaStream_t stream);
template <typename Cell, typename T>
cudaError_t backward_step(const BackwardStepArgs<T>& step, cudaStream_t stream);

}  // namespace cuda
}  // namespace genfast
