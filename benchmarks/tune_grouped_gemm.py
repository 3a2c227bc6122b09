"""Tile-config sweep of the FP8 grouped GEMMs on the GPU; writes
moe_kernels/configs/grouped_gemm/<device>.json (read by configs/grouped_gemm.py).

For each kind (contiguous, segments, masked) and rows-per-expert bucket it times every
candidate (CUDA graph over the call, median) on a DeepSeek-V3 shape of that bucket and
keeps the fastest. Graph timing leaves host time out: TMA tiles cost ~10 us more of it
per eager call than pointer tiles (docs/fp8.md), which a CUDA-graph decode never pays.
Usage on the GPU machine: python3 benchmarks/tune_grouped_gemm.py
[--quick] [--out PATH]. --quick: 8-12 configs per bucket, 29-32 per kind, each compiled
once and timed at both shapes: about 3 minutes, most of it compiling; the full sweep
(105-120 per bucket) wants a call of its own. The compiling is done first in
--compile-procs processes at once (default: half the cores, at most 8), each its share
of the candidates called once into Triton's cache on disk, from which the sweep then
loads them (moe-bench --warm does the same for the bench rows).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import subprocess
import sys

import torch
import triton

from moe_kernels.bench import ws_probe
from moe_kernels.configs import grouped_gemm as configs
from moe_kernels.reference import fp8 as ref_fp8
from moe_kernels.triton import grouped_gemm as kernels

BUCKETS = [16, 64, None]                 # rows per expert; None: no bound (prefill)
ROWS_OF_BUCKET = {16: 8, 64: 48, None: 1024}
SHAPES = [(4096, 7168), (7168, 2048)]    # (N, K): GEMM1, GEMM2
E = 8


def candidates(bucket, quick, kind="contiguous", ws=True):
    """Tile configs for a bucket; each with operands through pointers (cp.async) and
    through TMA descriptors, and the 8-warp TMA tiles of at most 64 x 128 also capped at
    128 registers (2 blocks per SM; they compile without spills, docs/fp8.md); for the
    contiguous and segments kinds also the warp-specialised kernel (`ws`: its own
    128 x 128 tile; the bucket's fields are the tile of operands it cannot read), where
    `ws` (the ws probe passed: a hang would end the sweep).
    --quick: 8 warps from 64 rows up (4 warps spill there), 4 stages."""
    if ws and kind in ("contiguous", "segments"):
        yield {"BLOCK_M": 128, "BLOCK_N": 64, "num_warps": 8, "num_stages": 4, "ws": True}
    bms = [16, 32] if bucket == 16 else [32, 64] if bucket == 64 else [64, 128]
    bns = [64, 128] if quick else [32, 64, 128, 256]
    stages = [4] if quick else [3, 4, 5]
    for bm, bn, s, tma in itertools.product(bms, bns, stages, (False, True)):
        for w in ([4] if bm < 64 else [8]) if quick else [4, 8]:
            if bm * bn >= 128 * 256 and w == 4:
                continue  # too many accumulator registers per thread
            cfg = {"BLOCK_M": bm, "BLOCK_N": bn, "num_warps": w, "num_stages": s, "tma": tma}
            yield cfg
            if tma and w == 8 and bm * bn <= 64 * 128:
                yield dict(cfg, maxnreg=128)


def operands(kind, rows, N, K):
    a, a_s = ref_fp8.quantize_fp8_per_token_group(torch.randn(E * rows, K, device="cuda"))
    b, b_s = ref_fp8.quantize_fp8_block(torch.randn(E, N, K, device="cuda") / K ** 0.5)
    counts = torch.full((E,), rows, dtype=torch.int32, device="cuda")
    if kind == "masked":
        return lambda: kernels.grouped_gemm_fp8_masked(
            a.view(E, rows, K), a_s.view(E, rows, -1), b, b_s, counts, torch.bfloat16)
    if kind == "segments":
        offsets = torch.arange(E + 1, device="cuda", dtype=torch.int64) * rows
        return lambda: kernels.grouped_gemm_fp8_segments(a, a_s, b, b_s, offsets, counts,
                                                         torch.bfloat16)
    m = torch.arange(E, device="cuda", dtype=torch.int32).repeat_interleave(rows)
    return lambda: kernels.grouped_gemm_fp8(a, a_s, b, b_s, m, torch.bfloat16)


def time_config(fn, cfg):
    bucket_table = {k: [dict(cfg, max_m=None)] for k in configs.KINDS}
    try:
        return configs.with_table(bucket_table, triton.testing.do_bench_cudagraph, fn, 50)
    except Exception as exc:  # out of shared memory, etc.
        print(f"  skip {cfg}: {type(exc).__name__}")
        return float("inf")


def sweep(quick: bool, ws: bool):
    """(kind, bucket, cfg) of every candidate, in the sweep's order."""
    return [(kind, bucket, cfg) for kind in configs.KINDS for bucket in BUCKETS
            for cfg in candidates(bucket, quick, kind, ws=ws)]


def shard(items: list, index: int, count: int) -> list:
    """The items of process `index` of `count`: every count-th, so that each process gets
    candidates of every kind and size."""
    return items[index::count]


def compile_share(quick: bool, ws: bool, index: int, count: int) -> None:
    """One call of each candidate of this process's share at both shapes, untimed: it
    compiles the candidate into Triton's cache (a candidate that fails to compile is the
    sweep's to report)."""
    for kind, bucket, cfg in shard(sweep(quick, ws), index, count):
        table = {k: [dict(cfg, max_m=None)] for k in configs.KINDS}
        for N, K in SHAPES:
            try:
                configs.with_table(table, operands(kind, ROWS_OF_BUCKET[bucket], N, K))
                torch.cuda.synchronize()
            except Exception:
                pass


def compile_in_processes(quick: bool, ws: bool, procs: int) -> None:
    """compile_share in `procs` processes at once."""
    command = [sys.executable, os.path.abspath(__file__), *(["--quick"] if quick else []),
               *([] if ws else ["--no-ws"])]
    children = [subprocess.Popen([*command, "--compile-share", f"{i}/{procs}"])
                for i in range(procs)]
    for child in children:
        child.wait()


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--quick", action="store_true")
    p.add_argument("--out", default=None)
    p.add_argument("--compile-procs", type=int, default=min(8, (os.cpu_count() or 2) // 2))
    p.add_argument("--compile-share", help=argparse.SUPPRESS)
    p.add_argument("--no-ws", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.compile_share:
        index, count = map(int, args.compile_share.split("/"))
        compile_share(args.quick, not args.no_ws, index, count)
        return
    name = torch.cuda.get_device_name(0)
    ws_failure = ws_probe.failure()
    if ws_failure:
        print(f"ws candidates left out: {ws_failure}", flush=True)
    if args.compile_procs > 1:
        compile_in_processes(args.quick, ws_failure is None, args.compile_procs)
    table = {}
    for kind in configs.KINDS:
        table[kind] = []
        for bucket in BUCKETS:
            rows = ROWS_OF_BUCKET[bucket]
            best = None
            for cfg in candidates(bucket, args.quick, kind, ws=ws_failure is None):
                total = 0.0
                for N, K in SHAPES:
                    total += time_config(operands(kind, rows, N, K), cfg)
                flops = sum(2 * E * rows * N * K for N, K in SHAPES)
                print(f"{kind:10s} m<={bucket} {cfg}: {total * 1e3:.1f} us "
                      f"({flops / total / 1e9:.0f} TFLOPS)", flush=True)
                if best is None or total < best[0]:
                    best = (total, cfg)
            table[kind].append(dict(best[1], max_m=bucket))
            print(f"best {kind} m<={bucket}: {best[1]} {best[0] * 1e3:.1f} us")
    out = args.out or configs.device_file(name)
    with open(out, "w") as f:
        json.dump({"device": name, "torch": torch.__version__, "triton": triton.__version__,
                   "configs": table}, f, indent=1)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
