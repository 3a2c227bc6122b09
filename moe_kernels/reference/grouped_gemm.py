"""Float32 PyTorch reference for the FP8 grouped GEMMs: the oracle.

out[r] = a[r] @ b[m_indices[r]].T with both operands dequantized (per-128 row groups of a,
128x128 blocks of b). Mathematically equal to the kernels' "promotion every 128"
(exact FP8 block products times a_scale * b_scale, summed in float32); the two differ by
float32 rounding only. Loops over experts on the host (it is the oracle, not a GPU path).
"""

from __future__ import annotations

import torch

from moe_kernels._common import without_autocast
from moe_kernels.reference.fp8 import dequantize_fp8_block, dequantize_per_token_group
from moe_kernels.reference.permute import valid_rows


@without_autocast
def grouped_gemm_fp8(a, a_scales, b, b_scales, m_indices, out_dtype=torch.bfloat16):
    """a (R, K) fp8, a_scales (R, ceil(K/128)), b (E, N, K) fp8, b_scales
    (E, ceil(N/128), ceil(K/128)), m_indices (R,) int -> (R, N) out_dtype; rows whose
    m_indices is outside [0, E) are zero."""
    R = a.shape[0]
    E, N = b.shape[0], b.shape[1]
    a32 = dequantize_per_token_group(a, a_scales)
    b32 = dequantize_fp8_block(b, b_scales, dtype=torch.float32)
    out = torch.zeros((R, N), dtype=torch.float32, device=a.device)
    m = m_indices.long()
    for e in range(E):
        sel = m == e
        out = torch.where(sel[:, None], a32 @ b32[e].T, out)
    return out.to(out_dtype)


@without_autocast
def grouped_gemm_fp8_masked(a, a_scales, b, b_scales, masked_m, out_dtype=torch.bfloat16):
    """a (E, M, K) fp8, a_scales (E, M, ceil(K/128)), b (E, N, K) fp8, b_scales
    (E, ceil(N/128), ceil(K/128)), masked_m (E,) int -> (E, M, N) out_dtype; rows
    >= masked_m[e] of group e are zero."""
    E, M, K = a.shape
    a32 = dequantize_per_token_group(a.reshape(E * M, K),
                                     a_scales.reshape(E * M, a_scales.shape[2]))
    b32 = dequantize_fp8_block(b, b_scales, dtype=torch.float32)
    out = torch.bmm(a32.view(E, M, K), b32.transpose(1, 2))
    return torch.where(valid_rows(masked_m, M)[..., None], out, 0.0).to(out_dtype)
