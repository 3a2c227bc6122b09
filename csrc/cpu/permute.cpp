// Token permutation on the CPU (semantics: moe_kernels/reference/permute.py).
// The index computation is one sequential pass in pair order (which is what makes ranks
// stable: ascending pair index inside each expert); row copies and the weighted
// reduction run in parallel over rows / tokens.
#include <ATen/Parallel.h>
#include <ATen/ATen.h>

#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#include "../fp8.h"
#include "../ops.h"
#include "../permute.h"
#include "simd.h"

namespace moe_kernels {
namespace {

template <typename id_t>
int64_t expert_of(const id_t* ids, int64_t p, int64_t E) {
  const int64_t e = static_cast<int64_t>(ids[p]);
  return (e >= 0 && e < E) ? e : -1;
}

// Each expert's pairs counted into cnt (E entries, zeroed here), and its padded segment's
// start into off (E + 1 entries: off[e + 1] - off[e] = cnt[e] rounded up to align).
template <typename index_t>
void padded_offsets(const index_t* ids, int64_t P, int64_t E, int64_t align, int32_t* cnt,
                    int64_t* off) {
  std::fill(cnt, cnt + E, 0);
  for (int64_t p = 0; p < P; ++p) {
    const int64_t e = expert_of(ids, p, E);
    if (e >= 0) ++cnt[e];
  }
  off[0] = 0;
  for (int64_t e = 0; e < E; ++e) off[e + 1] = off[e] + (cnt[e] + align - 1) / align * align;
}

// Non-temporal row writes (SSE2, the x86-64 baseline): dst 16-byte aligned, bytes a
// multiple of 64. src null writes zeros. A stream_fence() orders them before the rows are
// read (by another thread, once parallel_for has returned).
void stream_row(char* dst, const char* src, int64_t bytes) {
  __m128i* d = reinterpret_cast<__m128i*>(dst);
  const __m128i* s = reinterpret_cast<const __m128i*>(src);
  for (int64_t i = 0; i < bytes / 16; ++i)
    _mm_stream_si128(d + i, s != nullptr ? _mm_loadu_si128(s + i) : _mm_setzero_si128());
}

void stream_fence() { _mm_sfence(); }

// Rows written past the last-level cache's size are out of it when read next anyway:
// written non-temporally they skip the read for ownership each cached store pays
// (T=512 K=8 H=7168 bf16 into out=, 58.7 MB, 2 Zen 4 threads: 3.1-3.7 -> 2.3-3.0 ms;
// docs/permute.md).
// Below that size cached stores leave the rows in cache for the next op.
bool stream_rows(const char* dst, int64_t rows, int64_t row_bytes) {
  return row_bytes % 64 == 0 && reinterpret_cast<uintptr_t>(dst) % 16 == 0 &&
         rows * row_bytes > last_level_cache_bytes();
}

}  // namespace

Report check_permute_index_cpu(const at::Tensor& topk_ids, int64_t num_experts, int64_t align) {
  return check_topk_ids(topk_ids, num_experts, align, "align");
}

Report check_moe_align_block_size_cpu(const at::Tensor& topk_ids, int64_t num_experts,
                                      int64_t block_size) {
  return check_topk_ids(topk_ids, num_experts, block_size, "block_size");
}

std::vector<at::Tensor> permute_index_cpu(const at::Tensor& topk_ids_in, int64_t num_experts,
                                          int64_t align) {
  throw_if(check_permute_index_cpu(topk_ids_in, num_experts, align));
  const at::Tensor topk_ids = topk_ids_in.contiguous();
  const int64_t T = topk_ids.size(0), K = topk_ids.size(1), P = T * K, E = num_experts;
  const int64_t R = permuted_rows(P, E, align);
  auto i32 = topk_ids.options().dtype(at::kInt);
  at::Tensor offsets = at::empty({E + 1}, topk_ids.options().dtype(at::kLong));
  at::Tensor counts = at::empty({E}, i32);
  at::Tensor m_indices = at::full({R}, -1, i32);
  at::Tensor row_of_pair = at::empty({T, K}, i32);
  at::Tensor pair_of_row = at::full({R}, -1, i32);
  int64_t* off = offsets.data_ptr<int64_t>();
  int32_t* cnt = counts.data_ptr<int32_t>();
  int32_t* m_idx = m_indices.data_ptr<int32_t>();
  int32_t* rop = row_of_pair.data_ptr<int32_t>();
  int32_t* por = pair_of_row.data_ptr<int32_t>();
  AT_DISPATCH_INDEX_TYPES(topk_ids.scalar_type(), "permute_index_cpu", [&] {
    const index_t* ids = topk_ids.data_ptr<index_t>();
    padded_offsets(ids, P, E, align, cnt, off);
    std::vector<int64_t> cursor(off, off + E);
    for (int64_t p = 0; p < P; ++p) {
      const int64_t e = expert_of(ids, p, E);
      if (e < 0) {
        rop[p] = -1;
        continue;
      }
      const int64_t row = cursor[e]++;
      rop[p] = static_cast<int32_t>(row);
      por[row] = static_cast<int32_t>(p);
      m_idx[row] = static_cast<int32_t>(e);
    }
  });
  return {offsets, counts, m_indices, row_of_pair, pair_of_row};
}

Report check_permute_masked_index_cpu(const at::Tensor& topk_ids, int64_t num_experts,
                                      int64_t max_tokens) {
  MK_CHECK(check_routing(topk_ids, num_experts));
  MK_CHECK_VALUE(topk_ids.numel() <= kInt32Max, "topk_ids has ", topk_ids.numel(),
                 " pairs, more than int32 indices address");
  MK_CHECK_VALUE(max_tokens >= 0 && max_tokens <= kInt32Max,
                 "max_tokens must be in [0, 2^31 - 1], got ", max_tokens);
  MK_CHECK_VALUE(num_experts * max_tokens <= kInt32Max, "the layout of ", topk_ids.numel(),
                 " pairs with max_tokens = ", max_tokens, " has ", num_experts * max_tokens,
                 " rows, more than int32 indices address");
  return {};
}

// The masked (E, M) layout in one pass in pair order: slot = the pair's rank in its
// expert, kept while < M (reference.masked_index, which derives it from permute_index's
// layout with fifteen torch calls: about 100 us of host time at one token).
std::vector<at::Tensor> permute_masked_index_cpu(const at::Tensor& topk_ids_in,
                                                 int64_t num_experts, int64_t max_tokens) {
  throw_if(check_permute_masked_index_cpu(topk_ids_in, num_experts, max_tokens));
  const at::Tensor topk_ids = topk_ids_in.contiguous();
  const int64_t T = topk_ids.size(0), K = topk_ids.size(1), P = T * K, E = num_experts;
  const int64_t M = max_tokens;
  auto i32 = topk_ids.options().dtype(at::kInt);
  at::Tensor masked_m = at::empty({E}, i32);
  at::Tensor counts = at::zeros({E}, i32);
  at::Tensor row_of_pair = at::empty({T, K}, i32);
  at::Tensor pair_of_row = at::full({E * M}, -1, i32);
  int32_t* cnt = counts.data_ptr<int32_t>();
  int32_t* rop = row_of_pair.data_ptr<int32_t>();
  int32_t* por = pair_of_row.data_ptr<int32_t>();
  AT_DISPATCH_INDEX_TYPES(topk_ids.scalar_type(), "permute_masked_index_cpu", [&] {
    const index_t* ids = topk_ids.data_ptr<index_t>();
    for (int64_t p = 0; p < P; ++p) {
      const int64_t e = expert_of(ids, p, E);
      const int64_t slot = e >= 0 ? cnt[e]++ : M;
      rop[p] = slot < M ? static_cast<int32_t>(e * M + slot) : -1;
      if (slot < M) por[e * M + slot] = static_cast<int32_t>(p);
    }
  });
  int32_t* mm = masked_m.data_ptr<int32_t>();
  for (int64_t e = 0; e < E; ++e) mm[e] = static_cast<int32_t>(std::min<int64_t>(cnt[e], M));
  return {masked_m, counts, row_of_pair, pair_of_row};
}

// vLLM's layout straight from the ids, in pair order as permute_index_cpu places them.
// Derived from permute_index_cpu's layout by ATen calls (where, to, slice) it took 12-22
// us at one token and 113-165 us at 4096 x top-8, against 4.0-4.3 and 53-65 us here
// (E = 256, block 64, 2 Zen 4 threads, alternating runs).
std::vector<at::Tensor> moe_align_block_size_cpu(const at::Tensor& topk_ids_in,
                                                 int64_t num_experts, int64_t block_size) {
  throw_if(check_moe_align_block_size_cpu(topk_ids_in, num_experts, block_size));
  const at::Tensor topk_ids = topk_ids_in.contiguous();
  const int64_t P = topk_ids.numel(), E = num_experts;
  const int64_t R = permuted_rows(P, E, block_size);
  auto i32 = topk_ids.options().dtype(at::kInt);
  at::Tensor sorted_ids = at::full({R}, P, i32);
  at::Tensor expert_ids = at::full({(R + block_size - 1) / block_size}, -1, i32);
  at::Tensor post_padded = at::empty({1}, i32);
  std::vector<int32_t> cnt(E);
  std::vector<int64_t> off(E + 1);
  int32_t* sorted = sorted_ids.data_ptr<int32_t>();
  AT_DISPATCH_INDEX_TYPES(topk_ids.scalar_type(), "moe_align_block_size_cpu", [&] {
    const index_t* ids = topk_ids.data_ptr<index_t>();
    padded_offsets(ids, P, E, block_size, cnt.data(), off.data());
    std::vector<int64_t> cursor(off.begin(), off.end() - 1);
    for (int64_t p = 0; p < P; ++p) {
      const int64_t e = expert_of(ids, p, E);
      if (e >= 0) sorted[cursor[e]++] = static_cast<int32_t>(p);
    }
  });
  int32_t* eid = expert_ids.data_ptr<int32_t>();
  for (int64_t e = 0; e < E; ++e)
    for (int64_t b = off[e] / block_size; b < off[e + 1] / block_size; ++b)
      eid[b] = static_cast<int32_t>(e);
  post_padded.data_ptr<int32_t>()[0] = static_cast<int32_t>(off[E]);
  return {sorted_ids, expert_ids, post_padded};
}

Report check_gather_rows_cpu(const at::Tensor& x, const at::Tensor& pair_of_row,
                             const at::Tensor& row_of_pair) {
  MK_CHECK_VALUE(x.dim() == 2, "x must be 2-D (T, D), got ", x.dim(), "-D");
  MK_CHECK_VALUE(pair_of_row.dim() == 1, "pair_of_row must be 1-D (R,), got ", pair_of_row.dim(),
                 "-D");
  MK_CHECK_TYPE(pair_of_row.scalar_type() == at::kInt, "pair_of_row must be int32, got ",
                pair_of_row.scalar_type());
  MK_CHECK_VALUE(row_of_pair.dim() == 2 && row_of_pair.size(0) == x.size(0),
                 "row_of_pair must be (T, K) with T = x.size(0) = ", x.size(0), ", got shape ",
                 row_of_pair.sizes());
  return {};
}

Report check_gather_rows_out_cpu(const at::Tensor& x, const at::Tensor& pair_of_row,
                                 const at::Tensor& row_of_pair, const at::Tensor& out) {
  MK_CHECK(check_gather_rows_cpu(x, pair_of_row, row_of_pair));
  const int64_t R = pair_of_row.size(0), D = x.size(1);
  MK_CHECK_VALUE(out.dim() == 2 && out.size(0) == R && out.size(1) == D && out.is_contiguous(),
                 "out must be contiguous (", R, ", ", D, "), got shape ", out.sizes());
  MK_CHECK_TYPE(out.scalar_type() == x.scalar_type(), "out must have x's dtype ",
                x.scalar_type(), ", got ", out.scalar_type());
  return {};
}

void gather_rows_out_cpu(const at::Tensor& x_in, const at::Tensor& pair_of_row,
                         const at::Tensor& row_of_pair, at::Tensor& out) {
  throw_if(check_gather_rows_out_cpu(x_in, pair_of_row, row_of_pair, out));
  // x read in place where a row's elements are adjacent (any row stride: a slice of wider
  // rows, ep_dispatch's payload rows), else copied first
  const at::Tensor x = x_in.size(1) <= 1 || x_in.stride(1) == 1 ? x_in : x_in.contiguous();
  const at::Tensor src = pair_of_row.contiguous();
  const int64_t R = src.numel(), D = x.size(1), K = row_of_pair.size(1);
  const int64_t P = x.size(0) * K;
  const int64_t row_bytes = D * x.element_size(), x_row_bytes = x.stride(0) * x.element_size();
  const char* xp = static_cast<const char*>(x.data_ptr());
  char* op = static_cast<char*>(out.data_ptr());
  const int32_t* sp = src.data_ptr<int32_t>();
  const bool stream = stream_rows(op, R, row_bytes);
  at::parallel_for(0, R, 64, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const int64_t p = sp[r];
      // any other p is padding: never read out of bounds
      const char* row = p >= 0 && p < P ? xp + (p / K) * x_row_bytes : nullptr;
      if (stream)
        stream_row(op + r * row_bytes, row, row_bytes);
      else if (row != nullptr)
        std::memcpy(op + r * row_bytes, row, row_bytes);
      else
        std::memset(op + r * row_bytes, 0, row_bytes);
    }
    if (stream) stream_fence();
  });
}

at::Tensor gather_rows_cpu(const at::Tensor& x, const at::Tensor& pair_of_row,
                           const at::Tensor& row_of_pair) {
  throw_if(check_gather_rows_cpu(x, pair_of_row, row_of_pair));
  at::Tensor out = at::empty({pair_of_row.size(0), x.size(1)}, x.options());
  gather_rows_out_cpu(x, pair_of_row, row_of_pair, out);
  return out;
}

Report check_unpermute_cpu(const at::Tensor& expert_out, const at::Tensor& row_of_pair,
                           const at::Tensor& topk_weights) {
  MK_CHECK_VALUE(expert_out.dim() == 2, "expert_out must be 2-D (R, H), got ", expert_out.dim(),
                 "-D");
  MK_CHECK_TYPE(simd_dtype(expert_out.scalar_type()),
                "expert_out must be float32, bfloat16 or float16, got ", expert_out.scalar_type());
  MK_CHECK_VALUE(row_of_pair.dim() == 2, "row_of_pair must be 2-D (T, K), got ",
                 row_of_pair.dim(), "-D");
  MK_CHECK_TYPE(row_of_pair.scalar_type() == at::kInt, "row_of_pair must be int32, got ",
                row_of_pair.scalar_type());
  MK_CHECK_VALUE(topk_weights.sizes() == row_of_pair.sizes(),
                 "topk_weights must have the shape of row_of_pair ", row_of_pair.sizes(),
                 ", got ", topk_weights.sizes());
  MK_CHECK_TYPE(at::isFloatingType(topk_weights.scalar_type()),
                "topk_weights must be a float tensor, got ", topk_weights.scalar_type());
  return {};
}

Report check_unpermute_out_cpu(const at::Tensor& expert_out, const at::Tensor& row_of_pair,
                               const at::Tensor& topk_weights, const at::Tensor& out) {
  MK_CHECK(check_unpermute_cpu(expert_out, row_of_pair, topk_weights));
  const int64_t T = row_of_pair.size(0), H = expert_out.size(1);
  MK_CHECK_VALUE(out.dim() == 2 && out.size(0) == T && out.size(1) == H && out.is_contiguous(),
                 "out must be contiguous (", T, ", ", H, "), got shape ", out.sizes());
  MK_CHECK_TYPE(out.scalar_type() == expert_out.scalar_type(), "out must have expert_out's dtype ",
                expert_out.scalar_type(), ", got ", out.scalar_type());
  return {};
}

void unpermute_out_cpu(const at::Tensor& expert_out_in, const at::Tensor& row_of_pair_in,
                       const at::Tensor& topk_weights, at::Tensor& out) {
  throw_if(check_unpermute_out_cpu(expert_out_in, row_of_pair_in, topk_weights, out));
  const at::Tensor eo = expert_out_in.contiguous();
  const at::Tensor rows = row_of_pair_in.contiguous();
  const at::Tensor w = topk_weights.to(at::kFloat).contiguous();
  const int64_t T = rows.size(0), K = rows.size(1), R = eo.size(0), H = eo.size(1);
  const SrcType type = simd_type(eo.scalar_type(), "expert_out");
  const char* src = static_cast<const char*>(eo.data_ptr());
  char* dst = static_cast<char*>(out.data_ptr());
  const int64_t row_bytes = H * static_cast<int64_t>(eo.element_size());
  const int32_t* rp = rows.data_ptr<int32_t>();
  const float* wp = w.data_ptr<float>();
  const SimdKernels& k = simd();
  // per token: the routed pairs' rows and weights, in pair order, summed by the vector
  // kernel with its accumulators in registers (512 tokens x 8 rows, H = 2048, 2 threads:
  // bf16 758 -> 396-402 us, float32 949 -> 700-708 us, against a float32 row buffer
  // updated row by row)
  at::parallel_for(0, T, 16, [&](int64_t begin, int64_t end) {
    std::vector<const void*> pair_rows(K);
    std::vector<float> pair_w(K);
    for (int64_t t = begin; t < end; ++t) {
      int64_t n = 0;
      for (int64_t j = 0; j < K; ++j) {
        const int64_t r = rp[t * K + j];
        if (r < 0 || r >= R) continue;  // skipped pair adds nothing (even a NaN row)
        pair_rows[n] = src + r * row_bytes;
        pair_w[n++] = wp[t * K + j];
      }
      k.weighted_row_sum(pair_rows.data(), pair_w.data(), n, H, type, dst + t * row_bytes);
    }
  });
}

at::Tensor unpermute_cpu(const at::Tensor& expert_out, const at::Tensor& row_of_pair,
                         const at::Tensor& topk_weights) {
  throw_if(check_unpermute_cpu(expert_out, row_of_pair, topk_weights));
  at::Tensor out = at::empty({row_of_pair.size(0), expert_out.size(1)}, expert_out.options());
  unpermute_out_cpu(expert_out, row_of_pair, topk_weights, out);
  return out;
}

}  // namespace moe_kernels
