// The run-time SIMD level choice (csrc/cpu/simd.cpp), compiled again into genfast._probe for
// gemm_copy.cpp's micro-kernel dispatch.
#include "cpu/simd.cpp"
