"""`moe-bench`: correctness first, then time, GB/s, % of roofline and speedup over the
torch reference (eager and torch.compile), per op and backend. One module per op."""

from moe_kernels.bench import (expert_parallel, fp8, fused_moe, gating, grouped_gemm, layer,
                               mla, permute)

# One module per op module; each names the public ops (or layer) its rows measure.
MODULES = (gating, permute, fp8, grouped_gemm, fused_moe, mla, layer, expert_parallel)
# `moe-bench --op NAME`: the public name of what is measured -> the module measuring it.
OPS = {name: module for module in MODULES for name in module.MEASURES}
