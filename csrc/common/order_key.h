// Total order used by every selection in moe_kernels (see moe_kernels/reference/gating.py):
// larger value first, equal values by lower index, -0.0 == +0.0. NaN must be mapped to
// -inf by the caller. key = m * 2^32 - index with m the order-preserving int32 image of the
// float (moe_kernels/reference/gating.py explains the choice). Framework-free: included by
// C++ CPU code and by CUDA device code.
#pragma once
#include <cstdint>
#include <cstring>

#include "host_device.h"

namespace moe_kernels {

// Smaller than every key order_key returns: marks excluded candidates.
constexpr int64_t kExcludedKey = INT64_MIN;

MOE_HD int32_t float_bits(float v) {
#if defined(__CUDA_ARCH__)
  return __float_as_int(v);
#else
  int32_t bits;
  std::memcpy(&bits, &v, sizeof(bits));
  return bits;
#endif
}

// The order-preserving int32 image of v (-0.0 as +0.0; no NaN).
MOE_HD int32_t monotone_bits(float v) {
  const int32_t bits = float_bits(v == 0.0f ? 0.0f : v);
  return bits >= 0 ? bits : (bits ^ 0x7FFFFFFF);
}

MOE_HD int64_t order_key(float v, int64_t index) {
  return static_cast<int64_t>(monotone_bits(v)) * 4294967296LL - index;
}

// The same order as an unsigned 32-bit image, for hardware warp reductions of unsigned
// values: larger value, larger image. Never 0 (-inf maps to 0x007FFFFF), so 0 can mark an
// excluded candidate. No NaN (map it to -inf first).
MOE_HD uint32_t order_bits(float v) {
  return static_cast<uint32_t>(monotone_bits(v)) ^ 0x80000000u;
}

MOE_HD int32_t index_of_key(int64_t key) {
  return static_cast<int32_t>((-key) & 4294967295LL);
}

// The value order_key was given (-0.0 as +0.0); key must not be kExcludedKey.
MOE_HD float value_of_key(int64_t key) {
  // key = m * 2^32 - index with index in [0, 2^32): m = ceil(key / 2^32)
  const int32_t monotone = static_cast<int32_t>((key + 4294967295LL) >> 32);
  const int32_t bits = monotone >= 0 ? monotone : (monotone ^ 0x7FFFFFFF);
#if defined(__CUDA_ARCH__)
  return __int_as_float(bits);
#else
  float v;
  std::memcpy(&v, &bits, sizeof(v));
  return v;
#endif
}

MOE_HD float nan_to_neg_inf(float v) { return v != v ? -__builtin_inff() : v; }

// Group score of n selection scores (NaN already mapped to -inf): the sum of the two
// largest (top2) or the largest. Selects, no branches: random scores mispredict a
// compare-and-branch top-2 about half the time on the CPU.
MOE_HD float group_score(const float* b, int64_t n, bool top2) {
  float first = -__builtin_inff(), second = -__builtin_inff();
  for (int64_t j = 0; j < n; ++j) {
    const float v = b[j];
    const float low = v < first ? v : first;
    second = second < low ? low : second;
    first = first < v ? v : first;
  }
  return nan_to_neg_inf(top2 ? first + second : first);
}

}  // namespace moe_kernels
