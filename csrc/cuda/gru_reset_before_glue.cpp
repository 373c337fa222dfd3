// CUDA implementation of genfast::gru_reset_before_{forward,backward} (rnn::GruResetBeforeCell): the
// time loop over the step kernels of csrc/cuda/gru_reset_before.cu, with the schedule, checks and
// workspace layout the CPU uses (csrc/rnn/rnn_host.h). Products through ATen (cuBLAS) on the current
// stream into buffers allocated before the loop, as csrc/cuda/rnn_glue.cpp does for the other cells.
//
// Per step (processing order t = 0..T-1, or T-1..0 when `reverse`), with n_t active rows:
//   forward:  gates_h = h[:n_t] @ W_h{r,z}^T;  forward_reset (r, z, r*h)
//             gates_n = (r*h) @ W_hn^T;        forward_update (n, h_t)
//   backward: backward_update (dG_z, dG_n, dh <- z dL/dh_t);  d_rh = dG_n @ W_hn;
//             backward_reset (dG_r, dh += r d_rh);  dh[:n_t] += dG_{r,z} @ W_h{r,z}
//   after the loop: grad_input, grad_w_ih, and grad_w_hh from h_{t-1} (r, z rows) and the saved r*h (n rows).
// Regularisers (optional masks, checked as the other cells'): under recurrent dropout the r, z product
// reads h * m (a second state buffer the update kernel writes) and dh gains (dG_{r,z} W_h{r,z}) * m; the
// kernels do the rest (gru_reset_before_kernels.h).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <optional>
#include <tuple>

#include "glue_types.h"
#include "gru_reset_before_kernels.h"
#include "rnn/regularizers_host.h"
#include "rnn/rnn_host.h"

namespace genfast {
namespace cuda {
namespace {

using at::Tensor;
using Cell = rnn::GruResetBeforeCell;

const std::optional<Tensor> kNone;

std::tuple<Tensor, Tensor, Tensor> gru_reset_before_forward_cuda(const Tensor& input, const Tensor& hx,
                                                                 const Tensor& w_ih, const Tensor& w_hh,
                                                                 const std::optional<Tensor>& b_ih,
                                                                 const std::optional<Tensor>& b_hh,
                                                                 const std::optional<Tensor>& batch_sizes,
                                                                 bool reverse, bool train,
                                                                 const std::optional<Tensor>& zoneout_arg,
                                                                 const std::optional<Tensor>& recurrent_mask_arg) {
  const rnn::LayerArgs a{input, hx, nullptr, w_ih, w_hh, b_ih, b_hh, kNone, batch_sizes};
  const rnn::Schedule sc = rnn::make_schedule(input, batch_sizes);
  const rnn::Dims d = rnn::check_forward<Cell>(rnn::kCuda, a, sc);
  rnn::check_regularizers<Cell>({zoneout_arg, kNone, recurrent_mask_arg}, a, sc, d);
  const int64_t S = sc.rows, H = d.H, N = sc.batch;
  const c10::cuda::CUDAGuard guard(input.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
  const auto options = input.options();

  const Tensor x2d = input.contiguous().view({S, d.I});
  const Tensor w_hh_c = w_hh.contiguous();
  const Tensor w_rz_t = w_hh_c.narrow(0, 0, Cell::kFirstGates * H).t();
  const Tensor w_n_t = w_hh_c.narrow(0, Cell::kN * H, H).t();
  // Every gate is input side + recurrent side: both biases go into the input projection.
  const Tensor gates_x = b_ih.has_value() ? at::addmm(*b_ih + *b_hh, x2d, w_ih.t()) : at::mm(x2d, w_ih.t());
  const Tensor gates_rz = at::empty({N, Cell::kFirstGates * H}, options);
  const Tensor gates_n = at::empty({N, H}, options);
  Tensor output = at::empty(rnn::output_shape(input, H), options);
  const Tensor out2d = output.view({S, H});
  Tensor h_state = hx.clone(at::MemoryFormat::Contiguous);
  Tensor workspace = at::empty({train ? rnn::workspace_layout<Cell>(S, H, false).size : 0}, options);
  // r, z, n, r*h of every step when training, else of one step.
  const Tensor saved = train ? workspace.view({S, Cell::kSaved * H}) : at::empty({N, Cell::kSaved * H}, options);
  const Tensor zoneout = contiguous_or_undefined(zoneout_arg);
  const Tensor recurrent_mask = contiguous_or_undefined(recurrent_mask_arg);
  // Recurrent dropout: h * m, what the products read (the carried h_state stays unmasked).
  const Tensor h_masked = recurrent_mask.defined() ? at::mul(h_state, recurrent_mask) : Tensor();
  const Tensor& h_product = recurrent_mask.defined() ? h_masked : h_state;

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "genfast::gru_reset_before_cuda", [&] {
    using K = typename KernelType<scalar_t>::type;
    for (int64_t p = 0; p < sc.steps; ++p) {
      const int64_t t = sc.forward_step(p, reverse);
      const int64_t rows = sc.active[t], off = sc.offset[t];
      const Tensor saved_rows = saved.narrow(0, train ? off : 0, rows);
      Tensor rz_rows = gates_rz.narrow(0, 0, rows);
      at::mm_out(rz_rows, h_product.narrow(0, 0, rows), w_rz_t);
      ResetBeforeForwardArgs<K> step;
      step.rows = rows;
      step.hidden = H;
      step.gates_x = data<K>(gates_x) + off * Cell::kGates * H;
      step.gates_h = data<K>(gates_rz);
      step.h_prev = data<K>(h_product);  // r * h reads what the product read
      step.saved = data<K>(saved_rows);
      C10_CUDA_CHECK(reset_before_forward_reset<K>(step, stream));

      Tensor n_rows = gates_n.narrow(0, 0, rows);
      at::mm_out(n_rows, saved_rows.narrow(1, Cell::kRh * H, H), w_n_t);
      step.gates_h = data<K>(gates_n);
      step.h_prev = data<K>(h_state);
      step.h_dst = data<K>(out2d) + off * H;
      step.h_dst2 = data<K>(h_state);
      if (zoneout.defined()) step.zoneout = data<K>(zoneout) + off * H;
      step.recurrent_mask = data_or_null<K>(recurrent_mask);
      step.h_masked_dst = data_or_null<K>(h_masked);
      C10_CUDA_CHECK(reset_before_forward_update<K>(step, stream));
    }
  });
  return {output, h_state, workspace};
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> gru_reset_before_backward_cuda(
    const Tensor& grad_output, const Tensor& grad_hy, const Tensor& input, const Tensor& hx, const Tensor& w_ih,
    const Tensor& w_hh, const Tensor& output, const Tensor& workspace, const std::optional<Tensor>& batch_sizes,
    bool reverse, const std::optional<Tensor>& zoneout_arg, const std::optional<Tensor>& recurrent_mask_arg,
    bool input_grad) {
  const rnn::LayerArgs a{input, hx, nullptr, w_ih, w_hh, kNone, kNone, kNone, batch_sizes};
  const rnn::Schedule sc = rnn::make_schedule(input, batch_sizes);
  const rnn::Dims d =
      rnn::check_backward<Cell>(rnn::kCuda, a, {grad_output, grad_hy, nullptr, output, workspace}, sc);
  rnn::check_regularizers<Cell>({zoneout_arg, kNone, recurrent_mask_arg}, a, sc, d);
  const int64_t S = sc.rows, H = d.H, N = sc.batch;
  const c10::cuda::CUDAGuard guard(input.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
  const auto options = input.options();

  const Tensor x2d = input.contiguous().view({S, d.I});
  const Tensor go2d = grad_output.contiguous().view({S, H});
  const Tensor out2d = output.contiguous().view({S, H});
  const Tensor hx_c = hx.contiguous();
  const Tensor saved = workspace.contiguous().view({S, Cell::kSaved * H});
  const Tensor w_hh_c = w_hh.contiguous();
  const Tensor w_rz = w_hh_c.narrow(0, 0, Cell::kFirstGates * H), w_n = w_hh_c.narrow(0, Cell::kN * H, H);
  Tensor dh_state = grad_hy.clone(at::MemoryFormat::Contiguous);
  const Tensor d_gates = at::empty({S, Cell::kGates * H}, options);
  const Tensor h_prev = at::empty({S, H}, options);
  const Tensor d_rh = at::empty({N, H}, options);
  const Tensor zoneout = contiguous_or_undefined(zoneout_arg);
  const Tensor recurrent_mask = contiguous_or_undefined(recurrent_mask_arg);
  // Recurrent dropout: dG_{r,z} W_h{r,z} = dL/d(h * m), before it is multiplied by m.
  const Tensor recurrent_grad = recurrent_mask.defined() ? at::empty({N, H}, options) : Tensor();

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(),
                                  "genfast::gru_reset_before_backward_cuda", [&] {
    using K = typename KernelType<scalar_t>::type;
    for (int64_t s = 0; s < sc.steps; ++s) {
      const auto pass = sc.backward_pass(s, reverse);
      const int64_t rows = pass.n, off = pass.offset;
      const int64_t prev_off = pass.fwd_prev >= 0 ? sc.offset[pass.fwd_prev] : 0;
      const Tensor d_gates_rows = d_gates.narrow(0, off, rows);
      ResetBeforeBackwardArgs<K> step;
      step.rows = rows;
      step.hidden = H;
      step.prev_rows = sc.active_at(pass.fwd_prev);
      step.grad_out = data<K>(go2d) + off * H;
      step.d_h = data<K>(dh_state);
      step.saved = data<K>(saved) + off * Cell::kSaved * H;
      step.h_prev = data<K>(out2d) + prev_off * H;
      step.hx = data<K>(hx_c);
      step.d_gates = data<K>(d_gates_rows);
      step.h_prev_dst = data<K>(h_prev) + off * H;
      if (zoneout.defined()) step.zoneout = data<K>(zoneout) + off * H;
      step.recurrent_mask = data_or_null<K>(recurrent_mask);
      C10_CUDA_CHECK(reset_before_backward_update<K>(step, stream));

      Tensor d_rh_rows = d_rh.narrow(0, 0, rows);
      at::mm_out(d_rh_rows, d_gates_rows.narrow(1, Cell::kN * H, H), w_n);
      step.d_rh = data<K>(d_rh);
      C10_CUDA_CHECK(reset_before_backward_reset<K>(step, stream));

      Tensor dh_rows = dh_state.narrow(0, 0, rows);
      if (recurrent_mask.defined()) {
        Tensor rec = recurrent_grad.narrow(0, 0, rows);
        at::mm_out(rec, d_gates_rows.narrow(1, 0, Cell::kFirstGates * H), w_rz);
        dh_rows.addcmul_(rec, recurrent_mask.narrow(0, 0, rows));
      } else {
        dh_rows.addmm_(d_gates_rows.narrow(1, 0, Cell::kFirstGates * H), w_rz);
      }
    }
  });

  Tensor grad_w_hh = at::empty({Cell::kGates * H, H}, options);
  Tensor grad_w_rz = grad_w_hh.narrow(0, 0, Cell::kFirstGates * H);
  at::mm_out(grad_w_rz, d_gates.narrow(1, 0, Cell::kFirstGates * H).t(), h_prev);
  Tensor grad_w_n = grad_w_hh.narrow(0, Cell::kN * H, H);
  at::mm_out(grad_w_n, d_gates.narrow(1, Cell::kN * H, H).t(), saved.narrow(1, Cell::kRh * H, H));
  const Tensor grad_input = input_grad ? at::mm(d_gates, w_ih).view(input.sizes()) : rnn::skipped_input_grad(input);
  return {grad_input, dh_state, at::mm(d_gates.t(), x2d), grad_w_hh, d_gates.sum(0)};
}

}  // namespace
}  // namespace cuda
}  // namespace genfast

TORCH_LIBRARY_IMPL(genfast, CUDA, m) {
  m.impl("gru_reset_before_forward", &genfast::cuda::gru_reset_before_forward_cuda);
  m.impl("gru_reset_before_backward", &genfast::cuda::gru_reset_before_backward_cuda);
}
