// genfast's packed GEMM (csrc/cpu/gemm.cpp), compiled again into genfast._probe so that the probe
// times the same micro-kernel without linking against genfast._C. A separate translation unit
// under csrc/probe/ keeps its object file apart from _C's.
#include "cpu/gemm.cpp"
