// The partition of the persistent RNN forward kernel (csrc/cuda/rnn_persistent.cu, issue 20):
// whether one cooperative launch per layer and direction can keep W_hh on chip for the whole
// sequence on a given device, and how. Torch-free and host-only arithmetic, so the decision is
// tested on the CPU (tests/test_rnn_persistent_plan.py, through genfast._probe) with the numbers
// of devices it will meet; the CUDA glue calls the same function with the live device's.
//
// The partition (G = gate blocks of the cell, H hidden units, N batch rows, E bytes per element):
//   - block b of the grid owns the hidden units [b*U, min(H, (b+1)*U)), U = ceil(H / SMs), and
//     with them the G*U rows of W_hh that produce all gates of those units (gate g of unit j is
//     W_hh row g*H + j); grid = ceil(H / U) <= SMs, one block per SM;
//   - shared memory of a block: [W slice | h stage]
//       W slice  G*U rows of H elements, row (u*G + g) = W_hh row g*H + (b*U + u), loaded once;
//       h stage  N rows of H elements: h_{t-1} of every batch row, loaded at the start of each step;
//   - a warp takes one unit and up to kTileRows batch rows (a tile): its lanes split H in 16-byte
//     vectors, multiply the unit's G weight rows by the tile's h rows, sum across the warp, and the
//     tile's first lanes apply the cell to (row, unit); tiles go round-robin over the block's warps;
//   - exchange: h_t (element type) goes straight to the layer's output at step t, which is where
//     every block reads h_{t-1} from after the grid-wide barrier (hx at the first step): N*H*E
//     bytes written per step, read by every block through L2 (grid * N*H*E bytes per step);
//   - the cell state c (fp32) stays in a global N x H buffer, each element read and written by the
//     one thread that owns (row, unit).
// It does not fit (the per-step path runs, with the reason) when H is not a whole number of 16-byte
// vectors, the W slice plus the h stage exceed a block's shared memory, the block's registers
// exceed the SM's, the device cannot launch cooperatively, or the grid exceeds the co-resident
// blocks.
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <string>

// The index math below runs in the kernel and in the host emulation (genfast._probe.persistent_rnn_emulate).
#if defined(__CUDACC__)
#define GENFAST_PLAN_HD __host__ __device__ __forceinline__
#else
#define GENFAST_PLAN_HD inline
#endif

namespace genfast {
namespace rnn {
namespace persistent {

constexpr int kVectorBytes = 16;  // what a lane loads at once from the W slice and the h stage
constexpr int kTileRows = 4;      // batch rows of a warp's tile
constexpr int kMinWarps = 4;      // a block never has fewer (the h stage is loaded by all threads)
constexpr int kMaxWarps = 16;     // 512 threads: the kernel's __launch_bounds__
constexpr int kMaxThreads = 32 * kMaxWarps;

// Where things are, for a partition of G gates, H units, N rows and U units per block: shared by the kernel
// (csrc/cuda/rnn_persistent.cu) and the host emulation of its schedule, which tests check against torch.nn.
struct Layout {
  int64_t gates = 0, hidden = 0, batch = 0, units_per_block = 0;

  // Units block b owns (the last block may own fewer than U).
  GENFAST_PLAN_HD int64_t first_unit(int64_t block) const { return block * units_per_block; }
  GENFAST_PLAN_HD int64_t units(int64_t block) const {
    const int64_t end = (block + 1) * units_per_block;
    return (end < hidden ? end : hidden) - first_unit(block);
  }
  // Row of the block's W slice that holds gate g of its local unit u, and the W_hh row it copies.
  GENFAST_PLAN_HD int64_t slice_row(int64_t u, int64_t g) const { return u * gates + g; }
  GENFAST_PLAN_HD int64_t weight_row(int64_t block, int64_t u, int64_t g) const {
    return g * hidden + first_unit(block) + u;
  }
  // Elements of the W slice (the h stage starts there): G * U * H, the same for every block.
  GENFAST_PLAN_HD int64_t h_stage_offset() const { return gates * units_per_block * hidden; }
  // Tiles: one local unit x up to kTileRows batch rows; tile i is unit i / row_tiles, rows from row0(i).
  GENFAST_PLAN_HD int64_t row_tiles() const { return (batch + kTileRows - 1) / kTileRows; }
  GENFAST_PLAN_HD int64_t tiles(int64_t block) const { return units(block) * row_tiles(); }
  GENFAST_PLAN_HD int64_t tile_unit(int64_t tile) const { return tile / row_tiles(); }
  GENFAST_PLAN_HD int64_t tile_row0(int64_t tile) const { return (tile % row_tiles()) * kTileRows; }
  // Packed input (batch_sizes; null when padded): rows active at step t, a prefix of the batch, and the row of
  // the flattened sequence where step t starts. Row n < rows(t - 1) of a step continues from the previous step's
  // output; a row past it (only in the reverse direction) starts from hx.
  GENFAST_PLAN_HD int64_t rows(const int64_t* step_rows, int64_t t) const { return step_rows ? step_rows[t] : batch; }
  GENFAST_PLAN_HD int64_t offset(const int64_t* step_offset, int64_t t) const {
    return step_offset ? step_offset[t] : t * batch;
  }
  // Training: where the values backward reads go in the workspace (rnn::WorkspaceLayout, the per-step path's):
  // slot s of the cell's saved values of (row, unit j) in the saved block, and c_t of (row, j) in the cell block.
  GENFAST_PLAN_HD int64_t saved_index(int64_t row, int64_t slot, int64_t j, int64_t saved_values) const {
    return (row * saved_values + slot) * hidden + j;
  }
  GENFAST_PLAN_HD int64_t cell_index(int64_t row, int64_t j) const { return row * hidden + j; }
  // The time step processed p-th, and the step whose output holds its h_{t-1} (-1: hx).
  GENFAST_PLAN_HD static int64_t time(int64_t p, int64_t steps, bool reverse) { return reverse ? steps - 1 - p : p; }
  GENFAST_PLAN_HD static int64_t prev_time(int64_t p, int64_t steps, bool reverse) {
    return p == 0 ? -1 : time(p - 1, steps, reverse);
  }
};

// What the device offers (cudaDeviceProp's fields of the same meaning).
struct DeviceBudget {
  int sm_count = 0;                     // multiProcessorCount
  int64_t smem_per_sm = 0;              // sharedMemPerMultiprocessor
  int64_t smem_per_block = 0;           // sharedMemPerBlockOptin: the most one block may opt into
  int64_t smem_reserved_per_block = 0;  // reservedSharedMemPerBlock: taken by the system per block
  int64_t regs_per_sm = 0;              // regsPerMultiprocessor
  int max_threads_per_sm = 0;           // maxThreadsPerMultiProcessor
  int max_blocks_per_sm = 0;            // maxBlocksPerMultiProcessor
  bool cooperative_launch = false;      // cooperativeLaunch
};

// The layer: the cell's gate blocks, H, N, the element size, and the kernel's registers per thread
// (cudaFuncAttributes::numRegs; at most 65536 / kMaxThreads = 128 by the launch bounds).
struct Problem {
  int gates = 0;
  int64_t hidden = 0;
  int64_t batch = 0;
  int element_bytes = 0;
  int regs_per_thread = 0;
};

struct Plan {
  bool fits = false;
  std::string reason;          // why it does not fit; empty when it does
  int grid = 0;                // blocks, one cooperative launch
  int threads = 0;             // per block
  int64_t units_per_block = 0; // U; the last block may own fewer
  int64_t vector_elements = 0; // elements per 16-byte vector
  int64_t tiles_per_block = 0; // U * ceil(N / kTileRows), over the block's warps
  int64_t w_smem_bytes = 0;    // the W slice: G * U * H * E
  int64_t h_smem_bytes = 0;    // the h stage: N * H * E, at offset w_smem_bytes
  int64_t smem_bytes = 0;      // dynamic shared memory per block
  int blocks_per_sm = 0;       // co-resident blocks per SM at this size (by smem, registers, threads)
  int64_t exchange_bytes = 0;  // h_t written per step: N * H * E
  int64_t l2_read_bytes = 0;   // h_{t-1} read per step by all blocks: grid * N * H * E

  // The hidden units block b owns: [unit_begin(b), unit_end(b)).
  int64_t unit_begin(int64_t block) const { return block * units_per_block; }
  int64_t unit_end(int64_t block, int64_t hidden) const { return std::min(hidden, (block + 1) * units_per_block); }
};

namespace detail {
inline std::string kib(int64_t bytes) {
  char text[32];
  std::snprintf(text, sizeof(text), "%.1f KiB", static_cast<double>(bytes) / 1024.0);
  return text;
}
inline std::string num(int64_t value) { return std::to_string(value); }
inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// How many blocks of `plan`'s shape an SM holds at once (registers, shared memory, threads, the block limit),
// stored in plan.blocks_per_sm; the reason the whole grid cannot be resident at once, or "" when it can.
inline std::string check_residency(Plan& plan, const Problem& p, const DeviceBudget& d) {
  // Registers are allocated per warp in units of 256.
  const int64_t warps = plan.threads / 32;
  const int64_t regs_per_warp = ceil_div(static_cast<int64_t>(std::max(p.regs_per_thread, 1)) * 32, 256) * 256;
  const int64_t block_regs = regs_per_warp * warps;
  if (block_regs > d.regs_per_sm)
    return "registers: " + num(plan.threads) + " threads x " + num(p.regs_per_thread) + " registers exceed the " +
           num(d.regs_per_sm) + " of an SM";
  int64_t per_sm = d.max_blocks_per_sm > 0 ? d.max_blocks_per_sm : 1;
  per_sm = std::min(per_sm, d.smem_per_sm / (plan.smem_bytes + d.smem_reserved_per_block));
  per_sm = std::min(per_sm, d.regs_per_sm / block_regs);
  if (d.max_threads_per_sm > 0) per_sm = std::min<int64_t>(per_sm, d.max_threads_per_sm / plan.threads);
  plan.blocks_per_sm = static_cast<int>(per_sm);
  if (per_sm * d.sm_count < plan.grid)
    return "co-residency: a grid of " + num(plan.grid) + " blocks exceeds the " + num(per_sm * d.sm_count) +
           " blocks that can be resident at once (" + num(per_sm) + " per SM at " + kib(plan.smem_bytes) +
           " of shared memory and " + num(plan.threads) + " threads)";
  return "";
}
}  // namespace detail

// The partition of `p` on `d`, or the reason there is none.
inline Plan make_plan(const Problem& p, const DeviceBudget& d) {
  using detail::ceil_div;
  using detail::kib;
  using detail::num;
  Plan plan;
  auto fail = [&](std::string why) {
    plan.fits = false;
    plan.reason = std::move(why);
    return plan;
  };
  if (p.gates <= 0 || p.hidden <= 0 || p.batch <= 0 || p.element_bytes <= 0)
    return fail("empty problem (gates " + num(p.gates) + ", H " + num(p.hidden) + ", N " + num(p.batch) +
                ", element bytes " + num(p.element_bytes) + ")");
  if (p.element_bytes != 2 && p.element_bytes != 4)
    return fail("element type of " + num(p.element_bytes) + " bytes: the kernel is built for fp32, bf16 and fp16");
  if (d.sm_count <= 0) return fail("device reports no SMs");
  if (!d.cooperative_launch) return fail("device cannot launch cooperatively (cooperativeLaunch = 0)");
  plan.vector_elements = kVectorBytes / p.element_bytes;
  if (p.hidden % plan.vector_elements != 0)
    return fail("H=" + num(p.hidden) + " is not a multiple of " + num(plan.vector_elements) +
                " (one 16-byte vector of elements)");

  const int64_t E = p.element_bytes, H = p.hidden, N = p.batch, G = p.gates;
  plan.units_per_block = ceil_div(H, d.sm_count);
  plan.grid = static_cast<int>(ceil_div(H, plan.units_per_block));
  plan.tiles_per_block = plan.units_per_block * ceil_div(N, kTileRows);
  const int64_t warps = std::min<int64_t>(kMaxWarps, std::max<int64_t>(kMinWarps, plan.tiles_per_block));
  plan.threads = static_cast<int>(32 * warps);
  plan.w_smem_bytes = G * plan.units_per_block * H * E;
  plan.h_smem_bytes = N * H * E;
  plan.smem_bytes = plan.w_smem_bytes + plan.h_smem_bytes;
  plan.exchange_bytes = N * H * E;
  plan.l2_read_bytes = plan.grid * N * H * E;

  if (plan.w_smem_bytes > d.smem_per_block)
    return fail("weight: the W_hh slice of a block (" + num(G * plan.units_per_block) + " rows x H=" + num(H) +
                " = " + kib(plan.w_smem_bytes) + ", W_hh " + kib(G * H * H * E) + " over " + num(plan.grid) +
                " blocks) exceeds the " + kib(d.smem_per_block) + " of shared memory a block may have");
  if (plan.smem_bytes > d.smem_per_block)
    return fail("h stage: the W_hh slice (" + kib(plan.w_smem_bytes) + ") plus h_{t-1} of N=" + num(N) +
                " rows (" + kib(plan.h_smem_bytes) + ") exceed the " + kib(d.smem_per_block) +
                " of shared memory a block may have");
  const std::string residency = detail::check_residency(plan, p, d);
  if (!residency.empty()) return fail(residency);
  plan.fits = true;
  return plan;
}

// The backward (BPTT) kernel's partition: the same units per block as the forward, each block keeping the
// W_hh columns of its units (W_hh^T rows: U x G*H, `w_smem_bytes`) for the recurrent gradient
// dL/dh_{t-1}[n, j] = sum_r dG[n, r] W_hh[r, j]. The gate gradients dG (N x G*H) of every block arrive through
// global memory in chunks of `chunk_columns` (a multiple of the vector, at most G*H, as wide as fits), staged in
// `h_smem_bytes` = N x chunk, and the block sums into an N x U fp32 accumulator (`acc_smem_bytes`).
// Shared memory: [W^T slice | dG chunk | accumulator].
struct BackwardPlan : Plan {
  int64_t chunk_columns = 0;
  int64_t acc_smem_bytes = 0;
};

inline BackwardPlan make_backward_plan(const Problem& p, const DeviceBudget& d) {
  using detail::ceil_div;
  using detail::kib;
  using detail::num;
  // The forward's checks (sizes, element type, vector width, cooperative launch) and partition, with a one-row h stage.
  const Plan forward = make_plan({p.gates, p.hidden, 1, p.element_bytes, p.regs_per_thread}, d);
  BackwardPlan plan;
  static_cast<Plan&>(plan) = forward;
  auto fail = [&](std::string why) {
    plan.fits = false;
    plan.reason = std::move(why);
    return plan;
  };
  if (p.batch <= 0) return fail("empty problem (N " + num(p.batch) + ")");
  if (!forward.fits && forward.reason.rfind("h stage", 0) != 0 && forward.reason.rfind("co-residency", 0) != 0)
    return plan;  // a cause the batch does not change
  const int64_t E = p.element_bytes, H = p.hidden, N = p.batch, G = p.gates, GH = G * H;
  const int64_t U = plan.units_per_block, V = kVectorBytes / E;
  plan.tiles_per_block = U * ceil_div(N, kTileRows);
  const int64_t warps = std::min<int64_t>(kMaxWarps, std::max<int64_t>(kMinWarps, plan.tiles_per_block));
  plan.threads = static_cast<int>(32 * warps);
  plan.w_smem_bytes = U * GH * E;
  plan.acc_smem_bytes = N * U * 4;
  plan.exchange_bytes = N * GH * E;
  plan.l2_read_bytes = plan.grid * N * GH * E;
  if (plan.w_smem_bytes + plan.acc_smem_bytes > d.smem_per_block)
    return fail("weight: the W_hh^T slice of a block (" + kib(plan.w_smem_bytes) + ") exceeds the " +
                kib(d.smem_per_block) + " of shared memory a block may have");
  const int64_t room = d.smem_per_block - plan.w_smem_bytes - plan.acc_smem_bytes;
  plan.chunk_columns = std::min(GH, room / (N * E) / V * V);
  if (plan.chunk_columns < V)
    return fail("dG stage: no room for one 16-byte vector of N=" + num(N) + " rows of dG beside the W_hh^T slice (" +
                kib(plan.w_smem_bytes) + ")");
  plan.h_smem_bytes = N * plan.chunk_columns * E;
  plan.smem_bytes = plan.w_smem_bytes + plan.h_smem_bytes + plan.acc_smem_bytes;
  const std::string residency = detail::check_residency(plan, p, d);
  if (!residency.empty()) return fail(residency);
  plan.fits = true;
  plan.reason.clear();
  return plan;
}

}  // namespace persistent
}  // namespace rnn
}  // namespace genfast
