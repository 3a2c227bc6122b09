"""Expert-parallel load balancing (EPLB): replicate heavy experts and pack the replicas onto
GPUs, with the interface and output shapes of DeepSeek's open-source `eplb` module,
written from its published description and vectorised over layers in torch.

Policy (docs/expert_parallel.md):
- hierarchical, when num_nodes divides num_groups: pack the expert groups onto nodes so
  that node loads are even (groups stay whole on one node: group-limited routing then
  crosses few nodes), replicate experts within each node, pack each node's replicas onto
  its GPUs;
- global otherwise: the same steps with one group and one node.

Each step is greedy: packing takes items heaviest first and puts each in the lightest pack
that still has room (every pack gets the same number of items); replication gives each
extra replica to the expert with the largest load per replica. Ties go to the lower index,
so the result is a function of the loads alone.
"""

from __future__ import annotations

import torch

from moe_kernels._validate import check_tensor

__all__ = ["rebalance_experts", "gpu_loads", "balanced_packing", "replicate_experts"]


def balanced_packing(weight: torch.Tensor, num_packs: int) -> tuple[torch.Tensor, torch.Tensor]:
    """weight (L, n) float -> pack (L, n) int64 (the pack of each item), rank (L, n) int64
    (its position in the pack); every pack holds n / num_packs items."""
    L, n = weight.shape
    cap = n // num_packs
    order = torch.argsort(weight, dim=1, descending=True, stable=True)
    i64 = dict(dtype=torch.int64, device=weight.device)
    pack = torch.empty((L, n), **i64)
    rank = torch.empty((L, n), **i64)
    load = torch.zeros((L, num_packs), dtype=weight.dtype, device=weight.device)
    count = torch.zeros((L, num_packs), **i64)
    rows = torch.arange(L, **i64)
    for i in range(n):
        item = order[:, i]
        p = torch.where(count < cap, load, torch.inf).argmin(dim=1)   # first lightest
        pack[rows, item] = p
        rank[rows, item] = count[rows, p]
        load[rows, p] += weight[rows, item]
        count[rows, p] += 1
    return pack, rank


def replicate_experts(weight: torch.Tensor, num_phy: int):
    """weight (L, n) float -> phy2log (L, num_phy), replica rank (L, num_phy), logcnt (L, n),
    all int64: one replica per expert, each extra one to the largest load per replica."""
    L, n = weight.shape
    i64 = dict(dtype=torch.int64, device=weight.device)
    rows = torch.arange(L, **i64)
    phy2log = torch.cat([torch.arange(n, **i64).expand(L, n),
                         torch.empty((L, num_phy - n), **i64)], dim=1)
    rank = torch.zeros((L, num_phy), **i64)
    logcnt = torch.ones((L, n), **i64)
    for i in range(n, num_phy):
        e = (weight / logcnt).argmax(dim=1)
        phy2log[:, i] = e
        rank[:, i] = logcnt[rows, e]
        logcnt[rows, e] += 1
    return phy2log, rank, logcnt


def _inverse(perm: torch.Tensor) -> torch.Tensor:
    inv = torch.empty_like(perm)
    index = torch.arange(perm.shape[1], device=perm.device)
    return inv.scatter_(1, perm, index.expand_as(perm).contiguous())


def _hierarchical(weight, num_phy, num_groups, num_nodes, num_gpus):
    L, E = weight.shape
    group_size = E // num_groups
    groups_per_node = num_groups // num_nodes
    # 1. groups -> nodes; "meta-logical" ids number each node's experts contiguously
    group_pack, group_rank = balanced_packing(weight.view(L, num_groups, group_size).sum(-1),
                                              num_nodes)
    log2mlog = (((group_pack * groups_per_node + group_rank) * group_size)[..., None]
                + torch.arange(group_size, device=weight.device)).flatten(1)
    mlog2log = _inverse(log2mlog)
    # 2. replicas within each node
    per_node = weight.gather(1, mlog2log).view(L * num_nodes, E // num_nodes)
    phy2mlog, phy_rank, mlogcnt = replicate_experts(per_node, num_phy // num_nodes)
    # 3. each node's replicas -> its GPUs, by load per replica
    replica_load = (per_node / mlogcnt).gather(1, phy2mlog)
    pack, rank_in_pack = balanced_packing(replica_load, num_gpus // num_nodes)
    phy2pphy = pack * (num_phy // num_gpus) + rank_in_pack
    pphy2phy = _inverse(phy2pphy)
    pphy2mlog = phy2mlog.gather(1, pphy2phy).view(L, num_nodes, -1)
    node_start = torch.arange(0, E, E // num_nodes, device=weight.device)
    pphy2mlog = (pphy2mlog + node_start.view(1, -1, 1)).flatten(1)
    pphy2log = mlog2log.gather(1, pphy2mlog)
    pphy_rank = phy_rank.gather(1, pphy2phy).view(L, -1)
    logcnt = mlogcnt.view(L, -1).gather(1, log2mlog)
    return pphy2log, pphy_rank, logcnt


def _check(weight, num_replicas, num_groups, num_nodes, num_gpus) -> torch.Tensor:
    """The arguments' checks; returns the loads on the host in float64 (float32 rounds
    counts past 2^24, a long window's token counts, and could overflow the packs' sums),
    where the policy runs: every tensor it makes names their device."""
    op = "eplb.rebalance_experts"
    check_tensor(op, "weight", weight)
    if weight.dim() != 2 or min(weight.shape) < 1:   # no layers: no replica count to pad to
        raise ValueError(f"{op}: weight must be a (layers, num_experts) tensor with at least "
                         f"one layer and one expert, got shape {tuple(weight.shape)}")
    if weight.is_complex() or weight.dtype == torch.bool:
        raise TypeError(f"{op}: weight must be real, got {weight.dtype}")
    # a load is a count: NaN and inf break the packing (an inf pack load reads as a full
    # pack, so packs overflow and an expert can lose its only slot), and a negative one
    # turns "heaviest" around
    loads = weight.detach().double().cpu()
    if not (torch.isfinite(loads).all() and (loads >= 0).all()):
        raise ValueError(f"{op}: weight must hold finite loads >= 0 (NaN, inf or a negative "
                         f"value found)")
    E = weight.shape[1]
    for name, v in (("num_replicas", num_replicas), ("num_groups", num_groups),
                    ("num_nodes", num_nodes), ("num_gpus", num_gpus)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{op}: {name} must be a positive int, got {v!r}")
    if num_replicas < E:
        raise ValueError(f"{op}: num_replicas={num_replicas} must be >= num_experts={E}")
    if num_replicas % num_gpus:
        raise ValueError(f"{op}: num_gpus={num_gpus} must divide num_replicas={num_replicas}")
    if num_gpus % num_nodes:
        raise ValueError(f"{op}: num_nodes={num_nodes} must divide num_gpus={num_gpus}")
    if E % num_groups:
        raise ValueError(f"{op}: num_groups={num_groups} must divide num_experts={E}")
    return loads


def rebalance_experts(weight: torch.Tensor, num_replicas: int, num_groups: int, num_nodes: int,
                      num_gpus: int):
    """weight (layers, E) estimated load per logical expert (any real dtype) ->
    phy2log (layers, num_replicas) int64: the logical expert of each physical slot;
    log2phy (layers, E, max_replicas) int64: each expert's slots, -1 padded;
    logcnt (layers, E) int64: replicas per expert (>= 1).
    Physical slot p lives on GPU p // (num_replicas // num_gpus)."""
    w = _check(weight, num_replicas, num_groups, num_nodes, num_gpus)
    L, E = weight.shape
    if num_groups % num_nodes == 0:
        phy2log, phy_rank, logcnt = _hierarchical(w, num_replicas, num_groups, num_nodes, num_gpus)
    else:
        phy2log, phy_rank, logcnt = _hierarchical(w, num_replicas, 1, 1, num_gpus)
    width = int(logcnt.max())
    log2phy = torch.full((L, E * width), -1, dtype=torch.int64, device=w.device)
    log2phy.scatter_(1, phy2log * width + phy_rank,
                     torch.arange(num_replicas, device=w.device).expand(L, -1).contiguous())
    return phy2log, log2phy.view(L, E, width), logcnt


def gpu_loads(weight: torch.Tensor, phy2log: torch.Tensor, logcnt: torch.Tensor,
              num_gpus: int) -> torch.Tensor:
    """(layers, num_gpus) load of each GPU when each expert's load splits evenly over its
    replicas: the measure rebalance_experts minimises (report max / mean)."""
    w = weight.detach().float().cpu()
    per_slot = (w / logcnt).gather(1, phy2log)
    return per_slot.view(w.shape[0], num_gpus, -1).sum(-1)
