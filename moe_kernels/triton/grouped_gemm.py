"""Triton FP8 grouped GEMMs with 128-block scales (semantics: reference/grouped_gemm.py).

All three kernels share `_promoted_tile`: for each 128-wide K block a fresh `tl.dot` of
the FP8 tiles (exact products, float32 sum) times a_scale[row] * b_scale[col] is added to
a float32 accumulator ("promotion every 128"; Triton's `acc=` form does not promote on
sm90). Tiles are BLOCK_M x BLOCK_N; BLOCK_K is the scale block, 128.

- contiguous (`grouped_gemm_fp8`): a program owns BLOCK_M rows of the permuted layout and
  loops over the experts present among them (one when the layout was aligned to BLOCK_M
  with `permute(align=...)`: the fast path; any m_indices is correct). `-1` rows -> 0.
- segments (used by `fused_moe_fp8`): a program owns BLOCK_M rows of one expert of an
  align=1 layout, found from tokens_per_expert in the kernel, so no padding rows exist.
- masked (`grouped_gemm_fp8_masked`): a program owns BLOCK_M rows of one group; rows
  >= masked_m[e] are written as zeros without reading the weights.

Operands arrive as uint8 views (bit-cast to fp8 after the load: the interpreter cannot
cast `other=0` to fp8). Tile configs: configs/grouped_gemm.py.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from moe_kernels.configs.grouped_gemm import gemm_config
from moe_kernels.triton.numerics import SOFTWARE_ROUNDING, round_for_store

SCALE_BLOCK = 128
_U8 = torch.uint8


@triton.jit
def _promoted_tile(a_ptr, as_ptr, b_ptr, bs_ptr, rows, row_ok, e, n, N, K,
                   stride_am, stride_asm, stride_ask, stride_be, stride_bn, stride_bse,
                   stride_bsn, stride_bsk, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                   BLOCK_K: tl.constexpr):
    """sum over K blocks of dot(a[rows, kb], b[e, n, kb].T) * a_s[rows, kb] * b_s[e, n//128, kb]
    as a (BLOCK_M, BLOCK_N) float32 tile; rows with row_ok false and columns n >= N are 0."""
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    kr = tl.arange(0, BLOCK_K)
    n_ok = n < N
    a_row = a_ptr + rows[:, None] * stride_am
    b_col = b_ptr + e * stride_be + n[None, :] * stride_bn
    as_row = as_ptr + rows * stride_asm
    bs_col = bs_ptr + e * stride_bse + (n // BLOCK_K) * stride_bsn
    for kb in range(0, tl.cdiv(K, BLOCK_K)):
        k = kb * BLOCK_K + kr
        k_ok = k < K
        a = tl.load(a_row + k[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0)
        b = tl.load(b_col + k[:, None], mask=k_ok[:, None] & n_ok[None, :], other=0)
        a_s = tl.load(as_row + kb * stride_ask, mask=row_ok, other=0.0)
        b_s = tl.load(bs_col + kb * stride_bsk, mask=n_ok, other=0.0)
        part = tl.dot(a.to(tl.float8e4nv, bitcast=True), b.to(tl.float8e4nv, bitcast=True))
        acc += part * (a_s[:, None] * b_s[None, :])
    return acc


@triton.jit
def _store_tile(out_ptr, acc, rows, row_ok, n, N, stride_om):
    dtype = out_ptr.dtype.element_ty
    acc = round_for_store(acc, dtype, SOFTWARE_ROUNDING)
    tl.store(out_ptr + rows[:, None] * stride_om + n[None, :], acc.to(dtype),
             mask=row_ok[:, None] & (n < N)[None, :])


@triton.jit
def _contiguous_kernel(a_ptr, as_ptr, b_ptr, bs_ptr, m_ptr, out_ptr, R, N, K, E,
                       stride_am, stride_asm, stride_ask, stride_be, stride_bn, stride_bse,
                       stride_bsn, stride_bsk, stride_om, BLOCK_M: tl.constexpr,
                       BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    n = tl.program_id(1).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    in_range = rows < R
    m = tl.load(m_ptr + rows, mask=in_range, other=-1)
    valid = in_range & (m >= 0) & (m < E)
    e_lo = tl.min(tl.where(valid, m, E), axis=0)
    e_hi = tl.max(tl.where(valid, m, -1), axis=0)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for e in range(e_lo, e_hi + 1):
        sel = valid & (m == e)
        if tl.max(sel.to(tl.int32), axis=0) > 0:
            part = _promoted_tile(a_ptr, as_ptr, b_ptr, bs_ptr, rows, sel, tl.cast(e, tl.int64), n,
                                  N, K, stride_am, stride_asm, stride_ask, stride_be,
                                  stride_bn, stride_bse, stride_bsn, stride_bsk, BLOCK_M,
                                  BLOCK_N, BLOCK_K)
            acc += tl.where(sel[:, None], part, 0.0)
    _store_tile(out_ptr, acc, rows, in_range, n, N, stride_om)


@triton.jit
def _segments_kernel(a_ptr, as_ptr, b_ptr, bs_ptr, offsets_ptr, counts_ptr, out_ptr, N, K, E,
                     stride_am, stride_asm, stride_ask, stride_be, stride_bn, stride_bse,
                     stride_bsn, stride_bsk, stride_om, E_PAD: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    # tile i belongs to the expert e with ends[e-1] <= i < ends[e], ends = cumsum of
    # ceil(count / BLOCK_M): E_PAD counts per program, cheaper than another launch
    tile = tl.program_id(0)
    er = tl.arange(0, E_PAD)
    counts = tl.load(counts_ptr + er, mask=er < E, other=0)
    tiles = (counts + BLOCK_M - 1) // BLOCK_M
    ends = tl.cumsum(tiles, axis=0)
    e = tl.sum((ends <= tile).to(tl.int32), axis=0)
    if e < E:
        first_tile = tl.sum(tl.where(er == e, ends - tiles, 0), axis=0)
        count = tl.sum(tl.where(er == e, counts, 0), axis=0)
        start = tl.load(offsets_ptr + e)
        local = (tile - first_tile).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
        row_ok = local < count
        rows = start + local
        n = tl.program_id(1).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
        acc = _promoted_tile(a_ptr, as_ptr, b_ptr, bs_ptr, rows, row_ok, e.to(tl.int64), n, N,
                             K, stride_am, stride_asm, stride_ask, stride_be, stride_bn,
                             stride_bse, stride_bsn, stride_bsk, BLOCK_M, BLOCK_N, BLOCK_K)
        _store_tile(out_ptr, acc, rows, row_ok, n, N, stride_om)


@triton.jit
def _masked_kernel(a_ptr, as_ptr, b_ptr, bs_ptr, masked_ptr, out_ptr, M, N, K,
                   stride_am, stride_asm, stride_ask, stride_be, stride_bn, stride_bse,
                   stride_bsn, stride_bsk, stride_om, BLOCK_M: tl.constexpr,
                   BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    tiles_m = tl.cdiv(M, BLOCK_M)
    e = (tl.program_id(0) // tiles_m).to(tl.int64)
    local = (tl.program_id(0) % tiles_m) * BLOCK_M + tl.arange(0, BLOCK_M)
    rows = e * M + local
    n = tl.program_id(1).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    count = tl.load(masked_ptr + e)
    in_group = local < M
    if (tl.program_id(0) % tiles_m) * BLOCK_M < count:
        acc = _promoted_tile(a_ptr, as_ptr, b_ptr, bs_ptr, rows, in_group & (local < count), e,
                             n, N, K, stride_am, stride_asm, stride_ask, stride_be, stride_bn,
                             stride_bse, stride_bsn, stride_bsk, BLOCK_M, BLOCK_N, BLOCK_K)
    else:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    _store_tile(out_ptr, acc, rows, in_group, n, N, stride_om)


def _b_strides(b, b_scales):
    return (b.stride(0), b.stride(1), b_scales.stride(0), b_scales.stride(1),
            b_scales.stride(2))


def _launch_opts(cfg):
    return dict(BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], BLOCK_K=SCALE_BLOCK,
                num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])


def grouped_gemm_fp8(a, a_scales, b, b_scales, m_indices, out_dtype):
    """a (R, K) fp8 (last dim contiguous), a_scales (R, KB) float32, b (E, N, K) fp8
    (last dim contiguous), b_scales (E, NB, KB) float32, m_indices (R,) int32 -> (R, N)."""
    R, K = a.shape
    E, N = b.shape[0], b.shape[1]
    out = torch.empty((R, N), dtype=out_dtype, device=a.device)
    if R == 0 or N == 0:
        return out
    cfg = gemm_config("contiguous", max(R // max(E, 1), 1), N, K, a.device)
    grid = (triton.cdiv(R, cfg["BLOCK_M"]), triton.cdiv(N, cfg["BLOCK_N"]))
    _contiguous_kernel[grid](a.view(_U8), a_scales, b.view(_U8), b_scales, m_indices, out,
                             R, N, K, E, a.stride(0), a_scales.stride(0), a_scales.stride(1),
                             *_b_strides(b, b_scales), out.stride(0), **_launch_opts(cfg))
    return out


def grouped_gemm_fp8_segments(a, a_scales, b, b_scales, expert_offsets, tokens_per_expert,
                              out_dtype):
    """a (R, K) fp8 in the align=1 layout of `permute` (expert e's rows start at
    expert_offsets[e], tokens_per_expert[e] of them) -> (R, N); rows past the last expert
    are left unwritten (they are no pair's row)."""
    R, K = a.shape
    E, N = b.shape[0], b.shape[1]
    out = torch.empty((R, N), dtype=out_dtype, device=a.device)
    if R == 0 or N == 0:
        return out
    cfg = gemm_config("segments", max(R // max(E, 1), 1), N, K, a.device)
    bm = cfg["BLOCK_M"]
    # sum_e ceil(c_e / BM) <= floor(R / BM) + (number of non-empty experts)
    tiles = R // bm + min(R, E)
    grid = (tiles, triton.cdiv(N, cfg["BLOCK_N"]))
    _segments_kernel[grid](a.view(_U8), a_scales, b.view(_U8), b_scales, expert_offsets,
                           tokens_per_expert, out, N, K, E, a.stride(0), a_scales.stride(0),
                           a_scales.stride(1), *_b_strides(b, b_scales), out.stride(0),
                           E_PAD=triton.next_power_of_2(E), **_launch_opts(cfg))
    return out


def grouped_gemm_fp8_masked(a, a_scales, b, b_scales, masked_m, out_dtype):
    """a (E, M, K) fp8, a_scales (E, M, KB), b (E, N, K) fp8, b_scales (E, NB, KB),
    masked_m (E,) int32 -> (E, M, N); rows >= masked_m[e] are zero."""
    E, M, K = a.shape
    N = b.shape[1]
    out = torch.empty((E, M, N), dtype=out_dtype, device=a.device)
    if E * M == 0 or N == 0:
        return out
    a2 = a.reshape(E * M, K)
    s2 = a_scales.reshape(E * M, a_scales.shape[2])
    cfg = gemm_config("masked", M, N, K, a.device)
    grid = (E * triton.cdiv(M, cfg["BLOCK_M"]), triton.cdiv(N, cfg["BLOCK_N"]))
    _masked_kernel[grid](a2.view(_U8), s2, b.view(_U8), b_scales, masked_m, out, M, N, K,
                         a2.stride(0), s2.stride(0), s2.stride(1), *_b_strides(b, b_scales),
                         N, **_launch_opts(cfg))
    return out
