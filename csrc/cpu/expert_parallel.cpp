// The expert-parallel slot map on the CPU (semantics: moe_kernels/reference/
// expert_parallel.py): pair (t, k) of logical expert e -> log2phy[e, (t + offset) % logcnt[e]].
#include <ATen/Parallel.h>
#include <ATen/ATen.h>

#include "../ops.h"
#include "index_values.h"

namespace moe_kernels {

Report check_map_to_slots_cpu(const at::Tensor& topk_ids, const at::Tensor& log2phy,
                              const at::Tensor& logcnt, int64_t /*token_offset*/) {
  MK_CHECK_VALUE(topk_ids.dim() == 2 && log2phy.dim() == 2 && logcnt.dim() == 1 &&
                     logcnt.size(0) == log2phy.size(0),
                 "the arguments must be topk_ids (T, K), log2phy (E, R), logcnt (E,), got ",
                 topk_ids.sizes(), ", ", log2phy.sizes(), ", ", logcnt.sizes());
  MK_CHECK_TYPE(index_dtype(topk_ids.scalar_type()) && index_dtype(log2phy.scalar_type()) &&
                    index_dtype(logcnt.scalar_type()),
                "topk_ids, log2phy and logcnt must be int32 or int64, got ",
                topk_ids.scalar_type(), ", ", log2phy.scalar_type(), ", ",
                logcnt.scalar_type());
  // an expert's slots are taken modulo its count, clamped to [1, R]: R = 0 would divide by 0
  MK_CHECK_VALUE(log2phy.size(0) == 0 || log2phy.size(1) >= 1,
                 "log2phy must have at least one slot column, got shape ", log2phy.sizes());
  return {};
}

at::Tensor map_to_slots_cpu(const at::Tensor& topk_ids_in, const at::Tensor& log2phy_in,
                            const at::Tensor& logcnt_in, int64_t token_offset) {
  throw_if(check_map_to_slots_cpu(topk_ids_in, log2phy_in, logcnt_in, token_offset));
  const IndexValues idp(topk_ids_in), tp(log2phy_in), cp(logcnt_in);
  const int64_t T = topk_ids_in.size(0), K = topk_ids_in.size(1);
  const int64_t E = log2phy_in.size(0), R = log2phy_in.size(1);
  at::Tensor out = at::empty({T, K}, topk_ids_in.options().dtype(at::kInt));
  int32_t* op = out.data_ptr<int32_t>();
  at::parallel_for(0, T, 1024, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      for (int64_t k = 0; k < K; ++k) {
        const int64_t e = idp[t * K + k];
        int32_t slot = -1;
        if (e >= 0 && e < E) {
          // a count below 1 or above R is refused in Python; clamp so nothing reads out
          // of bounds on a direct torch.ops call
          const int64_t c = std::min<int64_t>(std::max<int64_t>(cp[e], 1), R);
          // reduced before the sum: any int64 offset, no overflow
          const int64_t r = ((t % c + token_offset % c) % c + c) % c;
          slot = static_cast<int32_t>(tp[e * R + r]);
        }
        op[t * K + k] = slot;
      }
    }
  });
  return out;
}

}  // namespace moe_kernels
