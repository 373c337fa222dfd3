// Fused GRU time step, forward and backward (one launch per step; see rnn_kernels.h).
//
// PyTorch's convention: r, z from (W_i x + b_i) + (W_h h + b_h); n = tanh(x_n + r * h_n)
// with h_n = W_hn h + b_hn kept for backward; h' = (1 - z) * n + z * h.
#include "gate_math.h"
#include "rnn_device.cuh"
#include "rnn_kernels.h"

namespace genfast {
namespace cuda {
namespace {

template <typename T>
__global__ void gru_forward_step_kernel(const GruForwardStep<T> step) {
  using A = AccT<T>;
  const int64_t H = step.hidden;
  const int64_t index = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (index >= step.rows * H) return;
  const int64_t n = index / H;
  const int64_t j = index - n * H;

  const T* gx = step.gates_x + n * step.ld_gates_x;
  const T* gh = step.gates_h + n * 3 * H;
  A x_part[3];
  A h_part[3];
#pragma unroll
  for (int gate = 0; gate < 3; ++gate) {
    const int64_t col = gate * H + j;
    x_part[gate] = to_acc(gx[col]) + bias_or_zero(step.b_ih, col);
    h_part[gate] = to_acc(gh[col]) + bias_or_zero(step.b_hh, col);
  }
  T* h = step.h_state + n * H + j;
  const gates::GruCellOut<A> out = gates::gru_cell<A>(x_part[0], x_part[1], x_part[2], h_part[0],
                                                      h_part[1], h_part[2], to_acc(*h));
  const T h_new = from_acc<T>(out.h);
  *h = h_new;
  step.output[n * step.ld_output + j] = h_new;
  if (step.saved != nullptr) {
    T* saved = step.saved + n * 4 * H + j;
    saved[0] = from_acc<T>(out.r);
    saved[H] = from_acc<T>(out.z);
    saved[2 * H] = from_acc<T>(out.n);
    saved[3 * H] = from_acc<T>(h_part[2]);
  }
}

template <typename T>
__global__ void gru_backward_step_kernel(const GruBackwardStep<T> step) {
  using A = AccT<T>;
  const int64_t H = step.hidden;
  const int64_t index = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (index >= step.rows * H) return;
  const int64_t n = index / H;
  const int64_t j = index - n * H;

  T* d_h_state = step.d_h_state + n * H + j;
  const A d_h = to_acc(step.grad_output[n * step.ld_grad_output + j]) + to_acc(*d_h_state);
  const T h_prev = n < step.prev_rows ? step.output_prev[n * H + j] : step.hx[n * H + j];
  const T* saved = step.saved + n * 4 * H + j;
  const gates::GruCellGrad<A> grad = gates::gru_cell_backward<A>(
      d_h, to_acc(saved[0]), to_acc(saved[H]), to_acc(saved[2 * H]), to_acc(saved[3 * H]),
      to_acc(h_prev));
  *d_h_state = from_acc<T>(grad.d_h_prev);
  step.h_prev_dst[n * H + j] = h_prev;
  T* d_x = step.d_gates_x + n * 3 * H + j;
  T* d_hh = step.d_gates_h + n * 3 * H + j;
  const T d_r = from_acc<T>(grad.d_r);
  const T d_z = from_acc<T>(grad.d_z);
  d_x[0] = d_r;
  d_x[H] = d_z;
  d_x[2 * H] = from_acc<T>(grad.d_xn);
  d_hh[0] = d_r;
  d_hh[H] = d_z;
  d_hh[2 * H] = from_acc<T>(grad.d_hn);
}

}  // namespace

template <typename T>
cudaError_t gru_forward_step(const GruForwardStep<T>& step, cudaStream_t stream) {
  const int64_t elements = step.rows * step.hidden;
  if (elements == 0) return cudaSuccess;
  gru_forward_step_kernel<T><<<step_blocks(elements), kStepThreads, 0, stream>>>(step);
  return cudaGetLastError();
}

template <typename T>
cudaError_t gru_backward_step(const GruBackwardStep<T>& step, cudaStream_t stream) {
  const int64_t elements = step.rows * step.hidden;
  if (elements == 0) return cudaSuccess;
  gru_backward_step_kernel<T><<<step_blocks(elements), kStepThreads, 0, stream>>>(step);
  return cudaGetLastError();
}

#define GENFAST_INSTANTIATE_GRU(T)                                                       \
  template cudaError_t gru_forward_step<T>(const GruForwardStep<T>&, cudaStream_t);   \
  template cudaError_t gru_backward_step<T>(const GruBackwardStep<T>&, cudaStream_t);

GENFAST_INSTANTIATE_GRU(float)
GENFAST_INSTANTIATE_GRU(double)
GENFAST_INSTANTIATE_GRU(__half)
GENFAST_INSTANTIATE_GRU(__nv_bfloat16)

#undef GENFAST_INSTANTIATE_GRU

}  // namespace cuda
}  // namespace genfast
