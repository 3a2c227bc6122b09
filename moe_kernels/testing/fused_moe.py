"""fused_moe_fp8: cases and rule. Its contract bounds the relative Frobenius error (2e-2)
against the reference chain (reference.moe_forward: float32 math on the dequantized
weights, the activations rounded where the pipeline rounds them: 1x128 FP8 before each
GEMM, GEMM1's output to bf16). Two correct float32 pipelines round an intermediate the two
ways where its exact value lies within float32 noise of a midpoint, and one e4m3 step of
one element is up to 12.5% of it, which a small intermediate size does not average away (a
drawn case, I = 32: one bf16 rounding of GEMM1 went the other way, moved an FP8 value 384
-> 416 and its token's row 4.2%, the output 2.07%). So the error may exceed the bound by
what the other rounding of each such near-midpoint value moves the output
(`rounding_allowance`); where no value is near a midpoint, that is nothing."""

from __future__ import annotations

import functools
import itertools

import torch

from moe_kernels.reference import fp8 as ref_fp8
from moe_kernels.testing import rules
from moe_kernels.testing.core import Case, OpSpec, register
from moe_kernels.testing.inputs import fp8_weights, pick, small, topk_ids


def _fused_cases(preset, g, dev):
    def mk(name, why, T, K, E, *, H=256, I=128, ids=None, dtype=torch.bfloat16):
        w13, s13 = fp8_weights(g, (E, 2 * I, H), device=dev)
        w2, s2 = fp8_weights(g, (E, H, I), device=dev)
        ids = topk_ids(g, T, K, E, device=dev) if ids is None else ids.to(dev)
        return Case("fused_moe_fp8", name, dict(
            hidden=torch.randn(T, H, generator=g).to(dtype).to(dev), w13=w13, w13_scales=s13,
            w2=w2, w2_scales=s2, topk_weights=torch.rand(T, K, generator=g).to(dev),
            topk_ids=ids), why)
    if preset == "edge":
        skipped = topk_ids(g, 6, 2, 4)
        skipped[0, 0], skipped[3, 1] = -1, 7
        return [
            mk("empty", "T = 0", 0, 2, 4),
            mk("one_token", "T = 1", 1, 2, 4),
            mk("all_on_one_expert", "every pair on expert 2", 5, 1, 4,
               ids=torch.full((5, 1), 2, dtype=torch.int32)),
            mk("skipped_ids", "-1 and ids >= E add nothing", 6, 2, 4, ids=skipped),
            mk("experts_not_power_of_two", "E = 5", 7, 2, 5),
            mk("intermediate_not_multiple_of_128", "I = 200: partial scale blocks", 4, 2, 3,
               I=200),
            mk("float32_hidden", "float32 in and out", 4, 2, 4, dtype=torch.float32),
            mk("no_experts", "E = 0 (weights of no expert): every pair skipped, zeros", 4, 2,
               0, ids=torch.zeros(4, 2, dtype=torch.int32)),
            mk("no_intermediate", "I = 0: every down-projection an empty sum, zeros", 4, 2, 3,
               I=0),
        ]
    if preset == "deepseek_v3":
        H, I, E = (7168, 2048, 32) if dev.type == "cuda" else (512, 256, 16)
        return [mk(f"T{T}", f"top-8 of {E} (a rank's share of 256), H={H}, I={I}", T, 8, E,
                   H=H, I=I) for T in (1, 16)]
    return [mk(f"random_{i}", "drawn sizes", small(g, 10), K, K + small(g, 4),
               H=pick(g, [128, 256]), I=pick(g, [128, 200]),
               dtype=pick(g, [torch.float32, torch.bfloat16]))
            for i, K in enumerate([pick(g, [1, 2, 3]) for _ in range(4)])]


WEIGHTS = ("w13", "w13_scales", "w2", "w2_scales")
FP8 = torch.float8_e4m3fn
# Relative nearness to a rounding midpoint within which two correct float32 pipelines may
# round apart (GEMM1's outputs: relative to the sum of their terms' magnitudes); float32
# noise is ~1e-7 of that, accumulation over a few hundred terms ~1e-6.
ROUNDING_TIE = 1e-5


@functools.lru_cache(maxsize=None)
def _values(dtype) -> torch.Tensor:
    """The finite non-negative values of `dtype`, ascending, in float64."""
    if dtype == FP8:
        return torch.arange(0x7F, dtype=torch.uint8).view(FP8).double()
    return torch.arange(0x7F80, dtype=torch.int16).view(torch.bfloat16).double()


def _near_midpoint(v: torch.Tensor, tol: torch.Tensor, dtype):
    """(mask, lo, hi): where |v| lies within tol of the midpoint between its neighbours lo
    <= |v| < hi in `dtype`, which a rounding of v may take either of."""
    table = _values(dtype)
    a = v.abs().clamp(max=float(table[-1]))
    hi_i = torch.searchsorted(table, a, right=True).clamp(max=len(table) - 1)
    lo, hi = table[(hi_i - 1).clamp(min=0)], table[hi_i]
    return (a - (lo + hi) / 2).abs() <= tol, lo, hi


class _PairChain:
    """One token through one expert, in float64 with the pipeline's roundings: the
    quantized row, GEMM1 rounded to bf16, SiLU-mul quantized 1x128, GEMM2."""

    def __init__(self, w13, w2):
        self.w13, self.w2 = w13, w2
        self.inter = w13.shape[0] // 2

    def from_hidden(self, h):
        """-> (GEMM1's output before rounding, the activation, its scales, the output)."""
        gate_up = self.w13 @ h
        return (gate_up, *self.from_gate_up(gate_up.float().bfloat16().double()))

    def from_gate_up(self, gub):
        """-> (the activation before rounding, its 1x128 scales, the output)."""
        act = torch.nn.functional.silu(gub[:self.inter]) * gub[self.inter:]
        q, scale = ref_fp8.quantize_fp8_per_token_group(act.float()[None])
        deq = ref_fp8.dequantize_per_token_group(q, scale)[0].double()
        return act, scale[0].double(), self.w2 @ deq


def _pair_allowance(chain: _PairChain, x) -> float:
    """Sum over this pair's near-midpoint roundings (the row's FP8 codes, GEMM1's bf16
    outputs, the activation's FP8 codes) of how far the other rounding moves the pair's
    output (Frobenius norm)."""
    total = 0.0
    q, s = ref_fp8.quantize_fp8_per_token_group(x.float()[None])
    h = ref_fp8.dequantize_per_token_group(q, s)[0].double()
    gate_up, act, a_scale, out = chain.from_hidden(h)
    s_of = s[0].double().repeat_interleave(128)[:len(x)]
    near, lo, hi = _near_midpoint(x / s_of, ROUNDING_TIE * (x / s_of).abs(), FP8)
    for i in near.nonzero().flatten().tolist():      # the row's codes: the other one
        moved = h.clone()
        moved[i] = torch.sign(h[i]) * (lo[i] + hi[i] - h[i].abs() / s_of[i]) * s_of[i]
        total += float((chain.from_hidden(moved)[-1] - out).norm())
    terms = chain.w13.abs() @ h.abs()
    near, lo, hi = _near_midpoint(gate_up, ROUNDING_TIE * terms, torch.bfloat16)
    gub = gate_up.float().bfloat16().double()
    for j in near.nonzero().flatten().tolist():      # GEMM1's outputs: the other bf16
        other = gub.clone()
        other[j] = torch.sign(gate_up[j]) * (lo[j] + hi[j] - gub[j].abs())
        total += float((chain.from_gate_up(other)[-1] - out).norm())
    a_of = a_scale.repeat_interleave(128)[:len(act)]
    near, lo, hi = _near_midpoint(act / a_of, ROUNDING_TIE * (act / a_of).abs(), FP8)
    columns = chain.w2.norm(dim=0)                   # the activation's codes: linear
    return total + float((near * (hi - lo) * a_of * columns).sum())


def rounding_allowance(inputs: dict) -> float:
    """How far, at most, the other roundings of the near-midpoint intermediates (module
    docstring) move fused_moe_fp8's output (Frobenius norm; by the triangle inequality, the
    sum over token-expert pairs of topk weight times the pair's moves)."""
    x, w13, s13, w2, s2, w, ids = (inputs[k].detach().cpu() for k in
                                   ("hidden", *WEIGHTS, "topk_weights", "topk_ids"))
    E = w13.shape[0]
    total, chains = 0.0, {}
    for t, k in itertools.product(range(ids.shape[0]), range(ids.shape[1])):
        e = int(ids[t, k])
        if not 0 <= e < E or float(w[t, k]) == 0:
            continue
        if e not in chains:
            chains[e] = _PairChain(
                ref_fp8.dequantize_fp8_block(w13[e], s13[e], dtype=torch.float32).double(),
                ref_fp8.dequantize_fp8_block(w2[e], s2[e], dtype=torch.float32).double())
        total += abs(float(w[t, k])) * _pair_allowance(chains[e], x[t].double())
    return total


def check_out(got, want: torch.Tensor, inputs: dict | None = None) -> rules.Verdict:
    """got against the reference chain `want`: relative Frobenius error < 2e-2, or, with
    the inputs given, ||got - want|| <= 2e-2 ||want|| + rounding_allowance(inputs)."""
    chain = rules.relative_error("out", got, want)
    if chain.passed or inputs is None or not isinstance(got, torch.Tensor) \
            or not (got.isfinite().all() and want.isfinite().all()):
        return chain
    g, w_ = got.detach().cpu().double(), want.detach().cpu().double()
    allowance = rounding_allowance(inputs)
    err, bound = float((g - w_).norm()), rules.FUSED_REL_ERR * float(w_.norm())
    if err > bound + allowance:
        return rules.Verdict(chain.output, chain.rule, False, chain.worst, chain.where,
                             f"{err:.4g} from the chain, above {bound:.4g} + the other "
                             f"roundings' {allowance:.4g}")
    return rules.Verdict("out", f"{chain.rule}, or within it plus the other roundings", True,
                         err / (bound + allowance), None,
                         f"{err:.4g} from the chain: {bound:.4g} + the other roundings of "
                         f"near-midpoint values {allowance:.4g}")


register(OpSpec(
    "fused_moe_fp8", ("hidden", *WEIGHTS, "topk_weights", "topk_ids"), _fused_cases,
    lambda r: {"out": r},
    lambda got, want, case=None: [check_out(got["out"], want["out"],
                                            None if case is None else case.inputs)]))
