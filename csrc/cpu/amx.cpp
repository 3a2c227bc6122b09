// AMX bf16 tiles for the CPU GEMMs (amx.h). Every header comes before the target pragma
// (simd_avx512.cpp says why). The tile instructions are written as inline assembly with a
// memory clobber: GCC's own tile macros declare no memory access, so it could move the
// packing stores past a tile load or the reads of a tile store before it.
#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <cpuid.h>

#include "amx.h"
#include "fp8_bf16.h"

namespace moe_kernels::amx {

bool supported() {
  static const bool ok = [] {
    unsigned a, b, c, d;
    if (!__get_cpuid_count(7, 0, &a, &b, &c, &d)) return false;
    // AVX512-VBMI (leaf 7.0 ecx bit 1): the FP8 weight decode of pack_weights_vnni
    const bool tile = (d >> 24) & 1u, bf16 = (d >> 22) & 1u, vbmi = (c >> 1) & 1u;
    if (!tile || !bf16 || !vbmi || !simd_avx512::supported()) return false;
    // AVX512-BF16 (leaf 7.1 eax bit 5; every AMX-BF16 CPU so far has it) converts the outputs
    if (!__get_cpuid_count(7, 1, &a, &b, &c, &d) || !((a >> 5) & 1u)) return false;
    // Linux keeps tile data off until a process asks (ARCH_REQ_XCOMP_PERM, XTILEDATA = 18)
    constexpr long kReqXcompPerm = 0x1023, kXfeatureXtiledata = 18;
    return syscall(SYS_arch_prctl, kReqXcompPerm, kXfeatureXtiledata) == 0;
  }();
  return ok;
}

}  // namespace moe_kernels::amx

#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,fma,f16c")
// GCC 12 warns of the undefined source operand inside its own AVX-512 shuffle intrinsics
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"

namespace moe_kernels::amx {
namespace {

#define MOE_TILE_LOAD(t, p) \
  asm volatile("tileloadd (%0,%1,1), %%tmm" #t ::"r"(p), "r"(int64_t{64}) : "memory")
#define MOE_TILE_STORE(t, p) \
  asm volatile("tilestored %%tmm" #t ", (%0,%1,1)" ::"r"(p), "r"(int64_t{64}) : "memory")
#define MOE_TILE_ZERO(t) asm volatile("tilezero %%tmm" #t ::)
// tmm c += tmm a (16 x 32 bf16) . tmm b (VNNI 16 x 16 pairs)
#define MOE_TILE_DP(c, a, b) asm volatile("tdpbf16ps %%tmm" #b ", %%tmm" #a ", %%tmm" #c ::)

// Tiles 0-3: results (C^T of weight tile i / 2 and token tile i % 2); 4, 5: weight tiles;
// 6, 7: token tiles. All 16 rows of 64 bytes.
struct alignas(64) TileConfig {
  uint8_t palette = 1, start_row = 0, reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

struct TileScope {
  TileScope() {
    TileConfig cfg;
    for (int t = 0; t < 8; ++t) {
      cfg.colsb[t] = 64;
      cfg.rows[t] = 16;
    }
    asm volatile("ldtilecfg %0" ::"m"(cfg));
  }
  ~TileScope() { asm volatile("tilerelease" ::: "memory"); }
};

// 32 fp8 e4m3 bytes -> 32 bf16 (exact): normal codes move their exponent and mantissa bits
// (exponent bias 7 -> 127), the 8 subnormal magnitudes come from a table, NaN -> 0x7FC0.
inline __m512i fp8_to_bf16(__m256i bytes) {
  const __m512i x = _mm512_cvtepu8_epi16(bytes);
  const __m512i em = _mm512_and_si512(x, _mm512_set1_epi16(0x7F));
  const __m512i sign = _mm512_slli_epi16(_mm512_and_si512(x, _mm512_set1_epi16(0x80)), 8);
  const __m512i normal = _mm512_add_epi16(_mm512_slli_epi16(em, 4), _mm512_set1_epi16(0x3C00));
  // m * 2^-9 for m = 0..7
  const __m512i table = _mm512_set_epi16(0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
                                         0, 0, 0, 0, 0, 0, 0x3C60, 0x3C40, 0x3C20, 0x3C00,
                                         0x3BC0, 0x3B80, 0x3B00, 0);
  const __m512i sub = _mm512_permutexvar_epi16(em, table);
  __m512i mag = _mm512_mask_blend_epi16(_mm512_cmplt_epu16_mask(em, _mm512_set1_epi16(8)), normal, sub);
  mag = _mm512_mask_blend_epi16(_mm512_cmpeq_epi16_mask(em, _mm512_set1_epi16(0x7F)), mag,
                                _mm512_set1_epi16(0x7FC0));
  return _mm512_or_si512(mag, sign);
}

// 32 values of k from k0 (fewer at the end of K, zeros after) as bf16
inline __m512i load_chunk(const void* row, Src type, int64_t k0, int64_t K) {
  const int64_t n = K - k0 < kChunk ? K - k0 : kChunk;
  const __mmask32 m = n == kChunk ? ~__mmask32{0} : (__mmask32{1} << n) - 1;
  if (type == Src::fp8)
    return fp8_to_bf16(_mm256_maskz_loadu_epi8(m, static_cast<const uint8_t*>(row) + k0));
  return _mm512_maskz_loadu_epi16(m, static_cast<const uint16_t*>(row) + k0);
}

// r[i][j] -> r[j][i] for 16 x 16 32-bit values: pairs of rows interleaved by 32 and 64
// bits give 4 x 4 blocks transposed within each 128-bit lane, which two rounds of lane
// shuffles put in place.
inline void transpose16(__m512i r[16]) {
  __m512i t[16], u[16];
  for (int i = 0; i < 8; ++i) {
    t[2 * i] = _mm512_unpacklo_epi32(r[2 * i], r[2 * i + 1]);
    t[2 * i + 1] = _mm512_unpackhi_epi32(r[2 * i], r[2 * i + 1]);
  }
  for (int i = 0; i < 4; ++i) {  // u[4 i + j], lane L: column 4 L + j of rows 4 i .. 4 i + 3
    u[4 * i] = _mm512_unpacklo_epi64(t[4 * i], t[4 * i + 2]);
    u[4 * i + 1] = _mm512_unpackhi_epi64(t[4 * i], t[4 * i + 2]);
    u[4 * i + 2] = _mm512_unpacklo_epi64(t[4 * i + 1], t[4 * i + 3]);
    u[4 * i + 3] = _mm512_unpackhi_epi64(t[4 * i + 1], t[4 * i + 3]);
  }
  for (int j = 0; j < 4; ++j) {
    const __m512i v0 = _mm512_shuffle_i32x4(u[j], u[4 + j], 0x88);
    const __m512i v1 = _mm512_shuffle_i32x4(u[j], u[4 + j], 0xDD);
    const __m512i w0 = _mm512_shuffle_i32x4(u[8 + j], u[12 + j], 0x88);
    const __m512i w1 = _mm512_shuffle_i32x4(u[8 + j], u[12 + j], 0xDD);
    r[j] = _mm512_shuffle_i32x4(v0, w0, 0x88);
    r[8 + j] = _mm512_shuffle_i32x4(v0, w0, 0xDD);
    r[4 + j] = _mm512_shuffle_i32x4(v1, w1, 0x88);
    r[12 + j] = _mm512_shuffle_i32x4(v1, w1, 0xDD);
  }
}

// The result tiles' products of chunks [c0, c1): weight tiles w0, w1, token tiles b0 and,
// with kTwo, b1 (chunks kTileElems apart); result tiles 0 and 2, and 1 and 3 with kTwo.
// Tiles are not renamed, so a load waits for the last product reading its register: each
// next-chunk load is issued right after that product (4% faster than loading a chunk's
// four tiles before its products, MLA shape; loading the token tiles with the T1 hint was
// 30% slower).
template <bool kTwo>
inline void products(const uint16_t* w0, const uint16_t* w1, const uint16_t* b0,
                     const uint16_t* b1, int64_t c0, int64_t c1) {
  int64_t o = c0 * kTileElems;
  MOE_TILE_LOAD(4, w0 + o);
  MOE_TILE_LOAD(6, b0 + o);
  if (kTwo) MOE_TILE_LOAD(7, b1 + o);
  MOE_TILE_LOAD(5, w1 + o);
  for (int64_t c = c0; c < c1; ++c) {
    const bool next = c + 1 < c1;
    o += kTileElems;
    MOE_TILE_DP(0, 4, 6);
    if (kTwo) MOE_TILE_DP(1, 4, 7);
    if (next) MOE_TILE_LOAD(4, w0 + o);
    MOE_TILE_DP(2, 5, 6);
    if (next) MOE_TILE_LOAD(6, b0 + o);
    if (kTwo) MOE_TILE_DP(3, 5, 7);
    if (next) {
      MOE_TILE_LOAD(5, w1 + o);
      if (kTwo) MOE_TILE_LOAD(7, b1 + o);
    }
  }
}

inline void zero_results() {
  MOE_TILE_ZERO(0);
  MOE_TILE_ZERO(1);
  MOE_TILE_ZERO(2);
  MOE_TILE_ZERO(3);
}

// Result tile i to buf[i] (16 x 16 float32); tiles 1 and 3 only with two token tiles
inline void store_results(float (*buf)[256], bool two) {
  MOE_TILE_STORE(0, buf[0]);
  MOE_TILE_STORE(2, buf[2]);
  if (two) {
    MOE_TILE_STORE(1, buf[1]);
    MOE_TILE_STORE(3, buf[3]);
  }
}

}  // namespace

void pack_weights(const void* w, Src type, int64_t ldw, int64_t n, int64_t K, uint16_t* dst) {
  const int64_t C = chunks(K), elem = type == Src::fp8 ? 1 : 2;
  for (int64_t row = 0; row < (n + kBlockRows - 1) / kBlockRows * kBlockRows; ++row) {
    const int64_t b = row / kBlockRows, t = row % kBlockRows / kTileRows, r = row % kTileRows;
    uint16_t* out = dst + b * block_elems(K) + t * C * kTileElems + r * kChunk;
    const char* src = static_cast<const char*>(w) + row * ldw * elem;
    for (int64_t c = 0; c < C; ++c) {
      const __m512i v = row < n ? load_chunk(src, type, c * kChunk, K) : _mm512_setzero_si512();
      _mm512_storeu_si512(out + c * kTileElems, v);
    }
  }
}

void pack_tokens(const void* x, Src type, const int64_t* offsets, int64_t m, int64_t K,
                 uint16_t* dst) {
  const int64_t C = chunks(K), elem = type == Src::fp8 ? 1 : 2;
  for (int64_t j = 0; j * kTileRows < m; ++j) {
    for (int64_t c = 0; c < C; ++c) {
      __m512i r[16];
      for (int64_t i = 0; i < kTileRows; ++i) {
        const int64_t tok = j * kTileRows + i;
        const int64_t off = tok < m ? offsets[tok] : -1;
        r[i] = off < 0 ? _mm512_setzero_si512()
                       : load_chunk(static_cast<const char*>(x) + off * elem, type, c * kChunk, K);
      }
      transpose16(r);   // row p: the pair (2 p, 2 p + 1) of each token
      uint16_t* out = dst + (j * C + c) * kTileElems;
      for (int p = 0; p < 16; ++p) _mm512_storeu_si512(out + p * kChunk, r[p]);
    }
  }
}

namespace {

// 16 floats as type (bf16 and f16 rounded to nearest even, bf16 NaN -> 0x7FC0 as c10)
inline __m256i to_half(__m512 v, SrcType type) {
  if (type == SrcType::f16) return _mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m512i bits = _mm512_castps_si512(v);
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
  __m512i r = _mm512_srli_epi32(
      _mm512_add_epi32(bits, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7FFF))), 16);
  r = _mm512_mask_blend_epi32(_mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q), r, _mm512_set1_epi32(0x7FC0));
  return _mm512_cvtepi32_epi16(r);
}

// 32 floats as bf16, as to_half rounds them: one vcvtne2ps2bf16, whose NaNs are made c10's
// 0x7FC0 and whose inputs below bf16's normal range (the instruction flushes them to zero)
// are redone exactly. One instruction per 32 values where to_half takes seven per 16: with
// to_half, the stores were 13% of the MLA call's samples (perf; T = 256, H = 16).
inline __m512i to_bf16_pair(__m512 lo, __m512 hi) {
  const __mmask16 tiny = _mm512_fpclass_ps_mask(lo, 0x20) | _mm512_fpclass_ps_mask(hi, 0x20);
  if (tiny != 0)   // denormal inputs: rare
    return _mm512_inserti64x4(_mm512_castsi256_si512(to_half(lo, SrcType::bf16)),
                              to_half(hi, SrcType::bf16), 1);
  // bit cast: __m512bh is a vector of short before GCC 13 and of __bf16 from it
  const __m512i r = __builtin_bit_cast(__m512i, _mm512_cvtne2ps_pbh(hi, lo));
  const __mmask32 nan = static_cast<__mmask32>(_mm512_cmp_ps_mask(lo, lo, _CMP_UNORD_Q)) |
                        static_cast<__mmask32>(_mm512_cmp_ps_mask(hi, hi, _CMP_UNORD_Q)) << 16;
  return _mm512_mask_blend_epi16(nan, r, _mm512_set1_epi16(0x7FC0));
}

inline void store_one(const float* src, int64_t n, __m512 s, SrcType type, void* dst, bool stream) {
  const int64_t elem = type == SrcType::f32 ? 4 : 2, line = 64 / elem;
  int64_t k = 0;
  if (stream && reinterpret_cast<uintptr_t>(dst) % 64 == 0) {
    for (; k + line <= n; k += line) {   // whole cache lines, written without reading them
      char* out = static_cast<char*>(dst) + k * elem;
      if (type == SrcType::f32) {
        _mm512_stream_ps(reinterpret_cast<float*>(out), _mm512_mul_ps(_mm512_loadu_ps(src + k), s));
      } else {
        const __m512 lo = _mm512_mul_ps(_mm512_loadu_ps(src + k), s);
        const __m512 hi = _mm512_mul_ps(_mm512_loadu_ps(src + k + 16), s);
        _mm512_stream_si512(reinterpret_cast<__m512i*>(out),
                            type == SrcType::bf16
                                ? to_bf16_pair(lo, hi)
                                : _mm512_inserti64x4(_mm512_castsi256_si512(to_half(lo, type)),
                                                     to_half(hi, type), 1));
      }
    }
  }
  for (; k < n; k += 16) {
    const __mmask16 m = n - k >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << (n - k)) - 1);
    const __m512 v = _mm512_mul_ps(_mm512_maskz_loadu_ps(m, src + k), s);
    if (type == SrcType::f32)
      _mm512_mask_storeu_ps(static_cast<float*>(dst) + k, m, v);
    else
      _mm256_mask_storeu_epi16(static_cast<uint16_t*>(dst) + k, m, to_half(v, type));
  }
}

}  // namespace

void store_row(const float* src, int64_t n, float scale, SrcType type, void* dst, bool stream) {
  store_one(src, n, _mm512_set1_ps(scale), type, dst, stream);
}

void store_rows(const float* src, int64_t ld, int64_t rows, int64_t n, float scale,
                SrcType type, void* dst, int64_t dst_stride, bool stream) {
  const __m512 s = _mm512_set1_ps(scale);
  for (int64_t i = 0; i < rows; ++i)
    store_one(src + i * ld, n, s, type, static_cast<char*>(dst) + i * dst_stride, stream);
}

namespace {

constexpr int64_t kGroupBlocks = kGroupRows / kBlockRows;
// Token pairs swept per K block: their accumulators (kGroupBlocks x 8 x 4 KB) stay in L2.
constexpr int64_t kGroupPairs = 8;

// The products of one step: K block kb (chunks [c0, c1)) of token tiles j0 (and j0 + 1
// when two) against weight block wb, left in the result tiles.
struct Step {
  int64_t wb, j0, kb, c0, c1;
  bool two;
  float* acc;   // this (weight block, token pair)'s 4 x 256 accumulators
};

// acc (= at kb 0) += buf * scale, result tile i's scale being the weight scale times
// token tile j0 + i % 2's token scales (lanes are tokens)
inline void promote(const float (*buf)[256], const Gemm& g, const Step& st, int64_t KB) {
  const float ws = g.weight_scale != nullptr ? g.weight_scale[st.kb * g.weight_scale_stride] : 1.0f;
  for (int i = 0; i < 4; i += st.two ? 1 : 2) {
    const float* ts = g.token_scale != nullptr
                          ? g.token_scale + ((st.j0 + i % 2) * KB + st.kb) * kTileRows
                          : nullptr;
    const __m512 s = ts != nullptr ? _mm512_mul_ps(_mm512_loadu_ps(ts), _mm512_set1_ps(ws))
                                   : _mm512_set1_ps(ws);
    float* acc = st.acc + i * 256;
    for (int r = 0; r < 16; ++r) {
      const __m512 v = _mm512_load_ps(buf[i] + r * 16);
      _mm512_store_ps(acc + r * 16, st.kb == 0 ? _mm512_mul_ps(v, s)
                                               : _mm512_fmadd_ps(v, s, _mm512_load_ps(acc + r * 16)));
    }
  }
}

// acc tile i = C^T of weight tile i / 2 and token tile i % 2 -> block[token][weight row]
inline void hand_over(const Gemm& g, const Step& st, const Sink& sink) {
  alignas(64) float block[kBlockRows * kBlockRows];
  for (int i = 0; i < 4; i += st.two ? 1 : 2) {
    __m512i r[16];
    for (int q = 0; q < 16; ++q) r[q] = _mm512_castps_si512(_mm512_load_ps(st.acc + i * 256 + q * 16));
    transpose16(r);
    float* out = block + (i % 2) * kTileRows * kBlockRows + (i / 2) * kTileRows;
    for (int q = 0; q < 16; ++q) _mm512_storeu_ps(out + q * kBlockRows, _mm512_castsi512_ps(r[q]));
  }
  const int64_t m0 = st.j0 * kTileRows, c0 = st.wb * kBlockRows;
  sink.store(sink.ctx, block, m0, g.m - m0 < kBlockRows ? g.m - m0 : kBlockRows, c0,
             g.cols - c0 < kBlockRows ? g.cols - c0 : kBlockRows);
}

}  // namespace

// Loops: token groups of kGroupPairs pairs; K blocks kb; the group's pairs; the call's
// weight blocks. A pair's kb slice (8 KB) then serves every weight block from L1, and the
// weight blocks' slices (4 x 8 KB) every pair; each step's products are issued before the
// previous step's promotion (and hand-over after its last K block). The vector work does
// not overlap the tile products on the machine measured (Sapphire Rapids VM: a step of 16
// products from L1 took 360 ns, its 1,024-float promotion 113 ns, both 460 ns), so the
// promotion's cost adds to the products' (docs/mla.md).
void gemm(const Gemm& g, const Sink& sink) {
  TileScope tiles;
  const int64_t C = chunks(g.K), KB = (g.K + kScaleK - 1) / kScaleK, per_block = kScaleK / kChunk;
  const int64_t nb = (g.cols + kBlockRows - 1) / kBlockRows, pairs = (g.m + kBlockRows - 1) / kBlockRows;
  const int64_t bstride = block_elems(g.K);
  alignas(64) float buf[2][4][256];
  alignas(64) static thread_local float acc[kGroupBlocks * kGroupPairs][4 * 256];
  Step prev{};
  bool pending = false;
  int64_t s = 0;
  for (int64_t p0 = 0; p0 < pairs; p0 += kGroupPairs) {
    const int64_t np = pairs - p0 < kGroupPairs ? pairs - p0 : kGroupPairs;
    for (int64_t kb = 0; kb < KB; ++kb) {
      const int64_t c0 = kb * per_block, c1 = c0 + per_block < C ? c0 + per_block : C;
      for (int64_t p = p0; p < p0 + np; ++p) {
        const bool two = g.m - p * kBlockRows > kTileRows;
        const uint16_t* b0 = g.tokens + 2 * p * C * kTileElems;
        for (int64_t wb = 0; wb < nb; ++wb, ++s) {
          const uint16_t* w0 = g.weights + wb * bstride;
          const Step st{wb, 2 * p, kb, c0, c1, two, acc[(p - p0) * kGroupBlocks + wb]};
          zero_results();
          const uint16_t *w1 = w0 + C * kTileElems, *b1 = two ? b0 + C * kTileElems : b0;
          if (two) products<true>(w0, w1, b0, b1, c0, c1);
          else products<false>(w0, w1, b0, b1, c0, c1);
          if (pending) {
            promote(buf[(s - 1) & 1], g, prev, KB);
            if (prev.kb == KB - 1) hand_over(g, prev, sink);
          }
          store_results(buf[s & 1], two);
          prev = st;
          pending = true;
        }
      }
    }
  }
  if (pending) {
    promote(buf[(s - 1) & 1], g, prev, KB);
    hand_over(g, prev, sink);
  }
  stream_fence();
}

void pack_token_rows(const void* x, Src type, const int64_t* offsets, int64_t m, int64_t rows,
                     int64_t K, uint16_t* dst) {
  const int64_t C = chunks(K), elem = type == Src::fp8 ? 1 : 2;
  for (int64_t i = 0; i < rows; ++i) {
    const int64_t off = i < m ? offsets[i] : -1;
    const char* src = static_cast<const char*>(x) + off * elem;
    uint16_t* out = dst + (i / kTileRows) * C * kTileElems + (i % kTileRows) * kChunk;
    for (int64_t c = 0; c < C; ++c)
      _mm512_store_si512(out + c * kTileElems,
                         off < 0 ? _mm512_setzero_si512() : load_chunk(src, type, c * kChunk, K));
  }
}

namespace {

// pack_weights_vnni of fp8 rows, two chunks (64 bytes of each row) at a time, decoded by
// table (fp8_bf16.h; the packing went from 8.8% to 7.1% of the grouped GEMM's kernel
// samples, perf, N = 1024, K = 256, one Zen 4 core). The next 16-row tile's bytes are
// prefetched while this tile's are decoded: its rows lie ldw apart, a stride the hardware
// prefetchers do not follow across 16 rows (2.0-2.5% of the grouped GEMMs' time on one
// Zen 4 core). Into L2, not L1: the tile's packed output, twice its bytes, would evict
// them from L1 first (8 experts of 5 / 8 / 16 rows, N = 512, K = 1024, weights from DRAM,
// 2 Zen 4 threads, medians of 5 alternating runs: 384 / 523 / 652 -> 352 / 424 / 571 us).
MOE_VBMI_TARGET void pack_fp8_weights_vnni(const uint8_t* w, int64_t ldw, int64_t n,
                                           int64_t K, uint16_t* dst) {
  const int64_t C = chunks(K);
  const int64_t tiles = (n + kBlockRows - 1) / kBlockRows * (kBlockRows / kTileRows);
  const Fp8TableRegs t = fp8_table_regs();
  for (int64_t j = 0; j < tiles; ++j) {
    for (int64_t c = 0; c < C; c += 2) {
      const int64_t k0 = c * kChunk, nk = K - k0 < 2 * kChunk ? K - k0 : 2 * kChunk;
      const __mmask64 m = nk == 2 * kChunk ? ~__mmask64{0} : (__mmask64{1} << nk) - 1;
      for (int64_t q = (j + 1) * kTileRows; q < (j + 2) * kTileRows && q < n; ++q)
        _mm_prefetch(reinterpret_cast<const char*>(w + q * ldw + k0), _MM_HINT_T1);
      __m512i r0[16], r1[16];
      for (int64_t q = 0; q < kTileRows; ++q) {
        const int64_t row = j * kTileRows + q;
        if (row < n) {
          fp8x64_to_bf16(_mm512_maskz_loadu_epi8(m, w + row * ldw + k0), t, r0[q], r1[q]);
        } else {
          r0[q] = r1[q] = _mm512_setzero_si512();
        }
      }
      transpose16(r0);   // row p: the pair (2 p, 2 p + 1) of each weight row
      uint16_t* out = dst + (j * C + c) * kTileElems;
      for (int p = 0; p < 16; ++p) _mm512_storeu_si512(out + p * kChunk, r0[p]);
      if (c + 1 == C) continue;
      transpose16(r1);
      out += kTileElems;
      for (int p = 0; p < 16; ++p) _mm512_storeu_si512(out + p * kChunk, r1[p]);
    }
  }
}

}  // namespace

void pack_weights_vnni(const void* w, Src type, int64_t ldw, int64_t n, int64_t K,
                       uint16_t* dst) {
  if (type == Src::fp8)
    return pack_fp8_weights_vnni(static_cast<const uint8_t*>(w), ldw, n, K, dst);
  const int64_t C = chunks(K), elem = 2;
  const int64_t tiles = (n + kBlockRows - 1) / kBlockRows * (kBlockRows / kTileRows);
  for (int64_t j = 0; j < tiles; ++j) {
    for (int64_t c = 0; c < C; ++c) {
      __m512i r[16];
      for (int64_t q = 0; q < kTileRows; ++q) {
        const int64_t row = j * kTileRows + q;
        r[q] = row < n ? load_chunk(static_cast<const char*>(w) + row * ldw * elem, type,
                                    c * kChunk, K)
                       : _mm512_setzero_si512();
      }
      transpose16(r);   // row p: the pair (2 p, 2 p + 1) of each weight row
      uint16_t* out = dst + (j * C + c) * kTileElems;
      for (int p = 0; p < 16; ++p) _mm512_storeu_si512(out + p * kChunk, r[p]);
    }
  }
}

namespace {

// Result tile i = token tile i / 2 x weight tile i % 2, chunks [c0, c1). Each tile is
// loaded just before its first product (tiles are not renamed, so a load waits for the
// products reading its register; loading all four first was as fast or up to 2x slower in
// a microbenchmark, 8.5-8.9 vs 8.7-18 ns per product).
inline void row_products(const uint16_t* a0, const uint16_t* a1, const uint16_t* b0,
                         const uint16_t* b1, int64_t c0, int64_t c1) {
  for (int64_t c = c0; c < c1; ++c) {
    const int64_t o = c * kTileElems;
    MOE_TILE_LOAD(4, a0 + o);
    MOE_TILE_LOAD(6, b0 + o);
    MOE_TILE_DP(0, 4, 6);
    MOE_TILE_LOAD(7, b1 + o);
    MOE_TILE_DP(1, 4, 7);
    MOE_TILE_LOAD(5, a1 + o);
    MOE_TILE_DP(2, 5, 6);
    MOE_TILE_DP(3, 5, 7);
  }
}

// acc (32 x 32, [token][weight row]; = at the first block) += the result tiles * scale
inline void promote_rows(const float (*buf)[256], float* acc, float scale, bool first) {
  const __m512 s = _mm512_set1_ps(scale);
  for (int i = 0; i < 4; ++i) {
    float* out = acc + (i / 2) * kTileRows * kBlockRows + (i % 2) * kTileRows;
    for (int r = 0; r < 16; ++r) {
      const __m512 v = _mm512_load_ps(buf[i] + r * 16);
      float* o = out + r * kBlockRows;
      _mm512_store_ps(o, first ? _mm512_mul_ps(v, s) : _mm512_fmadd_ps(v, s, _mm512_load_ps(o)));
    }
  }
}

}  // namespace

// Loops: weight pairs (32 rows, all of K: 32 KB at K = 512, kept in L1), token pairs (from
// L2), K blocks; a pair's accumulators (4 KB) stay in L1. On the MLA shape (T = 256,
// H = 16, 2 threads, interleaved runs) a prototype of this orientation, the weight packed
// per call, ran 1.3-1.4x the unfused torch path where gemm() ran 0.9x: no result
// transposes, tokens packed without a transpose. Storing the four result tiles after each
// 128-wide K block (the FP8 block scales need it) drains the tile pipeline: products ran at
// 8.5 ns each alone and 11-12 ns with the stores (microbenchmark, one core; the tile unit's
// peak there is 6-7 ns). A weight without scales takes all of K in one step.
void gemm_rows(const RowGemm& g, const Sink& sink) {
  TileScope tiles;
  const int64_t C = chunks(g.K), per_block = kScaleK / kChunk;
  const int64_t KB = g.weight_scale != nullptr ? (g.K + kScaleK - 1) / kScaleK : 1;
  const int64_t step = g.weight_scale != nullptr ? per_block : C;
  alignas(64) float buf[4][256];
  alignas(64) float acc[kBlockRows * kBlockRows];
  for (int64_t c0 = 0; c0 < g.cols; c0 += kBlockRows) {
    const uint16_t* b0 = g.weights + (c0 / kTileRows) * C * kTileElems;
    const uint16_t* b1 = b0 + C * kTileElems;
    const int64_t cols = g.cols - c0 < kBlockRows ? g.cols - c0 : kBlockRows;
    for (int64_t m0 = 0; m0 < g.m; m0 += kBlockRows) {
      const uint16_t* a0 = g.tokens + (m0 / kTileRows) * C * kTileElems;
      const uint16_t* a1 = a0 + C * kTileElems;
      for (int64_t kb = 0; kb < KB; ++kb) {
        zero_results();
        const int64_t k1 = (kb + 1) * step < C ? (kb + 1) * step : C;
        row_products(a0, a1, b0, b1, kb * step, k1);
        MOE_TILE_STORE(0, buf[0]);
        MOE_TILE_STORE(1, buf[1]);
        MOE_TILE_STORE(2, buf[2]);
        MOE_TILE_STORE(3, buf[3]);
        const float ws = g.weight_scale != nullptr ? g.weight_scale[kb * g.weight_scale_stride] : 1.0f;
        promote_rows(buf, acc, ws, kb == 0);
      }
      sink.store(sink.ctx, acc, m0, g.m - m0 < kBlockRows ? g.m - m0 : kBlockRows, c0, cols);
    }
  }
  stream_fence();
}

void stream_fence() { _mm_sfence(); }

}  // namespace moe_kernels::amx

#pragma GCC diagnostic pop
#pragma GCC pop_options
