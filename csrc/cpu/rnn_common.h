// The machinery of the CPU time loops (csrc/cpu/rnn.cpp): the team of threads that runs a
// time loop, how one time step's work is split over it, the recurrent product of one work item,
// and the packing of the recurrent weight. The schedule and the argument checks are shared with
// CUDA (csrc/rnn/rnn_host.h).
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <omp.h>
#if defined(__linux__)
#include <sched.h>
#endif

#include <algorithm>
#include <atomic>
#include <fstream>
#include <optional>
#include <string>
#include <thread>
#include <vector>

#include "cpu/gemm.h"
#include "cpu/memory.h"
#include "cpu/simd.h"
#include "rnn/rnn_host.h"

namespace genfast::cpu {

// Hidden units per panel: one 64-byte vector of floats. A panel of the recurrent weight holds the
// columns of every gate of kUnits consecutive units, so one thread computes all gates of its units
// and applies the cell update without waiting for anyone.
constexpr int64_t kUnits = 16;

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

using rnn::Schedule;

// Asks the cache for one row of a tile's slice of the input projection: `gates` segments
// of 16 units (one or two cache lines each), `gate_stride` apart. The projection of every
// step was computed before the time loop and has left L1/L2 by the time a step reads it;
// tiles prefetch their first kPrefetchRows rows before their recurrent product and then
// row m + kPrefetchRows while updating row m, so the misses overlap with useful work
// instead of stalling the cell update.
constexpr int64_t kPrefetchRows = 8;

template <typename T>
GENFAST_INLINE void prefetch_gate_row(const T* row, int64_t gates, int64_t gate_stride) {
  for (int64_t g = 0; g < gates; ++g) {
    __builtin_prefetch(row + g * gate_stride, 0, 3);
    __builtin_prefetch(row + g * gate_stride + kUnits - 1, 0, 3);
  }
}

// The recurrent product of one work item: acc (rows r0..r1 x gates*16) = h_prev rows times
// the W_hh columns of all gates of units [16*panel, 16*panel + 16). From the packed panel
// (packed != nullptr), or by dot products over W_hh (gates*H x K) in place.
template <typename T, int64_t Gates>
inline void recurrent_tile(const T* packed, const T* w_hh, const T* h_prev, int64_t K, int64_t H, int64_t panel,
                           int64_t r0, int64_t r1, T* acc) {
  constexpr int64_t width = Gates * kUnits;
  if (packed) {
    gemm_panel<T>(r1 - r0, K, h_prev + r0 * K, K, packed + panel * K * width, width, acc, width);
    return;
  }
  const int64_t j0 = panel * kUnits, units = std::min(kUnits, H - j0);
  const T* rows[width];
  for (int64_t c = 0; c < width; ++c)
    rows[c] = c % kUnits < units ? w_hh + ((c / kUnits) * H + j0 + c % kUnits) * K : nullptr;
  dot_panel<T>(r1 - r0, K, h_prev + r0 * K, K, rows, width, acc, width);
}

// The backward's recurrent product for one work item: acc (rows x 16) = rows of dG (each K = gates*H
// wide) times W_hh's columns [16*panel, 16*panel + 16), of `cols` in all: from the packed panels of
// W_hh's columns, or (packed == nullptr, one sequence) by dot products over the rows of W_hh^T in place.
template <typename T>
inline void backward_recurrent_tile(const T* packed, const T* w_hh_t, const T* dG, int64_t K, int64_t cols,
                                    int64_t panel, int64_t rows, T* acc) {
  if (packed) {
    gemm_panel<T>(rows, K, dG, K, packed + panel * K * kUnits, kUnits, acc, kUnits);
    return;
  }
  const T* columns[kUnits];
  for (int64_t c = 0; c < kUnits; ++c) {
    const int64_t column = panel * kUnits + c;
    columns[c] = column < cols ? w_hh_t + column * K : nullptr;
  }
  dot_panel<T>(rows, K, dG, K, columns, kUnits, acc, kUnits);
}

// pack_panels with the panels split over threads: packing a weight of many MB is a pass over
// memory that one thread alone would take while the others wait.
template <typename T, typename ColumnMap>
void pack_panels_parallel(const T* b, int64_t stride_k, int64_t stride_n, int64_t K, int64_t num_panels,
                          int64_t width, ColumnMap source_column, T* out) {
  at::parallel_for(0, num_panels, 1, [&](int64_t p0, int64_t p1) {
    pack_panels<T>(b, stride_k, stride_n, K, p1 - p0, width,
                   [&](int64_t p, int64_t c) { return source_column(p0 + p, c); }, out + p0 * K * width);
  });
}

// Panels of kUnits columns of a (K x cols) row-major matrix, or of its transpose.
template <typename T>
inline at::Tensor pack_columns(const at::Tensor& w, bool transpose) {
  const int64_t K = transpose ? w.size(1) : w.size(0);
  const int64_t cols = transpose ? w.size(0) : w.size(1);
  const int64_t panels = ceil_div(cols, kUnits);
  at::Tensor packed = empty_large({panels * K * kUnits}, w.options());
  const int64_t ld = w.size(1);
  pack_panels_parallel<T>(w.data_ptr<T>(), transpose ? 1 : ld, transpose ? ld : 1, K, panels, kUnits,
                          [&](int64_t p, int64_t col) { return p * kUnits + col < cols ? p * kUnits + col : -1; },
                          packed.data_ptr<T>());
  return packed;
}

// W_hh (gates*H x cols) as the backward's recurrent product reads it (backward_recurrent_tile):
// packed column panels, or, with one sequence, W_hh^T read in place, as the forward does
// (read_weight_in_place). The packed micro-kernel with a single row waits on its two accumulators;
// a dot group keeps eight.
template <typename T>
struct BackwardWeight {
  at::Tensor packed, transposed;  // exactly one is defined

  BackwardWeight(const Schedule& sc, const at::Tensor& w_hh) {
    if (sc.batch == 1)
      transposed = w_hh.t().contiguous();
    else
      packed = pack_columns<T>(w_hh, /*transpose=*/false);
  }
  const T* packed_data() const { return packed.defined() ? packed.data_ptr<T>() : nullptr; }
  const T* transposed_data() const { return transposed.defined() ? transposed.data_ptr<T>() : nullptr; }
};

// Packing the recurrent weight costs about two passes over it; the packed GEMM then
// reads it once per step. With one or two steps of at most kMaxDotRows rows each,
// dot products over the weight in place (dot_panel) do less memory traffic. With one
// sequence they are also the faster product: a single row keeps only two of the packed
// micro-kernel's accumulators busy, waiting on each FMA, where a dot group keeps eight.
// Why these cut-offs: docs/design.md (RNN thresholds).
constexpr int64_t kInPlaceMaxDotGroups = 2;  // steps x dot groups of rows below which packing does not pay

inline bool read_weight_in_place(const Schedule& sc) {
  return sc.batch == 1 || sc.steps * ceil_div(sc.batch, kMaxDotRows) <= kInPlaceMaxDotGroups;
}

// Final hidden state of each sequence: its output at the last step it was active.
template <typename T>
void gather_last_hidden(const Schedule& sc, bool reverse, const T* out, T* hy, int64_t Hout) {
  for (int64_t m = 0; m < sc.batch; ++m) {
    int64_t t_last = 0;
    if (!reverse)
      while (t_last + 1 < sc.steps && m < sc.active[t_last + 1]) ++t_last;
    std::copy(out + (sc.offset[t_last] + m) * Hout, out + (sc.offset[t_last] + m + 1) * Hout, hy + m * Hout);
  }
}

// h_{t-1} for every row of the sequence: the previous step's output, or hx.
template <typename T>
void gather_previous_hidden(const Schedule& sc, bool reverse, const T* out, const T* hx, T* h_prev, int64_t Hout) {
  at::parallel_for(0, sc.steps, 1, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const int64_t p = sc.previous(t, reverse);
      for (int64_t m = 0; m < sc.active[t]; ++m) {
        const T* src = (p >= 0 && m < sc.active[p]) ? out + (sc.offset[p] + m) * Hout : hx + m * Hout;
        std::copy(src, src + Hout, h_prev + (sc.offset[t] + m) * Hout);
      }
    }
  });
}

// How one time step is cut into work items: `panels` column panels times row blocks
// of `block` rows. Items are numbered panel-major so a thread's consecutive items
// share a weight panel, and each thread keeps the same panels step after step.
struct Partition {
  int64_t panels = 0, block = 0, row_blocks = 0;
  int64_t items() const { return panels * row_blocks; }
};

inline Partition partition(int64_t panels, int64_t rows, int64_t threads) {
  Partition p;
  p.panels = panels;
  const int64_t per_row = gemm_rows_per_kernel();
  // Enough items to keep every thread busy; rows are split only when panels are few.
  const int64_t want_blocks = std::max<int64_t>(1, ceil_div(2 * threads, std::max<int64_t>(panels, 1)));
  p.block = std::max<int64_t>(1, rows);
  if (want_blocks > 1) p.block = std::max<int64_t>(per_row, ceil_div(ceil_div(rows, want_blocks), per_row) * per_row);
  p.row_blocks = std::max<int64_t>(1, ceil_div(rows, p.block));
  return p;
}

// ---- The threads of a time loop
//
// A time loop is a chain of short parallel passes (tens of microseconds at small sizes), each
// needing the one before. One parallel region per pass costs a fork and a join per step, so
// one region spans the whole loop and consecutive passes are separated by StepTeam::sync(), a
// barrier the threads spin on.

// The CPUs this process may run on (its affinity mask on Linux), read once.
inline int usable_cpus() {
  static const int count = [] {
#if defined(__linux__)
    cpu_set_t set;
    CPU_ZERO(&set);
    if (sched_getaffinity(0, sizeof(set), &set) == 0) return CPU_COUNT(&set);
#endif
    return std::max(1, static_cast<int>(std::thread::hardware_concurrency()));
  }();
  return count;
}

// Threads now inside a time loop's team, over all teams of the process (several Python
// threads may each run an RNN).
inline std::atomic<int>& threads_in_teams() {
  static std::atomic<int> count{0};
  return count;
}

// A sense-reversing counter barrier. Waiters spin (a pause per check) and, after a while,
// yield their CPU. With more team threads than CPUs they yield at once: a spinning thread
// would hold the CPU that the thread everyone waits for needs.
class SpinBarrier {
 public:
  void wait(int team_size) {
    const bool oversubscribed = threads_in_teams().load(std::memory_order_relaxed) > usable_cpus();
    const int spins_before_yield = oversubscribed ? 0 : kSpinsBeforeYield;
    const int generation = generation_.load(std::memory_order_relaxed);
    if (arrived_.fetch_add(1, std::memory_order_acq_rel) == team_size - 1) {
      arrived_.store(0, std::memory_order_relaxed);
      generation_.store(generation + 1, std::memory_order_release);
      return;
    }
    for (int spins = 0; generation_.load(std::memory_order_acquire) == generation; ++spins) {
      if (spins < spins_before_yield) {
#if defined(__x86_64__) || defined(_M_X64)
        __builtin_ia32_pause();
#endif
      } else {
        std::this_thread::yield();
      }
    }
  }

 private:
  // Pause-checks before a waiter yields: long enough to cover a step's imbalance between threads,
  // short enough that an idle team gives its CPUs back soon (docs/design.md, RNN thresholds).
  static constexpr int kSpinsBeforeYield = 20000;
  alignas(64) std::atomic<int> arrived_{0};
  alignas(64) std::atomic<int> generation_{0};
};

// One thread's view of the team running a time loop. A team split by rows (row_end >= 0) gives each
// thread rows [row_begin, row_end) of every step, all their panels, and needs no barrier: a row's
// passes read only what the same row's earlier passes wrote.
struct StepTeam {
  int thread = 0, size = 1;
  SpinBarrier* barrier = nullptr;
  int64_t row_begin = 0, row_end = -1;
  int64_t scratch_stride = 0;  // split by rows: values of the loop's scratch buffer per thread
  bool split_by_rows() const { return row_end >= 0; }
  void sync() const {
    if (size > 1 && !split_by_rows()) barrier->wait(size);
  }
};

// Below this many flops a step runs on one thread: waking the others (a barrier per step) would cost
// more than they save.
constexpr double kMinParallelStepFlops = 2e5;

// ---- Splitting a time loop by rows
// The rows of a batch are independent sequences. Where the weights a step reads stay in each core's
// own cache, every thread can run the whole loop for its share of the rows with no barrier at all,
// instead of every thread taking some panels of every row with a barrier between passes. Only
// padded batches: in a packed one the threads with the shorter sequences would sit idle.
// Why these cut-offs: docs/design.md (RNN thresholds).
constexpr int64_t kRowSplitMinRows = 8;  // rows per thread, at least

// The size of cpu0's cache number `index` in Linux's sysfs (2: its own level-2 cache; 3: the level-3
// slice its cores share, where sysconf reports a whole socket's), or 0 where it cannot be read.
inline int64_t sysfs_cache_bytes(int index) {
  std::ifstream file("/sys/devices/system/cpu/cpu0/cache/index" + std::to_string(index) + "/size");  // "1024K"
  int64_t value = 0;
  char unit = 0;
  if (!(file >> value) || value <= 0) return 0;
  file >> unit;
  const int shift = unit == 'K' ? 10 : unit == 'M' ? 20 : unit == 'G' ? 30 : 0;
  return value << shift;
}

inline int64_t private_cache_bytes() {
  static const int64_t bytes = sysfs_cache_bytes(2);
  return bytes;
}

// Whether a loop may be split by rows, over how many, and the loop's scratch per thread (passes
// of different widths run at once on different threads of a split loop, so each thread keeps to its
// own part of the buffer): what for_each_step is told.
struct RowSplit {
  int64_t rows = 0;  // 0: not split
  int64_t scratch_stride = 0;
};

// A loop over `sc` whose steps read `weight_bytes` of weights, with `scratch_values` of scratch buffer
// for at::get_num_threads() threads: split by rows when its batch is padded and the weights take at most
// half of a core's own cache (the rest holds the rows' states and gates).
inline RowSplit row_split(const Schedule& sc, int64_t weight_bytes, int64_t scratch_values) {
  const int64_t cache = private_cache_bytes();
  const int64_t budget = cache > 0 ? cache / 2 : int64_t(256) << 10;
  for (const int64_t n : sc.active)
    if (n != sc.batch) return {};
  const int64_t threads = std::max(1, at::get_num_threads());
  return weight_bytes <= budget ? RowSplit{sc.batch, scratch_values / threads} : RowSplit{};
}

// How many threads run a loop whose largest step does step_flops: one below kMinParallelStepFlops or
// inside another parallel region.
inline int loop_threads(double step_flops) {
  at::internal::lazy_init_num_threads();
  return step_flops < kMinParallelStepFlops || at::in_parallel_region() ? 1 : at::get_num_threads();
}

// Whether a loop of `threads` threads is split by rows.
inline bool splits_rows(const RowSplit& split, int threads) {
  return threads > 1 && split.rows >= threads * kRowSplitMinRows;
}

// body(s, team) for s = 0 .. steps - 1, on every thread of one team, with a team.sync() after
// each step (so step s + 1 sees everything step s wrote), or, split by rows, each thread on its rows
// with no barrier. step_flops: the work of the largest step (see loop_threads).
template <typename Body>
void for_each_step(int64_t steps, double step_flops, const Body& body, const RowSplit& split = {}) {
  const int threads = loop_threads(step_flops);
  if (threads <= 1) {
    const StepTeam alone;
    for (int64_t s = 0; s < steps; ++s) body(s, alone);
    return;
  }
  const bool by_rows = splits_rows(split, threads);
  SpinBarrier barrier;
  // No num_threads clause, as at::parallel_for: varying it makes GOMP rebuild its thread pool
  // (pytorch/pytorch#32008). The team is what OpenMP gives; the region's end joins the last step.
#pragma omp parallel
  {
    StepTeam team{omp_get_thread_num(), omp_get_num_threads(), &barrier};
    if (by_rows) {
      const int64_t share = ceil_div(split.rows, team.size);
      team.row_begin = std::min<int64_t>(split.rows, team.thread * share);
      team.row_end = std::min<int64_t>(split.rows, team.row_begin + share);
      team.scratch_stride = split.scratch_stride;
    }
    const at::internal::ThreadIdGuard thread_id(team.thread);
    threads_in_teams().fetch_add(1, std::memory_order_relaxed);
    for (int64_t s = 0; s < steps; ++s) {
      body(s, team);
      if (s + 1 < steps) team.sync();
    }
    threads_in_teams().fetch_sub(1, std::memory_order_relaxed);
  }
}

// This thread's share of one pass of a time step: Tile::run(step, panel, r0, r1, scratch) for a
// contiguous range of the (column panel, row block) items of partition(panels, rows), compiled for
// the current SIMD level. Each thread has its own scratch rows (`width` values per row) in a
// buffer of at::get_num_threads() * (rows + 16) * width. A thread keeps the same panels step
// after step, so its slice of the weight stays in its cache.
template <typename Tile, typename Step, typename T>
void run_tiles(const StepTeam& team, int64_t panels, int64_t rows, const Step* step, T* scratch, int64_t width) {
  if (team.split_by_rows()) {  // this thread's rows, every panel
    const int64_t r0 = team.row_begin, r1 = std::min(rows, team.row_end);
    T* own = scratch + static_cast<int64_t>(team.thread) * team.scratch_stride;
    for (int64_t panel = 0; panel < panels && r0 < r1; ++panel) simd_dispatch<Tile>(step, panel, r0, r1, own);
    return;
  }
  const Partition part = partition(panels, rows, team.size);
  const int64_t items = part.items(), chunk = ceil_div(items, team.size);
  const int64_t begin = std::min(items, team.thread * chunk), end = std::min(items, begin + chunk);
  T* own = scratch + static_cast<int64_t>(team.thread) * part.block * width;
  for (int64_t item = begin; item < end; ++item) {
    const int64_t r0 = (item % part.row_blocks) * part.block, r1 = std::min(rows, r0 + part.block);
    if (r0 < r1) simd_dispatch<Tile>(step, item / part.row_blocks, r0, r1, own);
  }
}

}  // namespace genfast::cpu
