#include "cpu/simd.h"

#include <cstdlib>
#include <cstring>

namespace genfast::cpu {

namespace {

SimdLevel detect() {
  SimdLevel level = SimdLevel::kBaseline;
#if GENFAST_X86
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) level = SimdLevel::kAVX2;
#if defined(GENFAST_EMULATE_AVX512)
  if (level == SimdLevel::kAVX2) level = SimdLevel::kAVX512;  // its copies need AVX2 only (simd.h)
#else
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl") &&
      __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512dq"))
    level = SimdLevel::kAVX512;
#endif
#endif
  if (const char* cap = std::getenv("GENFAST_SIMD")) {
    SimdLevel limit = level;
    if (!std::strcmp(cap, "baseline")) limit = SimdLevel::kBaseline;
    else if (!std::strcmp(cap, "avx2")) limit = SimdLevel::kAVX2;
    else if (!std::strcmp(cap, "avx512")) limit = SimdLevel::kAVX512;
    if (limit < level) level = limit;
  }
  return level;
}

}  // namespace

SimdLevel simd_level() {
  static const SimdLevel level = detect();
  return level;
}

std::string simd_level_name() {
  switch (simd_level()) {
#if defined(GENFAST_EMULATE_AVX512)
    case SimdLevel::kAVX512: return "avx512-emulated";
#else
    case SimdLevel::kAVX512: return "avx512";
#endif
    case SimdLevel::kAVX2: return "avx2";
    default: return "baseline";
  }
}

}  // namespace genfast::cpu
