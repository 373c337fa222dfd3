// Fused LSTM time step, forward and backward (one launch per step; see rnn_kernels.h).
//
// Forward: bias add + gate nonlinearities + cell update + h = o * tanh(c), saving the
// activated gates and c_t for backward. Backward: the gate gradients of one step, the
// cell-state gradient carried to the previous step, and h_{t-1} gathered for the
// weight gradient. The matrix products around these run in cuBLAS (via the glue).
#include "gate_math.h"
#include "rnn_device.cuh"
#include "rnn_kernels.h"

namespace genfast {
namespace cuda {
namespace {

template <typename T>
__global__ void lstm_forward_step_kernel(const LstmForwardStep<T> step) {
  using A = AccT<T>;
  const int64_t H = step.hidden;
  const int64_t index = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (index >= step.rows * H) return;
  const int64_t n = index / H;
  const int64_t j = index - n * H;

  const T* gx = step.gates_x + n * step.ld_gates_x;
  const T* gh = step.gates_h + n * 4 * H;
  A pre[4];
#pragma unroll
  for (int gate = 0; gate < 4; ++gate) {
    const int64_t col = gate * H + j;
    pre[gate] = to_acc(gx[col]) + to_acc(gh[col]) + bias_or_zero(step.b_ih, col) +
                bias_or_zero(step.b_hh, col);
  }
  A* c = step.c_state + n * H + j;
  const gates::LstmCellOut<A> out = gates::lstm_cell<A>(pre[0], pre[1], pre[2], pre[3], *c);
  *c = out.c;
  const T h = from_acc<T>(out.h);
  step.h_dst[n * step.ld_h_dst + j] = h;
  if (step.h_dst2 != nullptr) step.h_dst2[n * step.ld_h_dst2 + j] = h;
  if (step.saved_gates != nullptr) {
    T* saved = step.saved_gates + n * 4 * H + j;
    saved[0] = from_acc<T>(out.i);
    saved[H] = from_acc<T>(out.f);
    saved[2 * H] = from_acc<T>(out.g);
    saved[3 * H] = from_acc<T>(out.o);
    step.saved_c[n * H + j] = from_acc<T>(out.c);
  }
}

template <typename T>
__global__ void lstm_backward_step_kernel(const LstmBackwardStep<T> step) {
  using A = AccT<T>;
  const int64_t H = step.hidden;
  const int64_t index = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (index >= step.rows * H) return;
  const int64_t n = index / H;
  const int64_t j = index - n * H;
  const bool continues = n < step.prev_rows;  // false: this row's sequence starts here

  A d_h = to_acc(step.d_h[n * step.ld_d_h + j]);
  if (step.d_h_extra != nullptr) d_h += to_acc(step.d_h_extra[n * step.ld_d_h_extra + j]);
  const T* saved = step.saved_gates + n * 4 * H + j;
  const A c_prev = to_acc(continues ? step.saved_c_prev[n * H + j] : step.cx[n * H + j]);
  A* d_c = step.d_c_state + n * H + j;
  const gates::LstmCellGrad<A> grad = gates::lstm_cell_backward<A>(
      d_h, *d_c, to_acc(saved[0]), to_acc(saved[H]), to_acc(saved[2 * H]), to_acc(saved[3 * H]),
      c_prev, to_acc(step.saved_c[n * H + j]));
  *d_c = grad.d_c_prev;
  T* d_gates = step.d_gates + n * 4 * H + j;
  d_gates[0] = from_acc<T>(grad.d_i);
  d_gates[H] = from_acc<T>(grad.d_f);
  d_gates[2 * H] = from_acc<T>(grad.d_g);
  d_gates[3 * H] = from_acc<T>(grad.d_o);

  // H_out <= H, so the first H_out threads of a row also gather h_{t-1}.
  const int64_t H_out = step.hidden_out;
  if (j < H_out) {
    step.h_prev_dst[n * H_out + j] =
        continues ? step.output_prev[n * H_out + j] : step.hx[n * H_out + j];
  }
}

}  // namespace

template <typename T>
cudaError_t lstm_forward_step(const LstmForwardStep<T>& step, cudaStream_t stream) {
  const int64_t elements = step.rows * step.hidden;
  if (elements == 0) return cudaSuccess;
  lstm_forward_step_kernel<T><<<step_blocks(elements), kStepThreads, 0, stream>>>(step);
  return cudaGetLastError();
}

template <typename T>
cudaError_t lstm_backward_step(const LstmBackwardStep<T>& step, cudaStream_t stream) {
  const int64_t elements = step.rows * step.hidden;
  if (elements == 0) return cudaSuccess;
  lstm_backward_step_kernel<T><<<step_blocks(elements), kStepThreads, 0, stream>>>(step);
  return cudaGetLastError();
}

#define GENFAST_INSTANTIATE_LSTM(T)                                                        \
  template cudaError_t lstm_forward_step<T>(const LstmForwardStep<T>&, cudaStream_t);   \
  template cudaError_t lstm_backward_step<T>(const LstmBackwardStep<T>&, cudaStream_t);

GENFAST_INSTANTIATE_LSTM(float)
GENFAST_INSTANTIATE_LSTM(double)
GENFAST_INSTANTIATE_LSTM(__half)
GENFAST_INSTANTIATE_LSTM(__nv_bfloat16)

#undef GENFAST_INSTANTIATE_LSTM

}  // namespace cuda
}  // namespace genfast
