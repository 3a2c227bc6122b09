// grouped_topk on the CPU: one pass per token row, rows split across threads by
// at::parallel_for. Same selection rules as moe_kernels/reference/gating.py.
#include <ATen/Parallel.h>
#include <ATen/ATen.h>

#include <algorithm>
#include <cmath>
#include <functional>
#include <vector>

#include "../common/order_key.h"
#include "vec_math.h"
#include "../gating.h"
#include "../ops.h"
#include "simd.h"

namespace moe_kernels {
namespace {

// Keeps the k largest keys seen, sorted descending (keys are distinct by construction).
// offer_value skips, on a float compare, a value below the k-th kept one: it cannot enter,
// and most candidates of a row are such (building their keys was a third of the row).
struct TopKeys {
  int64_t* keys;
  int64_t k;
  float kth = -__builtin_inff();   // the k-th kept value; -inf until k are kept
  void reset() {
    std::fill(keys, keys + k, kExcludedKey);
    kth = -__builtin_inff();
  }
  void offer(int64_t key) {
    if (key <= keys[k - 1]) return;
    int64_t i = k - 1;
    for (; i > 0 && keys[i - 1] < key; --i) keys[i] = keys[i - 1];
    keys[i] = key;
  }
  // v holds no NaN; an equal value may still enter by its lower index
  void offer_value(float v, int64_t index) {
    if (v < kth) return;
    offer(order_key(v, index));
    if (keys[k - 1] != kExcludedKey) kth = value_of_key(keys[k - 1]);
  }
};

struct RowScratch {
  std::vector<float> s, b, first, second, kept_top2;
  std::vector<int64_t> group_keys, expert_keys;
  explicit RowScratch(const GroupedTopkArgs& a)
      : s(a.num_experts), b(a.num_experts), first(a.num_groups), second(a.num_groups),
        group_keys(a.topk_group), expert_keys(a.top_k) {}
};

// A value the top_k-th largest candidate of the kept groups cannot be below: the top_k-th
// largest of the kept groups' top-2 values, which are that many distinct candidates
// (-inf when there are fewer). Only candidates at or above it are offered: at DeepSeek-V3
// routing ~13 of the 128, where offering all of them (mispredicted inserts) was half of the
// row's time.
float candidate_floor(const GroupedTopkArgs& a, const TopKeys& groups, RowScratch& r) {
  std::vector<float>& v = r.kept_top2;
  v.clear();
  for (int64_t i = 0; i < a.topk_group; ++i) {
    const int64_t g = index_of_key(groups.keys[i]);
    v.push_back(r.first[g]);
    if (a.group_size >= 2) v.push_back(r.second[g]);
  }
  if (static_cast<int64_t>(v.size()) < a.top_k) return -__builtin_inff();
  std::nth_element(v.begin(), v.begin() + (a.top_k - 1), v.end(), std::greater<float>());
  return v[a.top_k - 1];
}

template <typename scalar_t>
void scores_row(const scalar_t* x, const GroupedTopkArgs& a, float* s) {
  const int64_t E = a.num_experts;
  for (int64_t e = 0; e < E; ++e) s[e] = nan_to_neg_inf(static_cast<float>(x[e]));
  if (!a.softmax) {
    sigmoid_inplace(s, E);
    return;
  }
  float m = s[0];
  for (int64_t e = 1; e < E; ++e) m = std::max(m, s[e]);
  exp_shifted_inplace(s, E, m);
  const float sum = sum_lanes(s, E);
  const float inv = 1.0f / sum;
  for (int64_t e = 0; e < E; ++e) s[e] *= inv;
}

template <typename scalar_t>
void grouped_topk_row(const scalar_t* x, const float* bias, const GroupedTopkArgs& a,
                      RowScratch& r, float* w_out, int32_t* id_out) {
  const int64_t E = a.num_experts, GS = a.group_size;
  float* s = r.s.data();
  float* b = r.b.data();
  scores_row(x, a, s);
  if (bias) {
    for (int64_t e = 0; e < E; ++e) b[e] = nan_to_neg_inf(s[e] + bias[e]);
  } else {
    std::copy(s, s + E, b);  // s has no NaN
  }

  TopKeys experts{r.expert_keys.data(), a.top_k};
  experts.reset();
  if (a.select_groups) {
    TopKeys groups{r.group_keys.data(), a.topk_group};
    groups.reset();
    const SimdKernels& k = simd();
    k.group_top2(b, a.num_groups, GS, r.first.data(), r.second.data());
    for (int64_t g = 0; g < a.num_groups; ++g) {
      // group_score of common/order_key.h (the CUDA kernel's)
      const float score = a.group_top2 ? r.first[g] + r.second[g] : r.first[g];
      groups.offer(order_key(nan_to_neg_inf(score), g));
    }
    const float floor = candidate_floor(a, groups, r);
    for (int64_t i = 0; i < a.topk_group; ++i) {
      const int64_t g0 = index_of_key(groups.keys[i]) * GS;
      for (int64_t c = g0; c < g0 + GS; c += 64) {
        // ascending; an equal value enters by its lower index in any order (order_key)
        for (uint64_t bits = k.mask_at_least(b + c, std::min<int64_t>(64, g0 + GS - c), floor);
             bits != 0; bits &= bits - 1) {
          const int64_t e = c + __builtin_ctzll(bits);
          experts.offer_value(b[e], e);
        }
      }
    }
  } else {
    for (int64_t e = 0; e < E; ++e) experts.offer_value(b[e], e);
  }

  float sum = 0.0f;
  for (int64_t k = 0; k < a.top_k; ++k) {
    id_out[k] = index_of_key(experts.keys[k]);
    w_out[k] = s[id_out[k]];
    sum += w_out[k];
  }
  const float mul = a.renormalize ? (sum > 0.0f ? a.scale / sum : 0.0f) : a.scale;
  for (int64_t k = 0; k < a.top_k; ++k) w_out[k] *= mul;
  if (a.shared_expert_id >= 0) {
    w_out[a.top_k] = 1.0f;
    id_out[a.top_k] = static_cast<int32_t>(a.shared_expert_id);
  }
}

}  // namespace

Report check_grouped_topk_cpu(const at::Tensor& logits,
                              const std::optional<at::Tensor>& correction_bias, int64_t top_k,
                              int64_t num_expert_group, int64_t topk_group,
                              c10::string_view scoring_func, c10::string_view group_scoring,
                              bool /*renormalize*/, double /*routed_scaling_factor*/,
                              int64_t shared_expert_id) {
  // no device check: the CPU checks read none (csrc/checks.h)
  return check_grouped_topk_args(logits, correction_bias, top_k, num_expert_group, topk_group,
                                 scoring_func, group_scoring, shared_expert_id);
}

std::tuple<at::Tensor, at::Tensor> grouped_topk_cpu(
    const at::Tensor& logits, const std::optional<at::Tensor>& correction_bias,
    int64_t top_k, int64_t num_expert_group, int64_t topk_group,
    c10::string_view scoring_func, c10::string_view group_scoring, bool renormalize,
    double routed_scaling_factor, int64_t shared_expert_id) {
  throw_if(check_grouped_topk_cpu(logits, correction_bias, top_k, num_expert_group, topk_group,
                                  scoring_func, group_scoring, renormalize,
                                  routed_scaling_factor, shared_expert_id));
  const GroupedTopkArgs a =
      grouped_topk_args(logits, correction_bias, top_k, num_expert_group, topk_group,
                        scoring_func, group_scoring, renormalize, routed_scaling_factor,
                        shared_expert_id);
  auto w = at::empty({a.num_tokens, a.width}, logits.options().dtype(at::kFloat));
  auto ids = at::empty({a.num_tokens, a.width}, logits.options().dtype(at::kInt));
  at::Tensor bias32;
  if (correction_bias.has_value()) bias32 = correction_bias->to(at::kFloat).contiguous();
  const float* bias = bias32.defined() ? bias32.data_ptr<float>() : nullptr;
  const int64_t stride = logits.stride(0);
  float* w_ptr = w.data_ptr<float>();
  int32_t* id_ptr = ids.data_ptr<int32_t>();

  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kBFloat16, at::kHalf, logits.scalar_type(), "grouped_topk_cpu", [&] {
        const scalar_t* x = logits.data_ptr<scalar_t>();
        // ~1 us of work per row of 256 experts: grains of 64 rows keep threads busy
        // without making small batches pay for the thread pool.
        at::parallel_for(0, a.num_tokens, 64, [&](int64_t begin, int64_t end) {
          RowScratch scratch(a);
          for (int64_t t = begin; t < end; ++t)
            grouped_topk_row<scalar_t>(x + t * stride, bias, a, scratch,
                                       w_ptr + t * a.width, id_ptr + t * a.width);
        });
      });
  return {w, ids};
}

}  // namespace moe_kernels
