// MLA latent KV decompression on the CPU (semantics:
// moe_kernels/reference/mla.py). Three paths (docs/mla.md). With AMX and operands exact in
// bf16: bf16 tiles (amx::gemm_rows), K / V stored straight from them (decompress_tiles).
// With AVX512-BF16 (no AMX) and such operands: bf16 dot products, likewise
// (decompress_pairs). Otherwise the weight is dequantized once to float32; tokens go in
// chunks: their latent rows are gathered (paged) and converted to float32 in parallel, the
// panel GEMM of simd.h up-projects the chunk for every head (parallel over blocks of
// weight rows), and K (with k_pe) and V are written from it. A chunk's product stays
// around 4 MB, so it is written back from cache instead of materialising a
// (T, H, dn + dv) tensor.
#include <ATen/Parallel.h>
#include <ATen/ATen.h>
#include <algorithm>
#include <numeric>
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

constexpr int64_t kChunkFloats = int64_t{1} << 20;   // floats of one chunk's product

// Element offsets (from data_ptr) of each output token's latent row and k_pe row; -1 for
// a token without a row (written as zeros).
struct Rows {
  std::vector<int64_t> latent, pe;
};

// kv_b_proj is either the checkpoint's (N, R) rows or the packed form of
// moe_kernels.mla_pack_kv_b_proj: bf16 (N / 16, R / 32, 16, 32), the VNNI tiles of
// amx::pack_weights_vnni over all N rows (docs/mla.md), the values exact (fp8 widened).
bool is_packed(const at::Tensor& w) { return w.dim() == 4; }
int64_t weight_rows(const at::Tensor& w) { return is_packed(w) ? w.size(0) * amx::kTileRows : w.size(0); }
int64_t weight_cols(const at::Tensor& w) { return is_packed(w) ? w.size(1) * amx::kChunk : w.size(1); }

// The dtypes of latent and k_pe rows (gather_any, amx::pack_token_rows) and of weights.
bool mla_input_dtype(at::ScalarType t) { return simd_dtype(t) || t == at::kFloat8_e4m3fn; }

Report check_weight(const at::Tensor& w) {
  if (!is_packed(w)) {
    MK_CHECK_VALUE(w.dim() == 2, "kv_b_proj must be 2-D, or 4-D packed (mla_pack_kv_b_proj), got ",
                   w.dim(), "-D");
    MK_CHECK_TYPE(mla_input_dtype(w.scalar_type()),
                  "kv_b_proj must be float32, bfloat16, float16 or float8_e4m3fn, got ",
                  w.scalar_type());
  } else {
    MK_CHECK_TYPE(w.scalar_type() == at::kBFloat16, "a packed kv_b_proj must be bfloat16, got ",
                  w.scalar_type());
    MK_CHECK_VALUE(w.size(0) % 2 == 0 && w.size(2) == amx::kTileRows &&
                       w.size(3) == amx::kChunk && w.is_contiguous(),
                   "a packed kv_b_proj must be contiguous (N / 16, R / 32, 16, 32) with N a "
                   "multiple of 32, got ", w.sizes());
  }
  MK_CHECK_VALUE(weight_rows(w) >= 1 && weight_cols(w) >= 1,
                 "kv_b_proj must have rows and columns, got shape ", w.sizes());
  return {};
}

// kv_b_proj_scale: 128x128 block scales, required for an fp8 weight, optional for a packed
// one (the values of an fp8 checkpoint, given with its scales), absent otherwise
Report check_weight_scale(const at::Tensor& w, const std::optional<at::Tensor>& w_scale) {
  const bool fp8 = w.scalar_type() == at::kFloat8_e4m3fn;
  if (fp8 || (is_packed(w) && w_scale.has_value())) {
    MK_CHECK_VALUE(w_scale.has_value(), "kv_b_proj_scale is required for an fp8 kv_b_proj");
    return check_scales(*w_scale, "kv_b_proj_scale",
                        {ceil_div(weight_rows(w), kScaleBlock), ceil_div(weight_cols(w), kScaleBlock)});
  }
  MK_CHECK_VALUE(!w_scale.has_value(), "kv_b_proj_scale is only for an fp8 or packed kv_b_proj");
  return {};
}

// The packed weight's (N, R) bf16 rows: [j, c, p, q, e] holds row 16 j + q, column
// 32 c + 2 p + e
at::Tensor unpack_rows(const at::Tensor& w) {
  return w.view({w.size(0), w.size(1), amx::kTileRows, amx::kTileRows, 2})
      .permute({0, 3, 1, 2, 4})
      .reshape({weight_rows(w), weight_cols(w)});
}

// float32 weight (H*(dn+dv), R) from bf16/fp16/fp32 or fp8 with 128x128 block scales, or
// from the packed tiles (times the block scales when given)
at::Tensor float_weight(const at::Tensor& w, const std::optional<at::Tensor>& w_scale) {
  if (w.scalar_type() == at::kFloat8_e4m3fn)
    return dequantize_fp8_block_cpu(w, *w_scale, kScaleBlock, kScaleBlock, at::kFloat);
  if (!is_packed(w)) return w.to(at::kFloat).contiguous();
  const int64_t N = weight_rows(w), R = weight_cols(w);
  at::Tensor rows = unpack_rows(w).to(at::kFloat);
  if (!w_scale.has_value()) return rows;
  if (N % kScaleBlock == 0 && R % kScaleBlock == 0) {   // one broadcast pass, no scale copy
    rows.view({N / kScaleBlock, kScaleBlock, R / kScaleBlock, kScaleBlock})
        .mul_(w_scale->reshape({N / kScaleBlock, 1, R / kScaleBlock, 1}));
    return rows;
  }
  return rows.mul_(w_scale->repeat_interleave(kScaleBlock, 0).repeat_interleave(kScaleBlock, 1)
                       .narrow(0, 0, N).narrow(1, 0, R));
}

// (n, width) float32: rows offsets[t0 .. t0 + n) of storage, times scale; zeros for -1
at::Tensor gather_any(const at::Tensor& storage, const std::vector<int64_t>& offsets,
                      int64_t t0, int64_t n, int64_t width, float scale) {
  at::Tensor x = at::empty({n, width}, storage.options().dtype(at::kFloat));
  const bool fp8 = storage.scalar_type() == at::kFloat8_e4m3fn;
  const SrcType type = fp8 ? SrcType::f32 : simd_type(storage.scalar_type(), "the latent rows");
  const char* base = static_cast<const char*>(storage.data_ptr());
  const int64_t elem = storage.element_size();
  float* xp = x.data_ptr<float>();
  const SimdKernels& k = simd();
  at::parallel_for(0, n, 16, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const int64_t off = offsets[t0 + i];
      float* xi = xp + i * width;
      if (off < 0) {
        std::fill(xi, xi + width, 0.0f);
      } else if (fp8) {
        k.dequant_row(reinterpret_cast<const uint8_t*>(base) + off, &scale, 0, width, width, xi);
      } else {
        k.convert_row(base + off * elem, type, width, scale, xi);
      }
    }
  });
  return x;
}

// k_pe rows of tokens [t0, t0 + n) into every head of out_k (after the dn no-PE columns)
void write_pe(const at::Tensor& pe_storage, const Rows& rows, int64_t t0, int64_t n,
              int64_t rope, float scale, at::Tensor& out_k) {
  const at::Tensor pe = gather_any(pe_storage, rows.pe, t0, n, rope, scale);
  const int64_t H = out_k.size(1), dn = out_k.size(2) - rope;
  out_k.narrow(0, t0, n).narrow(2, dn, rope).copy_(pe.unsqueeze(1).expand({n, H, rope}));
}

// x (n, R) @ w (N, R).T as (n, N) float32, on the panel GEMM of simd.h (the grouped GEMMs'
// float32 tile), parallel over blocks of 48 weight rows: each output is a float32 sum over
// k in order, whatever the number of threads. at::mm in its place gave other bits with 2
// threads than with 1 on a 2-core AMD EPYC (Zen 4), where the determinism test
// (tests/test_cpu_isa.py) caught it, and ran at ~70 GFLOPS per core there against the
// tile's ~95.
at::Tensor panel_mm(const at::Tensor& x, const at::Tensor& w) {
  const SimdKernels& k = simd();
  const int64_t n = x.size(0), R = x.size(1), N = w.size(0);
  constexpr int64_t kBlock = 48;
  const at::Tensor wc = w.contiguous();
  at::Tensor y = at::empty({n, N}, x.options());
  at::Tensor panels = at::empty({ceil_div(n, k.panel_rows) * k.panel_rows * R}, x.options());
  k.pack_panels(x.data_ptr<float>(), n, R, panels.data_ptr<float>());
  std::vector<int64_t> rows(n);
  std::iota(rows.begin(), rows.end(), int64_t{0});
  const OutRows out{y.data_ptr(), SrcType::f32, N, rows.data()};
  const float* pp = panels.data_ptr<float>();
  const float* wp = wc.data_ptr<float>();
  at::parallel_for(0, ceil_div(N, kBlock), 1, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) {
      const int64_t n0 = b * kBlock;
      k.gemm_panels(pp, n, wp + n0 * R, R, std::min(kBlock, N - n0), R, out, n0);
    }
  });
  return y;
}

// The float32 path: the weight dequantized once, one panel GEMM per chunk of tokens.
void decompress_float(const at::Tensor& latent, const at::Tensor& pe_storage, int64_t rope,
                      const Rows& rows, const at::Tensor& w, float scale, at::Tensor& out_k,
                      at::Tensor& out_v) {
  const int64_t T = out_k.size(0), H = out_k.size(1), dk = out_k.size(2), dv = out_v.size(2);
  const int64_t R = w.size(1), dn = dk - rope;
  const int64_t chunk = std::max<int64_t>(16, kChunkFloats / std::max<int64_t>(1, w.size(0)));
  for (int64_t t0 = 0; t0 < T; t0 += chunk) {
    const int64_t n = std::min(chunk, T - t0);
    const at::Tensor x = gather_any(latent, rows.latent, t0, n, R, scale);
    const at::Tensor y = panel_mm(x, w).view({n, H, dn + dv});
    auto k = out_k.narrow(0, t0, n), v = out_v.narrow(0, t0, n);
    k.narrow(2, 0, dn).copy_(y.narrow(2, 0, dn));
    v.copy_(y.narrow(2, dn, dv));
    write_pe(pe_storage, rows, t0, n, rope, scale, out_k);
  }
}

// The AMX tiles take latent rows and weights exact in bf16, and outputs with unit
// last-dimension strides.
bool tiles_take(const at::Tensor& latent, const at::Tensor& w, const at::Tensor& out_k,
                const at::Tensor& out_v) {
  const auto exact = [](const at::Tensor& t) {
    return t.scalar_type() == at::kBFloat16 || t.scalar_type() == at::kFloat8_e4m3fn;
  };
  return amx_enabled() && exact(latent) && exact(w) && out_k.stride(2) == 1 &&
         out_v.stride(2) == 1;
}

// amx::Sink of MLA: block column c is weight row n0 + c, head n / (dn + dv), which is a
// no-PE key column below dn and a value column from there
// (out_k and out_v may differ in dtype: each has its own type and element size)
struct KvSink {
  char *k, *v;
  int64_t k_token, k_head, v_token, v_head, dn, dv, t0, n0, k_elem, v_elem;
  SrcType k_type, v_type;
  float scale;
  bool stream;
  static void store(void* ctx, const float* block, int64_t m0, int64_t rows, int64_t c0,
                    int64_t cols) {
    const KvSink& s = *static_cast<const KvSink*>(ctx);
    const int64_t seg = s.dn + s.dv;
    // the block's columns as runs within one head's k or v, found once per block: two
    // 64-bit divisions per row and run took 40% of the store time (T = 256, H = 16)
    struct Run { int64_t c, len; char* base; int64_t token, elem; SrcType type; };
    Run runs[amx::kBlockRows];
    int64_t nruns = 0;
    for (int64_t c = 0; c < cols;) {
      const int64_t n = s.n0 + c0 + c, h = n / seg, j = n % seg;
      const int64_t len = std::min(cols - c, j < s.dn ? s.dn - j : seg - j);
      runs[nruns++] = j < s.dn ? Run{c, len, s.k + (h * s.k_head + j) * s.k_elem, s.k_token,
                                     s.k_elem, s.k_type}
                               : Run{c, len, s.v + (h * s.v_head + j - s.dn) * s.v_elem,
                                     s.v_token, s.v_elem, s.v_type};
      c += len;
    }
    for (int64_t r = 0; r < nruns; ++r)
      amx::store_rows(block + runs[r].c, amx::kBlockRows, rows, runs[r].len, s.scale,
                      runs[r].type, runs[r].base + (s.t0 + m0) * runs[r].token * runs[r].elem,
                      runs[r].token * runs[r].elem, s.stream);
  }
};

// k_pe (n, rope) float32 rows, as out_k's type, into the heads whose first weight row
// (h * (dn + dv)) lies in [n0, n0 + cols), for tokens t0 .. t0 + n: each head's k_pe
// written by the task that computes its first columns, streamed like them. Broadcasting
// it with one at::copy_ after the products took 170 us of a ~1.5 ms call (T = 256,
// H = 16, 2 threads).
void store_pe_heads(const float* pe, int64_t n, int64_t rope, const KvSink& s, int64_t cols) {
  const int64_t seg = s.dn + s.dv;
  for (int64_t h = ceil_div(s.n0, seg); h * seg < s.n0 + cols; ++h)
    amx::store_rows(pe, rope, n, rope, 1.0f, s.k_type,
                    s.k + (s.t0 * s.k_token + h * s.k_head + s.dn) * s.k_elem,
                    s.k_token * s.k_elem, s.stream);
}

// Tokens a chunk of the AMX path packs at once (R = 512: 512 KB of bf16 tiles, in L2).
constexpr int64_t kTileChunk = 512;

// The AMX path (amx::gemm_rows: tokens as the A operand, so results come out token-major):
// per chunk of tokens, their latent rows converted to bf16 rows (fp8 and bf16 as they are
// stored: both exact in bf16), then in parallel every 128-row group of weights packed by
// its task into VNNI tiles (128 KB at R = 512, in L2; each 32-row pair of it in L1 while
// it meets every token) and multiplied with them. Packing the whole 4 MB weight up front
// instead took 0.8 ms of a 4.9 ms call (T = 256, H = 16, one core), bound by writing and
// re-reading the buffer. An fp8 cache's scale multiplies the results.
void decompress_tiles(const at::Tensor& latent, const at::Tensor& pe_storage, int64_t rope,
                      const Rows& rows, const at::Tensor& w,
                      const std::optional<at::Tensor>& w_scale, float scale, at::Tensor& out_k,
                      at::Tensor& out_v) {
  const int64_t T = out_k.size(0), N = weight_rows(w), R = weight_cols(w);
  const bool packed = is_packed(w), scaled = w_scale.has_value();
  if (T == 0) return;
  const at::Tensor wc = w.contiguous();
  const char* wp = static_cast<const char*>(wc.data_ptr());
  const amx::Src wtype = w.scalar_type() == at::kFloat8_e4m3fn ? amx::Src::fp8 : amx::Src::bf16;
  const amx::Src xtype =
      latent.scalar_type() == at::kFloat8_e4m3fn ? amx::Src::fp8 : amx::Src::bf16;
  const int64_t groups = ceil_div(N, amx::kGroupRows), welem = wc.element_size();
  const int64_t tile_elems = amx::panel_elems(amx::kTileRows, R);
  const int64_t chunk_rows = ceil_div(std::min(kTileChunk, T), amx::kBlockRows) * amx::kBlockRows;
  TileScratch tokens_buf(amx::panel_elems(chunk_rows, R));
  uint16_t* tokens = tokens_buf.data();
  const SrcType k_type = simd_type(out_k.scalar_type(), "out_k");
  const SrcType v_type = simd_type(out_v.scalar_type(), "out_v");
  const bool stream = out_k.numel() * out_k.element_size() + out_v.numel() * out_v.element_size() >=
                      amx::kStreamBytes;
  for (int64_t t0 = 0; t0 < T; t0 += kTileChunk) {
    const int64_t n = std::min(kTileChunk, T - t0);
    const int64_t padded = ceil_div(n, amx::kBlockRows) * amx::kBlockRows;
    at::parallel_for(0, padded / amx::kTileRows, 4, [&](int64_t begin, int64_t end) {
      const int64_t first = begin * amx::kTileRows;
      amx::pack_token_rows(latent.data_ptr(), xtype, rows.latent.data() + t0 + first,
                           std::max<int64_t>(0, std::min(n, end * amx::kTileRows) - first),
                           (end - begin) * amx::kTileRows, R, tokens + begin * tile_elems);
    });
    const at::Tensor pe = gather_any(pe_storage, rows.pe, t0, n, rope, scale);
    const int64_t wbuf_elems =
        packed ? 0 : amx::kGroupRows / amx::kTileRows * amx::chunks(R) * amx::kTileElems;
    for_each_task(groups, [&] { return TileScratch(wbuf_elems); },
                  [&](TileScratch& wbuf, int64_t b) {
      const int64_t n0 = b * amx::kGroupRows, cols = std::min(amx::kGroupRows, N - n0);
      const uint16_t* tiles = wbuf.data();
      if (packed)   // the group's tiles, in place: N is a multiple of 32
        tiles = reinterpret_cast<const uint16_t*>(wp) + n0 / amx::kTileRows * amx::chunks(R) * amx::kTileElems;
      else
        amx::pack_weights_vnni(wp + n0 * R * welem, wtype, R, cols, R, wbuf.data());
      const float* ws = scaled ? w_scale->data_ptr<float>() + (n0 / kScaleBlock) * w_scale->stride(0)
                               : nullptr;
      const amx::RowGemm g{tokens, n, R, tiles, cols, ws, scaled ? w_scale->stride(1) : 0};
      KvSink sink{static_cast<char*>(out_k.data_ptr()), static_cast<char*>(out_v.data_ptr()),
                  out_k.stride(0), out_k.stride(1), out_v.stride(0), out_v.stride(1),
                  out_k.size(2) - rope, out_v.size(2), t0, n0, out_k.element_size(),
                  out_v.element_size(), k_type, v_type, scale, stream};
      amx::gemm_rows(g, {&KvSink::store, &sink});
      store_pe_heads(pe.data_ptr<float>(), n, rope, sink, cols);
      amx::stream_fence();
    });
  }
}

// The bf16 dot products (simd.h, gemm_pairs; the avx512bf16 build) take latent rows
// and weights exact in bf16 as stored (a packed weight is bf16), and outputs with unit
// last-dimension strides.
bool pairs_take(const at::Tensor& latent, const at::Tensor& w, const at::Tensor& out_k,
                const at::Tensor& out_v) {
  const auto exact = [](const at::Tensor& t) {
    return t.scalar_type() == at::kBFloat16 || t.scalar_type() == at::kFloat8_e4m3fn;
  };
  return simd().gemm_pairs != nullptr && exact(latent) && exact(w) &&
         out_k.stride(2) == 1 && out_v.stride(2) == 1;
}

// Weight rows of one task of the pair path: rows [w_row0, w_row0 + n) of the weight, all
// in head h's no-PE key part (v false) or value part, its columns col0 .. col0 + n.
struct PartTask {
  int64_t w_row0, n, h, col0;
  bool v;
};

// Tokens a chunk of the pair path widens at once (R = 512: 512 KB of bf16 rows, in L2).
constexpr int64_t kPairChunk = 512;

// The path of CPUs with AVX512-BF16 and no AMX: per chunk of tokens, their latent rows
// widened to bf16 (fp8 and bf16 as stored: both exact), then in parallel every task widens
// its weight rows (at most one panel: a head's 128-row part gives 2 tasks, so H = 16
// gives 64 per chunk) into a panel and multiplies every token with it on bf16 dot products (gemm_pairs,
// block scales promoted per 128-wide K block), each token's results stored into out_k or
// out_v as they leave the registers: no float32 product is written. An fp8 cache's scale
// multiplies the results.
void decompress_pairs(const at::Tensor& latent, const at::Tensor& pe_storage, int64_t rope,
                      const Rows& rows, const at::Tensor& w,
                      const std::optional<at::Tensor>& w_scale, float scale, at::Tensor& out_k,
                      at::Tensor& out_v) {
  const SimdKernels& k = simd();
  const int64_t T = out_k.size(0), H = out_k.size(1), dn = out_k.size(2) - rope;
  const int64_t dv = out_v.size(2), R = weight_cols(w), PR = k.panel_rows;
  if (T == 0) return;
  // A packed weight is read in place where every task's rows start a 16-row group of it
  // (dn, dv multiples of 16: DeepSeek-V3's 128), its 16 x 32 tiles being 16 rows by k pair;
  // otherwise it goes back to its (N, R) rows, one copy of 2 bytes per weight. Its values
  // are the checkpoint's either way: the same bits as the weight as stored.
  const bool in_place = is_packed(w) && dn % amx::kTileRows == 0 && dv % amx::kTileRows == 0;
  const at::Tensor wc = is_packed(w) && !in_place ? unpack_rows(w) : w.contiguous();
  const at::Tensor wsc = w_scale.has_value() ? w_scale->contiguous() : at::Tensor();
  const float* ws = w_scale.has_value() ? wsc.data_ptr<float>() : nullptr;
  const bool w_fp8 = wc.scalar_type() == at::kFloat8_e4m3fn;
  const bool x_fp8 = latent.scalar_type() == at::kFloat8_e4m3fn;
  const int64_t ld = ceil_div(R, 2) * 2 + 32;   // one cache line past the row
  std::vector<PartTask> tasks;
  for (int64_t h = 0; h < H; ++h)
    for (const bool v : {false, true}) {
      const int64_t len = v ? dv : dn, first = h * (dn + dv) + (v ? dn : 0);
      for (int64_t c0 = 0; c0 < len; c0 += PR)
        tasks.push_back({first + c0, std::min(PR, len - c0), h, c0, v});
    }
  std::vector<int64_t> out_rows(T);
  std::iota(out_rows.begin(), out_rows.end(), int64_t{0});
  at::Tensor xbuf = at::empty({std::min(kPairChunk, T) * ld}, wc.options().dtype(at::kShort));
  uint16_t* xp = reinterpret_cast<uint16_t*>(xbuf.data_ptr<int16_t>());
  // every token's scale is the cache's, in every K block (ldxs 0)
  const std::vector<float> xs(ceil_div(R, kScaleBlock), scale);
  const SrcType k_type = simd_type(out_k.scalar_type(), "out_k");
  const SrcType v_type = simd_type(out_v.scalar_type(), "out_v");
  for (int64_t t0 = 0; t0 < T; t0 += kPairChunk) {
    const int64_t n = std::min(kPairChunk, T - t0);
    // k_pe rows as float32 (times the cache's scale), stored into each head by its task:
    // one at::copy_ broadcasting them after the products took 0.19 ms of a 2.98 ms call
    // (T = 256, H = 16, 2 threads of the AMD EPYC VM), 1.2 ms of 6.3 on one
    const at::Tensor pe = gather_any(pe_storage, rows.pe, t0, n, rope, scale);
    at::parallel_for(0, n, 16, [&](int64_t begin, int64_t end) {
      k.decode_pair_rows(latent.data_ptr(), x_fp8, rows.latent.data() + t0 + begin, end - begin,
                         R, ld, xp + begin * ld);
    });
    for_each_task(static_cast<int64_t>(tasks.size()), [] { return PairPanel(); },
                  [&](PairPanel& panel, int64_t i) {
      const PartTask& task = tasks[i];
      at::Tensor& out = task.v ? out_v : out_k;
      PairPanelRef p;
      if (in_place) {
        const auto* tiles = reinterpret_cast<const uint16_t*>(wc.data_ptr<at::BFloat16>());
        p = PairPanel::vnni_ref(tiles + task.w_row0 * R, R);
        panel.set_scales(ws, task.w_row0, task.n, R);
      } else {
        p = panel.pack(wc.data_ptr(), w_fp8, ws, task.w_row0, task.n, R);
      }
      char* head = static_cast<char*>(out.data_ptr()) + task.h * out.stride(1) * out.element_size();
      const OutRows y{head, task.v ? v_type : k_type, out.stride(0), out_rows.data() + t0};
      k.gemm_pairs(xp, ld, xs.data(), 0, n, p, panel.scale_data(), task.n, R, y, task.col0);
      if (!task.v && task.col0 == 0)   // the head's k_pe, by the task of its first K columns
        amx::store_rows(pe.data_ptr<float>(), rope, n, rope, 1.0f, k_type,
                        head + (t0 * out.stride(0) + dn) * out.element_size(),
                        out.stride(0) * out.element_size(), false);
    });
  }
}

// latent / pe: storage of the latent rows and of k_pe (the same cache when paged)
void decompress(const at::Tensor& latent, const at::Tensor& pe_storage, int64_t rope,
                const Rows& rows, const at::Tensor& w, const std::optional<at::Tensor>& w_scale,
                float scale, at::Tensor& out_k, at::Tensor& out_v) {
  if (tiles_take(latent, w, out_k, out_v))
    return decompress_tiles(latent, pe_storage, rope, rows, w, w_scale, scale, out_k, out_v);
  if (pairs_take(latent, w, out_k, out_v))
    return decompress_pairs(latent, pe_storage, rope, rows, w, w_scale, scale, out_k, out_v);
  decompress_float(latent, pe_storage, rope, rows, float_weight(w, w_scale), scale, out_k, out_v);
}

// Whether no two elements of t share memory, by a rule that is exact for every layout a
// slice, view or permutation of one buffer gives: its dimensions (of size > 1) taken by
// increasing stride, each stride passes the last element the smaller ones reach. MLA's
// outputs may have any strides but the last; an expanded one (stride 0) would have two
// values written to one place (the float32 path's copies refused it by throwing).
bool elements_apart(const at::Tensor& t) {
  std::vector<std::pair<int64_t, int64_t>> dims;   // (stride, size)
  for (int64_t d = 0; d < t.dim(); ++d)
    if (t.size(d) > 1) dims.emplace_back(t.stride(d), t.size(d));
  std::sort(dims.begin(), dims.end());
  int64_t reach = 0;   // the largest offset the dimensions so far reach
  for (const auto& [stride, size] : dims) {
    if (stride <= reach) return false;
    reach += stride * (size - 1);
  }
  return true;
}

// out_k (T, H, dn + rope) and out_v (T, H, dv) of float dtypes, dn, dv >= 1, for a weight
// of H * (dn + dv) rows, each element in memory of its own
Report check_outputs(const at::Tensor& out_k, const at::Tensor& out_v, int64_t T, int64_t rows,
                     int64_t rope) {
  MK_CHECK_VALUE(out_k.dim() == 3 && out_v.dim() == 3, "out_k and out_v must be 3-D, got ",
                 out_k.dim(), "-D and ", out_v.dim(), "-D");
  MK_CHECK_VALUE(out_k.size(0) == T && out_v.size(0) == T && out_k.size(1) == out_v.size(1),
                 "out_k and out_v must be (T, H, .) with T = ", T, ", got ", out_k.sizes(),
                 " and ", out_v.sizes());
  const int64_t H = out_k.size(1), dn = out_k.size(2) - rope, dv = out_v.size(2);
  MK_CHECK_VALUE(H >= 1 && dn >= 1 && dv >= 1 && rows == H * (dn + dv), "kv_b_proj has ", rows,
                 " rows, out_k/out_v give H * (dn + dv) = ", H * (dn + dv));
  MK_CHECK_TYPE(simd_dtype(out_k.scalar_type()) && simd_dtype(out_v.scalar_type()),
                "out_k and out_v must be float32, bfloat16 or float16, got ", out_k.scalar_type(),
                " and ", out_v.scalar_type());
  MK_CHECK_VALUE(elements_apart(out_k), "out_k has elements that share memory (strides ",
                 out_k.strides(), "): an output needs a place for each value");
  MK_CHECK_VALUE(elements_apart(out_v), "out_v has elements that share memory (strides ",
                 out_v.strides(), "): an output needs a place for each value");
  return {};
}

Report check_latent_dtype(const at::Tensor& t, const char* name) {
  MK_CHECK_TYPE(mla_input_dtype(t.scalar_type()),
                name, " must be float32, bfloat16, float16 or float8_e4m3fn, got ", t.scalar_type());
  return {};
}

}  // namespace

Report check_mla_decompress_kv_cpu(const at::Tensor& kv_c, const at::Tensor& k_pe,
                                   const at::Tensor& kv_b_proj,
                                   const std::optional<at::Tensor>& kv_b_proj_scale,
                                   const at::Tensor& out_k, const at::Tensor& out_v) {
  MK_CHECK_VALUE(kv_c.dim() == 2 && k_pe.dim() == 2, "kv_c and k_pe must be 2-D, got ",
                 kv_c.dim(), "-D and ", k_pe.dim(), "-D");
  MK_CHECK(check_latent_dtype(kv_c, "kv_c"));
  MK_CHECK(check_latent_dtype(k_pe, "k_pe"));
  MK_CHECK(check_weight(kv_b_proj));
  MK_CHECK(check_weight_scale(kv_b_proj, kv_b_proj_scale));
  const int64_t T = kv_c.size(0);
  MK_CHECK_VALUE(k_pe.size(0) == T && weight_cols(kv_b_proj) == kv_c.size(1),
                 "k_pe must have T = ", T, " rows and kv_b_proj R = kv_c.size(1) = ",
                 kv_c.size(1), " columns");
  // a last dimension of one element has any stride (the Python checks let it through too)
  MK_CHECK_VALUE((kv_c.size(1) <= 1 || kv_c.stride(1) == 1) &&
                     (k_pe.size(1) <= 1 || k_pe.stride(1) == 1),
                 "kv_c and k_pe need a contiguous last dimension");
  return check_outputs(out_k, out_v, T, weight_rows(kv_b_proj), k_pe.size(1));
}

Report check_mla_decompress_kv_paged_cpu(const at::Tensor& kv_cache, const at::Tensor& block_table,
                                         const at::Tensor& seq_lens, const at::Tensor& kv_b_proj,
                                         const std::optional<at::Tensor>& kv_b_proj_scale,
                                         const std::optional<at::Tensor>& kv_cache_scale,
                                         const at::Tensor& out_k, const at::Tensor& out_v) {
  MK_CHECK_VALUE(kv_cache.dim() == 3, "kv_cache must be 3-D, got ", kv_cache.dim(), "-D");
  MK_CHECK(check_latent_dtype(kv_cache, "kv_cache"));
  MK_CHECK(check_weight(kv_b_proj));
  MK_CHECK(check_weight_scale(kv_b_proj, kv_b_proj_scale));
  MK_CHECK_VALUE(kv_cache.stride(2) == 1, "kv_cache needs a contiguous last dimension");
  MK_CHECK_VALUE(kv_cache.size(1) >= 1, "kv_cache's block_size (dim 1) must be >= 1");
  const int64_t R = weight_cols(kv_b_proj), rope = kv_cache.size(2) - R;
  MK_CHECK_VALUE(rope >= 1, "kv_cache rows must be wider than kv_b_proj's R = ", R);
  MK_CHECK_VALUE(block_table.dim() == 2 && seq_lens.dim() == 1 &&
                     seq_lens.size(0) == block_table.size(0),
                 "block_table must be (B, max_blocks) and seq_lens (B,), got ",
                 block_table.sizes(), " and ", seq_lens.sizes());
  MK_CHECK_TYPE(index_dtype(block_table.scalar_type()) && index_dtype(seq_lens.scalar_type()),
                "block_table and seq_lens must be int32 or int64, got ", block_table.scalar_type(),
                " and ", seq_lens.scalar_type());
  if (kv_cache_scale.has_value())
    MK_CHECK_VALUE(kv_cache_scale->numel() == 1 && kv_cache_scale->scalar_type() == at::kFloat,
                   "kv_cache_scale must be one float32 value");
  return check_outputs(out_k, out_v, out_k.dim() == 3 ? out_k.size(0) : 0,
                       weight_rows(kv_b_proj), rope);
}

void mla_decompress_kv_cpu(const at::Tensor& kv_c, const at::Tensor& k_pe,
                           const at::Tensor& kv_b_proj,
                           const std::optional<at::Tensor>& kv_b_proj_scale, at::Tensor& out_k,
                           at::Tensor& out_v) {
  throw_if(check_mla_decompress_kv_cpu(kv_c, k_pe, kv_b_proj, kv_b_proj_scale, out_k, out_v));
  const int64_t T = kv_c.size(0);
  Rows rows{std::vector<int64_t>(T), std::vector<int64_t>(T)};
  for (int64_t t = 0; t < T; ++t) {
    rows.latent[t] = t * kv_c.stride(0);
    rows.pe[t] = t * k_pe.stride(0);
  }
  decompress(kv_c, k_pe, k_pe.size(1), rows, kv_b_proj, kv_b_proj_scale, 1.0f, out_k, out_v);
}

void mla_decompress_kv_paged_cpu(const at::Tensor& kv_cache, const at::Tensor& block_table,
                                 const at::Tensor& seq_lens, const at::Tensor& kv_b_proj,
                                 const std::optional<at::Tensor>& kv_b_proj_scale,
                                 const std::optional<at::Tensor>& kv_cache_scale,
                                 at::Tensor& out_k, at::Tensor& out_v) {
  throw_if(check_mla_decompress_kv_paged_cpu(kv_cache, block_table, seq_lens, kv_b_proj,
                                             kv_b_proj_scale, kv_cache_scale, out_k, out_v));
  const int64_t R = weight_cols(kv_b_proj), rope = kv_cache.size(2) - R;
  const int64_t T = out_k.size(0);
  const IndexValues bt(block_table), ln(seq_lens);
  const int64_t B = block_table.size(0), max_blocks = block_table.size(1);
  const int64_t num_blocks = kv_cache.size(0), page = kv_cache.size(1);
  Rows rows{std::vector<int64_t>(T, -1), std::vector<int64_t>(T, -1)};
  int64_t t = 0;
  for (int64_t b = 0; b < B && t < T; ++b) {
    for (int64_t p = 0; p < ln[b] && t < T; ++p, ++t) {
      const int64_t idx = p / page;
      const int64_t block = idx < max_blocks ? bt[b * max_blocks + idx] : -1;
      if (block < 0 || block >= num_blocks) continue;  // no row: zeros (as the Triton kernel)
      rows.latent[t] = block * kv_cache.stride(0) + (p % page) * kv_cache.stride(1);
      rows.pe[t] = rows.latent[t] + R;
    }
  }
  float scale = 1.0f;
  if (kv_cache_scale.has_value()) scale = kv_cache_scale->item<float>();
  decompress(kv_cache, kv_cache, rope, rows, kv_b_proj, kv_b_proj_scale, scale, out_k, out_v);
}

std::vector<int64_t> mla_paged_values_cpu(const at::Tensor& block_table,
                                          const at::Tensor& seq_lens, int64_t num_blocks,
                                          int64_t block_size) {
  // the callers check the shapes first; a direct call of other shapes reads nothing
  if (block_table.dim() != 2 || seq_lens.dim() != 1 || seq_lens.size(0) != block_table.size(0))
    return {5, 0, 0, 0, 0};
  if (block_size < 1) return {4, 0, 0, block_size, 0};   // no division by it
  const IndexValues bt(block_table), lens(seq_lens);
  const int64_t B = block_table.size(0), max_blocks = block_table.size(1);
  const auto need = [&](int64_t b) { return lens[b] > 0 ? ceil_div(lens[b], block_size) : 0; };
  for (int64_t b = 0; b < B; ++b)
    if (lens[b] < 0) return {1, b, 0, lens[b], 0};
  for (int64_t b = 0; b < B; ++b)
    if (need(b) > max_blocks) return {2, b, 0, lens[b], need(b)};
  int64_t total = 0;
  for (int64_t b = 0; b < B; ++b) {
    for (int64_t j = 0; j < need(b); ++j) {
      const int64_t id = bt[b * max_blocks + j];
      if (id < 0 || id >= num_blocks) return {3, b, j, id, 0};
    }
    total += lens[b];
  }
  return {0, 0, 0, total, 0};
}

}  // namespace moe_kernels
