// generic variant of the fused InfoNCE pass-2 task (see infonce_kernel.hpp and lse_generic.cpp).
#define ECIF_ISA_NS generic
#define ECIF_VEC_BYTES 16

#include "infonce_kernel.hpp"
