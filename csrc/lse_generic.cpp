// Baseline variant: compiled with the default flags of the target (SSE2 on x86-64), runs anywhere.
#define ECIF_ISA_NS generic
#define ECIF_VEC_BYTES 16
#include "lse_kernel.hpp"
