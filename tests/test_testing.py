"""moe_kernels.testing and moe-check: our backends pass every op's presets; each mutant of
tests/mutants.py is caught with a message naming the case built for its failure mode;
the adapters map vLLM's, SGLang's and DeepGEMM's conventions (emulated here from our
reference: the projects themselves are not imported); the CLI's exit codes and JSON."""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys

import pytest
import torch

import moe_kernels
from moe_kernels import testing
from moe_kernels.testing import adapters, rules

import mutants
from helpers import HAS_CUDA, backend_params

REF = "reference"
ALL_OPS = testing.ops()
TESTS_DIR = os.path.dirname(os.path.abspath(__file__))


def test_every_public_op_is_covered():
    public = {"grouped_topk", "moe_align_block_size", "permute", "permute_masked", "unpermute",
              "quantize_fp8_per_token_group", "silu_and_mul_quant_fp8", "quantize_fp8_block",
              "dequantize_fp8_block", "grouped_gemm_fp8", "grouped_gemm_fp8_masked",
              "fused_moe_fp8", "mla_decompress_kv", "mla_decompress_kv_paged"}
    assert set(ALL_OPS) == public


@pytest.mark.parametrize("op", ALL_OPS)
def test_edge_cases_are_named_and_explained(op):
    cs = testing.cases(op, "edge")
    names = [c.name for c in cs]
    assert len(names) == len(set(names)) >= 5, names
    assert all(c.why for c in cs)


@pytest.mark.parametrize("op", ALL_OPS)
def test_presets_are_deterministic_per_seed(op):
    a, b = testing.cases(op, "random", seed=3), testing.cases(op, "random", seed=3)
    c = testing.cases(op, "random", seed=4)
    flat = lambda cs: [v for case in cs for v in case.inputs.values()
                       if isinstance(v, torch.Tensor)]
    assert all(x.shape == y.shape and torch.equal(rules._bits(x), rules._bits(y))
               for x, y in zip(flat(a), flat(b)))
    assert [case.why for case in a] != [case.why for case in c] or \
        any(x.shape != y.shape or not torch.equal(rules._bits(x), rules._bits(y))
            for x, y in zip(flat(a), flat(c)))


def _ours(op, backend):
    return functools.partial(getattr(moe_kernels, op), backend=backend)


def _preset_backend_params():
    """Every preset on the C++ backend; Triton (interpreter) on the edge preset in CI and
    on the others under the slow marker (about a minute)."""
    params = []
    for p in backend_params("cpu", ("cpu", "triton")):
        backend = p.values[0]
        for preset in testing.PRESETS:
            slow = [pytest.mark.slow] if backend == "triton" and preset != "edge" else []
            params.append(pytest.param(preset, backend, marks=list(p.marks) + slow,
                                       id=f"{preset}-{backend}"))
    return params


@pytest.mark.parametrize("op", ALL_OPS)
@pytest.mark.parametrize("preset,backend", _preset_backend_params())
def test_our_backends_pass(op, preset, backend):
    report = testing.check(op, _ours(op, backend), preset=preset)
    assert report.passed and not report.skipped and report.results


@pytest.mark.skipif(not HAS_CUDA, reason="no CUDA device")
@pytest.mark.parametrize("op", ALL_OPS)
@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_our_backends_pass_on_cuda(op, backend):
    if backend not in moe_kernels.available_backends(torch.device("cuda")):
        pytest.skip(f"{backend} unavailable on CUDA here")
    try:
        fn = _ours(op, backend)
        for preset in testing.PRESETS:
            testing.check(op, fn, preset=preset, device="cuda")
    except moe_kernels.BackendUnavailableError as exc:
        pytest.skip(str(exc))


# --- the checker fails when it should ------------------------------------------------------

MUTANTS = [  # (op, mutant, the case built for its failure mode, what the message says)
    ("grouped_topk", mutants.bias_in_weights, "bias_selects_only", "topk_weights"),
    ("grouped_topk", mutants.reversed_ties, "all_ties", "topk_ids"),
    ("grouped_gemm_fp8", mutants.dropped_weight_scale, "n_k_not_multiples_of_128", "calc_diff"),
    ("grouped_gemm_fp8", mutants.missing_last_tile, "partial_tile", "at [128]"),
    ("quantize_fp8_per_token_group", mutants.ignores_strides, "row_strided_x", "q: FAIL"),
    ("unpermute", mutants.nan_from_padding, "skipped_ids", "NaN where none is expected"),
]


@pytest.mark.parametrize("op,mutant,case,words", MUTANTS, ids=[m[1].__name__ for m in MUTANTS])
def test_mutant_is_caught(op, mutant, case, words):
    with pytest.raises(AssertionError) as info:
        testing.check(op, mutant)
    message = str(info.value)
    block = message.split(f"- case {case!r}")
    assert len(block) == 2, f"case {case!r} not among the failures:\n{message}"
    assert words in block[1].split("\n- case")[0], message


def test_stride_mutant_fails_only_the_strided_case():
    """The failure points at the cause: only the case with a row stride fails."""
    report = testing.check("quantize_fp8_per_token_group", mutants.ignores_strides,
                           raise_on_failure=False)
    assert [r.case.name for r in report.failures] == ["row_strided_x"]


def test_inputs_written_by_the_implementation_fail():
    def writes_its_input(x, group_size=128, **kw):
        out = moe_kernels.quantize_fp8_per_token_group(x, group_size, backend=REF, **kw)
        x.zero_()
        return out
    with pytest.raises(AssertionError, match="wrote into x"):
        testing.check("quantize_fp8_per_token_group", writes_its_input)


def test_a_raising_implementation_fails_with_its_error():
    def broken(*args, **kwargs):
        raise RuntimeError("kernel not implemented for this shape")
    report = testing.check("permute", broken, raise_on_failure=False)
    assert not report.passed and all(r.error for r in report.failures)
    assert "kernel not implemented" in report.message()


def test_compare_reports_worst_error_and_index():
    want = torch.zeros(4, 6, dtype=torch.bfloat16)
    got = want.clone()
    got[2, 5] = 1.0
    comparison = testing.compare("dequantize_fp8_block", got, want)
    (verdict,) = comparison.failures
    assert verdict.where == (2, 5) and verdict.rule == "close" and verdict.worst > 1e4


@pytest.mark.parametrize("op,wrap", [
    ("grouped_gemm_fp8", lambda t: t),
    ("mla_decompress_kv", lambda t: (t[:, None, :], t[:, None, :])),
])
def test_non_finite_kind_is_free_where_the_contract_leaves_it(op, wrap):
    """GEMM and MLA outputs reached by a non-finite input may be NaN or +-inf
    (docs/api.md): either passes where the reference has the other, a finite value where
    it has neither fails, and so does a non-finite one where it is finite."""
    want = torch.randn(3, 130, generator=torch.Generator().manual_seed(0))
    want[1, :64] = float("nan")
    got = want.clone()
    got[1, :32] = float("inf")
    got[1, 32:64] = float("-inf")
    assert testing.compare(op, wrap(got), wrap(want)).passed
    finite = want.clone()
    finite[1, :64] = 0.0
    for a, b in ((finite, want), (want, finite)):
        (verdict, *_) = testing.compare(op, wrap(a), wrap(b)).failures
        assert verdict.where[0] == 1 and "finite" in verdict.detail


def test_mla_outputs_are_held_as_dot_products():
    """MLA's K / V rows are R-term dot products: in float32 a value that cancels toward 0
    keeps its terms' rounding, so its absolute bound is rtol times the largest value of its
    row (a drawn case of moe-check: 1.25e-6 apart at 0.0028, largest 4.4, both sides within
    2.1e-6 of the float64 product). The elementwise rule alone refuses that; the same error
    in a row of small values still fails (the bound is the row's, not the tensor's);
    TF32-sized errors (5e-4 relative) still fail, and a bf16 output keeps bf16's bounds."""
    want = torch.randn(3, 1, 130, generator=torch.Generator().manual_seed(1))
    want[1, 0, 0], want[1, 0, 7] = 4.4, 0.0028
    want[2] *= 1e-3
    got = want.clone()
    got[1, 0, 7] += 1.25e-6
    assert testing.compare("mla_decompress_kv", (got, got), (want, want)).passed
    assert not rules.close("k", got, want).passed, "the elementwise rule alone"
    small_row = want.clone()
    small_row[2, 0, 7] += 1.25e-6
    (verdict, *_) = testing.compare("mla_decompress_kv", (small_row, want),
                                    (want, want)).failures
    assert verdict.where == (2, 0, 7)
    tf32 = want * (1 + 5e-4)
    (verdict, *_) = testing.compare("mla_decompress_kv", (tf32, want), (want, want)).failures
    assert verdict.output == "k" and verdict.worst > 1
    bf16 = want.bfloat16()
    off = bf16.clone()
    off[1, 0, 7] = 0.0028 + 2e-4
    assert not testing.compare("mla_decompress_kv", (off, bf16), (bf16, bf16)).passed


def test_gemm_rows_of_a_few_values_are_held_to_the_noise_of_two_correct_sums():
    """Drawn cases where calc_diff weighs one value alone (N = 1). The float64 product
    0.2143550 lies just under a bf16 midpoint; one side rounds to 0.21386719, the other,
    whose float32 sum landed on the midpoint, to 0.21484375: calc_diff 1.04e-5. One step
    of the output dtype passes, row by row and for the whole output; two steps fail, so
    does the same difference in float32 (no rounding to excuse it), and so does a wrong
    row among rows that are right. FP8 products 88 * 448 - 448 * 88 cancel to 0: -1.8e-8
    against the reference's -3.0e-8 beside values of 1.35 (calc_diff 0.125) is float32
    noise on the output's scale and passes; the same values alone in a row of their own
    output, or 1e-4 off beside 1.35, fail."""
    bf16 = lambda rows: torch.tensor(rows, dtype=torch.bfloat16)
    want = bf16([[0.21484375], [-0.494140625]])
    assert rules.gemm("out", bf16([[0.2138671875], [-0.494140625]]), want).passed
    assert rules.gemm("out", bf16([[0.2138671875]]), bf16([[0.21484375]])).passed
    two_steps = rules.gemm("out", bf16([[0.212890625], [-0.494140625]]), want)
    assert not two_steps.passed and two_steps.where == (0,)
    assert not rules.gemm("out", torch.tensor([[0.2138671875]]),
                          torch.tensor([[0.21484375]])).passed
    many = torch.randn(6, 64, generator=torch.Generator().manual_seed(2)).bfloat16()
    wrong = many.clone()
    wrong[4] = many[4] * 1.5
    verdict = rules.gemm("out", wrong, many)
    assert not verdict.passed and verdict.where == (4,)
    cancelled = bf16([[-0.9375], [1.1640625], [-1.7578713595867157e-08], [-1.3515625]])
    reference = cancelled.clone()
    reference[2, 0] = -2.9802322387695312e-08
    assert rules.gemm("out", cancelled, reference).passed
    assert not rules.gemm("out", cancelled[2:3], reference[2:3]).passed
    off = cancelled.clone()
    off[2, 0] = 1e-4
    assert not rules.gemm("out", off, reference).passed


# A drawn row (E = 24 in 8 groups of 3, softmax, top2_sum, one group kept, top-1): groups 2
# and 5 both sum s(-2) + s(2) + 0.5 from other experts, equal in the reference's float32
# (0.642527342), an ulp apart in the cpu kernel's, which kept group 5 (expert 16)
NEAR_TIE_LOGITS = [0, -1, 1, 0, 1, -1, -2, 2, 1, -2, 0, -2, 0, 0, 0, -2, 2, 0, 2, 1, -1, 0, 1, 2]
NEAR_TIE_BIAS = [0.5, -0.5, -0.5, 0, -0.5, -0.5, 0.5, 0, -0.5, 0, 0.5, -0.5, 0, 0.5, 0, 0,
                 0.5, -0.5, -0.5, 0, 0, -0.5, -0.5, -0.5]


def test_grouped_topk_near_ties_of_other_inputs_go_either_way():
    """acceptable_rows: groups or experts of different inputs that the reference scores
    within NEAR_TIE may come in either order; candidates of the same inputs follow the
    lower-index rule exactly (every backend scores them alike), and a real difference
    fails."""
    from moe_kernels.testing.gating import acceptable_rows

    def allowed(logits, ids, top_k, ordered=True, **kw):
        rows = acceptable_rows(torch.tensor([ids]), torch.tensor([logits], dtype=torch.float32),
                               top_k, ordered=ordered, **kw)
        return bool(rows[0])

    drawn = dict(num_expert_group=8, topk_group=1, scoring_func="softmax",
                 correction_bias=torch.tensor(NEAR_TIE_BIAS), group_scoring="top2_sum")
    assert allowed(NEAR_TIE_LOGITS, [6], 1, **drawn)       # the reference's: group 2
    assert allowed(NEAR_TIE_LOGITS, [16], 1, **drawn)      # group 5, the near-tie's other side
    assert not allowed(NEAR_TIE_LOGITS, [7], 1, **drawn)   # group 2's second best
    assert not allowed(NEAR_TIE_LOGITS, [23], 1, **drawn)  # group 7: far below
    # equal inputs everywhere: groups 0 and 1 kept, experts 0, 1, 2 in that order
    zeros = dict(num_expert_group=4, topk_group=2)
    assert allowed([0.0] * 16, [0, 1, 2], 3, **zeros)
    assert not allowed([0.0] * 16, [0, 1, 4], 3, **zeros)
    assert not allowed([0.0] * 16, [1, 0, 2], 3, **zeros)
    assert allowed([0.0] * 16, [1, 0, 2], 3, ordered=False, **zeros)
    # sigmoid(20) and sigmoid(21) are both 1.0 in float32: other inputs, either order
    assert allowed([20.0, 21.0, 0.0], [1], 1) and allowed([20.0, 21.0, 0.0], [0], 1)
    assert not allowed([3.0, 3.0, 0.0], [1], 1)
    assert not allowed([3.0, 2.9, 0.0], [1], 1)
    # moe-check's rule takes the swap, with the weights the reference gives the chosen ids
    case = testing.Case("grouped_topk", "near_tie", dict(
        logits=torch.tensor([NEAR_TIE_LOGITS], dtype=torch.float32), top_k=1, **drawn,
        renormalize=False, routed_scaling_factor=1.0))
    want = moe_kernels.grouped_topk(**case.inputs, backend="reference")
    s16 = torch.softmax(case.inputs["logits"], -1)[:, 16:17]
    swapped = (s16, torch.tensor([[16]], dtype=torch.int32))
    assert testing.compare("grouped_topk", swapped, want, case).passed
    assert not testing.compare("grouped_topk", swapped, want).passed


def _fused_chain_in_float64(hidden, w13, w13_scales, w2, w2_scales, topk_weights, topk_ids):
    """fused_moe_fp8's pipeline with float64 GEMMs: the same rounding points as the
    reference chain (FP8 rows, GEMM1 to bf16, FP8 activations), other float noise, so its
    roundings near a midpoint may go the other way: a correct implementation."""
    from moe_kernels.reference import fp8 as ref_fp8

    def fp8_rows(x):
        return ref_fp8.dequantize_per_token_group(
            *ref_fp8.quantize_fp8_per_token_group(x.float())).double()

    inter, h = w13.shape[1] // 2, fp8_rows(hidden)
    out = torch.zeros_like(h)
    for e in range(w13.shape[0]):
        weight = torch.where(topk_ids.long() == e, topk_weights.double(), 0.0).sum(1)
        up = ref_fp8.dequantize_fp8_block(w13[e], w13_scales[e], dtype=torch.float32)
        gate_up = (h @ up.double().T).float().bfloat16().float()
        act = fp8_rows(torch.nn.functional.silu(gate_up[:, :inter]) * gate_up[:, inter:])
        down = ref_fp8.dequantize_fp8_block(w2[e], w2_scales[e], dtype=torch.float32)
        out += weight[:, None] * (act @ down.double().T)
    return out.float()


def test_fused_moe_rule_allows_the_other_rounding_of_near_midpoint_values():
    """A drawn case (E = 2, H = 128, I = 32, 21 tokens on expert 1, expert 0's w13 for
    both): a pipeline with float64 GEMMs rounds one GEMM1 output to the other bf16, which
    moves an FP8 activation 384 -> 416 and the output 2.07% from the reference chain, past
    the contract's 2e-2. check_out takes it (the other roundings of values within float32
    noise of a midpoint), not a 5% error, nor one expert's down-projection 10% off."""
    from moe_kernels.reference import fp8 as ref_fp8
    from moe_kernels.testing import fused_moe as fused_rule
    g = torch.Generator().manual_seed(419702508)
    E, H, inter, T = 2, 128, 32, 21
    w13, s13 = ref_fp8.quantize_fp8_block(torch.randn(E, 2 * inter, H, generator=g) / H ** 0.5)
    w2, s2 = ref_fp8.quantize_fp8_block(torch.randn(E, H, inter, generator=g) / inter ** 0.5)
    torch.randint(-1, E + 1, (T, 1), generator=g)       # the draw's routing, then replaced
    inputs = dict(hidden=torch.randn(T, H, generator=g),
                  w13=w13[:1].expand_as(w13).contiguous(), w13_scales=s13, w2=w2,
                  w2_scales=s2, topk_weights=torch.rand(T, 1, generator=g),
                  topk_ids=torch.full((T, 1), 1, dtype=torch.int32))
    want = moe_kernels.fused_moe_fp8(**inputs, backend="reference")
    other = _fused_chain_in_float64(**inputs)
    assert not rules.relative_error("out", other, want).passed
    assert fused_rule.check_out(other, want, inputs).passed
    assert not fused_rule.check_out(other * 1.05, want, inputs).passed
    off_scales = s2 * torch.tensor([1.0, 1.1])[:, None, None]
    off = _fused_chain_in_float64(**{**inputs, "w2_scales": off_scales})
    assert not fused_rule.check_out(off, want, inputs).passed
    assert testing.compare("fused_moe_fp8", other, want,
                           testing.Case("fused_moe_fp8", "drawn", inputs)).passed

# --- adapters: the projects' conventions, emulated from our reference ------------------------

def vllm_grouped_topk(hidden_states, gating_output, topk, renormalize, num_expert_group=0,
                      topk_group=0, scoring_func="softmax", routed_scaling_factor=1.0,
                      e_score_correction_bias=None):
    assert hidden_states.shape[0] == gating_output.shape[0]
    w, ids = moe_kernels.grouped_topk(
        gating_output, topk, num_expert_group=num_expert_group, topk_group=topk_group,
        scoring_func=scoring_func, correction_bias=e_score_correction_bias,
        renormalize=renormalize, routed_scaling_factor=routed_scaling_factor, backend=REF)
    return w.flip(-1), ids.flip(-1).long()      # another order within a row, int64


def sglang_biased_grouped_topk(hidden_states, gating_output, correction_bias, topk,
                               renormalize, num_expert_group, topk_group, *,
                               routed_scaling_factor=1.0):
    return moe_kernels.grouped_topk(gating_output, topk, num_expert_group=num_expert_group,
                                    topk_group=topk_group, correction_bias=correction_bias,
                                    renormalize=renormalize,
                                    routed_scaling_factor=routed_scaling_factor, backend=REF)


def sglang_grouped_topk(hidden_states, gating_output, topk, renormalize, num_expert_group,
                        topk_group, *, routed_scaling_factor=1.0):
    return moe_kernels.grouped_topk(gating_output, topk, num_expert_group=num_expert_group,
                                    topk_group=topk_group, scoring_func="softmax",
                                    renormalize=renormalize,
                                    routed_scaling_factor=routed_scaling_factor, backend=REF)


def vllm_align(topk_ids, block_size, num_experts):
    """vLLM's buffer sizes, and each expert's entries in reverse (atomics order)."""
    s, e, n = moe_kernels.moe_align_block_size(topk_ids, num_experts, block_size, backend=REF)
    size = topk_ids.numel() + num_experts * (block_size - 1)
    out = torch.full((size,), topk_ids.numel(), dtype=torch.int32)
    runs = s[:int(n)].view(-1, block_size) if int(n) else s[:0].view(0, block_size)
    out[:int(n)] = runs.flip(-1).reshape(-1) if block_size > 1 else runs.reshape(-1)
    ids = torch.full((-(-size // block_size),), 0, dtype=torch.int32)
    ids[:e.numel()] = e
    return out, ids, n


def vllm_align_op(topk_ids, num_experts, block_size, sorted_ids, expert_ids, post_pad):
    assert int(sorted_ids[0]) == topk_ids.numel(), "vLLM prefills with T*K"
    s, e, n = moe_kernels.moe_align_block_size(topk_ids, num_experts, block_size, backend=REF)
    sorted_ids[:s.numel()] = s
    expert_ids[:e.numel()] = e
    post_pad.copy_(n)


def sglang_align(topk_ids, num_experts, block_size, sorted_ids, expert_ids, post_pad, cumsum,
                 pad_sorted_token_ids):
    assert cumsum.shape == (num_experts + 1,) and pad_sorted_token_ids
    vllm_align_op(topk_ids, num_experts, block_size, sorted_ids, expert_ids, post_pad)


def deepgemm_contiguous(a, b, d, m_indices):
    (x, sx), (w, sw) = a, b
    # an empty tensor has no layout to speak of
    assert sx.stride(0) == 1 or sx.shape[1] <= 1 or sx.shape[0] <= 1, "DeepGEMM: column-major"
    d.copy_(moe_kernels.grouped_gemm_fp8(x, sx, w, sw, m_indices, out_dtype=d.dtype,
                                         backend=REF))


def deepgemm_masked(a, b, d, masked_m, expected_m):
    (x, sx), (w, sw) = a, b
    assert sx.stride(1) == 1 or sx.shape[2] <= 1 or sx.numel() == 0, \
        "DeepGEMM: column-major per group"
    assert isinstance(expected_m, int)
    d.copy_(moe_kernels.grouped_gemm_fp8_masked(x, sx, w, sw, masked_m, out_dtype=d.dtype,
                                                backend=REF))


def vllm_quant(x, group_size, eps=1e-10, dtype=None, column_major_scales=False,
               tma_aligned_scales=False, out_q=None, use_ue8m0=None):
    assert x.shape[-1] % group_size == 0 and x.stride(-1) == 1, "vLLM's asserts"
    assert dtype == torch.float8_e4m3fn and isinstance(use_ue8m0, bool), \
        "None would read the platform"
    return moe_kernels.quantize_fp8_per_token_group(
        x, group_size, eps=eps, scale_ue8m0=use_ue8m0,
        column_major_scales=column_major_scales, backend=REF)


def sglang_quant(x, group_size, eps=1e-10, column_major_scales=False, scale_tma_aligned=False,
                 scale_ue8m0=False, fuse_silu_and_mul=False, masked_m=None):
    assert x.shape[-1] % group_size == 0 and x.is_contiguous(), "SGLang's asserts"
    assert not scale_ue8m0 and masked_m is None, "another format / layout"
    if fuse_silu_and_mul:
        return moe_kernels.silu_and_mul_quant_fp8(x, group_size, backend=REF)
    return moe_kernels.quantize_fp8_per_token_group(
        x, group_size, eps=eps, column_major_scales=column_major_scales, backend=REF)


ADAPTED = [
    ("vllm_grouped_topk", vllm_grouped_topk),
    ("sglang_biased_grouped_topk", sglang_biased_grouped_topk),
    ("sglang_grouped_topk", sglang_grouped_topk),
    ("vllm_moe_align_block_size", vllm_align),
    ("vllm_moe_align_block_size_op", vllm_align_op),
    ("sglang_moe_align_block_size", sglang_align),
    ("deepgemm_contiguous", deepgemm_contiguous),
    ("deepgemm_masked", deepgemm_masked),
    ("vllm_per_token_group_quant_fp8", vllm_quant),
    ("sglang_per_token_group_quant_fp8", sglang_quant),
    ("sglang_silu_and_mul_quant_fp8", sglang_quant),
]


@pytest.mark.parametrize("name,impl", ADAPTED, ids=[a[0] for a in ADAPTED])
@pytest.mark.parametrize("preset", testing.PRESETS)
def test_adapters_pass_a_correct_implementation(name, impl, preset):
    op = adapters.ADAPTERS[name][0]
    if name == "sglang_grouped_topk" and preset == "deepseek_v3":
        # DeepSeek-V3 routes with a biased sigmoid: a softmax-only convention checks nothing,
        # which check() says instead of passing
        with pytest.raises(AssertionError, match="every case was skipped"):
            testing.check(op, impl, adapter=name, preset=preset)
        return
    report = testing.check(op, impl, adapter=name, preset=preset)
    assert report.passed and len(report.skipped) < len(report.results)


def test_adapter_skips_what_its_convention_cannot_express():
    """SGLang's biased top-k has no softmax: those cases are skipped, never passed."""
    report = testing.check("grouped_topk", sglang_biased_grouped_topk,
                           adapter="sglang_biased_grouped_topk")
    skipped = {r.case.name for r in report.skipped}
    assert "softmax_inf" in skipped and "bias_selects_only" not in skipped


def test_adapter_with_a_bug_is_caught():
    def vllm_reversed_ties(hidden_states, gating_output, topk, renormalize, num_expert_group=0,
                           topk_group=0, scoring_func="softmax", routed_scaling_factor=1.0,
                           e_score_correction_bias=None):
        return mutants.reversed_ties(gating_output, topk, num_expert_group=num_expert_group,
                                     topk_group=topk_group, scoring_func=scoring_func,
                                     correction_bias=e_score_correction_bias,
                                     renormalize=renormalize,
                                     routed_scaling_factor=routed_scaling_factor)
    with pytest.raises(AssertionError, match="case 'all_ties'"):
        testing.check("grouped_topk", vllm_reversed_ties, adapter="vllm_grouped_topk")


def test_quant_adapters_catch_a_bug_and_skip_what_they_cannot_express():
    """A vLLM-convention quantizer that ignores use_ue8m0 fails the case built for it;
    SGLang's convention skips the UE8M0 and partial-group cases rather than pass them."""
    def vllm_ignores_ue8m0(x, group_size, eps=1e-10, dtype=None, column_major_scales=False,
                           tma_aligned_scales=False, out_q=None, use_ue8m0=None):
        return vllm_quant(x, group_size, eps, dtype, column_major_scales, use_ue8m0=False)
    with pytest.raises(AssertionError, match="case 'ue8m0_scales'"):
        testing.check("quantize_fp8_per_token_group", vllm_ignores_ue8m0,
                      adapter="vllm_per_token_group_quant_fp8")
    report = testing.check("quantize_fp8_per_token_group", sglang_quant,
                           adapter="sglang_per_token_group_quant_fp8")
    assert {r.case.name for r in report.skipped} == {"ue8m0_scales", "partial_group"}


def test_adapter_for_another_op_is_refused():
    with pytest.raises(ValueError, match="adapter 'deepgemm_masked' is for"):
        testing.check("grouped_gemm_fp8", deepgemm_masked, adapter="deepgemm_masked")


# --- moe-check ------------------------------------------------------------------------------

def _moe_check(*args, tmp_path=None):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([TESTS_DIR, os.environ.get(
        "PYTHONPATH", "")]))
    return subprocess.run([sys.executable, "-m", "moe_kernels.testing.cli", *args],
                          capture_output=True, text=True, env=env, timeout=300)


def test_cli_passes_our_op_and_writes_json(tmp_path):
    path = tmp_path / "report.json"
    r = _moe_check("grouped_topk", "moe_kernels:grouped_topk", "--json", str(path))
    assert r.returncode == 0, r.stdout + r.stderr
    assert "all_ties" in r.stdout and "12 passed, 0 failed" in r.stdout
    report = json.loads(path.read_text())
    assert report["passed"] and len(report["cases"]) == 12


def test_cli_fails_a_mutant_naming_the_case():
    r = _moe_check("quantize_fp8_per_token_group", "mutants:ignores_strides")
    assert r.returncode == 1, r.stdout + r.stderr
    assert "row_strided_x" in r.stdout and "FAIL" in r.stdout


def test_cli_with_an_adapter():
    r = _moe_check("grouped_gemm_fp8", "test_testing:deepgemm_contiguous", "--adapter",
                   "deepgemm_contiguous", "--preset", "random")
    assert r.returncode == 0, r.stdout + r.stderr


def _cli_exit_code(*args):
    """moe-check's exit status, in this process (the usage errors need no fresh one)."""
    from moe_kernels.testing import cli
    try:
        return cli.main(list(args))
    except SystemExit as exc:   # argparse's own usage errors
        return exc.code


def test_cli_usage_errors():
    assert _cli_exit_code("grouped_topk", "no_colon") == 2
    assert _cli_exit_code("grouped_topk", "no_such_module_xyz:f") == 2
    assert _cli_exit_code("not_an_op", "moe_kernels:grouped_topk") == 2


def _doc_blocks():
    text = open(os.path.join(TESTS_DIR, "..", "docs", "testing.md")).read()
    return [b.split("\n", 1)[1] for b in text.split("```")[1::2] if b.startswith("python")]


def test_docs_worked_example_runs_as_written(tmp_path):
    """docs/testing.md: the example kernel fails exactly the cases the page explains, the
    printed report is what moe-check prints, and the Python snippet runs."""
    module, snippet = _doc_blocks()
    (tmp_path / "my_topk.py").write_text(module)
    # the repository too, for a tree that is built in place rather than installed
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(tmp_path), TESTS_DIR,
                                                       os.path.dirname(TESTS_DIR)]))
    r = subprocess.run([sys.executable, "-m", "moe_kernels.testing.cli", "grouped_topk",
                        "my_topk:grouped_topk"], capture_output=True, text=True, env=env,
                       timeout=300)
    assert r.returncode == 1
    page = open(os.path.join(TESTS_DIR, "..", "docs", "testing.md")).read()
    assert r.stdout.strip() in page, r.stdout
    subprocess.run([sys.executable, "-c", snippet], check=True, env=env, cwd=tmp_path,
                   timeout=300)


def test_align_comparison_needs_its_case():
    """moe_align_block_size's outputs do not determine block_size: compare() says so
    instead of guessing the block runs."""
    case = testing.cases("moe_align_block_size", "edge")[3]
    want = testing.run("moe_align_block_size", testing.reference("moe_align_block_size"), case)
    assert testing.compare("moe_align_block_size", want, want, case).passed
    with pytest.raises(ValueError, match="needs the case"):
        testing.compare("moe_align_block_size", want, want)
