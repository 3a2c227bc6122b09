// simd_kernels.inc built for AVX2 with FMA and F16C (simd.h), for CPUs without AVX-512.
// Every header comes before the target pragma, so that no inline function they define is
// compiled with AVX2 instructions.
#include <immintrin.h>

#include "../common/fp8_math.h"
#include "simd.h"

#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")
#define MOE_SIMD_NS simd_avx2
#define MOE_SIMD_LANES 8
#include "simd_kernels.inc"
#pragma GCC pop_options

namespace moe_kernels::simd_avx2 {
bool supported() {
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
         __builtin_cpu_supports("f16c");
}
}  // namespace moe_kernels::simd_avx2
