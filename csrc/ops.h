// Declarations of every kernel entry point (CPU always, CUDA when built with it) and of
// its argument check `check_<entry>` (same arguments; reports, never throws: csrc/checks.h).
#pragma once
#include <ATen/ATen.h>

#include <optional>
#include <string>
#include <tuple>
#include <vector>

#include "checks.h"

namespace moe_kernels {

using GroupedTopkFn = std::tuple<at::Tensor, at::Tensor>(
    const at::Tensor& logits, const std::optional<at::Tensor>& correction_bias,
    int64_t top_k, int64_t num_expert_group, int64_t topk_group,
    c10::string_view scoring_func, c10::string_view group_scoring, bool renormalize,
    double routed_scaling_factor, int64_t shared_expert_id);

GroupedTopkFn grouped_topk_cpu;

using GroupedTopkCheck = Report(
    const at::Tensor& logits, const std::optional<at::Tensor>& correction_bias,
    int64_t top_k, int64_t num_expert_group, int64_t topk_group,
    c10::string_view scoring_func, c10::string_view group_scoring, bool renormalize,
    double routed_scaling_factor, int64_t shared_expert_id);
GroupedTopkCheck check_grouped_topk_cpu;

// Token permutation (csrc/cpu/permute.cpp).
std::vector<at::Tensor> permute_index_cpu(const at::Tensor& topk_ids, int64_t num_experts,
                                          int64_t align);
std::vector<at::Tensor> moe_align_block_size_cpu(const at::Tensor& topk_ids,
                                                 int64_t num_experts, int64_t block_size);
std::vector<at::Tensor> permute_masked_index_cpu(const at::Tensor& topk_ids,
                                                 int64_t num_experts, int64_t max_tokens);
at::Tensor gather_rows_cpu(const at::Tensor& x, const at::Tensor& pair_of_row,
                           const at::Tensor& row_of_pair);
at::Tensor unpermute_cpu(const at::Tensor& expert_out, const at::Tensor& row_of_pair,
                         const at::Tensor& topk_weights);
// The `_out` entry points write into a caller's buffer (shapes checked here; no overlap
// with the inputs, checked in Python); the functional ones allocate and call them.
void gather_rows_out_cpu(const at::Tensor& x, const at::Tensor& pair_of_row,
                         const at::Tensor& row_of_pair, at::Tensor& out);
void unpermute_out_cpu(const at::Tensor& expert_out, const at::Tensor& row_of_pair,
                       const at::Tensor& topk_weights, at::Tensor& out);
// FP8 quantization (csrc/cpu/fp8.cpp) and grouped GEMMs (csrc/cpu/grouped_gemm.cpp).
std::tuple<at::Tensor, at::Tensor> quantize_fp8_per_token_group_cpu(
    const at::Tensor& x, int64_t group_size, double eps, bool scale_ue8m0,
    bool column_major_scales);
std::tuple<at::Tensor, at::Tensor> quantize_fp8_block_cpu(const at::Tensor& w, int64_t block_n,
                                                          int64_t block_k, double eps);
at::Tensor dequantize_fp8_block_cpu(const at::Tensor& q, const at::Tensor& s, int64_t block_n,
                                    int64_t block_k, at::ScalarType dtype);
std::tuple<at::Tensor, at::Tensor> silu_and_mul_quant_fp8_cpu(const at::Tensor& x,
                                                              int64_t group_size, double eps);
void quantize_fp8_per_token_group_out_cpu(const at::Tensor& x, int64_t group_size, double eps,
                                          bool scale_ue8m0, at::Tensor& q, at::Tensor& s);
void silu_and_mul_quant_fp8_out_cpu(const at::Tensor& x, int64_t group_size, double eps,
                                    at::Tensor& q, at::Tensor& s);
// The masked layout (csrc/cpu/fp8.cpp): x (E, M, 2N) -> q (E, M, N), s (E, M, ceil(N / g));
// rows i >= masked_m[e] are not read: zeros, or with zero_fill false not written.
std::tuple<at::Tensor, at::Tensor> silu_and_mul_quant_fp8_masked_cpu(const at::Tensor& x,
                                                                     const at::Tensor& masked_m,
                                                                     int64_t group_size,
                                                                     double eps);
void silu_and_mul_quant_fp8_masked_out_cpu(const at::Tensor& x, const at::Tensor& masked_m,
                                           int64_t group_size, double eps, bool zero_fill,
                                           at::Tensor& q, at::Tensor& s);
at::Tensor grouped_gemm_fp8_cpu(const at::Tensor& a, const at::Tensor& a_scales,
                                const at::Tensor& b, const at::Tensor& b_scales,
                                const at::Tensor& m_indices, at::ScalarType out_dtype);
at::Tensor grouped_gemm_fp8_masked_cpu(const at::Tensor& a, const at::Tensor& a_scales,
                                       const at::Tensor& b, const at::Tensor& b_scales,
                                       const at::Tensor& masked_m, at::ScalarType out_dtype);
void grouped_gemm_fp8_out_cpu(const at::Tensor& a, const at::Tensor& a_scales,
                              const at::Tensor& b, const at::Tensor& b_scales,
                              const at::Tensor& m_indices, at::Tensor& out);
// zero_fill false: out's rows past masked_m are left as they are (DeepGEMM's masked GEMM)
void grouped_gemm_fp8_masked_out_cpu(const at::Tensor& a, const at::Tensor& a_scales,
                                     const at::Tensor& b, const at::Tensor& b_scales,
                                     const at::Tensor& masked_m, bool zero_fill,
                                     at::Tensor& out);
// The routed experts' FP8 forward (csrc/cpu/fused_moe.cpp): the stages above in one call.
at::Tensor fused_moe_fp8_cpu(const at::Tensor& hidden, const at::Tensor& w13,
                             const at::Tensor& w13_scales, const at::Tensor& w2,
                             const at::Tensor& w2_scales, const at::Tensor& topk_weights,
                             const at::Tensor& topk_ids);
// ... into out (T, H) of hidden's dtype, which may be hidden itself (read before written).
void fused_moe_fp8_out_cpu(const at::Tensor& hidden, const at::Tensor& w13,
                           const at::Tensor& w13_scales, const at::Tensor& w2,
                           const at::Tensor& w2_scales, const at::Tensor& topk_weights,
                           const at::Tensor& topk_ids, at::Tensor& out);
// MLA latent KV decompression (csrc/cpu/mla.cpp): fills out_k (T, H, dn + rope) and
// out_v (T, H, dv).
void mla_decompress_kv_cpu(const at::Tensor& kv_c, const at::Tensor& k_pe,
                           const at::Tensor& kv_b_proj,
                           const std::optional<at::Tensor>& kv_b_proj_scale, at::Tensor& out_k,
                           at::Tensor& out_v);
void mla_decompress_kv_paged_cpu(const at::Tensor& kv_cache, const at::Tensor& block_table,
                                 const at::Tensor& seq_lens, const at::Tensor& kv_b_proj,
                                 const std::optional<at::Tensor>& kv_b_proj_scale,
                                 const std::optional<at::Tensor>& kv_cache_scale,
                                 at::Tensor& out_k, at::Tensor& out_v);

// The paged call's value checks on the host (seq_lens >= 0, block tables long enough,
// block ids in range where used), reported instead of thrown, the first problem found as
// {kind, b, j, value, need}: kind 0 none (value = sum(seq_lens)), 1 seq_lens[b] = value < 0,
// 2 sequence b (length value) needs `need` blocks, more than the table has, 3
// block_table[b, j] = value out of range, 4 block_size = value < 1. The Python layer
// raises (ops/mla.py).
std::vector<int64_t> mla_paged_values_cpu(const at::Tensor& block_table,
                                          const at::Tensor& seq_lens, int64_t num_blocks,
                                          int64_t block_size);

// The checks of the CPU entry points above, in their order.
Report check_permute_index_cpu(const at::Tensor& topk_ids, int64_t num_experts, int64_t align);
Report check_moe_align_block_size_cpu(const at::Tensor& topk_ids, int64_t num_experts,
                                      int64_t block_size);
Report check_permute_masked_index_cpu(const at::Tensor& topk_ids, int64_t num_experts,
                                      int64_t max_tokens);
Report check_gather_rows_cpu(const at::Tensor& x, const at::Tensor& pair_of_row,
                             const at::Tensor& row_of_pair);
Report check_unpermute_cpu(const at::Tensor& expert_out, const at::Tensor& row_of_pair,
                           const at::Tensor& topk_weights);
Report check_gather_rows_out_cpu(const at::Tensor& x, const at::Tensor& pair_of_row,
                                 const at::Tensor& row_of_pair, const at::Tensor& out);
Report check_unpermute_out_cpu(const at::Tensor& expert_out, const at::Tensor& row_of_pair,
                               const at::Tensor& topk_weights, const at::Tensor& out);
Report check_quantize_fp8_per_token_group_cpu(const at::Tensor& x, int64_t group_size,
                                              double eps, bool scale_ue8m0,
                                              bool column_major_scales);
Report check_quantize_fp8_block_cpu(const at::Tensor& w, int64_t block_n, int64_t block_k,
                                    double eps);
Report check_dequantize_fp8_block_cpu(const at::Tensor& q, const at::Tensor& s, int64_t block_n,
                                      int64_t block_k, at::ScalarType dtype);
Report check_silu_and_mul_quant_fp8_cpu(const at::Tensor& x, int64_t group_size, double eps);
Report check_quantize_fp8_per_token_group_out_cpu(const at::Tensor& x, int64_t group_size,
                                                  double eps, bool scale_ue8m0,
                                                  const at::Tensor& q, const at::Tensor& s);
Report check_silu_and_mul_quant_fp8_out_cpu(const at::Tensor& x, int64_t group_size, double eps,
                                            const at::Tensor& q, const at::Tensor& s);
Report check_silu_and_mul_quant_fp8_masked_cpu(const at::Tensor& x, const at::Tensor& masked_m,
                                               int64_t group_size, double eps);
Report check_silu_and_mul_quant_fp8_masked_out_cpu(const at::Tensor& x,
                                                   const at::Tensor& masked_m,
                                                   int64_t group_size, double eps,
                                                   bool zero_fill, const at::Tensor& q,
                                                   const at::Tensor& s);
Report check_grouped_gemm_fp8_cpu(const at::Tensor& a, const at::Tensor& a_scales,
                                  const at::Tensor& b, const at::Tensor& b_scales,
                                  const at::Tensor& m_indices, at::ScalarType out_dtype);
Report check_grouped_gemm_fp8_masked_cpu(const at::Tensor& a, const at::Tensor& a_scales,
                                         const at::Tensor& b, const at::Tensor& b_scales,
                                         const at::Tensor& masked_m, at::ScalarType out_dtype);
Report check_grouped_gemm_fp8_out_cpu(const at::Tensor& a, const at::Tensor& a_scales,
                                      const at::Tensor& b, const at::Tensor& b_scales,
                                      const at::Tensor& m_indices, const at::Tensor& out);
Report check_grouped_gemm_fp8_masked_out_cpu(const at::Tensor& a, const at::Tensor& a_scales,
                                             const at::Tensor& b, const at::Tensor& b_scales,
                                             const at::Tensor& masked_m, bool zero_fill,
                                             const at::Tensor& out);
Report check_fused_moe_fp8_cpu(const at::Tensor& hidden, const at::Tensor& w13,
                               const at::Tensor& w13_scales, const at::Tensor& w2,
                               const at::Tensor& w2_scales, const at::Tensor& topk_weights,
                               const at::Tensor& topk_ids);
Report check_fused_moe_fp8_out_cpu(const at::Tensor& hidden, const at::Tensor& w13,
                                   const at::Tensor& w13_scales, const at::Tensor& w2,
                                   const at::Tensor& w2_scales, const at::Tensor& topk_weights,
                                   const at::Tensor& topk_ids, const at::Tensor& out);
Report check_mla_decompress_kv_cpu(const at::Tensor& kv_c, const at::Tensor& k_pe,
                                   const at::Tensor& kv_b_proj,
                                   const std::optional<at::Tensor>& kv_b_proj_scale,
                                   const at::Tensor& out_k, const at::Tensor& out_v);
Report check_mla_decompress_kv_paged_cpu(const at::Tensor& kv_cache, const at::Tensor& block_table,
                                         const at::Tensor& seq_lens, const at::Tensor& kv_b_proj,
                                         const std::optional<at::Tensor>& kv_b_proj_scale,
                                         const std::optional<at::Tensor>& kv_cache_scale,
                                         const at::Tensor& out_k, const at::Tensor& out_v);
Report check_map_to_slots_cpu(const at::Tensor& topk_ids, const at::Tensor& log2phy,
                              const at::Tensor& logcnt, int64_t token_offset);

// expert_parallel.cpp
at::Tensor map_to_slots_cpu(const at::Tensor& topk_ids, const at::Tensor& log2phy,
                            const at::Tensor& logcnt, int64_t token_offset);
#ifdef MOE_KERNELS_WITH_CUDA
GroupedTopkFn grouped_topk_cuda;
GroupedTopkCheck check_grouped_topk_cuda;
// csrc/cuda/permute.cu (row movement on the GPU is Triton's)
std::vector<at::Tensor> permute_index_cuda(const at::Tensor& topk_ids, int64_t num_experts,
                                           int64_t align);
std::vector<at::Tensor> moe_align_block_size_cuda(const at::Tensor& topk_ids,
                                                  int64_t num_experts, int64_t block_size);
Report check_permute_index_cuda(const at::Tensor& topk_ids, int64_t num_experts, int64_t align);
Report check_moe_align_block_size_cuda(const at::Tensor& topk_ids, int64_t num_experts,
                                       int64_t block_size);
#endif

}  // namespace moe_kernels
