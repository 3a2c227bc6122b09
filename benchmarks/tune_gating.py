"""Sweeps the Triton grouped_topk launch config (rows per program, num_warps) on the GPU
for DeepSeek-V3 routing and prints the time of each; the best go into
moe_kernels/triton/gating.py::_launch_config. Usage: python3 benchmarks/tune_gating.py"""

import torch

from moe_kernels.bench.common import rotating_sets, time_us
from moe_kernels.triton import gating

E, K = 256, 8
for T in (1, 64, 512, 4096, 16384):
    n_sets = rotating_sets(T * E * 2, "cuda")
    sets = [torch.randn(T, E, device="cuda").bfloat16() for _ in range(n_sets)]
    bias = torch.randn(E, device="cuda") * 0.1
    rows_list = [r for r in (1, 2, 4, 8, 16) if r <= max(T, 1)]
    line = []
    for rows in rows_list:
        for warps in (1, 2, 4, 8):
            fn = lambda i: gating.grouped_topk(sets[i], bias, K, 8, 4, "sigmoid", "top2_sum",
                                               True, 2.5, config=(rows, warps))
            t, _ = time_us(fn, "cuda", n_sets)
            line.append((t, rows, warps))
    line.sort()
    print(f"T={T}: best " + ", ".join(f"rows={r} warps={w}: {t:.2f} us" for t, r, w in line[:4])
          + f" | worst {line[-1][0]:.2f} us", flush=True)
