// Torch-side helpers of the FP8 ops shared by the CPU kernels: c10 conversions, row
// dequantization, and the checks of FP8 operands and scales (reported, csrc/checks.h).
// The e4m3 numerics themselves are framework-free: common/fp8_math.h.
#pragma once
#include <ATen/ATen.h>

#include <algorithm>
#include <cstdint>

#include "checks.h"
#include "common/fp8_math.h"
#include "cpu/simd.h"

namespace moe_kernels {

inline c10::Float8_e4m3fn to_fp8(float x) {
  return c10::Float8_e4m3fn(fp8_bits(x), c10::Float8_e4m3fn::from_bits());
}

// dst[k] = fp8 src[k] * scales[(k / block) * scale_stride] for k < n, one scale block at
// a time (no division per element).
template <typename out_t>
inline void dequant_row(const c10::Float8_e4m3fn* src, const float* scales,
                        int64_t scale_stride, int64_t n, int64_t block, out_t* dst) {
  const uint8_t* bits = reinterpret_cast<const uint8_t*>(src);
  for (int64_t k0 = 0; k0 < n; k0 += block) {
    const float s = scales[(k0 / block) * scale_stride];
    const int64_t k1 = std::min(n, k0 + block);
    for (int64_t k = k0; k < k1; ++k) dst[k] = static_cast<out_t>(fp8_value(bits[k]) * s);
  }
}

// The vector kernels' name (csrc/cpu/simd.h) of a float dtype; `name` is the tensor's.
// The entry points' checks admit only these dtypes here (simd_dtype), so this never throws
// on arguments a check passed.
inline SrcType simd_type(at::ScalarType t, const char* name) {
  switch (t) {
    case at::kFloat: return SrcType::f32;
    case at::kBFloat16: return SrcType::bf16;
    case at::kHalf: return SrcType::f16;
    default: TORCH_CHECK_TYPE(false, name, " must be float32, bfloat16 or float16, got ", t);
  }
}

inline Report check_fp8(const at::Tensor& t, const char* name, int64_t dim) {
  MK_CHECK_TYPE(t.scalar_type() == at::kFloat8_e4m3fn, name, " must be float8_e4m3fn, got ",
                t.scalar_type());
  MK_CHECK_VALUE(t.dim() == dim, name, " must be ", dim, "-D, got ", t.dim(), "-D");
  return {};
}

inline Report check_scales(const at::Tensor& s, const char* name, at::IntArrayRef shape) {
  MK_CHECK_TYPE(s.scalar_type() == at::kFloat, name, " must be float32, got ", s.scalar_type());
  MK_CHECK_VALUE(s.sizes() == shape, name, " must have shape ", shape, ", got ", s.sizes());
  return {};
}

}  // namespace moe_kernels
