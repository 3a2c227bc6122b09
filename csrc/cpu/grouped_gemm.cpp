// FP8 grouped GEMMs on the CPU (semantics:
// moe_kernels/reference/grouped_gemm.py). The rows of `a` taken by any expert are
// dequantized to float32 once (parallel over rows). Then one parallel loop over (expert,
// block of weight rows), so that two threads share even a single expert:
// - an expert with few rows (decode) runs the GEMV of simd.h, which streams its FP8 weight
//   once and decodes it in registers;
// - an expert with more rows has its rows packed into panels once, and each task decodes
//   its block of weight rows to float32 (in L2) for the register-tiled GEMM of simd.h.
//   Against dequantizing a whole expert and at::mm, this skips writing and re-reading the
//   float32 weight and MKL's own packing copy (GEMM1/14 on 2 cores: 2.6 ms that way, 2.05
//   ms this way; docs/benchmarks.md);
// - where the CPU has AMX (the amx build), those experts run on bf16 tiles instead (amx.h),
//   and where it has AVX512-BF16 but no AMX (the avx512bf16 build), on bf16 dot products
//   (simd.h, gemm_pairs): both take the FP8 operands as stored (exact in bf16) and apply the
//   block scales per 128-wide K block.
// Dequantize-then-multiply equals "promotion every 128" up to float32 rounding, since a
// scale is constant over each 128-wide K block.
#include <ATen/Parallel.h>
#include <ATen/ATen.h>

#include <algorithm>
#include <cstring>
#include <utility>
#include <vector>

#include "../fp8.h"
#include "../ops.h"
#include "amx.h"
#include "index_values.h"
#include "pairs.h"
#include "simd.h"
#include "tasks.h"

namespace moe_kernels {
namespace {

using fp8_t = c10::Float8_e4m3fn;

const uint8_t* fp8_bytes(const at::Tensor& t) {
  return reinterpret_cast<const uint8_t*>(t.data_ptr<fp8_t>());
}

// rows x (K) of fp8 `a` with per-128 scales -> float32 (rows, K)
at::Tensor dequant_rows(const at::Tensor& a, const at::Tensor& a_scales,
                        const std::vector<int64_t>& rows) {
  const int64_t K = a.size(1), n = static_cast<int64_t>(rows.size());
  at::Tensor out = at::empty({n, K}, a.options().dtype(at::kFloat));
  const uint8_t* ap = fp8_bytes(a);
  const float* sp = a_scales.data_ptr<float>();
  float* op = out.data_ptr<float>();
  const int64_t sa = a.stride(0), ssm = a_scales.stride(0), ssk = a_scales.stride(1);
  const SimdKernels& k = simd();
  at::parallel_for(0, n, 16, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const int64_t r = rows[i];
      k.dequant_row(ap + r * sa, sp + r * ssm, ssk, K, kScaleBlock, op + i * K);
    }
  });
  return out;
}

// Weight rows per task. GEMV: 64 rows of K = 7168 are 448 KB of FP8, and N = 4096 gives
// 64 tasks per expert to balance over the threads. GEMM: 48 rows (4 tiles of 12) decoded to
// float32 stay in the L2 beside the expert's activation panels.
constexpr int64_t kGemvBlockN = 64;
constexpr int64_t kGemmBlockN = 48;
// bf16 dot products: one panel of weight rows (simd.h, the avx512bf16 build's panel_rows),
// whose 64 rows of K = 7168 in bf16 are 896 KB
constexpr int64_t kPairBlockN = 64;

// The rows of `a` each expert takes, listed expert by expert: expert e's are
// rows[start[e] .. start[e + 1]).
struct ExpertRows {
  std::vector<int64_t> rows, start;
  int64_t count(int64_t e) const { return start[e + 1] - start[e]; }
};

// How an expert's rows are multiplied: few rows by the register GEMV, more by the float32
// panel GEMM, by bf16 dot products on the FP8 operands as stored where the CPU has
// AVX512-BF16 (simd.h, gemm_pairs), or by AMX tiles where it has them (amx.h).
enum class Path { gemv, panels, pairs, tiles };

// One unit of parallel work: weight rows [n0, n0 + block) of expert e.
struct Task {
  int64_t e, n0;
  Path path;
};

int64_t task_rows(Path p) {
  switch (p) {
    case Path::gemv: return kGemvBlockN;
    case Path::pairs: return kPairBlockN;
    case Path::tiles: return amx::kGroupRows;
    default: return kGemmBlockN;
  }
}

// The AMX operands of every expert on tiles: token panels (amx::pack_tokens of the
// expert's rows, straight from fp8) and their scales as amx::Gemm reads them;
// panel[e] / scale[e] are expert e's first elements.
struct TokenTiles {
  at::Tensor tokens, scales;
  std::vector<int64_t> panel, scale;
};

TokenTiles pack_token_tiles(const at::Tensor& a, const at::Tensor& a_scales,
                            const ExpertRows& er, const std::vector<Path>& path) {
  const int64_t E = static_cast<int64_t>(path.size()), K = a.size(1);
  const int64_t KB = ceil_div(K, kScaleBlock);
  TokenTiles t;
  t.panel.assign(E, -1);
  t.scale.assign(E, -1);
  int64_t elems = 0, scales = 0;
  std::vector<int64_t> tiled;
  for (int64_t e = 0; e < E; ++e) {
    if (path[e] != Path::tiles) continue;
    t.panel[e] = elems;
    t.scale[e] = scales;
    elems += amx::panel_elems(er.count(e), K);
    scales += ceil_div(er.count(e), amx::kTileRows) * KB * amx::kTileRows;
    tiled.push_back(e);
  }
  t.tokens = at::empty({elems}, a.options().dtype(at::kShort));
  t.scales = at::empty({scales}, a.options().dtype(at::kFloat));
  std::vector<int64_t> offsets(er.rows.size());
  for (size_t i = 0; i < er.rows.size(); ++i) offsets[i] = er.rows[i] * a.stride(0);
  uint16_t* tp = reinterpret_cast<uint16_t*>(t.tokens.data_ptr<int16_t>());
  float* sp = t.scales.data_ptr<float>();
  const float* as = a_scales.data_ptr<float>();
  const int64_t ssm = a_scales.stride(0), ssk = a_scales.stride(1);
  at::parallel_for(0, static_cast<int64_t>(tiled.size()), 1, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const int64_t e = tiled[i], m = er.count(e), r0 = er.start[e];
      amx::pack_tokens(a.data_ptr(), amx::Src::fp8, offsets.data() + r0, m, K, tp + t.panel[e]);
      float* s = sp + t.scale[e];   // (token tile, kb, token in tile); padding tokens 0
      for (int64_t j = 0; j * amx::kTileRows < m; ++j)
        for (int64_t kb = 0; kb < KB; ++kb)
          for (int64_t q = 0; q < amx::kTileRows; ++q) {
            const int64_t tok = j * amx::kTileRows + q;
            *s++ = tok < m ? as[er.rows[r0 + tok] * ssm + kb * ssk] : 0.0f;
          }
    }
  });
  return t;
}

// amx::Sink of the grouped GEMMs: token i of an expert is out row rows[i]
struct RowsSink {
  const OutRows* y;
  const int64_t* rows;
  int64_t n0, elem;
  bool stream;
  static void store(void* ctx, const float* block, int64_t m0, int64_t n, int64_t c0,
                    int64_t cols) {
    const RowsSink& s = *static_cast<const RowsSink*>(ctx);
    for (int64_t i = 0; i < n; ++i) {
      char* dst = static_cast<char*>(s.y->base) + (s.rows[m0 + i] * s.y->ld + s.n0 + c0) * s.elem;
      amx::store_row(block + i * amx::kBlockRows, cols, 1.0f, s.y->type, dst, s.stream);
    }
  }
};

// The token rows of every expert with bf16[e] as bf16 (simd.h, decode_pair_rows), straight
// from fp8 `a`, ld apart, and their scales (KB per row); row[e] / scale[e] are expert e's
// first elements.
struct PairRows {
  at::Tensor rows, scales;
  int64_t ld = 0;
  std::vector<int64_t> row, scale;
};

PairRows decode_pair_experts(const at::Tensor& a, const at::Tensor& a_scales,
                             const ExpertRows& er, const std::vector<bool>& bf16) {
  const SimdKernels& k = simd();
  const int64_t E = static_cast<int64_t>(bf16.size()), K = a.size(1);
  const int64_t KB = ceil_div(K, kScaleBlock);
  PairRows pr;
  pr.ld = ceil_div(K, 2) * 2 + 32;   // one cache line past the row, as gemm_weight_stride
  pr.row.assign(E, -1);
  pr.scale.assign(E, -1);
  int64_t rows = 0;
  std::vector<int64_t> paired;
  for (int64_t e = 0; e < E; ++e) {
    if (!bf16[e]) continue;
    pr.row[e] = rows * pr.ld;
    pr.scale[e] = rows * KB;
    rows += er.count(e);
    paired.push_back(e);
  }
  pr.rows = at::empty({rows * pr.ld}, a.options().dtype(at::kShort));
  pr.scales = at::empty({rows * KB}, a.options().dtype(at::kFloat));
  uint16_t* xp = reinterpret_cast<uint16_t*>(pr.rows.data_ptr<int16_t>());
  float* sp = pr.scales.data_ptr<float>();
  const float* as = a_scales.data_ptr<float>();
  const int64_t ssm = a_scales.stride(0), ssk = a_scales.stride(1);
  std::vector<int64_t> offsets(er.rows.size());
  for (size_t i = 0; i < er.rows.size(); ++i) offsets[i] = er.rows[i] * a.stride(0);
  at::parallel_for(0, static_cast<int64_t>(paired.size()), 1, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const int64_t e = paired[i], m = er.count(e);
      const int64_t* rows_e = er.rows.data() + er.start[e];
      k.decode_pair_rows(a.data_ptr(), true, offsets.data() + er.start[e], m, K, pr.ld,
                         xp + pr.row[e]);
      float* s = sp + pr.scale[e];
      for (int64_t j = 0; j < m; ++j)
        for (int64_t kb = 0; kb < KB; ++kb) *s++ = as[rows_e[j] * ssm + kb * ssk];
    }
  });
  return pr;
}

// Activation panels (simd.h, pack_panels) of every expert on the panel GEMM, from its
// float32 rows at x[xstart[e]]; offset[e] is expert e's first float in the returned buffer.
at::Tensor pack_experts(const at::Tensor& x, const std::vector<int64_t>& xstart,
                        const ExpertRows& er, const std::vector<Path>& path,
                        std::vector<int64_t>& offset) {
  const SimdKernels& k = simd();
  const int64_t E = static_cast<int64_t>(er.start.size()) - 1, K = x.size(1);
  int64_t total = 0;
  std::vector<int64_t> large;
  offset.assign(E, -1);
  for (int64_t e = 0; e < E; ++e) {
    if (path[e] != Path::panels) continue;
    offset[e] = total;
    total += ceil_div(er.count(e), k.panel_rows) * k.panel_rows * K;
    large.push_back(e);
  }
  at::Tensor panels = at::empty({total}, x.options());
  float* pp = panels.data_ptr<float>();
  const float* xp = x.data_ptr<float>();
  at::parallel_for(0, static_cast<int64_t>(large.size()), 1, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const int64_t e = large[i];
      k.pack_panels(xp + xstart[e] * K, er.count(e), K, pp + offset[e]);
    }
  });
  return panels;
}

// out[rows] = (a[rows] dequantized) @ b[e].T dequantized for every expert, rounded to
// out's dtype as each value is stored (no float32 result pass); rows of out that no expert
// takes are zeroed, or with zero_fill false left as they are. out must have a unit column
// stride.
void experts_gemm(const at::Tensor& a, const at::Tensor& a_scales, const at::Tensor& b,
                  const at::Tensor& b_scales, const ExpertRows& er, at::Tensor& out,
                  bool zero_fill) {
  if (zero_fill) {
    std::vector<bool> written(out.size(0), false);
    for (int64_t r : er.rows) written[r] = true;
    char* base = static_cast<char*>(out.data_ptr());
    const int64_t row_bytes = out.size(1) * out.element_size();
    for (int64_t r = 0; r < out.size(0); ++r)
      if (!written[r]) std::memset(base + r * out.stride(0) * out.element_size(), 0, row_bytes);
  }
  const int64_t n = static_cast<int64_t>(er.rows.size());
  if (n == 0) return;
  const int64_t E = b.size(0), N = b.size(1), K = b.size(2), KB = b_scales.size(2);
  const SimdKernels& k = simd();
  const bool tiles = amx_enabled(), pairs = k.gemm_pairs != nullptr;
  std::vector<Path> path(E);
  // the experts whose token rows the bf16 dot products read (bf16_rows), and float32 rows
  // for those on the float32 GEMV and panels (the tiles read `a` itself): expert e's at
  // row xstart[e] of x
  std::vector<bool> bf16_rows(E, false);
  std::vector<int64_t> float_rows, xstart(E, -1);
  const int64_t gemv_rows = k.gemv_pairs != nullptr ? kMaxPairGemvRows : kMaxGemvRows;
  for (int64_t e = 0; e < E; ++e) {
    const int64_t m = er.count(e);
    path[e] = m <= gemv_rows ? Path::gemv
              : tiles           ? Path::tiles
              : pairs           ? Path::pairs
                                : Path::panels;
    bf16_rows[e] = m > 0 && (path[e] == Path::pairs || (path[e] == Path::gemv && k.gemv_pairs));
    if (path[e] == Path::tiles || bf16_rows[e]) continue;
    xstart[e] = static_cast<int64_t>(float_rows.size());
    float_rows.insert(float_rows.end(), er.rows.begin() + er.start[e],
                      er.rows.begin() + er.start[e + 1]);
  }
  const at::Tensor x = dequant_rows(a, a_scales, float_rows);
  std::vector<int64_t> offset;
  const at::Tensor panels = pack_experts(x, xstart, er, path, offset);
  const TokenTiles tt = tiles ? pack_token_tiles(a, a_scales, er, path) : TokenTiles{};
  const PairRows pair_rows = pairs ? decode_pair_experts(a, a_scales, er, bf16_rows) : PairRows{};
  std::vector<Task> tasks;
  for (int64_t e = 0; e < E; ++e) {
    if (er.count(e) == 0) continue;
    for (int64_t n0 = 0; n0 < N; n0 += task_rows(path[e])) tasks.push_back({e, n0, path[e]});
  }
  const uint8_t* bp = fp8_bytes(b);
  const float* bsp = b_scales.data_ptr<float>();
  const float* xp = x.data_ptr<float>();
  const float* pp = panels.data_ptr<float>();
  const SrcType type = simd_type(out.scalar_type(), "out");
  const bool stream = out.numel() * out.element_size() >= amx::kStreamBytes;
  struct Scratch {
    std::vector<float> wbuf;
    TileScratch tiles;
    PairPanel pair;
  };
  const int64_t tile_elems = amx::kGroupRows / amx::kBlockRows * amx::block_elems(K);
  for_each_task(static_cast<int64_t>(tasks.size()),
                [&] { return Scratch{{}, TileScratch(tiles ? tile_elems : 0), {}}; },
                [&](Scratch& scratch, int64_t t) {
    std::vector<float>& wbuf = scratch.wbuf;
    const Task& task = tasks[t];
    const int64_t r0 = er.start[task.e], m = er.count(task.e);
    const uint8_t* be = bp + task.e * N * K;
    const float* se = bsp + task.e * b_scales.size(1) * KB;
    const OutRows y{out.data_ptr(), type, out.stride(0), er.rows.data() + r0};
    if (task.path == Path::gemv && bf16_rows[task.e]) {
      const uint16_t* x = reinterpret_cast<const uint16_t*>(pair_rows.rows.data_ptr<int16_t>());
      k.gemv_pairs(x + pair_rows.row[task.e], pair_rows.ld,
                   pair_rows.scales.data_ptr<float>() + pair_rows.scale[task.e], KB, m, be, se,
                   K, task.n0, std::min(N, task.n0 + kGemvBlockN), y);
      return;
    }
    if (task.path == Path::gemv) {
      k.gemv_fp8(xp + xstart[task.e] * K, K, m, be, se, K, task.n0,
                 std::min(N, task.n0 + kGemvBlockN), y);
      return;
    }
    if (task.path == Path::tiles) {
      const int64_t cols = std::min(amx::kGroupRows, N - task.n0);
      uint16_t* tile_buf = scratch.tiles.data();
      amx::pack_weights(be + task.n0 * K, amx::Src::fp8, K, cols, K, tile_buf);
      const uint16_t* tp = reinterpret_cast<const uint16_t*>(tt.tokens.data_ptr<int16_t>());
      // the task's rows are one 128-row scale block (n0 is a multiple of 128)
      const amx::Gemm g{tile_buf, tp + tt.panel[task.e], m, K, cols,
                        se + (task.n0 / kScaleBlock) * KB, 1,
                        tt.scales.data_ptr<float>() + tt.scale[task.e]};
      RowsSink sink{&y, y.rows, task.n0, out.element_size(), stream};
      amx::gemm(g, {&RowsSink::store, &sink});
      return;
    }
    if (task.path == Path::pairs) {
      const int64_t nb = std::min(kPairBlockN, N - task.n0);
      const uint16_t* x = reinterpret_cast<const uint16_t*>(pair_rows.rows.data_ptr<int16_t>());
      const PairPanelRef p = scratch.pair.pack(be, true, se, task.n0, nb, K);
      k.gemm_pairs(x + pair_rows.row[task.e], pair_rows.ld,
                   pair_rows.scales.data_ptr<float>() + pair_rows.scale[task.e], KB, m, p,
                   scratch.pair.scale_data(), nb, K, y, task.n0);
      return;
    }
    const int64_t nb = std::min(kGemmBlockN, N - task.n0);
    const int64_t ldw = gemm_weight_stride(K);
    wbuf.resize(nb * ldw);
    for (int64_t i = 0; i < nb; ++i) {
      const int64_t row = task.n0 + i;
      k.dequant_row(be + row * K, se + (row / kScaleBlock) * KB, 1, K, kScaleBlock,
                    wbuf.data() + i * ldw);
    }
    k.gemm_panels(pp + offset[task.e], m, wbuf.data(), ldw, nb, K, y, task.n0);
  });
}

// experts_gemm into out, through a packed copy when out's columns are strided
void experts_gemm_into(const at::Tensor& a, const at::Tensor& a_scales, const at::Tensor& b,
                       const at::Tensor& b_scales, const ExpertRows& er, at::Tensor& out,
                       bool zero_fill = true) {
  if (out.size(1) <= 1 || out.stride(1) == 1)
    return experts_gemm(a, a_scales, b, b_scales, er, out, zero_fill);
  // rows left as they are must start from out's own values
  at::Tensor packed = zero_fill ? at::empty(out.sizes(), out.options()) : out.contiguous();
  experts_gemm(a, a_scales, b, b_scales, er, packed, zero_fill);
  out.copy_(packed);
}

Report check_b(const at::Tensor& b, const at::Tensor& b_scales, int64_t K) {
  MK_CHECK(check_fp8(b, "b", 3));
  MK_CHECK_VALUE(b.size(2) == K, "b must have K = ", K, " columns, got ", b.size(2));
  return check_scales(b_scales, "b_scales",
                      {b.size(0), ceil_div(b.size(1), kScaleBlock), ceil_div(K, kScaleBlock)});
}

// a (R, K) fp8 and its (R, ceil(K / 128)) scales, b (E, N, K) and its scales, the expert of
// each row (any integer values; out of range skips the row)
Report check_contiguous_operands(const at::Tensor& a, const at::Tensor& a_scales,
                                 const at::Tensor& b, const at::Tensor& b_scales,
                                 const at::Tensor& m_indices) {
  MK_CHECK(check_fp8(a, "a", 2));
  const int64_t R = a.size(0), K = a.size(1);
  MK_CHECK(check_scales(a_scales, "a_scales", {R, ceil_div(K, kScaleBlock)}));
  MK_CHECK(check_b(b, b_scales, K));
  MK_CHECK_VALUE(m_indices.dim() == 1 && m_indices.size(0) == R, "m_indices must have shape (",
                 R, ",), got ", m_indices.sizes());
  MK_CHECK_TYPE(index_dtype(m_indices.scalar_type()), "m_indices must be int32 or int64, got ",
                m_indices.scalar_type());
  return {};
}

// a (E, M, K) fp8 and its (E, M, ceil(K / 128)) scales, b (E, N, K) and its scales, masked_m
// (E,) (any integer values, clamped to [0, M])
Report check_masked_operands(const at::Tensor& a, const at::Tensor& a_scales,
                             const at::Tensor& b, const at::Tensor& b_scales,
                             const at::Tensor& masked_m) {
  MK_CHECK(check_fp8(a, "a", 3));
  const int64_t E = a.size(0), M = a.size(1), K = a.size(2);
  MK_CHECK(check_scales(a_scales, "a_scales", {E, M, ceil_div(K, kScaleBlock)}));
  MK_CHECK(check_b(b, b_scales, K));
  MK_CHECK_VALUE(b.size(0) == E, "b must have E = ", E, " groups, got ", b.size(0));
  MK_CHECK_VALUE(masked_m.dim() == 1 && masked_m.size(0) == E, "masked_m must have shape (", E,
                 ",), got ", masked_m.sizes());
  MK_CHECK_TYPE(index_dtype(masked_m.scalar_type()), "masked_m must be int32 or int64, got ",
                masked_m.scalar_type());
  return {};
}

Report check_out_dtype(at::ScalarType t, const char* name) {
  MK_CHECK_TYPE(simd_dtype(t), name, " must be float32, bfloat16 or float16, got ", t);
  return {};
}

}  // namespace

Report check_grouped_gemm_fp8_cpu(const at::Tensor& a, const at::Tensor& a_scales,
                                  const at::Tensor& b, const at::Tensor& b_scales,
                                  const at::Tensor& m_indices, at::ScalarType out_dtype) {
  MK_CHECK(check_contiguous_operands(a, a_scales, b, b_scales, m_indices));
  return check_out_dtype(out_dtype, "out_dtype");
}

Report check_grouped_gemm_fp8_out_cpu(const at::Tensor& a, const at::Tensor& a_scales,
                                      const at::Tensor& b, const at::Tensor& b_scales,
                                      const at::Tensor& m_indices, const at::Tensor& out) {
  MK_CHECK(check_contiguous_operands(a, a_scales, b, b_scales, m_indices));
  const int64_t R = a.size(0), N = b.size(1);
  MK_CHECK_VALUE(out.dim() == 2 && out.size(0) == R && out.size(1) == N, "out must have shape (",
                 R, ", ", N, "), got ", out.sizes());
  return check_out_dtype(out.scalar_type(), "out");
}

Report check_grouped_gemm_fp8_masked_cpu(const at::Tensor& a, const at::Tensor& a_scales,
                                         const at::Tensor& b, const at::Tensor& b_scales,
                                         const at::Tensor& masked_m, at::ScalarType out_dtype) {
  MK_CHECK(check_masked_operands(a, a_scales, b, b_scales, masked_m));
  return check_out_dtype(out_dtype, "out_dtype");
}

Report check_grouped_gemm_fp8_masked_out_cpu(const at::Tensor& a, const at::Tensor& a_scales,
                                             const at::Tensor& b, const at::Tensor& b_scales,
                                             const at::Tensor& masked_m, bool zero_fill,
                                             const at::Tensor& out) {
  MK_CHECK(check_masked_operands(a, a_scales, b, b_scales, masked_m));
  const int64_t E = a.size(0), M = a.size(1), N = b.size(1);
  MK_CHECK_VALUE(out.dim() == 3 && out.size(0) == E && out.size(1) == M && out.size(2) == N &&
                     out.is_contiguous(),
                 "out must be contiguous of shape (", E, ", ", M, ", ", N, "), got ", out.sizes());
  return check_out_dtype(out.scalar_type(), "out");
}

void grouped_gemm_fp8_out_cpu(const at::Tensor& a_in, const at::Tensor& a_scales_in,
                              const at::Tensor& b_in, const at::Tensor& b_scales_in,
                              const at::Tensor& m_indices_in, at::Tensor& out) {
  throw_if(check_grouped_gemm_fp8_out_cpu(a_in, a_scales_in, b_in, b_scales_in, m_indices_in,
                                          out));
  const int64_t R = a_in.size(0), E = b_in.size(0);
  const at::Tensor a = a_in.contiguous(), b = b_in.contiguous();
  const at::Tensor b_scales = b_scales_in.contiguous();
  const IndexValues mp(m_indices_in);
  ExpertRows er{{}, std::vector<int64_t>(E + 1, 0)};
  for (int64_t r = 0; r < R; ++r)
    if (mp[r] >= 0 && mp[r] < E) ++er.start[mp[r] + 1];
  for (int64_t e = 0; e < E; ++e) er.start[e + 1] += er.start[e];
  er.rows.resize(er.start[E]);
  std::vector<int64_t> fill(er.start.begin(), er.start.end() - 1);
  for (int64_t r = 0; r < R; ++r)
    if (mp[r] >= 0 && mp[r] < E) er.rows[fill[mp[r]]++] = r;
  experts_gemm_into(a, a_scales_in, b, b_scales, er, out);
}

at::Tensor grouped_gemm_fp8_cpu(const at::Tensor& a, const at::Tensor& a_scales,
                                const at::Tensor& b, const at::Tensor& b_scales,
                                const at::Tensor& m_indices, at::ScalarType out_dtype) {
  throw_if(check_grouped_gemm_fp8_cpu(a, a_scales, b, b_scales, m_indices, out_dtype));
  at::Tensor out = at::empty({a.size(0), b.size(1)}, a.options().dtype(out_dtype));
  grouped_gemm_fp8_out_cpu(a, a_scales, b, b_scales, m_indices, out);
  return out;
}

void grouped_gemm_fp8_masked_out_cpu(const at::Tensor& a_in, const at::Tensor& a_scales_in,
                                     const at::Tensor& b_in, const at::Tensor& b_scales_in,
                                     const at::Tensor& masked_m_in, bool zero_fill,
                                     at::Tensor& out) {
  throw_if(check_grouped_gemm_fp8_masked_out_cpu(a_in, a_scales_in, b_in, b_scales_in,
                                                 masked_m_in, zero_fill, out));
  const int64_t E = a_in.size(0), M = a_in.size(1), K = a_in.size(2), N = b_in.size(1);
  const at::Tensor a = a_in.reshape({E * M, K}).contiguous();
  const at::Tensor a_scales = a_scales_in.reshape({E * M, a_scales_in.size(2)});
  const at::Tensor b = b_in.contiguous(), b_scales = b_scales_in.contiguous();
  at::Tensor flat = out.view({E * M, N});
  const IndexValues mm(masked_m_in);
  ExpertRows er{{}, {0}};
  for (int64_t e = 0; e < E; ++e) {
    const int64_t valid = std::min(std::max(mm[e], int64_t{0}), M);
    for (int64_t i = 0; i < valid; ++i) er.rows.push_back(e * M + i);
    er.start.push_back(static_cast<int64_t>(er.rows.size()));
  }
  experts_gemm_into(a, a_scales, b, b_scales, er, flat, zero_fill);
}

at::Tensor grouped_gemm_fp8_masked_cpu(const at::Tensor& a, const at::Tensor& a_scales,
                                       const at::Tensor& b, const at::Tensor& b_scales,
                                       const at::Tensor& masked_m, at::ScalarType out_dtype) {
  throw_if(check_grouped_gemm_fp8_masked_cpu(a, a_scales, b, b_scales, masked_m, out_dtype));
  at::Tensor out = at::empty({a.size(0), a.size(1), b.size(1)}, a.options().dtype(out_dtype));
  grouped_gemm_fp8_masked_out_cpu(a, a_scales, b, b_scales, masked_m, true, out);
  return out;
}

}  // namespace moe_kernels
