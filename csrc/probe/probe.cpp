// genfast._probe: a debug module for the benchmark's "% of peak", kept out of the production
// extension genfast._C. It times two CPU fp32 GEMM micro-kernels on an M x N x K product, split
// over threads as a blocked GEMM splits it:
//   packed_gemm_gflops   genfast's packed micro-kernel (gemm_panel, csrc/cpu/gemm.h), the one the
//                        RNN kernels use, on B packed once into 64-column panels;
//   brgemm_gflops        ATen's at::native::cpublas::brgemm (oneDNN's micro-kernel where torch has
//                        it, ATen's blocked gemm otherwise) on 64 x 64 tiles of C with B read in place.
// Each returns the best GFLOP/s over `repeats` timed runs after one warm-up run. torch.mm, the
// third yardstick, is timed from Python (genfast/bench/machine.py).
#include <ATen/Parallel.h>
#include <ATen/native/CPUBlas.h>
#include <torch/extension.h>

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <vector>

#include "cpu/gemm.h"
#include "cpu/simd.h"

namespace genfast::probe {
namespace {

void check_shape(int64_t M, int64_t N, int64_t K, int64_t repeats) {
  TORCH_CHECK(M > 0 && N > 0 && K > 0, "M, N and K must be positive, got ", M, ", ", N, ", ", K);
  TORCH_CHECK(repeats > 0, "repeats must be positive, got ", repeats);
}

std::vector<float> filled(int64_t n, int64_t multiplier, int64_t modulus) {
  std::vector<float> v(n);
  for (int64_t i = 0; i < n; ++i) v[i] = static_cast<float>((i * multiplier) % modulus) * 0.01f;
  return v;
}

// Best seconds of `repeats` calls of run(), after one warm-up call.
template <typename Run>
double best_seconds(Run&& run, int64_t repeats) {
  run();
  double best = 1e30;
  for (int64_t i = 0; i < repeats; ++i) {
    const auto start = std::chrono::steady_clock::now();
    run();
    best = std::min(best, std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count());
  }
  return best;
}

double gflops(int64_t M, int64_t N, int64_t K, double seconds) { return 2.0 * M * N * K / seconds / 1e9; }

}  // namespace

double packed_gemm_gflops(int64_t M, int64_t N, int64_t K, int64_t repeats) {
  check_shape(M, N, K, repeats);
  constexpr int64_t width = 64;
  const int64_t panels = (N + width - 1) / width;
  const std::vector<float> a = filled(M * K, 7919, 13), b = filled(K * N, 104729, 17);
  std::vector<float> packed(panels * K * width), c(M * panels * width);
  cpu::pack_panels<float>(b.data(), N, 1, K, panels, width,
                          [&](int64_t p, int64_t col) { return p * width + col < N ? p * width + col : -1; },
                          packed.data());
  auto run = [&] {
    at::parallel_for(0, panels, 1, [&](int64_t begin, int64_t end) {
      for (int64_t p = begin; p < end; ++p)
        cpu::gemm_panel<float>(M, K, a.data(), K, packed.data() + p * K * width, width, c.data() + p * width,
                               panels * width);
    });
  };
  return gflops(M, N, K, best_seconds(run, repeats));
}

double brgemm_gflops(int64_t M, int64_t N, int64_t K, int64_t repeats) {
  check_shape(M, N, K, repeats);
  constexpr int64_t tile = 64;
  const int64_t row_blocks = (M + tile - 1) / tile, col_blocks = (N + tile - 1) / tile;
  const std::vector<float> a = filled(M * K, 7919, 13), b = filled(K * N, 104729, 17);
  std::vector<float> c(M * N);
  auto run = [&] {
    at::parallel_for(0, row_blocks * col_blocks, 1, [&](int64_t begin, int64_t end) {
      for (int64_t item = begin; item < end; ++item) {
        const int64_t r0 = (item / col_blocks) * tile, c0 = (item % col_blocks) * tile;
        const int64_t rows = std::min(tile, M - r0), cols = std::min(tile, N - c0);
        at::native::cpublas::brgemm(rows, cols, K, K, N, N, /*add_C=*/false, a.data() + r0 * K, b.data() + c0,
                                    c.data() + r0 * N + c0, /*is_vnni=*/false);
      }
      at::native::cpublas::brgemm_release(/*is_vnni=*/false);
    });
  };
  return gflops(M, N, K, best_seconds(run, repeats));
}

void register_persistent_plan(pybind11::module_& m);  // csrc/probe/persistent_plan.cpp

}  // namespace genfast::probe

PYBIND11_MODULE(_probe, m) {
  m.doc() = "genfast's GEMM peak probe (debug module for genfast.bench; not used by the kernels)";
  m.def("packed_gemm_gflops", &genfast::probe::packed_gemm_gflops,
        "best GFLOP/s of genfast's packed micro-kernel (gemm_panel) on an M x N x K fp32 product",
        pybind11::arg("M"), pybind11::arg("N"), pybind11::arg("K"), pybind11::arg("repeats") = 5);
  m.def("brgemm_gflops", &genfast::probe::brgemm_gflops,
        "best GFLOP/s of ATen's cpublas::brgemm on an M x N x K fp32 product in 64 x 64 tiles",
        pybind11::arg("M"), pybind11::arg("N"), pybind11::arg("K"), pybind11::arg("repeats") = 5);
  m.def("simd_level", &genfast::cpu::simd_level_name, "SIMD level genfast's micro-kernel runs at here");
  genfast::probe::register_persistent_plan(m);
}
