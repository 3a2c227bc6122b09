"""Expert parallelism over torch.distributed: where experts live (`ExpertPlacement`, with
the registered slot-map op `map_to_slots`), and moving tokens to them and back
(`ep_dispatch`, `ep_combine`). Data flow, modes and bytes: docs/expert_parallel.md.

Transport is `torch.distributed.all_to_all_single` on any process group (NCCL on GPUs,
gloo on CPUs: the same code). Rows travel as bytes, so FP8 rows and their 1x128 scales
share one message per rank pair.

Every routed pair (t, k) travels as its own row, and comes back as its own row: the
source then forms sum_k w[t, k] * row(t, k) in float32 with the one-device `unpermute`,
so the result is the one-device layer's to the bit wherever the experts compute each row
the same way. (Sending a token once per destination rank, as DeepEP does, saves the
bytes of a token's second and further experts on one rank; it is listed in the page.)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from moe_kernels import _library
from moe_kernels._common import FLOAT_DTYPES, FP8, INDEX_DTYPES, SCALE_BLOCK
from moe_kernels._validate import (autodiff_possible, check_bool, check_choice, check_float_tensor,
                                   check_forward_only, check_int, check_last_dim_contiguous,
                                   check_same_device, check_tensor)
from moe_kernels.ops import fp8 as fp8_ops
from moe_kernels.ops import permute as perm
from moe_kernels.reference import expert_parallel as reference

MODES = ("normal", "low_latency")

# --- the slot map: logical expert ids -> physical slots -----------------------------------

MAP_TO_SLOTS = _library.Op(
    "map_to_slots", "(Tensor topk_ids, Tensor log2phy, Tensor logcnt, int token_offset) -> Tensor",
    fake=lambda ids, log2phy, logcnt, token_offset: ids.new_empty(ids.shape, dtype=torch.int32),
    triton="expert_parallel", native=("cpu",))


def _map_to_slots(backend, topk_ids, log2phy, logcnt, token_offset):
    if backend == "reference":
        return reference.map_to_slots(topk_ids, log2phy, logcnt, token_offset)
    return MAP_TO_SLOTS.kernel(backend)(topk_ids, log2phy, logcnt, token_offset)


def _check_tables(op, phy2log, log2phy, logcnt, world_size, *, read_values: bool) -> None:
    """A placement's tables: phy2log (P,), log2phy (E, R >= 1), logcnt (E,) int, one
    device, world_size dividing P; with read_values (on the host: set-up time) also counts
    in [1, R] summing to P, and each expert's slots in [0, P) and naming it in phy2log."""
    check_tensor(op, "phy2log", phy2log, ndim=1, dtypes=INDEX_DTYPES)
    check_tensor(op, "log2phy", log2phy, ndim=2, dtypes=INDEX_DTYPES)
    check_tensor(op, "logcnt", logcnt, ndim=1, dtypes=INDEX_DTYPES)
    check_int(op, "world_size", world_size, low=1)
    check_same_device(op, "log2phy", log2phy, "phy2log", phy2log)
    check_same_device(op, "logcnt", logcnt, "phy2log", phy2log)
    P, (E, R) = phy2log.shape[0], log2phy.shape
    if logcnt.shape[0] != E or R < 1:
        raise ValueError(f"{op}: logcnt must be (E={E},) and log2phy (E, >= 1), got "
                         f"{tuple(logcnt.shape)} and {tuple(log2phy.shape)}")
    if P % world_size:
        raise ValueError(f"{op}: world_size={world_size} must divide the {P} slots")
    if not read_values:
        return
    p2l, l2p, cnt = phy2log.long().cpu(), log2phy.long().cpu(), logcnt.long().cpu()
    if bool((cnt < 1).any()) or bool((cnt > R).any()) or int(cnt.sum()) != P:
        raise ValueError(f"{op}: logcnt must be in [1, {R}] and sum to the {P} slots")
    held = torch.arange(R) < cnt[:, None]                       # (E, R): the listed slots
    in_range = (l2p >= 0) & (l2p < P)
    named = p2l[torch.where(in_range, l2p, 0)] == torch.arange(E)[:, None]
    wrong = (held & ~(in_range & named)).any(dim=1)
    if bool(wrong.any()):
        raise ValueError(f"{op}: log2phy[{int(wrong.nonzero()[0, 0])}] and phy2log disagree")


def _on_cpu(*tables) -> bool:
    return all(t.device.type == "cpu" for t in tables if isinstance(t, torch.Tensor))


@dataclass(frozen=True)
class ExpertPlacement:
    """Which physical expert slots live on which rank, and each logical expert's slots.

    phy2log (P,) int64: the logical expert of each physical slot; log2phy (E, max_replicas)
    int64: each logical expert's slots, -1 padded; logcnt (E,) int64 >= 1: its replica
    count. Slot p lives on rank p // (P / world_size), at local index p % (P / world_size).
    Build with `uniform` or `from_eplb`; `.to(device)` moves the tables. The constructor
    checks the tables' types and shapes, and their values where they are on the CPU (a
    slot or expert id past the tables sent rows to ranks that do not exist); on another
    device it reads no value (no host sync): build there with `.to(device)`."""
    phy2log: torch.Tensor
    log2phy: torch.Tensor
    logcnt: torch.Tensor
    world_size: int

    def __post_init__(self):
        _check_tables("ExpertPlacement", self.phy2log, self.log2phy, self.logcnt,
                      self.world_size, read_values=_on_cpu(self.phy2log, self.log2phy,
                                                           self.logcnt))

    @property
    def num_experts(self) -> int:
        return self.log2phy.shape[0]

    @property
    def num_slots(self) -> int:
        return self.phy2log.shape[0]

    @property
    def slots_per_rank(self) -> int:
        return self.num_slots // self.world_size

    @classmethod
    def uniform(cls, num_experts: int, world_size: int, device=None) -> "ExpertPlacement":
        """Expert e on rank e // (num_experts / world_size), no replicas."""
        check_int("ExpertPlacement.uniform", "num_experts", num_experts, low=1)
        check_int("ExpertPlacement.uniform", "world_size", world_size, low=1)
        if num_experts % world_size:
            raise ValueError(f"ExpertPlacement.uniform: world_size={world_size} must divide "
                             f"num_experts={num_experts}")
        ids = torch.arange(num_experts, device=device)
        return cls(ids, ids[:, None].clone(), torch.ones_like(ids), world_size)

    @classmethod
    def from_eplb(cls, phy2log, log2phy, logcnt, world_size: int) -> "ExpertPlacement":
        """One layer of `eplb.rebalance_experts`' output: phy2log (P,), log2phy (E, R),
        logcnt (E,). Checked for consistency (reads the tables on the host: set-up time)."""
        # the constructor reads the values of CPU tables; those of others are read here
        _check_tables("ExpertPlacement.from_eplb", phy2log, log2phy, logcnt, world_size,
                      read_values=not _on_cpu(phy2log, log2phy, logcnt))
        return cls(phy2log.long(), log2phy.long(), logcnt.long(), world_size)

    def to(self, device) -> "ExpertPlacement":
        return ExpertPlacement(self.phy2log.to(device), self.log2phy.to(device),
                               self.logcnt.to(device), self.world_size)

    def local_experts(self, rank: int) -> torch.Tensor:
        """(P / world_size,) int64: the logical expert of each of rank's slots, in order.
        rank in [0, world_size) (a slice past the table would be an empty tensor)."""
        check_int("ExpertPlacement.local_experts", "rank", rank, low=0,
                  high=self.world_size - 1, high_name="world_size - 1")
        S = self.slots_per_rank
        return self.phy2log[rank * S:(rank + 1) * S]

    def map(self, topk_ids: torch.Tensor, token_offset: int = 0, *,
            backend: str | None = None) -> torch.Tensor:
        """topk_ids (T, K) int logical ids -> (T, K) int32 physical slots (-1 where the id is
        outside [0, E)). Replicas are taken in turn: pair (t, k) of expert e goes to replica
        (t + token_offset) mod logcnt[e]. No host sync."""
        op = "ExpertPlacement.map"
        check_tensor(op, "topk_ids", topk_ids, ndim=2, dtypes=INDEX_DTYPES)
        check_int(op, "token_offset", token_offset, low=0)
        if self.log2phy.device != topk_ids.device:
            raise ValueError(f"{op}: the placement is on {self.log2phy.device} but topk_ids "
                             f"is on {topk_ids.device}; use placement.to(device)")
        backend = MAP_TO_SLOTS.resolve(backend, topk_ids)
        return _map_to_slots(backend, topk_ids, self.log2phy, self.logcnt, token_offset)


# --- dispatch / combine ---------------------------------------------------------------------

@dataclass
class EPHandle:
    """What ep_combine needs from ep_dispatch, and what the receiving rank computes on.

    layout: normal mode, the PermuteLayout of the received rows (m_indices for
      grouped_gemm_fp8); masked_m: low-latency mode, (E_local,) int32 rows per local
      expert (for grouped_gemm_fp8_masked); dropped: low-latency mode, (P,) int64 pairs of
      this rank not sent because a (source, slot) buffer was full, per physical slot
      (never silently lost: they add nothing to the output and are counted here);
      send_counts / recv_counts: normal mode, rows per peer rank (host ints)."""
    mode: str
    group: object
    backend: str
    topk_weights: torch.Tensor
    row_of_pair: torch.Tensor           # (T, K) int32: row of each pair in the combine buffer
    pairs: torch.Tensor | None = None   # normal: the sent pairs, in send order
    send_counts: list | None = None
    recv_counts: list | None = None
    layout: perm.PermuteLayout | None = None
    masked_m: torch.Tensor | None = None
    dropped: torch.Tensor | None = None
    unpack_index: torch.Tensor | None = None   # low_latency: buffer row of each packed row
    max_tokens_per_rank: int | None = None


def _world(group):
    return dist.get_world_size(group), dist.get_rank(group)


def _pack(hidden, use_fp8, backend):
    """(T, H) rows -> (T, B) uint8 payload: the rows' bytes, or FP8 rows then their float32
    1x128 scales; returns (payload, unpack) where unpack(b, index=None) gives the rows, or
    (q, s), of received payload rows b (of b's rows `index` where given)."""
    T, H = hidden.shape
    if not use_fp8:
        dtype = hidden.dtype
        return (hidden.contiguous().view(torch.uint8),
                lambda b, index=None: _rows(b, index, dtype).view(-1, H))
    q, s = fp8_ops.quantize_fp8_per_token_group_unchecked(backend, hidden, SCALE_BLOCK, 1e-10,
                                                          False, False)
    G = s.shape[1]
    payload = torch.cat([q.view(torch.uint8), s.view(torch.uint8)], dim=1)
    return payload, lambda b, index=None: (
        _rows(b[:, :H], index, FP8), _rows(b[:, H:], index, torch.float32).view(-1, G))


def _rows(b, index, dtype):
    """Payload bytes b (n, bytes) as rows of dtype: b's rows `index` gathered (the
    low-latency receiver, straight from its buffer), else a view of b (row-strided: the
    normal receiver's permute reads row strides, so the rows are not copied first), or a
    copy where b's row stride or offset is not a whole number of dtype's elements."""
    if index is not None:
        b = b.index_select(0, index)
    try:
        return b.view(dtype)
    except RuntimeError:
        # a copy of its own storage: contiguous() keeps a view of no rows or of one row
        # (contiguous whatever its row stride) at its offset, the scales' H bytes into the
        # row, which float32 cannot view where H % 4 != 0
        return b.clone(memory_format=torch.contiguous_format).view(dtype)


def _fixed_rows(n, width, like):
    """(n, width) rows of like's dtype and device, not initialised: the low-latency mode's
    fixed buffers, whose rows are read only where written. At decode most of a buffer is
    empty (rows for M pairs per (source, slot), ~T * K / P of them used), and zeroing it
    would be a pass over all of it: 242 MB at 256 slots, M = 128, FP8 rows of H = 7168."""
    return torch.empty((n, width), dtype=like.dtype, device=like.device)


def _all_to_all(out, inp, group, out_splits=None, in_splits=None):
    dist.all_to_all_single(out, inp, out_splits, in_splits, group=group)
    return out


def _check_dispatch(op, hidden, topk_ids, topk_weights, placement, group, mode,
                    max_tokens_per_rank, align, use_fp8):
    check_float_tensor(op, "hidden", hidden, ndim=2)
    check_last_dim_contiguous(op, "hidden", hidden)
    check_tensor(op, "topk_ids", topk_ids, ndim=2, dtypes=INDEX_DTYPES)
    check_float_tensor(op, "topk_weights", topk_weights, ndim=2)
    T = hidden.shape[0]
    if hidden.shape[1] < 1:   # the payload is the rows' bytes: a row of none has no layout
        raise ValueError(f"{op}: hidden must have at least one column, got shape "
                         f"{tuple(hidden.shape)}")
    if topk_ids.shape[0] != T or topk_weights.shape != topk_ids.shape:
        raise ValueError(f"{op}: topk_ids and topk_weights must both be (T={T}, K), got "
                         f"{tuple(topk_ids.shape)} and {tuple(topk_weights.shape)}")
    check_same_device(op, "topk_ids", topk_ids, "hidden", hidden)
    check_same_device(op, "topk_weights", topk_weights, "hidden", hidden)
    if not isinstance(placement, ExpertPlacement):
        raise TypeError(f"{op}: placement must be an ExpertPlacement, got "
                        f"{type(placement).__name__}")
    if placement.log2phy.device != hidden.device:
        raise ValueError(f"{op}: placement is on {placement.log2phy.device} but hidden is on "
                         f"{hidden.device}; use placement.to(device)")
    check_choice(op, "mode", mode, MODES)
    if mode == "low_latency":
        if max_tokens_per_rank is None:
            raise ValueError(f"{op}: mode='low_latency' needs max_tokens_per_rank (the rows of "
                             f"each (source rank, slot) buffer)")
        check_int(op, "max_tokens_per_rank", max_tokens_per_rank, low=1)
    elif max_tokens_per_rank is not None:
        raise ValueError(f"{op}: max_tokens_per_rank is for mode='low_latency' only")
    check_int(op, "align", align, low=1)
    check_bool(op, "use_fp8", use_fp8)
    if not dist.is_initialized():
        raise ValueError(f"{op}: torch.distributed is not initialized "
                         f"(torch.distributed.init_process_group first)")
    world, _ = _world(group)
    if placement.world_size != world:
        raise ValueError(f"{op}: placement is for {placement.world_size} ranks but the group "
                         f"has {world}")


def ep_dispatch(hidden: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor,
                placement: ExpertPlacement, *, group=None, mode: str = "normal",
                max_tokens_per_rank: int | None = None, use_fp8: bool = False,
                align: int = 1, backend: str | None = None):
    """Sends every routed pair's row to the rank holding its expert slot.

    hidden (T, H) float (T may differ per rank, 0 included), topk_ids (T, K) int logical
    ids (outside [0, E): not routed), topk_weights (T, K) float (kept for ep_combine).
    use_fp8: rows travel as FP8 with 1x128 float32 scales (quantize_fp8_per_token_group).
    Returns (recv, handle); recv is the rows, or (rows, scales) with use_fp8:
    - mode="normal": (R, H) in the contiguous permuted layout of the rank's
      E_local = P / world slots (padded to `align`; handle.layout.m_indices feeds
      grouped_gemm_fp8). One host sync: the per-rank row counts.
    - mode="low_latency": (E_local, world * M, H), M = max_tokens_per_rank, the masked
      layout (handle.masked_m feeds grouped_gemm_fp8_masked); no host sync, fixed shapes
      (CUDA-graph capturable). At most M pairs per (source rank, slot) travel; the rest are
      counted in handle.dropped."""
    op = "ep_dispatch"
    if autodiff_possible():
        check_forward_only(op, hidden=hidden, topk_weights=topk_weights)
    _check_dispatch(op, hidden, topk_ids, topk_weights, placement, group, mode,
                    max_tokens_per_rank, align, use_fp8)
    backend = MAP_TO_SLOTS.resolve(backend, hidden)
    world, rank = _world(group)
    slots = _map_to_slots(backend, topk_ids, placement.log2phy, placement.logcnt, rank)
    payload, unpack = _pack(hidden, use_fp8, backend)
    if mode == "normal":
        return _dispatch_normal(backend, group, world, placement.slots_per_rank, slots,
                                payload, unpack, topk_weights, align, hidden.shape[1])
    return _dispatch_low_latency(backend, group, world, placement.slots_per_rank, slots,
                                 payload, unpack, topk_weights, max_tokens_per_rank)


def _dispatch_normal(backend, group, world, S, slots, payload, unpack, topk_weights, align, H):
    T, K = slots.shape
    flat = slots.reshape(-1).long()
    dest = torch.where(flat >= 0, flat // S, world)           # world: not sent
    order = torch.argsort(dest, stable=True)                   # by rank, then pair index
    send = torch.zeros(world + 1, dtype=torch.int64, device=flat.device)
    send.scatter_add_(0, dest, torch.ones_like(dest))
    send = send[:world].contiguous()
    recv = _all_to_all(torch.empty_like(send), send, group)
    send_counts, recv_counts = send.tolist(), recv.tolist()   # the mode's one host sync
    n_send, n_recv = sum(send_counts), sum(recv_counts)
    pairs = order[:n_send]
    rows = _all_to_all(payload.new_empty((n_recv, payload.shape[1])),
                       payload.index_select(0, pairs // K), group, recv_counts, send_counts)
    local = (flat.index_select(0, pairs) % S).to(torch.int32)
    recv_slot = _all_to_all(local.new_empty(n_recv), local, group, recv_counts, send_counts)
    unpacked = unpack(rows)   # views of the received rows, which the permute reads in place
    x, scales = unpacked if isinstance(unpacked, tuple) else (unpacked, None)
    permuted, layout = perm.permute_unchecked(backend, x, recv_slot[:, None], S, align, scales)
    row_of_pair = torch.full((T * K,), -1, dtype=torch.int32, device=flat.device)
    row_of_pair[pairs] = torch.arange(n_send, dtype=torch.int32, device=flat.device)
    handle = EPHandle("normal", group, backend, topk_weights, row_of_pair.view(T, K),
                      pairs=pairs, send_counts=send_counts, recv_counts=recv_counts,
                      layout=layout)
    return ((permuted, layout.scales) if scales is not None else permuted), handle


def _slot_positions(key):
    """key (P,) -> each pair's rank among the pairs of its key, in pair
    order (a stable sort; no host sync)."""
    sorted_key, order = torch.sort(key, stable=True)
    first = torch.searchsorted(sorted_key, key)
    rank_in_sorted = torch.empty_like(order).scatter_(
        0, order, torch.arange(key.numel(), device=key.device))
    return rank_in_sorted - first


def _dispatch_low_latency(backend, group, world, S, slots, payload, unpack, topk_weights, M):
    T, K = slots.shape
    dev, B, P = slots.device, payload.shape[1], world * S
    flat = slots.reshape(-1).long()
    key = torch.where(flat >= 0, flat, P)
    pos = _slot_positions(key)
    kept = (flat >= 0) & (pos < M)
    dropped = torch.zeros(P + 1, dtype=torch.int64, device=dev)
    dropped.scatter_add_(0, torch.where((flat >= 0) & ~kept, key, P), torch.ones_like(key))
    counts = torch.zeros(P + 1, dtype=torch.int64, device=dev)
    counts.scatter_add_(0, torch.where(kept, key, P), torch.ones_like(key))
    # send buffer (world, S, M) rows; pairs not sent land on a spare last row
    buf_row = torch.where(kept, key * M + pos, P * M)
    buf = _fixed_rows(P * M + 1, B, payload)
    buf.index_copy_(0, buf_row, payload.index_select(0, torch.arange(T * K, device=dev) // K))
    # received (world, S, M) rows, then a zero row for the masked rows past each count; a
    # row the sender did not write is past its (source, slot) count, so never gathered
    recv = _fixed_rows(P * M + 1, B, payload)
    recv[-1].zero_()
    _all_to_all(recv[:-1], buf[:-1], group)
    del buf
    got = _all_to_all(torch.empty_like(counts[:P]), counts[:P].contiguous(), group)
    index, masked_m = _pack_index(got.view(world, S), M)
    unpacked = unpack(recv, index.reshape(-1))
    del recv
    handle = EPHandle("low_latency", group, backend, topk_weights,
                      torch.where(kept, buf_row, -1).to(torch.int32).view(T, K),
                      masked_m=masked_m, dropped=dropped[:P], unpack_index=index,
                      max_tokens_per_rank=M)
    if isinstance(unpacked, tuple):
        q, s = unpacked
        return (q.view(S, world * M, -1), s.view(S, world * M, -1)), handle
    return unpacked.view(S, world * M, -1), handle


def _pack_index(counts, M):
    """counts (world, S) rows received per (source, local slot) -> index (S, world * M) of
    each masked-layout row in the received (world, S, M) buffer (world * S * M: a zero
    row), and masked_m (S,) int32. Expert j's rows from source w go after those of the
    sources before w: its real rows are contiguous from row 0."""
    world, S = counts.shape
    per_slot = counts.t()                                        # (S, world)
    incl = per_slot.cumsum(1)
    excl = incl - per_slot
    i = torch.arange(world * M, device=counts.device)
    src = (incl[:, None, :] <= i[None, :, None]).sum(-1)          # (S, world * M) in [0, world]
    inside = src < world
    src = src.clamp(max=world - 1)
    slot = i[None, :] - excl.gather(1, src)
    j = torch.arange(S, device=counts.device)[:, None]
    index = torch.where(inside, (src * S + j) * M + slot, world * S * M)
    return index, incl[:, -1].to(torch.int32)


def ep_combine(expert_out: torch.Tensor, handle: EPHandle) -> torch.Tensor:
    """Sends each received pair's expert output back to its source rank, which returns
    out[t] = sum_k topk_weights[t, k] * row(t, k) in float32 (the one-device unpermute),
    (T, H) in expert_out's dtype. expert_out: normal mode (R, H) in the dispatch layout's
    rows; low-latency mode (E_local, world * M, H)."""
    back = combine_rows("ep_combine", expert_out, handle)
    return perm.unpermute_unchecked(handle.backend, back, handle.row_of_pair, handle.topk_weights)


def combine_rows(op, expert_out, handle):
    """The combine's exchange alone: (n, H) rows back on the source rank, pair (t, k)'s at
    row handle.row_of_pair[t, k] (-1: not sent); ep_combine then applies the weights. The
    layer uses it to sum its shared expert in the same float32 sum."""
    if not isinstance(handle, EPHandle):
        raise TypeError(f"{op}: handle must be the EPHandle ep_dispatch returned, got "
                        f"{type(handle).__name__}")
    check_float_tensor(op, "expert_out", expert_out)
    if autodiff_possible():
        check_forward_only(op, expert_out=expert_out)
    if expert_out.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{op}: expert_out must be float32, bfloat16 or float16, got "
                        f"{expert_out.dtype}")
    check_last_dim_contiguous(op, "expert_out", expert_out)
    if handle.mode == "normal":
        return _combine_rows_normal(op, expert_out, handle)
    return _combine_rows_low_latency(op, expert_out, handle)


def _combine_rows_normal(op, expert_out, handle):
    R = handle.layout.pair_of_row.shape[0]
    if expert_out.dim() != 2 or expert_out.shape[0] != R:
        raise ValueError(f"{op}: expert_out must be (R={R}, H), the dispatch layout's rows, "
                         f"got {tuple(expert_out.shape)}")
    H = expert_out.shape[1]
    # every received pair is routed (to a local slot): its row is row_of_pair[:, 0]
    rows = expert_out.index_select(0, handle.layout.row_of_pair[:, 0].long())
    out = expert_out.new_empty((sum(handle.send_counts), H))
    return _all_to_all(out, rows, handle.group, handle.send_counts, handle.recv_counts)


def _combine_rows_low_latency(op, expert_out, handle):
    S, rows_per_slot = handle.unpack_index.shape
    if expert_out.dim() != 3 or tuple(expert_out.shape[:2]) != (S, rows_per_slot):
        raise ValueError(f"{op}: expert_out must be (E_local={S}, world * M={rows_per_slot}, "
                         f"H), got {tuple(expert_out.shape)}")
    H = expert_out.shape[2]
    n = handle.unpack_index.numel()
    # the inverse of dispatch's packing: buffer row b <- masked row i with index[i] == b;
    # buffer rows nothing was packed from are not written: no pair of their source reads
    # them (a sent pair's row was packed; the rows past masked_m go to the spare last row)
    buf = _fixed_rows(n + 1, H, expert_out)
    buf.index_copy_(0, handle.unpack_index.reshape(-1), expert_out.flatten(0, -2))
    back = buf[:n]
    return _all_to_all(torch.empty_like(back), back, handle.group)
