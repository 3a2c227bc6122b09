"""moe-bench cases for FP8 quantization, DeepSeek-V3 shapes: activations (T, 7168) bf16
in 1x128 groups, and SiLU-and-mul-quant of the expert intermediate (T, 2 x 2048) bf16
(GPU: 4096 and 32768 rows; CPU: 512 rows, widths as on the GPU).

Floors (bytes / copy bandwidth; every input read once, every output written once):
quantize 32768 x 7168: 469.8 MB read + 234.9 MB fp8 + 7.3 MB scales = 712 MB -> 237 us
at 3.0 TB/s; silu_and_mul_quant 32768 x 4096 -> 2048: 268 + 67 + 2.1 MB = 337 MB -> 112 us.

The masked case: silu_and_mul_quant over an expert-parallel decode buffer (GPU: 32 local
experts x 8 ranks x 128 rows, ~32 valid rows an expert; CPU: 8 x 128, ~8), bytes of the
valid rows only: with masked_m (zeros written past it, or with -no-zero-fill nothing), and
the 2-D op over every row of the buffer (-all-rows), what the masked form replaces.
"""

from __future__ import annotations

import torch

from moe_kernels._common import FP8
from moe_kernels.bench.common import (Result, device_generator, kernel_backends, measure, meta,
                                      rotating_sets)
from moe_kernels.ops import fp8 as ops
from moe_kernels.reference import fp8 as reference
from moe_kernels.reference.permute import valid_rows

H, INTER, GROUP = 7168, 2048, 128


def default_tokens(device: str) -> list[int]:
    return [4096, 32768] if device == "cuda" else [512]


def _same_fp8(got, want) -> bool:
    """Scales equal to 1e-6 and at most 0.1% of fp8 values one step off (exp and
    division differ by an ulp between libraries; the tests pin the exact rules)."""
    q, s = got
    rq, rs = want
    if not torch.allclose(s.cpu(), rs.cpu(), rtol=1e-6, atol=0):
        return False
    diff = (q.cpu().view(torch.uint8).int() - rq.cpu().view(torch.uint8).int()).abs()
    return bool((diff <= 1).all()) and diff.float().mean().item() <= 1e-3


# The public names whose rows this module measures (moe-bench --op).
MEASURES = ("quantize_fp8_per_token_group", "silu_and_mul_quant_fp8")


def run(device: str, backends: list[str] | None, tokens: list[int] | None,
        compile_reference: bool = True) -> list[Result]:
    backends = kernel_backends(device, backends, ops.QUANTIZE_FP8_PER_TOKEN_GROUP.backends)
    gen = torch.Generator().manual_seed(0)
    dev = device_generator(gen, device)      # inputs drawn where they are used
    ref_quant, ref_silu = reference.quantize_fp8_per_token_group, reference.silu_and_mul_quant_fp8
    if compile_reference:
        ref_quant_c = torch.compile(ref_quant, dynamic=False)
        ref_silu_c = torch.compile(ref_silu, dynamic=False)
    results = []
    for T in tokens or default_tokens(device):
        n_sets = rotating_sets(T * H * 3, device)
        x = [torch.randn((T, H), generator=dev, device=device).bfloat16() for _ in range(n_sets)]
        case = f"quant 1x128 T={T} H={H} bf16"
        timed = [(b, lambda i, b=b: ops.quantize_fp8_per_token_group(x[i], backend=b))
                 for b in backends]
        timed += [("torch-eager", lambda i: ref_quant(x[i]))]
        if compile_reference:
            timed += [("torch-compile", lambda i: ref_quant_c(x[i]))]
        nbytes = T * H * 2 + T * H + T * (H // GROUP) * 4
        want = ref_quant(x[0])
        results += measure("quantize_fp8_per_token_group", case, device, timed, nbytes, n_sets,
                           lambda out: _same_fp8(out, want))

        n_sets = rotating_sets(T * INTER * 5, device)
        y = [torch.randn((T, 2 * INTER), generator=dev, device=device).bfloat16()
             for _ in range(n_sets)]
        case = f"silu_mul_quant T={T} 2x{INTER} bf16"
        timed = [(b, lambda i, b=b: ops.silu_and_mul_quant_fp8(y[i], backend=b)) for b in backends]
        timed += [("torch-eager", lambda i: ref_silu(y[i]))]
        if compile_reference:
            timed += [("torch-compile", lambda i: ref_silu_c(y[i]))]
        nbytes = T * 2 * INTER * 2 + T * INTER + T * (INTER // GROUP) * 4
        want_y = ref_silu(y[0])
        results += measure("silu_and_mul_quant_fp8", case, device, timed, nbytes, n_sets,
                           lambda out: _same_fp8(out, want_y))
    return results + _masked_silu(device, backends, gen)


def _masked_silu(device, backends, gen) -> list[Result]:
    E, M, mean_valid = (32, 1024, 32) if device == "cuda" else (8, 128, 8)
    masked = torch.randint(mean_valid // 2, 3 * mean_valid // 2 + 1, (E,), generator=gen,
                           dtype=torch.int32)
    valid = int(masked.sum())
    n_sets = rotating_sets(valid * INTER * 5, device)
    dev = device_generator(gen, device)     # 10 sets of 134 M values on the GPU
    y = [torch.randn((E, M, 2 * INTER), generator=dev, device=device).bfloat16()
         for _ in range(n_sets)]
    masked = masked.to(device)
    q = torch.empty((E, M, INTER), dtype=FP8, device=device)
    s = torch.empty((E, M, INTER // GROUP), device=device)
    case = f"silu_mul_quant masked E={E} M={M} ({valid} valid rows) 2x{INTER} bf16"
    timed = [(b, lambda i, b=b: ops.silu_and_mul_quant_fp8(y[i], masked_m=masked, backend=b))
             for b in backends]
    timed += [(f"{b}-no-zero-fill", lambda i, b=b: ops.silu_and_mul_quant_fp8(
        y[i], masked_m=masked, out=(q, s), zero_fill=False, backend=b)) for b in backends]
    timed += [(f"{b}-all-rows", lambda i, b=b: tuple(
        t.view(E, M, -1) for t in ops.silu_and_mul_quant_fp8(y[i].flatten(0, 1), backend=b)))
        for b in backends]
    rows = valid_rows(masked, M)
    want = reference.silu_and_mul_quant_fp8(y[0][rows])
    nbytes = valid * (2 * INTER * 2 + INTER + (INTER // GROUP) * 4)
    return measure("silu_and_mul_quant_fp8", case, device, timed, nbytes, n_sets,
                   lambda out: _same_fp8((out[0][rows], out[1][rows]), want))


def sm90_cases():
    """(name, launch) pairs of every Triton launch of this op at DeepSeek-V3 shapes, on
    meta tensors, for the sm_90a compile gate (moe_kernels/bench/sm90.py)."""
    from moe_kernels.triton import fp8
    for M in (1, 16384):
        for dt in (torch.bfloat16, torch.float16, torch.float32):
            yield (f"quant 1x128 M={M} K=7168 {dt}", lambda M=M, dt=dt:
                   fp8.quantize_fp8_per_token_group(meta(M, 7168, dtype=dt), 128, 1e-10, False, False))
        yield (f"quant 1x128 ue8m0 col-major M={M}", lambda M=M: fp8.quantize_fp8_per_token_group(
            meta(M, 7168, dtype=torch.bfloat16), 128, 1e-10, True, True))
        yield (f"silu_and_mul_quant M={M} 2x2048", lambda M=M: fp8.silu_and_mul_quant_fp8(
            meta(M, 4096, dtype=torch.bfloat16), 128))
    # the expert-parallel decode buffer (32 local experts x 8 ranks x 128 rows), both forms
    for zero_fill in (True, False):
        yield (f"silu_and_mul_quant masked 32x1024 2x2048 zero_fill={zero_fill}",
               lambda z=zero_fill: fp8.silu_and_mul_quant_fp8_masked_out(
                   meta(32, 1024, 4096, dtype=torch.bfloat16), meta(32, dtype=torch.int32),
                   128, 1e-10, z, meta(32, 1024, 2048, dtype=FP8), meta(32, 1024, 16)))
    # fused_moe_fp8's first kernel at small T (up to 585 tokens at H=7168 in bf16)
    for T in (1, 512):
        yield (f"quant 1x128 gathered R={8 * T} ({T} tokens x top-8) H=7168 bf16",
               lambda T=T: fp8.gather_rows_quant_fp8(
                   meta(T, 7168, dtype=torch.bfloat16), meta(8 * T, dtype=torch.int32),
                   meta(T, 8, dtype=torch.int32), 128, 1e-10))
    for dt in (torch.bfloat16, torch.float32):
        yield (f"quant 128x128 7168x2048 {dt}",
               lambda dt=dt: fp8.quantize_fp8_block(meta(7168, 2048, dtype=dt), 128, 128))
    for dt in (torch.bfloat16, torch.float16, torch.float32):
        yield (f"dequant 128x128 7168x2048 -> {dt}", lambda dt=dt: fp8.dequantize_fp8_block(
            meta(7168, 2048, dtype=FP8), meta(56, 16), 128, 128, dt))
