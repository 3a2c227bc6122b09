"""Adapters: other projects' argument and return conventions mapped onto ours, so that
their kernels are checked as they are, without wrappers and without importing those
projects. Each adapter turns `impl` (their convention) into a function of ours
(docs/api.md). `ADAPTERS[name] = (op, make)`; `adapt(name, impl, op)` applies one.

Conventions (the projects' public signatures):
- vLLM `grouped_topk(hidden_states, gating_output, topk, renormalize, num_expert_group,
  topk_group, scoring_func, routed_scaling_factor, e_score_correction_bias)` -> (weights,
  ids);
- SGLang `biased_grouped_topk(hidden_states, gating_output, correction_bias, topk,
  renormalize, num_expert_group, topk_group, ...)` and `grouped_topk(hidden_states,
  gating_output, topk, renormalize, num_expert_group, topk_group, ...)` (softmax);
- vLLM `moe_align_block_size(topk_ids, block_size, num_experts)` -> (sorted_ids,
  expert_ids, num_tokens_post_pad), and its custom op `moe_align_block_size(topk_ids,
  num_experts, block_size, sorted_ids, expert_ids, num_tokens_post_pad)` writing into
  buffers (sorted_ids prefilled with T*K);
- SGLang `moe_align_block_size(topk_ids, num_experts, block_size, sorted_token_ids,
  experts_ids, num_tokens_post_pad, cumsum_buffer, pad_sorted_token_ids)`;
- DeepGEMM `m_grouped_fp8_gemm_nt_contiguous((a, a_scales), (b, b_scales), d, m_indices)`
  and `m_grouped_fp8_gemm_nt_masked((a, a_scales), (b, b_scales), d, masked_m,
  expected_m)` (also their older names `m_grouped_gemm_fp8_fp8_bf16_nt_*`), writing into
  d; activation scales column-major, as DeepGEMM reads them;
- vLLM `per_token_group_quant_fp8(x, group_size, eps=, dtype=, column_major_scales=,
  tma_aligned_scales=, out_q=, use_ue8m0=)` -> (q, s), called by keyword (releases
  differ in its later parameters);
- SGLang `sglang_per_token_group_quant_fp8(x, group_size, eps=, column_major_scales=,
  scale_tma_aligned=, scale_ue8m0=, fuse_silu_and_mul=, masked_m=)` -> (q, s), for the
  quantizer and, with `fuse_silu_and_mul=True`, for silu_and_mul_quant_fp8.
Integer outputs are cast to int32 and weights to float32 (both projects' dtypes already).
"""

from __future__ import annotations

import torch

from moe_kernels._common import cdiv
from moe_kernels.testing.core import Unsupported


def _unsupported(adapter: str, what: str):
    raise Unsupported(f"adapter {adapter}: {what} has no equivalent in this convention")


def _topk_result(result):
    weights, ids = result[0], result[1]
    return weights.float(), ids.to(torch.int32)


def vllm_grouped_topk(impl):
    def ours(logits, top_k, *, num_expert_group=1, topk_group=1, scoring_func="sigmoid",
             correction_bias=None, group_scoring=None, renormalize=True,
             routed_scaling_factor=1.0):
        if group_scoring not in (None, "top2_sum" if correction_bias is not None else "max"):
            _unsupported("vllm_grouped_topk", f"group_scoring={group_scoring!r}")
        hidden = logits.new_empty(logits.shape[0], 0)
        return _topk_result(impl(hidden, logits, top_k, renormalize, num_expert_group,
                                 topk_group, scoring_func, routed_scaling_factor,
                                 correction_bias))
    return ours


def sglang_biased_grouped_topk(impl):
    """SGLang's biased_grouped_topk: sigmoid scores, a correction bias, top-2-sum groups;
    the cases of another scoring are skipped."""
    def ours(logits, top_k, *, num_expert_group=1, topk_group=1, scoring_func="sigmoid",
             correction_bias=None, group_scoring=None, renormalize=True,
             routed_scaling_factor=1.0):
        if correction_bias is None or scoring_func != "sigmoid" or \
                group_scoring not in (None, "top2_sum"):
            _unsupported("sglang_biased_grouped_topk", f"scoring_func={scoring_func!r} with"
                         f"{'' if correction_bias is not None else 'out'} a bias, "
                         f"group_scoring={group_scoring!r}")
        hidden = logits.new_empty(logits.shape[0], 0)
        return _topk_result(impl(hidden, logits, correction_bias, top_k, renormalize,
                                 num_expert_group, topk_group,
                                 routed_scaling_factor=routed_scaling_factor))
    return ours


def sglang_grouped_topk(impl):
    """SGLang's grouped_topk: softmax scores, no bias, groups scored by their max; the
    cases of another scoring are skipped."""
    def ours(logits, top_k, *, num_expert_group=1, topk_group=1, scoring_func="sigmoid",
             correction_bias=None, group_scoring=None, renormalize=True,
             routed_scaling_factor=1.0):
        if correction_bias is not None or scoring_func != "softmax" or \
                group_scoring not in (None, "max"):
            _unsupported("sglang_grouped_topk", f"scoring_func={scoring_func!r} with"
                         f"{'' if correction_bias is not None else 'out'} a bias, "
                         f"group_scoring={group_scoring!r}")
        hidden = logits.new_empty(logits.shape[0], 0)
        return _topk_result(impl(hidden, logits, top_k, renormalize, num_expert_group,
                                 topk_group, routed_scaling_factor=routed_scaling_factor))
    return ours


def _align_buffers(topk_ids, num_experts, block_size):
    """vLLM's and SGLang's buffer sizes: T*K + E*(block - 1) sorted ids prefilled with T*K,
    one expert id per block, one count."""
    n = topk_ids.numel() + num_experts * (block_size - 1)
    dev = topk_ids.device
    sorted_ids = torch.full((n,), topk_ids.numel(), dtype=torch.int32, device=dev)
    expert_ids = torch.full((cdiv(n, block_size),), -1, dtype=torch.int32, device=dev)
    return sorted_ids, expert_ids, torch.zeros(1, dtype=torch.int32, device=dev)


def vllm_moe_align_block_size(impl):
    """vLLM's Python wrapper: (topk_ids, block_size, num_experts) -> three tensors."""
    def ours(topk_ids, num_experts, block_size):
        s, e, n = impl(topk_ids, block_size, num_experts)[:3]
        return s.to(torch.int32), e.to(torch.int32), n.to(torch.int32).reshape(1)
    return ours


def vllm_moe_align_block_size_op(impl):
    """vLLM's custom op, writing into preallocated buffers."""
    def ours(topk_ids, num_experts, block_size):
        s, e, n = _align_buffers(topk_ids, num_experts, block_size)
        impl(topk_ids, num_experts, block_size, s, e, n)
        return s, e, n
    return ours


def sglang_moe_align_block_size(impl):
    def ours(topk_ids, num_experts, block_size):
        s, e, n = _align_buffers(topk_ids, num_experts, block_size)
        cumsum = torch.zeros(num_experts + 1, dtype=torch.int32, device=topk_ids.device)
        impl(topk_ids, num_experts, block_size, s, e, n, cumsum, True)
        return s, e, n
    return ours


def _out_dtype(out_dtype):
    return torch.bfloat16 if out_dtype is None else out_dtype


def deepgemm_contiguous(impl):
    def ours(a, a_scales, b, b_scales, m_indices, *, out_dtype=None):
        d = torch.zeros(a.shape[0], b.shape[1], dtype=_out_dtype(out_dtype), device=a.device)
        impl((a, a_scales.t().contiguous().t()), (b, b_scales), d, m_indices.to(torch.int32))
        return d
    return ours


def deepgemm_masked(impl):
    def ours(a, a_scales, b, b_scales, masked_m, *, out_dtype=None):
        E, M, _ = a.shape
        d = torch.zeros(E, M, b.shape[1], dtype=_out_dtype(out_dtype), device=a.device)
        col_major = a_scales.transpose(1, 2).contiguous().transpose(1, 2)
        # expected_m is a tuning hint (rows per expert); M never needs the host
        impl((a, col_major), (b, b_scales), d, masked_m.to(torch.int32), M)
        return d
    return ours


def _whole_groups(adapter: str, width: int, group_size: int):
    """vLLM and SGLang assert K % group_size == 0: a partial last group is ours alone."""
    if width % group_size:
        _unsupported(adapter, f"a partial last group (K = {width}, group_size = {group_size})")


def vllm_per_token_group_quant_fp8(impl):
    """vLLM's per_token_group_quant_fp8: dtype and use_ue8m0 given explicitly (their None
    reads the platform and its DeepGEMM setting); rows may be strided, as there."""
    def ours(x, group_size=128, *, eps=1e-10, scale_ue8m0=False, column_major_scales=False):
        _whole_groups("vllm_per_token_group_quant_fp8", x.shape[-1], group_size)
        q, s = impl(x, group_size, eps=eps, dtype=torch.float8_e4m3fn,
                    column_major_scales=column_major_scales, use_ue8m0=scale_ue8m0)
        return q, s
    return ours


def sglang_per_token_group_quant_fp8(impl):
    """SGLang's sglang_per_token_group_quant_fp8 on a contiguous x (it asserts one). Its
    UE8M0 scales come packed four to an int32 for DeepGEMM, another format: those cases are
    skipped."""
    def ours(x, group_size=128, *, eps=1e-10, scale_ue8m0=False, column_major_scales=False):
        if scale_ue8m0:
            _unsupported("sglang_per_token_group_quant_fp8", "scale_ue8m0=True (int32-packed "
                         "UE8M0 scales)")
        _whole_groups("sglang_per_token_group_quant_fp8", x.shape[-1], group_size)
        q, s = impl(x.contiguous(), group_size, eps=eps,
                    column_major_scales=column_major_scales)
        return q, s
    return ours


def sglang_silu_and_mul_quant_fp8(impl):
    """SGLang's sglang_per_token_group_quant_fp8 with fuse_silu_and_mul=True (x = [gate |
    up], as ours). The masked layout is skipped: ours zero-fills the rows past masked_m,
    which that convention leaves unwritten."""
    def ours(x, group_size=128, *, masked_m=None):
        if masked_m is not None:
            _unsupported("sglang_silu_and_mul_quant_fp8", "masked_m (rows past it unwritten)")
        _whole_groups("sglang_silu_and_mul_quant_fp8", x.shape[-1] // 2, group_size)
        q, s = impl(x.contiguous(), group_size, fuse_silu_and_mul=True)
        return q, s
    return ours


ADAPTERS = {
    "vllm_grouped_topk": ("grouped_topk", vllm_grouped_topk),
    "sglang_biased_grouped_topk": ("grouped_topk", sglang_biased_grouped_topk),
    "sglang_grouped_topk": ("grouped_topk", sglang_grouped_topk),
    "vllm_moe_align_block_size": ("moe_align_block_size", vllm_moe_align_block_size),
    "vllm_moe_align_block_size_op": ("moe_align_block_size", vllm_moe_align_block_size_op),
    "sglang_moe_align_block_size": ("moe_align_block_size", sglang_moe_align_block_size),
    "deepgemm_contiguous": ("grouped_gemm_fp8", deepgemm_contiguous),
    "deepgemm_masked": ("grouped_gemm_fp8_masked", deepgemm_masked),
    "vllm_per_token_group_quant_fp8": ("quantize_fp8_per_token_group",
                                       vllm_per_token_group_quant_fp8),
    "sglang_per_token_group_quant_fp8": ("quantize_fp8_per_token_group",
                                         sglang_per_token_group_quant_fp8),
    "sglang_silu_and_mul_quant_fp8": ("silu_and_mul_quant_fp8", sglang_silu_and_mul_quant_fp8),
}


def adapt(name: str, impl, op: str | None = None):
    """impl in adapter `name`'s convention -> a function of ours for its op."""
    if name not in ADAPTERS:
        raise ValueError(f"unknown adapter {name!r}; known: {', '.join(sorted(ADAPTERS))}")
    adapter_op, make = ADAPTERS[name]
    if op is not None and op != adapter_op:
        raise ValueError(f"adapter {name!r} is for {adapter_op}, not {op}")
    return make(impl)
