"""moe-bench cases for FP8 quantization, DeepSeek-V3 shapes: activations (T, 7168) bf16
in 1x128 groups, and SiLU-and-mul-quant of the expert intermediate (T, 2 x 2048) bf16
(GPU: 4096 and 32768 rows; CPU: 512 rows, widths as on the GPU).

Floors (bytes / copy bandwidth; every input read once, every output written once):
quantize 32768 x 7168: 469.8 MB read + 234.9 MB fp8 + 7.3 MB scales = 712 MB -> 237 us
at 3.0 TB/s; silu_and_mul_quant 32768 x 4096 -> 2048: 268 + 67 + 2.1 MB = 337 MB -> 112 us.
"""

from __future__ import annotations

import torch

from moe_kernels.bench.common import Result, kernel_backends, measure, rotating_sets
from moe_kernels.ops import fp8 as ops
from moe_kernels.reference import fp8 as reference

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


def run(device: str, backends: list[str] | None, tokens: list[int] | None,
        compile_reference: bool = True) -> list[Result]:
    backends = kernel_backends(device, backends, ops.SUPPORTED)
    gen = torch.Generator().manual_seed(0)
    ref_quant, ref_silu = reference.quantize_fp8_per_token_group, reference.silu_and_mul_quant_fp8
    if compile_reference:
        ref_quant_c = torch.compile(ref_quant, dynamic=False)
        ref_silu_c = torch.compile(ref_silu, dynamic=False)
    results = []
    for T in tokens or default_tokens(device):
        n_sets = rotating_sets(T * H * 3, device)
        x = [torch.randn(T, H, generator=gen).bfloat16().to(device) for _ in range(n_sets)]
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
        y = [torch.randn(T, 2 * INTER, generator=gen).bfloat16().to(device) for _ in range(n_sets)]
        case = f"silu_mul_quant T={T} 2x{INTER} bf16"
        timed = [(b, lambda i, b=b: ops.silu_and_mul_quant_fp8(y[i], backend=b)) for b in backends]
        timed += [("torch-eager", lambda i: ref_silu(y[i]))]
        if compile_reference:
            timed += [("torch-compile", lambda i: ref_silu_c(y[i]))]
        nbytes = T * 2 * INTER * 2 + T * INTER + T * (INTER // GROUP) * 4
        want_y = ref_silu(y[0])
        results += measure("silu_and_mul_quant_fp8", case, device, timed, nbytes, n_sets,
                           lambda out: _same_fp8(out, want_y))
    return results
