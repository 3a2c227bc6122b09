"""Float32 PyTorch reference for `grouped_topk`: the oracle of every backend.

Selection uses one total order for groups and experts alike: larger value first, equal
values by lower index, NaN counted as -inf, -0.0 equal to +0.0. It is realised exactly by
`order_key`, a signed 64-bit key (value in the high half, inverted index in the low
half) that makes every key of a row distinct, so `topk` on keys has no ties to break and
the result does not depend on how `topk` orders equal values. The C++, CUDA and Triton
kernels compute the same key (csrc/common/order_key.h, triton/gating.py).

key = m * 2**32 - index, with m the order-preserving int32 image of the float: for equal
m a lower index gives a larger key, and since index < 2**32 a larger m always wins. (The
equivalent `m * 2**32 + (2**32 - 1 - index)` has a constant that Inductor's Triton codegen
puts in an int32 index expression and fails on.)
"""

from __future__ import annotations

import torch

# Smaller than every key `order_key` can return (m(-inf) = -2**31 + 2**23 - 1): marks
# excluded candidates.
EXCLUDED_KEY = torch.iinfo(torch.int64).min
_LOW_MASK = (1 << 32) - 1


def clean_logits(logits: torch.Tensor) -> torch.Tensor:
    """(T, E) any float -> float32 with NaN replaced by -inf."""
    x = logits.float()
    return torch.where(torch.isnan(x), float("-inf"), x)


def scores(x: torch.Tensor, scoring_func: str) -> torch.Tensor:
    """(T, E) float32 without NaN -> scores s in [0, 1].

    Softmax is taken in the limit sense, so it never yields NaN: in a row whose maximum is
    +-inf, the entries equal to it have a zero shifted logit, hence +inf entries share the
    mass equally and a row of all -inf is uniform. Such a row is saturated: a constant, no
    gradient. Elsewhere the shifted logit is x - m, whose gradient also holds for ties at
    the maximum (a constant 0 there would drop the tied entries' gradient: an all-equal
    row, as a zero-initialised router gives, would get none).
    """
    if scoring_func == "sigmoid":
        return torch.sigmoid(x)
    m = x.amax(dim=-1, keepdim=True)
    e = torch.exp(torch.where((x == m) & torch.isinf(m), 0.0, x - m))
    return e / e.sum(dim=-1, keepdim=True)


def order_key(values: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """float32 values (no NaN) and int64 indices (< 2**32) -> int64 keys: larger key =
    larger value, or equal value and lower index."""
    v = torch.where(values == 0, 0.0, values)  # -0.0 -> +0.0
    bits = v.view(torch.int32).to(torch.int64)
    signed = torch.where(bits >= 0, bits, bits ^ 0x7FFFFFFF)  # monotone in the float
    return signed * (1 << 32) - index


def index_of_key(key: torch.Tensor) -> torch.Tensor:
    return (-key) & _LOW_MASK


def group_scores(b: torch.Tensor, num_expert_group: int, group_scoring: str) -> torch.Tensor:
    """(T, E) selection scores -> (T, G) group scores (NaN from inf + -inf -> -inf)."""
    T, E = b.shape
    bg = b.view(T, num_expert_group, E // num_expert_group)
    if group_scoring == "top2_sum":
        g = bg.topk(2, dim=-1).values.sum(dim=-1)
    else:
        g = bg.amax(dim=-1)
    return torch.where(torch.isnan(g), float("-inf"), g)


def expert_mask_of_groups(b: torch.Tensor, num_expert_group: int, topk_group: int,
                          group_scoring: str) -> torch.Tensor:
    """(T, E) selection scores -> (T, E) bool, True for experts of the kept groups."""
    T, E = b.shape
    g = group_scores(b, num_expert_group, group_scoring)
    gkey = order_key(g, torch.arange(num_expert_group, device=b.device))
    kept = gkey.topk(topk_group, dim=-1).indices
    group_mask = torch.zeros(T, num_expert_group, dtype=torch.bool, device=b.device)
    group_mask.scatter_(1, kept, True)
    return group_mask.repeat_interleave(E // num_expert_group, dim=1)


def selection_scores(logits: torch.Tensor, scoring_func: str,
                     correction_bias: torch.Tensor | None):
    """logits (T, E) any float -> (s, b): the scores and the selection scores s + bias,
    (T, E) float32, a NaN b counted as -inf."""
    s = scores(clean_logits(logits), scoring_func)
    b = s if correction_bias is None else s + correction_bias.float()
    return s, torch.where(torch.isnan(b), float("-inf"), b)


def select_experts(logits: torch.Tensor, top_k: int, num_expert_group: int, topk_group: int,
                   scoring_func: str, correction_bias: torch.Tensor | None,
                   group_scoring: str):
    """-> (s (T, E) float32 scores, ids (T, top_k) int64 ordered by selection score)."""
    T, E = logits.shape
    s, b = selection_scores(logits, scoring_func, correction_bias)
    key = order_key(b, torch.arange(E, device=b.device))
    if topk_group < num_expert_group:
        mask = expert_mask_of_groups(b, num_expert_group, topk_group, group_scoring)
        key = torch.where(mask, key, EXCLUDED_KEY)
    ids = index_of_key(key.topk(top_k, dim=-1).values)
    return s, ids


def weights_of(s: torch.Tensor, ids: torch.Tensor, renormalize: bool,
               routed_scaling_factor: float) -> torch.Tensor:
    """(T, E) scores, (T, K) ids -> (T, K) float32 weights; a zero sum gives zeros."""
    w = s.gather(1, ids.long())
    if renormalize:
        den = w.sum(dim=-1, keepdim=True)
        w = torch.where(den > 0, w / torch.where(den > 0, den, 1.0), 0.0)
    return w * routed_scaling_factor


def append_shared_expert(w: torch.Tensor, ids: torch.Tensor, shared_expert_id: int):
    """(T, K) weights and ids -> (T, K + 1): a last column of id shared_expert_id and
    weight 1 (the shared expert, summed unscaled with the routed ones); as they are for
    shared_expert_id = -1."""
    if shared_expert_id < 0:
        return w, ids
    T = w.shape[0]
    return (torch.cat([w, w.new_ones(T, 1)], dim=1),
            torch.cat([ids, ids.new_full((T, 1), shared_expert_id)], dim=1))


def grouped_topk(logits: torch.Tensor, correction_bias: torch.Tensor | None, top_k: int,
                 num_expert_group: int, topk_group: int, scoring_func: str,
                 group_scoring: str, renormalize: bool, routed_scaling_factor: float,
                 shared_expert_id: int = -1):
    """logits (T, E) float -> (weights (T, W) float32, ids (T, W) int32), W = top_k, or
    top_k + 1 with a shared_expert_id >= 0 (append_shared_expert).

    Differentiable w.r.t. `logits` through the weights (plain autograd)."""
    s, ids = select_experts(logits, top_k, num_expert_group, topk_group, scoring_func,
                            correction_bias, group_scoring)
    w = weights_of(s, ids, renormalize, routed_scaling_factor)
    return append_shared_expert(w, ids.to(torch.int32), shared_expert_id)
