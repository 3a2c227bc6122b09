"""moe-bench cases for grouped_topk: DeepSeek-V3 routing (E=256, 8 groups, 4 kept, top-8,
sigmoid + bias, top2_sum, scale 2.5) on bf16 logits.

Floor: the op reads T*E logits and the bias and writes T*K weights and ids; there is no
reuse, so it is memory bound: bytes / copy bandwidth (2.36 MB, about 0.8 us at 4096 bf16
tokens on an H100's 3.0 TB/s). Below ~64 tokens the launch (~2-3 us) dominates any kernel.
"""

from __future__ import annotations

import torch

from moe_kernels import _library
from moe_kernels.bench.common import Result, meta, measure, rotating_sets
from moe_kernels.ops import gating as ops
from moe_kernels.reference import gating as reference

OP = "grouped_topk"
E, K, G, TOPK_GROUP, SCALE = 256, 8, 8, 4, 2.5
KWARGS = dict(num_expert_group=G, topk_group=TOPK_GROUP, scoring_func="sigmoid",
              group_scoring="top2_sum", renormalize=True, routed_scaling_factor=SCALE)


def default_tokens(device: str) -> list[int]:
    return [1, 16, 64, 4096] if device == "cuda" else [1, 64, 4096]


def _agrees(w, ids, w_ref, ids_ref) -> bool:
    """Sanity check before timing (the tests do the exhaustive one): at most 0.1% of rows
    may pick other experts (float32 near-ties), weights equal elsewhere."""
    same_row = (ids.cpu() == ids_ref.cpu()).all(dim=1)
    if same_row.float().mean().item() < 0.999:
        return False
    diff = (w.cpu() - w_ref.cpu()).abs()[same_row]
    return diff.numel() == 0 or diff.max().item() <= 1e-5 * SCALE


# The public names whose rows this module measures (moe-bench --op).
MEASURES = (OP,)


def run(device: str, backends: list[str] | None, tokens: list[int] | None,
        compile_reference: bool = True) -> list[Result]:
    dev = torch.device(device)
    if backends is None:  # triton on CPU is the interpreter: correct but not worth timing
        backends = [b for b in ("cuda", "triton", "cpu")
                    if _library.backend_unavailable_reason(b, dev) is None
                    and not (b == "triton" and device == "cpu")]
    results = []
    gen = torch.Generator().manual_seed(0)
    bias = (torch.randn(E, generator=gen) * 0.1).to(device)
    compiled_ref = torch.compile(reference.grouped_topk, dynamic=False) if compile_reference else None
    for T in tokens or default_tokens(device):
        case = f"T={T} E={E} G={G}/{TOPK_GROUP} K={K} bf16"
        nbytes = T * E * 2 + E * 4 + T * K * 8
        n_sets = rotating_sets(T * E * 2, device)
        sets = [torch.randn(T, E, generator=gen).bfloat16().to(device) for _ in range(n_sets)]
        ref_args = lambda i: (sets[i], bias, K, G, TOPK_GROUP, "sigmoid", "top2_sum", True, SCALE)
        w_ref, ids_ref = reference.grouped_topk(*ref_args(0))
        timed = [(b, lambda i, b=b: ops.grouped_topk(sets[i], K, correction_bias=bias,
                                                     backend=b, **KWARGS)) for b in backends]
        timed.append(("torch-eager", lambda i: reference.grouped_topk(*ref_args(i))))
        if compiled_ref is not None:
            timed.append(("torch-compile", lambda i: compiled_ref(*ref_args(i))))
        results += measure(OP, case, device, timed, nbytes, n_sets,
                           lambda out: _agrees(*out, w_ref, ids_ref))
    return results


def sm90_cases():
    """(name, launch) pairs of every Triton launch of this op at DeepSeek-V3 shapes, on
    meta tensors, for the sm_90a compile gate (moe_kernels/bench/sm90.py)."""
    from moe_kernels.triton import gating
    # (E, groups, topk_group, top_k, scoring, group scoring, bias): DeepSeek-V3 and a
    # softmax router without groups (Mixtral/Qwen style); E=384 (Kimi K2) pads to 512
    routers = [(256, 8, 4, 8, "sigmoid", "top2_sum", True), (64, 1, 1, 8, "softmax", "max", False),
               (384, 1, 1, 8, "sigmoid", "max", True)]
    for E, G, tg, k, scoring, gscore, bias in routers:
        for T in (1, 4096, 16384):
            dtypes = (torch.bfloat16, torch.float32, torch.float16) if (E, T) == (256, 4096) \
                else (torch.bfloat16,)
            for dt in dtypes:
                yield (f"grouped_topk E={E} T={T} {dt}", lambda dt=dt, T=T, E=E, G=G, tg=tg, k=k,
                       s=scoring, g=gscore, b=bias: gating.grouped_topk(
                           meta(T, E, dtype=dt), meta(E) if b else None, k, G, tg, s, g, True, 2.5))
    for T in (1, 4096):   # the layer's router, which writes the shared expert's column too
        yield (f"grouped_topk E=256 T={T} shared expert column",
               lambda T=T: gating.grouped_topk(meta(T, 256, dtype=torch.bfloat16), meta(256), 8,
                                               8, 4, "sigmoid", "top2_sum", True, 2.5, 256))
