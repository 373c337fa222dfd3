// The persistent RNN forward's glue (rnn_persistent_glue.h): the eligibility checks, the plan on the live
// device (csrc/rnn/persistent_plan.h) confirmed by the runtime's occupancy, the cooperative launch, and the
// record of the path each layer took, exposed as torch.ops.genfast.rnn_cuda_path().
#include "rnn_persistent_glue.h"

#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <map>
#include <mutex>
#include <string>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

#include "glue_types.h"
#include "rnn/cells.h"
#include "rnn/persistent_plan.h"
#include "rnn_persistent.h"

namespace genfast {
namespace cuda {
namespace {

struct PathRecord {
  std::string path = "none";
  std::string reason = "no CUDA LSTM/GRU layer has run yet";
};
std::mutex record_mutex;
PathRecord last_record;
int64_t persistent_layers = 0;           // forward layers the persistent kernel ran since the library loaded
int64_t persistent_backward_layers = 0;  // and backward layers

void record(const char* path, std::string reason, bool backward = false) {
  const std::lock_guard<std::mutex> lock(record_mutex);
  last_record.path = path;
  last_record.reason = backward ? "backward: " + reason : std::move(reason);
  if (last_record.path == "persistent") ++(backward ? persistent_backward_layers : persistent_layers);
}

bool per_step(std::string reason, bool backward = false) {
  record("per-step", std::move(reason), backward);
  return false;
}

bool persistent_enabled() {
  const char* value = std::getenv("GENFAST_RNN_PERSISTENT");
  return value != nullptr && std::strcmp(value, "1") == 0;
}

bool aligned16(const at::Tensor& t) { return reinterpret_cast<std::uintptr_t>(t.data_ptr()) % 16 == 0; }

rnn::persistent::DeviceBudget query_budget(int device) {
  cudaDeviceProp prop;
  C10_CUDA_CHECK(cudaGetDeviceProperties(&prop, device));
  rnn::persistent::DeviceBudget d;
  d.sm_count = prop.multiProcessorCount;
  d.smem_per_sm = static_cast<int64_t>(prop.sharedMemPerMultiprocessor);
  d.smem_per_block = static_cast<int64_t>(prop.sharedMemPerBlockOptin);
  d.smem_reserved_per_block = static_cast<int64_t>(prop.reservedSharedMemPerBlock);
  d.regs_per_sm = prop.regsPerMultiprocessor;
  d.max_threads_per_sm = prop.maxThreadsPerMultiProcessor;
  d.max_blocks_per_sm = prop.maxBlocksPerMultiProcessor;
  d.cooperative_launch = prop.cooperativeLaunch != 0;
  return d;
}

// cudaGetDeviceProperties is slow next to a one-token layer call: each device's budget is read once.
rnn::persistent::DeviceBudget device_budget(int device) {
  static std::mutex mutex;
  static std::map<int, rnn::persistent::DeviceBudget> budgets;
  const std::lock_guard<std::mutex> lock(mutex);
  auto found = budgets.find(device);
  if (found == budgets.end()) found = budgets.emplace(device, query_budget(device)).first;
  return found->second;
}

// The runtime's answers for one kernel: its registers per thread, and its resident blocks per SM for a launch
// shape. Asked once per device and shape: a one-token layer call is a few microseconds of GPU work.
class OccupancyCache {
 public:
  using Query = cudaError_t (*)(int threads, int64_t smem_bytes, int* regs_per_thread, int* blocks_per_sm);
  explicit OccupancyCache(Query query) : query_(query) {}

  std::pair<int, int> get(int device, int threads, int64_t smem) {  // -> (registers, resident blocks)
    const std::lock_guard<std::mutex> lock(mutex_);
    auto found = answers_.find({device, threads, smem});
    if (found == answers_.end()) {
      int regs = 0, resident = 0;
      C10_CUDA_CHECK(query_(threads, smem, &regs, &resident));
      found = answers_.emplace(std::make_tuple(device, threads, smem), std::make_pair(regs, resident)).first;
    }
    return found->second;
  }

 private:
  Query query_;
  std::mutex mutex_;
  std::map<std::tuple<int, int, int64_t>, std::pair<int, int>> answers_;
};

// Why `resident` blocks per SM cannot hold the whole grid at once, or "" when they can.
std::string occupancy_shortfall(int resident, const rnn::persistent::DeviceBudget& budget, int grid) {
  if (static_cast<int64_t>(resident) * budget.sm_count >= grid) return "";
  return "runtime occupancy: " + std::to_string(resident) + " resident blocks per SM x " +
         std::to_string(budget.sm_count) + " SMs < grid " + std::to_string(grid);
}

// A packed batch's schedule on the device, [rows per step | offset of each step]; undefined for a dense batch.
at::Tensor device_schedule(const std::vector<int64_t>& step_rows, const std::vector<int64_t>& step_offset,
                           const at::Device& device) {
  if (step_rows.empty()) return at::Tensor();
  std::vector<int64_t> both(step_rows);
  both.insert(both.end(), step_offset.begin(), step_offset.end());
  return at::tensor(both, at::kLong).to(device);
}

std::string describe(const char* cell, const PersistentLayer& l, const rnn::persistent::Plan& plan) {
  return std::string(cell) + (l.step_rows.empty() ? "" : " packed") + " T=" + std::to_string(l.steps) +
         " N=" + std::to_string(l.batch) +
         " H=" + std::to_string(l.hidden) + " " + std::string(c10::toString(l.output.scalar_type())) + ": grid " +
         std::to_string(plan.grid) + " x " + std::to_string(plan.threads) + " threads, " +
         std::to_string(plan.units_per_block) + " units and " + std::to_string(plan.smem_bytes) +
         " bytes of shared memory per block";
}

template <typename Cell, typename K>
bool launch(const PersistentLayer& l) {
  const int device = l.output.get_device();
  const rnn::persistent::DeviceBudget budget = device_budget(device);
  static OccupancyCache occupancy(persistent_forward_occupancy<Cell, K>);
  const int regs = occupancy.get(device, 32 * rnn::persistent::kMinWarps, 0).first;
  const rnn::persistent::Plan plan =
      rnn::persistent::make_plan({Cell::kGates, l.hidden, l.batch, static_cast<int>(sizeof(K)), regs}, budget);
  if (!plan.fits) return per_step(std::string("plan: ") + plan.reason);
  const std::string shortfall = occupancy_shortfall(occupancy.get(device, plan.threads, plan.smem_bytes).second,
                                                    budget, plan.grid);
  if (!shortfall.empty()) return per_step(shortfall);

  PersistentForwardArgs<K> args;
  args.steps = l.steps;
  args.batch = l.batch;
  args.hidden = l.hidden;
  args.reverse = l.reverse;
  args.w_hh = data_or_null<K>(l.w_hh);
  args.gates_x = data_or_null<K>(l.gates_x);
  args.b_ih = data_or_null<K>(l.b_ih);
  args.b_hh = data_or_null<K>(l.b_hh);
  args.hx = data_or_null<K>(l.hx);
  args.c_state = Cell::kCellState ? data_or_null<float>(l.c_state) : nullptr;
  args.output = data_or_null<K>(l.output);
  args.saved = data_or_null<K>(l.saved);
  args.saved_c = data_or_null<K>(l.saved_c);
  const at::Tensor schedule = device_schedule(l.step_rows, l.step_offset, l.output.device());
  if (schedule.defined()) {
    args.step_rows = schedule.data_ptr<int64_t>();
    args.step_offset = args.step_rows + l.steps;
  }
  PersistentLaunch shape;
  shape.grid = plan.grid;
  shape.threads = plan.threads;
  shape.units_per_block = plan.units_per_block;
  shape.smem_bytes = plan.smem_bytes;
  const cudaError_t status =
      persistent_forward<Cell, K>(args, shape, c10::cuda::getCurrentCUDAStream(device).stream());
  if (status == cudaErrorCooperativeLaunchTooLarge) {
    (void)cudaGetLastError();  // clear it: nothing ran
    return per_step("cooperative launch of " + std::to_string(plan.grid) + " blocks refused (too large)");
  }
  C10_CUDA_CHECK(status);
  record("persistent", describe(Cell::kName, l, plan));
  return true;
}

template <typename Cell, typename K>
bool launch_backward(const PersistentBackwardLayer& l) {
  const int device = l.d_gates.get_device();
  const rnn::persistent::DeviceBudget budget = device_budget(device);
  static OccupancyCache occupancy(persistent_backward_occupancy<Cell, K>);
  const int regs = occupancy.get(device, 32 * rnn::persistent::kMinWarps, 0).first;
  const rnn::persistent::BackwardPlan plan = rnn::persistent::make_backward_plan(
      {Cell::kGates, l.hidden, l.batch, static_cast<int>(sizeof(K)), regs}, budget);
  if (!plan.fits) return per_step(std::string("plan: ") + plan.reason, true);
  const std::string shortfall = occupancy_shortfall(occupancy.get(device, plan.threads, plan.smem_bytes).second,
                                                    budget, plan.grid);
  if (!shortfall.empty()) return per_step(shortfall, true);
  PersistentBackwardArgs<K> args;
  args.steps = l.steps;
  args.batch = l.batch;
  args.hidden = l.hidden;
  args.reverse = l.reverse;
  args.w_hh = data_or_null<K>(l.w_hh);
  args.grad_output = data_or_null<K>(l.grad_output);
  args.hx = data_or_null<K>(l.hx);
  args.cx = data_or_null<K>(l.cx);
  args.output = data_or_null<K>(l.output);
  args.saved = data_or_null<K>(l.saved);
  args.saved_c = data_or_null<K>(l.saved_c);
  const at::Tensor dh32 = l.dh_state.to(at::kFloat).contiguous();  // the same tensor when it is fp32 already
  args.dh_state = data_or_null<float>(dh32);
  args.dc_state = Cell::kCellState ? data_or_null<float>(l.dc_state) : nullptr;
  args.d_gates = data_or_null<K>(l.d_gates);
  args.d_gates_h = Cell::kSidesAdd ? nullptr : data_or_null<K>(l.d_gates_h);
  args.h_prev = data_or_null<K>(l.h_prev);
  const at::Tensor schedule = device_schedule(l.step_rows, l.step_offset, l.d_gates.device());
  if (schedule.defined()) {
    args.step_rows = schedule.data_ptr<int64_t>();
    args.step_offset = args.step_rows + l.steps;
  }
  PersistentLaunch shape;
  shape.grid = plan.grid;
  shape.threads = plan.threads;
  shape.units_per_block = plan.units_per_block;
  shape.smem_bytes = plan.smem_bytes;
  shape.chunk_columns = plan.chunk_columns;
  const cudaError_t status =
      persistent_backward<Cell, K>(args, shape, c10::cuda::getCurrentCUDAStream(device).stream());
  if (status == cudaErrorCooperativeLaunchTooLarge) {
    (void)cudaGetLastError();
    return per_step("cooperative launch of " + std::to_string(plan.grid) + " blocks refused (too large)", true);
  }
  C10_CUDA_CHECK(status);
  if (!dh32.is_same(l.dh_state)) l.dh_state.copy_(dh32);
  record("persistent",
         std::string(Cell::kName) + (l.step_rows.empty() ? "" : " packed") + " T=" + std::to_string(l.steps) +
             " N=" + std::to_string(l.batch) + " H=" +
             std::to_string(l.hidden) + ": grid " + std::to_string(plan.grid) + " x " + std::to_string(plan.threads) +
             " threads, dG in chunks of " + std::to_string(plan.chunk_columns) + " columns",
         true);
  return true;
}

}  // namespace

template <typename Cell>
bool run_persistent_backward(const PersistentBackwardLayer& l) {
  if (!persistent_enabled())
    return per_step("GENFAST_RNN_PERSISTENT is not 1 (the persistent kernel is opt-in)", true);
  if (l.projected) return per_step("proj_size: the persistent kernel has no projection", true);
  if (l.regularized) return per_step("zoneout / recurrent dropout: the persistent kernel has no regularisers", true);
  const at::ScalarType dtype = l.d_gates.scalar_type();
  if (dtype != at::kFloat && dtype != at::kHalf && dtype != at::kBFloat16)
    return per_step(std::string("dtype ") + c10::toString(dtype) + ": the persistent kernel runs fp32, fp16, bf16",
                    true);
  if (l.steps == 0 || l.batch == 0) return per_step("empty sequence or batch", true);
  // dG is read back in 16-byte vectors: the buffers are the glue's own allocations.
  if (!aligned16(l.d_gates) || !aligned16(l.d_gates_h)) return per_step("d_gates is not 16-byte aligned", true);
  bool ran = false;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "genfast::rnn_persistent_backward", [&] {
    if constexpr (!std::is_same_v<scalar_t, double>)
      ran = launch_backward<Cell, typename KernelType<scalar_t>::type>(l);
  });
  return ran;
}

template bool run_persistent_backward<rnn::LstmCell>(const PersistentBackwardLayer&);
template bool run_persistent_backward<rnn::GruCell>(const PersistentBackwardLayer&);

template <typename Cell>
bool run_persistent_forward(const PersistentLayer& l) {
  if (!persistent_enabled()) return per_step("GENFAST_RNN_PERSISTENT is not 1 (the persistent kernel is opt-in)");
  if (l.projected) return per_step("proj_size: the persistent kernel has no projection");
  if (l.regularized) return per_step("zoneout / recurrent dropout: the persistent kernel has no regularisers");
  const at::ScalarType dtype = l.output.scalar_type();
  if (dtype != at::kFloat && dtype != at::kHalf && dtype != at::kBFloat16)
    return per_step(std::string("dtype ") + c10::toString(dtype) + ": the persistent kernel runs fp32, fp16, bf16");
  if (l.steps == 0 || l.batch == 0) return per_step("empty sequence or batch");
  // The kernel loads W_hh, hx and h_{t-1} in 16-byte vectors; a weight that is a view at an odd offset is
  // copied once (hx and the output are the glue's own allocations).
  PersistentLayer layer = l;
  if (!aligned16(layer.w_hh)) layer.w_hh = layer.w_hh.clone();
  if (!aligned16(layer.hx) || !aligned16(layer.output)) return per_step("hx or the output is not 16-byte aligned");
  // The recurrent product runs on CUDA cores in fp32, never TF32 (whatever torch's allow_tf32 flags say).
  bool ran = false;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "genfast::rnn_persistent_forward", [&] {
    if constexpr (!std::is_same_v<scalar_t, double>) ran = launch<Cell, typename KernelType<scalar_t>::type>(layer);
  });
  return ran;
}

template bool run_persistent_forward<rnn::LstmCell>(const PersistentLayer&);
template bool run_persistent_forward<rnn::GruCell>(const PersistentLayer&);

namespace {
// The path the latest CUDA LSTM/GRU layer call (forward or backward) took ("persistent", "per-step", or "none"
// before any), why, and how many forward and backward layers the persistent kernels have run since loading.
std::tuple<std::string, std::string, int64_t, int64_t> rnn_cuda_path() {
  const std::lock_guard<std::mutex> lock(record_mutex);
  return {last_record.path, last_record.reason, persistent_layers, persistent_backward_layers};
}
}  // namespace

}  // namespace cuda
}  // namespace genfast

TORCH_LIBRARY_FRAGMENT(genfast, m) {
  // Debug query, no tensors: which path the latest CUDA LSTM/GRU layer took, why, and how many layers the
  // persistent kernel has run (genfast.info(), the benchmark's `persistent` provider, the CUDA tests).
  m.def("rnn_cuda_path() -> (str path, str reason, int persistent_layers, int persistent_backward_layers)",
        &genfast::cuda::rnn_cuda_path);
}
