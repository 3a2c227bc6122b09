"""`moe-bench`: correctness first, then time, GB/s, % of roofline and speedup over the
torch reference (eager and torch.compile), per op and backend. One module per op."""

from moe_kernels.bench import fp8, fused_moe, gating, grouped_gemm, layer, mla, permute

OPS = {"grouped_topk": gating, "permute": permute, "fp8_quant": fp8,
       "grouped_gemm_fp8": grouped_gemm, "fused_moe_fp8": fused_moe,
       "mla_decompress_kv": mla, "deepseek_v3_moe": layer}
