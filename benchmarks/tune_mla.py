"""Sweeps the Triton MLA decompression launch config (BLOCK_T, BLOCK_K, num_warps,
num_stages) on the GPU at the goal shape (T = 8192 tokens, 128 heads, R = 512, bf16 latent;
bf16 and FP8 weight) and prints each candidate's ns/token; the best goes into
moe_kernels/triton/mla.py::CONFIG (its sm_90a compile case then checks it for spills).
Usage: python3 benchmarks/tune_mla.py [--quick]   (about a minute of device time);
--precheck compiles the candidates for sm_90a without a GPU (run it under both tritons).
"""

from __future__ import annotations

import argparse
import itertools

import torch

import moe_kernels
from moe_kernels.bench.common import time_us
from moe_kernels.reference import fp8 as ref_fp8
from moe_kernels.triton import mla

T, H, R, ROPE = 8192, 128, 512, 64


def candidates(quick: bool):
    """Launch configs worth timing: those that pass the sm_90a compile gate under both
    tritons (`--precheck`). Measured out: 4 warps (the FP8-weight kernel spills 436-1048 B
    under 3.6 at every tile), BLOCK_T = 128 (spills 324-468 B under 3.9), BLOCK_K = 128
    beyond 2 stages (over 227 KB of shared memory)."""
    for bk, stages in itertools.product((64, 128) if quick else (32, 64, 128),
                                        (2, 3) if quick else (2, 3, 4)):
        if bk == 128 and stages > 2:
            continue
        yield {"BLOCK_T": 64, "BLOCK_K": bk, "num_warps": 8, "num_stages": stages}


def precheck(configs) -> None:
    """Compiles the goal-shape launches of each config for sm_90a on this machine (no GPU
    needed) and prints what the compile gate says: registers, shared memory, violations."""
    from moe_kernels.bench import sm90
    import triton
    saved = dict(mla.CONFIG)
    try:
        for cfg in configs:
            mla.CONFIG.clear()
            mla.CONFIG.update(cfg)
            rows = [sm90.analyse(launch) for launch in sm90.compile_all(
                select=f"mla_decompress_kv T={T} H={H} kv=torch.bfloat16")]
            bad = sorted({v for r in rows for v in sm90.violations(r)})
            print(f"triton {triton.__version__} {cfg}: registers "
                  f"{[r.get('registers') for r in rows]}, shared "
                  f"{[r.get('shared') for r in rows]}: {'; '.join(bad) or 'ok'}", flush=True)
    finally:
        mla.CONFIG.clear()
        mla.CONFIG.update(saved)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--quick", action="store_true")
    p.add_argument("--precheck", action="store_true",
                   help="no GPU: compile each candidate for sm_90a and print the gate's verdict")
    args = p.parse_args()
    if args.precheck:
        return precheck(candidates(args.quick))
    fused = torch.randn(T, R + ROPE, device="cuda").bfloat16()
    kv_c, k_pe = fused[:, :R], fused[:, R:]
    w32 = torch.randn(H * 256, R, device="cuda") / R ** 0.5
    wq, ws = ref_fp8.quantize_fp8_block(w32)
    weights = {"bf16 weight": (w32.bfloat16(), None), "fp8 weight": (wq, ws)}
    saved = dict(mla.CONFIG)
    try:
        for label, (w, s) in weights.items():
            rows = []
            for cfg in candidates(args.quick):
                mla.CONFIG.clear()
                mla.CONFIG.update(cfg)
                fn = lambda i, w=w, s=s: moe_kernels.mla_decompress_kv(
                    kv_c, k_pe, w, num_heads=H, kv_b_proj_scale=s, backend="triton")
                try:
                    t, _ = time_us(fn, "cuda", 1)
                except Exception as exc:  # out of shared memory, etc.
                    print(f"  skip {cfg}: {type(exc).__name__}", flush=True)
                    continue
                rows.append((t * 1e3 / T, cfg))
            rows.sort(key=lambda r: r[0])
            print(f"{label}: " + "; ".join(f"{ns:.1f} ns/token {cfg}" for ns, cfg in rows[:4])
                  + f" | worst {rows[-1][0]:.1f}" + f" | current {saved}", flush=True)
    finally:
        mla.CONFIG.clear()
        mla.CONFIG.update(saved)


if __name__ == "__main__":
    main()
