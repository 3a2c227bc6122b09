"""Triton MLA latent KV decompression (semantics: reference/mla.py), one pass.

A program owns BLOCK_T output tokens of one head. It finds each token's latent row (the
contiguous form: row t; the paged form: sequence and position from seq_lens, then the block
from block_table, all inside the kernel, so no slot tensor is built and nothing syncs), and
loops over the latent in BLOCK_K chunks: one tl.dot against W_UK_h and one against W_UV_h
per chunk, float32 accumulators. Then it writes K[:, h, :dn], copies k_pe into
K[:, h, dn:] and writes V[:, h, :]: no k_nope tensor, no concat.

FP8 operands load through fp8 pointers (under the interpreter, which cannot fill fp8
`other=`, as uint8 bits) and are converted exactly to the compute dtype (every e4m3 value
is a bf16 value). An FP8 weight's
128x128 block scale is constant over a BLOCK_K chunk (BLOCK_K divides 128), so it multiplies
the chunk's product per output column ("promotion per K block", as the FP8 GEMMs); an FP8
cache's per-tensor scale multiplies the accumulators once at the end. With both operands
FP8 the dot runs on FP8 tensor cores.

Tokens with no row (past sum(seq_lens), a block id outside [0, num_blocks), a position
beyond the block table) read nothing and get zeros: the kernel never reads out of bounds,
even with unchecked inputs on the CUDA-graph path.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from moe_kernels import _common
from moe_kernels._common import FP8, cdiv, next_power_of_2
from moe_kernels._library import triton_interpreting
from moe_kernels.triton.launch import cached_launch, configure
from moe_kernels.triton.numerics import SOFTWARE_ROUNDING, fp8_e4m3_value, round_for_store

SCALE_BLOCK = tl.constexpr(_common.SCALE_BLOCK)   # jit code reads only constexpr globals

# Chosen from the sm_90a compile report, untimed on a GPU (docs/mla.md lists the tuning owed):
# 64 tokens x (128 + 128) float32 accumulators are 64 registers per thread at 8 warps.
CONFIG = {"BLOCK_T": 64, "BLOCK_K": 64, "num_warps": 8, "num_stages": 3}
# Under the interpreter the tile sizes only change the run time: larger is fewer programs.
INTERPRETER_CONFIG = {"BLOCK_T": 64, "BLOCK_K": 128, "num_warps": 1, "num_stages": 1}
BLOCK_SEQS = 128   # sequences per step of the in-kernel prefix sum over seq_lens


@triton.jit
def _paged_rows(t, T, lens_ptr, bt_ptr, B, max_blocks, num_blocks, page, stride_bt,
                BLOCK_T: tl.constexpr, BLOCK_B: tl.constexpr):
    """(block, offset, valid) of output tokens t: sequence = number of sequences ending at
    or before t, position = t - that sequence's start."""
    seq = tl.zeros([BLOCK_T], dtype=tl.int64)
    start = tl.zeros([BLOCK_T], dtype=tl.int64)
    carry = tl.zeros([1], dtype=tl.int64)
    for j0 in range(0, B, BLOCK_B):
        j = j0 + tl.arange(0, BLOCK_B)
        j_ok = j < B
        lens = tl.load(lens_ptr + j, mask=j_ok, other=0).to(tl.int64)
        ends = carry + tl.cumsum(lens, axis=0)
        done = (ends[None, :] <= t[:, None]) & j_ok[None, :]
        seq += tl.sum(done.to(tl.int64), axis=1)
        start += tl.sum(tl.where(done, lens[None, :], 0), axis=1)
        carry += tl.sum(lens, axis=0)
    pos = t - start
    idx = pos // page
    valid = (t < T) & (seq < B) & (idx < max_blocks)
    block = tl.load(bt_ptr + seq * stride_bt + idx, mask=valid, other=0).to(tl.int64)
    valid = valid & (block >= 0) & (block < num_blocks)
    return block, pos % page, valid


@triton.jit
def _load_operand(ptr, mask, IS_FP8: tl.constexpr, COMPUTE: tl.constexpr,
                  SOFTWARE: tl.constexpr):
    if IS_FP8 and SOFTWARE:      # interpreter: uint8 bits (it cannot fill fp8 `other=`)
        bits = tl.load(ptr, mask=mask, other=0)
        if COMPUTE == tl.float8e4nv:
            x = bits.to(tl.float8e4nv, bitcast=True)
        else:
            x = fp8_e4m3_value(bits, SOFTWARE)
    else:
        # fp8-typed pointers on the GPU: an fp8 x fp8 dot takes its operands from shared
        # memory as loaded (cp.async), no register round trip
        x = tl.load(ptr, mask=mask, other=0.0)
    return x.to(COMPUTE)


@cached_launch
@triton.jit
def _decompress_kernel(
        row_ptr, pe_ptr, w_ptr, ws_ptr, kv_scale_ptr, bt_ptr, lens_ptr, k_ptr, v_ptr,
        T, R, B, max_blocks, num_blocks, page,
        stride_row_blk, stride_row_slot, stride_pe_blk, stride_pe_slot, stride_bt,
        stride_w, stride_ws, stride_kt, stride_kh, stride_vt, stride_vh,
        DN: tl.constexpr, DV: tl.constexpr, ROPE: tl.constexpr,
        BLOCK_DN: tl.constexpr, BLOCK_DV: tl.constexpr, BLOCK_ROPE: tl.constexpr,
        PAGED: tl.constexpr, KV_FP8: tl.constexpr, W_FP8: tl.constexpr,
        HAS_KV_SCALE: tl.constexpr, COMPUTE: tl.constexpr, PRECISION: tl.constexpr,
        BLOCK_T: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_B: tl.constexpr,
        SOFTWARE: tl.constexpr):
    t = tl.program_id(0).to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T)
    h = tl.program_id(1).to(tl.int64)
    if PAGED:
        block, slot, valid = _paged_rows(t, T, lens_ptr, bt_ptr, B, max_blocks, num_blocks,
                                         page, stride_bt, BLOCK_T, BLOCK_B)
    else:
        block, slot, valid = t, t * 0, t < T
    row = row_ptr + block * stride_row_blk + slot * stride_row_slot

    dn = tl.arange(0, BLOCK_DN)
    dv = tl.arange(0, BLOCK_DV)
    wk_rows = h * (DN + DV) + dn           # W_UK_h, then W_UV_h: the checkpoint's order
    wv_rows = h * (DN + DV) + DN + dv
    acc_k = tl.zeros((BLOCK_T, BLOCK_DN), dtype=tl.float32)
    acc_v = tl.zeros((BLOCK_T, BLOCK_DV), dtype=tl.float32)
    for k0 in range(0, R, BLOCK_K):
        kk = k0 + tl.arange(0, BLOCK_K)
        k_ok = kk < R
        x = _load_operand(row[:, None] + kk[None, :], valid[:, None] & k_ok[None, :], KV_FP8,
                          COMPUTE, SOFTWARE)
        wk = _load_operand(w_ptr + wk_rows[None, :] * stride_w + kk[:, None],
                           k_ok[:, None] & (dn < DN)[None, :], W_FP8, COMPUTE, SOFTWARE)
        wv = _load_operand(w_ptr + wv_rows[None, :] * stride_w + kk[:, None],
                           k_ok[:, None] & (dv < DV)[None, :], W_FP8, COMPUTE, SOFTWARE)
        part_k = tl.dot(x, wk, input_precision=PRECISION)
        part_v = tl.dot(x, wv, input_precision=PRECISION)
        if W_FP8:
            kb = k0 // SCALE_BLOCK
            sk = tl.load(ws_ptr + (wk_rows // SCALE_BLOCK) * stride_ws + kb, mask=dn < DN,
                         other=0.0)
            sv = tl.load(ws_ptr + (wv_rows // SCALE_BLOCK) * stride_ws + kb, mask=dv < DV,
                         other=0.0)
            part_k = part_k * sk[None, :]
            part_v = part_v * sv[None, :]
        acc_k += part_k
        acc_v += part_v

    r = tl.arange(0, BLOCK_ROPE)
    pe = _load_operand(pe_ptr + block[:, None] * stride_pe_blk + slot[:, None] * stride_pe_slot
                       + r[None, :], valid[:, None] & (r < ROPE)[None, :], KV_FP8, tl.float32,
                       SOFTWARE)
    if HAS_KV_SCALE:
        kv_scale = tl.load(kv_scale_ptr)
        acc_k = acc_k * kv_scale
        acc_v = acc_v * kv_scale
        pe = pe * kv_scale

    out_ok = t < T
    k_row = k_ptr + t[:, None] * stride_kt + h * stride_kh
    v_row = v_ptr + t[:, None] * stride_vt + h * stride_vh
    k_dtype = k_ptr.dtype.element_ty
    v_dtype = v_ptr.dtype.element_ty
    tl.store(k_row + dn[None, :], round_for_store(acc_k, k_dtype, SOFTWARE).to(k_dtype),
             mask=out_ok[:, None] & (dn < DN)[None, :])
    tl.store(k_row + DN + r[None, :], round_for_store(pe, k_dtype, SOFTWARE).to(k_dtype),
             mask=out_ok[:, None] & (r < ROPE)[None, :])
    tl.store(v_row + dv[None, :], round_for_store(acc_v, v_dtype, SOFTWARE).to(v_dtype),
             mask=out_ok[:, None] & (dv < DV)[None, :])


_TL = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}


def _compute_dtype(kv_dtype: torch.dtype, w_dtype: torch.dtype):
    """(dot operand dtype, input_precision or None for the default). Under the interpreter float32 (its bf16
    arithmetic is broken: triton/numerics.py); float32 anywhere -> IEEE float32 (no TF32);
    both FP8 -> FP8 tensor cores; else the 16-bit float among them (fp8 converts exactly)."""
    if triton_interpreting() or torch.float32 in (kv_dtype, w_dtype):
        return tl.float32, "ieee"
    if kv_dtype == w_dtype == FP8:
        return tl.float8e4nv, None
    return _TL[w_dtype if w_dtype != FP8 else kv_dtype], None


def _bytes(x: torch.Tensor) -> torch.Tensor:
    """fp8 tensors as uint8 bits under the interpreter, as they are on the GPU."""
    return x.view(torch.uint8) if x.dtype == FP8 and SOFTWARE_ROUNDING else x


def _next_pow2(n: int) -> int:
    return max(16, next_power_of_2(n))


def _launch(rows, row_strides, pe, pe_strides, kv_b_proj, kv_b_proj_scale, kv_cache_scale,
            block_table, seq_lens, num_blocks, page, out_k, out_v, paged):
    T, H, dk = out_k.shape
    dv = out_v.shape[2]
    R = kv_b_proj.shape[1]
    rope = pe.shape[-1]
    dn = dk - rope
    if T == 0:
        return
    cfg = INTERPRETER_CONFIG if triton_interpreting() else CONFIG
    w_fp8 = kv_b_proj.dtype == FP8
    # small tables are read at flat offsets (or with the row stride only): contiguous
    # first, a no-op when they already are
    ws = kv_b_proj_scale.contiguous() if w_fp8 else kv_b_proj      # any pointer when unused
    if paged:
        block_table, seq_lens = block_table.contiguous(), seq_lens.contiguous()
    scale = kv_cache_scale if kv_cache_scale is not None else out_k
    B, max_blocks = block_table.shape if paged else (0, 0)
    grid = (cdiv(T, cfg["BLOCK_T"]), H)
    kernel = _configured(dn, dv, rope, paged, rows.dtype, kv_b_proj.dtype,
                         kv_cache_scale is not None, cfg["BLOCK_T"], cfg["BLOCK_K"],
                         cfg["num_warps"], cfg["num_stages"])
    kernel[grid](
        _bytes(rows), _bytes(pe), _bytes(kv_b_proj), ws, scale, block_table, seq_lens,
        out_k, out_v, T, R, B, max_blocks, num_blocks, page,
        row_strides[0], row_strides[1], pe_strides[0], pe_strides[1],
        block_table.stride(0) if paged else 0, kv_b_proj.stride(0),
        ws.stride(0) if w_fp8 else 0, out_k.stride(0), out_k.stride(1), out_v.stride(0),
        out_v.stride(1))


@functools.lru_cache(maxsize=None)
def _configured(dn, dv, rope, paged, kv_dtype, w_dtype, has_kv_scale, block_t, block_k,
                num_warps, num_stages):
    """The kernel with one configuration's constexprs and options bound
    (launch.configure); the tile config is a key, as benchmarks/tune_mla.py edits CONFIG."""
    compute, precision = _compute_dtype(kv_dtype, w_dtype)
    return configure(
        _decompress_kernel, DN=dn, DV=dv, ROPE=rope, BLOCK_DN=_next_pow2(dn),
        BLOCK_DV=_next_pow2(dv), BLOCK_ROPE=_next_pow2(rope), PAGED=paged,
        KV_FP8=kv_dtype == FP8, W_FP8=w_dtype == FP8, HAS_KV_SCALE=has_kv_scale,
        COMPUTE=compute, PRECISION=precision, BLOCK_T=block_t, BLOCK_K=block_k,
        BLOCK_B=BLOCK_SEQS, SOFTWARE=SOFTWARE_ROUNDING, num_warps=num_warps,
        num_stages=num_stages)


def mla_decompress_kv(kv_c, k_pe, kv_b_proj, kv_b_proj_scale, out_k, out_v) -> None:
    """Writes out_k (T, H, dn + rope), out_v (T, H, dv) from kv_c (T, R), k_pe (T, rope)."""
    _launch(kv_c, (kv_c.stride(0), 0), k_pe, (k_pe.stride(0), 0), kv_b_proj, kv_b_proj_scale,
            None, kv_c, kv_c, 0, 1, out_k, out_v, paged=False)


def mla_decompress_kv_paged(kv_cache, block_table, seq_lens, kv_b_proj, kv_b_proj_scale,
                            kv_cache_scale, out_k, out_v) -> None:
    """Writes out_k, out_v from the paged cache (num_blocks, block_size, R + rope)."""
    R = kv_b_proj.shape[1]
    strides = (kv_cache.stride(0), kv_cache.stride(1))
    _launch(kv_cache, strides, kv_cache[..., R:], strides, kv_b_proj, kv_b_proj_scale,
            kv_cache_scale, block_table, seq_lens, kv_cache.shape[0], kv_cache.shape[1],
            out_k, out_v, paged=True)
