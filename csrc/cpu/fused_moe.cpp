// fused_moe_fp8 on the CPU (semantics: moe_kernels/ops/fused_moe.py,
// reference/fused_moe.py): the CPU kernels of its stages called in one C++ function,
// quantize (1x128) -> permute (align=1, scales alongside) -> GEMM1 (w13) ->
// SiLU-mul-quant -> GEMM2 (w2) -> weighted unpermute. The same kernels, in the same order,
// as the Python composition over the ops' internal layer, so the result is the same bits;
// what it spares is the Python between eight kernel calls (each a checked pybind call
// with its dispatch), which at decode was most of the time above the kernels: one token on
// a 2-core CPU, 52 us a call of which 15 us above the kernels (docs/benchmarks.md).
#include <ATen/ATen.h>

#include <algorithm>
#include <tuple>
#include <utility>
#include <vector>

#include "../fp8.h"
#include "../ops.h"
#include "../permute.h"

namespace moe_kernels {
namespace {

// the activations' quantization epsilon, as in ops/fused_moe.py
constexpr double kQuantEps = 1e-10;

}  // namespace

Report check_fused_moe_fp8_cpu(const at::Tensor& hidden, const at::Tensor& w13,
                               const at::Tensor& w13_scales, const at::Tensor& w2,
                               const at::Tensor& w2_scales, const at::Tensor& topk_weights,
                               const at::Tensor& topk_ids) {
  MK_CHECK_VALUE(hidden.dim() == 2, "hidden must be 2-D (T, H), got ", hidden.dim(), "-D");
  MK_CHECK_TYPE(simd_dtype(hidden.scalar_type()),
                "hidden must be float32, bfloat16 or float16, got ", hidden.scalar_type());
  MK_CHECK(check_fp8(w13, "w13", 3));
  MK_CHECK(check_fp8(w2, "w2", 3));
  const int64_t T = hidden.size(0), H = hidden.size(1);
  const int64_t E = w13.size(0), two_i = w13.size(1), inter = two_i / 2;
  MK_CHECK_VALUE(w13.size(2) == H && two_i % 2 == 0, "w13 must have shape (E, 2I, H=", H,
                 "), got ", w13.sizes());
  MK_CHECK_VALUE(w2.size(0) == E && w2.size(1) == H && w2.size(2) == inter,
                 "w2 must have shape (E, H, I) = (", E, ", ", H, ", ", inter,
                 ") (from w13), got ", w2.sizes());
  MK_CHECK(check_scales(w13_scales, "w13_scales",
                        {E, ceil_div(two_i, kScaleBlock), ceil_div(H, kScaleBlock)}));
  MK_CHECK(check_scales(w2_scales, "w2_scales",
                        {E, ceil_div(H, kScaleBlock), ceil_div(inter, kScaleBlock)}));
  // topk_ids as the permutation takes it (2-D, int32 | int64, a layout that fits int32)
  MK_CHECK(check_topk_ids(topk_ids, std::max<int64_t>(E, 1), 1, "align"));
  MK_CHECK_VALUE(topk_ids.size(0) == T && topk_weights.sizes() == topk_ids.sizes(),
                 "topk_ids and topk_weights must both have shape (T=", T, ", K), got ",
                 topk_ids.sizes(), " and ", topk_weights.sizes());
  MK_CHECK_TYPE(at::isFloatingType(topk_weights.scalar_type()),
                "topk_weights must be a float tensor, got ", topk_weights.scalar_type());
  return {};
}

Report check_fused_moe_fp8_out_cpu(const at::Tensor& hidden, const at::Tensor& w13,
                                   const at::Tensor& w13_scales, const at::Tensor& w2,
                                   const at::Tensor& w2_scales, const at::Tensor& topk_weights,
                                   const at::Tensor& topk_ids, const at::Tensor& out) {
  MK_CHECK(check_fused_moe_fp8_cpu(hidden, w13, w13_scales, w2, w2_scales, topk_weights,
                                   topk_ids));
  MK_CHECK_VALUE(out.dim() == 2 && out.sizes() == hidden.sizes() && out.is_contiguous(),
                 "out must be contiguous ", hidden.sizes(), ", got shape ", out.sizes());
  MK_CHECK_TYPE(out.scalar_type() == hidden.scalar_type(), "out must have hidden's dtype ",
                hidden.scalar_type(), ", got ", out.scalar_type());
  return {};
}

namespace {

// The routed pairs' expert outputs: z (R, H) in hidden's dtype, one row per routed pair in
// the align=1 expert layout, and row_of_pair (T, K) int32, the row of each pair (-1:
// skipped). Every read of hidden happens here, before the caller writes its output, so
// that output may be hidden's own memory (fused_moe_fp8's out=hidden). Each intermediate
// is released once its last reader has run, so that a stage's live buffers are its own
// input and output (ops/fused_moe.py, expert_mlp: at GEMM2 16 KB a routed row at
// DeepSeek-V3's shape instead of 31).
std::pair<at::Tensor, at::Tensor> routed_rows(const at::Tensor& hidden, const at::Tensor& w13,
                                              const at::Tensor& w13_scales,
                                              const at::Tensor& w2, const at::Tensor& w2_scales,
                                              const at::Tensor& topk_ids) {
  const int64_t E = w13.size(0);
  // {expert_offsets, tokens_per_expert, m_indices, row_of_pair, pair_of_row}
  std::vector<at::Tensor> index = permute_index_cpu(topk_ids, E, 1);
  const at::Tensor m_indices = index[2], row_of_pair = index[3];
  at::Tensor x, x_scales;
  {
    const auto [q, s] = quantize_fp8_per_token_group_cpu(hidden, kScaleBlock, kQuantEps, false,
                                                         false);
    x = gather_rows_cpu(q, index[4], row_of_pair);
    x_scales = gather_rows_cpu(s, index[4], row_of_pair);
  }  // q, s: the rows in token order, read by the gathers alone
  index.clear();
  // GEMM1 writes bf16, as SGLang and vLLM do (ops/fused_moe.py, expert_mlp)
  at::Tensor y = grouped_gemm_fp8_cpu(x, x_scales, w13, w13_scales, m_indices, at::kBFloat16);
  x.reset();
  x_scales.reset();
  auto [q2, s2] = silu_and_mul_quant_fp8_cpu(y, kScaleBlock, kQuantEps);
  y.reset();
  return {grouped_gemm_fp8_cpu(q2, s2, w2, w2_scales, m_indices, hidden.scalar_type()),
          row_of_pair};
}

}  // namespace

at::Tensor fused_moe_fp8_cpu(const at::Tensor& hidden, const at::Tensor& w13,
                             const at::Tensor& w13_scales, const at::Tensor& w2,
                             const at::Tensor& w2_scales, const at::Tensor& topk_weights,
                             const at::Tensor& topk_ids) {
  throw_if(check_fused_moe_fp8_cpu(hidden, w13, w13_scales, w2, w2_scales, topk_weights,
                                   topk_ids));
  if (w13.size(0) == 0) return at::zeros(hidden.sizes(), hidden.options());  // all skipped
  const auto [z, row_of_pair] = routed_rows(hidden, w13, w13_scales, w2, w2_scales, topk_ids);
  return unpermute_cpu(z, row_of_pair, topk_weights);
}

void fused_moe_fp8_out_cpu(const at::Tensor& hidden, const at::Tensor& w13,
                           const at::Tensor& w13_scales, const at::Tensor& w2,
                           const at::Tensor& w2_scales, const at::Tensor& topk_weights,
                           const at::Tensor& topk_ids, at::Tensor& out) {
  throw_if(check_fused_moe_fp8_out_cpu(hidden, w13, w13_scales, w2, w2_scales, topk_weights,
                                       topk_ids, out));
  if (w13.size(0) == 0) {  // every pair skipped
    out.zero_();
    return;
  }
  const auto [z, row_of_pair] = routed_rows(hidden, w13, w13_scales, w2, w2_scales, topk_ids);
  unpermute_out_cpu(z, row_of_pair, topk_weights, out);
}

}  // namespace moe_kernels
