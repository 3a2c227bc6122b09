"""Sweeps the Triton grouped_topk launch config (rows per program, num_warps) on the GPU
for DeepSeek-V3 routing (E=256, 8 groups) and Kimi K2's (E=384, no groups), then times
the other form of a choice (two int32 reductions or one over int64 keys, triton/gating.py
`_keys32`) at the best four configs; prints the best of each token count. The best go
into moe_kernels/triton/gating.py::_launch_config and `_keys32`.
Usage: python3 benchmarks/tune_gating.py"""

import torch

from moe_kernels.bench.common import rotating_sets, time_us
from moe_kernels.triton import gating

K = 8
ROUTERS = {  # name: (E, groups, topk_group, group scoring, token counts)
    "deepseek_v3": (256, 8, 4, "top2_sum", (1, 64, 512, 4096, 16384)),
    "kimi_k2": (384, 1, 1, "max", (1, 4096)),   # decode and prefill: the sweep's time is shared
}
for name, (E, G, tg, gscore, token_counts) in ROUTERS.items():
    for T in token_counts:
        n_sets = rotating_sets(T * E * 2, "cuda")
        sets = [torch.randn(T, E, device="cuda").bfloat16() for _ in range(n_sets)]
        bias = torch.randn(E, device="cuda") * 0.1
        line = []

        def measure(rows, warps, keys32):
            fn = lambda i: gating.grouped_topk(sets[i], bias, K, G, tg, "sigmoid", gscore,
                                               True, 2.5, config=(rows, warps, keys32))
            line.append((time_us(fn, "cuda", n_sets)[0], rows, warps, keys32))

        for rows in [r for r in (1, 2, 4, 8, 16) if r <= max(T, 1)]:
            for warps in (1, 2, 4, 8):
                measure(rows, warps, gating._keys32(warps))
        line.sort()
        for _, rows, warps, keys32 in line[:4]:
            measure(rows, warps, not keys32)
        line.sort()
        print(f"{name} T={T}: best " + ", ".join(
            f"rows={r} warps={w} keys32={k}: {t:.2f} us" for t, r, w, k in line[:4])
            + f" | worst {line[-1][0]:.2f} us", flush=True)
