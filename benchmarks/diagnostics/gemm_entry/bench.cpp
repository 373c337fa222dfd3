// Standalone timing of the GEMM candidates for genfast's non-fused products (not part of the package).
#include <torch/extension.h>
#include <ATen/native/CPUBlas.h>
#include <ATen/Parallel.h>
#include "cpu/gemm.cpp"

using namespace genfast::cpu;

// C = A @ B with genfast's packed kernel. A may be transposed (stride(0)==1).
void packed(at::Tensor C, at::Tensor A, at::Tensor B, bool b_in_place, int64_t k_block, bool pack_a) {
  AT_DISPATCH_FLOATING_TYPES(A.scalar_type(), "packed", [&] {
    at::Tensor a = A;
    if (pack_a && a.stride(1) != 1) a = a.contiguous();
    const int64_t M = a.size(0), K = a.size(1), N = B.size(1);
    if (a.stride(1) == 1)
      matmul_panels<scalar_t, false>(M, N, K, a.data_ptr<scalar_t>(), a.stride(0), B.data_ptr<scalar_t>(), B.stride(0),
                                     B.stride(1), nullptr, C.data_ptr<scalar_t>(), C.stride(0), false, b_in_place, k_block);
    else
      matmul_panels<scalar_t, true>(M, N, K, a.data_ptr<scalar_t>(), a.stride(1), B.data_ptr<scalar_t>(), B.stride(0),
                                    B.stride(1), nullptr, C.data_ptr<scalar_t>(), C.stride(0), false, b_in_place, k_block);
  });
}

void aten_mm(at::Tensor C, at::Tensor A, at::Tensor B) { at::mm_out(C, A, B); }

// oneDNN brgemm micro-kernel (float only), row-major A (M x K), B (K x N) contiguous; A / B copied
// to that layout first if needed. Tiles (rb x nb) over threads, K in chunks of kb.
void brgemm(at::Tensor C, at::Tensor A, at::Tensor B, int64_t rb, int64_t nb, int64_t kb) {
  at::Tensor a = A.stride(1) == 1 ? A : A.contiguous();
  at::Tensor b = B.stride(1) == 1 ? B : B.contiguous();
  const int64_t M = a.size(0), K = a.size(1), N = b.size(1);
  const float* ap = a.data_ptr<float>();
  const float* bp = b.data_ptr<float>();
  float* cp = C.data_ptr<float>();
  const int64_t lda = a.stride(0), ldb = b.stride(0), ldc = C.stride(0);
  const int64_t mb = (M + rb - 1) / rb, nbl = (N + nb - 1) / nb;
  at::parallel_for(0, mb * nbl, 1, [&](int64_t begin, int64_t end) {
    for (int64_t it = begin; it < end; ++it) {
      const int64_t r0 = (it / nbl) * rb, c0 = (it % nbl) * nb;
      const int64_t rows = std::min(rb, M - r0), cols = std::min(nb, N - c0);
      for (int64_t k0 = 0; k0 < K; k0 += kb) {
        const int64_t kn = std::min(kb, K - k0);
        at::native::cpublas::brgemm(rows, cols, kn, lda, ldb, ldc, k0 > 0, ap + r0 * lda + k0, bp + k0 * ldb + c0,
                                    cp + r0 * ldc + c0);
      }
    }
    at::native::cpublas::brgemm_release(false);
  });
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("packed", &packed);
  m.def("aten_mm", &aten_mm);
  m.def("brgemm", &brgemm);
  m.def("simd", &simd_level_name);
}
