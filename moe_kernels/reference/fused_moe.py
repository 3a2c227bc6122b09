"""Float32 reference of the routed-expert MoE forward (fused_moe_fp8).

out[t] = sum_k topk_weights[t, k] * down_e(silu(gate_e(h_t)) * up_e(h_t)), e = topk_ids[t, k],
with the FP8 weights dequantized and every product in float32. The activations are
quantized to FP8 (1x128 groups) where the FP8 pipeline quantizes them, before each GEMM,
and dequantized again, and the first GEMM's output is rounded to bfloat16 as the
pipeline stores it (`quantize_activations=True`, the default: DeepSeek-V3's FP8 inference
recipe); fused_moe_fp8 is within 2e-2 relative error of that. With False the
activations stay float32: one e4m3 rounding of Gaussian activations alone is ~2.6%
relative error, so the pipeline sits ~4-5% from that (docs/fp8.md). Ids outside [0, E)
contribute nothing.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from moe_kernels._common import without_autocast
from moe_kernels.reference.fp8 import (dequantize_fp8_block, dequantize_per_token_group,
                                       quantize_fp8_per_token_group)


def _fp8_round_trip(x: torch.Tensor) -> torch.Tensor:
    return dequantize_per_token_group(*quantize_fp8_per_token_group(x))


@without_autocast
def moe_forward(hidden, w13, w13_scales, w2, w2_scales, topk_weights, topk_ids,
                out_dtype=None, quantize_activations=True):
    """hidden (T, H); w13 (E, 2I, H) fp8 [gate rows | up rows], w13_scales
    (E, ceil(2I/128), ceil(H/128)); w2 (E, H, I) fp8, w2_scales (E, ceil(H/128),
    ceil(I/128)); topk_weights (T, K) float; topk_ids (T, K) int -> (T, H) in
    hidden's dtype (or out_dtype)."""
    E, two_i, _ = w13.shape
    inter = two_i // 2
    h = _fp8_round_trip(hidden.float()) if quantize_activations else hidden.float()
    ids = topk_ids.long()
    out = torch.zeros_like(h)
    for e in range(E):
        weight = torch.where(ids == e, topk_weights.float(), 0.0).sum(dim=1)  # (T,)
        # one expert at a time: DeepSeek-V3's 256 experts in float32 would be 45 GB
        gate_up = h @ dequantize_fp8_block(w13[e], w13_scales[e], dtype=torch.float32).T
        if quantize_activations:
            gate_up = gate_up.bfloat16().float()
        act = F.silu(gate_up[:, :inter]) * gate_up[:, inter:]
        if quantize_activations:
            act = _fp8_round_trip(act)
        y = act @ dequantize_fp8_block(w2[e], w2_scales[e], dtype=torch.float32).T
        out += weight[:, None] * y
    return out.to(out_dtype or hidden.dtype)
