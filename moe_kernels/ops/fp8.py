"""FP8 block-scaled quantization: schemas, checks, public API.

Ops (each with a `_triton` variant): `quantize_fp8_per_token_group` (1 x group_size
activation groups), `quantize_fp8_block` (weight blocks), `dequantize_fp8_block`,
`silu_and_mul_quant_fp8` (the MoE activation fused with the quantization); internal and
Triton only: `gather_rows_quant_fp8` (the quantization fused with permute's row gather).
Scales are dequantization multipliers (real = fp8 * scale). Not differentiable:
quantization is a rounding step. Semantics: docs/api.md; NaN/inf rules and layouts:
docs/fp8.md.
"""

from __future__ import annotations

import torch

from moe_kernels import _library
from moe_kernels._common import FLOAT_DTYPES, FLOAT_DTYPES_F64, FP8, FP8_MAX, INDEX_DTYPES, cdiv
from moe_kernels._validate import (check_bool, check_float_tensor, check_fp8,
                                   check_last_dim_contiguous, check_out, check_same_device,
                                   check_scales, check_tensor)
from moe_kernels.reference import fp8 as reference
from moe_kernels.reference.permute import valid_rows

# --- schemas and fakes -----------------------------------------------------------------------

def _fake_token_groups(x, group_size, eps, scale_ue8m0, column_major_scales):
    M, K = x.shape
    G = cdiv(K, group_size)
    s = (x.new_empty((G, M), dtype=torch.float32).t() if column_major_scales
         else x.new_empty((M, G), dtype=torch.float32))
    return x.new_empty((M, K), dtype=FP8), s


def _fake_block(w, block_n, block_k, eps):
    *batch, N, K = w.shape
    return (w.new_empty(w.shape, dtype=FP8),
            w.new_empty((*batch, cdiv(N, block_n), cdiv(K, block_k)), dtype=torch.float32))


def _fake_dequant(q, s, block_n, block_k, dtype):
    return q.new_empty(q.shape, dtype=dtype)


def _fake_silu(x, group_size, eps):
    M, N = x.shape[0], x.shape[1] // 2
    return (x.new_empty((M, N), dtype=FP8),
            x.new_empty((M, cdiv(N, group_size)), dtype=torch.float32))


def _fake_silu_masked(x, masked_m, group_size, eps):
    E, M, N = x.shape[0], x.shape[1], x.shape[2] // 2
    return (x.new_empty((E, M, N), dtype=FP8),
            x.new_empty((E, M, cdiv(N, group_size)), dtype=torch.float32))


def _fake_gathered(x, pair_of_row, row_of_pair, group_size, eps):
    R, H = pair_of_row.shape[0], x.shape[1]
    return (x.new_empty((R, H), dtype=FP8),
            x.new_empty((R, cdiv(H, group_size)), dtype=torch.float32))


_KERNELS = dict(triton="fp8", native=("cpu",))


# The Triton variants' own checks (schema arguments), beside the op's C++ check: their
# group and block sizes are tiles (_check_power_of_two, below).
def _triton_group_check(op: str):
    return lambda x, group_size, *rest: _check_power_of_two(op, "group_size", group_size)


def _triton_block_check(op: str, first: int):
    return lambda *args: _check_block_sizes(op, args[first], args[first + 1])


def _op(name: str, signature: str, fake, triton_check):
    return _library.Op(name, signature, fake=fake, triton_check=triton_check(name), **_KERNELS)


QUANTIZE_FP8_PER_TOKEN_GROUP = _op(
    "quantize_fp8_per_token_group", "(Tensor x, int group_size, float eps, bool scale_ue8m0, "
    "bool column_major_scales) -> (Tensor, Tensor)", _fake_token_groups, _triton_group_check)
QUANTIZE_FP8_BLOCK = _op(
    "quantize_fp8_block", "(Tensor w, int block_n, int block_k, float eps) -> (Tensor, Tensor)",
    _fake_block, lambda op: _triton_block_check(op, 1))
DEQUANTIZE_FP8_BLOCK = _op(
    "dequantize_fp8_block", "(Tensor q, Tensor s, int block_n, int block_k, ScalarType dtype) "
    "-> Tensor", _fake_dequant, lambda op: _triton_block_check(op, 2))
SILU_AND_MUL_QUANT_FP8 = _op(
    "silu_and_mul_quant_fp8", "(Tensor x, int group_size, float eps) -> (Tensor, Tensor)",
    _fake_silu, _triton_group_check)
# out= variants: q and s written into the caller's buffers.
QUANTIZE_FP8_PER_TOKEN_GROUP_OUT = _op(
    "quantize_fp8_per_token_group_out", "(Tensor x, int group_size, float eps, "
    "bool scale_ue8m0, Tensor(a!) q, Tensor(b!) s) -> ()", _library.no_output,
    _triton_group_check)
SILU_AND_MUL_QUANT_FP8_OUT = _op(
    "silu_and_mul_quant_fp8_out", "(Tensor x, int group_size, float eps, Tensor(a!) q, "
    "Tensor(b!) s) -> ()", _library.no_output, _triton_group_check)
# The masked layout (E, M, 2N) with masked_m: only the rows below masked_m[e] read.
SILU_AND_MUL_QUANT_FP8_MASKED = _library.Op(
    "silu_and_mul_quant_fp8_masked", "(Tensor x, Tensor masked_m, int group_size, float eps) "
    "-> (Tensor, Tensor)", fake=_fake_silu_masked,
    triton_check=lambda x, masked_m, group_size, *rest: _check_power_of_two(
        "silu_and_mul_quant_fp8_masked", "group_size", group_size), **_KERNELS)
SILU_AND_MUL_QUANT_FP8_MASKED_OUT = _library.Op(
    "silu_and_mul_quant_fp8_masked_out", "(Tensor x, Tensor masked_m, int group_size, "
    "float eps, bool zero_fill, Tensor(a!) q, Tensor(b!) s) -> ()", fake=_library.no_output,
    triton_check=lambda x, masked_m, group_size, *rest: _check_power_of_two(
        "silu_and_mul_quant_fp8_masked_out", "group_size", group_size), **_KERNELS)
# Quantization fused with permute's row gather, for fused_moe_fp8's Triton path (internal:
# Triton only, so its Triton check is every check; the "cuda" backend borrows it).
GATHER_ROWS_QUANT_FP8 = _library.Op(
    "gather_rows_quant_fp8", "(Tensor x, Tensor pair_of_row, Tensor row_of_pair, "
    "int group_size, float eps) -> (Tensor, Tensor)", fake=_fake_gathered, triton="fp8",
    borrow={"cuda": "triton"}, triton_check=lambda *args: _check_gathered(*args))


# --- checks ----------------------------------------------------------------------------------

def _check_power_of_two(op: str, name: str, value) -> None:
    """A group or block size: one Triton tile, so a power of two within Triton's tile cap."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{op}: {name} must be an int, got {type(value).__name__}")
    if value < 1 or value & (value - 1) or value > _library.TRITON_MAX_TILE:
        raise ValueError(f"{op}: {name} must be a power of two <= {_library.TRITON_MAX_TILE} "
                         f"(the Triton tile), got {value}")


def _check_block_sizes(op: str, block_n, block_k) -> None:
    _check_power_of_two(op, "block[0]", block_n)
    _check_power_of_two(op, "block[1]", block_k)
    if block_n * block_k > _library.TRITON_MAX_TILE:
        raise ValueError(f"{op}: block[0] * block[1] must be <= {_library.TRITON_MAX_TILE} "
                         f"(one Triton tile), got {block_n} * {block_k}")



# The smallest eps whose scale eps / 448 is a normal float32: below it a zero group's scale
# underflows (to a subnormal, or 0, and 0 / 0 gives NaN values).
MIN_EPS = FP8_MAX * torch.finfo(torch.float32).tiny


def _check_eps(op: str, eps) -> None:
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) \
            or not MIN_EPS <= eps < float("inf"):
        raise ValueError(f"{op}: eps must be a finite float >= {MIN_EPS:.3g} (so that the "
                         f"scale eps / 448 is a normal float32), got {eps!r}")


def _check_block(op: str, block):
    if not isinstance(block, (tuple, list)) or len(block) != 2:
        raise TypeError(f"{op}: block must be a pair (block_n, block_k), got {block!r}")
    _check_block_sizes(op, block[0], block[1])
    return int(block[0]), int(block[1])


def _check_activation(op: str, x) -> None:
    check_tensor(op, "x", x, ndim=2, dtypes=FLOAT_DTYPES)
    check_last_dim_contiguous(op, "x", x)


def _check_gathered(x, pair_of_row, row_of_pair, group_size, eps) -> None:
    """gather_rows_quant_fp8's arguments: pair_of_row's values need no check (a pair
    outside [0, T*K) is a padding row, nothing read)."""
    op = "gather_rows_quant_fp8"
    _check_activation(op, x)
    check_tensor(op, "pair_of_row", pair_of_row, ndim=1, dtypes=(torch.int32,))
    check_tensor(op, "row_of_pair", row_of_pair, ndim=2, dtypes=(torch.int32,))
    if row_of_pair.shape[0] != x.shape[0]:
        raise ValueError(f"{op}: row_of_pair must have one row per row of x ({x.shape[0]}), "
                         f"got shape {tuple(row_of_pair.shape)}")
    _check_power_of_two(op, "group_size", group_size)
    _check_eps(op, eps)


def _check_quant_out(op, out, x, width, group_size, column_major, rows_shape=None,
                     inputs=None):
    """out = (q (*rows_shape, width) float8_e4m3fn, s (*rows_shape, G) float32, for 2-D
    row- or column-major as column_major says), both contiguous in their layout,
    overlapping neither the inputs (default: x) nor each other; rows_shape defaults to
    (M,), x's rows. Returns (q, s)."""
    if not isinstance(out, (tuple, list)) or len(out) != 2:
        raise TypeError(f"{op}: out must be a pair (q, s) of tensors, got {type(out).__name__}")
    q, s = out
    rows_shape = (x.shape[0],) if rows_shape is None else tuple(rows_shape)
    inputs = {"x": x} if inputs is None else inputs
    G = cdiv(width, group_size)
    check_out(op, "out[0] (q)", q, (*rows_shape, width), (FP8,), "x", x, inputs)
    check_tensor(op, "out[1] (s)", s, ndim=len(rows_shape) + 1)
    if tuple(s.shape) != (*rows_shape, G):
        raise ValueError(f"{op}: out[1] (s) must have shape {(*rows_shape, G)}, got "
                         f"{tuple(s.shape)}")
    # one rule for both layouts: the view that must be contiguous
    rows = s.t() if column_major else s
    check_out(op, "out[1].t() (s, column_major_scales=True)" if column_major else "out[1] (s)",
              rows, rows.shape, (torch.float32,), "x", x, {**inputs, "out[0] (q)": q})
    return q, s


# --- the internal layer: arguments checked, backend resolved -----------------------------

def quantize_fp8_per_token_group_unchecked(backend, x, group_size, eps, scale_ue8m0,
                                           column_major_scales):
    if backend == "reference":
        return reference.quantize_fp8_per_token_group(x, group_size, eps, scale_ue8m0,
                                                      column_major_scales)
    return tuple(QUANTIZE_FP8_PER_TOKEN_GROUP.kernel(backend)(
        x, group_size, eps, scale_ue8m0, column_major_scales))


def quantize_fp8_per_token_group_out_unchecked(backend, x, group_size, eps, scale_ue8m0, q, s):
    if backend == "reference":
        _copy_pair((q, s), reference.quantize_fp8_per_token_group(x, group_size, eps,
                                                                  scale_ue8m0, False))
    else:
        QUANTIZE_FP8_PER_TOKEN_GROUP_OUT.kernel(backend)(x, group_size, eps, scale_ue8m0, q, s)
    return q, s


def gather_rows_quant_fp8_unchecked(backend, x, pair_of_row, row_of_pair, group_size, eps):
    """x's rows quantized per token group and permuted (reference.gather_rows_quant_fp8)."""
    if backend == "reference":
        return reference.gather_rows_quant_fp8(x, pair_of_row, row_of_pair, group_size, eps)
    return tuple(GATHER_ROWS_QUANT_FP8.kernel(backend)(x, pair_of_row, row_of_pair,
                                                       group_size, eps))


def silu_and_mul_quant_fp8_unchecked(backend, x, group_size):
    if backend == "reference":
        return reference.silu_and_mul_quant_fp8(x, group_size)
    return tuple(SILU_AND_MUL_QUANT_FP8.kernel(backend)(x, group_size, 1e-10))


def silu_and_mul_quant_fp8_out_unchecked(backend, x, group_size, q, s):
    if backend == "reference":
        _copy_pair((q, s), reference.silu_and_mul_quant_fp8(x, group_size))
    else:
        SILU_AND_MUL_QUANT_FP8_OUT.kernel(backend)(x, group_size, 1e-10, q, s)
    return q, s


def silu_and_mul_quant_fp8_masked_unchecked(backend, x, masked_m, group_size):
    if backend == "reference":
        return reference.silu_and_mul_quant_fp8_masked(x, masked_m, group_size)
    return tuple(SILU_AND_MUL_QUANT_FP8_MASKED.kernel(backend)(x, masked_m, group_size, 1e-10))


def silu_and_mul_quant_fp8_masked_out_unchecked(backend, x, masked_m, group_size, zero_fill,
                                                q, s):
    if backend == "reference":
        result = reference.silu_and_mul_quant_fp8_masked(x, masked_m, group_size)
        if not zero_fill:
            keep = valid_rows(masked_m, x.shape[1])[..., None]
            result = (torch.where(keep, result[0].view(torch.uint8), q.view(torch.uint8))
                      .view(FP8), torch.where(keep, result[1], s))
        _copy_pair((q, s), result)
    else:
        SILU_AND_MUL_QUANT_FP8_MASKED_OUT.kernel(backend)(x, masked_m, group_size, 1e-10,
                                                          zero_fill, q, s)
    return q, s


def _copy_pair(out, result):
    for buf, value in zip(out, result):
        buf.copy_(value)


# --- public API -------------------------------------------------------------------------------

def quantize_fp8_per_token_group(x: torch.Tensor, group_size: int = 128, *, eps: float = 1e-10,
                                 scale_ue8m0: bool = False, column_major_scales: bool = False,
                                 out: tuple[torch.Tensor, torch.Tensor] | None = None,
                                 backend: str | None = None):
    """x (M, K) float32 | bfloat16 | float16, last dim contiguous -> q (M, K) float8_e4m3fn,
    s (M, ceil(K / group_size)) float32 with real = q * s per group of group_size columns.
    scale_ue8m0: scales rounded up to powers of two (data quantized with them).
    column_major_scales: s has strides (1, M) (DeepGEMM's layout of activation scales).
    out: (q, s) buffers to write into and return instead (q contiguous; s contiguous, or
    s.t() contiguous with column_major_scales; neither overlapping x or the other)."""
    op = "quantize_fp8_per_token_group"
    _check_activation(op, x)
    _check_power_of_two(op, "group_size", group_size)
    _check_eps(op, eps)
    check_bool(op, "scale_ue8m0", scale_ue8m0)
    check_bool(op, "column_major_scales", column_major_scales)
    backend = QUANTIZE_FP8_PER_TOKEN_GROUP.resolve(backend, x)
    if out is None:
        return quantize_fp8_per_token_group_unchecked(
            backend, x, group_size, float(eps), scale_ue8m0, column_major_scales)
    q, s = _check_quant_out(op, out, x, x.shape[1], group_size, column_major_scales)
    return quantize_fp8_per_token_group_out_unchecked(backend, x, group_size, float(eps),
                                                      scale_ue8m0, q, s)


def quantize_fp8_block(w: torch.Tensor, block=(128, 128), *, eps: float = 1e-10,
                       backend: str | None = None):
    """w (..., N, K) float32 | bfloat16 | float16 | float64 -> q (..., N, K) float8_e4m3fn,
    s (..., ceil(N/bn), ceil(K/bk)) float32, one scale per block (DeepSeek's
    weight_scale_inv layout)."""
    op = "quantize_fp8_block"
    check_float_tensor(op, "w", w)
    if w.dtype not in FLOAT_DTYPES_F64:    # an fp8 w: dequantize it first
        raise TypeError(f"{op}: w must be float32, bfloat16, float16 or float64, got {w.dtype}")
    if w.dim() < 2:
        raise ValueError(f"{op}: w must be at least 2-D (..., N, K), got shape {tuple(w.shape)}")
    bn, bk = _check_block(op, block)
    _check_eps(op, eps)
    backend = QUANTIZE_FP8_BLOCK.resolve(backend, w)
    if backend == "reference":
        return reference.quantize_fp8_block(w, bn, bk, eps)
    return tuple(QUANTIZE_FP8_BLOCK.kernel(backend)(w.contiguous(), bn, bk, float(eps)))


def dequantize_fp8_block(q: torch.Tensor, s: torch.Tensor, block=(128, 128),
                         dtype: torch.dtype = torch.bfloat16, *, backend: str | None = None):
    """q (..., N, K) float8_e4m3fn, s (..., ceil(N/bn), ceil(K/bk)) float32 -> q * s as
    (..., N, K) dtype, computed in float32."""
    op = "dequantize_fp8_block"
    check_fp8(op, "q", q)
    if q.dim() < 2:
        raise ValueError(f"{op}: q must be at least 2-D (..., N, K), got shape {tuple(q.shape)}")
    bn, bk = _check_block(op, block)
    N, K = q.shape[-2:]
    check_scales(op, "s", s, (*q.shape[:-2], cdiv(N, bn), cdiv(K, bk)), "q", q)
    if dtype not in FLOAT_DTYPES:
        raise TypeError(f"{op}: dtype must be one of {FLOAT_DTYPES}, got {dtype}")
    backend = DEQUANTIZE_FP8_BLOCK.resolve(backend, q)
    if backend == "reference":
        return reference.dequantize_fp8_block(q, s, bn, bk, dtype)
    return DEQUANTIZE_FP8_BLOCK.kernel(backend)(q.contiguous(), s.contiguous(), bn, bk, dtype)


def silu_and_mul_quant_fp8(x: torch.Tensor, group_size: int = 128, *,
                           masked_m: torch.Tensor | None = None,
                           out: tuple[torch.Tensor, torch.Tensor] | None = None,
                           zero_fill: bool = True, backend: str | None = None):
    """x (M, 2N) float = [gate | up], last dim contiguous -> quantize(silu(gate) * up) with
    the product in float32: q (M, N) float8_e4m3fn, s (M, ceil(N / group_size)) float32.
    out: (q, s) contiguous buffers to write into and return instead.

    masked_m (E,) int32 | int64: x is the masked layout (E, M, 2N) (grouped_gemm_fp8_masked's
    output), q (E, M, N), s (E, M, G); rows i >= masked_m[e] are not read and come out zero
    (q 0, scale 0), or with zero_fill=False (and out=) are not written."""
    op = "silu_and_mul_quant_fp8"
    check_bool(op, "zero_fill", zero_fill)
    if masked_m is not None:
        return _silu_and_mul_quant_masked(op, x, group_size, masked_m, out, zero_fill, backend)
    if not zero_fill:
        raise ValueError(f"{op}: zero_fill=False applies to the rows past masked_m: it needs "
                         f"masked_m and out=")
    _check_activation(op, x)
    _check_gated_width(op, x)
    _check_power_of_two(op, "group_size", group_size)
    backend = SILU_AND_MUL_QUANT_FP8.resolve(backend, x)
    if out is None:
        return silu_and_mul_quant_fp8_unchecked(backend, x, group_size)
    q, s = _check_quant_out(op, out, x, x.shape[1] // 2, group_size, False)
    return silu_and_mul_quant_fp8_out_unchecked(backend, x, group_size, q, s)


# The masked layout's rows, numbered in int32 by the Triton quantizer (its int64 division
# spilled under triton 3.6).
MASKED_MAX_ROWS = 2 ** 30


def _check_gated_width(op, x) -> None:
    if x.shape[-1] % 2:
        raise ValueError(f"{op}: x must be [gate | up] with an even width, got shape "
                         f"{tuple(x.shape)}")


def _silu_and_mul_quant_masked(op, x, group_size, masked_m, out, zero_fill, backend):
    """silu_and_mul_quant_fp8 with masked_m: x (E, M, 2N)."""
    check_tensor(op, "x", x, ndim=3, dtypes=FLOAT_DTYPES)
    check_last_dim_contiguous(op, "x", x)
    _check_gated_width(op, x)
    _check_power_of_two(op, "group_size", group_size)
    check_tensor(op, "masked_m", masked_m, ndim=1, dtypes=INDEX_DTYPES)
    if masked_m.shape[0] != x.shape[0]:
        raise ValueError(f"{op}: masked_m must have shape ({x.shape[0]},) (x's groups), got "
                         f"{tuple(masked_m.shape)}")
    check_same_device(op, "masked_m", masked_m, "x", x)
    if x.shape[0] * x.shape[1] > MASKED_MAX_ROWS:
        raise ValueError(f"{op}: x's rows E * M = {x.shape[0] * x.shape[1]} exceed "
                         f"{MASKED_MAX_ROWS} (the Triton kernel numbers them in int32)")
    if not zero_fill and out is None:
        raise ValueError(f"{op}: zero_fill=False leaves rows unwritten, so it needs out= "
                         f"(buffers whose other rows the caller owns)")
    backend = SILU_AND_MUL_QUANT_FP8_MASKED.resolve(backend, x)
    if out is None:
        return silu_and_mul_quant_fp8_masked_unchecked(backend, x, masked_m, group_size)
    q, s = _check_quant_out(op, out, x, x.shape[2] // 2, group_size, False,
                            rows_shape=x.shape[:2], inputs={"x": x, "masked_m": masked_m})
    return silu_and_mul_quant_fp8_masked_out_unchecked(backend, x, masked_m, group_size,
                                                       zero_fill, q, s)
