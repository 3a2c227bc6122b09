// The Python module moe_kernels._C: every kernel entry point `<op>_<backend>` and its
// argument check `<op>_<backend>_check`. The op schemas are defined once, in Python
// (moe_kernels/_library.py, Op), which also registers each op's kernel per dispatch key: a
// Python function that runs the check, raises its error, and calls the entry point, so no
// argument reaches a C++ throw (csrc/checks.h says why that matters). The only file with
// torch/extension.h (pybind11 and torch's whole C++ API): every other one includes
// ATen/ATen.h; with torch/extension.h each took ~3x as long to compile (gating.cpp 46 s ->
// 17 s on 2 cores).
#include <torch/extension.h>

#include <map>
#include <string>

#include "common/limits.h"
#include "cpu/simd.h"
#include "ops.h"

// `_C.<entry>_check`: the entry's check as (kind, message), kind 0 when the arguments pass,
// 1 for a ValueError, 2 for a TypeError (csrc/checks.h). Every tensor argument is checked
// first to be one whose memory can be read (readable_problem), so the check itself reads
// only such tensors.
template <typename... Args>
auto reported(moe_kernels::Report (*check)(Args...)) {
  return [check](Args... args) {
    moe_kernels::Report report;
    size_t index = 0;
    ((report || (report = moe_kernels::readable_problem(index, args)), ++index), ...);
    return moe_kernels::to_python(report ? report : check(args...));
  };
}

// An entry point and its check. The entry points are the eager path's direct calls,
// `_C.<op>_<backend>` (the name moe_kernels._library.Op looks up): calling these skips the
// dispatcher and the Python autograd kernel (docs/index.md, eager fast path). An entry
// point runs without the GIL, as torch's own ops do: holding it, a CPU kernel would stop
// every other Python thread of the process for its whole run (a server's scheduler beside a
// CPU MoE layer: ~1 ms a call at T = 4096). Its arguments are converted before the release
// and its result after; nothing between touches Python. The release costs ~0.05 us a call
// (gather_rows_out on 3 rows: 0.31 -> 0.34 us); the checks, ~1 us, keep the GIL.
#define MK_DEF_ENTRY(m, name)                                                               \
  m.def(#name, &moe_kernels::name, pybind11::call_guard<pybind11::gil_scoped_release>());   \
  m.def(#name "_check", reported(&moe_kernels::check_##name))

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
  // The build the CPU kernels run (csrc/cpu/simd.h): "amx", "avx512bf16", "avx512", "avx2"
  // or "generic"; tests switch between them to check every build on one machine.
  m.def("cpu_isa", []() { return std::string(moe_kernels::cpu_isa()); });
  m.def("set_cpu_isa", [](const std::string& name) {
    TORCH_CHECK_VALUE(moe_kernels::set_cpu_isa(name.c_str()),
                      "cpu isa must be one of 'amx', 'avx512bf16', 'avx512', 'avx2', 'generic' "
                      "that this CPU runs, got '", name, "'");
  });
  // When the CPU's row copies stream past the cache (csrc/cpu/permute.cpp); tests size
  // their inputs by it.
  m.def("last_level_cache_bytes", []() { return moe_kernels::last_level_cache_bytes(); });
  MK_DEF_ENTRY(m, grouped_topk_cpu);
  MK_DEF_ENTRY(m, permute_index_cpu);
  MK_DEF_ENTRY(m, moe_align_block_size_cpu);
  MK_DEF_ENTRY(m, permute_masked_index_cpu);
  MK_DEF_ENTRY(m, gather_rows_cpu);
  MK_DEF_ENTRY(m, unpermute_cpu);
  MK_DEF_ENTRY(m, quantize_fp8_per_token_group_cpu);
  MK_DEF_ENTRY(m, quantize_fp8_block_cpu);
  MK_DEF_ENTRY(m, dequantize_fp8_block_cpu);
  MK_DEF_ENTRY(m, silu_and_mul_quant_fp8_cpu);
  MK_DEF_ENTRY(m, grouped_gemm_fp8_cpu);
  MK_DEF_ENTRY(m, grouped_gemm_fp8_masked_cpu);
  MK_DEF_ENTRY(m, gather_rows_out_cpu);
  MK_DEF_ENTRY(m, unpermute_out_cpu);
  MK_DEF_ENTRY(m, quantize_fp8_per_token_group_out_cpu);
  MK_DEF_ENTRY(m, silu_and_mul_quant_fp8_out_cpu);
  MK_DEF_ENTRY(m, silu_and_mul_quant_fp8_masked_cpu);
  MK_DEF_ENTRY(m, silu_and_mul_quant_fp8_masked_out_cpu);
  MK_DEF_ENTRY(m, grouped_gemm_fp8_out_cpu);
  MK_DEF_ENTRY(m, grouped_gemm_fp8_masked_out_cpu);
  MK_DEF_ENTRY(m, fused_moe_fp8_cpu);
  MK_DEF_ENTRY(m, fused_moe_fp8_out_cpu);
  MK_DEF_ENTRY(m, mla_decompress_kv_cpu);
  MK_DEF_ENTRY(m, mla_decompress_kv_paged_cpu);
  MK_DEF_ENTRY(m, map_to_slots_cpu);
  m.def("mla_paged_values_cpu", &moe_kernels::mla_paged_values_cpu);
#ifdef MOE_KERNELS_WITH_CUDA
  MK_DEF_ENTRY(m, grouped_topk_cuda);
  MK_DEF_ENTRY(m, permute_index_cuda);
  MK_DEF_ENTRY(m, moe_align_block_size_cuda);
#endif
}
