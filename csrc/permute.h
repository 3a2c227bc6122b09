// Torch-side helpers of the permutation ops shared by the CPU kernels and the CUDA
// binding: the row count of a layout and the topk_ids check (reported, csrc/checks.h).
#pragma once
#include <ATen/ATen.h>

#include <algorithm>

#include "checks.h"

namespace moe_kernels {

// Rows of the padded permuted layout: P pairs plus align-1 padding rows for each expert
// that can be non-empty; at most min(E, P) are, so this bound is as static as
// P + E*(align-1) and far smaller at decode (1 token, E=256, top-8, align=128: 1,024 rows
// instead of 32,520).
inline int64_t permuted_rows(int64_t P, int64_t num_experts, int64_t align) {
  return P + std::min(num_experts, P) * (align - 1);
}

// topk_ids (T, K) int32 | int64 of any strides and num_experts, whatever the layout.
inline Report check_routing(const at::Tensor& topk_ids, int64_t num_experts) {
  MK_CHECK_VALUE(topk_ids.dim() == 2, "topk_ids must be 2-D (T, K), got ", topk_ids.dim(), "-D");
  MK_CHECK_TYPE(index_dtype(topk_ids.scalar_type()), "topk_ids must be int32 or int64, got ",
                topk_ids.scalar_type());
  MK_CHECK_VALUE(num_experts >= 1 && num_experts <= kInt32Max,
                 "num_experts must be in [1, 2^31 - 1], got ", num_experts);
  return {};
}

// check_routing, and the row alignment; the layout's rows (permuted_rows) must fit the
// int32 indices the kernels write.
inline Report check_topk_ids(const at::Tensor& topk_ids, int64_t num_experts, int64_t align,
                             const char* align_name) {
  MK_CHECK(check_routing(topk_ids, num_experts));
  MK_CHECK_VALUE(align >= 1 && align <= kInt32Max, align_name, " must be in [1, 2^31 - 1], got ",
                 align);
  const int64_t P = topk_ids.numel();
  MK_CHECK_VALUE(P <= kInt32Max && permuted_rows(P, num_experts, align) <= kInt32Max,
                 "the layout of ", P, " pairs with ", align_name, " = ", align, " has ",
                 permuted_rows(P, num_experts, align), " rows, more than int32 indices address");
  return {};
}

}  // namespace moe_kernels
