// The CPU kernels' vector inner loops, built four times from one source
// (simd_kernels.inc): for AVX-512 (F, BW, VL, DQ with FMA and F16C; 16 float lanes), the
// same with AVX512-BF16 (its GEMM of many rows on bf16 dot products), for AVX2 (with FMA
// and F16C; 8 lanes) and for the x86-64 baseline (SSE2, 4 lanes), plus the AMX tile GEMMs
// (amx.h) beside AVX-512. The widest this CPU runs is chosen;
// MOE_KERNELS_CPU_ISA=avx512bf16|avx512|avx2|generic (or set_cpu_isa) picks a narrower
// one, which is how tests run every build on one machine.
//
// Framework-free on purpose: the AVX-512 translation unit must not instantiate inline
// functions (torch's, the standard library's) that the rest of the extension would then
// link to and run on CPUs without AVX-512.
#pragma once
#include <cstdint>

namespace moe_kernels {

enum class SrcType : int { f32 = 0, bf16 = 1, f16 = 2 };

// Where GEMM results go: row i of a call's rows is row rows[i] of base (ld elements apart),
// stored as `type` (bf16 rounded to nearest even, as torch converts).
struct OutRows {
  void* base;
  SrcType type;
  int64_t ld;
  const int64_t* rows;
};

// Weight rows for gemm_pairs (bf16 k pairs, 32-bit units): the pair kp of row 16 v + i at
// data[kp * kp_stride + v * vec_stride + i] (i < 16). amx.h's VNNI tiles (pack_weights_vnni,
// and MLA's packed weight, the same layout) from row 16 j: strides (16, 16 * ceil(K / 32)),
// read in place.
struct PairPanelRef {
  const uint16_t* data;
  int64_t kp_stride, vec_stride;
};

struct SimdKernels {
  // One row of FP8 per-token-group quantization: q[c] and s[g * s_stride] for the W
  // values of x (gated: silu(x[c]) * x[W + c]). Needs group % 16 == 0, group <=
  // kMaxSimdGroup and W % 16 == 0 (the caller falls back otherwise).
  void (*quantize_row)(const void* x, SrcType type, int64_t W, int64_t group, float eps,
                       bool ue8m0, bool gated, uint8_t* q, float* s, int64_t s_stride);
  // dst[k] = fp8 q[k] * scales[(k / block) * scale_stride] for k < n
  void (*dequant_row)(const uint8_t* q, const float* scales, int64_t scale_stride, int64_t n,
                      int64_t block, float* dst);
  // dst[k] = float(x[k]) * scale for k < n
  void (*convert_row)(const void* x, SrcType type, int64_t n, float scale, float* dst);
  // Few rows against FP8 weight rows, the weights decoded a vector at a time in registers:
  // y[r][n] = sum_k x[r * ldx + k] * (w[n * K + k] * w_scales[(n / 128) * KB + k / 128])
  // for r < m (m <= kMaxGemvRows), n in [n0, n1), y[r][n] stored at row r, column n of y.
  void (*gemv_fp8)(const float* x, int64_t ldx, int64_t m, const uint8_t* w,
                   const float* w_scales, int64_t K, int64_t n0, int64_t n1, const OutRows& y);
  // Many rows: pack_panels lays x (m, K) float32 out as ceil(m / panel_rows) panels of
  // (K, panel_rows) (rows past m zero), from which gemm_panels computes, at row r and
  // column n0 + n of y, sum_k x[r * K + k] * w[n * ldw + k] for r < m, n < nw (w float32;
  // an ldw of K + 16 keeps the tile's weight rows out of one L1 set when K * 4 is a
  // multiple of 4096: gemm_weight_stride).
  int64_t panel_rows;
  void (*pack_panels)(const float* x, int64_t m, int64_t K, float* p);
  void (*gemm_panels)(const float* p, int64_t m, const float* w, int64_t ldw, int64_t nw,
                      int64_t K, const OutRows& y, int64_t n0);
  // Many rows of operands exact in bf16 (FP8, or bf16 itself) on bf16 dot products (the
  // avx512bf16 build; null in the others). decode_pair_rows writes n token rows (K values
  // each, at element offsets[i] of x, FP8 or bf16; -1: a zero row) as bf16 bits, ld apart
  // (even, >= K), zeros from K to ld; gemm_pairs computes, from the token rows x (ldx
  // apart) and nw <= panel_rows weight rows p, at row y.rows[r] and column n0 + n of y, for
  // r < m, n < nw:
  //   sum over K blocks kb of xs[r * ldxs + kb] * ws[kb * panel_rows + n]
  //     * sum_{k in kb} x[r][k] * w[n][k]
  // (ws null: weight scales of 1).
  void (*decode_pair_rows)(const void* x, bool fp8, const int64_t* offsets, int64_t n,
                           int64_t K, int64_t ld, uint16_t* dst);
  void (*gemm_pairs)(const uint16_t* x, int64_t ldx, const float* xs, int64_t ldxs, int64_t m,
                     const PairPanelRef& p, const float* ws, int64_t nw, int64_t K,
                     const OutRows& y, int64_t n0);
  // Few token rows (m <= kMaxPairGemvRows; bf16 bits as decode_pair_rows writes them)
  // against FP8 weight rows w (K bytes each) read as stored, at row r and column n of y for
  // r < m, n in [n0, n1):
  //   sum over K blocks kb of xs[r * ldxs + kb] * w_scales[(n / 128) * KB + kb]
  //     * sum_{k in kb} x[r][k] * w[n][k]
  void (*gemv_pairs)(const uint16_t* x, int64_t ldx, const float* xs, int64_t ldxs, int64_t m,
                     const uint8_t* w, const float* w_scales, int64_t K, int64_t n0,
                     int64_t n1, const OutRows& y);
  // Gating, on b without NaN: first[g] >= second[g], the two largest of the GS values at
  // b + g * GS for g < G (second[g] = -inf when GS = 1).
  void (*group_top2)(const float* b, int64_t G, int64_t GS, float* first, float* second);
  // Bit i set where b[i] >= threshold, for i < n <= 64.
  uint64_t (*mask_at_least)(const float* b, int64_t n, float threshold);
  // out[h] = sum over j < n, in the order of j, of w[j] * rows[j][h] in float32 (rows of
  // `type`, widened exactly), stored as `type` (bf16 as c10 rounds it) for h < H; n = 0
  // stores zeros.
  void (*weighted_row_sum)(const void* const* rows, const float* w, int64_t n, int64_t H,
                           SrcType type, void* out);
};

constexpr int64_t kMaxSimdGroup = 2048;

// The row stride of weights given to gemm_panels: K padded by one cache line.
inline int64_t gemm_weight_stride(int64_t K) { return K + 16; }
constexpr int64_t kMaxGemvRows = 8;
// Where the GEMV is on bf16 dot products (gemv_pairs), experts of more rows take
// gemm_pairs: the GEMV loads a token vector for every 2 dot products, the tiles broadcast
// one pair into 4, but must first pack the weights. 8 experts on 2 Zen 4 threads, medians
// of 3-5 alternating runs, GEMV against gemm_pairs: N = 512, K = 1024, weights from DRAM,
// 5 / 6 / 7 / 8 rows: 318 / 363 / 404 / 474 us against 362 / 387 / 394 / 424 us; the same
// weights in cache, 5 / 6 rows: 272 / 331 against 326 / 338 us; N = 4096, K = 7168 (235 MB
// of weights), 5 / 6 rows: 13.5 / 15.0 ms against 16.0 / 18.1 ms.
constexpr int64_t kMaxPairGemvRows = 6;

namespace simd_avx512 {
extern const SimdKernels kernels;
bool supported();
}  // namespace simd_avx512
namespace simd_avx512bf16 {
extern const SimdKernels kernels;
bool supported();
}  // namespace simd_avx512bf16
namespace simd_avx2 {
extern const SimdKernels kernels;
bool supported();
}  // namespace simd_avx2
namespace simd_generic {
extern const SimdKernels kernels;
}

const SimdKernels& simd();
// Whether the GEMMs whose operands are exact in bf16 run on AMX tiles (amx.h): the "amx"
// build, the AVX-512 vector kernels plus tiles, chosen first where amx::supported().
bool amx_enabled();
// The build running: "amx", "avx512bf16", "avx512", "avx2" or "generic".
const char* cpu_isa();
// One of those names; an ISA this CPU lacks is refused (returns false).
bool set_cpu_isa(const char* name);
// The size in bytes of cpu0's last-level cache as Linux reports it (sysfs), 32 MiB where
// it cannot be read. Not sysconf's: under a VM it may report the host socket's cache
// (320 MiB on the 2-core Zen 4 VM, whose sysfs and lscpu say 32 MiB).
int64_t last_level_cache_bytes();

}  // namespace moe_kernels
