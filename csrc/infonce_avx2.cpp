// avx2 variant of the fused InfoNCE pass-2 task (see infonce_kernel.hpp and lse_avx2.cpp).
#define ECIF_ISA_NS avx2
#define ECIF_VEC_BYTES 32

#include "infonce_kernel.hpp"
