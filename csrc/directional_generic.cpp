// generic variant of the directional-op tasks (see directional_kernel.hpp and lse_generic.cpp).
#define ECIF_ISA_NS generic
#define ECIF_VEC_BYTES 16

#include "directional_kernel.hpp"
