"""moe-bench cases for the DeepseekV3MoE layer: DeepSeek-V3 (E=256 + 1 shared, H=7168,
I=2048, top-8, 8 groups / 4) on the GPU, scaled down on the CPU (E=16, H=512, I=256).

Floor = the sum of its ops' floors: the router reads its float32 gate weight (7.3 MB on
the GPU), the fused routed + shared experts read the FP8 weights of every expert touched
(at T=1: 9 x 44 MB = 396 MB) -> ~135 us at 3.0 TB/s; goal: within 1.3x (docs/benchmarks.md).
The torch path timed beside: the HF-semantics router in float32 torch, then the routed
and shared experts with weights dequantized to bf16 (per routed pair, batched; as
bench/fused_moe.py), eager and compiled.
"""

from __future__ import annotations

from types import SimpleNamespace

import torch
import torch.nn.functional as F

from moe_kernels.bench.common import Result, kernel_backends, measure, once, random_fp8_weights
from moe_kernels.bench.fused_moe import torch_routed
from moe_kernels.layer import DeepseekV3MoE
from moe_kernels.ops import fused_moe as fused_ops
from moe_kernels.reference import fp8 as ref_fp8
from moe_kernels.reference import layer as ref_layer

GPU_CONFIG = dict(hidden_size=7168, moe_intermediate_size=2048, n_routed_experts=256,
                  n_shared_experts=1, num_experts_per_tok=8, n_group=8, topk_group=4,
                  routed_scaling_factor=2.5, norm_topk_prob=True)
CPU_CONFIG = dict(GPU_CONFIG, hidden_size=512, moe_intermediate_size=256, n_routed_experts=16,
                  n_group=4, topk_group=2)


def default_tokens(device: str) -> list[int]:
    return [1, 16]


def random_layer(cfg: dict, device: str, gen) -> DeepseekV3MoE:
    """A layer with random weights (std 0.05 as a checkpoint's), quantized in place."""
    layer = DeepseekV3MoE(**cfg, device=device)
    with torch.no_grad():
        layer.gate_weight.copy_(torch.randn(layer.gate_weight.shape, generator=gen) * 0.05)
        layer.e_score_correction_bias.copy_(torch.rand(layer.num_experts, generator=gen) * 0.1)
        for name in ("w13", "w2"):
            buf = getattr(layer, name)
            random_fp8_weights(buf.shape, 0.05, device, gen,
                               out=(buf, getattr(layer, name + "_scale")))
    return layer


def torch_layer(hidden, layer: DeepseekV3MoE):
    """HF semantics in torch: float32 router, experts in bf16 (dequantized per call)."""
    w, ids = ref_layer.route(hidden, layer.gate_weight, layer.e_score_correction_bias,
                             layer.top_k, layer.n_group, layer.topk_group, layer.norm_topk_prob,
                             layer.routed_scaling_factor)
    E = layer.num_experts
    routed = torch_routed(hidden, layer.w13[:E], layer.w13_scale[:E], layer.w2[:E],
                          layer.w2_scale[:E], w, ids)
    sw13 = ref_fp8.dequantize_fp8_block(layer.w13[E], layer.w13_scale[E], dtype=torch.bfloat16)
    sw2 = ref_fp8.dequantize_fp8_block(layer.w2[E], layer.w2_scale[E], dtype=torch.bfloat16)
    gate, up = (hidden @ sw13.T).chunk(2, dim=-1)
    return routed + (F.silu(gate.float()) * up.float()).bfloat16() @ sw2.T


# The public names whose rows this module measures (moe-bench --op).
MEASURES = ("DeepseekV3MoE",)


def run(device: str, backends: list[str] | None, tokens: list[int] | None,
        compile_reference: bool = True) -> list[Result]:
    backends = [b for b in kernel_backends(device, backends, fused_ops.FUSED_MOE_FP8.backends)
                if b != "reference"]
    cfg = GPU_CONFIG if device == "cuda" else CPU_CONFIG
    gen = torch.Generator().manual_seed(0)
    layer = random_layer(cfg, device, gen)
    c = SimpleNamespace(**cfg)
    compiled = torch.compile(torch_layer, dynamic=False) if compile_reference else None
    results = []
    for T in tokens or default_tokens(device):
        hidden = (torch.randn(T, c.hidden_size, generator=gen)).bfloat16().to(device)
        _, ids = ref_layer.route(hidden, layer.gate_weight, layer.e_score_correction_bias,
                                 c.num_experts_per_tok, c.n_group, c.topk_group, True, 1.0)
        touched = len(torch.unique(ids)) + 1                     # + the shared expert
        per_expert = 3 * c.moe_intermediate_size * c.hidden_size
        nbytes = layer.gate_weight.numel() * 4 + touched * per_expert + 2 * T * c.hidden_size * 2
        flops = 2 * T * (c.n_routed_experts + (c.num_experts_per_tok + 1) * 3
                         * c.moe_intermediate_size) * c.hidden_size
        want = once(lambda hidden=hidden: torch_layer(hidden, layer).float())
        case = (f"DeepseekV3MoE T={T} E={c.n_routed_experts}+1 H={c.hidden_size} "
                f"I={c.moe_intermediate_size} top{c.num_experts_per_tok}")
        timed = [(b, lambda i, b=b: _forward(layer, b, hidden)) for b in backends]
        timed += [("torch-eager", lambda i: torch_layer(hidden, layer))]
        if compiled is not None:
            timed += [("torch-compile", lambda i: compiled(hidden, layer))]
        results += measure("DeepseekV3MoE", case, device, timed, nbytes, 1,
                           lambda out: _close(out, want()), flops=flops)
    return results


def _forward(layer, backend, hidden):
    layer.backend = backend
    return layer(hidden)


def _close(out, want) -> bool:
    # the kernels quantize activations to FP8, the torch path keeps bf16: ~5% apart
    return bool((out.float() - want).norm() / want.norm().clamp_min(1e-30) < 0.1)
