// genfast._probe.persistent_rnn_plan: the persistent RNN kernel's partition (csrc/rnn/persistent_plan.h)
// for a layer on a described device, so tests/test_rnn_persistent_plan.py checks it on the CPU with the
// numbers of GPUs the kernel will meet. The CUDA glue calls the same make_plan with the live device's.
#include <torch/extension.h>

#include <string>

#include "rnn/persistent_plan.h"

namespace genfast::probe {

namespace {

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
  const ps::Plan plan = ps::make_plan({gates, hidden, batch, element_bytes, regs_per_thread}, d);
  pybind11::dict out;
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
    for (int b = 0; b < plan.grid; ++b) units.append(pybind11::make_tuple(plan.unit_begin(b), plan.unit_end(b, hidden)));
  out["block_units"] = units;
  out["tile_rows"] = ps::kTileRows;
  out["max_threads"] = ps::kMaxThreads;
  return out;
}

}  // namespace

void register_persistent_plan(pybind11::module_& m) {
  m.def("persistent_rnn_plan", &persistent_rnn_plan,
        "the persistent RNN kernel's partition of a layer on a described device (csrc/rnn/persistent_plan.h)",
        pybind11::arg("gates"), pybind11::arg("hidden"), pybind11::arg("batch"), pybind11::arg("element_bytes"),
        pybind11::arg("sm_count"), pybind11::arg("smem_per_sm"), pybind11::arg("smem_per_block"),
        pybind11::arg("smem_reserved_per_block"), pybind11::arg("regs_per_sm"), pybind11::arg("max_threads_per_sm"),
        pybind11::arg("max_blocks_per_sm"), pybind11::arg("cooperative_launch"), pybind11::arg("regs_per_thread"));
}

}  // namespace genfast::probe
