// simd_kernels.inc built for AVX-512 with AVX512-BF16 and AVX512-VBMI (simd.h): the avx512
// build's kernels plus the GEMM of many rows and the GEMV on bf16 dot products. Every header
// comes before the target pragma, so that no inline function they define is compiled with
// AVX-512 instructions, except those that carry their own target (fp8_bf16.h).
#include <immintrin.h>

#include "../common/fp8_math.h"
#include "fp8_bf16.h"
#include "simd.h"

#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,avx512vbmi,fma,f16c")
#define MOE_SIMD_NS simd_avx512bf16
#define MOE_SIMD_LANES 16
#define MOE_SIMD_BF16 1
#include "simd_kernels.inc"
#pragma GCC pop_options

namespace moe_kernels::simd_avx512bf16 {
bool supported() {
  __builtin_cpu_init();
  // VBMI: the FP8 weight decode by table (fp8_bf16.h) of gemv_pairs and
  // amx::pack_weights_vnni (every AVX512-BF16 CPU but Intel's Cooper Lake has it, which
  // takes the avx512 build)
  return simd_avx512::supported() && __builtin_cpu_supports("avx512bf16") &&
         __builtin_cpu_supports("avx512vbmi");
}
}  // namespace moe_kernels::simd_avx512bf16
