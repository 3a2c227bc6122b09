"""Deliberately wrong implementations, each with a classic bug of the kind the checker
(moe_kernels.testing) exists to catch; tests/test_testing.py asserts each is caught and
the report names the case built for that failure mode. Also importable by `moe-check`
(module `mutants`, with tests/ on the path)."""

from __future__ import annotations

import torch

import moe_kernels

REF = "reference"


def bias_in_weights(logits, top_k, **kw):
    """The selection score s + bias used as the weight (the bias must only select)."""
    w, ids = moe_kernels.grouped_topk(logits, top_k, backend=REF, **kw)
    bias = kw.get("correction_bias")
    if bias is None:
        return w, ids
    b = torch.sigmoid(logits.float()) + bias.float()
    w = b.gather(1, ids.long())
    if kw.get("renormalize", True):
        w = w / w.sum(-1, keepdim=True)
    return w * kw.get("routed_scaling_factor", 1.0), ids


def reversed_ties(logits, top_k, **kw):
    """Equal scores resolved to the higher expert index (experts flipped, then back)."""
    bias = kw.pop("correction_bias", None)
    E = logits.shape[1]
    w, ids = moe_kernels.grouped_topk(logits.flip(-1), top_k, backend=REF,
                                      correction_bias=None if bias is None else bias.flip(-1),
                                      **kw)
    return w, torch.where(ids >= 0, E - 1 - ids, ids)


def dropped_weight_scale(a, a_scales, b, b_scales, m_indices, *, out_dtype=None):
    """The weights' 128x128 block scales ignored."""
    return moe_kernels.grouped_gemm_fp8(a, a_scales, b, torch.ones_like(b_scales), m_indices,
                                        out_dtype=out_dtype, backend=REF)


def missing_last_tile(a, a_scales, b, b_scales, m_indices, *, out_dtype=None):
    """Tiles of 64 rows counted as R // 64 instead of ceil(R / 64): a partial last tile is
    never computed."""
    out = moe_kernels.grouped_gemm_fp8(a, a_scales, b, b_scales, m_indices,
                                       out_dtype=out_dtype, backend=REF)
    out[out.shape[0] // 64 * 64:] = 0
    return out


def ignores_strides(x, group_size=128, **kw):
    """Reads x as if it were contiguous (a raw pointer walk over rows of K elements)."""
    flat = torch.as_strided(x, x.shape, (x.shape[1], 1)) if x.numel() else x
    return moe_kernels.quantize_fp8_per_token_group(flat, group_size, backend=REF, **kw)


def nan_from_padding(expert_out, layout, topk_weights):
    """Sums every row into its token with weight 0 for the rows no pair reads: 0 * NaN
    leaks a padding row's NaN into token 0."""
    T, K = topk_weights.shape
    rows = expert_out.reshape(-1, expert_out.shape[-1]).float()
    pair = layout.pair_of_row.reshape(-1).long()
    token = torch.where(pair >= 0, pair // K, 0)
    w = torch.where(pair >= 0, topk_weights.reshape(-1).float()[pair.clamp(min=0)], 0.0)
    # a row that two pairs read (none here) would need both; the bug is the padding's 0 * NaN
    out = torch.zeros(T, rows.shape[1], device=rows.device)
    if T:
        out.index_add_(0, token, w[:, None] * rows)
    return out.to(expert_out.dtype)
