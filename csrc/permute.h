// Torch-side helpers of the permutation ops shared by the CPU kernels and the CUDA
// binding: the topk_ids checks, so direct torch.ops calls fail cleanly.
#pragma once
#include <ATen/ATen.h>

#include <algorithm>

namespace moe_kernels {

// Rows of the padded permuted layout: P pairs plus align-1 padding rows for each expert
// that can be non-empty; at most min(E, P) are, so this bound is as static as
// P + E*(align-1) and far smaller at decode (1 token, E=256, top-8, align=128: 1,024 rows
// instead of 32,520).
inline int64_t permuted_rows(int64_t P, int64_t num_experts, int64_t align) {
  return P + std::min(num_experts, P) * (align - 1);
}

inline void check_topk_ids(const at::Tensor& topk_ids, int64_t num_experts, int64_t align,
                           const char* align_name) {
  TORCH_CHECK_VALUE(topk_ids.dim() == 2, "topk_ids must be 2-D (T, K)");
  TORCH_CHECK_TYPE(topk_ids.scalar_type() == at::kInt || topk_ids.scalar_type() == at::kLong,
                   "topk_ids must be int32 or int64");
  TORCH_CHECK_VALUE(num_experts >= 1, "num_experts must be >= 1");
  TORCH_CHECK_VALUE(align >= 1, align_name, " must be >= 1");
}

}  // namespace moe_kernels
