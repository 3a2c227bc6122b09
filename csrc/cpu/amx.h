// bf16 matrix tiles (Intel AMX: AMX-TILE + AMX-BF16, Sapphire Rapids and later) for the CPU
// GEMMs whose operands are exact in bf16: FP8 e4m3 values (4 significant bits, exponents
// well inside bf16's) and bf16 values. A tile product multiplies exactly and sums in
// float32; FP8 block scales are applied per 128-wide K block ("promotion"), so results
// equal dequantize-then-multiply up to float32 rounding, as the vector GEMMs do.
//
// Roles: weight rows are the A operand (16 rows x 32 k per tile, k-contiguous, as stored)
// and tokens the B operand (VNNI: tile row p holds token pairs (k = 2p, 2p + 1)), so only
// the smaller token panel is transposed; a tile of results is C^T[weight row][token],
// transposed once when stored.
//
// Framework-free, like simd.h: amx.cpp is compiled with AVX-512 enabled and must not
// instantiate inline functions the rest of the extension links to.
#pragma once
#include <cstdint>

#include "simd.h"

namespace moe_kernels::amx {

constexpr int64_t kTileRows = 16;   // weight rows of an A tile, tokens of a B tile
constexpr int64_t kChunk = 32;      // k (bf16 values) per tile step
constexpr int64_t kTileElems = kTileRows * kChunk;   // uint16 per tile (1 KB)
constexpr int64_t kBlockRows = 2 * kTileRows;        // weight rows per gemm call
constexpr int64_t kScaleK = 128;                     // K per FP8 scale block

// The CPU has AMX-BF16 and the kernel lets this process use tile data (asked once).
bool supported();

enum class Src : int { fp8 = 0, bf16 = 1 };

inline int64_t chunks(int64_t K) { return (K + kChunk - 1) / kChunk; }
// uint16 of a packed panel of n rows (weights) or n tokens
inline int64_t panel_elems(int64_t n, int64_t K) {
  return (n + kTileRows - 1) / kTileRows * chunks(K) * kTileElems;
}

// Rows [0, n) of w (rows ldw elements apart) as blocks of kBlockRows rows, each 2 x
// chunks(K) A tiles: block b, tile t, chunk c at dst + b * block_elems(K) +
// (t * chunks(K) + c) * kTileElems holds, at r * kChunk + k,
// w[(32 b + 16 t + r) * ldw + 32 c + k]; zero past n rows (to the block's end) and K.
void pack_weights(const void* w, Src type, int64_t ldw, int64_t n, int64_t K, uint16_t* dst);

// Tokens i < m, token i at element offset offsets[i] of x (-1: a zero token), as
// ceil(m / 16) x chunks(K) VNNI B tiles: token tile j, chunk c, row p holds the pairs
// (k = 32 c + 2 p, + 1) of tokens 16 j .. 16 j + 15; zero past m tokens and K.
void pack_tokens(const void* x, Src type, const int64_t* offsets, int64_t m, int64_t K,
                 uint16_t* dst);

// A call's weight rows: up to kGroupRows, packed by pack_weights kBlockRows at a time,
// the blocks kBlockElems(K) apart. 128 rows: one FP8 scale block, and the four blocks'
// 128-wide K slices (4 x 8 KB) stay in L1 beside one token pair's (8 KB), so that a tile
// is loaded from L2 once and reused from L1 (amx.cpp).
constexpr int64_t kGroupRows = 128;
inline int64_t block_elems(int64_t K) { return panel_elems(kBlockRows, K); }

// One call's results, handed over as float32 blocks: token i < rows of the block is token
// m0 + i of the call, column c < cols is weight row c0 + c; at block + i * kBlockRows + c.
struct Sink {
  void (*store)(void* ctx, const float* block, int64_t m0, int64_t rows, int64_t c0,
                int64_t cols);
  void* ctx;
};

struct Gemm {
  const uint16_t* weights;       // the call's weight rows, packed as above
  const uint16_t* tokens;        // pack_tokens of m tokens
  int64_t m, K, cols;            // cols: the call's weight rows (<= kGroupRows)
  // Results sum, over 128-wide K blocks kb, weight_scale[kb * weight_scale_stride] *
  // token_scale[j][kb][i] * (the block's exact product) for token i of token tile j:
  // token_scale (ceil(m / 16), ceil(K / 128), 16). Either may be nullptr for ones. The
  // call's rows share one weight scale: they lie in one 128-row scale block.
  const float* weight_scale;
  int64_t weight_scale_stride;
  const float* token_scale;
};

// Every token of g against the call's weight rows, results to sink; configures the tiles
// of the calling thread on entry and releases them on return.
void gemm(const Gemm& g, const Sink& sink);

// The other orientation, for calls with many tokens against one weight group (MLA): tokens
// are the A operand, read as stored (bf16 rows, k-contiguous, ld elements apart), and weight
// rows the B operand in VNNI form, so that a result tile is already [token][weight row]:
// nothing is transposed after the products, and the tokens need no repacking.

// Token rows as the A operand, in tiles: token tile j (16 tokens), chunk c at
// dst + (j * chunks(K) + c) * kTileElems holds, at i * kChunk + k, the bf16 of element
// 32 c + k of token 16 j + i (element offset offsets[16 j + i] of x; -1: zeros); zero past K,
// and for tokens [m, rows) (rows: m rounded up to kBlockRows, so that every token pair
// reads whole tiles). A tile is 1 KB in one piece, read in order, where 16 rows 1 KB apart
// (K = 512) would fall into 4 of the 64 sets of L1.
void pack_token_rows(const void* x, Src type, const int64_t* offsets, int64_t m, int64_t rows,
                     int64_t K, uint16_t* dst);

// Rows [0, n) of w (rows ldw elements apart) as VNNI B tiles: weight tile j (16 rows),
// chunk c at dst + (j * chunks(K) + c) * kTileElems holds, at p * kChunk + 2 q + e,
// w[(16 j + q) * ldw + 32 c + 2 p + e]; zero past n rows (up to a kBlockRows multiple)
// and past K. Fp8 rows are decoded with AVX512-VBMI, which both builds that call this
// (amx, avx512bf16) require.
void pack_weights_vnni(const void* w, Src type, int64_t ldw, int64_t n, int64_t K,
                       uint16_t* dst);

struct RowGemm {
  const uint16_t* tokens;        // pack_token_rows of m tokens
  int64_t m, K;
  const uint16_t* weights;       // pack_weights_vnni of the call's cols (<= kGroupRows) rows
  int64_t cols;
  // Results sum, over 128-wide K blocks kb, weight_scale[kb * weight_scale_stride] * (the
  // block's exact product); nullptr: the product over all of K, unscaled.
  const float* weight_scale;
  int64_t weight_scale_stride;
};

// Every token of g against the call's weight rows, results to sink as gemm() hands them
// over; configures the tiles of the calling thread on entry and releases them on return.
void gemm_rows(const RowGemm& g, const Sink& sink);

// dst[k] = type(src[k] * scale) for k < n, as torch rounds (bf16 and f16 to nearest even).
// stream: whole 64-byte lines at a 64-byte aligned dst are written past the caches
// (non-temporal), which skips reading each line before it is written: storing MLA's
// 2.6 MB of K / V (T = 256, H = 16) cost 2.0 ms that way and 0.5 ms streamed (1 core).
void store_row(const float* src, int64_t n, float scale, SrcType type, void* dst, bool stream);

// store_row of rows rows: row i from src + i * ld (floats) to dst + i * dst_stride (bytes).
// One call per block column run instead of one per row: a call per row took as long as a
// third of the tile products of its block (MLA shape).
void store_rows(const float* src, int64_t ld, int64_t rows, int64_t n, float scale,
                SrcType type, void* dst, int64_t dst_stride, bool stream);

// Orders this thread's streamed stores (store_row) before what it writes next, so they
// are visible to the threads that join it; gemm() ends with one.
void stream_fence();

// Outputs at least this large are streamed (store_row): half a core's L2 and more, whose
// lines the rest of the call's work evicts before a reader comes anyway.
constexpr int64_t kStreamBytes = int64_t{1} << 20;

}  // namespace moe_kernels::amx
