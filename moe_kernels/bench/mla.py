"""moe-bench cases for MLA latent KV decompression: DeepSeek-V3 dims (R=512, rope 64,
dn=dv=128), 128 heads on the GPU, 16 on the CPU.

Floor on the H100, T=8192, bf16 (docs/mla.md): 2*T*R*H*(dn+dv) = 275 GFLOP -> 278 us at
the 989 TFLOPS bf16 peak; bytes 9.4 MB latent + 33.5 MB weight + 671 MB K/V out -> 238 us
at 3.0 TB/s. Compute bound: 34 ns/token floor, goal <= 50 ns/token.

The torch path timed beside is the unfused one of inference engines: one matmul by the
whole kv_b_proj (bf16, dequantized at load when the checkpoint is FP8), view, split, and a
concat with the broadcast k_pe; the paged form first gathers the rows with a slot index
computed on the host (and dequantizes an FP8 cache). Eager and compiled. The `cpu` backend
gets its weight prepared at load too (mla_pack_kv_b_proj: the tiles its kernel multiplies);
on the CPU a second case times both sides from the FP8 checkpoint weight as stored (torch
dequantizing it per call, the kernel packing it per call).

On the CPU every case also times the project's float32 reference (`reference/mla.py`:
dequantize, two float32 einsums, concat), eager and compiled: the bar of the CPU goal
("5x the pure-PyTorch reference"), which the unfused bf16 path, one oneDNN matmul on the
same tile unit as ours, is not. On the GPU it is not timed: there the unfused path is
the stronger peer and device time is short.
"""

from __future__ import annotations

import torch

from moe_kernels._common import FP8, cdiv
from moe_kernels.bench.common import Result, meta, kernel_backends, measure
from moe_kernels.ops import mla as ops
from moe_kernels.reference import fp8 as ref_fp8
from moe_kernels.reference import mla as reference

R, ROPE, DN, DV = 512, 64, 128, 128


def default_tokens(device: str) -> list[int]:
    # one size on the GPU: a CUDA graph of 16 timed calls holds 16 outputs (11 GB at 8192)
    return [8192] if device == "cuda" else [256]


def unfused(kv_c, k_pe, w16, H):
    """kv_b_proj as one bf16 matmul, then split and concat (vLLM's MLA prefill path)."""
    kv = (kv_c @ w16.T).view(-1, H, DN + DV)
    k_nope, v = kv.split([DN, DV], dim=-1)
    k = torch.cat([k_nope, k_pe[:, None, :].expand(-1, H, -1)], dim=-1)
    return k, v


def unfused_paged(cache, slots, scale, w16, H):
    rows = cache.view(-1, R + ROPE)[slots]
    rows = (rows.float() * scale).to(w16.dtype) if cache.dtype == FP8 else rows
    return unfused(rows[:, :R], rows[:, R:], w16, H)


def unfused_stored(kv_c, k_pe, wq, ws, H):
    """unfused from the FP8 checkpoint weight, dequantized in the call."""
    return unfused(kv_c, k_pe, ref_fp8.dequantize_fp8_block(wq, ws, dtype=torch.bfloat16), H)


def _weight_for(backend: str, wq, packed):
    """What each backend is given: the packed form for `cpu` (prepared at load, as torch's
    dequantized bf16 weight is), the FP8 checkpoint weight otherwise."""
    return packed if backend == "cpu" else wq


def _close(out, want) -> bool:
    (k, v), (wk, wv) = out, want
    err = max(float((k.float() - wk).norm() / wk.norm().clamp_min(1e-30)),
              float((v.float() - wv).norm() / wv.norm().clamp_min(1e-30)))
    return err < 1e-2


# The public names whose rows this module measures (moe-bench --op).
MEASURES = ("mla_decompress_kv", "mla_decompress_kv_paged")


def run(device: str, backends: list[str] | None, tokens: list[int] | None,
        compile_reference: bool = True) -> list[Result]:
    backends = [b for b in kernel_backends(device, backends, ops.MLA_DECOMPRESS_KV.backends)
                if b != "reference"]
    H = 128 if device == "cuda" else 16
    gen = torch.Generator().manual_seed(0)
    w32 = torch.randn(H * (DN + DV), R, generator=gen) / R ** 0.5
    wq, ws = (t.to(device) for t in ref_fp8.quantize_fp8_block(w32))
    w16 = ref_fp8.dequantize_fp8_block(wq, ws, dtype=torch.bfloat16)   # dequantized at load
    packed = ops.mla_pack_kv_b_proj(wq) if "cpu" in backends else None  # packed at load
    base_c = torch.compile(unfused, dynamic=False) if compile_reference else None
    base_pc = torch.compile(unfused_paged, dynamic=False) if compile_reference else None
    base_sc = (torch.compile(unfused_stored, dynamic=False)
               if compile_reference and "cpu" in backends else None)
    ref_rows = _reference_rows(device, compile_reference)
    results = []
    for T in tokens or default_tokens(device):
        fused = torch.randn(T, R + ROPE, generator=gen).bfloat16().to(device)
        kv_c, k_pe = fused[:, :R], fused[:, R:]   # row-strided slices of kv_a_proj's output
        want = reference.mla_decompress_kv(kv_c, k_pe, wq, ws, H, DN, DV, torch.float32)
        flops = 2 * T * R * H * (DN + DV)
        out_bytes = T * H * (DN + ROPE + DV) * 2
        nbytes = T * (R + ROPE) * 2 + wq.numel() + out_bytes
        case = f"contiguous T={T} H={H} bf16, fp8 kv_b_proj prepared at load"
        timed = [(b, lambda i, b=b: ops.mla_decompress_kv(
            kv_c, k_pe, _weight_for(b, wq, packed), num_heads=H, kv_b_proj_scale=ws,
            backend=b)) for b in backends]
        timed += [("torch-eager", lambda i: unfused(kv_c, k_pe, w16, H))]
        if base_c is not None:
            timed += [("torch-compile", lambda i: base_c(kv_c, k_pe, w16, H))]
        timed += ref_rows(reference.mla_decompress_kv, kv_c, k_pe, wq, ws, H, DN, DV,
                          torch.bfloat16)
        results += measure("mla_decompress_kv", case, device, timed, nbytes, 1,
                           lambda out: _close(out, want), flops=flops, math="bf16", tokens=T)
        if "cpu" in backends:
            case = f"contiguous T={T} H={H} bf16, fp8 kv_b_proj as stored"
            timed = [("cpu", lambda i: ops.mla_decompress_kv(
                kv_c, k_pe, wq, num_heads=H, kv_b_proj_scale=ws, backend="cpu"))]
            timed += [("torch-eager", lambda i: unfused_stored(kv_c, k_pe, wq, ws, H))]
            if base_sc is not None:
                timed += [("torch-compile", lambda i: base_sc(kv_c, k_pe, wq, ws, H))]
            timed += ref_rows(reference.mla_decompress_kv, kv_c, k_pe, wq, ws, H, DN, DV,
                              torch.bfloat16)
            results += measure("mla_decompress_kv", case, device, timed, nbytes, 1,
                               lambda out: _close(out, want), flops=flops, math="bf16",
                               tokens=T)
        results += _paged(device, backends, T, H, wq, ws, w16, packed, gen, base_pc, ref_rows)
    return results


def _reference_rows(device: str, compile_reference: bool):
    """rows(fn, *args) -> the (name, call) pairs timing the float32 reference `fn` on args,
    eager and (when compile_reference) compiled once per fn; none off the CPU."""
    compiled = {}

    def rows(fn, *args):
        if device != "cpu":
            return []
        out = [("torch-reference", lambda i: fn(*args))]
        if compile_reference:
            if fn not in compiled:
                compiled[fn] = torch.compile(fn, dynamic=False)
            out += [("torch-reference-compile", lambda i, fc=compiled[fn]: fc(*args))]
        return out
    return rows


def _paged(device, backends, T, H, wq, ws, w16, packed, gen, compiled, ref_rows) -> list[Result]:
    """An FP8 cache (block 64) of 8 sequences of T/8 tokens in shuffled blocks."""
    bs, B = 64, 8
    per_seq = cdiv(T, B)
    lens = torch.full((B,), per_seq, dtype=torch.int32)
    lens[-1] = T - per_seq * (B - 1)
    nblk = cdiv(per_seq, bs)
    table = torch.randperm(B * nblk, generator=gen).view(B, nblk).int()
    scale = 0.05
    cache = ref_fp8.to_fp8(torch.randn(B * nblk, bs, R + ROPE, generator=gen) / scale)
    slots = reference.paged_token_slots(table, lens, T, bs)
    cache, table, lens, slots = (t.to(device) for t in (cache, table, lens, slots))
    scale_t = torch.tensor(scale, device=device)
    want = reference.mla_decompress_kv_paged(cache, table, lens, wq, ws, scale_t, H, DN, DV, T,
                                             torch.float32)
    flops = 2 * T * R * H * (DN + DV)
    nbytes = T * (R + ROPE) + wq.numel() + T * H * (DN + ROPE + DV) * 2
    case = f"paged T={T} H={H} fp8 cache (block {bs}), fp8 kv_b_proj prepared at load"
    timed = [(b, lambda i, b=b: ops.mla_decompress_kv_paged(
        cache, table, lens, _weight_for(b, wq, packed), num_heads=H, kv_b_proj_scale=ws,
        kv_cache_scale=scale_t, num_tokens=T, backend=b)) for b in backends]
    timed += [("torch-eager", lambda i: unfused_paged(cache, slots, scale_t, w16, H))]
    if compiled is not None:
        timed += [("torch-compile", lambda i: compiled(cache, slots, scale_t, w16, H))]
    timed += ref_rows(reference.mla_decompress_kv_paged, cache, table, lens, wq, ws, scale_t,
                      H, DN, DV, T, torch.bfloat16)
    return measure("mla_decompress_kv_paged", case, device, timed, nbytes, 1,
                   lambda out: _close(out, want), flops=flops, math="bf16", tokens=T)


def sm90_cases():
    """(name, launch) pairs of every Triton launch of this op at DeepSeek-V3 shapes, on
    meta tensors, for the sm_90a compile gate (moe_kernels/bench/sm90.py)."""
    from moe_kernels.triton import mla
    H, R, rope, dn, dv, T = 128, 512, 64, 128, 128, 8192
    for kv, w in ((torch.bfloat16, torch.bfloat16), (torch.bfloat16, FP8),
                  (torch.float32, torch.float32), (torch.float16, FP8)):
        yield (f"mla_decompress_kv T={T} H={H} kv={kv} w={w}", lambda kv=kv, w=w:
               mla.mla_decompress_kv(meta(T, R, dtype=kv), meta(T, rope, dtype=kv),
                                     meta(H * (dn + dv), R, dtype=w),
                                     meta(H * (dn + dv) // 128, R // 128) if w == FP8 else None,
                                     meta(T, H, dn + rope, dtype=torch.bfloat16 if kv != torch.float32 else kv),
                                     meta(T, H, dv, dtype=torch.bfloat16 if kv != torch.float32 else kv)))
    for kv, w, kv_scale in ((torch.bfloat16, torch.bfloat16, False), (FP8, FP8, True),
                            (FP8, torch.bfloat16, True)):
        yield (f"mla_decompress_kv_paged T={T} H={H} cache={kv} w={w}",
               lambda kv=kv, w=w, sc=kv_scale: mla.mla_decompress_kv_paged(
                   meta(4096, 64, R + rope, dtype=kv), meta(16, 512, dtype=torch.int32),
                   meta(16, dtype=torch.int32), meta(H * (dn + dv), R, dtype=w),
                   meta(H * (dn + dv) // 128, R // 128) if w == FP8 else None,
                   meta() if sc else None, meta(T, H, dn + rope, dtype=torch.bfloat16),
                   meta(T, H, dv, dtype=torch.bfloat16)))
