// Torch-side helpers of the FP8 ops shared by the CPU kernels: the e4m3 constants, the
// scale rule, and the checks that keep direct torch.ops calls from reading out of bounds.
#pragma once
#include <torch/extension.h>

#include <algorithm>
#include <cmath>

namespace moe_kernels {

constexpr float kFp8Max = 448.0f;
constexpr int64_t kScaleBlock = 128;  // the K (and N) block of every GEMM scale

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Dequantization scale of a group: max(amax, eps) / 448, for UE8M0 rounded up to a
// power of two (frexp: scale = m * 2^e, m in [0.5, 1), exact power when m == 0.5).
inline float group_scale(float amax, float eps, bool ue8m0) {
  float scale = std::max(amax, eps) / kFp8Max;
  if (ue8m0) {
    int e = 0;
    const float m = std::frexp(scale, &e);
    scale = std::ldexp(1.0f, m == 0.5f ? e - 1 : e);
  }
  return scale;
}

// |x| for finite x, else 0: inf and NaN do not set the scale (docs/fp8.md).
inline float finite_abs(float x) { return std::isfinite(x) ? std::abs(x) : 0.0f; }

// Clamp (inf -> +-448), then round to nearest even (c10's conversion); NaN stays NaN.
inline c10::Float8_e4m3fn to_fp8(float x) {
  return c10::Float8_e4m3fn(std::min(std::max(x, -kFp8Max), kFp8Max));
}

inline void check_fp8(const at::Tensor& t, const char* name, int64_t dim) {
  TORCH_CHECK_TYPE(t.scalar_type() == at::kFloat8_e4m3fn, name, " must be float8_e4m3fn");
  TORCH_CHECK_VALUE(t.dim() == dim, name, " must be ", dim, "-D");
}

inline void check_scales(const at::Tensor& s, const char* name, at::IntArrayRef shape) {
  TORCH_CHECK_TYPE(s.scalar_type() == at::kFloat, name, " must be float32");
  TORCH_CHECK_VALUE(s.sizes() == shape, name, " must have shape ", shape, ", got ", s.sizes());
}

}  // namespace moe_kernels
