// genfast._probe.persistent_rnn_plan: the persistent RNN kernel's partition (csrc/rnn/persistent_plan.h)
// for a layer on a described device, so tests/test_rnn_persistent_plan.py checks it on the CPU with the
// numbers of GPUs the kernel will meet. The CUDA glue calls the same make_plan with the live device's.
// genfast._probe.persistent_rnn_emulate: the kernel's schedule run on the host in fp32 with the same
// index math (persistent::Layout) and cell policy, block by block and tile by tile, so the partition,
// the W slice layout, the tiles and the exchange of h through the output are checked against torch.nn.
#include <torch/extension.h>

#include <cmath>
#include <limits>
#include <string>
#include <vector>

#include "rnn/cells.h"
#include "rnn/persistent_plan.h"

namespace genfast::probe {

namespace {

template <bool kBackward>
pybind11::dict persistent_rnn_plan(int gates, int64_t hidden, int64_t batch, int element_bytes, int sm_count,
                                   int64_t smem_per_sm, int64_t smem_per_block, int64_t smem_reserved_per_block,
                                   int64_t regs_per_sm, int max_threads_per_sm, int max_blocks_per_sm,
                                   bool cooperative_launch, int regs_per_thread) {
  namespace ps = rnn::persistent;
  ps::DeviceBudget d;
  d.sm_count = sm_count;
  d.smem_per_sm = smem_per_sm;
  d.smem_per_block = smem_per_block;
  d.smem_reserved_per_block = smem_reserved_per_block;
  d.regs_per_sm = regs_per_sm;
  d.max_threads_per_sm = max_threads_per_sm;
  d.max_blocks_per_sm = max_blocks_per_sm;
  d.cooperative_launch = cooperative_launch;
  const ps::Problem problem{gates, hidden, batch, element_bytes, regs_per_thread};
  ps::BackwardPlan backward;
  if (kBackward) backward = ps::make_backward_plan(problem, d);
  const ps::Plan plan = kBackward ? static_cast<const ps::Plan&>(backward) : ps::make_plan(problem, d);
  pybind11::dict out;
  if (kBackward) {
    out["chunk_columns"] = backward.chunk_columns;
    out["acc_smem_bytes"] = backward.acc_smem_bytes;
  }
  out["fits"] = plan.fits;
  out["reason"] = plan.reason;
  out["grid"] = plan.grid;
  out["threads"] = plan.threads;
  out["units_per_block"] = plan.units_per_block;
  out["vector_elements"] = plan.vector_elements;
  out["tiles_per_block"] = plan.tiles_per_block;
  out["w_smem_bytes"] = plan.w_smem_bytes;
  out["h_smem_bytes"] = plan.h_smem_bytes;
  out["smem_bytes"] = plan.smem_bytes;
  out["blocks_per_sm"] = plan.blocks_per_sm;
  out["exchange_bytes"] = plan.exchange_bytes;
  out["l2_read_bytes"] = plan.l2_read_bytes;
  pybind11::list units;
  if (plan.grid > 0 && plan.units_per_block > 0)
    for (int b = 0; b < plan.grid; ++b)
      units.append(pybind11::make_tuple(plan.unit_begin(b), plan.unit_end(b, hidden)));
  out["block_units"] = units;
  out["tile_rows"] = ps::kTileRows;
  out["max_threads"] = ps::kMaxThreads;
  return out;
}

// One layer and direction as csrc/cuda/rnn_persistent.cu computes it, for a grid planned on `sm_count` SMs.
// A packed batch's schedule as the CUDA glue passes it to the kernel: the rows of each step and where each
// step starts (empty, and S = steps * N, for a dense batch).
struct PackedSteps {
  std::vector<int64_t> rows, offset;
  int64_t total = 0;  // S, the rows of the whole sequence
  const int64_t* rows_of() const { return rows.empty() ? nullptr : rows.data(); }
  const int64_t* offset_of() const { return offset.empty() ? nullptr : offset.data(); }
};

PackedSteps packed_steps(const std::optional<torch::Tensor>& batch_sizes, int64_t steps, int64_t N) {
  PackedSteps p;
  p.total = steps * N;
  if (!batch_sizes) return p;
  TORCH_CHECK(batch_sizes->numel() == steps, "batch_sizes: expected one per step");
  const torch::Tensor bs = batch_sizes->to(torch::kLong).contiguous();
  p.total = 0;
  for (int64_t t = 0; t < steps; ++t) {
    p.rows.push_back(bs.data_ptr<int64_t>()[t]);
    p.offset.push_back(p.total);
    p.total += p.rows.back();
  }
  return p;
}

template <typename Cell>
std::vector<torch::Tensor> emulate(const torch::Tensor& gates_x, const torch::Tensor& w_hh,
                                   const std::optional<torch::Tensor>& b_ih, const std::optional<torch::Tensor>& b_hh,
                                   const torch::Tensor& hx, const std::optional<torch::Tensor>& cx, int64_t steps,
                                   const std::optional<torch::Tensor>& batch_sizes, bool reverse, int sm_count) {
  namespace ps = rnn::persistent;
  constexpr int G = Cell::kGates;
  const int64_t H = w_hh.size(1), N = hx.size(0);
  const PackedSteps packed = packed_steps(batch_sizes, steps, N);
  const int64_t S = packed.total;
  const int64_t* rows_of = packed.rows_of();
  const int64_t* offset_of = packed.offset_of();
  TORCH_CHECK(gates_x.dim() == 2 && gates_x.size(0) == S && gates_x.size(1) == G * H,
              "gates_x: expected (rows of the sequence, G * H)");
  TORCH_CHECK(w_hh.size(0) == G * H, "w_hh: expected (G * H, H)");
  TORCH_CHECK(!Cell::kCellState || cx.has_value(), "cx: required for this cell");
  ps::DeviceBudget d;
  d.sm_count = sm_count;
  d.smem_per_sm = d.smem_per_block = std::numeric_limits<int64_t>::max() / 4;  // the layout, not the budget
  d.regs_per_sm = 1 << 20;
  d.max_threads_per_sm = 1 << 20;
  d.max_blocks_per_sm = 1;
  d.cooperative_launch = true;
  const ps::Plan plan = ps::make_plan({G, H, N, 4, 32}, d);
  TORCH_CHECK(plan.fits, "plan: ", plan.reason);
  const ps::Layout layout{G, H, N, plan.units_per_block};

  const auto f32 = [](const torch::Tensor& t) { return t.to(torch::kFloat).contiguous(); };
  const torch::Tensor gx_t = f32(gates_x), w_t = f32(w_hh), hx_t = f32(hx);
  const torch::Tensor bi_t = b_ih ? f32(*b_ih) : torch::Tensor(), bh_t = b_hh ? f32(*b_hh) : torch::Tensor();
  torch::Tensor c_t = Cell::kCellState ? f32(*cx).clone() : torch::zeros({N, H});
  // NaN where nothing is written: a unit or row the tiles miss shows in the comparison.
  torch::Tensor out_t = torch::full({S, H}, std::numeric_limits<float>::quiet_NaN());
  // Training's workspace as the kernel writes it: [saved values (S, kSaved*H) | c_t (S, H) for cells with c].
  const rnn::WorkspaceLayout ws = rnn::workspace_layout<Cell>(S, H, false);
  torch::Tensor ws_t = torch::full({ws.size}, std::numeric_limits<float>::quiet_NaN());
  float* saved_out = ws_t.data_ptr<float>();
  float* cell_out = Cell::kCellState ? saved_out + ws.cell : nullptr;
  const float *gx = gx_t.data_ptr<float>(), *w = w_t.data_ptr<float>(), *h0 = hx_t.data_ptr<float>();
  const float* bi = bi_t.defined() ? bi_t.data_ptr<float>() : nullptr;
  const float* bh = bh_t.defined() ? bh_t.data_ptr<float>() : nullptr;
  float *c = c_t.data_ptr<float>(), *out = out_t.data_ptr<float>();

  // Each block's shared memory: [W slice | h stage].
  std::vector<std::vector<float>> smem(plan.grid, std::vector<float>(layout.h_stage_offset() + N * H));
  for (int64_t b = 0; b < plan.grid; ++b)
    for (int64_t u = 0; u < layout.units(b); ++u)
      for (int g = 0; g < G; ++g)
        for (int64_t k = 0; k < H; ++k) smem[b][layout.slice_row(u, g) * H + k] = w[layout.weight_row(b, u, g) * H + k];
  for (int64_t p = 0; p < steps; ++p) {
    const int64_t t = ps::Layout::time(p, steps, reverse), t_prev = ps::Layout::prev_time(p, steps, reverse);
    const int64_t rows = layout.rows(rows_of, t), row0 = layout.offset(offset_of, t);
    const int64_t rows_prev = t_prev < 0 ? 0 : layout.rows(rows_of, t_prev);
    const float* continued = out + (t_prev < 0 ? 0 : layout.offset(offset_of, t_prev)) * H;
    for (int64_t b = 0; b < plan.grid; ++b)  // every block stages before any writes (the barrier)
      for (int64_t n = 0; n < rows; ++n) {
        const float* from = (n < rows_prev ? continued : h0) + n * H;
        std::copy(from, from + H, smem[b].begin() + layout.h_stage_offset() + n * H);
      }
    for (int64_t b = 0; b < plan.grid; ++b) {
      const float* slice = smem[b].data();
      const float* stage = slice + layout.h_stage_offset();
      for (int64_t tile = 0; tile < layout.tiles(b); ++tile) {
        const int64_t u = layout.tile_unit(tile), j = layout.first_unit(b) + u;
        for (int64_t n = layout.tile_row0(tile); n < std::min(rows, layout.tile_row0(tile) + ps::kTileRows); ++n) {
          float x[G], h[G], b_i[G], b_h[G];
          for (int g = 0; g < G; ++g) {
            double sum = 0;
            for (int64_t k = 0; k < H; ++k) sum += double(slice[layout.slice_row(u, g) * H + k]) * stage[n * H + k];
            h[g] = static_cast<float>(sum);
            x[g] = gx[(row0 + n) * G * H + g * H + j];
            b_i[g] = bi ? bi[g * H + j] : 0.f;
            b_h[g] = bh ? bh[g * H + j] : 0.f;
          }
          float no_cell = 0.f, h_out = 0.f, saved[Cell::kSaved];
          float& cell_state = Cell::kCellState ? c[n * H + j] : no_cell;
          Cell::forward_thread(x, h, b_i, b_h, cell_state, stage[n * H + j], h_out, saved);
          out[(row0 + n) * H + j] = h_out;
          for (int slot = 0; slot < Cell::kSaved; ++slot)
            saved_out[layout.saved_index(row0 + n, slot, j, Cell::kSaved)] = saved[slot];
          if (Cell::kCellState) cell_out[layout.cell_index(row0 + n, j)] = cell_state;
        }
      }
    }
  }
  // Each row's final h: its output at the last step it is active in (as the CUDA glue gathers it).
  std::vector<int64_t> last_row(N, -1);
  for (int64_t p = 0; p < steps; ++p) {
    const int64_t t = ps::Layout::time(p, steps, reverse);
    for (int64_t n = 0; n < layout.rows(rows_of, t); ++n) last_row[n] = layout.offset(offset_of, t) + n;
  }
  return {out_t, out_t.index_select(0, torch::tensor(last_row, torch::kLong)), c_t, ws_t};
}

// The backward kernel's schedule (padded input) on the host in fp32, block by block, in its two phases per step:
// A, each (row, unit) of a block: the cell's backward from dL/dh = grad_output + the carried part, writing the
// gate gradients and gathering h_{t-1}; then (after the grid barrier) B, each block: dL/dh_{t-1} of its units
// = dG W_hh over the chunks of dG's columns, with its W_hh^T slice. `smem_per_block` sets the chunk width.
template <typename Cell>
std::vector<torch::Tensor> emulate_backward(const torch::Tensor& grad_output, const torch::Tensor& grad_hy,
                                            const std::optional<torch::Tensor>& grad_cy, const torch::Tensor& hx,
                                            const std::optional<torch::Tensor>& cx, const torch::Tensor& w_hh,
                                            const torch::Tensor& output, const torch::Tensor& workspace,
                                            int64_t steps, const std::optional<torch::Tensor>& batch_sizes,
                                            bool reverse, int sm_count, int64_t smem_per_block) {
  namespace ps = rnn::persistent;
  constexpr int G = Cell::kGates;
  const int64_t H = w_hh.size(1), N = hx.size(0), GH = G * H;
  const PackedSteps packed = packed_steps(batch_sizes, steps, N);
  const int64_t S = packed.total;
  const int64_t* rows_of = packed.rows_of();
  const int64_t* offset_of = packed.offset_of();
  ps::DeviceBudget d;
  d.sm_count = sm_count;
  d.smem_per_sm = d.smem_per_block = smem_per_block;
  d.regs_per_sm = 1 << 20;
  d.max_threads_per_sm = 1 << 20;
  d.max_blocks_per_sm = 1;
  d.cooperative_launch = true;
  const ps::BackwardPlan plan = ps::make_backward_plan({G, H, N, 4, 32}, d);
  TORCH_CHECK(plan.fits, "plan: ", plan.reason);
  const ps::Layout layout{G, H, N, plan.units_per_block};
  const rnn::WorkspaceLayout wsl = rnn::workspace_layout<Cell>(S, H, false);
  const auto f32 = [](const torch::Tensor& t) { return t.to(torch::kFloat).contiguous(); };
  const torch::Tensor go_t = f32(grad_output), w_t = f32(w_hh), out_t = f32(output), ws_t = f32(workspace),
                      hx_t = f32(hx), cx_t = Cell::kCellState ? f32(*cx) : torch::Tensor();
  torch::Tensor dh_t = f32(grad_hy).clone(), dc_t = Cell::kCellState ? f32(*grad_cy).clone() : torch::zeros({N, H});
  const float nan = std::numeric_limits<float>::quiet_NaN();
  torch::Tensor dg_t = torch::full({S, GH}, nan), h_prev_t = torch::full({S, H}, nan);
  torch::Tensor dgh_t = Cell::kSidesAdd ? dg_t : torch::full({S, GH}, nan);
  const float *go = go_t.data_ptr<float>(), *w = w_t.data_ptr<float>(), *out = out_t.data_ptr<float>(),
              *ws = ws_t.data_ptr<float>(), *h0 = hx_t.data_ptr<float>();
  const float* c0 = Cell::kCellState ? cx_t.data_ptr<float>() : nullptr;
  float *dh = dh_t.data_ptr<float>(), *dc = dc_t.data_ptr<float>(), *dg = dg_t.data_ptr<float>(),
        *dgh = dgh_t.data_ptr<float>(), *h_prev = h_prev_t.data_ptr<float>();

  // Each block's W_hh^T slice: row u holds column (first unit + u) of W_hh, G*H long.
  std::vector<std::vector<float>> wt(plan.grid, std::vector<float>(plan.units_per_block * GH));
  for (int64_t b = 0; b < plan.grid; ++b)
    for (int64_t u = 0; u < layout.units(b); ++u)
      for (int64_t r = 0; r < GH; ++r) wt[b][u * GH + r] = w[r * H + layout.first_unit(b) + u];
  for (int64_t s = 0; s < steps; ++s) {
    const int64_t t = ps::Layout::time(steps - 1 - s, steps, reverse);           // backward order
    const int64_t t_prev = ps::Layout::prev_time(steps - 1 - s, steps, reverse);  // the forward's previous step
    const int64_t rows = layout.rows(rows_of, t), row0 = layout.offset(offset_of, t);
    const int64_t rows_prev = t_prev < 0 ? 0 : layout.rows(rows_of, t_prev);
    const int64_t prev0 = t_prev < 0 ? 0 : layout.offset(offset_of, t_prev);
    for (int64_t b = 0; b < plan.grid; ++b)  // phase A
      for (int64_t u = 0; u < layout.units(b); ++u)
        for (int64_t n = 0; n < rows; ++n) {
          const int64_t j = layout.first_unit(b) + u, row = row0 + n;
          const bool continues = n < rows_prev;
          const float d_h = go[row * H + j] + dh[n * H + j];
          float saved[Cell::kSaved];
          for (int slot = 0; slot < Cell::kSaved; ++slot) saved[slot] = ws[layout.saved_index(row, slot, j, Cell::kSaved)];
          const float h_before = continues ? out[(prev0 + n) * H + j] : h0[n * H + j];
          float state_prev = h_before, c_cur = 0.f;
          if (Cell::kCellState) {
            state_prev = continues ? ws[wsl.cell + layout.cell_index(prev0 + n, j)] : c0[n * H + j];
            c_cur = ws[wsl.cell + layout.cell_index(row, j)];
          }
          float d_x[G], d_hside[G], d_direct = 0.f;
          Cell::backward_thread(d_h, dc[n * H + j], saved, state_prev, c_cur, d_x, d_hside, d_direct);
          for (int g = 0; g < G; ++g) {
            dg[row * GH + g * H + j] = d_x[g];
            if (!Cell::kSidesAdd) dgh[row * GH + g * H + j] = d_hside[g];
          }
          h_prev[row * H + j] = h_before;
          dh[n * H + j] = Cell::kDirectHidden ? d_direct : 0.f;
        }
    for (int64_t b = 0; b < plan.grid; ++b) {  // phase B, after the grid barrier
      std::vector<float> acc(N * plan.units_per_block, 0.f), stage(N * plan.chunk_columns);
      for (int64_t r0 = 0; r0 < GH; r0 += plan.chunk_columns) {
        const int64_t width = std::min(plan.chunk_columns, GH - r0);
        for (int64_t n = 0; n < rows; ++n)
          std::copy(dgh + (row0 + n) * GH + r0, dgh + (row0 + n) * GH + r0 + width,
                    stage.begin() + n * plan.chunk_columns);
        for (int64_t tile = 0; tile < layout.tiles(b); ++tile) {
          const int64_t u = layout.tile_unit(tile);
          for (int64_t n = layout.tile_row0(tile); n < std::min(rows, layout.tile_row0(tile) + ps::kTileRows); ++n)
            for (int64_t r = 0; r < width; ++r)
              acc[n * plan.units_per_block + u] += stage[n * plan.chunk_columns + r] * wt[b][u * GH + r0 + r];
        }
      }
      for (int64_t u = 0; u < layout.units(b); ++u)
        for (int64_t n = 0; n < rows; ++n) dh[n * H + layout.first_unit(b) + u] += acc[n * plan.units_per_block + u];
    }
  }
  return {dg_t, dgh_t, h_prev_t, dh_t, dc_t, torch::tensor(plan.chunk_columns)};
}

std::vector<torch::Tensor> persistent_rnn_emulate_backward(
    const std::string& cell, const torch::Tensor& grad_output, const torch::Tensor& grad_hy,
    const std::optional<torch::Tensor>& grad_cy, const torch::Tensor& hx, const std::optional<torch::Tensor>& cx,
    const torch::Tensor& w_hh, const torch::Tensor& output, const torch::Tensor& workspace, int64_t steps,
    const std::optional<torch::Tensor>& batch_sizes, bool reverse, int sm_count, int64_t smem_per_block) {
  if (cell == "lstm")
    return emulate_backward<rnn::LstmCell>(grad_output, grad_hy, grad_cy, hx, cx, w_hh, output, workspace, steps,
                                           batch_sizes, reverse, sm_count, smem_per_block);
  TORCH_CHECK(cell == "gru", "cell: expected 'lstm' or 'gru', got '", cell, "'");
  return emulate_backward<rnn::GruCell>(grad_output, grad_hy, grad_cy, hx, cx, w_hh, output, workspace, steps,
                                        batch_sizes, reverse, sm_count, smem_per_block);
}

std::vector<torch::Tensor> persistent_rnn_emulate(const std::string& cell, const torch::Tensor& gates_x,
                                                  const torch::Tensor& w_hh, const std::optional<torch::Tensor>& b_ih,
                                                  const std::optional<torch::Tensor>& b_hh, const torch::Tensor& hx,
                                                  const std::optional<torch::Tensor>& cx, int64_t steps,
                                                  const std::optional<torch::Tensor>& batch_sizes, bool reverse,
                                                  int sm_count) {
  if (cell == "lstm")
    return emulate<rnn::LstmCell>(gates_x, w_hh, b_ih, b_hh, hx, cx, steps, batch_sizes, reverse, sm_count);
  TORCH_CHECK(cell == "gru", "cell: expected 'lstm' or 'gru', got '", cell, "'");
  return emulate<rnn::GruCell>(gates_x, w_hh, b_ih, b_hh, hx, cx, steps, batch_sizes, reverse, sm_count);
}

}  // namespace

void register_persistent_plan(pybind11::module_& m) {
  m.def("persistent_rnn_emulate_backward", &persistent_rnn_emulate_backward,
        "the persistent RNN backward kernel's schedule on the host in fp32: (d_gates, d_gates_h, h_prev, grad_hx, "
        "grad_cx, chunk columns)",
        pybind11::arg("cell"), pybind11::arg("grad_output"), pybind11::arg("grad_hy"), pybind11::arg("grad_cy"),
        pybind11::arg("hx"), pybind11::arg("cx"), pybind11::arg("w_hh"), pybind11::arg("output"),
        pybind11::arg("workspace"), pybind11::arg("steps"), pybind11::arg("batch_sizes"), pybind11::arg("reverse"),
        pybind11::arg("sm_count"), pybind11::arg("smem_per_block"));
  m.def("persistent_rnn_emulate", &persistent_rnn_emulate,
        "the persistent RNN kernel's schedule on the host in fp32: (output, h_last, c_last, workspace)",
        pybind11::arg("cell"), pybind11::arg("gates_x"), pybind11::arg("w_hh"), pybind11::arg("b_ih"),
        pybind11::arg("b_hh"), pybind11::arg("hx"), pybind11::arg("cx"), pybind11::arg("steps"),
        pybind11::arg("batch_sizes"), pybind11::arg("reverse"), pybind11::arg("sm_count"));
  m.def("persistent_rnn_backward_plan", &persistent_rnn_plan<true>,
        "the persistent RNN backward kernel's partition (make_backward_plan; the arguments of persistent_rnn_plan)",
        pybind11::arg("gates"), pybind11::arg("hidden"), pybind11::arg("batch"), pybind11::arg("element_bytes"),
        pybind11::arg("sm_count"), pybind11::arg("smem_per_sm"), pybind11::arg("smem_per_block"),
        pybind11::arg("smem_reserved_per_block"), pybind11::arg("regs_per_sm"), pybind11::arg("max_threads_per_sm"),
        pybind11::arg("max_blocks_per_sm"), pybind11::arg("cooperative_launch"), pybind11::arg("regs_per_thread"));
  m.def("persistent_rnn_plan", &persistent_rnn_plan<false>,
        "the persistent RNN kernel's partition of a layer on a described device (csrc/rnn/persistent_plan.h)",
        pybind11::arg("gates"), pybind11::arg("hidden"), pybind11::arg("batch"), pybind11::arg("element_bytes"),
        pybind11::arg("sm_count"), pybind11::arg("smem_per_sm"), pybind11::arg("smem_per_block"),
        pybind11::arg("smem_reserved_per_block"), pybind11::arg("regs_per_sm"), pybind11::arg("max_threads_per_sm"),
        pybind11::arg("max_blocks_per_sm"), pybind11::arg("cooperative_launch"), pybind11::arg("regs_per_thread"));
}

}  // namespace genfast::probe
