// Torch binding of the grouped_topk CUDA kernel (device code: gating.cuh). Built only
// where torch has CUDA (setup.py).
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <ATen/ATen.h>

#include "../gating.h"
#include "../ops.h"
#include "gating.cuh"

namespace moe_kernels {

Report check_grouped_topk_cuda(const at::Tensor& logits,
                               const std::optional<at::Tensor>& correction_bias, int64_t top_k,
                               int64_t num_expert_group, int64_t topk_group,
                               c10::string_view scoring_func, c10::string_view group_scoring,
                               bool /*renormalize*/, double /*routed_scaling_factor*/,
                               int64_t shared_expert_id) {
  MK_CHECK(check_grouped_topk_args(logits, correction_bias, top_k, num_expert_group, topk_group,
                                   scoring_func, group_scoring, shared_expert_id));
  MK_CHECK_VALUE(logits.is_cuda(), "logits must be a CUDA tensor for the cuda backend");
  MK_CHECK_VALUE(logits.size(1) <= gating_cuda::kMaxExperts, "the cuda backend takes E <= ",
                 gating_cuda::kMaxExperts, " experts, got ", logits.size(1),
                 "; use backend='triton'");
  return {};
}

std::tuple<at::Tensor, at::Tensor> grouped_topk_cuda(
    const at::Tensor& logits, const std::optional<at::Tensor>& correction_bias,
    int64_t top_k, int64_t num_expert_group, int64_t topk_group,
    c10::string_view scoring_func, c10::string_view group_scoring, bool renormalize,
    double routed_scaling_factor, int64_t shared_expert_id) {
  throw_if(check_grouped_topk_cuda(logits, correction_bias, top_k, num_expert_group,
                                   topk_group, scoring_func, group_scoring, renormalize,
                                   routed_scaling_factor, shared_expert_id));
  const GroupedTopkArgs a =
      grouped_topk_args(logits, correction_bias, top_k, num_expert_group, topk_group,
                        scoring_func, group_scoring, renormalize, routed_scaling_factor,
                        shared_expert_id);
  const c10::cuda::CUDAGuard guard(logits.device());
  auto w = at::empty({a.num_tokens, a.width}, logits.options().dtype(at::kFloat));
  auto ids = at::empty({a.num_tokens, a.width}, logits.options().dtype(at::kInt));
  if (a.num_tokens == 0) return {w, ids};
  at::Tensor bias32;
  if (correction_bias.has_value()) bias32 = correction_bias->to(at::kFloat).contiguous();

  gating_cuda::Params p{};
  p.logits = logits.data_ptr();
  p.bias = bias32.defined() ? bias32.data_ptr<float>() : nullptr;
  p.weights = w.data_ptr<float>();
  p.ids = ids.data_ptr<int32_t>();
  p.num_tokens = a.num_tokens;
  p.stride = logits.stride(0);
  p.num_experts = static_cast<int>(a.num_experts);
  p.num_groups = static_cast<int>(a.num_groups);
  p.group_size = static_cast<int>(a.group_size);
  p.topk_group = static_cast<int>(a.topk_group);
  p.top_k = static_cast<int>(a.top_k);
  p.shared_id = static_cast<int>(a.shared_expert_id);
  p.softmax = a.softmax;
  p.group_top2 = a.group_top2;
  p.select_groups = a.select_groups;
  p.renormalize = a.renormalize;
  p.scale = a.scale;
  const auto dtype = logits.scalar_type() == at::kFloat      ? gating_cuda::DType::kFloat32
                     : logits.scalar_type() == at::kBFloat16 ? gating_cuda::DType::kBFloat16
                                                             : gating_cuda::DType::kFloat16;
  const cudaError_t err =
      gating_cuda::launch_grouped_topk(p, dtype, at::cuda::getCurrentCUDAStream());
  TORCH_CHECK(err == cudaSuccess, "grouped_topk_cuda: launch failed: ", cudaGetErrorString(err));
  return {w, ids};
}

}  // namespace moe_kernels
