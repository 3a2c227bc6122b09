"""Token permutation and unpermutation: schemas, checks, public API.

Each public function is an index computation followed by a data movement, both per
backend: `permute_index` (counts, padded offsets, stable row of every pair),
`gather_rows` (rows of `hidden` into expert order, zero padding) and `unpermute` (the
top-k weighted sum back into token order, float32 accumulation). `gather_rows` and
`unpermute` carry autograd formulas (PyTorch; the backward of each is the other's
pattern). `permute` and `permute_masked` are registered too, as composite ops over these.
Semantics: docs/api.md; layouts: docs/permute.md.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from moe_kernels import _library
from moe_kernels._common import FLOAT_DTYPES, INDEX_DTYPES, cdiv
from moe_kernels._validate import (all_strided, check_differentiable_kernel, check_float_tensor,
                                   check_int, check_no_grad_inputs, check_out,
                                   check_same_device, check_tensor)
from moe_kernels.reference import permute as reference


class PermuteLayout(NamedTuple):
    """Where each routed pair went (R = T*K + min(E, T*K)*(align-1) rows)."""
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


# --- schemas and kernels: index in C++/CUDA/Triton; rows moved by C++ on the CPU and by
# Triton on the GPU (the "cuda" backend borrows the Triton row kernels) -------------------

def _fake_index(topk_ids, num_experts, align):
    T, K = topk_ids.shape
    R = reference.permuted_rows(T * K, num_experts, align)
    new = lambda shape, dt: topk_ids.new_empty(shape, dtype=dt)
    return [new((num_experts + 1,), torch.int64), new((num_experts,), torch.int32),
            new((R,), torch.int32), new((T, K), torch.int32), new((R,), torch.int32)]


def _fake_masked_index(topk_ids, num_experts, max_tokens):
    T, K = topk_ids.shape
    new = lambda *shape: topk_ids.new_empty(shape, dtype=torch.int32)
    return [new(num_experts), new(num_experts), new(T, K), new(num_experts * max_tokens)]


def _fake_align(topk_ids, num_experts, block_size):
    R = reference.permuted_rows(topk_ids.numel(), num_experts, block_size)
    return [topk_ids.new_empty((R,), dtype=torch.int32),
            topk_ids.new_empty((cdiv(R, block_size),), dtype=torch.int32),
            topk_ids.new_empty((1,), dtype=torch.int32)]


def _fake_gather(x, pair_of_row, row_of_pair):
    return x.new_empty((pair_of_row.shape[0], x.shape[1]))


def _fake_unpermute(expert_out, row_of_pair, topk_weights):
    return expert_out.new_empty((row_of_pair.shape[0], expert_out.shape[1]))


_INDEX_KERNELS = dict(triton="permute", native=("cpu", "cuda"))
_ROW_KERNELS = dict(triton="permute", native=("cpu",), borrow={"cuda": "triton"})
PERMUTE_INDEX = _library.Op(
    "permute_index", "(Tensor topk_ids, int num_experts, int align) -> Tensor[]",
    fake=_fake_index, **_INDEX_KERNELS)
# The masked layout's index straight from the ids (C++ on the CPU; Triton, which the
# "cuda" backend borrows as it does for the rows).
PERMUTE_MASKED_INDEX = _library.Op(
    "permute_masked_index", "(Tensor topk_ids, int num_experts, int max_tokens) -> Tensor[]",
    fake=_fake_masked_index, triton="permute", native=("cpu",), borrow={"cuda": "triton"})
MOE_ALIGN_BLOCK_SIZE = _library.Op(
    "moe_align_block_size", "(Tensor topk_ids, int num_experts, int block_size) -> Tensor[]",
    fake=_fake_align, **_INDEX_KERNELS)
GATHER_ROWS = _library.Op(
    "gather_rows", "(Tensor x, Tensor pair_of_row, Tensor row_of_pair) -> Tensor",
    fake=_fake_gather, **_ROW_KERNELS)
UNPERMUTE = _library.Op(
    "unpermute", "(Tensor expert_out, Tensor row_of_pair, Tensor topk_weights) -> Tensor",
    fake=_fake_unpermute, **_ROW_KERNELS)
# out= variants of the row ops (permute's / unpermute's out=): no autograd, as in torch.
GATHER_ROWS_OUT = _library.Op(
    "gather_rows_out", "(Tensor x, Tensor pair_of_row, Tensor row_of_pair, Tensor(a!) out) -> ()",
    fake=_library.no_output, **_ROW_KERNELS)
UNPERMUTE_OUT = _library.Op(
    "unpermute_out", "(Tensor expert_out, Tensor row_of_pair, Tensor topk_weights, "
    "Tensor(a!) out) -> ()", fake=_library.no_output, **_ROW_KERNELS)


# --- autograd: the backward of each row op is the other's pattern -------------------------

def _sum_rows_back(grad, row_of_pair, backend):
    """d x[t] = sum_k grad[row_of_pair[t, k]]: the unpermute pattern with weight 1, through
    `backend`'s registered op (differentiable again). grad: (R, H), or (E, M, H). A grad
    of a dtype the kernels do not take (permute copies rows of any dtype: float64 is what
    torch.autograd.gradcheck runs) is summed by the reference, in float64 for float64."""
    flat = grad.flatten(0, -2).contiguous()
    ones = torch.ones(row_of_pair.shape, dtype=torch.float32, device=grad.device)
    if backend == "reference" or flat.dtype not in FLOAT_DTYPES:
        return reference.unpermute(flat, row_of_pair, ones)
    return UNPERMUTE.op(backend)(flat, row_of_pair, ones)


def _gather_autograd(backend):
    def setup(ctx, inputs, output):
        ctx.save_for_backward(inputs[2])

    def backward(ctx, grad):
        (row_of_pair,) = ctx.saved_tensors
        # the plain variant runs the C++ kernel: CPU tensors only (rows on the GPU: Triton)
        return _sum_rows_back(grad, row_of_pair, backend or "cpu"), None, None
    return backward, setup


def _unpermute_autograd(backend):
    def setup(ctx, inputs, output):
        expert_out, row_of_pair, w = inputs
        ctx.save_for_backward(expert_out, row_of_pair, w)

    def backward(ctx, grad):
        expert_out, row_of_pair, w = ctx.saved_tensors
        grad_eo = grad_w = None
        rows = row_of_pair.long()
        valid = rows >= 0
        if ctx.needs_input_grad[0]:
            # row r receives w * grad of its token; padding rows get zero
            R = expert_out.shape[0]
            target = torch.where(valid, rows, R).reshape(-1)
            contrib = (grad.float()[:, None, :] * w.float()[..., None]).flatten(0, 1)
            buf = grad.new_zeros((R + 1, grad.shape[1]), dtype=torch.float32)
            buf.index_copy_(0, target, contrib)  # targets distinct except the spare row R
            grad_eo = buf[:R].to(expert_out.dtype)
        if ctx.needs_input_grad[2]:
            gathered = expert_out.float()[torch.clamp(rows, min=0)]
            dots = (gathered * grad.float()[:, None, :]).sum(-1)
            grad_w = torch.where(valid, dots, 0.0).to(w.dtype)
        return grad_eo, None, grad_w
    return backward, setup


GATHER_ROWS.register_autograd(_gather_autograd)
UNPERMUTE.register_autograd(_unpermute_autograd)


# --- checks --------------------------------------------------------------------------------

# Layout rows, pairs and experts are int32 in the index tensors (row_of_pair, pair_of_row,
# m_indices), as in the C++ kernels' checks (csrc/permute.h).
INT32_MAX = 2**31 - 1


def _check_ids(op, topk_ids, num_experts):
    check_tensor(op, "topk_ids", topk_ids, ndim=2, dtypes=INDEX_DTYPES)
    check_int(op, "num_experts", num_experts, low=1, high=INT32_MAX)


def _check_layout_size(op, topk_ids, capacity_name, capacity, rows):
    """The layout's `rows` (and its pairs) must be addressable by int32 indices."""
    if topk_ids.numel() > INT32_MAX or rows > INT32_MAX:
        raise ValueError(f"{op}: the layout of {topk_ids.numel()} pairs with {capacity_name} = "
                         f"{capacity} has {rows} rows, more than int32 indices address")


# Rows are copied as integers of the element's width (any dtype of these widths).
_ROW_ELEMENT_BYTES = (1, 2, 4, 8)


def _check_hidden(op, hidden, topk_ids):
    check_tensor(op, "hidden", hidden, ndim=2)
    if hidden.element_size() not in _ROW_ELEMENT_BYTES:
        raise TypeError(f"{op}: hidden's elements must be 1, 2, 4 or 8 bytes wide, got "
                        f"{hidden.dtype} ({hidden.element_size()} bytes)")
    check_same_device(op, "topk_ids", topk_ids, "hidden", hidden)
    if hidden.shape[0] != topk_ids.shape[0]:
        raise ValueError(f"{op}: hidden has {hidden.shape[0]} tokens but topk_ids has "
                         f"{topk_ids.shape[0]} rows")


def _check_scales(op, scales, hidden):
    if scales is None:
        return
    check_tensor(op, "scales", scales, ndim=2)
    if scales.element_size() not in _ROW_ELEMENT_BYTES:
        raise TypeError(f"{op}: scales' elements must be 1, 2, 4 or 8 bytes wide, got "
                        f"{scales.dtype}")
    check_same_device(op, "scales", scales, "hidden", hidden)
    if scales.shape[0] != hidden.shape[0]:
        raise ValueError(f"{op}: scales must have one row per token ({hidden.shape[0]}), got "
                         f"shape {tuple(scales.shape)}")


def _check_permute(op, hidden, topk_ids, num_experts, capacity_name, capacity, scales):
    _check_ids(op, topk_ids, num_experts)
    _check_hidden(op, hidden, topk_ids)
    check_int(op, capacity_name, capacity, low=1, high=INT32_MAX)
    _check_scales(op, scales, hidden)


def _resolve_index_backend(op, backend, x, num_experts):
    backend = PERMUTE_INDEX.resolve(backend, x)
    if backend == "triton" or backend == "cuda":
        _library.check_expert_limit(op, backend, "permute_cuda_max_experts", "num_experts",
                                    num_experts)
    return backend


# --- the internal layer: arguments checked, backend resolved -----------------------------

def _gather(backend, x, pair_of_row, row_of_pair, out=None):
    """x's rows in layout order: a new tensor, or written into out (rows, D) and returned.
    The kernels read x in place where its last dimension is contiguous (row strides)."""
    if out is not None:
        GATHER_ROWS_OUT.kernel(backend)(x, pair_of_row, row_of_pair, out.flatten(0, -2))
        return out
    grad = x.requires_grad and torch.is_grad_enabled()
    return GATHER_ROWS.kernel(backend, grad)(x, pair_of_row, row_of_pair)


def _copy_into(out, result):
    """The reference backend's out=: its result copied into the caller's buffer."""
    if out is None:
        return result
    return out.copy_(result)


def permute_unchecked(backend, hidden, topk_ids, num_experts, align, scales, out=None,
                      out_scales=None):
    """-> (permuted (R, H), PermuteLayout); see `permute`."""
    if backend == "reference":
        rows, rows_scales, index = reference.permute(hidden, topk_ids, num_experts, align,
                                                     scales)
        return (_copy_into(out, rows),
                PermuteLayout(*index, scales=_copy_into(out_scales, rows_scales)))
    offsets, counts, m_indices, row_of_pair, pair_of_row = PERMUTE_INDEX.kernel(backend)(
        topk_ids, num_experts, align)
    rows = _gather(backend, hidden, pair_of_row, row_of_pair, out)
    rows_scales = (_gather(backend, scales, pair_of_row, row_of_pair, out_scales)
                   if scales is not None else None)
    return rows, PermuteLayout(offsets, counts, m_indices, row_of_pair, pair_of_row, rows_scales)


def permute_masked_unchecked(backend, hidden, topk_ids, num_experts, max_tokens, scales,
                             out=None, out_scales=None):
    """-> (permuted (E, M, H), MaskedLayout); see `permute_masked`."""
    E, M = num_experts, max_tokens
    if backend == "reference":
        rows, rows_scales, index = reference.permute_masked(hidden, topk_ids, E, M, scales)
        return (_copy_into(out, rows),
                MaskedLayout(*index, scales=_copy_into(out_scales, rows_scales)))
    masked_m, counts, row_of_pair, pair_of_row = PERMUTE_MASKED_INDEX.kernel(backend)(
        topk_ids, E, M)

    def gather(x, buf):
        rows = _gather(backend, x, pair_of_row, row_of_pair, buf)
        return rows if buf is not None else rows.view(E, M, x.shape[1])
    rows_scales = gather(scales, out_scales) if scales is not None else None
    return gather(hidden, out), MaskedLayout(masked_m, counts, row_of_pair, pair_of_row,
                                             rows_scales)


def unpermute_unchecked(backend, expert_out, row_of_pair, topk_weights, out=None):
    """expert_out (R, H) (a masked (E, M, H) flattened) -> (T, H), or into out; see
    `unpermute`."""
    if backend == "reference":
        return _copy_into(out, reference.unpermute(expert_out, row_of_pair, topk_weights))
    if out is not None:
        UNPERMUTE_OUT.kernel(backend)(expert_out.contiguous(), row_of_pair,
                                      topk_weights.contiguous(), out)
        return out
    grad = torch.is_grad_enabled() and (expert_out.requires_grad or topk_weights.requires_grad)
    return UNPERMUTE.kernel(backend, grad)(expert_out.contiguous(), row_of_pair,
                                           topk_weights.contiguous())


def _layout_rows_fast(expert_out, layout):
    """layout.row_of_pair where every check of _check_layout_rows passes for a
    PermuteLayout, in a few predicates (the common case; eager overhead, docs/index.md);
    else None. A MaskedLayout takes the full checks: this saves it nothing measurable
    (13.1-14.4 us a call either way, compiled kernels, launches stubbed)."""
    if type(layout) is not PermuteLayout:
        return None
    row_of_pair, pair_of_row = layout.row_of_pair, layout.pair_of_row
    T = torch.Tensor
    if (type(expert_out) is T and type(row_of_pair) is T and type(pair_of_row) is T
            and all_strided(expert_out, row_of_pair, pair_of_row)
            and expert_out.dtype in FLOAT_DTYPES and expert_out.dim() == 2
            and row_of_pair.dtype == torch.int32 and row_of_pair.dim() == 2
            and pair_of_row.dtype == torch.int32 and pair_of_row.dim() == 1
            and expert_out.shape[0] == pair_of_row.shape[0]):
        return row_of_pair
    return None


def _check_layout_rows(op, expert_out, layout) -> torch.Tensor:
    """expert_out has exactly the rows of `layout` (R, H) for a PermuteLayout, (E, M, H) for
    a MaskedLayout: a slice or another layout's output would silently drop rows. Returns
    layout.row_of_pair."""
    row_of_pair = _layout_rows_fast(expert_out, layout)
    if row_of_pair is not None:
        return row_of_pair
    if not isinstance(layout, (PermuteLayout, MaskedLayout)):
        raise TypeError(f"{op}: layout must be the PermuteLayout or MaskedLayout of permute / "
                        f"permute_masked, got {type(layout).__name__}")
    row_of_pair, pair_of_row = layout.row_of_pair, layout.pair_of_row
    check_tensor(op, "layout.row_of_pair", row_of_pair, ndim=2, dtypes=(torch.int32,))
    check_tensor(op, "layout.pair_of_row", pair_of_row, ndim=1, dtypes=(torch.int32,))
    check_tensor(op, "expert_out", expert_out, dtypes=FLOAT_DTYPES)
    if isinstance(layout, PermuteLayout):
        want, what = (pair_of_row.shape[0],), "(R, H), R = len(layout.pair_of_row)"
    else:
        check_tensor(op, "layout.masked_m", layout.masked_m, ndim=1)
        E = layout.masked_m.shape[0]
        want, what = (E, pair_of_row.shape[0] // max(E, 1)), "(E, M, H) of the masked layout"
    if expert_out.dim() != len(want) + 1 or tuple(expert_out.shape[:-1]) != want:
        raise ValueError(f"{op}: expert_out must have shape {what} = ({', '.join(map(str, want))}"
                         f", H), got {tuple(expert_out.shape)}")
    return row_of_pair


def _check_rows_out(op, out, out_scales, rows_shape, hidden, topk_ids, scales):
    """permute's out= buffers: out rows_shape + (H,) of hidden's dtype; out_scales likewise
    for scales (only with scales)."""
    if out_scales is not None and scales is None:
        raise ValueError(f"{op}: out_scales is given but scales is not")
    inputs = {"hidden": hidden, "topk_ids": topk_ids, "scales": scales}
    if out is not None:
        check_no_grad_inputs(op, hidden=hidden)
        check_out(op, "out", out, (*rows_shape, hidden.shape[1]), (hidden.dtype,), "hidden",
                  hidden, inputs)
    if out_scales is not None:
        check_no_grad_inputs(op, scales=scales)
        check_out(op, "out_scales", out_scales, (*rows_shape, scales.shape[1]), (scales.dtype,),
                  "hidden", hidden, {**inputs, "out": out})


# --- public API ------------------------------------------------------------------------------

def moe_align_block_size(topk_ids: torch.Tensor, num_experts: int, block_size: int, *,
                         backend: str | None = None):
    """The vLLM fused_moe layout, deterministic (ascending pair index inside an expert).

    topk_ids: (T, K) int32 | int64; ids < 0 or >= num_experts are skipped.
    Returns sorted_token_ids (T*K + min(E, T*K)*(block_size-1),) int32 padded with T*K,
    expert_ids (ceil(len / block_size),) int32 with -1 for unused blocks, and
    num_tokens_post_padded (1,) int32."""
    op = "moe_align_block_size"
    _check_ids(op, topk_ids, num_experts)
    check_int(op, "block_size", block_size, low=1, high=INT32_MAX)
    _check_layout_size(op, topk_ids, "block_size", block_size,
                       reference.permuted_rows(topk_ids.numel(), num_experts, block_size))
    backend = _resolve_index_backend(op, backend, topk_ids, num_experts)
    if backend == "reference":
        return reference.moe_align_block_size(topk_ids, num_experts, block_size)
    return tuple(MOE_ALIGN_BLOCK_SIZE.kernel(backend)(topk_ids, num_experts, block_size))


def permute(hidden: torch.Tensor, topk_ids: torch.Tensor, num_experts: int, *,
            align: int = 1, scales: torch.Tensor | None = None,
            out: torch.Tensor | None = None, out_scales: torch.Tensor | None = None,
            backend: str | None = None):
    """Rows of `hidden` grouped by expert (expert 0 first, ascending pair index inside),
    each expert's segment padded to a multiple of `align`.

    hidden: (T, H) any dtype; topk_ids: (T, K) int32 | int64; scales: (T, S) (e.g. FP8
    activation scales, H/128 per row), permuted alongside into layout.scales.
    Returns permuted (R, H) with R = T*K + min(E, T*K)*(align-1) (padding rows zero) and a
    PermuteLayout. Differentiable w.r.t. hidden (without out=).
    out / out_scales: contiguous (R, H) / (R, S) buffers of hidden's / scales' dtype to
    write the permuted rows into (returned as `permuted` / `layout.scales`), sharing no
    memory with an input."""
    op = "permute"
    _check_permute(op, hidden, topk_ids, num_experts, "align", align, scales)
    _check_layout_size(op, topk_ids, "align", align,
                       reference.permuted_rows(topk_ids.numel(), num_experts, align))
    if out is not None or out_scales is not None:
        _check_rows_out(op, out, out_scales,
                        (reference.permuted_rows(topk_ids.numel(), num_experts, align),),
                        hidden, topk_ids, scales)
    backend = _resolve_index_backend(op, backend, hidden, num_experts)
    check_differentiable_kernel(op, backend, {"hidden": hidden, "scales": scales})
    return permute_unchecked(backend, hidden, topk_ids, num_experts, align, scales, out,
                             out_scales)


def permute_masked(hidden: torch.Tensor, topk_ids: torch.Tensor, num_experts: int,
                   max_tokens_per_expert: int, *, scales: torch.Tensor | None = None,
                   out: torch.Tensor | None = None, out_scales: torch.Tensor | None = None,
                   backend: str | None = None):
    """The masked layout (decode, expert parallel): permuted (E, M, H), M =
    max_tokens_per_expert, expert e's pairs in rows [0, masked_m[e]) in ascending pair
    order, the rest zero. Pairs beyond M are dropped (row_of_pair -1); compare
    layout.tokens_per_expert with M to detect it without a host sync.
    out / out_scales: contiguous (E, M, H) / (E, M, S) buffers, as in `permute`."""
    op = "permute_masked"
    _check_permute(op, hidden, topk_ids, num_experts, "max_tokens_per_expert",
                   max_tokens_per_expert, scales)
    _check_layout_size(op, topk_ids, "max_tokens_per_expert", max_tokens_per_expert,
                       num_experts * max_tokens_per_expert)
    if out is not None or out_scales is not None:
        _check_rows_out(op, out, out_scales, (num_experts, max_tokens_per_expert), hidden,
                        topk_ids, scales)
    backend = _resolve_index_backend(op, backend, hidden, num_experts)
    check_differentiable_kernel(op, backend, {"hidden": hidden, "scales": scales})
    return permute_masked_unchecked(backend, hidden, topk_ids, num_experts,
                                    max_tokens_per_expert, scales, out, out_scales)


def unpermute(expert_out: torch.Tensor, layout, topk_weights: torch.Tensor, *,
              out: torch.Tensor | None = None, backend: str | None = None) -> torch.Tensor:
    """out[t] = sum_k topk_weights[t, k] * expert_out[layout.row_of_pair[t, k]], in float32,
    returned in expert_out's dtype; skipped pairs add nothing.

    expert_out: (R, H), or (E, M, H) for a MaskedLayout; topk_weights: (T, K) float.
    out: a contiguous (T, H) buffer of expert_out's dtype to write into and return,
    sharing no memory with an input. Differentiable w.r.t. expert_out and topk_weights
    (without out=)."""
    op = "unpermute"
    row_of_pair = _check_layout_rows(op, expert_out, layout)
    if expert_out.dim() == 3:
        expert_out = expert_out.flatten(0, 1)
    check_float_tensor(op, "topk_weights", topk_weights, ndim=2)
    if topk_weights.shape != row_of_pair.shape:
        raise ValueError(f"{op}: topk_weights must have shape {tuple(row_of_pair.shape)} (the "
                         f"layout's (T, K)), got {tuple(topk_weights.shape)}")
    check_same_device(op, "topk_weights", topk_weights, "expert_out", expert_out)
    check_same_device(op, "layout", row_of_pair, "expert_out", expert_out)
    if out is not None:
        check_no_grad_inputs(op, expert_out=expert_out, topk_weights=topk_weights)
        check_out(op, "out", out, (row_of_pair.shape[0], expert_out.shape[1]),
                  (expert_out.dtype,), "expert_out", expert_out,
                  {"expert_out": expert_out, "layout.row_of_pair": row_of_pair,
                   "topk_weights": topk_weights})
    backend = UNPERMUTE.resolve(backend, expert_out)
    check_differentiable_kernel(op, backend, {"expert_out": expert_out,
                                              "topk_weights": topk_weights})
    return unpermute_unchecked(backend, expert_out, row_of_pair, topk_weights, out)


# --- the public functions as registered ops (composite: they run the ops above) -----------
# torch.ops.moe_kernels.permute / .permute_masked return the layout's tensors in field
# order, then the permuted scales: (R, 0) float32 when no scales were given (a schema
# cannot return None). They run the device's default backend.

def _scales_or_empty(layout, rows_shape, like):
    if layout.scales is not None:
        return layout.scales
    return like.new_empty((*rows_shape, 0), dtype=torch.float32)


def _permute_op(hidden, topk_ids, num_experts, align=1, scales=None):
    out, layout = permute(hidden, topk_ids, num_experts, align=align, scales=scales)
    return (out, *layout[:5], _scales_or_empty(layout, out.shape[:1], out))


def _permute_masked_op(hidden, topk_ids, num_experts, max_tokens_per_expert, scales=None):
    out, layout = permute_masked(hidden, topk_ids, num_experts, max_tokens_per_expert,
                                 scales=scales)
    return (out, *layout[:4], _scales_or_empty(layout, out.shape[:2], out))


def _fake_permute(hidden, topk_ids, num_experts, align=1, scales=None):
    index = _fake_index(topk_ids, num_experts, align)
    R = index[-1].shape[0]                                      # pair_of_row (R,)
    S, dt = (scales.shape[1], scales.dtype) if scales is not None else (0, torch.float32)
    return (hidden.new_empty((R, hidden.shape[1])), *index,
            hidden.new_empty((R, S), dtype=dt))


def _fake_permute_masked(hidden, topk_ids, num_experts, max_tokens_per_expert, scales=None):
    E, M, (T, K) = num_experts, max_tokens_per_expert, topk_ids.shape
    S, dt = (scales.shape[1], scales.dtype) if scales is not None else (0, torch.float32)
    i32 = lambda *shape: topk_ids.new_empty(shape, dtype=torch.int32)
    return (hidden.new_empty((E, M, hidden.shape[1])), i32(E), i32(E), i32(T, K), i32(E * M),
            hidden.new_empty((E, M, S), dtype=dt))


_PERMUTE_OUT = ("Tensor permuted, Tensor expert_offsets, Tensor tokens_per_expert, "
                "Tensor m_indices, Tensor row_of_pair, Tensor pair_of_row, "
                "Tensor permuted_scales")
PERMUTE = _library.Op(
    "permute", "(Tensor hidden, Tensor topk_ids, int num_experts, int align=1, "
               f"Tensor? scales=None) -> ({_PERMUTE_OUT})",
    fake=_fake_permute, composite=_permute_op, backends=PERMUTE_INDEX.backends)
PERMUTE_MASKED = _library.Op(
    "permute_masked", "(Tensor hidden, Tensor topk_ids, int num_experts, "
                      "int max_tokens_per_expert, Tensor? scales=None) -> (Tensor permuted, "
                      "Tensor masked_m, Tensor tokens_per_expert, Tensor row_of_pair, "
                      "Tensor pair_of_row, Tensor permuted_scales)",
    fake=_fake_permute_masked, composite=_permute_masked_op, backends=PERMUTE_INDEX.backends)


def _rows_back_autograd(row_of_pair_output: int):
    """Autograd of a composite permute: d hidden[t] = sum_k d permuted[row_of_pair[t, k]]."""
    def make(_backend):
        def setup(ctx, inputs, output):
            ctx.save_for_backward(output[row_of_pair_output])

        def backward(ctx, grad, *unused):
            (row_of_pair,) = ctx.saved_tensors
            d_hidden = _sum_rows_back(grad, row_of_pair, UNPERMUTE.resolve(None, grad))
            return d_hidden, None, None, None, None
        return backward, setup
    return make


PERMUTE.register_autograd(_rows_back_autograd(4))
PERMUTE_MASKED.register_autograd(_rows_back_autograd(3))
