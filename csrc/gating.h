// Torch-side helpers of grouped_topk shared by the CPU kernel and the CUDA binding:
// argument checks (so torch.ops.moe_kernels.grouped_topk called directly fails cleanly,
// never reads out of bounds) and the parsed options.
#pragma once
#include <ATen/ATen.h>

#include <optional>

namespace moe_kernels {

struct GroupedTopkArgs {
  int64_t num_tokens, num_experts, num_groups, group_size, topk_group, top_k;
  bool softmax, group_top2, select_groups, has_bias, renormalize;
  float scale;
};

inline GroupedTopkArgs check_grouped_topk(
    const at::Tensor& logits, const std::optional<at::Tensor>& bias, int64_t top_k,
    int64_t num_expert_group, int64_t topk_group, c10::string_view scoring_func,
    c10::string_view group_scoring, bool renormalize, double routed_scaling_factor) {
  TORCH_CHECK_VALUE(logits.dim() == 2, "grouped_topk: logits must be 2-D (T, E), got ",
                    logits.dim(), "-D");
  auto dt = logits.scalar_type();
  TORCH_CHECK_TYPE(dt == at::kFloat || dt == at::kBFloat16 || dt == at::kHalf,
                   "grouped_topk: logits must be float32, bfloat16 or float16, got ", dt);
  const int64_t E = logits.size(1);
  TORCH_CHECK_VALUE(E >= 1, "grouped_topk: logits must have at least one expert");
  TORCH_CHECK_VALUE(E == 1 || logits.stride(1) == 1,
                    "grouped_topk: logits must have a contiguous last dimension");
  TORCH_CHECK_VALUE(num_expert_group >= 1 && E % num_expert_group == 0,
                    "grouped_topk: num_expert_group must divide E=", E, ", got ",
                    num_expert_group);
  const int64_t gs = E / num_expert_group;
  TORCH_CHECK_VALUE(topk_group >= 1 && topk_group <= num_expert_group,
                    "grouped_topk: topk_group must be in [1, num_expert_group], got ",
                    topk_group);
  TORCH_CHECK_VALUE(top_k >= 1 && top_k <= topk_group * gs,
                    "grouped_topk: top_k must be in [1, topk_group * E / G = ",
                    topk_group * gs, "], got ", top_k);
  TORCH_CHECK_VALUE(scoring_func == "sigmoid" || scoring_func == "softmax",
                    "grouped_topk: scoring_func must be 'sigmoid' or 'softmax'");
  TORCH_CHECK_VALUE(group_scoring == "top2_sum" || group_scoring == "max",
                    "grouped_topk: group_scoring must be 'top2_sum' or 'max'");
  const bool select_groups = topk_group < num_expert_group;
  TORCH_CHECK_VALUE(!(select_groups && group_scoring == "top2_sum" && gs < 2),
                    "grouped_topk: group_scoring='top2_sum' needs E / G >= 2");
  if (bias.has_value()) {
    const auto& b = *bias;
    TORCH_CHECK_VALUE(b.dim() == 1 && b.size(0) == E,
                      "grouped_topk: correction_bias must have shape (E,) = (", E, ",)");
    TORCH_CHECK_TYPE(at::isFloatingType(b.scalar_type()),
                     "grouped_topk: correction_bias must be a float tensor");
    TORCH_CHECK_VALUE(b.device() == logits.device(),
                      "grouped_topk: correction_bias must be on the device of logits");
  }
  return GroupedTopkArgs{logits.size(0), E, num_expert_group, gs, topk_group, top_k,
                         scoring_func == "softmax", group_scoring == "top2_sum",
                         select_groups, bias.has_value(), renormalize,
                         static_cast<float>(routed_scaling_factor)};
}

}  // namespace moe_kernels
