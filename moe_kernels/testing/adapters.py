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
  d; activation scales column-major, as DeepGEMM reads them.
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


ADAPTERS = {
    "vllm_grouped_topk": ("grouped_topk", vllm_grouped_topk),
    "sglang_biased_grouped_topk": ("grouped_topk", sglang_biased_grouped_topk),
    "sglang_grouped_topk": ("grouped_topk", sglang_grouped_topk),
    "vllm_moe_align_block_size": ("moe_align_block_size", vllm_moe_align_block_size),
    "vllm_moe_align_block_size_op": ("moe_align_block_size", vllm_moe_align_block_size_op),
    "sglang_moe_align_block_size": ("moe_align_block_size", sglang_moe_align_block_size),
    "deepgemm_contiguous": ("grouped_gemm_fp8", deepgemm_contiguous),
    "deepgemm_masked": ("grouped_gemm_fp8_masked", deepgemm_masked),
}


def adapt(name: str, impl, op: str | None = None):
    """impl in adapter `name`'s convention -> a function of ours for its op."""
    if name not in ADAPTERS:
        raise ValueError(f"unknown adapter {name!r}; known: {', '.join(sorted(ADAPTERS))}")
    adapter_op, make = ADAPTERS[name]
    if op is not None and op != adapter_op:
        raise ValueError(f"adapter {name!r} is for {adapter_op}, not {op}")
    return make(impl)
