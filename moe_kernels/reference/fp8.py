"""Float32 PyTorch reference for FP8 block-scaled quantization: the oracle.

FP8 is torch.float8_e4m3fn (largest finite 448). A scale is the dequantization multiplier,
real = fp8.float() * scale (DeepSeek's `weight_scale_inv`), one per group of 128 values of
a row (activations) or per 128x128 block (weights):

    scale = max(amax, eps) / 448          (ue8m0: rounded up to a power of two)
    q     = fp8(clamp(x / scale, -448, 448))   round to nearest even

The clamp comes before the cast because PyTorch's cast turns |x| >= 480 into NaN, and an
all-zero group gets the finite scale eps / 448 and zeros. Non-finite values do not set the
scale (amax is over finite values): +-inf saturate to +-448 and NaN stays NaN, so one bad
value does not wipe out its group.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from moe_kernels._common import FP8, FP8_MAX, cdiv
from moe_kernels.reference.permute import gather_rows, valid_rows



def scale_from_amax(amax: torch.Tensor, eps: float, ue8m0: bool) -> torch.Tensor:
    """float32 dequantization scale of a group from its absolute maximum."""
    scale = torch.clamp(amax.float(), min=eps) / FP8_MAX
    if ue8m0:
        # 2**ceil(log2(scale)) exactly: frexp gives scale = m * 2**e with m in [0.5, 1),
        # an exact power of two when m == 0.5
        m, e = torch.frexp(scale)
        scale = torch.ldexp(torch.ones_like(scale), torch.where(m == 0.5, e - 1, e))
    return scale


def finite_amax(x: torch.Tensor, dim) -> torch.Tensor:
    return torch.where(torch.isfinite(x), x.abs(), 0.0).amax(dim=dim)


def to_fp8(x: torch.Tensor) -> torch.Tensor:
    return torch.clamp(x, -FP8_MAX, FP8_MAX).to(FP8)


def _pad_last(x: torch.Tensor, multiple: int) -> torch.Tensor:
    pad = -x.shape[-1] % multiple
    return F.pad(x, (0, pad)) if pad else x


@torch.no_grad()   # not differentiable, as the kernels' outputs (docs/api.md)
def quantize_fp8_per_token_group(x: torch.Tensor, group_size: int = 128, eps: float = 1e-10,
                                 scale_ue8m0: bool = False, column_major_scales: bool = False):
    """x (M, K) float -> q (M, K) float8_e4m3fn, s (M, ceil(K/group_size)) float32.
    A partial last group is quantized over its own values. column_major_scales: s has
    strides (1, M) (the storage of an (G, M) tensor, as DeepGEMM reads it)."""
    M, K = x.shape
    G = cdiv(K, group_size)
    xf = _pad_last(x.float(), group_size).view(M, G, group_size)
    scale = scale_from_amax(finite_amax(xf, -1), eps, scale_ue8m0)
    q = to_fp8(xf / scale[..., None]).view(M, G * group_size)[:, :K]
    if column_major_scales:
        scale = scale.t().contiguous().t()
    else:   # row-major strides whatever M (a reduction over no rows leaves strides (1, 0))
        scale = scale.clone(memory_format=torch.contiguous_format)
    return q.contiguous(), scale


@torch.no_grad()   # not differentiable, as the kernels' outputs (docs/api.md)
def quantize_fp8_block(w: torch.Tensor, block_n: int = 128, block_k: int = 128,
                       eps: float = 1e-10):
    """w (..., N, K) float -> q (..., N, K) float8_e4m3fn,
    s (..., ceil(N/block_n), ceil(K/block_k)) float32; partial edge blocks use their own
    values."""
    *batch, N, K = w.shape
    wf = w.float().reshape(math.prod(batch), N, K)
    pn, pk = -N % block_n, -K % block_k
    wp = F.pad(wf, (0, pk, 0, pn))
    B = wp.shape[0]
    blocks = wp.view(B, (N + pn) // block_n, block_n, (K + pk) // block_k, block_k)
    scale = scale_from_amax(finite_amax(blocks, (2, 4)), eps, False)
    q = to_fp8(blocks / scale[:, :, None, :, None]).view(B, N + pn, K + pk)[:, :N, :K]
    return q.reshape(*batch, N, K).contiguous(), scale.reshape(*batch, *scale.shape[1:])


@torch.no_grad()   # not differentiable, as the kernels' outputs (docs/api.md)
def dequantize_fp8_block(q: torch.Tensor, s: torch.Tensor, block_n: int = 128,
                         block_k: int = 128, dtype: torch.dtype = torch.bfloat16):
    """q (..., N, K) fp8, s (..., ceil(N/block_n), ceil(K/block_k)) -> (..., N, K) dtype,
    computed in float32: one float32 copy of q scaled in place, each block by its scale
    broadcast (DeepSeek-V3's 256 experts: 30 GB of float32, where a float32 product
    of q and the scales expanded to its shape took three such tensors)."""
    N, K = q.shape[-2:]
    x = torch.empty(q.shape, dtype=torch.float32, device=q.device)
    x.copy_(q)
    if N % block_n == 0 and K % block_k == 0:
        blocks = x.view(*q.shape[:-2], N // block_n, block_n, K // block_k, block_k)
        blocks.mul_(s.float()[..., :, None, :, None])
    else:
        full = s.float().repeat_interleave(block_n, dim=-2)[..., :N, :]
        x.mul_(full.repeat_interleave(block_k, dim=-1)[..., :K])
    return x.to(dtype)


def dequantize_per_token_group(q: torch.Tensor, s: torch.Tensor, group_size: int = 128):
    """q (M, K) fp8, s (M, ceil(K/group_size)) -> (M, K) float32."""
    K = q.shape[-1]
    return q.float() * s.float().repeat_interleave(group_size, dim=-1)[..., :K]


@torch.no_grad()   # not differentiable, as the kernels' outputs (docs/api.md)
def silu_and_mul_quant_fp8(x: torch.Tensor, group_size: int = 128, eps: float = 1e-10):
    """x (M, 2N) = [gate | up] -> quantize(silu(gate) * up) computed in float32:
    q (M, N) fp8, s (M, ceil(N/group_size)) float32."""
    N = x.shape[-1] // 2
    xf = x.float()
    y = F.silu(xf[:, :N]) * xf[:, N:]
    return quantize_fp8_per_token_group(y, group_size, eps)


def silu_and_mul_quant_fp8_masked(x: torch.Tensor, masked_m: torch.Tensor,
                                  group_size: int = 128, eps: float = 1e-10):
    """x (E, M, 2N) = [gate | up], masked_m (E,) int -> q (E, M, N) fp8, s (E, M, G) float32:
    row i < masked_m[e] as silu_and_mul_quant_fp8 gives it, the other rows zero (q 0,
    scale 0)."""
    E, M, two_n = x.shape
    q, s = silu_and_mul_quant_fp8(x.reshape(E * M, two_n), group_size, eps)
    valid = valid_rows(masked_m, M)[..., None]
    q = torch.where(valid, q.view(E, M, q.shape[1]).view(torch.uint8), 0).view(FP8)
    return q, torch.where(valid, s.view(E, M, s.shape[1]), 0.0)


@torch.no_grad()   # not differentiable, as the kernels' outputs (docs/api.md)
def gather_rows_quant_fp8(x: torch.Tensor, pair_of_row: torch.Tensor, row_of_pair: torch.Tensor,
                          group_size: int = 128, eps: float = 1e-10):
    """x (T, H) float; pair_of_row (R,) int32 (-1: padding); row_of_pair (T, K) int32 ->
    q (R, H) fp8, s (R, ceil(H/group_size)) float32: x's rows quantized per token group,
    then permuted (row r from x[pair_of_row[r] // K]; padding rows zero, scale 0)."""
    q, s = quantize_fp8_per_token_group(x, group_size, eps)
    K = row_of_pair.shape[1]
    return gather_rows(q, pair_of_row, K), gather_rows(s, pair_of_row, K)
