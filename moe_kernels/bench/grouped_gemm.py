"""moe-bench cases for the FP8 grouped GEMMs, DeepSeek-V3 shapes (GPU) or scaled down (CPU).

GPU cases and floors (H100: FP8 dense 1979 TFLOPS, copy 3.0 TB/s):
- GEMM1 8 experts x 4096 rows, N=4096, K=7168 (contiguous, aligned): 962 GFLOP ->
  486 us at peak; 235 MB fp8 in + 235 MB weights + 268 MB bf16 out -> 246 us: compute bound.
- GEMM2 8 experts x 4096 rows, N=7168, K=2048: 481 GFLOP -> 243 us; 67 + 117 + 470 MB
  -> 218 us: compute bound (barely).
- masked decode, 32 experts, M=32 with 8-32 valid rows, N=4096, K=7168: weights 940 MB
  dominate -> ~313 us at 3.0 TB/s: memory bound, judged in GB/s (goal >= 2800).
The torch reference timed beside: dequantize the weights to bf16 and one bf16 matmul per
expert (segments known on the host), eager and compiled. On the GPU also the torch-native
peers: cuBLAS block-scaled `torch._scaled_mm` per expert and bf16 `torch._grouped_mm`
(operands dequantized beforehand); the masked case runs them on the valid rows, and our
kernels also into a buffer whose rows past masked_m they leave unwritten
(`<backend>-no-zero-fill`, zero_fill=False).
On the GPU the triton rows also come in the tile-load variants the tuner weighs
(`triton-tma`: the table in force with every tile through TMA descriptors;
`triton-tma-maxnreg128`: those of its 8-warp tiles of at most 64 x 128 also capped at
128 registers, 2 blocks per SM), so one run answers which load path the tiles want;
the contiguous cases (and fused_moe_fp8's, whose segments kernel has the same form) also
as `triton-ws`, every bucket on the warp-specialised Gluon kernel (one TMA producer warp,
two consumer warp groups: triton/grouped_gemm.py).
"""

from __future__ import annotations

import torch

from moe_kernels._common import FP8, SCALE_BLOCK, cdiv
from moe_kernels.bench import ws_probe
from moe_kernels.bench.common import (Result, device_generator, kernel_backends, measure, meta,
                                      random_fp8_weights, rotating_sets)
from moe_kernels.configs import grouped_gemm as configs
from moe_kernels.ops import grouped_gemm as ops
from moe_kernels.reference import fp8 as ref_fp8

GPU_SHAPES = [("GEMM1", 8, 4096, 4096, 7168), ("GEMM2", 8, 4096, 7168, 2048)]
CPU_SHAPES = [("GEMM1/14", 4, 128, 512, 1024), ("GEMM2/14", 4, 128, 1024, 256)]
MASKED_GPU = (32, 32, 4096, 7168)   # E, M, N, K
MASKED_CPU = (8, 16, 512, 1024)


def default_tokens(device: str) -> list[int]:
    return [0]  # shapes are fixed per device; --tokens is ignored here


def _operands(E, rows, N, K, device, gen):
    """Drawn and quantized on `device` (common.random_fp8_weights)."""
    a, a_s = ref_fp8.quantize_fp8_per_token_group(
        torch.randn((E * rows, K), generator=device_generator(gen, device), device=device))
    return (a, a_s, *random_fp8_weights((E, N, K), K ** -0.5, device, gen))


def torch_per_expert(a, a_s, b, b_s, bounds):
    """The baseline users write: dequantize, then a bf16 matmul per expert segment."""
    a16 = ref_fp8.dequantize_per_token_group(a, a_s).bfloat16()
    b16 = ref_fp8.dequantize_fp8_block(b, b_s, dtype=torch.bfloat16)
    return torch.cat([a16[lo:hi] @ b16[e].T for e, (lo, hi) in enumerate(bounds)])


def scaled_mm_per_expert(a, a_s_per_expert, b, b_s, bounds):
    """The cuBLAS peer: block-scaled FP8 `torch._scaled_mm` (1x128 activation scales,
    128x128 weight scales; CUDA >= 12.9 on sm_90), one call per expert segment. cuBLAS
    reads 1x128 scales M-major: `a_s_per_expert` holds each segment's scales so laid out,
    prepared outside the timed call (in the peer's favour). Returns the segments' outputs."""
    return [torch._scaled_mm(a[lo:hi], b[e].t(), a_s_per_expert[e], b_s[e].t(),
                             out_dtype=torch.bfloat16)
            for e, (lo, hi) in enumerate(bounds) if hi > lo]


def m_major_scales(a_s, bounds):
    """Each segment's (rows, K/128) activation scales with stride (1, rows)."""
    return [a_s[lo:hi].t().contiguous().t() for lo, hi in bounds]


def grouped_mm_bf16(a16, b16_kn, offs):
    """The peer of a user without FP8 kernels: `torch._grouped_mm` on bf16 activations and
    weights (dequantized once, outside the timed call), segment ends in `offs`."""
    return torch._grouped_mm(a16, b16_kn, offs=offs, out_dtype=torch.bfloat16)


def torch_peers(a, a_s, b, b_s, bounds, device):
    """(name, fn) of the torch-native GPU peers on these segments (rows [lo, hi) of a
    belong to expert e); none on the CPU, where torch has neither."""
    if device != "cuda":
        return []
    a_s_m = m_major_scales(a_s, bounds)
    rows = torch.cat([torch.arange(lo, hi) for lo, hi in bounds]).to(a.device)
    a16 = ref_fp8.dequantize_per_token_group(a, a_s).bfloat16()[rows]
    b16_kn = ref_fp8.dequantize_fp8_block(b, b_s, dtype=torch.bfloat16).transpose(-2, -1)
    offs = torch.tensor([hi - lo for lo, hi in bounds]).cumsum(0).int().to(a.device)
    return [("torch-scaled_mm", lambda: scaled_mm_per_expert(a, a_s_m, b, b_s, bounds)),
            ("torch-grouped_mm-bf16", lambda: grouped_mm_bf16(a16, b16_kn, offs))]


def tile_variants(device: str, backends: list[str], call, ws: bool = False):
    """(row name, fn(i)) of call(i) under each tile-load variant of the table in force
    (module docstring); ws: the call runs the contiguous or segments kernel, which also
    have the warp-specialised variant (`triton-ws`, sm_90; where the ws probe failed, a
    failed row saying why). GPU only, where triton is timed."""
    if device != "cuda" or "triton" not in backends:
        return []
    table = configs.table_in_force(torch.device(device))
    variants = [("triton-tma", configs.with_tma(table)),
                ("triton-tma-maxnreg128", configs.with_tma(table, maxnreg=128))]
    rows = [(name, lambda i, t=t: configs.with_table(t, call, i)) for name, t in variants]
    from moe_kernels.triton.grouped_gemm import _runs_wgmma
    if ws and _runs_wgmma(torch.device(device)):
        # probed apart first: a ws kernel that hangs would take this module's rows with it
        why = ws_probe.failure()
        ws_table = configs.with_ws(table)
        rows.append(("triton-ws", (lambda i: _not_run(why)) if why
                     else (lambda i: configs.with_table(ws_table, call, i))))
    return rows


def _not_run(why: str):
    raise RuntimeError(why)


def _close(out, want) -> bool:
    if isinstance(out, (list, tuple)):  # a peer's per-expert outputs
        out = torch.cat(list(out))
    out, want = out.float(), want.float()
    return bool(((out - want).norm() / want.norm().clamp_min(1e-30)) < 1e-2)


# The public names whose rows this module measures (moe-bench --op).
MEASURES = ("grouped_gemm_fp8", "grouped_gemm_fp8_masked")


def run(device: str, backends: list[str] | None, tokens: list[int] | None,
        compile_reference: bool = True) -> list[Result]:
    backends = kernel_backends(device, backends, ops.GROUPED_GEMM_FP8.backends)
    backends = [b for b in backends if b != "reference"]
    gen = torch.Generator().manual_seed(0)
    baseline_c = torch.compile(torch_per_expert, dynamic=False) if compile_reference else None
    results = []
    for name, E, rows, N, K in (GPU_SHAPES if device == "cuda" else CPU_SHAPES):
        R = E * rows
        # one set: the weights alone exceed the L2 several times over on the GPU
        a, a_s, b, b_s = _operands(E, rows, N, K, device, gen)
        m = torch.arange(E, device=device, dtype=torch.int32).repeat_interleave(rows)
        bounds = [(e * rows, (e + 1) * rows) for e in range(E)]
        want = torch_per_expert(a, a_s, b, b_s, bounds)
        case = f"{name} {E}x{rows} rows N={N} K={K}"
        timed = [(bk, lambda i, bk=bk: ops.grouped_gemm_fp8(a, a_s, b, b_s, m, backend=bk))
                 for bk in backends]
        timed += tile_variants(device, backends, lambda i: ops.grouped_gemm_fp8(
            a, a_s, b, b_s, m, backend="triton"), ws=True)
        timed += [("torch-eager", lambda i: torch_per_expert(a, a_s, b, b_s, bounds))]
        if baseline_c is not None:
            timed += [("torch-compile", lambda i: baseline_c(a, a_s, b, b_s, bounds))]
        timed += [(name, lambda i, fn=fn: fn())
                  for name, fn in torch_peers(a, a_s, b, b_s, bounds, device)]
        nbytes = R * K + R * (K // 128) * 4 + E * N * K + R * N * 2
        results += measure("grouped_gemm_fp8", case, device, timed, nbytes, 1,
                           lambda out: _close(out, want), flops=2 * R * N * K)
    results += _masked(device, backends, gen, baseline_c)
    return results


def _masked(device, backends, gen, baseline_c) -> list[Result]:
    E, M, N, K = MASKED_GPU if device == "cuda" else MASKED_CPU
    masked = torch.randint(M // 4, M + 1, (E,), generator=gen, dtype=torch.int32)
    valid = int(masked.sum())
    n_sets = rotating_sets(E * N * K, device)
    sets = [_operands(E, M, N, K, device, gen) for _ in range(n_sets)]
    masked = masked.to(device)
    bounds = [(e * M, e * M + int(c)) for e, c in enumerate(masked.tolist())]
    a3 = [(s[0].view(E, M, K), s[1].view(E, M, -1)) for s in sets]

    def baseline(fn, i):
        a, a_s, b, b_s = sets[i]
        return fn(a, a_s, b, b_s, bounds)

    want = baseline(torch_per_expert, 0)
    rows = torch.cat([torch.arange(lo, hi) for lo, hi in bounds]).to(device)
    case = f"masked E={E} M={M} ({valid} valid rows) N={N} K={K}"
    timed = [(bk, lambda i, bk=bk: ops.grouped_gemm_fp8_masked(
        a3[i][0], a3[i][1], sets[i][2], sets[i][3], masked, backend=bk)) for bk in backends]
    timed += tile_variants(device, backends, lambda i: ops.grouped_gemm_fp8_masked(
        a3[i][0], a3[i][1], sets[i][2], sets[i][3], masked, backend="triton"))
    # into a caller's buffer without zeroing the rows past masked_m (the layer's
    # expert-parallel decode path): the same valid rows, fewer bytes written
    buf = torch.empty((E, M, N), dtype=torch.bfloat16, device=device)
    timed += [(f"{bk}-no-zero-fill", lambda i, bk=bk: ops.grouped_gemm_fp8_masked(
        a3[i][0], a3[i][1], sets[i][2], sets[i][3], masked, out=buf, zero_fill=False,
        backend=bk)) for bk in backends]
    timed += [("torch-eager", lambda i: baseline(torch_per_expert, i))]
    if baseline_c is not None:
        timed += [("torch-compile", lambda i: baseline(baseline_c, i))]
    # the peers on the valid rows (segments known on the host), one input set: its
    # weights alone exceed the L2 many times over
    timed += [(name, lambda i, fn=fn: fn()) for name, fn in torch_peers(*sets[0], bounds, device)]
    nbytes = valid * K + valid * (K // 128) * 4 + E * N * K + valid * N * 2

    def check(out):
        if isinstance(out, (list, tuple)):  # torch-scaled_mm: per-expert valid rows
            return _close(out, want)
        got = out.reshape(E * M, N)[rows] if out.dim() == 3 else out
        return _close(got, want)

    return measure("grouped_gemm_fp8_masked", case, device, timed, nbytes, n_sets, check,
                   flops=2 * valid * N * K)


def _gemm_operands(rows_shape, E, N, K):
    a = meta(*rows_shape, K, dtype=FP8)
    s = meta(*rows_shape, cdiv(K, SCALE_BLOCK))
    return a, s, meta(E, N, K, dtype=FP8), meta(E, cdiv(N, SCALE_BLOCK), cdiv(K, SCALE_BLOCK))


def sm90_cases():
    """(name, launch) pairs of every Triton launch of this op at DeepSeek-V3 shapes, on
    meta tensors, for the sm_90a compile gate (moe_kernels/bench/sm90.py)."""
    from moe_kernels.configs import grouped_gemm as configs
    from moe_kernels.triton import grouped_gemm as gemm
    for table_name, table in configs.all_tables().items():
        # rows per expert hitting every bucket of the table (and one past the last bound)
        ms = sorted({b["max_m"] or 4096 for b in table["contiguous"] + table["segments"]
                     + table["masked"]} | {4096})
        for m in ms:
            E = 8
            for N, K, out in ((4096, 7168, torch.bfloat16), (7168, 2048, torch.bfloat16)):
                a, s, b, bs = _gemm_operands((E * m,), E, N, K)
                yield (f"[{table_name}] grouped_gemm_fp8 {E}x{m} rows N={N} K={K}",
                       lambda a=a, s=s, b=b, bs=bs, E=E, m=m, out=out, t=table: configs.with_table(
                           t, gemm.grouped_gemm_fp8, a, s, b, bs,
                           meta(E * m, dtype=torch.int32), out))
            E = 256
            for N, K, out in ((4096, 7168, torch.bfloat16), (7168, 2048, torch.bfloat16),
                              (7168, 2048, torch.float32)):
                a, s, b, bs = _gemm_operands((E * m,), E, N, K)
                yield (f"[{table_name}] segments (fused_moe) {E}x{m} rows N={N} K={K} -> {out}",
                       lambda a=a, s=s, b=b, bs=bs, E=E, out=out, t=table: configs.with_table(
                           t, gemm.grouped_gemm_fp8_segments, a, s, b, bs,
                           meta(E + 1, dtype=torch.int64), meta(E, dtype=torch.int32), out))
            E = 32
            a, s, b, bs = _gemm_operands((E, m), E, 4096, 7168)
            yield (f"[{table_name}] masked {E}x{m} rows N=4096 K=7168",
                   lambda a=a, s=s, b=b, bs=bs, E=E, t=table: configs.with_table(
                       t, gemm.grouped_gemm_fp8_masked, a, s, b, bs, meta(E, dtype=torch.int32),
                       torch.bfloat16))
    # the expert-parallel decode buffers (rows past masked_m not written): a small and a
    # large M, for the swapped and the plain tile
    for m in (16, 1024):
        a, s, b, bs = _gemm_operands((32, m), 32, 4096, 7168)
        yield (f"masked 32x{m} rows N=4096 K=7168 zero_fill=False",
               lambda a=a, s=s, b=b, bs=bs, m=m: gemm.grouped_gemm_fp8_masked_out(
                   a, s, b, bs, meta(32, dtype=torch.int32), False,
                   meta(32, m, 4096, dtype=torch.bfloat16)))
    a, s, b, bs = _gemm_operands((8 * 4096,), 8, 4096, 7168)
    for out in (torch.float16, torch.float32):
        yield (f"grouped_gemm_fp8 8x4096 rows -> {out}", lambda a=a, s=s, b=b, bs=bs, out=out:
               gemm.grouped_gemm_fp8(a, s, b, bs, meta(8 * 4096, dtype=torch.int32), out))
        # the ws kernel's stages depend on the output's element size
        yield (f"[defaults+ws] grouped_gemm_fp8 8x4096 rows -> {out}",
               lambda a=a, s=s, b=b, bs=bs, out=out: configs.with_table(
                   configs.with_ws(configs.DEFAULTS), gemm.grouped_gemm_fp8, a, s, b, bs,
                   meta(8 * 4096, dtype=torch.int32), out))
