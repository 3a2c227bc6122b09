"""Token permutation and unpermutation (SPEC section 2): API and registration.

Each public function is an index computation followed by a data movement, both per
backend: `permute_index` (counts, padded offsets, stable row of every pair),
`gather_rows` (rows of `hidden` into expert order, zero padding) and `unpermute` (the
top-k weighted sum back into token order, float32 accumulation). `gather_rows` and
`unpermute` carry autograd formulas (PyTorch; the backward of each is the other's
pattern). Layouts: docs/permute.md.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from moe_kernels import _library
from moe_kernels._validate import (check_float_tensor, check_int, check_same_device,
                                   check_tensor)
from moe_kernels.reference import permute as reference

SUPPORTED = ("reference", "triton", "cpu", "cuda")
# "cuda": index computation in CUDA (csrc/cuda/permute.cuh), rows moved by the Triton
# kernels; it holds kWarps x E counts in shared memory, hence the bound on E.
CUDA_MAX_EXPERTS = 1024
ID_DTYPES = (torch.int32, torch.int64)


class PermuteLayout(NamedTuple):
    """Where each routed pair went (R = T*K + E*(align-1) rows)."""
    expert_offsets: torch.Tensor     # (E+1,) int64: expert e owns rows [off[e], off[e+1])
    tokens_per_expert: torch.Tensor  # (E,) int32: routed pairs per expert (before padding)
    m_indices: torch.Tensor          # (R,) int32: expert of each row, -1 for padding rows
    row_of_pair: torch.Tensor        # (T, K) int32: row of pair (t, k), -1 when skipped
    pair_of_row: torch.Tensor        # (R,) int32: pair t*K+k of each row, -1 for padding
    scales: torch.Tensor | None = None  # (R, S) permuted activation scales, when given


class MaskedLayout(NamedTuple):
    """The masked (E, M, H) layout: expert e's tokens in rows [0, masked_m[e])."""
    masked_m: torch.Tensor           # (E,) int32: min(tokens_per_expert, M)
    tokens_per_expert: torch.Tensor  # (E,) int32: routed pairs, also those beyond M
    row_of_pair: torch.Tensor        # (T, K) int32: flat row e*M + slot, -1 when skipped
    pair_of_row: torch.Tensor        # (E*M,) int32
    scales: torch.Tensor | None = None


# --- kernels per backend ----------------------------------------------------------------

def _triton():
    from moe_kernels.triton import permute as triton_permute  # imports triton lazily
    return triton_permute


_EAGER = {
    "triton": {"index": lambda *a: _triton().permute_index(*a),
               "align": lambda *a: _triton().moe_align_block_size(*a),
               "gather": lambda *a: _triton().gather_rows(*a),
               "unpermute": lambda *a: _triton().unpermute(*a)},
}
if _library.extension_loaded():
    _EAGER["cpu"] = {"index": _library._C.permute_index_cpu,
                     "align": _library._C.moe_align_block_size_cpu,
                     "gather": _library._C.gather_rows_cpu,
                     "unpermute": _library._C.unpermute_cpu}
    if _library.extension_has_cuda():
        _EAGER["cuda"] = {"index": _library._C.permute_index_cuda,
                          "align": _library._C.moe_align_block_size_cuda,
                          "gather": _EAGER["triton"]["gather"],
                          "unpermute": _EAGER["triton"]["unpermute"]}
_OP_NAMES = {"index": "permute_index", "align": "moe_align_block_size",
             "gather": "gather_rows", "unpermute": "unpermute"}


def _kernel(backend: str, what: str, needs_op: bool):
    """The callable of `what` for `backend`: the registered op under torch.compile or
    autograd, the bare kernel otherwise (docs/index.md, eager fast path)."""
    if needs_op or torch.compiler.is_compiling():
        triton_op = backend == "triton" or (backend == "cuda" and what in ("gather", "unpermute"))
        suffix = "_triton" if triton_op else ""
        return getattr(torch.ops.moe_kernels, _OP_NAMES[what] + suffix).default
    return _EAGER[backend][what]


# --- registration: Triton impls, fakes, autograd ----------------------------------------

for _what, _name in _OP_NAMES.items():
    torch.library.impl(f"moe_kernels::{_name}_triton", ["CPU", "CUDA"])(
        lambda *a, _w=_what: _EAGER["triton"][_w](*a))


def _fake_index(topk_ids, num_experts, align):
    T, K = topk_ids.shape
    R = T * K + num_experts * (align - 1)
    new = lambda shape, dt: topk_ids.new_empty(shape, dtype=dt)
    return [new((num_experts + 1,), torch.int64), new((num_experts,), torch.int32),
            new((R,), torch.int32), new((T, K), torch.int32), new((R,), torch.int32)]


def _fake_align(topk_ids, num_experts, block_size):
    R = topk_ids.numel() + num_experts * (block_size - 1)
    n_blocks = -(-R // block_size)
    return [topk_ids.new_empty((R,), dtype=torch.int32),
            topk_ids.new_empty((n_blocks,), dtype=torch.int32),
            topk_ids.new_empty((1,), dtype=torch.int32)]


def _fake_gather(x, pair_of_row, row_of_pair):
    return x.new_empty((pair_of_row.shape[0], x.shape[1]))


def _fake_unpermute(expert_out, row_of_pair, topk_weights):
    return expert_out.new_empty((row_of_pair.shape[0], expert_out.shape[1]))


def _unpermute_rows(grad, row_of_pair, weights, triton: bool):
    op = torch.ops.moe_kernels.unpermute_triton if triton else torch.ops.moe_kernels.unpermute
    return op(grad, row_of_pair, weights)


def _make_autograd(triton: bool):
    def gather_setup(ctx, inputs, output):
        ctx.save_for_backward(inputs[2])

    def gather_backward(ctx, grad):
        (row_of_pair,) = ctx.saved_tensors
        ones = torch.ones(row_of_pair.shape, dtype=torch.float32, device=grad.device)
        # d x[t] = sum_k grad[row_of_pair[t, k]]: the unpermute pattern with weight 1
        return _unpermute_rows(grad.contiguous(), row_of_pair, ones, triton), None, None

    def unpermute_setup(ctx, inputs, output):
        expert_out, row_of_pair, w = inputs
        ctx.save_for_backward(expert_out, row_of_pair, w)

    def unpermute_backward(ctx, grad):
        expert_out, row_of_pair, w = ctx.saved_tensors
        grad_eo = grad_w = None
        rows = row_of_pair.long()
        valid = rows >= 0
        if ctx.needs_input_grad[0]:
            # row r receives w * grad of its token; padding rows get zero
            R = expert_out.shape[0]
            target = torch.where(valid, rows, R).reshape(-1)
            contrib = (grad.float()[:, None, :] * w.float()[..., None]).reshape(-1, grad.shape[1])
            buf = grad.new_zeros((R + 1, grad.shape[1]), dtype=torch.float32)
            buf.index_copy_(0, target, contrib)  # targets distinct except the spare row R
            grad_eo = buf[:R].to(expert_out.dtype)
        if ctx.needs_input_grad[2]:
            gathered = expert_out.float()[torch.clamp(rows, min=0)]
            dots = (gathered * grad.float()[:, None, :]).sum(-1)
            grad_w = torch.where(valid, dots, 0.0).to(w.dtype)
        return grad_eo, None, grad_w

    suffix = "_triton" if triton else ""
    torch.library.register_autograd(f"moe_kernels::gather_rows{suffix}", gather_backward,
                                    setup_context=gather_setup)
    torch.library.register_autograd(f"moe_kernels::unpermute{suffix}", unpermute_backward,
                                    setup_context=unpermute_setup)


for _suffix in ("", "_triton"):
    torch.library.register_fake(f"moe_kernels::permute_index{_suffix}")(_fake_index)
    torch.library.register_fake(f"moe_kernels::moe_align_block_size{_suffix}")(_fake_align)
    torch.library.register_fake(f"moe_kernels::gather_rows{_suffix}")(_fake_gather)
    torch.library.register_fake(f"moe_kernels::unpermute{_suffix}")(_fake_unpermute)
    _make_autograd(_suffix == "_triton")


# --- checks --------------------------------------------------------------------------------

def _check_ids(op, topk_ids, num_experts):
    check_tensor(op, "topk_ids", topk_ids, ndim=2, dtypes=ID_DTYPES)
    check_int(op, "num_experts", num_experts, low=1)


def _check_hidden(op, hidden, topk_ids):
    check_tensor(op, "hidden", hidden, ndim=2)
    check_same_device(op, "topk_ids", topk_ids, "hidden", hidden)
    if hidden.shape[0] != topk_ids.shape[0]:
        raise ValueError(f"{op}: hidden has {hidden.shape[0]} tokens but topk_ids has "
                         f"{topk_ids.shape[0]} rows")


def _check_scales(op, scales, hidden):
    if scales is None:
        return
    check_tensor(op, "scales", scales, ndim=2)
    check_same_device(op, "scales", scales, "hidden", hidden)
    if scales.shape[0] != hidden.shape[0]:
        raise ValueError(f"{op}: scales must have one row per token ({hidden.shape[0]}), got "
                         f"shape {tuple(scales.shape)}")


def _check_cuda_experts(op, backend, num_experts):
    if backend == "cuda" and num_experts > CUDA_MAX_EXPERTS:
        raise ValueError(f"{op}: the cuda backend takes num_experts <= {CUDA_MAX_EXPERTS}, got "
                         f"{num_experts}; use backend='triton'")


# --- public API ------------------------------------------------------------------------------

def moe_align_block_size(topk_ids: torch.Tensor, num_experts: int, block_size: int, *,
                         backend: str | None = None):
    """The vLLM fused_moe layout, deterministic (ascending pair index inside an expert).

    topk_ids: (T, K) int32 | int64; ids < 0 or >= num_experts are skipped.
    Returns sorted_token_ids (T*K + E*(block_size-1),) int32 padded with T*K,
    expert_ids (ceil(len / block_size),) int32 with -1 for unused blocks, and
    num_tokens_post_padded (1,) int32."""
    op = "moe_align_block_size"
    _check_ids(op, topk_ids, num_experts)
    check_int(op, "block_size", block_size, low=1)
    backend = _library.resolve_backend_of(backend, topk_ids, op, SUPPORTED)
    _check_cuda_experts(op, backend, num_experts)
    if backend == "reference":
        return reference.moe_align_block_size(topk_ids, num_experts, block_size)
    return tuple(_kernel(backend, "align", False)(topk_ids, num_experts, block_size))


def permute(hidden: torch.Tensor, topk_ids: torch.Tensor, num_experts: int, *,
            align: int = 1, scales: torch.Tensor | None = None,
            backend: str | None = None):
    """Rows of `hidden` grouped by expert (expert 0 first, ascending pair index inside),
    each expert's segment padded to a multiple of `align`.

    hidden: (T, H) any dtype; topk_ids: (T, K) int32 | int64; scales: (T, S) (e.g. FP8
    activation scales, H/128 per row), permuted alongside into layout.scales.
    Returns permuted (R, H) with R = T*K + E*(align-1) (padding rows zero) and a
    PermuteLayout. Differentiable w.r.t. hidden."""
    op = "permute"
    _check_ids(op, topk_ids, num_experts)
    _check_hidden(op, hidden, topk_ids)
    check_int(op, "align", align, low=1)
    _check_scales(op, scales, hidden)
    backend = _library.resolve_backend_of(backend, hidden, op, SUPPORTED)
    _check_cuda_experts(op, backend, num_experts)
    if backend == "reference":
        out, out_scales, index = reference.permute(hidden, topk_ids, num_experts, align, scales)
        return out, PermuteLayout(*index, scales=out_scales)
    index = _kernel(backend, "index", False)(topk_ids, num_experts, align)
    out = _gather(backend, hidden, index[4], index[3])
    out_scales = _gather(backend, scales, index[4], index[3]) if scales is not None else None
    return out, PermuteLayout(*index, scales=out_scales)


def _gather(backend, x, pair_of_row, row_of_pair):
    grad = x.requires_grad and torch.is_grad_enabled()
    return _kernel(backend, "gather", grad)(x.contiguous(), pair_of_row, row_of_pair)


def permute_masked(hidden: torch.Tensor, topk_ids: torch.Tensor, num_experts: int,
                   max_tokens_per_expert: int, *, scales: torch.Tensor | None = None,
                   backend: str | None = None):
    """The masked layout (decode, expert parallel): permuted (E, M, H), M =
    max_tokens_per_expert, expert e's pairs in rows [0, masked_m[e]) in ascending pair
    order, the rest zero. Pairs beyond M are dropped (row_of_pair -1); compare
    layout.tokens_per_expert with M to detect it without a host sync."""
    op = "permute_masked"
    _check_ids(op, topk_ids, num_experts)
    _check_hidden(op, hidden, topk_ids)
    check_int(op, "max_tokens_per_expert", max_tokens_per_expert, low=1)
    _check_scales(op, scales, hidden)
    backend = _library.resolve_backend_of(backend, hidden, op, SUPPORTED)
    _check_cuda_experts(op, backend, num_experts)
    E, M = num_experts, max_tokens_per_expert
    if backend == "reference":
        index = reference.permute_index(topk_ids, E, 1)
    else:
        index = _kernel(backend, "index", False)(topk_ids, E, 1)
    masked_m, counts, row_of_pair, pair_of_row = _masked_index(topk_ids, index, E, M)
    if backend == "reference":
        gather = lambda x: reference.gather_rows(x, pair_of_row, topk_ids.shape[1])
    else:
        gather = lambda x: _gather(backend, x, pair_of_row, row_of_pair)
    out = gather(hidden).view(E, M, hidden.shape[1])
    out_scales = gather(scales).view(E, M, scales.shape[1]) if scales is not None else None
    return out, MaskedLayout(masked_m, counts, row_of_pair, pair_of_row, out_scales)


def _masked_index(topk_ids, index, E, M):
    """Contiguous index (align=1) -> masked one, with tensor ops only (no host sync)."""
    offsets, counts, _, row_of_pair, _ = index
    ids = topk_ids.long()
    routed = row_of_pair >= 0
    e_safe = torch.where(routed, ids, 0)
    slot = row_of_pair.long() - offsets[e_safe]
    kept = routed & (slot < M)
    rows = torch.where(kept, e_safe * M + slot, -1)
    P = topk_ids.numel()
    target = torch.where(kept, rows, E * M).reshape(-1)
    pair_of_row = torch.full((E * M + 1,), -1, dtype=torch.int64, device=ids.device)
    pair_of_row.scatter_(0, target, torch.arange(P, device=ids.device))
    return (torch.clamp(counts, max=M).int(), counts, rows.int(),
            pair_of_row[:E * M].int())


def unpermute(expert_out: torch.Tensor, layout, topk_weights: torch.Tensor, *,
              backend: str | None = None) -> torch.Tensor:
    """out[t] = sum_k topk_weights[t, k] * expert_out[layout.row_of_pair[t, k]], in float32,
    returned in expert_out's dtype; skipped pairs add nothing.

    expert_out: (R, H), or (E, M, H) for a MaskedLayout; topk_weights: (T, K) float.
    Differentiable w.r.t. expert_out and topk_weights."""
    op = "unpermute"
    check_tensor(op, "expert_out", expert_out)
    if expert_out.dim() == 3:
        expert_out = expert_out.reshape(-1, expert_out.shape[2])
    check_tensor(op, "expert_out", expert_out, ndim=2)
    row_of_pair = getattr(layout, "row_of_pair", None)
    if not isinstance(row_of_pair, torch.Tensor):
        raise TypeError(f"{op}: layout must be the PermuteLayout or MaskedLayout of permute")
    check_float_tensor(op, "topk_weights", topk_weights, ndim=2)
    if topk_weights.shape != row_of_pair.shape:
        raise ValueError(f"{op}: topk_weights must have shape {tuple(row_of_pair.shape)} (the "
                         f"layout's (T, K)), got {tuple(topk_weights.shape)}")
    check_same_device(op, "topk_weights", topk_weights, "expert_out", expert_out)
    check_same_device(op, "layout", row_of_pair, "expert_out", expert_out)
    backend = _library.resolve_backend_of(backend, expert_out, op, SUPPORTED)
    if backend == "reference":
        return reference.unpermute(expert_out, row_of_pair, topk_weights)
    grad = torch.is_grad_enabled() and (expert_out.requires_grad or topk_weights.requires_grad)
    return _kernel(backend, "unpermute", grad)(expert_out.contiguous(), row_of_pair,
                                               topk_weights.contiguous())
