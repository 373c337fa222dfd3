// The CUDA kernels of the layer-normalised LSTM and GRU (csrc/cuda/rnn_layernorm_kernels.h): one
// block per row, the moments reduced over the block in AccT<T>, the cells' scalar math from
// csrc/rnn/layernorm_cells.h and csrc/rnn/cells.h, the regularisers' from csrc/rnn/regularizers.h.
#include "rnn/cells.h"
#include "rnn/layernorm_cells.h"
#include "rnn/regularizers.h"
#include "rnn_device.cuh"
#include "rnn_layernorm_kernels.h"

namespace genfast {
namespace cuda {
namespace {

using rnn::LayerNormLstmCell;

constexpr int kMaxRowThreads = 256;
constexpr int kWarp = 32;

// Threads per block for rows whose loops stride over `width` values: whole warps, at most 256.
unsigned int row_threads(int64_t width) {
  const int64_t warps = (width + kWarp - 1) / kWarp;
  const int64_t threads = warps * kWarp;
  return static_cast<unsigned int>(threads < kWarp ? kWarp : (threads > kMaxRowThreads ? kMaxRowThreads : threads));
}

// a and b summed over the block; every thread gets the same sums (the warps' partial sums are added in
// warp order by each thread, so the result does not depend on scheduling). Every thread of the block
// must call it; blockDim.x is a multiple of 32.
template <typename A>
__device__ __forceinline__ void block_sum2(A& a, A& b) {
  __shared__ A partial[2][kMaxRowThreads / kWarp];
#pragma unroll
  for (int offset = kWarp / 2; offset > 0; offset /= 2) {
    a += __shfl_xor_sync(0xffffffffu, a, offset);
    b += __shfl_xor_sync(0xffffffffu, b, offset);
  }
  const int warp = threadIdx.x / kWarp, lane = threadIdx.x % kWarp;
  if (lane == 0) {
    partial[0][warp] = a;
    partial[1][warp] = b;
  }
  __syncthreads();
  a = A(0);
  b = A(0);
  const int warps = blockDim.x / kWarp;
  for (int w = 0; w < warps; ++w) {
    a += partial[0][w];
    b += partial[1][w];
  }
  __syncthreads();  // partial is reused by the block's next reduction
}

// Mean and 1 / sqrt(var + eps) of a row of `width` values (two passes: the mean, then the squared
// deviations, as the CPU's panel moments).
template <typename T>
__device__ __forceinline__ void row_moments(const T* v, int64_t width, AccT<T>& mean, AccT<T>& rstd) {
  using A = AccT<T>;
  A sum = A(0), unused = A(0);
  for (int64_t k = threadIdx.x; k < width; k += blockDim.x) sum += to_acc(v[k]);
  block_sum2(sum, unused);
  mean = sum / A(width);
  A m2 = A(0);
  unused = A(0);
  for (int64_t k = threadIdx.x; k < width; k += blockDim.x) {
    const A d = to_acc(v[k]) - mean;
    m2 += d * d;
  }
  block_sum2(m2, unused);
  rstd = rnn::layer_norm_rstd<A>(rnn::Moments<A>{A(width), mean, m2});
}

// ---------------------------------------------------------------- the input side
template <typename T>
__global__ void layer_norm_rows_kernel(const LayerNormRowsArgs<T> a) {
  using A = AccT<T>;
  const int64_t row = blockIdx.x, W = a.width;
  T* v = a.values + row * W;
  A mean, rstd;
  row_moments(v, W, mean, rstd);
  if (a.rstd != nullptr && threadIdx.x == 0) a.rstd[row] = from_acc<T>(rstd);
  for (int64_t k = threadIdx.x; k < W; k += blockDim.x) {
    const A xhat = (to_acc(v[k]) - mean) * rstd;
    if (a.xhat != nullptr) a.xhat[row * W + k] = from_acc<T>(xhat);
    v[k] = from_acc<T>(xhat * to_acc(a.gain[k]) + bias_or_zero(a.bias, k));
  }
}

template <typename T>
__global__ void layer_norm_rows_backward_kernel(const LayerNormRowsBackwardArgs<T> a) {
  using A = AccT<T>;
  const int64_t row = blockIdx.x, W = a.width;
  T* d = a.d + row * W;
  const T* xhat = a.xhat + row * W;
  A first = A(0), second = A(0);
  for (int64_t k = threadIdx.x; k < W; k += blockDim.x) {
    const A dx = to_acc(d[k]) * to_acc(a.gain[k]);
    first += dx;
    second += dx * to_acc(xhat[k]);
  }
  block_sum2(first, second);
  const A mean_d = first / A(W), mean_dx = second / A(W), rstd = to_acc(a.rstd[row]);
  for (int64_t k = threadIdx.x; k < W; k += blockDim.x)
    d[k] = from_acc<T>(rnn::layer_norm_backward<A>(to_acc(d[k]) * to_acc(a.gain[k]), to_acc(xhat[k]), rstd, mean_d,
                                                   mean_dx));
}

// ---------------------------------------------------------------- forward steps
// The LSTM step of one row (block): LN of the product, the gates, c_t, LN(c~_t), h_t.
template <typename T>
__global__ void ln_lstm_forward_kernel(const LnForwardStepArgs<T> a) {
  using A = AccT<T>;
  constexpr int G = LayerNormLstmCell::kGates;
  const int64_t n = blockIdx.x, H = a.hidden, W = G * H;
  T* product = a.product + n * W;
  A mean, rstd;
  row_moments(product, W, mean, rstd);

  const T* gx = a.gates_x + n * W;
  A* c = a.c_state + n * H;
  A* fresh = a.scratch + n * 2 * H;  // c~_t
  A* out_gate = fresh + H;           // o
  A c_sum = A(0);
  for (int64_t j = threadIdx.x; j < H; j += blockDim.x) {
    A pre[G];
#pragma unroll
    for (int g = 0; g < G; ++g) {
      const int64_t k = g * H + j;
      const A xhat = (to_acc(product[k]) - mean) * rstd;
      product[k] = from_acc<T>(xhat);
      pre[g] = to_acc(gx[k]) + xhat * to_acc(a.gamma_hh[k]);
    }
    const A c_prev = c[j];
    const auto gates = LayerNormLstmCell::gates<A>(pre[0], pre[1], pre[2], pre[3], c_prev);
    if (a.saved != nullptr) {
      T* saved = a.saved + n * LayerNormLstmCell::kSaved * H + j;
      saved[0] = from_acc<T>(gates.i);
      saved[H] = from_acc<T>(gates.f);
      saved[2 * H] = from_acc<T>(gates.g);
      saved[3 * H] = from_acc<T>(gates.o);
    }
    fresh[j] = gates.c;
    out_gate[j] = gates.o;
    c_sum += gates.c;
    // The carried c_t: zoned out against c_{t-1} under cell zoneout; LN(c~_t) still makes h~_t.
    const A carried = a.cell_zoneout != nullptr ? rnn::zoneout<A>(to_acc(a.cell_zoneout[n * H + j]), c_prev, gates.c)
                                                : gates.c;
    c[j] = carried;
    if (a.saved_c != nullptr) a.saved_c[n * H + j] = from_acc<T>(carried);
  }
  A unused = A(0);
  block_sum2(c_sum, unused);
  const A mean_c = c_sum / A(H);
  A m2 = A(0);
  unused = A(0);
  for (int64_t j = threadIdx.x; j < H; j += blockDim.x) {
    const A d = fresh[j] - mean_c;
    m2 += d * d;
  }
  block_sum2(m2, unused);
  const A rstd_c = rnn::layer_norm_rstd<A>(rnn::Moments<A>{A(H), mean_c, m2});
  for (int64_t j = threadIdx.x; j < H; j += blockDim.x) {
    const A hat = (fresh[j] - mean_c) * rstd_c;
    A h = LayerNormLstmCell::hidden<A>(out_gate[j], hat, to_acc(a.gamma_c[j]), to_acc(a.beta_c[j]));
    if (a.zoneout != nullptr) h = rnn::zoneout<A>(to_acc(a.zoneout[n * H + j]), to_acc(a.h_state[n * H + j]), h);
    const T h_new = from_acc<T>(h);
    a.h_out[n * H + j] = h_new;
    a.h_state[n * H + j] = h_new;
    if (a.h_masked != nullptr) a.h_masked[n * H + j] = from_acc<T>(h * to_acc(a.recurrent_mask[n * H + j]));
    if (a.cell_hat != nullptr) a.cell_hat[n * H + j] = from_acc<T>(hat);
  }
  if (threadIdx.x == 0) {
    if (a.rstd_hh != nullptr) a.rstd_hh[n] = from_acc<T>(rstd);
    if (a.rstd_c != nullptr) a.rstd_c[n] = from_acc<T>(rstd_c);
  }
}

// The GRU step of one row (block): LN of the product, h^ = LN(.) ln_hh_weight + b_hh, torch's GRU gates.
template <typename T>
__global__ void ln_gru_forward_kernel(const LnForwardStepArgs<T> a) {
  using A = AccT<T>;
  constexpr int G = rnn::LayerNormGruCell::kGates;
  const int64_t n = blockIdx.x, H = a.hidden, W = G * H;
  T* product = a.product + n * W;
  A mean, rstd;
  row_moments(product, W, mean, rstd);

  const T* gx = a.gates_x + n * W;
  for (int64_t j = threadIdx.x; j < H; j += blockDim.x) {
    A hh[G];
#pragma unroll
    for (int g = 0; g < G; ++g) {
      const int64_t k = g * H + j;
      const A xhat = (to_acc(product[k]) - mean) * rstd;
      product[k] = from_acc<T>(xhat);
      hh[g] = xhat * to_acc(a.gamma_hh[k]) + bias_or_zero(a.b_hh, k);
    }
    const A h_prev = to_acc(a.h_state[n * H + j]);
    const auto out = rnn::GruCell::forward<A>(to_acc(gx[j]), to_acc(gx[H + j]), to_acc(gx[2 * H + j]), hh[0], hh[1],
                                              hh[2], h_prev);
    if (a.saved != nullptr) {
      T* saved = a.saved + n * rnn::LayerNormGruCell::kSaved * H + j;
      saved[0] = from_acc<T>(out.r);
      saved[H] = from_acc<T>(out.z);
      saved[2 * H] = from_acc<T>(out.n);
      saved[3 * H] = from_acc<T>(hh[2]);
    }
    const A h = a.zoneout != nullptr ? rnn::zoneout<A>(to_acc(a.zoneout[n * H + j]), h_prev, out.h) : out.h;
    const T h_new = from_acc<T>(h);
    a.h_out[n * H + j] = h_new;
    a.h_state[n * H + j] = h_new;
    if (a.h_masked != nullptr) a.h_masked[n * H + j] = from_acc<T>(h * to_acc(a.recurrent_mask[n * H + j]));
  }
  if (a.rstd_hh != nullptr && threadIdx.x == 0) a.rstd_hh[n] = from_acc<T>(rstd);
}

// ---------------------------------------------------------------- backward steps
// dL/dh_t of row n, unit j (what reached h_t: the output gradient and the carried one), split by
// zoneout: returns the part reaching the cell's h~_t, and `to_prev` the direct part reaching h_{t-1}.
template <typename T>
__device__ __forceinline__ AccT<T> hidden_grad(const LnBackwardStepArgs<T>& a, int64_t n, int64_t j,
                                               AccT<T>& to_prev) {
  using A = AccT<T>;
  const int64_t H = a.hidden;
  A d_h = to_acc(a.grad_out[n * H + j]) + to_acc(a.d_h[n * H + j]);
  to_prev = A(0);
  if (a.zoneout != nullptr) {
    const A keep = to_acc(a.zoneout[n * H + j]);
    to_prev = rnn::zoneout_grad_prev<A>(keep, d_h);
    d_h = rnn::zoneout_grad_fresh<A>(keep, d_h);
  }
  return d_h;
}

// h_{t-1} of row n, unit j (times r under recurrent dropout) for W_hh's gradient; returns h_{t-1}.
template <typename T>
__device__ __forceinline__ AccT<T> gather_previous_hidden(const LnBackwardStepArgs<T>& a, int64_t n, int64_t j) {
  const int64_t H = a.hidden;
  const T h_prev = n < a.prev_rows ? a.output_prev[n * H + j] : a.hx[n * H + j];
  a.h_prev_dst[n * H + j] = a.recurrent_mask != nullptr
                                ? from_acc<T>(to_acc(h_prev) * to_acc(a.recurrent_mask[n * H + j]))
                                : h_prev;
  return to_acc(h_prev);
}

// The recurrent LN's backward of row n: d_product = dL/d(W_hh h) from the gradient `grad` (AccT<T>,
// G*H, the thread's own units) of the side after its gain, and the sums `first` = sum grad gamma and
// `second` = sum grad gamma xhat this thread took over its units.
template <int G, typename T>
__device__ __forceinline__ void recurrent_layer_norm_backward(const LnBackwardStepArgs<T>& a, int64_t n,
                                                              const AccT<T>* grad, AccT<T> first, AccT<T> second) {
  using A = AccT<T>;
  const int64_t H = a.hidden, W = G * H;
  block_sum2(first, second);
  const A mean_d = first / A(W), mean_dx = second / A(W), rstd = to_acc(a.rstd_hh[n]);
  const T* xhat = a.xhat_hh + n * W;
  T* d_product = a.d_product + n * W;
  for (int64_t j = threadIdx.x; j < H; j += blockDim.x)
#pragma unroll
    for (int g = 0; g < G; ++g) {
      const int64_t k = g * H + j;
      d_product[k] = from_acc<T>(
          rnn::layer_norm_backward<A>(grad[k] * to_acc(a.gamma_hh[k]), to_acc(xhat[k]), rstd, mean_d, mean_dx));
    }
}

template <typename T>
__global__ void ln_lstm_backward_kernel(const LnBackwardStepArgs<T> a) {
  using A = AccT<T>;
  constexpr int G = LayerNormLstmCell::kGates;
  const int64_t n = blockIdx.x, H = a.hidden, W = G * H;
  const T* saved = a.saved + n * LayerNormLstmCell::kSaved * H;
  const T* cell_hat = a.cell_hat + n * H;
  A* grad = a.scratch + n * W;  // dL/d(pre-activation), both sides
  A* d_y = a.d_y + n * H;

  // Pass 1: dL/dh_t, the output gate and dL/dy, y = LN(c~_t) gain + bias; the sums of LN(c)'s backward.
  A first = A(0), second = A(0);
  for (int64_t j = threadIdx.x; j < H; j += blockDim.x) {
    A to_prev;
    const A d_h = hidden_grad(a, n, j, to_prev);
    if (a.zoneout != nullptr) a.d_h[n * H + j] = from_acc<T>(to_prev);
    const A gamma = to_acc(a.gamma_c[j]), hat = to_acc(cell_hat[j]);
    const auto out = LayerNormLstmCell::output_backward<A>(d_h, to_acc(saved[3 * H + j]), hat, gamma,
                                                           to_acc(a.beta_c[j]));
    grad[3 * H + j] = out.d_o;
    d_y[j] = out.d_y;
    first += out.d_y * gamma;
    second += out.d_y * gamma * hat;
    gather_previous_hidden(a, n, j);
  }
  block_sum2(first, second);
  const A mean_d = first / A(H), mean_dx = second / A(H), rstd_c = to_acc(a.rstd_c[n]);

  // Pass 2: dL/dc_t (carried + through LN(c~_t)), split by cell zoneout; the gates i, f, g; dL/dc_{t-1};
  // the sums of the recurrent LN's backward.
  const bool continues = n < a.prev_rows;
  first = A(0);
  second = A(0);
  for (int64_t j = threadIdx.x; j < H; j += blockDim.x) {
    A d_c = a.d_c[n * H + j], direct = A(0);
    if (a.cell_zoneout != nullptr) {
      const A keep = to_acc(a.cell_zoneout[n * H + j]);
      direct = rnn::zoneout_grad_prev<A>(keep, d_c);
      d_c = rnn::zoneout_grad_fresh<A>(keep, d_c);
    }
    const A gamma = to_acc(a.gamma_c[j]);
    d_c += rnn::layer_norm_backward<A>(d_y[j] * gamma, to_acc(cell_hat[j]), rstd_c, mean_d, mean_dx);
    const A c_prev = to_acc(continues ? a.c_prev[n * H + j] : a.cx[n * H + j]);
    const auto cg = LayerNormLstmCell::cell_backward<A>(d_c, to_acc(saved[j]), to_acc(saved[H + j]),
                                                        to_acc(saved[2 * H + j]), c_prev);
    grad[j] = cg.d_i;
    grad[H + j] = cg.d_f;
    grad[2 * H + j] = cg.d_g;
    a.d_c[n * H + j] = cg.d_c_prev + direct;
#pragma unroll
    for (int g = 0; g < G; ++g) {
      const int64_t k = g * H + j;
      a.d_pre[n * W + k] = from_acc<T>(grad[k]);
      const A d = grad[k] * to_acc(a.gamma_hh[k]);
      first += d;
      second += d * to_acc(a.xhat_hh[n * W + k]);
    }
  }
  recurrent_layer_norm_backward<G>(a, n, grad, first, second);
}

template <typename T>
__global__ void ln_gru_backward_kernel(const LnBackwardStepArgs<T> a) {
  using A = AccT<T>;
  constexpr int G = rnn::LayerNormGruCell::kGates;
  const int64_t n = blockIdx.x, H = a.hidden, W = G * H;
  const T* saved = a.saved + n * rnn::LayerNormGruCell::kSaved * H;
  A* grad = a.scratch + n * W;  // dL/dh^, the recurrent side after its gain
  A first = A(0), second = A(0);
  for (int64_t j = threadIdx.x; j < H; j += blockDim.x) {
    A to_prev;
    const A d_h = hidden_grad(a, n, j, to_prev);
    const A h_prev = gather_previous_hidden(a, n, j);
    const auto g = rnn::GruCell::backward<A>(d_h, to_acc(saved[j]), to_acc(saved[H + j]), to_acc(saved[2 * H + j]),
                                             to_acc(saved[3 * H + j]), h_prev);
    T* d_pre = a.d_pre + n * W + j;
    d_pre[0] = from_acc<T>(g.d_r);
    d_pre[H] = from_acc<T>(g.d_z);
    d_pre[2 * H] = from_acc<T>(g.d_xn);
    T* d_pre_h = a.d_pre_h + n * W + j;
    d_pre_h[0] = from_acc<T>(g.d_r);
    d_pre_h[H] = from_acc<T>(g.d_z);
    d_pre_h[2 * H] = from_acc<T>(g.d_hn);
    grad[j] = g.d_r;
    grad[H + j] = g.d_z;
    grad[2 * H + j] = g.d_hn;
    a.d_h[n * H + j] = from_acc<T>(g.d_h_prev + to_prev);
#pragma unroll
    for (int gate = 0; gate < G; ++gate) {
      const int64_t k = gate * H + j;
      const A d = grad[k] * to_acc(a.gamma_hh[k]);
      first += d;
      second += d * to_acc(a.xhat_hh[n * W + k]);
    }
  }
  recurrent_layer_norm_backward<G>(a, n, grad, first, second);
}

}  // namespace

template <typename T>
cudaError_t layer_norm_rows_forward(const LayerNormRowsArgs<T>& args, cudaStream_t stream) {
  if (args.rows == 0 || args.width == 0) return cudaSuccess;
  layer_norm_rows_kernel<T><<<static_cast<unsigned int>(args.rows), row_threads(args.width), 0, stream>>>(args);
  return cudaGetLastError();
}

template <typename T>
cudaError_t layer_norm_rows_backward(const LayerNormRowsBackwardArgs<T>& args, cudaStream_t stream) {
  if (args.rows == 0 || args.width == 0) return cudaSuccess;
  layer_norm_rows_backward_kernel<T>
      <<<static_cast<unsigned int>(args.rows), row_threads(args.width), 0, stream>>>(args);
  return cudaGetLastError();
}

template <typename T>
cudaError_t ln_lstm_forward_step(const LnForwardStepArgs<T>& args, cudaStream_t stream) {
  if (args.rows == 0) return cudaSuccess;
  ln_lstm_forward_kernel<T><<<static_cast<unsigned int>(args.rows), row_threads(args.hidden), 0, stream>>>(args);
  return cudaGetLastError();
}

template <typename T>
cudaError_t ln_gru_forward_step(const LnForwardStepArgs<T>& args, cudaStream_t stream) {
  if (args.rows == 0) return cudaSuccess;
  ln_gru_forward_kernel<T><<<static_cast<unsigned int>(args.rows), row_threads(args.hidden), 0, stream>>>(args);
  return cudaGetLastError();
}

template <typename T>
cudaError_t ln_lstm_backward_step(const LnBackwardStepArgs<T>& args, cudaStream_t stream) {
  if (args.rows == 0) return cudaSuccess;
  ln_lstm_backward_kernel<T><<<static_cast<unsigned int>(args.rows), row_threads(args.hidden), 0, stream>>>(args);
  return cudaGetLastError();
}

template <typename T>
cudaError_t ln_gru_backward_step(const LnBackwardStepArgs<T>& args, cudaStream_t stream) {
  if (args.rows == 0) return cudaSuccess;
  ln_gru_backward_kernel<T><<<static_cast<unsigned int>(args.rows), row_threads(args.hidden), 0, stream>>>(args);
  return cudaGetLastError();
}

#define GENFAST_INSTANTIATE_LAYERNORM_RNN(T)                                                                  \
  template cudaError_t layer_norm_rows_forward<T>(const LayerNormRowsArgs<T>&, cudaStream_t);                \
  template cudaError_t layer_norm_rows_backward<T>(const LayerNormRowsBackwardArgs<T>&, cudaStream_t);       \
  template cudaError_t ln_lstm_forward_step<T>(const LnForwardStepArgs<T>&, cudaStream_t);                   \
  template cudaError_t ln_gru_forward_step<T>(const LnForwardStepArgs<T>&, cudaStream_t);                    \
  template cudaError_t ln_lstm_backward_step<T>(const LnBackwardStepArgs<T>&, cudaStream_t);                 \
  template cudaError_t ln_gru_backward_step<T>(const LnBackwardStepArgs<T>&, cudaStream_t);
GENFAST_INSTANTIATE_LAYERNORM_RNN(float)
GENFAST_INSTANTIATE_LAYERNORM_RNN(double)
GENFAST_INSTANTIATE_LAYERNORM_RNN(__half)
GENFAST_INSTANTIATE_LAYERNORM_RNN(__nv_bfloat16)
#undef GENFAST_INSTANTIATE_LAYERNORM_RNN

}  // namespace cuda
}  // namespace genfast
