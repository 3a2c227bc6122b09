"""fused_moe_fp8: cases and rule. Its contract bounds the relative Frobenius error
(2e-2) against the float32 forward; the check applies that bound against the reference
chain (the same quantization points: 1x128 activations before each GEMM, GEMM1 in bf16)."""

from __future__ import annotations

import torch

from moe_kernels.testing import rules
from moe_kernels.testing.core import Case, OpSpec, register
from moe_kernels.testing.inputs import fp8_weights, pick, small, topk_ids


def _fused_cases(preset, g, dev):
    def mk(name, why, T, K, E, *, H=256, I=128, ids=None, dtype=torch.bfloat16):
        w13, s13 = fp8_weights(g, (E, 2 * I, H), device=dev)
        w2, s2 = fp8_weights(g, (E, H, I), device=dev)
        ids = topk_ids(g, T, K, E, device=dev) if ids is None else ids.to(dev)
        return Case("fused_moe_fp8", name, dict(
            hidden=torch.randn(T, H, generator=g).to(dtype).to(dev), w13=w13, w13_scales=s13,
            w2=w2, w2_scales=s2, topk_weights=torch.rand(T, K, generator=g).to(dev),
            topk_ids=ids), why)
    if preset == "edge":
        skipped = topk_ids(g, 6, 2, 4)
        skipped[0, 0], skipped[3, 1] = -1, 7
        return [
            mk("empty", "T = 0", 0, 2, 4),
            mk("one_token", "T = 1", 1, 2, 4),
            mk("all_on_one_expert", "every pair on expert 2", 5, 1, 4,
               ids=torch.full((5, 1), 2, dtype=torch.int32)),
            mk("skipped_ids", "-1 and ids >= E add nothing", 6, 2, 4, ids=skipped),
            mk("experts_not_power_of_two", "E = 5", 7, 2, 5),
            mk("intermediate_not_multiple_of_128", "I = 200: partial scale blocks", 4, 2, 3,
               I=200),
            mk("float32_hidden", "float32 in and out", 4, 2, 4, dtype=torch.float32),
            mk("no_experts", "E = 0 (weights of no expert): every pair skipped, zeros", 4, 2,
               0, ids=torch.zeros(4, 2, dtype=torch.int32)),
            mk("no_intermediate", "I = 0: every down-projection an empty sum, zeros", 4, 2, 3,
               I=0),
        ]
    if preset == "deepseek_v3":
        H, I, E = (7168, 2048, 32) if dev.type == "cuda" else (512, 256, 16)
        return [mk(f"T{T}", f"top-8 of {E} (a rank's share of 256), H={H}, I={I}", T, 8, E,
                   H=H, I=I) for T in (1, 16)]
    return [mk(f"random_{i}", "drawn sizes", small(g, 10), K, K + small(g, 4),
               H=pick(g, [128, 256]), I=pick(g, [128, 200]),
               dtype=pick(g, [torch.float32, torch.bfloat16]))
            for i, K in enumerate([pick(g, [1, 2, 3]) for _ in range(4)])]


register(OpSpec(
    "fused_moe_fp8", ("hidden", "w13", "w13_scales", "w2", "w2_scales", "topk_weights",
                      "topk_ids"), _fused_cases, lambda r: {"out": r},
    lambda got, want, case=None: [rules.relative_error("out", got["out"], want["out"])]))
