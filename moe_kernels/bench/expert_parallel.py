"""moe-bench cases for expert parallelism: ep_dispatch and ep_combine in a real process
group, timed on rank 0 (each call between barriers, so that a row is the time of the
exchange, not of a rank waiting for a late peer).

CPU: 2 ranks over gloo on loopback. GPU: 1 rank over NCCL, a smoke run of the code path
(a one-rank all-to-all is a local copy). Bytes: the payload rank 0 sends plus what it
receives (bf16 rows, or FP8 rows with their float32 1x128 scales); the floor is the
transport's, which this table does not know, so no roofline is given.

Shapes: H = 7168 (DeepSeek-V3), top-8 of 32 experts; normal mode with 256 tokens per
rank, low-latency mode with 32 tokens per rank and buffers of M = 32 rows.
"""

from __future__ import annotations

import statistics
import time

import torch
import torch.distributed as dist

from moe_kernels.bench.common import Result, _summary, is_selected
from moe_kernels.bench.ranks import run_ranks
from moe_kernels.ops import expert_parallel as ep
from moe_kernels.reference.fp8 import dequantize_per_token_group

MEASURES = ("ep_dispatch", "ep_combine")
H, E, TOPK = 7168, 32, 8
CASES = [  # (mode, tokens per rank, M, use_fp8)
    ("normal", 256, None, False),
    ("normal", 256, None, True),
    ("low_latency", 32, 32, False),
    ("low_latency", 32, 32, True),
]
REPS = 10


def _inputs(rank, T, device):
    g = torch.Generator().manual_seed(rank)
    ids = torch.stack([torch.randperm(E, generator=g)[:TOPK] for _ in range(T)]).int()
    return (torch.randn(T, H, generator=g).bfloat16().to(device), ids.to(device),
            torch.rand(T, TOPK, generator=g).to(device))


def _expert_rows(recv):
    """The received rows as bf16 expert outputs (identity experts; FP8 rows dequantized)."""
    if not isinstance(recv, tuple):
        return recv
    q, s = recv
    flat = dequantize_per_token_group(q.reshape(-1, H), s.reshape(-1, s.shape[-1]))
    return flat.view(q.shape).to(torch.bfloat16)


def _bytes(handle, mode, row_bytes):
    if mode == "normal":
        n = sum(handle.send_counts) + sum(handle.recv_counts)
        return n * row_bytes, n * H * 2
    rows = 2 * handle.unpack_index.numel()     # fixed buffers, sent and received
    return rows * row_bytes, rows * H * 2


def _rank_bench(rank, world, device, backend):
    # one thread per rank: the ranks share this machine's cores, and OpenMP threads that
    # spin-wait would compete with the other rank (docs/benchmarks.md)
    torch.set_num_threads(1)
    placement = ep.ExpertPlacement.uniform(E, world, device=device)
    out = []
    for mode, T, M, use_fp8 in CASES:
        hidden, ids, w = _inputs(rank, T, device)
        row_bytes = H + 4 * (H // 128) if use_fp8 else 2 * H
        times = {"ep_dispatch": [], "ep_combine": []}
        correct = True
        for i in range(REPS + 1):
            dist.barrier()
            t0 = time.perf_counter()
            recv, handle = ep.ep_dispatch(hidden, ids, w, placement, mode=mode,
                                          max_tokens_per_rank=M, use_fp8=use_fp8,
                                          backend=backend)
            _sync(device)
            t1 = time.perf_counter()
            rows = _expert_rows(recv)
            dist.barrier()
            t2 = time.perf_counter()
            y = ep.ep_combine(rows, handle)
            _sync(device)
            t3 = time.perf_counter()
            if i == 0:       # warm-up call: checked, not timed
                correct = _check(y, hidden, ids, w, use_fp8, handle, mode)
                continue
            times["ep_dispatch"].append(t1 - t0)
            times["ep_combine"].append(t3 - t2)
        sent = _bytes(handle, mode, row_bytes)
        case = (f"{mode} T={T}/rank{f' M={M}' if M else ''} H={H} top{TOPK}/{E} "
                f"{'fp8' if use_fp8 else 'bf16'} rows, {world} rank(s)")
        out.append(dict(case=case, times=times, bytes=sent, correct=correct))
    return out


def _sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def _check(y, hidden, ids, w, use_fp8, handle, mode):
    """Identity experts: y[t] = sum_k w[t, k] * row(t) over the pairs that travelled."""
    if use_fp8:      # rows travelled quantized: compare loosely
        want = (w * (ids >= 0)).sum(1, keepdim=True) * hidden.float()
        return bool(((y.float() - want).norm() / want.norm().clamp_min(1e-30)) < 5e-2)
    sent = (handle.row_of_pair >= 0).float()
    want = (w * sent).sum(1, keepdim=True) * hidden.float()
    return bool(torch.allclose(y.float(), want, rtol=2e-2, atol=1e-2))


# The ranks' bound. moe-bench --stall-timeout leaves this module to it: the ranks are
# processes of their own, which a watchdog ending moe-bench would leave on the device.
OWN_TIMEOUT_S = 300


def run(device: str, backends: list[str] | None, tokens: list[int] | None,
        compile_reference: bool = True) -> list[Result]:
    if not any(is_selected(op) for op in MEASURES):
        return []
    world, transport = (1, "nccl") if device == "cuda" else (2, "gloo")
    backend = (backends or [None])[0]
    per_rank = run_ranks(_rank_bench, world, (device, backend), backend=transport,
                         timeout_s=OWN_TIMEOUT_S)
    results = []
    for row in per_rank[0]:
        for op, nbytes in zip(MEASURES, row["bytes"]):
            if not is_selected(op):
                continue
            t, spread = _summary(row["times"][op], 1e6)
            results.append(Result(op, row["case"], backend or "default", device, t, nbytes,
                                  correct=row["correct"], note=f"{transport}, wall",
                                  spread=spread))
    return results


def sm90_cases():
    """(name, launch) pairs of the Triton slot map at DeepSeek-V3 shapes (meta tensors) for
    the sm_90a compile gate (moe_kernels/bench/sm90.py)."""
    from moe_kernels.bench.common import meta
    from moe_kernels.triton import expert_parallel
    for id_dtype in (torch.int32, torch.int64):
        yield (f"map_to_slots T=4096x8 E=256 R=4 {id_dtype}",
               lambda d=id_dtype: expert_parallel.map_to_slots(
                   meta(4096, 8, dtype=d), meta(256, 4, dtype=torch.int64),
                   meta(256, dtype=torch.int64), 3))
