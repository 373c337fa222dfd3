// CUDA implementations of genfast::{lstm,gru}_{forward,backward}: argument checks,
// buffers, and the time loop. Matrix products go through ATen (cuBLAS) on the current
// stream into buffers allocated before the loop; the fused element-wise work of each
// step is one launch of the torch-free kernels in lstm.cu / gru.cu.
//
// Per step (processing order t = 0..T-1, or T-1..0 when `reverse`), with n_t active rows:
//   forward:  gates_h[:n_t] = h[:n_t] @ W_hh^T             (cuBLAS)
//             fused step kernel: bias, gates, state update   (lstm.cu / gru.cu)
//             [LSTM projection] out_t = hcell @ W_hr^T; h[:n_t] = out_t
//   backward: fused step kernel: gate gradients, dc carried, h_{t-1} gathered
//             dh[:n_t] (=|+=) d_gates_h @ W_hh                (cuBLAS)
//   after the loop, one product each for grad_input, grad_w_ih, grad_w_hh (, grad_w_hr).
//
// Workspace (private to this backend; 1-D, input dtype, S = rows of the packed or
// flattened (T*N) input):
//   LSTM: [activated gates i,f,g,o: S x 4H][c_t: S x H][o*tanh(c_t) when w_hr: S x H]
//   GRU:  [r, z, n, h_n = W_hn h + b_hn: S x 4H]
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <optional>
#include <tuple>
#include <vector>

#include "rnn_kernels.h"

namespace genfast {
namespace cuda {
namespace {

using at::Tensor;

// ATen's 16-bit scalar types are layout-compatible with CUDA's.
template <typename S>
struct KernelType {
  using type = S;
};
template <>
struct KernelType<at::Half> {
  using type = __half;
};
template <>
struct KernelType<at::BFloat16> {
  using type = __nv_bfloat16;
};

template <typename K>
K* data(const Tensor& t) {
  return reinterpret_cast<K*>(t.data_ptr());
}

template <typename K>
const K* optional_data(const std::optional<Tensor>& t) {
  return t.has_value() && t->defined() ? reinterpret_cast<const K*>(t->data_ptr()) : nullptr;
}

at::ScalarType acc_dtype(at::ScalarType dtype) {
  return dtype == at::kDouble ? at::kDouble : at::kFloat;
}

// ---- argument checks -------------------------------------------------------------

void check_like_input(const Tensor& t, const Tensor& input, const char* op, const char* name) {
  TORCH_CHECK(t.defined(), op, ": ", name, " is required");
  TORCH_CHECK(t.is_cuda(), op, ": ", name, " must be a CUDA tensor, got one on ", t.device());
  TORCH_CHECK(t.device() == input.device(), op, ": ", name, " must be on ", input.device(),
              " like input, got ", t.device());
  TORCH_CHECK(t.scalar_type() == input.scalar_type(), op, ": ", name, " must have dtype ",
              input.scalar_type(), " like input, got ", t.scalar_type());
}

void check_shape(const Tensor& t, at::IntArrayRef expected, const char* op, const char* name) {
  TORCH_CHECK(t.sizes() == expected, op, ": ", name, " must have shape ", expected, ", got ",
              t.sizes());
}

// Sizes of one layer/direction, and where each time step's rows live in the
// (S, features) view of input and output.
struct Layout {
  int64_t steps = 0;       // T
  int64_t batch = 0;       // N
  int64_t input_size = 0;  // I
  int64_t hidden = 0;      // H
  int64_t hidden_out = 0;  // H_out (proj_size, or H)
  int64_t total_rows = 0;  // S
  bool packed = false;
  std::vector<int64_t> rows;    // active rows at time t
  std::vector<int64_t> offset;  // first row of time t in the (S, .) view

  // Time index of the p-th step in processing order.
  int64_t time_at(int64_t p, bool reverse) const { return reverse ? steps - 1 - p : p; }
};

Layout check_layout(const char* op, int64_t gate_count, const Tensor& input, const Tensor& hx,
                    const Tensor& w_ih, const Tensor& w_hh, const std::optional<Tensor>& w_hr,
                    const std::optional<Tensor>& batch_sizes) {
  TORCH_CHECK(input.defined(), op, ": input is required");
  TORCH_CHECK(input.is_cuda(), op, ": input must be a CUDA tensor, got one on ", input.device());
  const auto dtype = input.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kDouble || dtype == at::kHalf ||
                  dtype == at::kBFloat16,
              op, ": input must be float32, float64, float16 or bfloat16, got ", dtype);
  check_like_input(hx, input, op, "hx");
  check_like_input(w_ih, input, op, "w_ih");
  check_like_input(w_hh, input, op, "w_hh");

  Layout layout;
  layout.packed = batch_sizes.has_value() && batch_sizes->defined();
  if (layout.packed) {
    const Tensor& sizes = *batch_sizes;
    TORCH_CHECK(sizes.device().is_cpu() && sizes.scalar_type() == at::kLong && sizes.dim() == 1,
                op, ": batch_sizes must be a 1-D int64 CPU tensor, got ", sizes.scalar_type(),
                " of shape ", sizes.sizes(), " on ", sizes.device());
    TORCH_CHECK(input.dim() == 2, op, ": packed input (with batch_sizes) must be (S, I), got ",
                input.sizes());
    layout.steps = sizes.size(0);
    layout.total_rows = input.size(0);
    layout.batch = hx.dim() == 2 ? hx.size(0) : -1;
    const Tensor sizes_c = sizes.contiguous();
    const int64_t* values = sizes_c.data_ptr<int64_t>();
    int64_t offset = 0;
    for (int64_t t = 0; t < layout.steps; ++t) {
      TORCH_CHECK(values[t] > 0, op, ": batch_sizes[", t, "] must be positive, got ", values[t]);
      TORCH_CHECK(t == 0 || values[t] <= values[t - 1], op,
                  ": batch_sizes must be non-increasing, got batch_sizes[", t, "] = ", values[t],
                  " after ", values[t - 1]);
      layout.rows.push_back(values[t]);
      layout.offset.push_back(offset);
      offset += values[t];
    }
    TORCH_CHECK(offset == layout.total_rows, op, ": batch_sizes sum to ", offset,
                " but input has ", layout.total_rows, " rows");
    TORCH_CHECK(layout.steps == 0 || values[0] == layout.batch, op, ": batch_sizes[0] (",
                layout.steps ? values[0] : 0, ") must equal the batch size of hx (", layout.batch,
                ")");
  } else {
    TORCH_CHECK(input.dim() == 3, op, ": input must be (T, N, I), or (S, I) with batch_sizes, got ",
                input.sizes());
    layout.steps = input.size(0);
    layout.batch = input.size(1);
    layout.total_rows = layout.steps * layout.batch;
    for (int64_t t = 0; t < layout.steps; ++t) {
      layout.rows.push_back(layout.batch);
      layout.offset.push_back(t * layout.batch);
    }
  }
  layout.input_size = input.size(-1);

  TORCH_CHECK(w_ih.dim() == 2 && w_ih.size(0) % gate_count == 0 && w_ih.size(0) > 0, op,
              ": w_ih must be (", gate_count, "*hidden_size, input_size), got ", w_ih.sizes());
  layout.hidden = w_ih.size(0) / gate_count;
  TORCH_CHECK(w_ih.size(1) == layout.input_size, op, ": w_ih must have input_size = ",
              layout.input_size, " columns (the last dim of input), got ", w_ih.sizes());
  TORCH_CHECK(w_hh.dim() == 2 && w_hh.size(0) == gate_count * layout.hidden, op,
              ": w_hh must have ", gate_count * layout.hidden, " rows like w_ih, got ",
              w_hh.sizes());
  layout.hidden_out = w_hh.size(1);
  if (w_hr.has_value() && w_hr->defined()) {
    check_like_input(*w_hr, input, op, "w_hr");
    check_shape(*w_hr, {layout.hidden_out, layout.hidden}, op, "w_hr");
  } else {
    TORCH_CHECK(layout.hidden_out == layout.hidden, op, ": w_hh must be (",
                gate_count * layout.hidden, ", ", layout.hidden,
                ") without a projection (w_hr), got ", w_hh.sizes());
  }
  check_shape(hx, {layout.batch, layout.hidden_out}, op, "hx");
  return layout;
}

void check_bias(const std::optional<Tensor>& bias, const Tensor& input, int64_t size,
                const char* op, const char* name) {
  if (!bias.has_value() || !bias->defined()) return;
  check_like_input(*bias, input, op, name);
  check_shape(*bias, {size}, op, name);
}

int64_t lstm_workspace_size(const Layout& layout, bool projected) {
  return layout.total_rows * layout.hidden * (projected ? 6 : 5);
}

int64_t gru_workspace_size(const Layout& layout) {
  return layout.total_rows * layout.hidden * 4;
}

std::vector<int64_t> output_shape(const Layout& layout, int64_t features) {
  if (layout.packed) return {layout.total_rows, features};
  return {layout.steps, layout.batch, features};
}

// ---- LSTM ------------------------------------------------------------------------

std::tuple<Tensor, Tensor, Tensor, Tensor> lstm_forward_cuda(
    const Tensor& input, const Tensor& hx, const Tensor& cx, const Tensor& w_ih,
    const Tensor& w_hh, const std::optional<Tensor>& b_ih, const std::optional<Tensor>& b_hh,
    const std::optional<Tensor>& w_hr, const std::optional<Tensor>& batch_sizes, bool reverse,
    bool train) {
  const char* op = "genfast::lstm_forward (CUDA)";
  const Layout L = check_layout(op, 4, input, hx, w_ih, w_hh, w_hr, batch_sizes);
  check_like_input(cx, input, op, "cx");
  check_shape(cx, {L.batch, L.hidden}, op, "cx");
  check_bias(b_ih, input, 4 * L.hidden, op, "b_ih");
  check_bias(b_hh, input, 4 * L.hidden, op, "b_hh");
  const bool projected = w_hr.has_value() && w_hr->defined();
  const int64_t S = L.total_rows, H = L.hidden, H_out = L.hidden_out, N = L.batch;

  const c10::cuda::CUDAGuard guard(input.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
  const auto options = input.options();

  // Everything the loop touches is allocated here, once.
  const Tensor x2d = input.contiguous().view({S, L.input_size});
  const Tensor w_hh_t = w_hh.contiguous().t();
  const Tensor w_hr_t = projected ? w_hr->contiguous().t() : Tensor();
  const Tensor b_ih_c = b_ih.has_value() && b_ih->defined() ? b_ih->contiguous() : Tensor();
  const Tensor b_hh_c = b_hh.has_value() && b_hh->defined() ? b_hh->contiguous() : Tensor();
  const Tensor gates_x = at::mm(x2d, w_ih.t());  // (S, 4H), all steps at once
  const Tensor gates_h = at::empty({N, 4 * H}, options);
  Tensor output = at::empty(output_shape(L, H_out), options);
  const Tensor out2d = output.view({S, H_out});
  Tensor h_state = hx.clone(at::MemoryFormat::Contiguous);
  Tensor c_state = at::empty({N, H}, options.dtype(acc_dtype(input.scalar_type())));
  c_state.copy_(cx);
  Tensor workspace = at::empty({train ? lstm_workspace_size(L, projected) : 0}, options);
  // o * tanh(c) before projection: kept per step when training, else one scratch buffer.
  Tensor h_cell;
  if (projected) {
    h_cell = train ? workspace.narrow(0, S * 5 * H, S * H).view({S, H}) : at::empty({N, H}, options);
  }

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "lstm_forward_cuda", [&] {
    using K = typename KernelType<scalar_t>::type;
    K* ws = train ? data<K>(workspace) : nullptr;
    for (int64_t p = 0; p < L.steps; ++p) {
      const int64_t t = L.time_at(p, reverse);
      const int64_t rows = L.rows[t], off = L.offset[t];
      Tensor gh_rows = gates_h.narrow(0, 0, rows);
      at::mm_out(gh_rows, h_state.narrow(0, 0, rows), w_hh_t);

      LstmForwardStep<K> step;
      step.rows = rows;
      step.hidden = H;
      step.gates_x = data<K>(gates_x) + off * 4 * H;
      step.ld_gates_x = 4 * H;
      step.gates_h = data<K>(gates_h);
      step.b_ih = b_ih_c.defined() ? data<K>(b_ih_c) : nullptr;
      step.b_hh = b_hh_c.defined() ? data<K>(b_hh_c) : nullptr;
      step.c_state = data<AccT<K>>(c_state);
      const int64_t cell_row = train ? off : 0;
      if (projected) {
        step.h_dst = data<K>(h_cell) + cell_row * H;
        step.ld_h_dst = H;
      } else {
        step.h_dst = data<K>(out2d) + off * H;
        step.ld_h_dst = H;
        step.h_dst2 = data<K>(h_state);
        step.ld_h_dst2 = H;
      }
      if (train) {
        step.saved_gates = ws + off * 4 * H;
        step.saved_c = ws + S * 4 * H + off * H;
      }
      C10_CUDA_CHECK(lstm_forward_step<K>(step, stream));

      if (projected) {
        Tensor out_rows = out2d.narrow(0, off, rows);
        at::mm_out(out_rows, h_cell.narrow(0, cell_row, rows), w_hr_t);
        h_state.narrow(0, 0, rows).copy_(out_rows);
      }
    }
  });
  Tensor cy = c_state.to(input.scalar_type());
  return {output, h_state, cy, workspace};
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> lstm_backward_cuda(
    const Tensor& grad_output, const Tensor& grad_hy, const Tensor& grad_cy, const Tensor& input,
    const Tensor& hx, const Tensor& cx, const Tensor& w_ih, const Tensor& w_hh,
    const std::optional<Tensor>& w_hr, const Tensor& output, const Tensor& workspace,
    const std::optional<Tensor>& batch_sizes, bool reverse) {
  const char* op = "genfast::lstm_backward (CUDA)";
  const Layout L = check_layout(op, 4, input, hx, w_ih, w_hh, w_hr, batch_sizes);
  const bool projected = w_hr.has_value() && w_hr->defined();
  const int64_t S = L.total_rows, H = L.hidden, H_out = L.hidden_out, N = L.batch;
  const std::vector<int64_t> out_shape = output_shape(L, H_out);
  check_like_input(cx, input, op, "cx");
  check_shape(cx, {N, H}, op, "cx");
  check_like_input(output, input, op, "output");
  check_shape(output, out_shape, op, "output");
  check_like_input(grad_output, input, op, "grad_output");
  check_shape(grad_output, out_shape, op, "grad_output");
  check_like_input(grad_hy, input, op, "grad_hy");
  check_shape(grad_hy, {N, H_out}, op, "grad_hy");
  check_like_input(grad_cy, input, op, "grad_cy");
  check_shape(grad_cy, {N, H}, op, "grad_cy");
  check_like_input(workspace, input, op, "workspace");
  TORCH_CHECK(workspace.dim() == 1 && workspace.numel() == lstm_workspace_size(L, projected), op,
              ": workspace must be the one lstm_forward returned on CUDA with train=True for "
              "these inputs (", lstm_workspace_size(L, projected), " elements), got shape ",
              workspace.sizes());

  const c10::cuda::CUDAGuard guard(input.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
  const auto options = input.options();

  const Tensor x2d = input.contiguous().view({S, L.input_size});
  const Tensor go2d = grad_output.contiguous().view({S, H_out});
  const Tensor out2d = output.contiguous().view({S, H_out});
  const Tensor hx_c = hx.contiguous();
  const Tensor cx_c = cx.contiguous();
  const Tensor ws = workspace.contiguous();
  const Tensor w_hh_c = w_hh.contiguous();
  const Tensor w_hr_c = projected ? w_hr->contiguous() : Tensor();
  Tensor dh_state = grad_hy.clone(at::MemoryFormat::Contiguous);
  Tensor dc_state = at::empty({N, H}, options.dtype(acc_dtype(input.scalar_type())));
  dc_state.copy_(grad_cy);
  const Tensor d_gates = at::empty({S, 4 * H}, options);
  const Tensor h_prev = at::empty({S, H_out}, options);
  // With a projection: dL/dh_out per row (for grad_w_hr) and dL/d(o*tanh c) per step.
  const Tensor dh_total = projected ? at::empty({S, H_out}, options) : Tensor();
  const Tensor d_h_cell = projected ? at::empty({N, H}, options) : Tensor();

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "lstm_backward_cuda", [&] {
    using K = typename KernelType<scalar_t>::type;
    const K* saved_gates = data<K>(ws);
    const K* saved_c = data<K>(ws) + S * 4 * H;
    for (int64_t p = L.steps - 1; p >= 0; --p) {
      const int64_t t = L.time_at(p, reverse);
      const int64_t rows = L.rows[t], off = L.offset[t];
      const int64_t prev_t = p > 0 ? L.time_at(p - 1, reverse) : -1;
      const int64_t prev_rows = p > 0 ? L.rows[prev_t] : 0;
      const int64_t prev_off = p > 0 ? L.offset[prev_t] : 0;

      LstmBackwardStep<K> step;
      step.rows = rows;
      step.hidden = H;
      step.hidden_out = H_out;
      if (projected) {
        Tensor total = dh_total.narrow(0, off, rows);
        at::add_out(total, go2d.narrow(0, off, rows), dh_state.narrow(0, 0, rows));
        Tensor d_cell_rows = d_h_cell.narrow(0, 0, rows);
        at::mm_out(d_cell_rows, total, w_hr_c);
        step.d_h = data<K>(d_h_cell);
        step.ld_d_h = H;
      } else {
        step.d_h = data<K>(go2d) + off * H;
        step.ld_d_h = H;
        step.d_h_extra = data<K>(dh_state);
        step.ld_d_h_extra = H;
      }
      step.d_c_state = data<AccT<K>>(dc_state);
      step.saved_gates = saved_gates + off * 4 * H;
      step.saved_c = saved_c + off * H;
      step.saved_c_prev = saved_c + prev_off * H;
      step.prev_rows = prev_rows;
      step.cx = data<K>(cx_c);
      step.output_prev = data<K>(out2d) + prev_off * H_out;
      step.hx = data<K>(hx_c);
      step.h_prev_dst = data<K>(h_prev) + off * H_out;
      step.d_gates = data<K>(d_gates) + off * 4 * H;
      C10_CUDA_CHECK(lstm_backward_step<K>(step, stream));

      Tensor dh_rows = dh_state.narrow(0, 0, rows);
      at::mm_out(dh_rows, d_gates.narrow(0, off, rows), w_hh_c);
    }
  });

  Tensor grad_input = at::mm(d_gates, w_ih).view(input.sizes());
  Tensor grad_w_ih = at::mm(d_gates.t(), x2d);
  Tensor grad_w_hh = at::mm(d_gates.t(), h_prev);
  Tensor grad_bias = d_gates.sum(0);
  Tensor grad_w_hr = projected
                         ? at::mm(dh_total.t(), ws.narrow(0, S * 5 * H, S * H).view({S, H}))
                         : at::empty({0}, options);
  Tensor grad_cx = dc_state.to(input.scalar_type());
  return {grad_input, dh_state, grad_cx, grad_w_ih, grad_w_hh, grad_bias, grad_w_hr};
}

// ---- GRU -------------------------------------------------------------------------

std::tuple<Tensor, Tensor, Tensor> gru_forward_cuda(
    const Tensor& input, const Tensor& hx, const Tensor& w_ih, const Tensor& w_hh,
    const std::optional<Tensor>& b_ih, const std::optional<Tensor>& b_hh,
    const std::optional<Tensor>& batch_sizes, bool reverse, bool train) {
  const char* op = "genfast::gru_forward (CUDA)";
  const Layout L = check_layout(op, 3, input, hx, w_ih, w_hh, std::nullopt, batch_sizes);
  check_bias(b_ih, input, 3 * L.hidden, op, "b_ih");
  check_bias(b_hh, input, 3 * L.hidden, op, "b_hh");
  const int64_t S = L.total_rows, H = L.hidden, N = L.batch;

  const c10::cuda::CUDAGuard guard(input.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
  const auto options = input.options();

  const Tensor x2d = input.contiguous().view({S, L.input_size});
  const Tensor w_hh_t = w_hh.contiguous().t();
  const Tensor b_ih_c = b_ih.has_value() && b_ih->defined() ? b_ih->contiguous() : Tensor();
  const Tensor b_hh_c = b_hh.has_value() && b_hh->defined() ? b_hh->contiguous() : Tensor();
  const Tensor gates_x = at::mm(x2d, w_ih.t());  // (S, 3H)
  const Tensor gates_h = at::empty({N, 3 * H}, options);
  Tensor output = at::empty(output_shape(L, H), options);
  const Tensor out2d = output.view({S, H});
  Tensor h_state = hx.clone(at::MemoryFormat::Contiguous);
  Tensor workspace = at::empty({train ? gru_workspace_size(L) : 0}, options);

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "gru_forward_cuda", [&] {
    using K = typename KernelType<scalar_t>::type;
    for (int64_t p = 0; p < L.steps; ++p) {
      const int64_t t = L.time_at(p, reverse);
      const int64_t rows = L.rows[t], off = L.offset[t];
      Tensor gh_rows = gates_h.narrow(0, 0, rows);
      at::mm_out(gh_rows, h_state.narrow(0, 0, rows), w_hh_t);

      GruForwardStep<K> step;
      step.rows = rows;
      step.hidden = H;
      step.gates_x = data<K>(gates_x) + off * 3 * H;
      step.ld_gates_x = 3 * H;
      step.gates_h = data<K>(gates_h);
      step.b_ih = b_ih_c.defined() ? data<K>(b_ih_c) : nullptr;
      step.b_hh = b_hh_c.defined() ? data<K>(b_hh_c) : nullptr;
      step.h_state = data<K>(h_state);
      step.output = data<K>(out2d) + off * H;
      step.ld_output = H;
      step.saved = train ? data<K>(workspace) + off * 4 * H : nullptr;
      C10_CUDA_CHECK(gru_forward_step<K>(step, stream));
    }
  });
  return {output, h_state, workspace};
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> gru_backward_cuda(
    const Tensor& grad_output, const Tensor& grad_hy, const Tensor& input, const Tensor& hx,
    const Tensor& w_ih, const Tensor& w_hh, const Tensor& output, const Tensor& workspace,
    const std::optional<Tensor>& batch_sizes, bool reverse) {
  const char* op = "genfast::gru_backward (CUDA)";
  const Layout L = check_layout(op, 3, input, hx, w_ih, w_hh, std::nullopt, batch_sizes);
  const int64_t S = L.total_rows, H = L.hidden, N = L.batch;
  const std::vector<int64_t> out_shape = output_shape(L, H);
  check_like_input(output, input, op, "output");
  check_shape(output, out_shape, op, "output");
  check_like_input(grad_output, input, op, "grad_output");
  check_shape(grad_output, out_shape, op, "grad_output");
  check_like_input(grad_hy, input, op, "grad_hy");
  check_shape(grad_hy, {N, H}, op, "grad_hy");
  check_like_input(workspace, input, op, "workspace");
  TORCH_CHECK(workspace.dim() == 1 && workspace.numel() == gru_workspace_size(L), op,
              ": workspace must be the one gru_forward returned on CUDA with train=True for "
              "these inputs (", gru_workspace_size(L), " elements), got shape ",
              workspace.sizes());

  const c10::cuda::CUDAGuard guard(input.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
  const auto options = input.options();

  const Tensor x2d = input.contiguous().view({S, L.input_size});
  const Tensor go2d = grad_output.contiguous().view({S, H});
  const Tensor out2d = output.contiguous().view({S, H});
  const Tensor hx_c = hx.contiguous();
  const Tensor ws = workspace.contiguous();
  const Tensor w_hh_c = w_hh.contiguous();
  Tensor dh_state = grad_hy.clone(at::MemoryFormat::Contiguous);
  const Tensor d_gates_x = at::empty({S, 3 * H}, options);
  const Tensor d_gates_h = at::empty({S, 3 * H}, options);
  const Tensor h_prev = at::empty({S, H}, options);

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "gru_backward_cuda", [&] {
    using K = typename KernelType<scalar_t>::type;
    for (int64_t p = L.steps - 1; p >= 0; --p) {
      const int64_t t = L.time_at(p, reverse);
      const int64_t rows = L.rows[t], off = L.offset[t];
      const int64_t prev_t = p > 0 ? L.time_at(p - 1, reverse) : -1;
      const int64_t prev_rows = p > 0 ? L.rows[prev_t] : 0;
      const int64_t prev_off = p > 0 ? L.offset[prev_t] : 0;

      GruBackwardStep<K> step;
      step.rows = rows;
      step.hidden = H;
      step.grad_output = data<K>(go2d) + off * H;
      step.ld_grad_output = H;
      step.d_h_state = data<K>(dh_state);
      step.saved = data<K>(ws) + off * 4 * H;
      step.output_prev = data<K>(out2d) + prev_off * H;
      step.prev_rows = prev_rows;
      step.hx = data<K>(hx_c);
      step.h_prev_dst = data<K>(h_prev) + off * H;
      step.d_gates_x = data<K>(d_gates_x) + off * 3 * H;
      step.d_gates_h = data<K>(d_gates_h) + off * 3 * H;
      C10_CUDA_CHECK(gru_backward_step<K>(step, stream));

      // dL/dh_{t-1} = z * dh (written by the kernel) + d_gates_h @ W_hh.
      dh_state.narrow(0, 0, rows).addmm_(d_gates_h.narrow(0, off, rows), w_hh_c);
    }
  });

  Tensor grad_input = at::mm(d_gates_x, w_ih).view(input.sizes());
  Tensor grad_w_ih = at::mm(d_gates_x.t(), x2d);
  Tensor grad_w_hh = at::mm(d_gates_h.t(), h_prev);
  Tensor grad_b_ih = d_gates_x.sum(0);
  Tensor grad_b_hh = d_gates_h.sum(0);
  return {grad_input, dh_state, grad_w_ih, grad_w_hh, grad_b_ih, grad_b_hh};
}

}  // namespace
}  // namespace cuda
}  // namespace genfast

TORCH_LIBRARY_IMPL(genfast, CUDA, m) {
  m.impl("lstm_forward", &genfast::cuda::lstm_forward_cuda);
  m.impl("lstm_backward", &genfast::cuda::lstm_backward_cuda);
  m.impl("gru_forward", &genfast::cuda::gru_forward_cuda);
  m.impl("gru_backward", &genfast::cuda::gru_backward_cuda);
}
