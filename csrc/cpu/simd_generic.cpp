// simd_kernels.inc built for the x86-64 baseline (simd.h): the portable fallback.
#include <immintrin.h>

#include "../common/fp8_math.h"
#include "simd.h"

#define MOE_SIMD_NS simd_generic
#define MOE_SIMD_LANES 4
#include "simd_kernels.inc"
