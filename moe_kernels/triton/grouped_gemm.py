"""Triton FP8 grouped GEMMs with 128-block scales (semantics: reference/grouped_gemm.py).

All three kernels share `_promoted_tile`: for each 128-wide K block a fresh `tl.dot` of
the FP8 tiles (exact products, float32 sum) times a_scale[row] * b_scale[col] is added to
a float32 accumulator ("promotion every 128"; Triton's `acc=` form does not promote on
sm90).

- contiguous (`grouped_gemm_fp8`): a program owns BLOCK_M rows of the permuted layout and
  one pass per expert present among them (one when the layout was aligned to BLOCK_M with
  `permute(align=...)`: the fast path; any m_indices is correct). Each pass stores only its
  expert's rows, so one accumulator is live. `-1` rows -> 0.
- segments (used by `fused_moe_fp8`): a program owns BLOCK_M rows of one expert of an
  align=1 layout, found from tokens_per_expert in the kernel, so no padding rows exist.
- masked (`grouped_gemm_fp8_masked`): a program owns BLOCK_M rows of one group; rows
  >= masked_m[e] are written as zeros without reading the weights.

Hopper code shape (read in the sm_90a compile report, docs/fp8.md):
- Operands load through fp8-typed pointers, so the pipeliner copies them global -> shared
  asynchronously (cp.async) and wgmma reads both from shared memory. Under the interpreter,
  which cannot fill a masked fp8 load, they load as uint8 and are decoded to float32
  (SOFTWARE; its own fp8 dot would read the NaN codes 0x7F / 0xFF as +-480: the products
  are exact either way, and NaN codes give NaN as on the GPU).
- Tiles of fewer than 64 rows (decode) swap A and B (SWAP_AB, from BLOCK_M < 64): the
  weight tile takes wgmma's 64-row M side and the tokens its N side (8..256), instead of
  falling back to mma.sync.
- The weight scale of a tile whose BLOCK_N divides 128 is one scalar per K block; the
  scales of block kb + 1 load (plain loads) while block kb computes.
- Programs walk GROUP_M row tiles across every column tile before the next rows (L2
  reuse of the A rows, as the Triton matmul tutorial's grouped order).
- A config with `tma` loads the fp8 tiles through host-built TMA descriptors instead
  (TMA: one copy per tile, no per-thread addresses: ~60 fewer registers a thread at
  64x128, docs/fp8.md). A TMA tile holds whole rows, those of other experts too, which the
  contiguous and segments kernels never store and the masked kernel stores as zeros (once
  after the K loop, for pointer loads too: a masked row's scale of 0 times a NaN or inf
  weight scale is NaN). Operands a descriptor cannot describe (rows not a
  multiple of 16 bytes, unaligned base) load through pointers.
- A contiguous or segments config with `ws` runs `_ws_contiguous_kernel` or
  `_ws_segments_kernel` instead, Gluon kernels for sm_90 in DeepGEMM's structure: one
  producer warp issues the TMA copies of a 128 x 128 tile's operands into a ring of
  WS_STAGES shared buffers, and two consumer warp groups (64 rows each, partitions of
  their own) run wgmma on them and promote the products by their scales; while one
  group promotes, the other's wgmma runs, which one partition of two warp groups
  waiting on the same barrier cannot do (docs/fp8.md).
Tile configs: configs/grouped_gemm.py.
"""

from __future__ import annotations

import dataclasses
import functools

import torch
import triton
import triton.language as tl
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import (mbarrier, tma, warpgroup_mma,
                                                              warpgroup_mma_wait)
from triton.experimental.gluon.nvidia.hopper import TensorDescriptor as GluonDescriptor
from triton.tools.tensor_descriptor import TensorDescriptor

from moe_kernels._common import SCALE_BLOCK, cdiv, next_power_of_2
from moe_kernels.configs.grouped_gemm import gemm_config
from moe_kernels.reference.permute import valid_rows
from moe_kernels.triton.launch import cached_launch, configure
from moe_kernels.triton.numerics import SOFTWARE_ROUNDING, fp8_e4m3_value, round_for_store

GROUP_M = 8
WGMMA_M = 64       # a tile with fewer rows swaps A and B
_U8 = torch.uint8


@triton.jit
def _load_fp8(ptrs, mask, SOFTWARE: tl.constexpr):
    """An fp8 operand tile; under the interpreter its values in float32 (module docstring)."""
    if SOFTWARE:     # interpreter: the bits as uint8 (it cannot cast `other` to fp8)
        return fp8_e4m3_value(tl.load(ptrs, mask=mask, other=0), SOFTWARE)
    else:
        return tl.load(ptrs, mask=mask, other=0.0)


@triton.jit
def _grouped_order(pid, tiles_m, tiles_n, GROUP: tl.constexpr):
    """(tile_m, tile_n) of program pid: GROUP row tiles walk every column tile together."""
    per_group = GROUP * tiles_n
    first_m = (pid // per_group) * GROUP
    size_m = tl.minimum(tiles_m - first_m, GROUP)
    local = pid % per_group
    return first_m + local % size_m, local // size_m


@triton.jit
def _block_scales(as_row, bs_ptrs, kb, num_kb, row_ok, n_ok, stride_ask, stride_bsk,
                  BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """(a scales of the rows, b scale(s) of the columns) of K block kb; past the last
    block, the last block's (read, never used: no mask to carry)."""
    kb = tl.minimum(kb, num_kb - 1)
    a_s = tl.load(as_row + kb * stride_ask, mask=row_ok, other=0.0)
    if BLOCK_K % BLOCK_N == 0:
        b_s = tl.load(bs_ptrs + kb * stride_bsk)
    else:
        b_s = tl.load(bs_ptrs + kb * stride_bsk, mask=n_ok, other=0.0)
    return a_s, b_s


@triton.jit
def _tma_tiles(a_desc, b_desc, row0, e, n0, k0, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
               SOFTWARE: tl.constexpr):
    """(a[row0 : row0 + BLOCK_M, k0 : k0 + BLOCK_K], b[e, n0 : n0 + BLOCK_N, k0 : ...]) as
    fp8 tiles through TMA descriptors (out of bounds: zeros; under the interpreter the
    descriptors hold uint8 bits, decoded to float32 here)."""
    x = a_desc.load([row0.to(tl.int32), k0])
    w = b_desc.load([e.to(tl.int32), n0.to(tl.int32), k0]).reshape(BLOCK_N, BLOCK_K)
    if SOFTWARE:
        x = fp8_e4m3_value(x, SOFTWARE)
        w = fp8_e4m3_value(w, SOFTWARE)
    return x, w


@triton.jit
def _promoted_tile(a_ptr, as_ptr, b_ptr, bs_ptr, rows, row_ok, row0, e, n0, N, K,
                   stride_am, stride_asm, stride_ask, stride_be, stride_bn, stride_bse,
                   stride_bsn, stride_bsk, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                   BLOCK_K: tl.constexpr, SWAP_AB: tl.constexpr, EVEN_K: tl.constexpr,
                   TMA: tl.constexpr, SOFTWARE: tl.constexpr):
    """sum over K blocks of dot(a[rows, kb], b[e, n, kb].T) * a_s[rows, kb] * b_s[e, n//128, kb]
    as a (BLOCK_M, BLOCK_N) float32 tile, n = n0 + [0, BLOCK_N); rows with row_ok false
    and columns n >= N hold no result (the caller stores them as zeros, or not at all).
    SWAP_AB computes the transposed tile (weights on the M side).
    TMA: a_ptr and b_ptr are TMA descriptors of a (R, K) and b (E, N, K), and the tile's
    rows are row0 + [0, BLOCK_M) (rows == row0 + arange where row_ok)."""
    n = n0 + tl.arange(0, BLOCK_N)
    n_ok = n < N
    kr = tl.arange(0, BLOCK_K)
    if not TMA:
        a_base = a_ptr + rows * stride_am
        b_base = b_ptr + e * stride_be + n * stride_bn
    as_row = as_ptr + rows * stride_asm
    if BLOCK_K % BLOCK_N == 0:  # the tile lies inside one 128-row scale block of b
        bs_ptrs = bs_ptr + e * stride_bse + (n0 // BLOCK_K) * stride_bsn
    else:
        bs_ptrs = bs_ptr + e * stride_bse + (n // BLOCK_K) * stride_bsn
    if SWAP_AB:
        acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    else:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    num_kb = tl.cdiv(K, BLOCK_K)
    # the scales of block kb + 1 load during block kb: plain loads, one iteration ahead
    a_s, b_s = _block_scales(as_row, bs_ptrs, 0, num_kb, row_ok, n_ok, stride_ask, stride_bsk,
                             BLOCK_N, BLOCK_K)
    for kb in range(0, num_kb):
        k = kb * BLOCK_K + kr
        k_ok = (k < K) | EVEN_K       # EVEN_K: a constant mask, fewer registers
        a_s_next, b_s_next = _block_scales(as_row, bs_ptrs, kb + 1, num_kb, row_ok, n_ok,
                                           stride_ask, stride_bsk, BLOCK_N, BLOCK_K)
        # both operand tiles as stored, K last: x (BLOCK_M, BLOCK_K), w (BLOCK_N, BLOCK_K)
        if TMA:
            x, w = _tma_tiles(a_ptr, b_ptr, row0, e, n0, kb * BLOCK_K, BLOCK_N, BLOCK_K,
                              SOFTWARE)
        else:
            x = _load_fp8(a_base[:, None] + k[None, :], row_ok[:, None] & k_ok[None, :],
                          SOFTWARE)
            w = _load_fp8(b_base[:, None] + k[None, :], n_ok[:, None] & k_ok[None, :],
                          SOFTWARE)
        if SWAP_AB:
            if BLOCK_K % BLOCK_N == 0:
                scale = a_s[None, :] * b_s
            else:
                scale = a_s[None, :] * b_s[:, None]
            acc += tl.dot(w, tl.trans(x)) * scale
        else:
            if BLOCK_K % BLOCK_N == 0:
                scale = a_s[:, None] * b_s
            else:
                scale = a_s[:, None] * b_s[None, :]
            acc += tl.dot(x, tl.trans(w)) * scale
        a_s = a_s_next
        b_s = b_s_next
    if SWAP_AB:
        acc = tl.trans(acc)
    return acc


@triton.jit
def _store_tile(out_ptr, acc, rows, row_ok, n, N, stride_om, SOFTWARE: tl.constexpr):
    dtype = out_ptr.dtype.element_ty
    acc = round_for_store(acc, dtype, SOFTWARE)
    tl.store(out_ptr + rows[:, None] * stride_om + n[None, :], acc.to(dtype),
             mask=row_ok[:, None] & (n < N)[None, :])


@cached_launch
@triton.jit
def _contiguous_kernel(a_ptr, as_ptr, b_ptr, bs_ptr, m_ptr, out_ptr, R, N, K, E,
                       stride_am, stride_asm, stride_ask, stride_be, stride_bn, stride_bse,
                       stride_bsn, stride_bsk, stride_om, BLOCK_M: tl.constexpr,
                       BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SWAP_AB: tl.constexpr,
                       EVEN_K: tl.constexpr, GROUP: tl.constexpr, TMA: tl.constexpr,
                       SOFTWARE: tl.constexpr):
    tile_m, tile_n = _grouped_order(tl.program_id(0), tl.cdiv(R, BLOCK_M), tl.cdiv(N, BLOCK_N),
                                    GROUP)
    rows = tile_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    n0 = tile_n.to(tl.int64) * BLOCK_N
    n = n0 + tl.arange(0, BLOCK_N)
    in_range = rows < R
    m = tl.load(m_ptr + rows, mask=in_range, other=-1)
    valid = in_range & (m >= 0) & (m < E)
    e_lo = tl.min(tl.where(valid, m, E), axis=0)
    e_hi = tl.max(tl.where(valid, m, -1), axis=0)
    if tl.max((in_range & ~valid).to(tl.int32), axis=0) > 0:     # rows without an expert
        _store_tile(out_ptr, tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32), rows,
                    in_range & ~valid, n, N, stride_om, SOFTWARE)
    for e in range(e_lo, e_hi + 1):
        sel = valid & (m == e)
        if tl.max(sel.to(tl.int32), axis=0) > 0:
            # every row of the tile is read (rows of other experts too: their results are
            # not stored), so only `sel` lives across the K loop: fewer registers
            part = _promoted_tile(a_ptr, as_ptr, b_ptr, bs_ptr, rows, in_range, tile_m * BLOCK_M,
                                  tl.cast(e, tl.int64), n0, N, K, stride_am, stride_asm,
                                  stride_ask, stride_be, stride_bn, stride_bse, stride_bsn,
                                  stride_bsk, BLOCK_M, BLOCK_N, BLOCK_K, SWAP_AB, EVEN_K, TMA,
                                  SOFTWARE)
            _store_tile(out_ptr, part, rows, sel, n, N, stride_om, SOFTWARE)


@cached_launch
@triton.jit
def _segments_kernel(a_ptr, as_ptr, b_ptr, bs_ptr, offsets_ptr, counts_ptr, out_ptr, R, N, K,
                     E, tiles_m, stride_am, stride_asm, stride_ask, stride_be, stride_bn,
                     stride_bse, stride_bsn, stride_bsk, stride_om, E_PAD: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                     SWAP_AB: tl.constexpr, EVEN_K: tl.constexpr, GROUP: tl.constexpr,
                     TMA: tl.constexpr, SOFTWARE: tl.constexpr):
    # tile i belongs to the expert e with ends[e-1] <= i < ends[e], ends = cumsum of
    # ceil(count / BLOCK_M): E_PAD counts per program, cheaper than another launch
    tile, tile_n = _grouped_order(tl.program_id(0), tiles_m, tl.cdiv(N, BLOCK_N), GROUP)
    er = tl.arange(0, E_PAD)
    counts = tl.load(counts_ptr + er, mask=er < E, other=0)
    tiles = (counts + BLOCK_M - 1) // BLOCK_M
    ends = tl.cumsum(tiles, axis=0)
    e = tl.sum((ends <= tile).to(tl.int32), axis=0)
    if e < E:
        first_tile = tl.sum(tl.where(er == e, ends - tiles, 0), axis=0)
        count = tl.sum(tl.where(er == e, counts, 0), axis=0)
        start = tl.load(offsets_ptr + e)
        row0 = start + (tile - first_tile).to(tl.int64) * BLOCK_M
        local = (tile - first_tile).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
        rows = start + local
        # rows outside a are no row: offsets and counts are values a direct call may get wrong
        row_ok = (local < count) & (rows >= 0) & (rows < R)
        n0 = tile_n.to(tl.int64) * BLOCK_N
        acc = _promoted_tile(a_ptr, as_ptr, b_ptr, bs_ptr, rows, row_ok, row0, e.to(tl.int64),
                             n0, N, K, stride_am, stride_asm, stride_ask, stride_be, stride_bn,
                             stride_bse, stride_bsn, stride_bsk, BLOCK_M, BLOCK_N, BLOCK_K,
                             SWAP_AB, EVEN_K, TMA, SOFTWARE)
        _store_tile(out_ptr, acc, rows, row_ok, n0 + tl.arange(0, BLOCK_N), N, stride_om,
                    SOFTWARE)


@cached_launch
@triton.jit
def _masked_kernel(a_ptr, as_ptr, b_ptr, bs_ptr, masked_ptr, out_ptr, M, N, K,
                   stride_am, stride_asm, stride_ask, stride_be, stride_bn, stride_bse,
                   stride_bsn, stride_bsk, stride_om, BLOCK_M: tl.constexpr,
                   BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SWAP_AB: tl.constexpr,
                   EVEN_K: tl.constexpr, TMA: tl.constexpr, SOFTWARE: tl.constexpr,
                   ZERO_FILL: tl.constexpr):
    tiles_m = tl.cdiv(M, BLOCK_M)
    e = (tl.program_id(0) // tiles_m).to(tl.int64)
    local = (tl.program_id(0) % tiles_m) * BLOCK_M + tl.arange(0, BLOCK_M)
    rows = e * M + local
    n0 = tl.program_id(1).to(tl.int64) * BLOCK_N
    count = tl.load(masked_ptr + e)
    in_group = local < M
    if (tl.program_id(0) % tiles_m) * BLOCK_M < count:
        valid = in_group & (local < count)
        acc = _promoted_tile(a_ptr, as_ptr, b_ptr, bs_ptr, rows, valid,
                             e * M + (tl.program_id(0) % tiles_m) * BLOCK_M, e, n0, N, K,
                             stride_am, stride_asm, stride_ask, stride_be, stride_bn,
                             stride_bse, stride_bsn, stride_bsk, BLOCK_M, BLOCK_N, BLOCK_K,
                             SWAP_AB, EVEN_K, TMA, SOFTWARE)
        if ZERO_FILL:
            # rows past masked_m are stored, as zeros: neither their masked loads (a NaN or
            # inf weight scale times their scale of 0 is NaN) nor a TMA tile (it holds those
            # rows' data, maybe NaN) makes their products 0
            acc = tl.where(valid[:, None], acc, 0.0)
    else:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    # one store site for both forms, so the zero-filling form compiles as it did without
    # the flag (triton 3.6: 64 / 139 / 244 registers for the 16 / 64 / 128-row tiles; a
    # store in each branch made them 72 / 142 / 230); without zero fill, a tile past
    # masked_m stores under an all-false mask (no memory traffic)
    row_ok = in_group
    if not ZERO_FILL:
        row_ok = in_group & (local < count)
    _store_tile(out_ptr, acc, rows, row_ok, n0 + tl.arange(0, BLOCK_N), N, stride_om, SOFTWARE)


# --- the warp-specialised kernels (Gluon, sm_90) -----------------------------------------
# Partitions: the default one is the first consumer warp group (rows 0-63 of the tile), a
# 4-warp worker the second (rows 64-127), a 1-warp worker the producer. They walk the same
# (expert, K block) sequence, so stage s = i % STAGES and its phase agree without
# messages: `ready[s]` completes when the producer's three TMA copies have landed,
# `empty[s]` when both consumers' wgmma reads of it are done (count 2). The arguments
# travel as tuples: `descs` (a, b), `bufs` (a's two halves, b, ready, empty), `tile`
# (row0, n0, e_lo, e_hi, num_kb, seg_start, seg_count), `ptrs` (a scales, b scales,
# m_indices, out), `sizes` (R, N, E), `strides` (a scales 2, b scales 3, out rows).
# SEGMENTS: the tile's rows are those of [seg_start, seg_start + seg_count) (one expert,
# e_lo == e_hi), not those whose m_indices names the pass's expert.

WS_M = gl.constexpr(64)             # rows of one consumer warp group (one wgmma M side)
WS_BLOCK_N = 128                    # columns of a tile: one weight scale per K block
WS_STAGES = {2: 6, 4: 5}            # per output element size (bytes): stages of 32 KB beside
#                                     the epilogue's layout conversion, within 227 KB
WS_CONSUMER_REGS = 232              # the second consumer's registers (setmaxnreg); the
#                                     producer takes 24 and the default partition the rest
#                                     of 168 x 12 warps: 248 (compiled, triton 3.6 and 3.9)
# triton 3.9 renamed TMA's global -> shared copy
_tma_load = getattr(tma, "async_load", None) or tma.async_copy_global_to_shared


@gluon.jit
def _ws_producer(descs, bufs, tile, ptrs, sizes, strides, BLOCK_N: gl.constexpr,
                 STAGES: gl.constexpr, OUT_VEC: gl.constexpr, SEGMENTS: gl.constexpr):
    """Copies, for each expert of the tile and K block, a's two 64-row halves and b's
    BLOCK_N rows (of b viewed as (E * N, K)) into the next free stage. Out-of-bounds rows
    and columns land as zeros and count toward the stage's bytes."""
    a_desc, b_desc = descs
    a0_bufs, a1_bufs, b_bufs, ready, empty = bufs
    row0, n0, e_lo, e_hi, num_kb, seg_start, seg_count = tile
    N = sizes[1]
    i = 0
    for e in range(e_lo, e_hi + 1):
        for kb in range(num_kb):
            s = i % STAGES
            mbarrier.wait(empty.index(s), ((i // STAGES) & 1) ^ 1)   # a fresh barrier: free
            bar = ready.index(s)
            mbarrier.expect(bar, 2 * a_desc.block_type.nbytes + b_desc.block_type.nbytes)
            k0 = kb * 128
            _tma_load(a_desc, [row0, k0], bar, a0_bufs.index(s))
            _tma_load(a_desc, [row0 + WS_M, k0], bar, a1_bufs.index(s))
            _tma_load(b_desc, [e * N + n0, k0], bar, b_bufs.index(s))
            i += 1


@gluon.jit
def _ws_store(result, row0, tile, ptrs, sizes, strides, expert, OUT_VEC: gl.constexpr,
              ZEROS: gl.constexpr, SEGMENTS: gl.constexpr):
    """Stores result (64, BLOCK_N) float32 to the rows row0 + [0, 64) that are the
    expert's (ZEROS: to the rows without an expert), in OUT_VEC-element (16-byte) stores:
    the wgmma layout holds 2 adjacent elements a thread, so the result goes through a
    layout conversion first."""
    BLOCK_N: gl.constexpr = result.shape[1]
    layout: gl.constexpr = gl.BlockedLayout([1, OUT_VEC], [32 * OUT_VEC // BLOCK_N,
                                                           BLOCK_N // OUT_VEC], [4, 1], [1, 0])
    _, n0, _, _, _, seg_start, seg_count = tile
    _, _, m_ptr, out_ptr = ptrs
    R, N, E = sizes
    rows = (row0 + gl.arange(0, WS_M, layout=gl.SliceLayout(1, layout))).to(gl.int64)
    n = n0 + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, layout))
    in_range = rows < R
    if SEGMENTS:
        keep = in_range & (rows >= seg_start) & (rows < seg_start + seg_count)
    else:
        m = gl.load(m_ptr + rows, mask=in_range, other=-1)
        if ZEROS:
            keep = in_range & ((m < 0) | (m >= E))
        else:
            keep = in_range & (m == expert)
    dtype: gl.constexpr = out_ptr.dtype.element_ty
    gl.store(out_ptr + rows[:, None] * strides[5] + n[None, :],
             gl.convert_layout(result.to(dtype), layout),
             mask=keep[:, None] & (n < N)[None, :])


@gluon.jit
def _ws_consumer(descs, bufs, tile, ptrs, sizes, strides, BLOCK_N: gl.constexpr,
                 STAGES: gl.constexpr, OUT_VEC: gl.constexpr, SEGMENTS: gl.constexpr,
                 HALF: gl.constexpr):
    """Rows row0 + HALF * 64 + [0, 64) of the tile: zeros for rows without an expert
    (not SEGMENTS), then for each expert e of the tile the promoted sum over K blocks of
    wgmma(a, b[e].T) * a_s[row, kb] * b_s[e, n0 // 128, kb], stored to its rows."""
    acc_layout: gl.constexpr = gl.NVMMADistributedLayout(
        version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, BLOCK_N, 32])
    a0_bufs, a1_bufs, b_bufs, ready, empty = bufs
    if HALF == 0:
        a_bufs = a0_bufs
    else:
        a_bufs = a1_bufs
    row0, n0, e_lo, e_hi, num_kb, _, _ = tile
    as_ptr, bs_ptr, _, _ = ptrs
    stride_asm, stride_ask, stride_bse, stride_bsn, stride_bsk, _ = strides
    row0 = row0 + HALF * WS_M
    rows = (row0 + gl.arange(0, WS_M, layout=gl.SliceLayout(1, acc_layout))).to(gl.int64)
    in_range = rows < sizes[0]
    zeros = gl.zeros((WS_M, BLOCK_N), gl.float32, acc_layout)
    if not SEGMENTS:
        _ws_store(zeros, row0, tile, ptrs, sizes, strides, 0, OUT_VEC, True, SEGMENTS)
    as_row = as_ptr + rows * stride_asm
    i = 0
    for e in range(e_lo, e_hi + 1):
        bs_e = bs_ptr + e * stride_bse + (n0 // 128) * stride_bsn
        acc = gl.zeros((WS_M, BLOCK_N), gl.float32, acc_layout)
        for kb in range(num_kb):
            s = i % STAGES
            # the scales load while the stage's copies are in flight
            a_s = gl.load(as_row + kb * stride_ask, mask=in_range, other=0.0)
            b_s = gl.load(bs_e + kb * stride_bsk)
            mbarrier.wait(ready.index(s), (i // STAGES) & 1)
            part = warpgroup_mma(a_bufs.index(s), b_bufs.index(s).permute((1, 0)), zeros,
                                 use_acc=False, is_async=True)
            part = warpgroup_mma_wait(num_outstanding=0, deps=(part,))
            mbarrier.arrive(empty.index(s), count=1)   # wgmma is done reading stage s
            acc += part * (a_s * b_s)[:, None]
            i += 1
        _ws_store(acc, row0, tile, ptrs, sizes, strides, e, OUT_VEC, False, SEGMENTS)


@gluon.jit
def _ws_second_consumer(descs, bufs, tile, ptrs, sizes, strides, BLOCK_N: gl.constexpr,
                        STAGES: gl.constexpr, OUT_VEC: gl.constexpr, SEGMENTS: gl.constexpr):
    """The worker partition of rows 64-127 (worker partitions share one signature)."""
    _ws_consumer(descs, bufs, tile, ptrs, sizes, strides, BLOCK_N, STAGES, OUT_VEC, SEGMENTS,
                 1)


@gluon.jit
def _ws_partitions(descs, tile, ptrs, sizes, strides, BLOCK_N: gl.constexpr,
                   STAGES: gl.constexpr, OUT_VEC: gl.constexpr, SEGMENTS: gl.constexpr,
                   CONSUMER_REGS: gl.constexpr):
    """The ring's buffers and barriers, then the three partitions over them."""
    a_desc, b_desc = descs
    a0_bufs = gl.allocate_shared_memory(a_desc.dtype, [STAGES] + a_desc.block_type.shape,
                                        a_desc.layout)
    a1_bufs = gl.allocate_shared_memory(a_desc.dtype, [STAGES] + a_desc.block_type.shape,
                                        a_desc.layout)
    b_bufs = gl.allocate_shared_memory(b_desc.dtype, [STAGES] + b_desc.block_type.shape,
                                       b_desc.layout)
    ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    for s in gl.static_range(STAGES):
        mbarrier.init(ready.index(s), count=1)
        mbarrier.init(empty.index(s), count=2)
    bufs = (a0_bufs, a1_bufs, b_bufs, ready, empty)
    # each tuple written out: one built by `+` loses its constexprs
    gl.warp_specialize([
        (_ws_consumer, (descs, bufs, tile, ptrs, sizes, strides, BLOCK_N, STAGES, OUT_VEC,
                        SEGMENTS, 0)),
        (_ws_producer, (descs, bufs, tile, ptrs, sizes, strides, BLOCK_N, STAGES, OUT_VEC,
                        SEGMENTS)),
        (_ws_second_consumer, (descs, bufs, tile, ptrs, sizes, strides, BLOCK_N, STAGES,
                               OUT_VEC, SEGMENTS)),
    ], [1, 4], [24, CONSUMER_REGS])


@cached_launch
@gluon.jit
def _ws_contiguous_kernel(a_desc, as_ptr, b_desc, bs_ptr, m_ptr, out_ptr, R, N, K, E,
                          stride_asm, stride_ask, stride_bse, stride_bsn, stride_bsk,
                          stride_om, BLOCK_N: gl.constexpr, STAGES: gl.constexpr,
                          OUT_VEC: gl.constexpr, GROUP: gl.constexpr,
                          CONSUMER_REGS: gl.constexpr):
    """The contiguous GEMM of one 128 x BLOCK_N output tile (module docstring): every
    expert between the smallest and the largest of the tile's rows gets a pass (one on an
    aligned layout; an expert with no row there costs a pass that stores nothing)."""
    tile_m, tile_n = _grouped_order(gl.program_id(0), gl.cdiv(R, 2 * WS_M),
                                    gl.cdiv(N, BLOCK_N), GROUP)
    row0 = tile_m * (2 * WS_M)
    n0 = tile_n * BLOCK_N
    rows = row0 + gl.arange(0, 2 * WS_M, layout=gl.BlockedLayout([1], [32], [4], [0]))
    in_range = rows < R
    m = gl.load(m_ptr + rows.to(gl.int64), mask=in_range, other=-1)
    valid = in_range & (m >= 0) & (m < E)
    e_lo = gl.min(gl.where(valid, m, E), axis=0)
    e_hi = gl.max(gl.where(valid, m, -1), axis=0)
    _ws_partitions((a_desc, b_desc), (row0, n0, e_lo, e_hi, gl.cdiv(K, 128), 0, 0),
                   (as_ptr, bs_ptr, m_ptr, out_ptr), (R, N, E),
                   (stride_asm, stride_ask, stride_bse, stride_bsn, stride_bsk, stride_om),
                   BLOCK_N, STAGES, OUT_VEC, False, CONSUMER_REGS)


@gluon.jit
def _ws_add(x, y):
    return x + y


@cached_launch
@gluon.jit
def _ws_segments_kernel(a_desc, as_ptr, b_desc, bs_ptr, offsets_ptr, counts_ptr, out_ptr, R,
                        N, K, E, tiles_m, stride_asm, stride_ask, stride_bse, stride_bsn,
                        stride_bsk, stride_om, E_PAD: gl.constexpr, BLOCK_N: gl.constexpr,
                        STAGES: gl.constexpr, OUT_VEC: gl.constexpr, GROUP: gl.constexpr,
                        CONSUMER_REGS: gl.constexpr):
    """The segments GEMM (`_segments_kernel`'s layout and tile search) of one 128 x BLOCK_N
    output tile: the rows of one expert's segment; a tile past the last expert's does
    nothing."""
    tile, tile_n = _grouped_order(gl.program_id(0), tiles_m, gl.cdiv(N, BLOCK_N), GROUP)
    n0 = tile_n * BLOCK_N
    er = gl.arange(0, E_PAD, layout=gl.BlockedLayout([1], [32], [4], [0]))
    counts = gl.load(counts_ptr + er, mask=er < E, other=0)
    tiles = (counts + 2 * WS_M - 1) // (2 * WS_M)
    ends = gl.associative_scan(tiles, 0, _ws_add)      # gl.cumsum: triton >= 3.9 only
    e = gl.sum((ends <= tile).to(gl.int32), axis=0)
    first_tile = gl.sum(gl.where(er == e, ends - tiles, 0), axis=0)
    count = gl.sum(gl.where(er == e, counts, 0), axis=0)
    start = gl.load(offsets_ptr + e, mask=e < E, other=0).to(gl.int32)
    row0 = start + (tile - first_tile) * (2 * WS_M)
    # rows of the segment inside a: offsets and counts are values a direct call may get wrong
    seg_start = gl.maximum(row0, 0)
    seg_count = gl.minimum(start + count, R) - seg_start
    e_hi = e - (e >= E).to(gl.int32)      # past the last expert: no pass
    _ws_partitions((a_desc, b_desc), (row0, n0, e, e_hi, gl.cdiv(K, 128), seg_start,
                                      seg_count),
                   (as_ptr, bs_ptr, counts_ptr, out_ptr), (R, N, E),
                   (stride_asm, stride_ask, stride_bse, stride_bsn, stride_bsk, stride_om),
                   BLOCK_N, STAGES, OUT_VEC, True, CONSUMER_REGS)


@functools.lru_cache(maxsize=None)
def _ws_layout(rows: int):
    return gl.NVMMASharedLayout.get_default_for([rows, SCALE_BLOCK], gl.float8e4nv)


@functools.lru_cache(maxsize=None)
def _runs_wgmma(device: torch.device) -> bool:
    """sm_90 (wgmma exists on Hopper only); meta tensors: the sm_90a compile gate."""
    return device.type == "meta" or (device.type == "cuda"
                                     and torch.cuda.get_device_capability(device)[0] == 9)


def _ws_operands(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether TMA descriptors can describe a (R, K) and b (E, N, K) as the ws kernel
    reads them: both TMA-readable, b's rows one (E * N, K) matrix."""
    return _tma_ready(a) and _tma_ready(b) and b.stride(0) == b.shape[1] * b.stride(1)


def _ws_ready(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether the ws kernel runs: not under the interpreter (Gluon has none), on an
    sm_90 device, with operands it can read."""
    return not SOFTWARE_ROUNDING and _runs_wgmma(a.device) and _ws_operands(a, b)


def _ws_descriptors(a, b):
    """Gluon TMA descriptors of a (R, K) in 64-row halves of a tile and of b (E, N, K) as
    one (E * N, K) matrix, tiles of 128 columns of K."""
    (R, K), (E, N) = a.shape, b.shape[:2]
    b2 = b.view(E * N, K)
    half = WS_M.value
    return (GluonDescriptor(a, [R, K], [a.stride(0), 1], [half, SCALE_BLOCK], _ws_layout(half)),
            GluonDescriptor(b2, [E * N, K], [b2.stride(0), 1], [WS_BLOCK_N, SCALE_BLOCK],
                            _ws_layout(WS_BLOCK_N)))


def _ws_options(out: torch.Tensor) -> dict:
    return dict(BLOCK_N=WS_BLOCK_N, STAGES=WS_STAGES[out.element_size()],
                OUT_VEC=16 // out.element_size(), GROUP=GROUP_M,
                CONSUMER_REGS=WS_CONSUMER_REGS, num_warps=4)


def _ws_strides(a_scales, b_scales, out) -> tuple:
    return (a_scales.stride(0), a_scales.stride(1), b_scales.stride(0), b_scales.stride(1),
            b_scales.stride(2), out.stride(0))


def _ws_contiguous(a, a_scales, b, b_scales, m_indices, out):
    """grouped_gemm_fp8_out's arguments, on the ws kernel (`_ws_ready` holds)."""
    R, K = a.shape
    E, N = b.shape[0], b.shape[1]
    a_desc, b_desc = _ws_descriptors(a, b)
    grid = (cdiv(R, 2 * WS_M.value) * cdiv(N, WS_BLOCK_N),)
    _ws_contiguous_kernel[grid](
        a_desc, a_scales, b_desc, b_scales, m_indices.contiguous(), out, R, N, K, E,
        *_ws_strides(a_scales, b_scales, out), **_ws_options(out))


def _ws_segments(a, a_scales, b, b_scales, expert_offsets, tokens_per_expert, out):
    """grouped_gemm_fp8_segments' arguments, on the ws kernel (`_ws_ready` holds)."""
    R, K = a.shape
    E, N = b.shape[0], b.shape[1]
    a_desc, b_desc = _ws_descriptors(a, b)
    tiles_m = R // (2 * WS_M.value) + min(R, E)     # as grouped_gemm_fp8_segments' bound
    grid = (tiles_m * cdiv(N, WS_BLOCK_N),)
    _ws_segments_kernel[grid](
        a_desc, a_scales, b_desc, b_scales, expert_offsets.contiguous(),
        tokens_per_expert.contiguous(), out, R, N, K, E, tiles_m,
        *_ws_strides(a_scales, b_scales, out), E_PAD=next_power_of_2(E), **_ws_options(out))


def _fp8_operand(x: torch.Tensor) -> torch.Tensor:
    """fp8 tensors go in as they are on the GPU, as uint8 bits under the interpreter."""
    return x.view(_U8) if SOFTWARE_ROUNDING else x


def _tma_ready(t: torch.Tensor) -> bool:
    """Whether TMA can read t: 16-byte aligned base and strides, contiguous last dim, no
    empty dim (a descriptor's requirements)."""
    *outer, last = t.stride()
    size = t.element_size()
    return (last == 1 and not t.data_ptr() & 15 and t.numel() > 0
            and not any([s * size & 15 for s in outer]))


_DESCRIPTOR_DEFAULTS = {f.name: f.default for f in dataclasses.fields(TensorDescriptor)
                        if f.default is not dataclasses.MISSING}


def _descriptor(t: torch.Tensor, block: list[int]) -> TensorDescriptor:
    """TensorDescriptor(t, t.shape, t.stride(), block) without its constructor's checks,
    which `_tma_ready` made and the power-of-two tile sizes meet: 1.3 us a descriptor
    instead of 2.9 (2-core Sapphire Rapids), on every eager call."""
    d = object.__new__(TensorDescriptor)
    d.__dict__.update(_DESCRIPTOR_DEFAULTS, base=t, shape=list(t.shape),
                      strides=list(t.stride()), block_shape=block)
    return d


def _operands(cfg: dict, a: torch.Tensor, b: torch.Tensor):
    """(a, b, tma): the fp8 operands a (R, K) and b (E, N, K) as the kernel takes them.
    TMA descriptors (tiles BLOCK_M x 128 and 1 x BLOCK_N x 128) where the config asks for
    them and both tensors allow it, else the tensors (uint8 bits under the interpreter)."""
    a, b = _fp8_operand(a), _fp8_operand(b)
    if not (cfg.get("tma") and _tma_ready(a) and _tma_ready(b)):
        return a, b, False
    return (_descriptor(a, [cfg["BLOCK_M"], SCALE_BLOCK]),
            _descriptor(b, [1, cfg["BLOCK_N"], SCALE_BLOCK]), True)


def _b_strides(b, b_scales):
    return (b.stride(0), b.stride(1), b_scales.stride(0), b_scales.stride(1),
            b_scales.stride(2))


def _launcher(kernel, cfg, K, tma, **constexprs):
    """kernel with the tile config `cfg` (configs/grouped_gemm.py) and `constexprs` bound;
    tma: its operands are TMA descriptors (`_operands`)."""
    return _configured(kernel, cfg["BLOCK_M"], cfg["BLOCK_N"], cfg["num_warps"],
                       cfg["num_stages"], cfg.get("maxnreg"), K % SCALE_BLOCK == 0, TMA=tma,
                       **constexprs)


@functools.lru_cache(maxsize=None)
def _configured(kernel, block_m, block_n, num_warps, num_stages, maxnreg, even_k, **constexprs):
    """launch.configure, once per configuration (maxnreg: ptxas's register cap per
    thread, passed only where the config sets one)."""
    options = {"maxnreg": maxnreg} if maxnreg else {}
    return configure(kernel, **constexprs, BLOCK_M=block_m, BLOCK_N=block_n,
                     BLOCK_K=SCALE_BLOCK, SWAP_AB=block_m < WGMMA_M, EVEN_K=even_k,
                     SOFTWARE=SOFTWARE_ROUNDING, num_warps=num_warps, num_stages=num_stages,
                     **options)


def _zero_when_k_is_0(out: torch.Tensor, K: int) -> bool:
    """K = 0: every output element is an empty sum, 0, written without a launch (the
    kernels read a first K block's scales ahead of the loop, which K = 0 does not have:
    an out-of-bounds read). Returns whether K is 0."""
    if K == 0:
        out.zero_()
    return K == 0


def grouped_gemm_fp8_out(a, a_scales, b, b_scales, m_indices, out):
    """a (R, K) fp8 (last dim contiguous), a_scales (R, KB) float32, b (E, N, K) fp8
    (last dim contiguous), b_scales (E, NB, KB) float32, m_indices (R,) int32 -> written
    into out (R, N), last dim contiguous (rows without an expert: zeros)."""
    R, K = a.shape
    E, N = b.shape[0], b.shape[1]
    if R == 0 or N == 0 or _zero_when_k_is_0(out, K):
        return
    cfg = gemm_config("contiguous", max(R // max(E, 1), 1), a.device)
    if cfg.get("ws") and _ws_ready(a, b):
        _ws_contiguous(a, a_scales, b, b_scales, m_indices, out)
        return
    grid = (cdiv(R, cfg["BLOCK_M"]) * cdiv(N, cfg["BLOCK_N"]),)
    a_op, b_op, tma = _operands(cfg, a, b)
    _launcher(_contiguous_kernel, cfg, K, tma, GROUP=GROUP_M)[grid](
        a_op, a_scales, b_op, b_scales, m_indices.contiguous(), out, R,
        N, K, E, a.stride(0), a_scales.stride(0), a_scales.stride(1), *_b_strides(b, b_scales),
        out.stride(0))


def grouped_gemm_fp8(a, a_scales, b, b_scales, m_indices, out_dtype):
    """grouped_gemm_fp8_out into a new (R, N) out_dtype tensor."""
    out = torch.empty((a.shape[0], b.shape[1]), dtype=out_dtype, device=a.device)
    grouped_gemm_fp8_out(a, a_scales, b, b_scales, m_indices, out)
    return out


def grouped_gemm_fp8_segments(a, a_scales, b, b_scales, expert_offsets, tokens_per_expert,
                              out_dtype):
    """a (R, K) fp8 in the align=1 layout of `permute` (expert e's rows start at
    expert_offsets[e], tokens_per_expert[e] of them) -> (R, N); rows past the last expert
    are left unwritten (they are no pair's row)."""
    R, K = a.shape
    E, N = b.shape[0], b.shape[1]
    out = torch.empty((R, N), dtype=out_dtype, device=a.device)
    if R == 0 or N == 0 or _zero_when_k_is_0(out, K):
        return out
    cfg = gemm_config("segments", max(R // max(E, 1), 1), a.device)
    if cfg.get("ws") and _ws_ready(a, b):
        _ws_segments(a, a_scales, b, b_scales, expert_offsets, tokens_per_expert, out)
        return out
    bm = cfg["BLOCK_M"]
    # sum_e ceil(c_e / BM) <= floor(R / BM) + (number of non-empty experts)
    tiles_m = R // bm + min(R, E)
    grid = (tiles_m * cdiv(N, cfg["BLOCK_N"]),)
    a_op, b_op, tma = _operands(cfg, a, b)
    _launcher(_segments_kernel, cfg, K, tma, E_PAD=next_power_of_2(E), GROUP=GROUP_M)[grid](
        a_op, a_scales, b_op, b_scales, expert_offsets.contiguous(),
        tokens_per_expert.contiguous(), out, R, N, K, E, tiles_m, a.stride(0),
        a_scales.stride(0), a_scales.stride(1), *_b_strides(b, b_scales), out.stride(0))
    return out


def grouped_gemm_fp8_masked_out(a, a_scales, b, b_scales, masked_m, zero_fill, out):
    """a (E, M, K) fp8, a_scales (E, M, KB), b (E, N, K) fp8, b_scales (E, NB, KB),
    masked_m (E,) int32 -> written into out (E, M, N) contiguous; rows >= masked_m[e] zero,
    or with zero_fill False not written."""
    E, M, K = a.shape
    N = b.shape[1]
    if E * M == 0 or N == 0:
        return
    if K == 0 and not zero_fill:   # the valid rows' empty sums, the others kept
        out.masked_fill_(valid_rows(masked_m, M)[..., None], 0)
        return
    if _zero_when_k_is_0(out, K):
        return
    a2 = a.reshape(E * M, K)
    s2 = a_scales.reshape(E * M, a_scales.shape[2])
    cfg = gemm_config("masked", M, a.device)
    grid = (E * cdiv(M, cfg["BLOCK_M"]), cdiv(N, cfg["BLOCK_N"]))
    a_op, b_op, tma = _operands(cfg, a2, b)
    _launcher(_masked_kernel, cfg, K, tma, ZERO_FILL=bool(zero_fill))[grid](
        a_op, s2, b_op, b_scales, masked_m.contiguous(), out, M, N, K,
        a2.stride(0), s2.stride(0), s2.stride(1), *_b_strides(b, b_scales), N)


def grouped_gemm_fp8_masked(a, a_scales, b, b_scales, masked_m, out_dtype):
    """grouped_gemm_fp8_masked_out into a new (E, M, N) out_dtype tensor (zero-filled)."""
    out = torch.empty((a.shape[0], a.shape[1], b.shape[1]), dtype=out_dtype, device=a.device)
    grouped_gemm_fp8_masked_out(a, a_scales, b, b_scales, masked_m, True, out)
    return out
