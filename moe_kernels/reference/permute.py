"""Float32 PyTorch reference for token permutation: the oracle.

Flat pair index p = t * K + k. A pair is routed when 0 <= topk_ids[t, k] < E; others
(-1: not routed; >= E: another rank's expert) are skipped everywhere. Experts' segments
follow each other, expert 0 first, each padded to a multiple of `align`; inside an expert,
pairs keep ascending p (stable, deterministic). No step depends on tensor values through
the host: shapes are static (R = permuted_rows(T*K, E, align)).
"""

from __future__ import annotations

import torch

from moe_kernels._common import FP8, cdiv


def permuted_rows(num_pairs: int, num_experts: int, align: int) -> int:
    """Rows R of the padded layout: every pair, plus align-1 padding rows for each expert
    that can be non-empty, of which there are at most min(E, P): a bound as static as
    P + E*(align-1) (no host sync) and far smaller at decode (one token, E=256, top-8,
    align=128: 1,024 rows instead of 32,520)."""
    return num_pairs + min(num_experts, num_pairs) * (align - 1)


def permute_index(topk_ids: torch.Tensor, num_experts: int, align: int):
    """topk_ids (T, K) int -> (expert_offsets (E+1,) int64, tokens_per_expert (E,) int32,
    m_indices (R,) int32, row_of_pair (T, K) int32, pair_of_row (R,) int32)."""
    T, K = topk_ids.shape
    P, E = T * K, num_experts
    R = permuted_rows(P, E, align)
    dev = topk_ids.device
    ids = topk_ids.reshape(-1).long()
    routed = (ids >= 0) & (ids < E)
    expert = torch.where(routed, ids, E)          # skipped pairs sort after every expert
    counts = torch.zeros(E + 1, dtype=torch.int64, device=dev)
    counts.scatter_add_(0, expert, torch.ones_like(expert))
    counts = counts[:E]
    padded = (counts + align - 1) // align * align
    offsets = torch.cat([counts.new_zeros(1), padded.cumsum(0)])
    first = torch.cat([counts.new_zeros(1), counts.cumsum(0)])  # unpadded starts
    pair = torch.arange(P, device=dev)
    order = torch.argsort(expert * max(P, 1) + pair)             # keys are distinct
    sorted_expert = expert[order]
    ok = sorted_expert < E
    e_safe = torch.where(ok, sorted_expert, 0)
    row_sorted = offsets[e_safe] + (torch.arange(P, device=dev) - first[e_safe])
    row_sorted = torch.where(ok, row_sorted, -1)
    row_of_pair = torch.full((P,), -1, dtype=torch.int64, device=dev)
    row_of_pair.scatter_(0, order, row_sorted)
    # Skipped pairs write into a spare slot R that is cut off.
    target = torch.where(routed, row_of_pair, R)
    pair_of_row = torch.full((R + 1,), -1, dtype=torch.int64, device=dev)
    pair_of_row.scatter_(0, target, pair)
    m_indices = torch.full((R + 1,), -1, dtype=torch.int64, device=dev)
    m_indices.scatter_(0, target, ids)
    return (offsets, counts.int(), m_indices[:R].int(), row_of_pair.view(T, K).int(),
            pair_of_row[:R].int())


def gather_rows(x: torch.Tensor, pair_of_row: torch.Tensor, top_k: int) -> torch.Tensor:
    """x (T, D) -> (R, D): row r is x[pair_of_row[r] // top_k], zero where pair_of_row < 0."""
    if x.dtype == FP8:
        # a copy: move the bits (Inductor cannot promote float8 in the where below)
        return gather_rows(x.view(torch.uint8), pair_of_row, top_k).view(x.dtype)
    src = pair_of_row.long()
    if x.shape[0] == 0 or top_k == 0:  # only padding rows (static shapes: no sync)
        zeros = x.new_zeros((src.shape[0], x.shape[1]))
        # + an empty sum (0, exactly): the zeros stay in x's graph, as the kernels' are
        return zeros + x.narrow(0, 0, 0).sum(0) if x.requires_grad else zeros
    rows = x.index_select(0, torch.clamp(src, min=0) // top_k)
    return torch.where((src >= 0)[:, None], rows, torch.zeros((), dtype=x.dtype, device=x.device))


def permute(hidden: torch.Tensor, topk_ids: torch.Tensor, num_experts: int, align: int,
            scales: torch.Tensor | None):
    """-> (permuted (R, H), permuted scales or None, the index tensors of permute_index)."""
    index = permute_index(topk_ids, num_experts, align)
    pair_of_row = index[-1]
    K = topk_ids.shape[1]
    out = gather_rows(hidden, pair_of_row, K)
    out_scales = gather_rows(scales, pair_of_row, K) if scales is not None else None
    return out, out_scales, index


def unpermute(expert_out: torch.Tensor, row_of_pair: torch.Tensor,
              topk_weights: torch.Tensor) -> torch.Tensor:
    """out[t] = sum_k w[t,k] * expert_out[row_of_pair[t,k]] over routed pairs, in float32
    (float64 for float64 rows, which only permute's backward passes), returned in
    expert_out's dtype. A skipped pair (a row outside [0, R): -1, or past expert_out's R
    rows) adds nothing, even if the row it would read holds NaN."""
    # contiguous index and weights: the sum's order follows the (T, K, H) term's layout, so
    # that a column-major row_of_pair would change the result's last bits
    rows = row_of_pair.long().contiguous()
    valid = (rows >= 0) & (rows < expert_out.shape[0])
    dtype = torch.promote_types(expert_out.dtype, torch.float32)
    src = expert_out.to(dtype)
    if src.shape[0] == 0:    # no rows: every pair is skipped, row 0 only a placeholder
        src = src.new_zeros(1, src.shape[1])
    gathered = src[torch.where(valid, rows, 0)]                        # (T, K, H)
    weights = topk_weights.to(dtype).contiguous()[..., None]
    term = torch.where(valid[..., None], gathered * weights, 0.0)
    return term.sum(dim=1).to(expert_out.dtype)


def masked_index(topk_ids: torch.Tensor, index, num_experts: int, max_tokens: int):
    """The masked (E, M) layout from permute_index's align=1 `index` (any backend's), with
    tensor ops only (no host sync) -> (masked_m (E,) int32, tokens_per_expert (E,) int32,
    row_of_pair (T, K) int32 with rows e * M + slot, -1 for skipped pairs and pairs beyond
    the capacity M, pair_of_row (E*M,) int32 with -1 for empty rows)."""
    offsets, counts, _, row_of_pair, _ = index
    E, M = num_experts, max_tokens
    ids = topk_ids.long()
    routed = row_of_pair >= 0
    e_safe = torch.where(routed, ids, 0)
    slot = row_of_pair.long() - offsets[e_safe]
    kept = routed & (slot < M)
    rows = torch.where(kept, e_safe * M + slot, -1)
    target = torch.where(kept, rows, E * M).reshape(-1)      # dropped pairs: spare slot
    pair_of_row = torch.full((E * M + 1,), -1, dtype=torch.int64, device=ids.device)
    pair_of_row.scatter_(0, target, torch.arange(topk_ids.numel(), device=ids.device))
    return (torch.clamp(counts, max=M).int(), counts, rows.int(), pair_of_row[:E * M].int())


def valid_rows(masked_m: torch.Tensor, M: int) -> torch.Tensor:
    """masked_m (E,) int -> (E, M) bool: row i of group e of the masked layout is below
    masked_m[e] (no host read of masked_m)."""
    return torch.arange(M, device=masked_m.device)[None, :] < masked_m.long()[:, None]


def permute_masked(hidden: torch.Tensor, topk_ids: torch.Tensor, num_experts: int,
                   max_tokens: int, scales: torch.Tensor | None):
    """-> (permuted (E, M, H), permuted scales (E, M, S) or None, masked_index's tuple)."""
    index = masked_index(topk_ids, permute_index(topk_ids, num_experts, 1), num_experts,
                         max_tokens)
    K = topk_ids.shape[1]
    pair_of_row = index[-1]
    gather = lambda x: gather_rows(x, pair_of_row, K).view(num_experts, max_tokens, x.shape[1])
    return gather(hidden), (gather(scales) if scales is not None else None), index


def moe_align_block_size(topk_ids: torch.Tensor, num_experts: int, block_size: int):
    """The vLLM fused_moe layout: sorted_token_ids (permuted_rows(T*K, E, bs),) int32
    padded with T*K, expert_ids (ceil(len / bs),) int32 (-1 for unused blocks), num_tokens_post_padded (1,)."""
    offsets, _, m_indices, _, pair_of_row = permute_index(topk_ids, num_experts, block_size)
    P = topk_ids.numel()
    sorted_ids = torch.where(pair_of_row >= 0, pair_of_row, P).int()
    n_blocks = cdiv(sorted_ids.numel(), block_size)
    block_start = torch.arange(n_blocks, device=topk_ids.device) * block_size
    # expert of a block: the e with offsets[e] <= start < offsets[e+1]; -1 past the end
    e = torch.searchsorted(offsets[1:], block_start, right=True)
    expert_ids = torch.where(block_start < offsets[-1], e, -1).int()
    return sorted_ids, expert_ids, offsets[-1:].int()
