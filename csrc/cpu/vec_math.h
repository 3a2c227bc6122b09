// Branch-free float32 math that GCC auto-vectorizes, cloned per ISA with an ifunc so one
// build runs everywhere and uses AVX2/AVX-512 where present. glibc's scalar expf costs
// ~9 ns per element on these machines (measured); this loop runs at ~0.5 ns.
#pragma once
#include <cstdint>
#include <cstring>

#include <algorithm>

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#define MOE_VEC_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define MOE_VEC_CLONES
#endif

namespace moe_kernels {

// What exp_branchless gives for x in (88.38, 88.72], where n below is 128 and 2^n not a
// float: exp(x) (up to FLT_MAX: silu(-x) * up can be of any size), or inf, 3 operations
// fewer, for gating: its sigmoid 1 / (1 + exp(-x)) is below FLT_MIN there (0 instead of a
// subnormal score, which ranks apart only from another such score; backends' scores
// differ by an ulp anyway, docs/gating.md), and its softmax takes x <= 0. Gating T=4096,
// E=256 on one thread took 4.5% longer with the exact top.
enum class ExpTop { exact, inf };

// exp(x), within 2 ulp of the exact value for x in [-87.3, 88.7] (but see ExpTop):
// exp(+-inf) = inf / 0, results below FLT_MIN flush to 0 (as CUDA's and Triton's exp do).
// Cephes' polynomial on x - n*ln2 with n = round(x / ln2) (rounded by the 1.5 * 2^23
// trick, which is exact without fast-math and needs no SSE4.1).
template <ExpTop kTop = ExpTop::exact>
inline float exp_branchless(float x) {
  // Written as flat min/max and single selects: GCC if-converts these (minps, blendvps)
  // for every ISA, whereas nested ternaries stayed branches outside AVX-512.
  constexpr float kLo = -87.33654f, kHi = 88.72283f;
  const float xc = std::min(std::max(x, kLo), kHi);
  const float n = (xc * 1.44269504088896341f + 12582912.0f) - 12582912.0f;
  const float r = (xc - n * 0.693359375f) - n * -2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  const int32_t ni = static_cast<int32_t>(n);
  const int32_t top = kTop == ExpTop::exact && ni > 127 ? 1 : 0;   // 2^127, doubled
  const int32_t bits = (ni - top + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  float y = p * scale;
  if constexpr (kTop == ExpTop::exact) y = top ? y * 2.0f : y;
  y = x < kLo ? 0.0f : y;
  y = x > kHi ? __builtin_inff() : y;
  return y;
}

// Equal inputs must give equal outputs wherever they sit in a row (the gating tie rule
// compares scores). An auto-vectorized loop over n elements computes its last n % width in
// an epilogue that GCC compiles apart, and rounded differently (E = 9, softmax: expert 8
// scored an ulp above experts 1-7, which had the same logit). So every element goes through
// one out-of-line function of whole 16-wide blocks, the row's tail copied into a padded
// block: the same instructions for every element (with -fno-trapping-math each clone's
// block is vector code only, no scalar op).
constexpr int64_t kVecBlock = 16;

template <typename Blocks>
inline void in_blocks(float* s, int64_t n, Blocks blocks) {
  const int64_t full = n / kVecBlock, done = full * kVecBlock;
  if (full > 0) blocks(s, full);
  if (done < n) {
    float block[kVecBlock] = {};
    std::copy(s + done, s + n, block);
    blocks(block, 1);
    std::copy(block, block + (n - done), s + done);
  }
}

MOE_VEC_CLONES __attribute__((noinline)) inline void sigmoid_blocks(float* s, int64_t blocks) {
  for (int64_t b = 0; b < blocks; ++b, s += kVecBlock)
    for (int64_t j = 0; j < kVecBlock; ++j)
      s[j] = 1.0f / (1.0f + exp_branchless<ExpTop::inf>(-s[j]));
}

MOE_VEC_CLONES __attribute__((noinline)) inline void exp_shifted_blocks(float* s, int64_t blocks,
                                                                        float m) {
  for (int64_t b = 0; b < blocks; ++b, s += kVecBlock)
    for (int64_t j = 0; j < kVecBlock; ++j)
      s[j] = exp_branchless<ExpTop::inf>(s[j] == m ? 0.0f : s[j] - m);
}

// s[i] = 1 / (1 + exp(-s[i]))
inline void sigmoid_inplace(float* s, int64_t n) { in_blocks(s, n, sigmoid_blocks); }

// s[i] = exp(s[i] == m ? 0 : s[i] - m) (limit rule of reference.scores)
inline void exp_shifted_inplace(float* s, int64_t n, float m) {
  in_blocks(s, n, [m](float* p, int64_t blocks) { exp_shifted_blocks(p, blocks, m); });
}

// Sum in 16 interleaved partial sums (a fixed order, so deterministic): a single running
// sum cannot be vectorized without fast-math's reassociation.
MOE_VEC_CLONES inline float sum_lanes(const float* s, int64_t n) {
  float part[16] = {};
  int64_t i = 0;
  for (; i + 16 <= n; i += 16)
    for (int j = 0; j < 16; ++j) part[j] += s[i + j];
  float total = 0.0f;
  for (int j = 0; j < 16; ++j) total += part[j];
  for (; i < n; ++i) total += s[i];
  return total;
}

}  // namespace moe_kernels
