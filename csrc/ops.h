// Declarations of every kernel entry point (CPU always, CUDA when built with it).
#pragma once
#include <torch/extension.h>

#include <optional>
#include <string>
#include <tuple>

namespace moe_kernels {

using GroupedTopkFn = std::tuple<at::Tensor, at::Tensor>(
    const at::Tensor& logits, const std::optional<at::Tensor>& correction_bias,
    int64_t top_k, int64_t num_expert_group, int64_t topk_group,
    c10::string_view scoring_func, c10::string_view group_scoring, bool renormalize,
    double routed_scaling_factor);

GroupedTopkFn grouped_topk_cpu;
#ifdef MOE_KERNELS_WITH_CUDA
GroupedTopkFn grouped_topk_cuda;
#endif

}  // namespace moe_kernels
