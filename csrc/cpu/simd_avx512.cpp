// simd_kernels.inc built for AVX-512 (simd.h). Every header comes before the target pragma,
// so that no inline function they define is compiled with AVX-512 instructions.
#include <immintrin.h>

#include "../common/fp8_math.h"
#include "simd.h"

#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,fma,f16c")
#define MOE_SIMD_NS simd_avx512
#define MOE_SIMD_LANES 16
#include "simd_kernels.inc"
#pragma GCC pop_options

namespace moe_kernels::simd_avx512 {
bool supported() {
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") &&
         __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
}
}  // namespace moe_kernels::simd_avx512
