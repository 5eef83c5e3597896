// avx2 variant of the directional-op tasks (see directional_kernel.hpp and lse_avx2.cpp).
#define ECIF_ISA_NS avx2
#define ECIF_VEC_BYTES 32

#include "directional_kernel.hpp"
