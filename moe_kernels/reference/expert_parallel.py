"""Float32/int reference of the expert-parallel op: the logical -> physical slot map.

A logical expert e has logcnt[e] replicas, physical slots log2phy[e, :logcnt[e]]. Pair
(t, k) of a routed token goes to replica (t + token_offset) mod logcnt[e]: consecutive
tokens take the replicas in turn (so a replicated expert's load splits evenly), the same
way on every backend and run, from the ids alone (no host sync). Ids outside [0, E) map to
-1 (not routed).
"""

from __future__ import annotations

import torch


def map_to_slots(topk_ids: torch.Tensor, log2phy: torch.Tensor, logcnt: torch.Tensor,
                 token_offset: int) -> torch.Tensor:
    """topk_ids (T, K) int, log2phy (E, R) int (-1 padded), logcnt (E,) int >= 1 ->
    slots (T, K) int32."""
    T, K = topk_ids.shape
    E = log2phy.shape[0]
    ids = topk_ids.long()
    routed = (ids >= 0) & (ids < E)
    e = torch.where(routed, ids, 0)
    t = torch.arange(T, device=ids.device, dtype=torch.int64)[:, None] + token_offset
    replica = torch.remainder(t, logcnt.long()[e])
    slots = log2phy.long()[e, replica]
    return torch.where(routed, slots, -1).to(torch.int32)
