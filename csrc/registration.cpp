// The Python module moe_kernels._C. The op schemas are defined once, in Python
// (moe_kernels/_library.py, Op); the kernels register on them per dispatch key next to
// their code (TORCH_LIBRARY_IMPL in csrc/cpu, csrc/cuda), and the dispatcher checks each
// kernel's signature against its schema when both are loaded. The only file with
// torch/extension.h (pybind11 and torch's whole C++ API): every other one includes
// ATen/ATen.h and, where it registers kernels, torch/library.h; with torch/extension.h
// each took ~3x as long to compile (gating.cpp 46 s -> 17 s on 2 cores).
#include <torch/extension.h>

#include <map>
#include <string>

#include "common/limits.h"
#include "cpu/simd.h"
#include "ops.h"

// Direct entry points for the eager path, `_C.<op>_<backend>` (the name moe_kernels.
// _library.Op looks up): calling these skips the dispatcher and the Python autograd kernel
// (docs/index.md, eager fast path).
PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("with_cuda", []() {
#ifdef MOE_KERNELS_WITH_CUDA
    return true;
#else
    return false;
#endif
  });
  // The CUDA kernels' bounds (common/limits.h), checked in Python before any launch.
  m.def("limits", []() {
    return std::map<std::string, int64_t>{
        {"gating_cuda_max_experts", moe_kernels::kGatingCudaMaxExperts},
        {"permute_cuda_max_experts", moe_kernels::kPermuteCudaMaxExperts}};
  });
  // The build the CPU kernels run (csrc/cpu/simd.h): "amx", "avx512", "avx2" or
  // "generic"; tests switch between them to check every build on one machine.
  m.def("cpu_isa", []() { return std::string(moe_kernels::cpu_isa()); });
  m.def("set_cpu_isa", [](const std::string& name) {
    TORCH_CHECK_VALUE(moe_kernels::set_cpu_isa(name.c_str()), "cpu isa must be one of 'amx', "
                      "'avx512', 'avx2', 'generic' that this CPU runs, got '", name, "'");
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
  m.def("gather_rows_out_cpu", &moe_kernels::gather_rows_out_cpu);
  m.def("unpermute_out_cpu", &moe_kernels::unpermute_out_cpu);
  m.def("quantize_fp8_per_token_group_out_cpu",
        &moe_kernels::quantize_fp8_per_token_group_out_cpu);
  m.def("silu_and_mul_quant_fp8_out_cpu", &moe_kernels::silu_and_mul_quant_fp8_out_cpu);
  m.def("grouped_gemm_fp8_out_cpu", &moe_kernels::grouped_gemm_fp8_out_cpu);
  m.def("grouped_gemm_fp8_masked_out_cpu", &moe_kernels::grouped_gemm_fp8_masked_out_cpu);
  m.def("mla_decompress_kv_cpu", &moe_kernels::mla_decompress_kv_cpu);
  m.def("mla_decompress_kv_paged_cpu", &moe_kernels::mla_decompress_kv_paged_cpu);
  m.def("map_to_slots_cpu", &moe_kernels::map_to_slots_cpu);
  m.def("mla_paged_values_cpu", &moe_kernels::mla_paged_values_cpu);
#ifdef MOE_KERNELS_WITH_CUDA
  m.def("grouped_topk_cuda", &moe_kernels::grouped_topk_cuda);
  m.def("permute_index_cuda", &moe_kernels::permute_index_cuda);
  m.def("moe_align_block_size_cuda", &moe_kernels::moe_align_block_size_cuda);
#endif
}
