// Torch-side helpers of the FP8 ops shared by the CPU kernels: the e4m3 constants, the
// scale rule, and the checks that keep direct torch.ops calls from reading out of bounds.
#pragma once
#include <torch/extension.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>

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

// Clamp (inf -> +-448), then round to nearest even; NaN stays NaN (0x7F). Branch-free
// bit arithmetic (the algorithm of moe_kernels/triton/numerics.py): c10's converter made
// the CPU quantization ~4x slower.
inline c10::Float8_e4m3fn to_fp8(float x) {
  const float c = std::min(std::max(x, -kFp8Max), kFp8Max);
  const float a = std::abs(c);
  uint32_t bits;
  std::memcpy(&bits, &a, sizeof bits);
  const int32_t exp = static_cast<int32_t>(bits >> 23) - 127;
  const uint32_t top = (bits >> 20) & 7u, rest = bits & 0xFFFFFu;
  const uint32_t up = (rest > 0x80000u) | ((rest == 0x80000u) & (top & 1u));
  const uint32_t normal = (static_cast<uint32_t>(exp + 7) << 3) + top + up;
  const uint32_t subnormal = static_cast<uint32_t>(std::nearbyint((a < 1.0f ? a : 0.0f) * 512.0f));
  uint32_t mag = exp >= -6 ? normal : subnormal;
  mag = std::isnan(x) ? 0x7Fu : mag;
  const uint8_t out = static_cast<uint8_t>(mag | (std::signbit(c) && !std::isnan(x) ? 0x80u : 0u));
  return c10::Float8_e4m3fn(out, c10::Float8_e4m3fn::from_bits());
}

// e4m3fn -> float32 through a 256-entry table (c10's converter is bit arithmetic per call).
struct Fp8Table {
  float value[256];
  Fp8Table() {
    for (int i = 0; i < 256; ++i)
      value[i] = static_cast<float>(c10::Float8_e4m3fn(static_cast<uint8_t>(i),
                                                       c10::Float8_e4m3fn::from_bits()));
  }
};

inline float from_fp8(c10::Float8_e4m3fn q) {
  static const Fp8Table table;
  return table.value[q.x];
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
