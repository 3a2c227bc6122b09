"""Triton kernels for FP8 block-scaled quantization (semantics: reference/fp8.py).

One program quantizes ROWS rows x one group of GROUP columns (per-token groups, also
SiLU-and-mul when GATED, or rows gathered into a permuted layout when GATHER) or one
BLOCK_N x BLOCK_K weight block. FP8 outputs are written through uint8 views: on the GPU
the hardware cast (`cvt.rn.satfinite`), under the interpreter a software
round-to-nearest-even (triton/numerics.py).
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from moe_kernels._common import cdiv, next_power_of_2
from moe_kernels.triton.launch import cached_launch
from moe_kernels.triton.numerics import (SOFTWARE_ROUNDING, fp8_e4m3_bits, fp8_e4m3_value,
                                         round_for_store)

FP8_MAX = tl.constexpr(448.0)
_U8 = torch.uint8


@triton.jit
def group_scale(amax, eps, UE8M0: tl.constexpr):
    """Dequantization scale max(amax, eps) / 448, rounded up to a power of two for UE8M0."""
    scale = tl.math.div_rn(tl.maximum(amax, eps), FP8_MAX)
    if UE8M0:
        bits = scale.to(tl.int32, bitcast=True)
        scale = ((bits + 0x7FFFFF) & 0x7F800000).to(tl.float32, bitcast=True)
    return scale


@triton.jit
def quantize_values(x, scale, SOFTWARE: tl.constexpr):
    # div_rn: IEEE division as the reference (plain `/` is div.full.f32 on the GPU, 2 ulp)
    y = tl.minimum(tl.maximum(tl.math.div_rn(x, scale), -FP8_MAX), FP8_MAX)
    # min/max return the non-NaN operand on the GPU: put NaN back (inf stays clamped)
    return fp8_e4m3_bits(tl.where(x != x, x, y), SOFTWARE)


@triton.jit
def finite_abs(x):
    """|x|, with inf and NaN as 0: non-finite values do not set the scale."""
    a = tl.abs(x)
    return tl.where(a < float("inf"), a, 0.0)


@cached_launch
@triton.jit
def _token_group_kernel(x_ptr, src_ptr, q_ptr, s_ptr, M, N, K, P, stride_xm, stride_qm,
                        stride_sm, stride_sg, eps, GATED: tl.constexpr, GATHER: tl.constexpr,
                        UE8M0: tl.constexpr, ROWS: tl.constexpr, GROUP: tl.constexpr,
                        SOFTWARE: tl.constexpr, MASKED: tl.constexpr = False,
                        ZERO_FILL: tl.constexpr = True):
    """q[m, g*GROUP + j] from x[m, g*GROUP + j], or from silu(x[m, c]) * x[m, N + c] when
    GATED; N is the width of q. GATHER: row m quantizes x[src[m] // K] instead, and a row
    whose pair src[m] is outside [0, P) is padding (q and scale 0, nothing read). MASKED:
    the rows are groups of K (the masked layout), src the groups' counts (masked_m): row m
    is live when m % K < src[m // K]; the others are padding too, or with ZERO_FILL False
    not written."""
    m = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
    if GATHER:
        p = tl.load(src_ptr + m, mask=m < M, other=-1).to(tl.int64)
        live = (p >= 0) & (p < P)
        row = tl.where(live, p // K, 0)
    elif MASKED:
        # group and row in it in int32 (ops.fp8.MASKED_MAX_ROWS): the int64 division
        # spilled under triton 3.6
        m32 = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
        count = tl.load(src_ptr + m32 // K, mask=m < M, other=0)
        live = (m < M) & (m32 % K < count)
        row = m
    else:
        live = m < M
        row = m
    g = tl.program_id(1)
    c = g * GROUP + tl.arange(0, GROUP)
    # (row) & (column) masks: the column part keeps N's divisibility, for 16-byte accesses
    mask = live[:, None] & (c < N)[None, :]
    x = tl.load(x_ptr + row[:, None] * stride_xm + c[None, :], mask=mask,
                other=0.0).to(tl.float32)
    if GATED:
        up = tl.load(x_ptr + row[:, None] * stride_xm + N + c[None, :], mask=mask,
                     other=0.0).to(tl.float32)
        x = x / (1.0 + tl.exp(-x)) * up
    scale = group_scale(tl.max(finite_abs(x), axis=1), eps, UE8M0)
    q = quantize_values(x, scale[:, None], SOFTWARE)
    stored = m < M
    if GATHER or (MASKED and ZERO_FILL):   # padding rows written: zeros (x was 0), scale 0
        mask = stored[:, None] & (c < N)[None, :]
        scale = tl.where(live, scale, 0.0)
    elif MASKED:                           # only the live rows written (mask is theirs)
        stored = live
    tl.store(q_ptr + m[:, None] * stride_qm + c[None, :], q, mask=mask)
    tl.store(s_ptr + m * stride_sm + g * stride_sg, scale, mask=stored)


def _rows_per_program(M: int, width: int) -> int:
    # ~4K elements per program: enough bytes in flight per SM, few programs at small M
    return max(1, min(next_power_of_2(max(M, 1)), 4096 // width, 32))


def _token_groups_out(x: torch.Tensor, width: int, group_size: int, eps: float, ue8m0: bool,
                      gated: bool, q: torch.Tensor, s: torch.Tensor,
                      gather: tuple[torch.Tensor, int, int] | None = None,
                      masked: tuple[torch.Tensor, int, bool] | None = None) -> None:
    """q (M, width) fp8 and s (M, G) float32 (any strides) written from x: row m from x's
    row m, or with gather = (pair_of_row (M,) int32 contiguous, K, P) from x's row
    pair_of_row[m] // K (padding where the pair is outside [0, P)), or with masked =
    (masked_m (E,) contiguous, rows per group L, zero_fill) only the rows m with m % L <
    masked_m[m // L] (the others padding, or with zero_fill False not written)."""
    M = q.shape[0]
    if M > 0 and width > 0:
        rows = _rows_per_program(M, group_size)
        src, K, P = gather if gather is not None else (x, 1, 0)   # src unread without gather
        if masked is not None:
            src, K = masked[0], masked[1]
        _token_group_kernel[(cdiv(M, rows), cdiv(width, group_size))](
            x, src, q.view(_U8), s, M, width, K, P, x.stride(0), q.stride(0), s.stride(0),
            s.stride(1), eps, GATED=gated, GATHER=gather is not None, UE8M0=ue8m0, ROWS=rows,
            GROUP=group_size, SOFTWARE=SOFTWARE_ROUNDING, MASKED=masked is not None,
            ZERO_FILL=masked is None or masked[2],
            num_warps=4 if rows * group_size >= 2048 else 1)


def _token_groups(x: torch.Tensor, width: int, group_size: int, eps: float, ue8m0: bool,
                  column_major: bool, gated: bool):
    M = x.shape[0]
    G = cdiv(width, group_size)
    q = torch.empty((M, width), dtype=torch.float8_e4m3fn, device=x.device)
    if column_major:
        s = torch.empty((G, M), dtype=torch.float32, device=x.device).t()
    else:
        s = torch.empty((M, G), dtype=torch.float32, device=x.device)
    _token_groups_out(x, width, group_size, eps, ue8m0, gated, q, s)
    return q, s


def quantize_fp8_per_token_group(x, group_size, eps, scale_ue8m0, column_major_scales):
    """x (M, K) float, last dim contiguous -> q (M, K) fp8, s (M, ceil(K/group)) float32."""
    return _token_groups(x, x.shape[1], group_size, eps, scale_ue8m0, column_major_scales,
                         gated=False)


def quantize_fp8_per_token_group_out(x, group_size, eps, scale_ue8m0, q, s):
    """quantize_fp8_per_token_group into q (M, K) and s (M, G) (s in either layout)."""
    _token_groups_out(x, x.shape[1], group_size, eps, scale_ue8m0, False, q, s)


def gather_rows_quant_fp8(x, pair_of_row, row_of_pair, group_size, eps):
    """x (T, H) float, last dim contiguous; pair_of_row (R,) int32; row_of_pair (T, K)
    int32 -> q (R, H) fp8, s (R, ceil(H/group)) float32: row r is x[pair_of_row[r] // K]
    quantized in 1 x group_size groups (what quantize_fp8_per_token_group then
    gather_rows of q and s give, bit for bit), zeros with scale 0 for padding rows."""
    R, H = pair_of_row.shape[0], x.shape[1]
    T, K = row_of_pair.shape
    q = torch.empty((R, H), dtype=torch.float8_e4m3fn, device=x.device)
    s = torch.empty((R, cdiv(H, group_size)), dtype=torch.float32, device=x.device)
    _token_groups_out(x, H, group_size, eps, False, False, q, s,
                      # K = 0: no pair (P = 0), so no row reads; a divisor of 1 all the same
                      gather=(pair_of_row.contiguous(), max(K, 1), T * K))
    return q, s


def silu_and_mul_quant_fp8(x, group_size, eps=1e-10):
    """x (M, 2N) float = [gate | up] -> q (M, N) fp8, s (M, ceil(N/group)) float32."""
    return _token_groups(x, x.shape[1] // 2, group_size, eps, False, False, gated=True)


def silu_and_mul_quant_fp8_out(x, group_size, eps, q, s):
    """silu_and_mul_quant_fp8 into q (M, N) and s (M, G)."""
    _token_groups_out(x, x.shape[1] // 2, group_size, eps, False, True, q, s)


def silu_and_mul_quant_fp8_masked_out(x, masked_m, group_size, eps, zero_fill, q, s):
    """x (E, M, 2N) [gate | up], last dim contiguous, masked_m (E,) int -> into q (E, M, N)
    and s (E, M, G), contiguous: rows i >= masked_m[e] not read, zeros (zero_fill) or not
    written."""
    E, M, two_n = x.shape
    x2 = x.reshape(E * M, two_n)
    _token_groups_out(x2, two_n // 2, group_size, eps, False, True, q.view(E * M, q.shape[2]),
                      s.view(E * M, s.shape[2]), masked=(masked_m.contiguous(), M, zero_fill))


def silu_and_mul_quant_fp8_masked(x, masked_m, group_size, eps=1e-10):
    """silu_and_mul_quant_fp8_masked_out into new q (E, M, N) fp8, s (E, M, G) float32."""
    E, M, two_n = x.shape
    q = torch.empty((E, M, two_n // 2), dtype=torch.float8_e4m3fn, device=x.device)
    s = torch.empty((E, M, cdiv(two_n // 2, group_size)), dtype=torch.float32, device=x.device)
    silu_and_mul_quant_fp8_masked_out(x, masked_m, group_size, eps, True, q, s)
    return q, s


@triton.jit
def _block_tile(N, K, NB, KB, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """This program's (BLOCK_N, BLOCK_K) block of batch entry b of (B, N, K): offsets
    (int64), their mask, and the offset of the block's scale in (B, NB, KB)."""
    b = tl.program_id(0).to(tl.int64)
    nb = tl.program_id(1)
    kb = tl.program_id(2)
    n = nb * BLOCK_N + tl.arange(0, BLOCK_N)
    k = kb * BLOCK_K + tl.arange(0, BLOCK_K)
    mask = (n < N)[:, None] & (k < K)[None, :]
    offs = b * N * K + n[:, None].to(tl.int64) * K + k[None, :]
    return offs, mask, (b * NB + nb) * KB + kb


@cached_launch
@triton.jit
def _block_quant_kernel(w_ptr, q_ptr, s_ptr, N, K, NB, KB, eps, BLOCK_N: tl.constexpr,
                        BLOCK_K: tl.constexpr, SOFTWARE: tl.constexpr):
    offs, mask, s_off = _block_tile(N, K, NB, KB, BLOCK_N, BLOCK_K)
    w = tl.load(w_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    scale = group_scale(tl.max(tl.max(finite_abs(w), axis=1), axis=0), eps, False)
    tl.store(q_ptr + offs, quantize_values(w, scale, SOFTWARE), mask=mask)
    tl.store(s_ptr + s_off, scale)


def quantize_fp8_block(w, block_n, block_k, eps=1e-10):
    """w (..., N, K) float, contiguous -> q (..., N, K) fp8, s (..., NB, KB) float32."""
    *batch, N, K = w.shape
    B = math.prod(batch)
    NB, KB = cdiv(N, block_n), cdiv(K, block_k)
    q = torch.empty(w.shape, dtype=torch.float8_e4m3fn, device=w.device)
    s = torch.empty((*batch, NB, KB), dtype=torch.float32, device=w.device)
    if w.numel() > 0:
        _block_quant_kernel[(B, NB, KB)](w, q.view(_U8), s, N, K, NB, KB, eps,
                                         BLOCK_N=block_n, BLOCK_K=block_k, SOFTWARE=SOFTWARE_ROUNDING,
                                         num_warps=8)
    return q, s


@cached_launch
@triton.jit
def _block_dequant_kernel(q_ptr, s_ptr, out_ptr, N, K, NB, KB, BLOCK_N: tl.constexpr,
                          BLOCK_K: tl.constexpr, SOFTWARE: tl.constexpr):
    offs, mask, s_off = _block_tile(N, K, NB, KB, BLOCK_N, BLOCK_K)
    q = fp8_e4m3_value(tl.load(q_ptr + offs, mask=mask, other=0), SOFTWARE)
    scale = tl.load(s_ptr + s_off)
    y = round_for_store(q * scale, out_ptr.dtype.element_ty, SOFTWARE)
    tl.store(out_ptr + offs, y.to(out_ptr.dtype.element_ty), mask=mask)


def dequantize_fp8_block(q, s, block_n, block_k, dtype):
    """q (..., N, K) fp8 contiguous, s (..., NB, KB) float32 contiguous -> (..., N, K) dtype."""
    N, K = q.shape[-2:]
    NB, KB = s.shape[-2:]
    B = math.prod(q.shape[:-2])
    out = torch.empty(q.shape, dtype=dtype, device=q.device)
    if q.numel() > 0:
        _block_dequant_kernel[(B, NB, KB)](q.view(_U8), s, out, N, K, NB, KB,
                                           BLOCK_N=block_n, BLOCK_K=block_k,
                                           SOFTWARE=SOFTWARE_ROUNDING, num_warps=8)
    return out
