// The expert-parallel slot map on the CPU (semantics: moe_kernels/reference/
// expert_parallel.py): pair (t, k) of logical expert e -> log2phy[e, (t + offset) % logcnt[e]].
#include <ATen/Parallel.h>
#include <ATen/ATen.h>
#include <torch/library.h>

#include "../ops.h"

namespace moe_kernels {

at::Tensor map_to_slots_cpu(const at::Tensor& topk_ids_in, const at::Tensor& log2phy_in,
                            const at::Tensor& logcnt_in, int64_t token_offset) {
  TORCH_CHECK_VALUE(topk_ids_in.dim() == 2 && log2phy_in.dim() == 2 && logcnt_in.dim() == 1 &&
                        logcnt_in.size(0) == log2phy_in.size(0),
                    "map_to_slots: topk_ids (T, K), log2phy (E, R), logcnt (E,)");
  const at::Tensor ids = topk_ids_in.to(at::kLong).contiguous();
  const at::Tensor table = log2phy_in.to(at::kLong).contiguous();
  const at::Tensor cnt = logcnt_in.to(at::kLong).contiguous();
  const int64_t T = ids.size(0), K = ids.size(1), E = table.size(0), R = table.size(1);
  at::Tensor out = at::empty({T, K}, ids.options().dtype(at::kInt));
  const int64_t* idp = ids.data_ptr<int64_t>();
  const int64_t* tp = table.data_ptr<int64_t>();
  const int64_t* cp = cnt.data_ptr<int64_t>();
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
          const int64_t r = ((t + token_offset) % c + c) % c;
          slot = static_cast<int32_t>(tp[e * R + r]);
        }
        op[t * K + k] = slot;
      }
    }
  });
  return out;
}

TORCH_LIBRARY_IMPL(moe_kernels, CPU, m) { m.impl("map_to_slots", &map_to_slots_cpu); }

}  // namespace moe_kernels
