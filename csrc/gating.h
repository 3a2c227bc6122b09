// Torch-side helpers of grouped_topk shared by the CPU kernel and the CUDA binding: the
// argument check (reported, csrc/checks.h) and the parsed options.
#pragma once
#include <ATen/ATen.h>

#include <optional>

#include "checks.h"

namespace moe_kernels {

struct GroupedTopkArgs {
  int64_t num_tokens, num_experts, num_groups, group_size, topk_group, top_k;
  int64_t shared_expert_id;  // -1: none; else an extra last column (this id, weight 1)
  int64_t width;             // columns of the outputs: top_k, or top_k + 1 with it
  bool softmax, group_top2, select_groups, has_bias, renormalize;
  float scale;
};

inline Report check_grouped_topk_args(
    const at::Tensor& logits, const std::optional<at::Tensor>& bias, int64_t top_k,
    int64_t num_expert_group, int64_t topk_group, c10::string_view scoring_func,
    c10::string_view group_scoring, int64_t shared_expert_id) {
  MK_CHECK_VALUE(logits.dim() == 2, "logits must be 2-D (T, E), got ", logits.dim(), "-D");
  MK_CHECK_TYPE(simd_dtype(logits.scalar_type()),
                "logits must be float32, bfloat16 or float16, got ", logits.scalar_type());
  const int64_t E = logits.size(1);
  MK_CHECK_VALUE(E >= 1, "logits must have at least one expert");
  MK_CHECK_VALUE(E == 1 || logits.stride(1) == 1, "logits must have a contiguous last dimension");
  MK_CHECK_VALUE(num_expert_group >= 1 && E % num_expert_group == 0,
                 "num_expert_group must divide E=", E, ", got ", num_expert_group);
  const int64_t gs = E / num_expert_group;
  MK_CHECK_VALUE(topk_group >= 1 && topk_group <= num_expert_group,
                 "topk_group must be in [1, num_expert_group], got ", topk_group);
  MK_CHECK_VALUE(top_k >= 1 && top_k <= topk_group * gs,
                 "top_k must be in [1, topk_group * E / G = ", topk_group * gs, "], got ", top_k);
  MK_CHECK_VALUE(scoring_func == "sigmoid" || scoring_func == "softmax",
                 "scoring_func must be 'sigmoid' or 'softmax'");
  MK_CHECK_VALUE(group_scoring == "top2_sum" || group_scoring == "max",
                 "group_scoring must be 'top2_sum' or 'max'");
  MK_CHECK_VALUE(!(topk_group < num_expert_group && group_scoring == "top2_sum" && gs < 2),
                 "group_scoring='top2_sum' needs E / G >= 2");
  MK_CHECK_VALUE(shared_expert_id == -1 || (shared_expert_id >= E && shared_expert_id <= kInt32Max),
                 "shared_expert_id must be -1 (none) or in [E = ", E, ", 2^31 - 1], got ",
                 shared_expert_id);
  if (bias.has_value()) {
    const auto& b = *bias;
    MK_CHECK_VALUE(b.dim() == 1 && b.size(0) == E, "correction_bias must have shape (E,) = (",
                   E, ",)");
    MK_CHECK_TYPE(at::isFloatingType(b.scalar_type()), "correction_bias must be a float tensor");
    MK_CHECK_VALUE(b.device() == logits.device(),
                   "correction_bias must be on the device of logits");
  }
  return {};
}

// The options of arguments check_grouped_topk_args passed.
inline GroupedTopkArgs grouped_topk_args(
    const at::Tensor& logits, const std::optional<at::Tensor>& bias, int64_t top_k,
    int64_t num_expert_group, int64_t topk_group, c10::string_view scoring_func,
    c10::string_view group_scoring, bool renormalize, double routed_scaling_factor,
    int64_t shared_expert_id) {
  const int64_t E = logits.size(1), gs = E / num_expert_group;
  return GroupedTopkArgs{logits.size(0), E, num_expert_group, gs, topk_group, top_k,
                         shared_expert_id, top_k + (shared_expert_id >= 0 ? 1 : 0),
                         scoring_func == "softmax", group_scoring == "top2_sum",
                         topk_group < num_expert_group, bias.has_value(), renormalize,
                         static_cast<float>(routed_scaling_factor)};
}

}  // namespace moe_kernels
