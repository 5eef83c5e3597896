// AVX-512 (F/DQ/VL/BW) + FMA variant: CMake compiles this file alone with the matching -m flags
// (x86-64 only); it is only called after a run-time CPU check (see lse.cpp). 32 vector registers
// allow a 12 x 2-vector micro-tile.
#define ECIF_ISA_NS avx512
#define ECIF_VEC_BYTES 64
#define ECIF_MR 12
#include "lse_kernel.hpp"
