// The fused RNN time-step kernels, forward and backward, written once over the cell policy
// (csrc/rnn/cells.h): one thread per (row, hidden unit) loads its gate values, calls the cell's
// per-thread math and stores what the step produces. The matrix products around them run in
// cuBLAS (via csrc/cuda/rnn_glue.cpp). Included by one .cu file per cell, which instantiates it.
#pragma once

#include "rnn/cells.h"
#include "rnn/regularizers.h"
#include "rnn_device.cuh"
#include "rnn_kernels.h"

namespace genfast {
namespace cuda {
namespace detail {

// The (row n, hidden unit j) of this thread; false past the last of rows x H.
__device__ __forceinline__ bool unit_of_thread(int64_t rows, int64_t H, int64_t& n, int64_t& j) {
  const int64_t index = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (index >= rows * H) return false;
  n = index / H;
  j = index - n * H;
  return true;
}

template <typename Cell, typename T>
__global__ void forward_step_kernel(const ForwardStepArgs<T> step) {
  using A = AccT<T>;
  constexpr int G = Cell::kGates;
  const int64_t H = step.hidden;
  int64_t n, j;
  if (!unit_of_thread(step.rows, H, n, j)) return;

  const T* gx = step.gates_x + n * step.ld_gates_x;
  const T* gh = step.gates_h + n * G * H;
  A x[G], h[G], b_ih[G], b_hh[G];
#pragma unroll
  for (int gate = 0; gate < G; ++gate) {
    const int64_t col = gate * H + j;
    x[gate] = to_acc(gx[col]);
    h[gate] = to_acc(gh[col]);
    b_ih[gate] = bias_or_zero(step.b_ih, col);
    b_hh[gate] = bias_or_zero(step.b_hh, col);
  }
  A no_cell_state = A(0);
  A* c = Cell::kCellState ? step.c_state + n * H + j : &no_cell_state;
  const A h_prev = Cell::kCellState ? A(0) : to_acc(step.h_prev[n * H + j]);
  A h_out;
  A saved[Cell::kSaved];
  // Zoneout reads the carried h_{t-1} and c_{t-1} before the cell overwrites them.
  const A h_before = step.zoneout != nullptr ? to_acc(step.h_prev[n * H + j]) : A(0);
  const A c_before = (Cell::kCellState && step.cell_zoneout != nullptr) ? *c : A(0);
  Cell::forward_thread(x, h, b_ih, b_hh, *c, h_prev, h_out, saved);
  if (step.zoneout != nullptr) h_out = rnn::zoneout<A>(to_acc(step.zoneout[n * H + j]), h_before, h_out);
  if (step.h_masked_dst != nullptr) step.h_masked_dst[n * H + j] = from_acc<T>(h_out * to_acc(step.recurrent_mask[n * H + j]));
  const T h_new = from_acc<T>(h_out);
  step.h_dst[n * step.ld_h_dst + j] = h_new;
  if (step.h_dst2 != nullptr) step.h_dst2[n * step.ld_h_dst2 + j] = h_new;
  if (step.saved != nullptr) {
    T* out = step.saved + n * Cell::kSaved * H + j;
#pragma unroll
    for (int slot = 0; slot < Cell::kSaved; ++slot) out[slot * H] = from_acc<T>(saved[slot]);
    if (Cell::kCellState) step.saved_c[n * H + j] = from_acc<T>(*c);
  }
  if (Cell::kCellState && step.cell_zoneout != nullptr) {  // the saved c~_t above; the carried c_t zoned
    *c = rnn::zoneout<A>(to_acc(step.cell_zoneout[n * H + j]), c_before, *c);
    if (step.carried_c != nullptr) step.carried_c[n * H + j] = from_acc<T>(*c);
  }
}

template <typename Cell, typename T>
__global__ void backward_step_kernel(const BackwardStepArgs<T> step) {
  using A = AccT<T>;
  constexpr int G = Cell::kGates;
  const int64_t H = step.hidden;
  int64_t n, j;
  if (!unit_of_thread(step.rows, H, n, j)) return;
  const bool continues = n < step.prev_rows;  // false: this row's sequence starts here

  A d_h = to_acc(step.d_h[n * step.ld_d_h + j]);
  if (step.d_h_extra != nullptr) d_h += to_acc(step.d_h_extra[n * step.ld_d_h_extra + j]);
  const T* saved_row = step.saved + n * Cell::kSaved * H + j;
  A saved[Cell::kSaved];
#pragma unroll
  for (int slot = 0; slot < Cell::kSaved; ++slot) saved[slot] = to_acc(saved_row[slot * H]);
  const A state_prev = to_acc(continues ? step.state_prev[n * H + j] : step.state_init[n * H + j]);
  const A c_cur = Cell::kCellState ? to_acc(step.saved_c[n * H + j]) : A(0);
  A no_cell_state = A(0);
  A* d_c = Cell::kCellState ? step.d_c_state + n * H + j : &no_cell_state;
  A d_x[G], d_hside[G], d_h_direct = A(0);
  A to_prev = A(0);  // zoneout: the direct part of dL/dh_{t-1}
  if (step.zoneout != nullptr) {
    const A keep = to_acc(step.zoneout[n * H + j]);
    to_prev = rnn::zoneout_grad_prev<A>(keep, d_h);
    d_h = rnn::zoneout_grad_fresh<A>(keep, d_h);
  }
  A d_c_next = A(0), cell_keep = A(0);
  if (Cell::kCellState && step.cell_zoneout != nullptr) {
    cell_keep = to_acc(step.cell_zoneout[n * H + j]);
    d_c_next = *d_c;
    *d_c = rnn::zoneout_grad_fresh<A>(cell_keep, d_c_next);
  }
  Cell::backward_thread(d_h, *d_c, saved, state_prev, c_cur, d_x, d_hside, d_h_direct);
  if (Cell::kCellState && step.cell_zoneout != nullptr) *d_c += rnn::zoneout_grad_prev<A>(cell_keep, d_c_next);
  if (Cell::kDirectHidden || step.zoneout != nullptr)
    step.d_h_extra[n * step.ld_d_h_extra + j] = from_acc<T>(d_h_direct + to_prev);
  T* d_gates_x = step.d_gates_x + n * G * H + j;
#pragma unroll
  for (int gate = 0; gate < G; ++gate) d_gates_x[gate * H] = from_acc<T>(d_x[gate]);
  if (!Cell::kSidesAdd) {
    T* d_gates_h = step.d_gates_h + n * G * H + j;
#pragma unroll
    for (int gate = 0; gate < G; ++gate) d_gates_h[gate * H] = from_acc<T>(d_hside[gate]);
  }

  // H_out <= H, so the first H_out threads of a row also gather h_{t-1}.
  const int64_t H_out = step.hidden_out;
  if (j < H_out) {
    const T h_prev = continues ? step.output_prev[n * H_out + j] : step.hx[n * H_out + j];
    step.h_prev_dst[n * H_out + j] =
        step.recurrent_mask != nullptr ? from_acc<T>(to_acc(h_prev) * to_acc(step.recurrent_mask[n * H_out + j]))
                                       : h_prev;
  }
}

}  // namespace detail

template <typename Cell, typename T>
cudaError_t forward_step(const ForwardStepArgs<T>& step, cudaStream_t stream) {
  const int64_t elements = step.rows * step.hidden;
  if (elements == 0) return cudaSuccess;
  detail::forward_step_kernel<Cell, T><<<step_blocks(elements), kStepThreads, 0, stream>>>(step);
  return cudaGetLastError();
}

template <typename Cell, typename T>
cudaError_t backward_step(const BackwardStepArgs<T>& step, cudaStream_t stream) {
  const int64_t elements = step.rows * step.hidden;
  if (elements == 0) return cudaSuccess;
  detail::backward_step_kernel<Cell, T><<<step_blocks(elements), kStepThreads, 0, stream>>>(step);
  return cudaGetLastError();
}

// The launchers of one cell for every element type the glue dispatches to.
#define GENFAST_INSTANTIATE_RNN_STEP(Cell)                                                                \
  template cudaError_t forward_step<Cell, float>(const ForwardStepArgs<float>&, cudaStream_t);           \
  template cudaError_t forward_step<Cell, double>(const ForwardStepArgs<double>&, cudaStream_t);         \
  template cudaError_t forward_step<Cell, __half>(const ForwardStepArgs<__half>&, cudaStream_t);         \
  template cudaError_t forward_step<Cell, __nv_bfloat16>(const ForwardStepArgs<__nv_bfloat16>&,          \
                                                         cudaStream_t);                                 \
  template cudaError_t backward_step<Cell, float>(const BackwardStepArgs<float>&, cudaStream_t);         \
  template cudaError_t backward_step<Cell, double>(const BackwardStepArgs<double>&, cudaStream_t);       \
  template cudaError_t backward_step<Cell, __half>(const BackwardStepArgs<__half>&, cudaStream_t);       \
  template cudaError_t backward_step<Cell, __nv_bfloat16>(const BackwardStepArgs<__nv_bfloat16>&,        \
                                                          cudaStream_t);

}  // namespace cuda
}  // namespace genfast
