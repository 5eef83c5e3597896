// AVX2 + FMA variant: CMake compiles this file alone with -mavx2 -mfma (x86-64 only); it is only
// called after a run-time CPU check (see lse.cpp), so the module still imports on older CPUs.
#define ECIF_ISA_NS avx2
#define ECIF_VEC_BYTES 32
#include "lse_kernel.hpp"
