// Every schema of the moe_kernels namespace, in one place (mirrored for extension-less
// imports by moe_kernels/_library.py::SCHEMAS; tests/test_registration.py checks they agree).
// Kernels register themselves per dispatch key next to their code (csrc/cpu, csrc/cuda).
#include <torch/extension.h>

#include "ops.h"

TORCH_LIBRARY(moe_kernels, m) {
  m.def(
      "grouped_topk(Tensor logits, Tensor? correction_bias, int top_k, "
      "int num_expert_group, int topk_group, str scoring_func, str group_scoring, "
      "bool renormalize, float routed_scaling_factor) -> (Tensor, Tensor)");
  m.def(
      "grouped_topk_triton(Tensor logits, Tensor? correction_bias, int top_k, "
      "int num_expert_group, int topk_group, str scoring_func, str group_scoring, "
      "bool renormalize, float routed_scaling_factor) -> (Tensor, Tensor)");
  // Token permutation: index computation, row gather, weighted reduction.
  m.def("permute_index(Tensor topk_ids, int num_experts, int align) -> Tensor[]");
  m.def("permute_index_triton(Tensor topk_ids, int num_experts, int align) -> Tensor[]");
  m.def("moe_align_block_size(Tensor topk_ids, int num_experts, int block_size) -> Tensor[]");
  m.def("moe_align_block_size_triton(Tensor topk_ids, int num_experts, int block_size) -> Tensor[]");
  m.def("gather_rows(Tensor x, Tensor pair_of_row, Tensor row_of_pair) -> Tensor");
  m.def("gather_rows_triton(Tensor x, Tensor pair_of_row, Tensor row_of_pair) -> Tensor");
  m.def("unpermute(Tensor expert_out, Tensor row_of_pair, Tensor topk_weights) -> Tensor");
  m.def("unpermute_triton(Tensor expert_out, Tensor row_of_pair, Tensor topk_weights) -> Tensor");
  // FP8 quantization and grouped GEMMs (csrc/cpu/fp8.cpp, csrc/cpu/grouped_gemm.cpp); the
  // segments GEMM is fused_moe_fp8's, Triton only.
  m.def("quantize_fp8_per_token_group(Tensor x, int group_size, float eps, bool scale_ue8m0, bool column_major_scales) -> (Tensor, Tensor)");
  m.def("quantize_fp8_per_token_group_triton(Tensor x, int group_size, float eps, bool scale_ue8m0, bool column_major_scales) -> (Tensor, Tensor)");
  m.def("quantize_fp8_block(Tensor w, int block_n, int block_k, float eps) -> (Tensor, Tensor)");
  m.def("quantize_fp8_block_triton(Tensor w, int block_n, int block_k, float eps) -> (Tensor, Tensor)");
  m.def("dequantize_fp8_block(Tensor q, Tensor s, int block_n, int block_k, ScalarType dtype) -> Tensor");
  m.def("dequantize_fp8_block_triton(Tensor q, Tensor s, int block_n, int block_k, ScalarType dtype) -> Tensor");
  m.def("silu_and_mul_quant_fp8(Tensor x, int group_size, float eps) -> (Tensor, Tensor)");
  m.def("silu_and_mul_quant_fp8_triton(Tensor x, int group_size, float eps) -> (Tensor, Tensor)");
  m.def("grouped_gemm_fp8(Tensor a, Tensor a_scales, Tensor b, Tensor b_scales, Tensor m_indices, ScalarType out_dtype) -> Tensor");
  m.def("grouped_gemm_fp8_triton(Tensor a, Tensor a_scales, Tensor b, Tensor b_scales, Tensor m_indices, ScalarType out_dtype) -> Tensor");
  m.def("grouped_gemm_fp8_masked(Tensor a, Tensor a_scales, Tensor b, Tensor b_scales, Tensor masked_m, ScalarType out_dtype) -> Tensor");
  m.def("grouped_gemm_fp8_masked_triton(Tensor a, Tensor a_scales, Tensor b, Tensor b_scales, Tensor masked_m, ScalarType out_dtype) -> Tensor");
  m.def("grouped_gemm_fp8_segments_triton(Tensor a, Tensor a_scales, Tensor b, Tensor b_scales, Tensor expert_offsets, Tensor tokens_per_expert, ScalarType out_dtype) -> Tensor");
  // MLA latent KV decompression (csrc/cpu/mla.cpp): writes into out_k / out_v.
  m.def("mla_decompress_kv(Tensor kv_c, Tensor k_pe, Tensor kv_b_proj, Tensor? kv_b_proj_scale, Tensor(a!) out_k, Tensor(b!) out_v) -> ()");
  m.def("mla_decompress_kv_triton(Tensor kv_c, Tensor k_pe, Tensor kv_b_proj, Tensor? kv_b_proj_scale, Tensor(a!) out_k, Tensor(b!) out_v) -> ()");
  m.def("mla_decompress_kv_paged(Tensor kv_cache, Tensor block_table, Tensor seq_lens, Tensor kv_b_proj, Tensor? kv_b_proj_scale, Tensor? kv_cache_scale, Tensor(a!) out_k, Tensor(b!) out_v) -> ()");
  m.def("mla_decompress_kv_paged_triton(Tensor kv_cache, Tensor block_table, Tensor seq_lens, Tensor kv_b_proj, Tensor? kv_b_proj_scale, Tensor? kv_cache_scale, Tensor(a!) out_k, Tensor(b!) out_v) -> ()");
}

// Direct entry points for the eager path: calling these skips the dispatcher and the
// Python autograd kernel (about 3-10 us per call, see docs/index.md).
PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("with_cuda", []() {
#ifdef MOE_KERNELS_WITH_CUDA
    return true;
#else
    return false;
#endif
  });
  m.def("grouped_topk_cpu", &moe_kernels::grouped_topk_cpu);
  m.def("permute_index_cpu", &moe_kernels::permute_index_cpu);
  m.def("moe_align_block_size_cpu", &moe_kernels::moe_align_block_size_cpu);
  m.def("gather_rows_cpu", &moe_kernels::gather_rows_cpu);
  m.def("unpermute_cpu", &moe_kernels::unpermute_cpu);
  m.def("quantize_fp8_per_token_group_cpu", &moe_kernels::quantize_fp8_per_token_group_cpu);
  m.def("quantize_fp8_block_cpu", &moe_kernels::quantize_fp8_block_cpu);
  m.def("dequantize_fp8_block_cpu", &moe_kernels::dequantize_fp8_block_cpu);
  m.def("silu_and_mul_quant_fp8_cpu", &moe_kernels::silu_and_mul_quant_fp8_cpu);
  m.def("grouped_gemm_fp8_cpu", &moe_kernels::grouped_gemm_fp8_cpu);
  m.def("grouped_gemm_fp8_masked_cpu", &moe_kernels::grouped_gemm_fp8_masked_cpu);
  m.def("mla_decompress_kv_cpu", &moe_kernels::mla_decompress_kv_cpu);
  m.def("mla_decompress_kv_paged_cpu", &moe_kernels::mla_decompress_kv_paged_cpu);
#ifdef MOE_KERNELS_WITH_CUDA
  m.def("grouped_topk_cuda", &moe_kernels::grouped_topk_cuda);
  m.def("permute_index_cuda", &moe_kernels::permute_index_cuda);
  m.def("moe_align_block_size_cuda", &moe_kernels::moe_align_block_size_cuda);
#endif
}
