// avx512 variant of the directional-op tasks (see directional_kernel.hpp and lse_avx512.cpp).
#define ECIF_ISA_NS avx512
#define ECIF_VEC_BYTES 64
#define ECIF_MR 12
#include "directional_kernel.hpp"
