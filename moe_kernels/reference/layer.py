"""Float32 reference of HF transformers' DeepseekV3MoE: the oracle of
moe_kernels.DeepseekV3MoE, written with plain torch only (its own router, no moe_kernels
op), so a test against it checks the layer end to end.

    logits  = hidden.float() @ gate.weight.float().T                  (T, E)
    s       = sigmoid(logits); b = s + e_score_correction_bias         (selection only)
    groups  = n_group groups of E / n_group experts, scored by the sum of their top-2 b;
              keep topk_group groups; pick top_k experts among them by b
    w       = s[ids]; / sum(w) if norm_topk_prob; * routed_scaling_factor
    out     = sum_k w_k * down_k(silu(gate_k(h)) * up_k(h)) + shared(h)

Weights are given as float32 tensors (dequantize FP8 ones first): w13 (E, 2I, H) with the
gate rows first, w2 (E, H, I), shared_w13 (2 I_s, H), shared_w2 (H, I_s).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from moe_kernels._common import without_autocast


@without_autocast
def route(hidden, gate_weight, bias, top_k, n_group, topk_group, norm_topk_prob,
          routed_scaling_factor):
    """HF DeepseekV3TopkRouter in float32 -> weights (T, top_k) float32, ids (T, top_k)."""
    logits = hidden.float() @ gate_weight.float().T
    s = logits.sigmoid()
    b = s + bias.float()
    T, E = b.shape
    if topk_group < n_group:
        # HF scores groups even when every group is kept, where the mask changes nothing
        # and a group of one expert has no top-2 (grouped_topk's rule)
        group_scores = b.view(T, n_group, E // n_group).topk(2, dim=-1).values.sum(-1)
        kept = group_scores.topk(topk_group, dim=-1, sorted=False).indices
        mask = torch.zeros_like(group_scores).scatter_(1, kept, 1.0)
        mask = mask[:, :, None].expand(T, n_group, E // n_group).reshape(T, E)
        b = b.masked_fill(mask == 0, float("-inf"))
    ids = b.topk(top_k, dim=-1, sorted=False).indices
    w = s.gather(1, ids)
    if norm_topk_prob:
        w = w / (w.sum(-1, keepdim=True) + 1e-20)
    return w * routed_scaling_factor, ids


@without_autocast
def mlp(x, w13, w2):
    """down(silu(gate(x)) * up(x)) in float32; w13 (2I, H) gate rows first, w2 (H, I)."""
    gate, up = (x.float() @ w13.float().T).chunk(2, dim=-1)
    return (F.silu(gate) * up) @ w2.float().T


@without_autocast
def deepseek_v3_moe(hidden, gate_weight, bias, w13, w2, shared_w13, shared_w2, *, top_k,
                    n_group, topk_group, norm_topk_prob, routed_scaling_factor):
    """hidden (..., H) -> (..., H) float32."""
    shape = hidden.shape
    x = hidden.reshape(-1, shape[-1]).float()
    w, ids = route(x, gate_weight, bias, top_k, n_group, topk_group, norm_topk_prob,
                   routed_scaling_factor)
    out = torch.zeros_like(x)
    for e in ids.unique().tolist():
        rows, slot = (ids == e).nonzero(as_tuple=True)
        out.index_add_(0, rows, mlp(x[rows], w13[e], w2[e]) * w[rows, slot][:, None])
    if shared_w13 is not None:
        out = out + mlp(x, shared_w13, shared_w2)
    return out.view(shape)
