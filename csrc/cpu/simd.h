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
#define GENFAST_TARGET_AVX512 __attribute__((target("avx512f,avx512vl,avx512bw,avx512dq,avx2,fma")))
#else
#define GENFAST_X86 0
#define GENFAST_TARGET_AVX2
#define GENFAST_TARGET_AVX512
#endif
