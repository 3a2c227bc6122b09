"""moe-bench cases for fused_moe_fp8: DeepSeek-V3's routed experts (E=256, H=7168,
I=2048, top-8) at decode, on the GPU; scaled down on the CPU (E=16, H=512, I=256).

Floor at decode (T=1): the 8 routed experts' weights, 8 x (4096 x 7168 + 7168 x 2048)
fp8 = 352 MB, dominate the bytes: 117 us at 3.0 TB/s (goal <= 125 us). The torch
path timed beside (eager and compiled, no host sync): up to 128 routed pairs it gathers
each pair's expert weights, dequantizes them to bf16 and runs the expert MLPs as batched
matmuls; beyond that (gathering a weight copy per pair no longer fits), it dequantizes
every expert once and runs every token through every expert, masked by the gate weights
(E / top_k times the routed flops, the form without data-dependent shapes).
On the GPU the triton rows also come in the grouped GEMMs' tile-load variants
(`triton-tma`, `triton-tma-maxnreg128`, `triton-ws`; moe_kernels/bench/grouped_gemm.py),
and where the Triton path quantizes rows as it permutes them, on the separate kernels
(`triton-quant-then-permute`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from moe_kernels.bench.common import Result, kernel_backends, measure, once, random_fp8_weights
from moe_kernels.bench.grouped_gemm import tile_variants
from moe_kernels.ops import fused_moe as ops
from moe_kernels.reference import fp8 as ref_fp8
from moe_kernels.reference import fused_moe as reference

GPU_LAYER = (256, 7168, 2048, 8)   # E, H, I, top_k
CPU_LAYER = (16, 512, 256, 8)


def default_tokens(device: str) -> list[int]:
    return [1, 16] if device == "cuda" else [1, 64]


def torch_routed(hidden, w13, s13, w2, s2, weights, ids):
    """Per routed pair: its expert's weights gathered and dequantized, bf16 bmm."""
    T, K = ids.shape
    e = ids.reshape(-1).long().clamp(min=0)
    w13_16 = ref_fp8.dequantize_fp8_block(w13[e], s13[e], dtype=torch.bfloat16)
    w2_16 = ref_fp8.dequantize_fp8_block(w2[e], s2[e], dtype=torch.bfloat16)
    h = hidden.repeat_interleave(K, dim=0)[:, :, None]
    gate_up = torch.bmm(w13_16, h)[..., 0]
    inter = gate_up.shape[1] // 2
    act = (F.silu(gate_up[:, :inter].float()) * gate_up[:, inter:].float()).bfloat16()
    y = torch.bmm(w2_16, act[:, :, None])[..., 0].float()
    w = torch.where(ids.reshape(-1) >= 0, weights.reshape(-1), 0.0)
    return (y * w[:, None]).view(T, K, -1).sum(1).to(hidden.dtype)


def torch_dense(hidden, w13, s13, w2, s2, weights, ids):
    """Every token through every expert (bf16 matmuls), summed with its gate weights."""
    T, K = ids.shape
    E = w13.shape[0]
    w13_16 = ref_fp8.dequantize_fp8_block(w13, s13, dtype=torch.bfloat16)
    w2_16 = ref_fp8.dequantize_fp8_block(w2, s2, dtype=torch.bfloat16)
    gate_up = torch.einsum("th,enh->etn", hidden, w13_16)
    inter = gate_up.shape[-1] // 2
    act = (F.silu(gate_up[..., :inter].float()) * gate_up[..., inter:].float()).bfloat16()
    y = torch.einsum("eti,ehi->eth", act, w2_16).float()
    gate = torch.zeros(T, E + 1, dtype=torch.float32, device=hidden.device)
    gate.scatter_add_(1, torch.where(ids >= 0, ids.long(), E), weights.float())
    return torch.einsum("te,eth->th", gate[:, :E], y).to(hidden.dtype)


# The public names whose rows this module measures (moe-bench --op).
MEASURES = ("fused_moe_fp8",)


def run(device: str, backends: list[str] | None, tokens: list[int] | None,
        compile_reference: bool = True) -> list[Result]:
    backends = [b for b in kernel_backends(device, backends, ops.FUSED_MOE_FP8.backends)
                if b != "reference"]
    E, H, inter, K = GPU_LAYER if device == "cuda" else CPU_LAYER
    gen = torch.Generator().manual_seed(0)
    w13, s13 = random_fp8_weights((E, 2 * inter, H), H ** -0.5, device, gen)
    w2, s2 = random_fp8_weights((E, H, inter), inter ** -0.5, device, gen)
    compiled = ({f: torch.compile(f, dynamic=False) for f in (torch_routed, torch_dense)}
                if compile_reference else {})
    results = []
    for T in tokens or default_tokens(device):
        hidden = torch.randn(T, H, generator=gen).bfloat16().to(device)
        ids = torch.stack([torch.randperm(E, generator=gen)[:K] for _ in range(T)]).int().to(device)
        weights = torch.rand(T, K, generator=gen).to(device)
        args = (hidden, w13, s13, w2, s2, weights, ids)
        case = f"fused T={T} E={E} H={H} I={inter} top{K}"
        experts = len(torch.unique(ids))
        nbytes = experts * 3 * inter * H + T * H * 4 + T * K * 8
        flops = T * K * 2 * 3 * inter * H
        # kernels against the FP8 pipeline's oracle, the bf16 baseline against the
        # unquantized one (docs/fp8.md: the two differ by the activation roundings)
        ours = [(b, lambda i, b=b: ops.fused_moe_fp8(*args, backend=b)) for b in backends]
        ours += tile_variants(device, backends, lambda i, args=args: ops.fused_moe_fp8(
            *args, backend="triton"), ws=True)
        ours += quant_variants(device, backends, hidden, lambda i, args=args: ops.fused_moe_fp8(
            *args, backend="triton"))
        for quantized, timed in ((True, ours), (False, _baselines(args, T * K, compiled))):
            want = once(lambda args=args, q=quantized: reference.moe_forward(
                *args, out_dtype=torch.float32, quantize_activations=q))
            results += measure("fused_moe_fp8", case, device, timed, nbytes, 1,
                               lambda out, want=want: _close(out, want()), flops=flops)
    return results


def quant_variants(device: str, backends: list[str], hidden, call):
    """(row name, fn(i)): call(i) on the separate quantize and permute kernels where the
    Triton path would fuse them (ops.GATHERED_QUANT_MAX_BYTES), to time the fusion; GPU
    only, where triton is timed."""
    if device != "cuda" or "triton" not in backends \
            or hidden.numel() * hidden.element_size() > ops.GATHERED_QUANT_MAX_BYTES:
        return []

    def separate(i):
        saved, ops.GATHERED_QUANT_MAX_BYTES = ops.GATHERED_QUANT_MAX_BYTES, -1
        try:
            return call(i)
        finally:
            ops.GATHERED_QUANT_MAX_BYTES = saved
    return [("triton-quant-then-permute", separate)]


def _close(out, want) -> bool:
    return bool((out.float() - want).norm() / want.norm().clamp_min(1e-30) < 2e-2)


def _baselines(args, pairs, compiled):
    # torch_routed materialises one dequantized expert per pair
    fn = torch_routed if pairs <= 128 else torch_dense
    timed = [("torch-eager", lambda i: fn(*args))]
    if fn in compiled:
        timed += [("torch-compile", lambda i: compiled[fn](*args))]
    return timed
