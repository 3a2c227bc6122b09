// FP8 e4m3 -> bf16 by table, 64 codes at once (AVX512-VBMI), for the builds on bf16
// products (amx, avx512bf16; both require VBMI): the bf16 bits of the 128 magnitudes
// (fp8_value: exact), their low and high bytes apart, looked up by vpermi2b, which reads
// the 7 low bits of each byte; the sign bit is or-ed into the high byte. 7 instructions per
// 64 codes where the bit rules (amx.cpp, fp8_to_bf16) take 12 per 32. Framework-free: the
// functions carry their own target attribute, so the header may come before any pragma.
#pragma once
#include <immintrin.h>

#include <cstdint>

#include "../common/fp8_math.h"

namespace moe_kernels {

struct Fp8Tables {
  alignas(64) uint8_t lo[128];
  alignas(64) uint8_t hi[128];
};

inline const Fp8Tables& fp8_tables() {
  static const Fp8Tables tables = [] {
    Fp8Tables t{};
    for (uint32_t v = 0; v < 128; ++v) {
      const uint32_t bits = __builtin_bit_cast(uint32_t, fp8_value(static_cast<uint8_t>(v))) >> 16;
      t.lo[v] = static_cast<uint8_t>(bits & 0xFFu);
      t.hi[v] = static_cast<uint8_t>(bits >> 8);
    }
    return t;
  }();
  return tables;
}

#define MOE_VBMI_TARGET \
  __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,avx512vbmi,fma,f16c")))

// The tables in registers: lo[0..63], lo[64..127], hi[0..63], hi[64..127]
struct Fp8TableRegs {
  __m512i t[4];
};

MOE_VBMI_TARGET inline Fp8TableRegs fp8_table_regs() {
  const Fp8Tables& tb = fp8_tables();
  return {{_mm512_load_si512(tb.lo), _mm512_load_si512(tb.lo + 64), _mm512_load_si512(tb.hi),
           _mm512_load_si512(tb.hi + 64)}};
}

// 64 fp8 bytes q (k = 0 .. 63 of a row) -> c0: k 0 .. 31, c1: k 32 .. 63 as bf16 bits
MOE_VBMI_TARGET inline void fp8x64_to_bf16(__m512i q, const Fp8TableRegs& r, __m512i& c0,
                                           __m512i& c1) {
  const __m512i lo = _mm512_permutex2var_epi8(r.t[0], q, r.t[1]);
  const __m512i hi = _mm512_ternarylogic_epi32(_mm512_permutex2var_epi8(r.t[2], q, r.t[3]), q,
                                               _mm512_set1_epi8(static_cast<char>(0x80)),
                                               0xF8);   // hi | (q & 0x80)
  // bytes interleave within 128-bit lanes: a holds k 16 L .. 16 L + 7 of lane L, b the
  // next 8; whole 64-bit pieces put them in order
  const __m512i a = _mm512_unpacklo_epi8(lo, hi), b = _mm512_unpackhi_epi8(lo, hi);
  c0 = _mm512_permutex2var_epi64(a, _mm512_setr_epi64(0, 1, 8, 9, 2, 3, 10, 11), b);
  c1 = _mm512_permutex2var_epi64(a, _mm512_setr_epi64(4, 5, 12, 13, 6, 7, 14, 15), b);
}

}  // namespace moe_kernels
