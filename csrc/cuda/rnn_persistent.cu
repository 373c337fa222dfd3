// The persistent RNN forward kernel (issue 20), written once over the cell policy (csrc/rnn/cells.h):
// one cooperative launch runs every time step of a layer and direction. The partition, the shared
// memory layout and the exchange of h are csrc/rnn/persistent_plan.h's; in short, per block:
//   once:       W_hh rows of the block's units (all gates) -> shared memory [W slice]
//   each step:  h_{t-1} (N x H, from the previous step's output rows, through L2) -> [h stage]
//               warp tiles (one unit, up to kTileRows batch rows): lanes split H in 16-byte vectors,
//               G x rows dot products, summed across the warp; the tile's first lanes add the input
//               projection and the biases and run Cell::forward_thread, writing h_t to the output
//               (and, when training, what the per-step path saves for backward)
//               grid.sync(): every block's h_t is written before any block stages it as h_{t-1}.
// One barrier per step suffices: a block stages h_{t-1} only after the barrier that ends step t-1,
// and overwrites its h stage only after the barrier that ends step t (every warp has read it by then).
#include <cooperative_groups.h>

#include "rnn/cells.h"
#include "rnn/persistent_plan.h"
#include "rnn_device.cuh"
#include "rnn_persistent.h"

namespace genfast {
namespace cuda {
namespace detail {

namespace cg = cooperative_groups;
using rnn::persistent::kMaxThreads;
using rnn::persistent::kTileRows;
using rnn::persistent::kVectorBytes;

// acc += sum over the 16-byte vectors' elements of w * h, in float.
__device__ __forceinline__ float dot16(const uint4& w, const uint4& h, float acc, float) {
  acc = fmaf(__uint_as_float(w.x), __uint_as_float(h.x), acc);
  acc = fmaf(__uint_as_float(w.y), __uint_as_float(h.y), acc);
  acc = fmaf(__uint_as_float(w.z), __uint_as_float(h.z), acc);
  return fmaf(__uint_as_float(w.w), __uint_as_float(h.w), acc);
}

template <typename Pair>
__device__ __forceinline__ float2 pair_to_float2(unsigned int bits);
template <>
__device__ __forceinline__ float2 pair_to_float2<__nv_bfloat162>(unsigned int bits) {
  __nv_bfloat162 pair;
  memcpy(&pair, &bits, sizeof(pair));
  return __bfloat1622float2(pair);
}
template <>
__device__ __forceinline__ float2 pair_to_float2<__half2>(unsigned int bits) {
  __half2 pair;
  memcpy(&pair, &bits, sizeof(pair));
  return __half22float2(pair);
}

template <typename Pair>
__device__ __forceinline__ float dot16_pairs(const uint4& w, const uint4& h, float acc) {
  const unsigned int wv[4] = {w.x, w.y, w.z, w.w}, hv[4] = {h.x, h.y, h.z, h.w};
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const float2 a = pair_to_float2<Pair>(wv[i]), b = pair_to_float2<Pair>(hv[i]);
    acc = fmaf(a.x, b.x, acc);
    acc = fmaf(a.y, b.y, acc);
  }
  return acc;
}
__device__ __forceinline__ float dot16(const uint4& w, const uint4& h, float acc, __nv_bfloat16) {
  return dot16_pairs<__nv_bfloat162>(w, h, acc);
}
__device__ __forceinline__ float dot16(const uint4& w, const uint4& h, float acc, __half) {
  return dot16_pairs<__half2>(w, h, acc);
}

__device__ __forceinline__ float warp_sum(float value) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) value += __shfl_xor_sync(0xffffffffu, value, offset);
  return value;
}

template <typename Cell, typename T>
__global__ void __launch_bounds__(kMaxThreads, 1) persistent_forward_kernel(const PersistentForwardArgs<T> a,
                                                                         const int64_t units_per_block) {
  using A = float;
  constexpr int G = Cell::kGates;
  constexpr int64_t V = kVectorBytes / sizeof(T);  // elements per vector
  extern __shared__ __align__(16) unsigned char smem[];
  const int64_t H = a.hidden, N = a.batch, GH = G * H;
  const rnn::persistent::Layout layout{G, H, N, units_per_block};
  const int64_t block = blockIdx.x;
  const int64_t vectors = H / V;  // per row
  const int64_t unit0 = layout.first_unit(block), units = layout.units(block);
  T* const w_slice = reinterpret_cast<T*>(smem);         // slice_row(u, g) x H
  T* const h_stage = w_slice + layout.h_stage_offset();  // N x H
  uint4* const h_stage_v = reinterpret_cast<uint4*>(h_stage);
  const uint4* const w_slice_v = reinterpret_cast<const uint4*>(w_slice);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
  cg::grid_group grid = cg::this_grid();

  // The block's W_hh rows, once.
  for (int64_t i = threadIdx.x; i < units * G * vectors; i += blockDim.x) {
    const int64_t row = i / vectors, v = i - row * vectors;
    const int64_t u = row / G, g = row - u * G;
    reinterpret_cast<uint4*>(w_slice + layout.slice_row(u, g) * H)[v] =
        reinterpret_cast<const uint4*>(a.w_hh + layout.weight_row(block, u, g) * H)[v];
  }

  for (int64_t p = 0; p < a.steps; ++p) {
    const int64_t t = layout.time(p, a.steps, a.reverse), t_prev = layout.prev_time(p, a.steps, a.reverse);
    const int64_t rows = layout.rows(a.step_rows, t), row0 = layout.offset(a.step_offset, t);
    const int64_t rows_prev = t_prev < 0 ? 0 : layout.rows(a.step_rows, t_prev);
    const uint4* continued = reinterpret_cast<const uint4*>(
        a.output + (t_prev < 0 ? 0 : layout.offset(a.step_offset, t_prev)) * H);
    const uint4* initial = reinterpret_cast<const uint4*>(a.hx);
    // h_{t-1} of the active rows: the previous step's output (other SMs wrote it: read through L2 with __ldcg,
    // not L1), or hx for a row that starts here.
    for (int64_t i = threadIdx.x; i < rows * vectors; i += blockDim.x)
      h_stage_v[i] = __ldcg((i / vectors < rows_prev ? continued : initial) + i);
    __syncthreads();

    for (int64_t tile = warp; tile < layout.tiles(block); tile += warps) {
      const int64_t u = layout.tile_unit(tile), n0 = layout.tile_row0(tile);
      if (n0 >= rows) continue;  // a tile of rows whose sequences have ended (packed input)
      A acc[G][kTileRows];
#pragma unroll
      for (int g = 0; g < G; ++g)
#pragma unroll
        for (int r = 0; r < kTileRows; ++r) acc[g][r] = A(0);
      for (int64_t v = lane; v < vectors; v += 32) {
        uint4 w[G];
#pragma unroll
        for (int g = 0; g < G; ++g) w[g] = w_slice_v[layout.slice_row(u, g) * vectors + v];
#pragma unroll
        for (int r = 0; r < kTileRows; ++r) {
          if (n0 + r < rows) {  // uniform across the warp
            const uint4 h = h_stage_v[(n0 + r) * vectors + v];
#pragma unroll
            for (int g = 0; g < G; ++g) acc[g][r] = dot16(w[g], h, acc[g][r], T());
          }
        }
      }
      // Every lane gets every sum; lane r then keeps the sums of batch row n0 + r.
      A gate_h[G];
#pragma unroll
      for (int g = 0; g < G; ++g) {
        gate_h[g] = A(0);
#pragma unroll
        for (int r = 0; r < kTileRows; ++r) {
          const A sum = warp_sum(acc[g][r]);
          if (r == lane) gate_h[g] = sum;
        }
      }
      const int64_t n = n0 + lane, j = unit0 + u;
      if (lane < kTileRows && n < rows) {
        const int64_t row = row0 + n;
        const T* gx = a.gates_x + row * GH;
        A x[G], b_ih[G], b_hh[G];
#pragma unroll
        for (int g = 0; g < G; ++g) {
          x[g] = to_acc(gx[g * H + j]);
          b_ih[g] = bias_or_zero(a.b_ih, g * H + j);
          b_hh[g] = bias_or_zero(a.b_hh, g * H + j);
        }
        A no_cell_state = A(0);
        A* c = Cell::kCellState ? a.c_state + n * H + j : &no_cell_state;
        const A h_before = to_acc(h_stage[n * H + j]);
        A h_out;
        A saved[Cell::kSaved];
        Cell::forward_thread(x, gate_h, b_ih, b_hh, *c, h_before, h_out, saved);
        a.output[row * H + j] = from_acc<T>(h_out);
        if (a.saved != nullptr) {
#pragma unroll
          for (int slot = 0; slot < Cell::kSaved; ++slot)
            a.saved[layout.saved_index(row, slot, j, Cell::kSaved)] = from_acc<T>(saved[slot]);
          if (Cell::kCellState) a.saved_c[layout.cell_index(row, j)] = from_acc<T>(*c);
        }
      }
    }
    grid.sync();
  }
}

// The backward: see PersistentBackwardArgs. Shared memory [W^T slice (u x G*H) | dG chunk (N x chunk) | acc
// (N x U, fp32)]: the block's W_hh columns, loaded once; per step the chunks of the recurrent gate gradients of
// every row (written by all blocks in phase A, read after the barrier through L2), and the block's sums.
template <typename Cell, typename T>
__global__ void __launch_bounds__(kMaxThreads, 1) persistent_backward_kernel(const PersistentBackwardArgs<T> a,
                                                                          const int64_t units_per_block,
                                                                          const int64_t chunk) {
  using A = float;
  constexpr int G = Cell::kGates;
  constexpr int64_t V = kVectorBytes / sizeof(T);
  extern __shared__ __align__(16) unsigned char smem[];
  const int64_t H = a.hidden, N = a.batch, GH = G * H, U = units_per_block;
  const rnn::persistent::Layout layout{G, H, N, U};
  const int64_t block = blockIdx.x;
  const int64_t unit0 = layout.first_unit(block), units = layout.units(block);
  T* const w_t = reinterpret_cast<T*>(smem);  // U x GH
  T* const stage = w_t + U * GH;              // N x chunk
  A* const acc = reinterpret_cast<A*>(stage + N * chunk);
  const uint4* const w_t_v = reinterpret_cast<const uint4*>(w_t);
  uint4* const stage_v = reinterpret_cast<uint4*>(stage);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
  const T* const d_rec = Cell::kSidesAdd ? a.d_gates : a.d_gates_h;  // what multiplies W_hh
  cg::grid_group grid = cg::this_grid();

  for (int64_t i = threadIdx.x; i < units * GH; i += blockDim.x) {  // column unit0 + u of W_hh, once
    const int64_t u = i / GH, r = i - u * GH;
    w_t[u * GH + r] = a.w_hh[r * H + unit0 + u];
  }

  for (int64_t s = 0; s < a.steps; ++s) {
    const int64_t p = a.steps - 1 - s;  // the forward's p-th step, in reverse
    const int64_t t = layout.time(p, a.steps, a.reverse), t_prev = layout.prev_time(p, a.steps, a.reverse);
    const int64_t rows = layout.rows(a.step_rows, t), row0 = layout.offset(a.step_offset, t);
    const int64_t rows_prev = t_prev < 0 ? 0 : layout.rows(a.step_rows, t_prev);
    const int64_t prev0 = t_prev < 0 ? 0 : layout.offset(a.step_offset, t_prev);
    // Phase A: the cell's backward of each active (row, unit) of the block. A row continues from the forward's
    // previous step when that step had it, else it started here from hx (cx).
    for (int64_t i = threadIdx.x; i < units * rows; i += blockDim.x) {
      const int64_t n = i / units, j = unit0 + (i - n * units), row = row0 + n;
      const bool continues = n < rows_prev;
      const A d_h = to_acc(a.grad_output[row * H + j]) + a.dh_state[n * H + j];
      A saved[Cell::kSaved];
#pragma unroll
      for (int slot = 0; slot < Cell::kSaved; ++slot)
        saved[slot] = to_acc(a.saved[layout.saved_index(row, slot, j, Cell::kSaved)]);
      const T h_before = continues ? a.output[(prev0 + n) * H + j] : a.hx[n * H + j];
      A state_prev = to_acc(h_before), c_cur = A(0), no_cell_state = A(0);
      if (Cell::kCellState) {
        state_prev = to_acc(continues ? a.saved_c[layout.cell_index(prev0 + n, j)] : a.cx[n * H + j]);
        c_cur = to_acc(a.saved_c[layout.cell_index(row, j)]);
      }
      A* d_c = Cell::kCellState ? a.dc_state + n * H + j : &no_cell_state;
      A d_x[G], d_hside[G], d_direct = A(0);
      Cell::backward_thread(d_h, *d_c, saved, state_prev, c_cur, d_x, d_hside, d_direct);
#pragma unroll
      for (int g = 0; g < G; ++g) {
        a.d_gates[row * GH + g * H + j] = from_acc<T>(d_x[g]);
        if (!Cell::kSidesAdd) a.d_gates_h[row * GH + g * H + j] = from_acc<T>(d_hside[g]);
      }
      a.h_prev[row * H + j] = h_before;
      a.dh_state[n * H + j] = Cell::kDirectHidden ? d_direct : A(0);
    }
    grid.sync();

    // Phase B: dL/dh_{t-1} of the block's units += dG_t W_hh for the active rows, over chunks of dG's columns.
    for (int64_t i = threadIdx.x; i < N * U; i += blockDim.x) acc[i] = A(0);
    for (int64_t r0 = 0; r0 < GH; r0 += chunk) {
      const int64_t width = min(chunk, GH - r0), wv = width / V, cv = chunk / V;
      __syncthreads();  // the previous chunk is read (and acc zeroed)
      const uint4* src = reinterpret_cast<const uint4*>(d_rec + row0 * GH + r0);
      for (int64_t i = threadIdx.x; i < rows * wv; i += blockDim.x) {
        const int64_t n = i / wv, v = i - n * wv;
        stage_v[n * cv + v] = __ldcg(src + n * (GH / V) + v);
      }
      __syncthreads();
      for (int64_t tile = warp; tile < layout.tiles(block); tile += warps) {
        const int64_t u = layout.tile_unit(tile), n0 = layout.tile_row0(tile);
        if (n0 >= rows) continue;  // rows whose sequences are not active at this step (packed input)
        A part[kTileRows];
#pragma unroll
        for (int r = 0; r < kTileRows; ++r) part[r] = A(0);
        for (int64_t v = lane; v < wv; v += 32) {
          const uint4 w = w_t_v[(u * GH + r0) / V + v];
#pragma unroll
          for (int r = 0; r < kTileRows; ++r)
            if (n0 + r < rows) part[r] = dot16(w, stage_v[(n0 + r) * cv + v], part[r], T());
        }
#pragma unroll
        for (int r = 0; r < kTileRows; ++r) {
          const A sum = warp_sum(part[r]);
          if (lane == r && n0 + r < rows) acc[(n0 + r) * U + u] += sum;
        }
      }
    }
    __syncthreads();
    for (int64_t i = threadIdx.x; i < units * rows; i += blockDim.x) {
      const int64_t n = i / units, u = i - n * units;
      a.dh_state[n * H + unit0 + u] += acc[n * U + u];
    }
    __syncthreads();  // phase A of the next step reads dh_state written here by other threads of the block
  }
}

template <typename Cell, typename T>
cudaError_t allow_shared_memory(int64_t smem_bytes) {
  return cudaFuncSetAttribute(persistent_forward_kernel<Cell, T>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                              static_cast<int>(smem_bytes));
}

}  // namespace detail

template <typename Cell, typename T>
cudaError_t persistent_forward_occupancy(int threads, int64_t smem_bytes, int* regs_per_thread, int* blocks_per_sm) {
  cudaFuncAttributes attributes;
  cudaError_t status = cudaFuncGetAttributes(&attributes, detail::persistent_forward_kernel<Cell, T>);
  if (status != cudaSuccess) return status;
  *regs_per_thread = attributes.numRegs;
  status = detail::allow_shared_memory<Cell, T>(smem_bytes);
  if (status != cudaSuccess) return status;
  return cudaOccupancyMaxActiveBlocksPerMultiprocessor(blocks_per_sm, detail::persistent_forward_kernel<Cell, T>,
                                                       threads, static_cast<size_t>(smem_bytes));
}

template <typename Cell, typename T>
cudaError_t persistent_forward(const PersistentForwardArgs<T>& args, const PersistentLaunch& launch,
                               cudaStream_t stream) {
  if (args.steps == 0 || args.batch == 0 || args.hidden == 0) return cudaSuccess;
  cudaError_t status = detail::allow_shared_memory<Cell, T>(launch.smem_bytes);
  if (status != cudaSuccess) return status;
  PersistentForwardArgs<T> kernel_args = args;
  int64_t units_per_block = launch.units_per_block;
  void* params[] = {&kernel_args, &units_per_block};
  return cudaLaunchCooperativeKernel(reinterpret_cast<const void*>(detail::persistent_forward_kernel<Cell, T>),
                                     dim3(launch.grid), dim3(launch.threads), params,
                                     static_cast<size_t>(launch.smem_bytes), stream);
}

template <typename Cell, typename T>
cudaError_t persistent_backward_occupancy(int threads, int64_t smem_bytes, int* regs_per_thread, int* blocks_per_sm) {
  cudaFuncAttributes attributes;
  cudaError_t status = cudaFuncGetAttributes(&attributes, detail::persistent_backward_kernel<Cell, T>);
  if (status != cudaSuccess) return status;
  *regs_per_thread = attributes.numRegs;
  status = cudaFuncSetAttribute(detail::persistent_backward_kernel<Cell, T>,
                                cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem_bytes));
  if (status != cudaSuccess) return status;
  return cudaOccupancyMaxActiveBlocksPerMultiprocessor(blocks_per_sm, detail::persistent_backward_kernel<Cell, T>,
                                                       threads, static_cast<size_t>(smem_bytes));
}

template <typename Cell, typename T>
cudaError_t persistent_backward(const PersistentBackwardArgs<T>& args, const PersistentLaunch& launch,
                                cudaStream_t stream) {
  if (args.steps == 0 || args.batch == 0 || args.hidden == 0) return cudaSuccess;
  cudaError_t status = cudaFuncSetAttribute(detail::persistent_backward_kernel<Cell, T>,
                                            cudaFuncAttributeMaxDynamicSharedMemorySize,
                                            static_cast<int>(launch.smem_bytes));
  if (status != cudaSuccess) return status;
  PersistentBackwardArgs<T> kernel_args = args;
  int64_t units_per_block = launch.units_per_block, chunk = launch.chunk_columns;
  void* params[] = {&kernel_args, &units_per_block, &chunk};
  return cudaLaunchCooperativeKernel(reinterpret_cast<const void*>(detail::persistent_backward_kernel<Cell, T>),
                                     dim3(launch.grid), dim3(launch.threads), params,
                                     static_cast<size_t>(launch.smem_bytes), stream);
}

#define GENFAST_INSTANTIATE_PERSISTENT(Cell, T)                                                                \
  template cudaError_t persistent_forward_occupancy<Cell, T>(int, int64_t, int*, int*);                        \
  template cudaError_t persistent_forward<Cell, T>(const PersistentForwardArgs<T>&, const PersistentLaunch&,   \
                                                   cudaStream_t);                                              \
  template cudaError_t persistent_backward_occupancy<Cell, T>(int, int64_t, int*, int*);                       \
  template cudaError_t persistent_backward<Cell, T>(const PersistentBackwardArgs<T>&, const PersistentLaunch&, \
                                                    cudaStream_t);
GENFAST_INSTANTIATE_PERSISTENT(rnn::LstmCell, float)
GENFAST_INSTANTIATE_PERSISTENT(rnn::LstmCell, __half)
GENFAST_INSTANTIATE_PERSISTENT(rnn::LstmCell, __nv_bfloat16)
GENFAST_INSTANTIATE_PERSISTENT(rnn::GruCell, float)
GENFAST_INSTANTIATE_PERSISTENT(rnn::GruCell, __half)
GENFAST_INSTANTIATE_PERSISTENT(rnn::GruCell, __nv_bfloat16)
#undef GENFAST_INSTANTIATE_PERSISTENT

}  // namespace cuda
}  // namespace genfast
