"""Triton kernels for token permutation (semantics: reference/permute.py).

Index computation without atomics, so ranks are deterministic: pairs are cut into chunks
of BLOCK; kernel 1 counts each chunk's pairs per expert and each pair's rank among the
earlier pairs of its chunk with the same expert (a BLOCK x BLOCK comparison); one torch
cumsum over chunks (on device, no host sync) gives every chunk's start inside every
expert and, in its last row, the expert counts; kernel 2 derives the padded expert
offsets from those (every program, a `tl.cumsum` over the experts) and writes row =
offset[e] + chunk start + rank and the per-expert outputs. Up to one chunk of pairs
(decode), one kernel does all of it.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from moe_kernels._common import cdiv, next_power_of_2, rows_in_place
from moe_kernels.reference.permute import permuted_rows
from moe_kernels.triton.launch import cached_launch
from moe_kernels.triton.numerics import SOFTWARE_ROUNDING, round_for_store

_CHUNK = 128
_INT_OF_SIZE = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


@triton.jit
def _rank_in_block(expert, BLOCK: tl.constexpr):
    """Each pair's number of earlier pairs of the block with the same expert (a BLOCK x
    BLOCK comparison: deterministic, no atomics)."""
    i = tl.arange(0, BLOCK)
    earlier_same = (expert[None, :] == expert[:, None]) & (i[None, :] < i[:, None])
    return tl.sum(earlier_same.to(tl.int32), axis=1)


@cached_launch
@triton.jit
def _chunk_count_kernel(ids_ptr, chunk_counts_ptr, rank_ptr, P, E,
                        E_PAD: tl.constexpr, BLOCK: tl.constexpr):
    c = tl.program_id(0)
    p = c.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    ids = tl.load(ids_ptr + p, mask=p < P, other=-1).to(tl.int64)
    expert = tl.where((ids >= 0) & (ids < E), ids, -1)
    e_range = tl.arange(0, E_PAD)
    # a histogram, not a (BLOCK, E_PAD) one-hot sum: that spilled on sm_90a at E_PAD=256
    counts = tl.histogram(tl.where(expert >= 0, expert, 0).to(tl.int32), E_PAD, mask=expert >= 0)
    tl.store(chunk_counts_ptr + c.to(tl.int64) * E + e_range, counts, mask=e_range < E)
    tl.store(rank_ptr + p, _rank_in_block(expert, BLOCK), mask=p < P)


@triton.jit
def _store_rows(p, in_range, routed, e, slot, start, row_of_pair_ptr, pair_of_row_ptr,
                m_indices_ptr, M, align, MASKED: tl.constexpr, BLOCK_EXPERTS: tl.constexpr):
    """Pair p (expert e, slot-th of its expert) to its row: `start` (the expert's first
    row) + slot, or in the masked layout e * M + slot, kept while slot < M. BLOCK_EXPERTS:
    m_indices_ptr holds one expert per block of `align` rows (moe_align_block_size's
    expert_ids), written by the pair on the block's first row (a block that starts inside
    a segment starts on a real row: segments start on block boundaries and hold less than
    a block of padding); row_of_pair, which moe_align_block_size does not return, is not
    stored."""
    if MASKED:
        kept = routed & (slot < M)
        row = e * M + slot
    else:
        kept = routed
        row = start + slot
    if not BLOCK_EXPERTS:
        tl.store(row_of_pair_ptr + p, tl.where(kept, row, -1).to(tl.int32), mask=in_range)
    tl.store(pair_of_row_ptr + row, p.to(tl.int32), mask=kept)
    if BLOCK_EXPERTS:
        tl.store(m_indices_ptr + row // align, e.to(tl.int32), mask=kept & (row % align == 0))
    elif not MASKED:
        tl.store(m_indices_ptr + row, e.to(tl.int32), mask=kept)


@triton.jit
def _segment_ends(counts, align):
    """(each expert's segment end, its size) with the segments padded to `align` rows:
    counts (E_PAD,) int64."""
    padded = (counts + align - 1) // align * align
    return tl.cumsum(padded, 0), padded


@triton.jit
def _expert_outputs(counts, offsets_ptr, counts_ptr, total_ptr, E, align, M,
                    E_PAD: tl.constexpr, MASKED: tl.constexpr, BLOCK_EXPERTS: tl.constexpr):
    """Stores the per-expert outputs of `counts` (E_PAD,) int64: tokens_per_expert (int32)
    and, MASKED: masked_m = min(counts, M) into offsets_ptr (int32); else the offsets of
    the experts' segments padded to `align` (E+1,) int64, and with BLOCK_EXPERTS the rows
    used into total_ptr (int32) instead of tokens_per_expert (moe_align_block_size
    returns neither the counts nor the offsets, which are scratch to it)."""
    e_range = tl.arange(0, E_PAD)
    if not BLOCK_EXPERTS:
        tl.store(counts_ptr + e_range, counts.to(tl.int32), mask=e_range < E)
    if MASKED:
        tl.store(offsets_ptr + e_range, tl.minimum(counts, M).to(tl.int32), mask=e_range < E)
    else:
        ends, _ = _segment_ends(counts, align)
        tl.store(offsets_ptr + 1 + e_range, ends, mask=e_range < E)
        tl.store(offsets_ptr + e_range, tl.zeros_like(ends), mask=e_range == 0)
        if BLOCK_EXPERTS:   # lane E - 1 holds the last end: the rows used
            tl.store(total_ptr + e_range - (E - 1), ends.to(tl.int32), mask=e_range == E - 1)


@cached_launch
@triton.jit
def _scatter_rows_kernel(ids_ptr, rank_ptr, chunk_counts_ptr, running_ptr, offsets_ptr,
                         counts_ptr, total_ptr, row_of_pair_ptr, pair_of_row_ptr,
                         m_indices_ptr, P, E, M, align, n_chunks, E_PAD: tl.constexpr,
                         BLOCK: tl.constexpr, MASKED: tl.constexpr,
                         BLOCK_EXPERTS: tl.constexpr):
    """running: chunk_counts' cumulative sum over chunks (int64), so its last row is the
    expert counts and running - chunk_counts each chunk's start inside each expert. Every
    program derives the experts' first rows from the counts (E_PAD lanes, a cumsum: no
    launch of its own); program 0 also stores the per-expert outputs."""
    c = tl.program_id(0)
    e_range = tl.arange(0, E_PAD)
    counts = tl.load(running_ptr + (n_chunks - 1).to(tl.int64) * E + e_range,
                     mask=e_range < E, other=0)
    if c == 0:
        _expert_outputs(counts, offsets_ptr, counts_ptr, total_ptr, E, align, M, E_PAD,
                        MASKED, BLOCK_EXPERTS)
    if MASKED:
        starts = tl.zeros_like(counts)
    else:
        ends, padded = _segment_ends(counts, align)
        starts = ends - padded
    p = c.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    in_range = p < P
    ids = tl.load(ids_ptr + p, mask=in_range, other=-1).to(tl.int64)
    routed = in_range & (ids >= 0) & (ids < E)
    e = tl.where(routed, ids, 0)
    at = c.to(tl.int64) * E + e
    slot = (tl.load(running_ptr + at, mask=routed, other=0)
            - tl.load(chunk_counts_ptr + at, mask=routed, other=0)
            + tl.load(rank_ptr + p, mask=routed, other=0))
    start = tl.gather(starts, e.to(tl.int32), 0)
    _store_rows(p, in_range, routed, e, slot, start, row_of_pair_ptr, pair_of_row_ptr,
                m_indices_ptr, M, align, MASKED, BLOCK_EXPERTS)


@cached_launch
@triton.jit
def _index_one_chunk_kernel(ids_ptr, offsets_ptr, counts_ptr, m_indices_ptr, row_of_pair_ptr,
                            pair_of_row_ptr, total_ptr, P, E, R, align, M, pad,
                            E_PAD: tl.constexpr, BLOCK: tl.constexpr, FILL: tl.constexpr,
                            MASKED: tl.constexpr, BLOCK_EXPERTS: tl.constexpr):
    """Rows that no pair fills get `pad` in pair_of_row (-1; moe_align_block_size: P).
    MASKED: offsets_ptr receives masked_m = min(counts, M) and m_indices is not written.
    BLOCK_EXPERTS (moe_align_block_size in one launch): m_indices_ptr receives one expert
    per block of `align` rows (-1 past the last), total_ptr the rows used (int32)."""
    p = tl.arange(0, BLOCK)
    ids = tl.load(ids_ptr + p, mask=p < P, other=-1).to(tl.int64)
    expert = tl.where((ids >= 0) & (ids < E), ids, -1)
    routed = expert >= 0
    e = tl.where(routed, expert, 0)
    counts = tl.histogram(e.to(tl.int32), E_PAD, mask=routed).to(tl.int64)
    _expert_outputs(counts, offsets_ptr, counts_ptr, total_ptr, E, align, M, E_PAD, MASKED,
                    BLOCK_EXPERTS)
    # m_indices entries: one per row, or one per block
    n_index = (R + align - 1) // align if BLOCK_EXPERTS else R
    for r0 in range(0, R, FILL):  # every row padding first; routed rows overwritten below
        r = r0 + tl.arange(0, FILL)
        tl.store(pair_of_row_ptr + r, tl.full((FILL,), 0, tl.int32) + pad, mask=r < R)
        if not MASKED:
            tl.store(m_indices_ptr + r, tl.full((FILL,), -1, tl.int32), mask=r < n_index)
    # the offsets and the fill were stored by other threads of this program: a CTA barrier
    # orders their global stores before the loads and stores below (the offsets are read
    # back, not gathered from registers: a gather took 239-254 registers against 168)
    tl.debug_barrier()
    slot = _rank_in_block(expert, BLOCK).to(tl.int64)
    start = 0 if MASKED else tl.load(offsets_ptr + e, mask=routed, other=0)
    _store_rows(p, p < P, routed, e, slot, start, row_of_pair_ptr, pair_of_row_ptr,
                m_indices_ptr, M, align, MASKED, BLOCK_EXPERTS)


# Rows a program of _index_one_chunk_kernel marks as padding per step.
_FILL = 512


def permute_index(topk_ids: torch.Tensor, num_experts: int, align: int):
    """topk_ids (T, K) int -> [expert_offsets (E+1,) int64, tokens_per_expert (E,) int32,
    m_indices (R,) int32, row_of_pair (T, K) int32, pair_of_row (R,) int32].

    Up to _CHUNK pairs (decode: T <= 16 at top-8) one program computes everything in one
    launch; eager decode pays per torch call on the host, and the two-kernel path below
    makes ten of them."""
    if align < 1 or num_experts < 1:   # direct torch.ops calls skip the public checks
        raise ValueError(f"permute_index: align ({align}) and num_experts ({num_experts}) "
                         f"must be >= 1")
    T, K = topk_ids.shape
    P, E = T * K, num_experts
    R = permuted_rows(P, E, align)
    dev = topk_ids.device
    ids = topk_ids.contiguous().view(-1)
    if P <= _CHUNK:
        return _index_one_chunk(ids, T, K, E, R, align)
    new = lambda shape, dtype=torch.int32: torch.empty(shape, dtype=dtype, device=dev)
    offsets, counts, row_of_pair = new((E + 1,), torch.int64), new((E,)), new((T, K))
    pair_of_row = torch.full((R,), -1, dtype=torch.int32, device=dev)
    m_indices = torch.full((R,), -1, dtype=torch.int32, device=dev)
    _index_chunks(ids, P, E, align, 0, offsets, counts, offsets, row_of_pair, pair_of_row,
                  m_indices, masked=False, block_experts=False)
    return [offsets, counts, m_indices, row_of_pair, pair_of_row]


def _index_chunks(ids, P, E, align, M, offsets, counts, total, row_of_pair, pair_of_row,
                  m_indices, masked, block_experts):
    """More than one chunk of pairs: three launches (counts per chunk, their cumulative
    sum over chunks (torch), the rows), the outputs of _scatter_rows_kernel; pair_of_row
    and m_indices come filled. The counts, chunk starts and padded offsets are derived in
    the kernels: in torch they take ten calls, each a launch of its own on the GPU."""
    n_chunks = cdiv(P, _CHUNK)
    E_PAD = next_power_of_2(E)
    chunk_counts = torch.empty((n_chunks, E), dtype=torch.int32, device=ids.device)
    rank = torch.empty(P, dtype=torch.int32, device=ids.device)
    _chunk_count_kernel[(n_chunks,)](ids, chunk_counts, rank, P, E, E_PAD=E_PAD, BLOCK=_CHUNK)
    running = chunk_counts.cumsum(0, dtype=torch.int64)
    _scatter_rows_kernel[(n_chunks,)](ids, rank, chunk_counts, running, offsets, counts,
                                      total, row_of_pair, pair_of_row, m_indices, P, E, M,
                                      align, n_chunks, E_PAD=E_PAD, BLOCK=_CHUNK,
                                      MASKED=masked, BLOCK_EXPERTS=block_experts)


def _index_one_chunk(ids, T, K, E, R, align):
    new = lambda shape, dtype: torch.empty(shape, dtype=dtype, device=ids.device)
    out = [new((E + 1,), torch.int64), new((E,), torch.int32), new((R,), torch.int32),
           new((T, K), torch.int32), new((R,), torch.int32)]
    offsets, counts, m_indices, row_of_pair, pair_of_row = out
    _index_one_chunk_kernel[(1,)](ids, offsets, counts, m_indices, row_of_pair, pair_of_row,
                                  counts, T * K, E, R, align, 0, -1, E_PAD=next_power_of_2(E),
                                  BLOCK=_CHUNK, FILL=_FILL, MASKED=False, BLOCK_EXPERTS=False)
    return out


def permute_masked_index(topk_ids: torch.Tensor, num_experts: int, max_tokens: int):
    """topk_ids (T, K) int -> [masked_m (E,) int32, tokens_per_expert (E,) int32,
    row_of_pair (T, K) int32 (row e * M + slot; -1 for skipped pairs and pairs beyond the
    capacity M), pair_of_row (E * M,) int32 (-1 for empty rows)]: reference.masked_index
    computed in one launch up to _CHUNK pairs, in two kernels beyond (no permute_index and
    no fifteen torch calls to derive it)."""
    if num_experts < 1 or max_tokens < 0:   # direct torch.ops calls skip the public checks
        raise ValueError(f"permute_masked_index: num_experts ({num_experts}) must be >= 1 "
                         f"and max_tokens ({max_tokens}) >= 0")
    T, K = topk_ids.shape
    P, E, M = T * K, num_experts, max_tokens
    ids = topk_ids.contiguous().view(-1)
    new = lambda *shape: torch.empty(shape, dtype=torch.int32, device=ids.device)
    masked_m, counts, row_of_pair, pair_of_row = new(E), new(E), new(T, K), new(E * M)
    if P <= _CHUNK:   # pair_of_row stands in for the m_indices a masked layout lacks
        _index_one_chunk_kernel[(1,)](ids, masked_m, counts, pair_of_row, row_of_pair,
                                      pair_of_row, counts, P, E, E * M, 1, M, -1,
                                      E_PAD=next_power_of_2(E), BLOCK=_CHUNK, FILL=_FILL,
                                      MASKED=True, BLOCK_EXPERTS=False)
        return [masked_m, counts, row_of_pair, pair_of_row]
    pair_of_row.fill_(-1)
    _index_chunks(ids, P, E, 1, M, masked_m, counts, counts, row_of_pair, pair_of_row,
                  pair_of_row, masked=True, block_experts=False)
    return [masked_m, counts, row_of_pair, pair_of_row]


def moe_align_block_size(topk_ids: torch.Tensor, num_experts: int, block_size: int):
    """[sorted_token_ids, expert_ids, num_tokens_post_padded] (see ops.permute).

    Every block that starts inside an expert's padded segment starts on one of its real
    rows (segments start on block boundaries and hold less than one block of padding), so
    a block's expert is the m_indices entry of its first row. Up to _CHUNK pairs one
    launch writes the three outputs; beyond, permute_index's and three torch calls."""
    if block_size < 1 or num_experts < 1:   # direct torch.ops calls skip the public checks
        raise ValueError(f"moe_align_block_size: block_size ({block_size}) and num_experts "
                         f"({num_experts}) must be >= 1")
    T, K = topk_ids.shape
    P, E = T * K, num_experts
    ids = topk_ids.contiguous().view(-1)
    R = permuted_rows(P, E, block_size)
    new = lambda shape, dtype=torch.int32: torch.empty(shape, dtype=dtype, device=ids.device)
    # the kernels store neither counts nor row_of_pair with BLOCK_EXPERTS: the offsets'
    # scratch stands in for their pointers, sparing two allocations of ~2.5 us host time
    # each (decode call, compiled kernels, launches stubbed: 20.9-22.4 -> 16.8-17.2 us)
    total, offsets = new((1,)), new((E + 1,), torch.int64)
    if P <= _CHUNK:   # one launch, the fill included
        sorted_ids, expert_ids = new((R,)), new((cdiv(R, block_size),))
        _index_one_chunk_kernel[(1,)](ids, offsets, offsets, expert_ids, offsets,
                                      sorted_ids, total, P, E, R, block_size, 0, P,
                                      E_PAD=next_power_of_2(E), BLOCK=_CHUNK, FILL=_FILL,
                                      MASKED=False, BLOCK_EXPERTS=True)
        return [sorted_ids, expert_ids, total]
    sorted_ids = torch.full((R,), P, dtype=torch.int32, device=ids.device)
    expert_ids = torch.full((cdiv(R, block_size),), -1, dtype=torch.int32, device=ids.device)
    _index_chunks(ids, P, E, block_size, 0, offsets, offsets, total, offsets, sorted_ids,
                  expert_ids, masked=False, block_experts=True)
    return [sorted_ids, expert_ids, total]


@cached_launch
@triton.jit
def _gather_rows_kernel(x_ptr, src_ptr, out_ptr, R, D, stride_x, K, P, ROWS: tl.constexpr,
                        BLOCK_D: tl.constexpr):
    r = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
    p = tl.load(src_ptr + r, mask=r < R, other=-1).to(tl.int64)
    valid = (p >= 0) & (p < P)          # anything else is padding: never read out of bounds
    t = tl.where(valid, p // K, 0)
    for d0 in range(0, D, BLOCK_D):
        d = d0 + tl.arange(0, BLOCK_D)
        # a padding row reads nothing and stores zeros. The mask as (row) & (column): its
        # column part keeps D's divisibility, so the loads stay 16 bytes wide (a per-row
        # bound where(valid, D, 0) made triton 3.9 load 2 bytes at a time)
        row = tl.load(x_ptr + t[:, None] * stride_x + d[None, :],
                      mask=valid[:, None] & (d < D)[None, :], other=0)
        tl.store(out_ptr + r[:, None] * D + d[None, :], row,
                 mask=(r < R)[:, None] & (d < D)[None, :])


def gather_rows_out(x: torch.Tensor, pair_of_row: torch.Tensor, row_of_pair: torch.Tensor,
                    out: torch.Tensor) -> None:
    """x (T, D) -> out (R, D) contiguous: row r = x[pair_of_row[r] // K], zero for padding.
    x is read in place where its last dimension is contiguous (any row stride: a slice of
    wider rows, the payload rows of ep_dispatch), else copied first. A program copies ROWS
    rows of up to 4096 elements per step: one row at H=7168, many narrow (or padding) rows
    otherwise."""
    R, D = pair_of_row.shape[0], x.shape[1]
    K = row_of_pair.shape[1]
    if R > 0 and D > 0:
        x = rows_in_place(x)
        block = min(next_power_of_2(D), 4096)
        rows = max(1, 4096 // block)
        # A copy: move the bits as integers of the same width, so every dtype works (FP8
        # too, whose `other=0` the interpreter cannot cast) and +0.0 padding is all zeros.
        as_int = _INT_OF_SIZE[x.element_size()]
        # index tensors are read at flat offsets: contiguous (no-op when they are)
        _gather_rows_kernel[(cdiv(R, rows),)](x.view(as_int), pair_of_row.contiguous(),
                                                     out.view(as_int), R, D, x.stride(0),
                                                     max(K, 1), x.shape[0] * K, ROWS=rows,
                                                     BLOCK_D=block, num_warps=4)


def gather_rows(x: torch.Tensor, pair_of_row: torch.Tensor, row_of_pair: torch.Tensor):
    """gather_rows_out into a new (R, D) tensor of x's dtype."""
    out = torch.empty((pair_of_row.shape[0], x.shape[1]), dtype=x.dtype, device=x.device)
    gather_rows_out(x, pair_of_row, row_of_pair, out)
    return out


@cached_launch
@triton.jit
def _unpermute_kernel(eo_ptr, rows_ptr, w_ptr, out_ptr, H, R, K: tl.constexpr,
                      BLOCK_H: tl.constexpr, SOFTWARE: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    acc = tl.zeros((BLOCK_H,), dtype=tl.float32)
    for k in tl.static_range(K):
        r = tl.load(rows_ptr + t * K + k).to(tl.int64)
        valid = (r >= 0) & (r < R)
        w = tl.load(w_ptr + t * K + k).to(tl.float32)
        # masked load: a skipped pair's row is never read, so its NaN cannot leak in
        x = tl.load(eo_ptr + tl.where(valid, r, 0) * H + h, mask=h < tl.where(valid, H, 0),
                    other=0)
        acc += tl.where(valid, w, 0.0) * x.to(tl.float32)
    acc = round_for_store(acc, out_ptr.dtype.element_ty, SOFTWARE)
    tl.store(out_ptr + t * H + h, acc.to(out_ptr.dtype.element_ty), mask=h < H)


def unpermute_out(expert_out: torch.Tensor, row_of_pair: torch.Tensor,
                  topk_weights: torch.Tensor, out: torch.Tensor) -> None:
    """expert_out (R, H) contiguous -> out (T, H) contiguous:
    sum_k w[t,k] * expert_out[row_of_pair[t,k]]."""
    T, K = row_of_pair.shape
    R, H = expert_out.shape
    if T > 0 and H > 0:
        block = min(next_power_of_2(H), 1024)
        _unpermute_kernel[(T, cdiv(H, block))](expert_out, row_of_pair.contiguous(),
                                                      topk_weights.contiguous(),
                                                      out, H, R, K=K, BLOCK_H=block,
                                                      SOFTWARE=SOFTWARE_ROUNDING,
                                                      num_warps=4 if block >= 512 else 1)


def unpermute(expert_out: torch.Tensor, row_of_pair: torch.Tensor, topk_weights: torch.Tensor):
    """unpermute_out into a new (T, H) tensor of expert_out's dtype."""
    out = torch.empty((row_of_pair.shape[0], expert_out.shape[1]), dtype=expert_out.dtype,
                      device=expert_out.device)
    unpermute_out(expert_out, row_of_pair, topk_weights, out)
    return out
