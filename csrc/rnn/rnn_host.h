// What the CPU and CUDA RNN ops share on the host: the time-step schedule (padded or packed), the
// argument checks and the workspace size, each defined once and parameterised by the cell policy
// (csrc/rnn/cells.h). Used by csrc/cpu/rnn.cpp, csrc/cuda/rnn_glue.cpp and, for the workspace
// size the fake kernels compute, csrc/registration.cpp.
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <string>
#include <vector>

#include "rnn/cells.h"

namespace genfast {
namespace rnn {

// Which rows of the (S, features) sequence matrix step t uses: rows
// [offset[t], offset[t] + active[t]). Padded input is the packed case with equal
// batch sizes. PackedSequence sorts sequences by length, so batch sizes never grow
// with t: sequence m is active at step t exactly when m < active[t].
struct Schedule {
  int64_t steps = 0;  // T
  int64_t batch = 0;  // N (rows at the longest step)
  int64_t rows = 0;   // S = sum of batch sizes
  std::vector<int64_t> offset, active;

  // The step the forward pass processes as its s-th (t = s, or T - 1 - s when reversed).
  int64_t forward_step(int64_t s, bool reverse) const { return reverse ? steps - 1 - s : s; }
  // The step processed before `t` in the forward pass (t-1, or t+1 when reversed), or -1.
  int64_t previous(int64_t t, bool reverse) const {
    const int64_t p = reverse ? t + 1 : t - 1;
    return (p >= 0 && p < steps) ? p : -1;
  }
  int64_t active_at(int64_t t) const { return t < 0 ? 0 : active[t]; }

  // Where pass s of the backward (BPTT) loop stands. The loop runs steps in reverse
  // forward order (s < steps), and on the CPU one last pass with no step (s = steps: n = 0)
  // that only adds dG W_hh of the final step to the gradient of the initial state.
  // prev_t: the step of pass s - 1 (whose gate gradients feed this pass), or -1;
  // fwd_prev: the step before this one in the forward pass (its saved state is h_{t-1}), or -1.
  struct BackwardPass {
    int64_t n, offset, prev_t, n_prev, fwd_prev;
  };
  BackwardPass backward_pass(int64_t s, bool reverse) const {
    const bool last = s == steps;
    const int64_t t = last ? -1 : (reverse ? s : steps - 1 - s);
    const int64_t prev_t = s == 0 ? -1 : (reverse ? s - 1 : steps - s);
    return {last ? 0 : active[t], last ? 0 : offset[t], prev_t, active_at(prev_t), last ? -1 : previous(t, reverse)};
  }
};

inline Schedule make_schedule(const at::Tensor& input, const std::optional<at::Tensor>& batch_sizes) {
  Schedule s;
  if (!batch_sizes.has_value()) {
    TORCH_CHECK(input.dim() == 3, "input: expected a 3-D (T, N, features) tensor, got ", input.dim(), "-D");
    s.steps = input.size(0);
    s.batch = input.size(1);
    for (int64_t t = 0; t < s.steps; ++t) {
      s.offset.push_back(t * s.batch);
      s.active.push_back(s.batch);
    }
    s.rows = s.steps * s.batch;
    return s;
  }
  const at::Tensor& bs = *batch_sizes;
  TORCH_CHECK(input.dim() == 2, "input: packed input must be 2-D (sum(batch_sizes), features), got ", input.dim(),
              "-D");
  TORCH_CHECK(bs.dim() == 1 && bs.scalar_type() == at::kLong && bs.device().is_cpu(),
              "batch_sizes: expected a 1-D int64 CPU tensor, got ", bs.scalar_type(), " of shape ", bs.sizes(), " on ",
              bs.device());
  auto sizes = bs.contiguous();
  const int64_t* b = sizes.data_ptr<int64_t>();
  s.steps = sizes.numel();
  int64_t total = 0;
  for (int64_t t = 0; t < s.steps; ++t) {
    TORCH_CHECK(b[t] > 0, "batch_sizes: entries must be positive, got ", b[t], " at step ", t);
    TORCH_CHECK(t == 0 || b[t] <= b[t - 1], "batch_sizes: must be non-increasing (sorted PackedSequence), got ", b[t],
                " after ", t ? b[t - 1] : 0, " at step ", t);
    s.offset.push_back(total);
    s.active.push_back(b[t]);
    total += b[t];
  }
  s.batch = s.steps ? b[0] : 0;
  s.rows = total;
  TORCH_CHECK(total == input.size(0), "input: has ", input.size(0), " rows but batch_sizes sum to ", total);
  return s;
}

// The device and dtypes a backend's kernels take.
struct Backend {
  at::DeviceType device;
  const char* name;     // "CPU", "CUDA"
  bool reduced_types;   // float16 and bfloat16 too
};
inline constexpr Backend kCpu{at::kCPU, "CPU", false};
inline constexpr Backend kCuda{at::kCUDA, "CUDA", true};

// The tensors of one layer and direction, as the ops take them. cx only for cells with a cell
// state, w_hr only for cells with a projection.
struct LayerArgs {
  const at::Tensor& input;
  const at::Tensor& hx;
  const at::Tensor* cx;
  const at::Tensor& w_ih;
  const at::Tensor& w_hh;
  const std::optional<at::Tensor>& b_ih;
  const std::optional<at::Tensor>& b_hh;
  const std::optional<at::Tensor>& w_hr;
  const std::optional<at::Tensor>& batch_sizes;
};

struct Dims {
  int64_t I, H, Hout;
};

inline void check_same(const at::Tensor& t, const char* name, const at::Tensor& ref) {
  TORCH_CHECK(t.defined(), name, ": required");
  TORCH_CHECK(t.scalar_type() == ref.scalar_type(), name, ": dtype ", t.scalar_type(), " does not match input dtype ",
              ref.scalar_type());
  TORCH_CHECK(t.device() == ref.device(), name, ": on ", t.device(), " but input is on ", ref.device());
}

inline void check_shape(const at::Tensor& t, const char* name, at::IntArrayRef expected) {
  TORCH_CHECK(t.sizes() == expected, name, ": expected shape ", expected, ", got ", t.sizes());
}

inline void check_input(const Backend& backend, const at::Tensor& input) {
  const auto dtype = input.scalar_type();
  const bool supported = dtype == at::kFloat || dtype == at::kDouble ||
                         (backend.reduced_types && (dtype == at::kHalf || dtype == at::kBFloat16));
  TORCH_CHECK(supported, "input: genfast's ", backend.name, " RNN kernels support ",
              backend.reduced_types ? "float32, float64, float16 and bfloat16" : "float32 and float64", ", got ", dtype);
  TORCH_CHECK(input.device().type() == backend.device, "input: expected a ", backend.name, " tensor, got ",
              input.device());
}

// The checks of every RNN op's layer arguments: dtype, device and shape of each, errors naming it.
template <typename Cell>
Dims check_layer(const Backend& backend, const LayerArgs& a, const Schedule& sc) {
  constexpr int64_t G = Cell::kGates;
  check_input(backend, a.input);
  TORCH_CHECK(a.w_ih.dim() == 2 && a.w_ih.size(0) % G == 0 && a.w_ih.size(0) > 0, "w_ih: expected a (", G,
              "*hidden_size, input_size) matrix, got ", a.w_ih.sizes());
  Dims d{a.input.size(-1), a.w_ih.size(0) / G, 0};
  TORCH_CHECK(a.w_ih.size(1) == d.I, "input: has ", d.I, " features but w_ih expects input_size ", a.w_ih.size(1));
  TORCH_CHECK(a.w_hh.dim() == 2 && a.w_hh.size(0) == G * d.H, "w_hh: expected ", G * d.H, " rows, got ",
              a.w_hh.sizes());
  d.Hout = a.w_hh.size(1);
  const bool project = Cell::kProjection && a.w_hr.has_value();
  if (project) {
    check_same(*a.w_hr, "w_hr", a.input);
    check_shape(*a.w_hr, "w_hr", {d.Hout, d.H});
  } else {
    check_shape(a.w_hh, "w_hh", {G * d.H, d.H});
  }
  check_same(a.w_ih, "w_ih", a.input);
  check_same(a.w_hh, "w_hh", a.input);
  check_same(a.hx, "hx", a.input);
  check_shape(a.hx, "hx", {sc.batch, d.Hout});
  if (Cell::kCellState) {
    check_same(*a.cx, "cx", a.input);
    check_shape(*a.cx, "cx", {sc.batch, d.H});
  }
  TORCH_CHECK(a.b_ih.has_value() == a.b_hh.has_value(), "b_ih, b_hh: give both biases or neither");
  if (a.b_ih.has_value()) {
    check_same(*a.b_ih, "b_ih", a.input);
    check_same(*a.b_hh, "b_hh", a.input);
    check_shape(*a.b_ih, "b_ih", {G * d.H});
    check_shape(*a.b_hh, "b_hh", {G * d.H});
  }
  return d;
}

template <typename Cell>
Dims check_forward(const Backend& backend, const LayerArgs& a, const Schedule& sc) {
  const Dims d = check_layer<Cell>(backend, a, sc);
  TORCH_CHECK(sc.steps > 0, "input: sequence length must be at least 1");
  TORCH_CHECK(sc.batch > 0, "input: batch size must be at least 1");
  return d;
}

// The shape of the output (and of its gradient): input's, with Hout features.
inline std::vector<int64_t> output_shape(const at::Tensor& input, int64_t features) {
  std::vector<int64_t> shape(input.sizes().begin(), input.sizes().end());
  shape.back() = features;
  return shape;
}

// The backward's own arguments. grad_cy only for cells with a cell state.
struct BackwardArgs {
  const at::Tensor& grad_output;
  const at::Tensor& grad_hy;
  const at::Tensor* grad_cy;
  const at::Tensor& output;
  const at::Tensor& workspace;
  int64_t extra_workspace_values = 0;  // H-wide values per row beyond the cell's layout (regularisers)
  bool input_grad = true;              // false: grad_input is not computed (returned empty)
};

// grad_input when the caller asked for none.
inline at::Tensor skipped_input_grad(const at::Tensor& input) { return at::empty({0}, input.options()); }

template <typename Cell>
Dims check_backward(const Backend& backend, const LayerArgs& a, const BackwardArgs& b, const Schedule& sc) {
  const Dims d = check_layer<Cell>(backend, a, sc);
  const std::vector<int64_t> out_shape = output_shape(a.input, d.Hout);
  check_same(b.output, "output", a.input);
  check_shape(b.output, "output", out_shape);
  check_same(b.grad_output, "grad_output", a.input);
  check_shape(b.grad_output, "grad_output", out_shape);
  check_same(b.grad_hy, "grad_hy", a.input);
  check_shape(b.grad_hy, "grad_hy", {sc.batch, d.Hout});
  if (Cell::kCellState) {
    check_same(*b.grad_cy, "grad_cy", a.input);
    check_shape(*b.grad_cy, "grad_cy", {sc.batch, d.H});
  }
  check_same(b.workspace, "workspace", a.input);
  const int64_t expected = workspace_layout<Cell>(sc.rows, d.H, Cell::kProjection && a.w_hr.has_value()).size +
                           b.extra_workspace_values * sc.rows * d.H;
  TORCH_CHECK(b.workspace.dim() == 1 && b.workspace.numel() == expected, "workspace: has ", b.workspace.numel(),
              " elements, not ", expected, "; it must come from ", Cell::kName,
              "_forward(..., train=True) on the same inputs");
  return d;
}

// H-wide values the training workspace holds per row for the cell named `cell` ("lstm", "gru"):
// its size is rows * hidden * this (the fake kernels in genfast/ops/rnn.py ask here).
inline int64_t workspace_values_per_row(const std::string& cell, bool projected) {
  if (cell == LstmCell::kName) return WorkspaceLayout::per_row(LstmCell::kSaved, LstmCell::kCellState, projected);
  if (cell == GruCell::kName) {
    TORCH_CHECK(!projected, "gru: has no projection");
    return WorkspaceLayout::per_row(GruCell::kSaved, GruCell::kCellState, false);
  }
  if (cell == GruResetBeforeCell::kName) {
    TORCH_CHECK(!projected, "gru_reset_before: has no projection");
    return WorkspaceLayout::per_row(GruResetBeforeCell::kSaved, GruResetBeforeCell::kCellState, false);
  }
  TORCH_CHECK(false, "cell: unknown RNN cell '", cell, "' (lstm, gru)");
}

}  // namespace rnn
}  // namespace genfast
