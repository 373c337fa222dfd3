// The element-wise kernels of the GRU with the reset gate before the recurrent product
// (csrc/cuda/gru_reset_before_kernels.h): one thread per (row, hidden unit), the cell's scalar math
// from rnn::GruResetBeforeCell (csrc/rnn/cells.h), the same as the CPU's.
#include "gru_reset_before_kernels.h"
#include "rnn/cells.h"
#include "rnn/regularizers.h"
#include "rnn_device.cuh"

namespace genfast {
namespace cuda {
namespace {

using Cell = rnn::GruResetBeforeCell;

// The (row n, hidden unit j) of this thread; false past the last of rows x H.
__device__ __forceinline__ bool row_and_unit(int64_t rows, int64_t H, int64_t& n, int64_t& j) {
  const int64_t index = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (index >= rows * H) return false;
  n = index / H;
  j = index - n * H;
  return true;
}

template <typename T>
__global__ void forward_reset_kernel(const ResetBeforeForwardArgs<T> a) {
  using A = AccT<T>;
  const int64_t H = a.hidden;
  int64_t n, j;
  if (!row_and_unit(a.rows, H, n, j)) return;
  const T* gx = a.gates_x + n * Cell::kGates * H;
  const T* gh = a.gates_h + n * Cell::kFirstGates * H;
  const auto g = Cell::forward_reset<A>(to_acc(gx[j]) + to_acc(gh[j]), to_acc(gx[H + j]) + to_acc(gh[H + j]),
                                        to_acc(a.h_prev[n * H + j]));
  T* saved = a.saved + n * Cell::kSaved * H + j;
  saved[Cell::kR * H] = from_acc<T>(g.r);
  saved[Cell::kZ * H] = from_acc<T>(g.z);
  saved[Cell::kRh * H] = from_acc<T>(g.rh);
}

template <typename T>
__global__ void forward_update_kernel(const ResetBeforeForwardArgs<T> a) {
  using A = AccT<T>;
  const int64_t H = a.hidden;
  int64_t n, j;
  if (!row_and_unit(a.rows, H, n, j)) return;
  T* saved = a.saved + n * Cell::kSaved * H + j;
  const A pre_n = to_acc(a.gates_x[n * Cell::kGates * H + Cell::kN * H + j]) + to_acc(a.gates_h[n * H + j]);
  const A h_prev = to_acc(a.h_prev[n * H + j]);
  const auto u = Cell::forward_update<A>(pre_n, to_acc(saved[Cell::kZ * H]), h_prev);
  saved[Cell::kN * H] = from_acc<T>(u.n);
  const A h_new = a.zoneout != nullptr ? rnn::zoneout<A>(to_acc(a.zoneout[n * H + j]), h_prev, u.h) : u.h;
  const T h = from_acc<T>(h_new);
  a.h_dst[n * H + j] = h;
  a.h_dst2[n * H + j] = h;
  if (a.h_masked_dst != nullptr) a.h_masked_dst[n * H + j] = from_acc<T>(h_new * to_acc(a.recurrent_mask[n * H + j]));
}

template <typename T>
__global__ void backward_update_kernel(const ResetBeforeBackwardArgs<T> a) {
  using A = AccT<T>;
  const int64_t H = a.hidden;
  int64_t n, j;
  if (!row_and_unit(a.rows, H, n, j)) return;
  const T h_prev = n < a.prev_rows ? a.h_prev[n * H + j] : a.hx[n * H + j];
  const T* saved = a.saved + n * Cell::kSaved * H + j;
  A d_h = to_acc(a.grad_out[n * H + j]) + to_acc(a.d_h[n * H + j]);
  A to_prev = A(0);  // zoneout: the direct part of dL/dh_{t-1}
  if (a.zoneout != nullptr) {
    const A keep = to_acc(a.zoneout[n * H + j]);
    to_prev = rnn::zoneout_grad_prev<A>(keep, d_h);
    d_h = rnn::zoneout_grad_fresh<A>(keep, d_h);
  }
  const auto g = Cell::backward_update<A>(d_h, to_acc(saved[Cell::kZ * H]), to_acc(saved[Cell::kN * H]),
                                          to_acc(h_prev));
  T* d_gates = a.d_gates + n * Cell::kGates * H + j;
  d_gates[Cell::kZ * H] = from_acc<T>(g.d_z);
  d_gates[Cell::kN * H] = from_acc<T>(g.d_n);
  a.d_h[n * H + j] = from_acc<T>(g.d_h_prev + to_prev);
  a.h_prev_dst[n * H + j] =
      a.recurrent_mask != nullptr ? from_acc<T>(to_acc(h_prev) * to_acc(a.recurrent_mask[n * H + j])) : h_prev;
}

template <typename T>
__global__ void backward_reset_kernel(const ResetBeforeBackwardArgs<T> a) {
  using A = AccT<T>;
  const int64_t H = a.hidden;
  int64_t n, j;
  if (!row_and_unit(a.rows, H, n, j)) return;
  const A h_prev = to_acc(n < a.prev_rows ? a.h_prev[n * H + j] : a.hx[n * H + j]);
  // Under recurrent dropout d_rh is dL/d(r * (h * m)): times m, the cell's backward of r * h applies.
  A d_rh = to_acc(a.d_rh[n * H + j]);
  if (a.recurrent_mask != nullptr) d_rh *= to_acc(a.recurrent_mask[n * H + j]);
  const auto g = Cell::backward_reset<A>(d_rh, to_acc(a.saved[n * Cell::kSaved * H + Cell::kR * H + j]), h_prev);
  a.d_gates[n * Cell::kGates * H + Cell::kR * H + j] = from_acc<T>(g.d_r);
  a.d_h[n * H + j] = from_acc<T>(to_acc(a.d_h[n * H + j]) + g.d_h_prev);
}

template <typename Args>
unsigned int blocks(const Args& a) {
  return step_blocks(a.rows * a.hidden);
}

}  // namespace

template <typename T>
cudaError_t reset_before_forward_reset(const ResetBeforeForwardArgs<T>& args, cudaStream_t stream) {
  if (args.rows * args.hidden == 0) return cudaSuccess;
  forward_reset_kernel<T><<<blocks(args), kStepThreads, 0, stream>>>(args);
  return cudaGetLastError();
}

template <typename T>
cudaError_t reset_before_forward_update(const ResetBeforeForwardArgs<T>& args, cudaStream_t stream) {
  if (args.rows * args.hidden == 0) return cudaSuccess;
  forward_update_kernel<T><<<blocks(args), kStepThreads, 0, stream>>>(args);
  return cudaGetLastError();
}

template <typename T>
cudaError_t reset_before_backward_update(const ResetBeforeBackwardArgs<T>& args, cudaStream_t stream) {
  if (args.rows * args.hidden == 0) return cudaSuccess;
  backward_update_kernel<T><<<blocks(args), kStepThreads, 0, stream>>>(args);
  return cudaGetLastError();
}

template <typename T>
cudaError_t reset_before_backward_reset(const ResetBeforeBackwardArgs<T>& args, cudaStream_t stream) {
  if (args.rows * args.hidden == 0) return cudaSuccess;
  backward_reset_kernel<T><<<blocks(args), kStepThreads, 0, stream>>>(args);
  return cudaGetLastError();
}

#define GENFAST_INSTANTIATE_RESET_BEFORE(T)                                                                    \
  template cudaError_t reset_before_forward_reset<T>(const ResetBeforeForwardArgs<T>&, cudaStream_t);         \
  template cudaError_t reset_before_forward_update<T>(const ResetBeforeForwardArgs<T>&, cudaStream_t);        \
  template cudaError_t reset_before_backward_update<T>(const ResetBeforeBackwardArgs<T>&, cudaStream_t);      \
  template cudaError_t reset_before_backward_reset<T>(const ResetBeforeBackwardArgs<T>&, cudaStream_t);
GENFAST_INSTANTIATE_RESET_BEFORE(float)
GENFAST_INSTANTIATE_RESET_BEFORE(double)
GENFAST_INSTANTIATE_RESET_BEFORE(__half)
GENFAST_INSTANTIATE_RESET_BEFORE(__nv_bfloat16)
#undef GENFAST_INSTANTIATE_RESET_BEFORE

}  // namespace cuda
}  // namespace genfast
