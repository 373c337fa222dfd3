// Run-time choice of the SIMD level for the CPU kernels.
//
// The package is compiled for baseline x86-64. Hot functions are compiled again
// with GCC target attributes (GENFAST_TARGET_AVX2 / GENFAST_TARGET_AVX512) and the
// caller picks a copy with simd_level(), read once from CPUID. GENFAST_SIMD=avx2 or
// GENFAST_SIMD=baseline in the environment caps the level (tests use it to exercise
// every copy on one machine).
#pragma once
#include <string>

namespace genfast::cpu {

enum class SimdLevel { kBaseline = 0, kAVX2 = 1, kAVX512 = 2 };

SimdLevel simd_level();
std::string simd_level_name();

}  // namespace genfast::cpu

#if defined(__x86_64__) || defined(_M_X64)
#define GENFAST_X86 1
#define GENFAST_TARGET_AVX2 __attribute__((target("avx2,fma")))
#if defined(GENFAST_EMULATE_AVX512)
// Test build only (setup.py with GENFAST_EMULATE_AVX512=1; tests/test_simd_emulated_avx512.py):
// the AVX-512 copies keep their 64-byte vectors, 12-row tiles and __m512 code, but are
// compiled for AVX2 (GCC splits the wide vectors, SIMDe supplies the _mm512_* intrinsics),
// so a machine without AVX-512 runs the AVX-512 code paths' logic.
#define GENFAST_TARGET_AVX512 GENFAST_TARGET_AVX2
#define GENFAST_PRAGMA_TARGET_AVX512 _Pragma("GCC target(\"avx2,fma\")")
#else
#define GENFAST_TARGET_AVX512 __attribute__((target("avx512f,avx512vl,avx512bw,avx512dq,avx2,fma")))
#define GENFAST_PRAGMA_TARGET_AVX512 _Pragma("GCC target(\"avx512f,avx512vl,avx512bw,avx512dq,avx2,fma\")")
#endif
#else
#define GENFAST_X86 0
#define GENFAST_TARGET_AVX2
#define GENFAST_TARGET_AVX512
#define GENFAST_PRAGMA_TARGET_AVX512
#endif

namespace genfast::cpu {

// Runs Kernel::run(args...) compiled for the current SIMD level. Kernel::run must be
// an always_inline template so that each wrapper below gets its own vectorised copy
// of the loops inside it.
template <typename Kernel, typename... Args>
GENFAST_TARGET_AVX512 void run_avx512(Args... args) {
  Kernel::run(args...);
}
template <typename Kernel, typename... Args>
GENFAST_TARGET_AVX2 void run_avx2(Args... args) {
  Kernel::run(args...);
}
template <typename Kernel, typename... Args>
void run_baseline(Args... args) {
  Kernel::run(args...);
}

template <typename Kernel, typename... Args>
void simd_dispatch(Args... args) {
  switch (simd_level()) {
    case SimdLevel::kAVX512: return run_avx512<Kernel, Args...>(args...);
    case SimdLevel::kAVX2: return run_avx2<Kernel, Args...>(args...);
    default: return run_baseline<Kernel, Args...>(args...);
  }
}

}  // namespace genfast::cpu

#define GENFAST_INLINE inline __attribute__((always_inline))
