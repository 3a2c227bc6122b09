"""`moe-bench`: correctness first, then time, GB/s, % of roofline and speedup over the
torch reference (eager and torch.compile), per op and backend. One module per op."""

from moe_kernels.bench import gating, permute

OPS = {"grouped_topk": gating, "permute": permute}
