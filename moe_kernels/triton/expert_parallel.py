"""Triton kernel of the expert-parallel slot map (`map_to_slots`, see
reference/expert_parallel.py): one program maps BLOCK pairs; a gather from two small
tables per pair."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from moe_kernels._common import cdiv
from moe_kernels.triton.launch import cached_launch

BLOCK = 1024


@cached_launch
@triton.jit
def _map_to_slots_kernel(ids_ptr, log2phy_ptr, logcnt_ptr, out_ptr, P, K, E, R, token_offset,
                         BLOCK: tl.constexpr):
    p = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    inside = p < P
    e = tl.load(ids_ptr + p, mask=inside, other=-1).to(tl.int64)
    routed = inside & (e >= 0) & (e < E)
    e = tl.where(routed, e, 0)
    cnt = tl.load(logcnt_ptr + e, mask=routed, other=1).to(tl.int64)
    # counts outside [1, R] are refused before launch; clamped so that a direct torch.ops
    # call never divides by zero or reads past the table
    cnt = tl.minimum(tl.maximum(cnt, 1), R)
    t = p // K + token_offset
    replica = t % cnt
    slot = tl.load(log2phy_ptr + e * R + replica, mask=routed, other=-1)
    tl.store(out_ptr + p, tl.where(routed, slot, -1).to(tl.int32), mask=inside)


def map_to_slots(topk_ids: torch.Tensor, log2phy: torch.Tensor, logcnt: torch.Tensor,
                 token_offset: int) -> torch.Tensor:
    """topk_ids (T, K) int, log2phy (E, R) int, logcnt (E,) int -> slots (T, K) int32."""
    T, K = topk_ids.shape
    out = torch.empty((T, K), dtype=torch.int32, device=topk_ids.device)
    P = T * K
    if P == 0:
        return out
    ids, table, cnt = topk_ids.contiguous(), log2phy.contiguous(), logcnt.contiguous()
    grid = (cdiv(P, BLOCK),)
    _map_to_slots_kernel[grid](ids, table, cnt, out, P, K, table.shape[0], table.shape[1],
                               token_offset, BLOCK=BLOCK)
    return out
