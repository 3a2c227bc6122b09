"""FP8 block-scaled quantization (SPEC section 3): API and registration.

Ops (each also as `<name>_triton`): `quantize_fp8_per_token_group` (1 x group_size
activation groups), `quantize_fp8_block` (weight blocks), `dequantize_fp8_block`,
`silu_and_mul_quant_fp8` (the MoE activation fused with the quantization). Scales are
dequantization multipliers (real = fp8 * scale). Not differentiable: quantization is a
rounding step. Semantics, NaN/inf rules and layouts: docs/fp8.md.
"""

from __future__ import annotations

import torch

from moe_kernels import _library
from moe_kernels._validate import (FLOAT_DTYPES, check_float_tensor, check_last_dim_contiguous,
                                   check_tensor)
from moe_kernels.reference import fp8 as reference

SUPPORTED = ("reference", "triton", "cpu")
FP8 = torch.float8_e4m3fn
_NAMES = ("quantize_fp8_per_token_group", "quantize_fp8_block", "dequantize_fp8_block",
          "silu_and_mul_quant_fp8")


def _triton():
    from moe_kernels.triton import fp8 as triton_fp8  # imports triton lazily
    return triton_fp8


_EAGER = {name: {"triton": lambda *a, _n=name: getattr(_triton(), _n)(*a)} for name in _NAMES}
if _library.extension_loaded():
    for _name in _NAMES:
        _EAGER[_name]["cpu"] = getattr(_library._C, _name + "_cpu")


def _call(name: str, backend: str, *args):
    return _library.kernel_for(name, backend, _EAGER[name])(*args)


# --- registration: Triton impls and fakes ---------------------------------------------------

def _cdiv(a, b):
    return -(-a // b)


def _fake_token_groups(x, group_size, eps, scale_ue8m0, column_major_scales):
    M, K = x.shape
    G = _cdiv(K, group_size)
    s = (x.new_empty((G, M), dtype=torch.float32).t() if column_major_scales
         else x.new_empty((M, G), dtype=torch.float32))
    return x.new_empty((M, K), dtype=FP8), s


def _fake_block(w, block_n, block_k, eps):
    *batch, N, K = w.shape
    return (w.new_empty(w.shape, dtype=FP8),
            w.new_empty((*batch, _cdiv(N, block_n), _cdiv(K, block_k)), dtype=torch.float32))


def _fake_dequant(q, s, block_n, block_k, dtype):
    return q.new_empty(q.shape, dtype=dtype)


def _fake_silu(x, group_size, eps):
    M, N = x.shape[0], x.shape[1] // 2
    return (x.new_empty((M, N), dtype=FP8),
            x.new_empty((M, _cdiv(N, group_size)), dtype=torch.float32))


_FAKES = {"quantize_fp8_per_token_group": _fake_token_groups, "quantize_fp8_block": _fake_block,
          "dequantize_fp8_block": _fake_dequant, "silu_and_mul_quant_fp8": _fake_silu}
for _name in _NAMES:
    _library.register_triton_impl(_name, lambda *a, _n=_name: _EAGER[_n]["triton"](*a))
    for _suffix in ("", "_triton"):
        torch.library.register_fake(f"moe_kernels::{_name}{_suffix}")(_FAKES[_name])


# --- checks ----------------------------------------------------------------------------------

def _check_power_of_two(op: str, name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{op}: {name} must be an int, got {type(value).__name__}")
    if value < 1 or value & (value - 1):
        raise ValueError(f"{op}: {name} must be a power of two (the Triton tile), got {value}")


def _check_eps(op: str, eps) -> None:
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not eps > 0:
        raise ValueError(f"{op}: eps must be a positive float, got {eps!r}")


def _check_block(op: str, block):
    if not isinstance(block, (tuple, list)) or len(block) != 2:
        raise TypeError(f"{op}: block must be a pair (block_n, block_k), got {block!r}")
    _check_power_of_two(op, "block[0]", block[0])
    _check_power_of_two(op, "block[1]", block[1])
    return int(block[0]), int(block[1])


def _check_activation(op: str, x) -> None:
    check_tensor(op, "x", x, ndim=2, dtypes=FLOAT_DTYPES)
    check_last_dim_contiguous(op, "x", x)


def check_fp8(op: str, name: str, x, ndim: int | None = None) -> None:
    check_tensor(op, name, x, ndim=ndim)
    if x.dtype != FP8:
        raise TypeError(f"{op}: {name} must be float8_e4m3fn, got {x.dtype}")


def check_scales(op: str, name: str, s, shape: tuple, ref_name: str, ref) -> None:
    check_tensor(op, name, s, dtypes=(torch.float32,))
    if tuple(s.shape) != tuple(shape):
        raise ValueError(f"{op}: {name} must have shape {tuple(shape)} (from {ref_name}'s "
                         f"shape {tuple(ref.shape)}), got {tuple(s.shape)}")
    if s.device != ref.device:
        raise ValueError(f"{op}: {name} is on {s.device} but {ref_name} is on {ref.device}")


# --- public API -------------------------------------------------------------------------------

def quantize_fp8_per_token_group(x: torch.Tensor, group_size: int = 128, *, eps: float = 1e-10,
                                 scale_ue8m0: bool = False, column_major_scales: bool = False,
                                 backend: str | None = None):
    """x (M, K) float32 | bfloat16 | float16, last dim contiguous -> q (M, K) float8_e4m3fn,
    s (M, ceil(K / group_size)) float32 with real = q * s per group of group_size columns.
    scale_ue8m0: scales rounded up to powers of two (data quantized with them).
    column_major_scales: s has strides (1, M) (DeepGEMM's layout of activation scales)."""
    op = "quantize_fp8_per_token_group"
    _check_activation(op, x)
    _check_power_of_two(op, "group_size", group_size)
    _check_eps(op, eps)
    backend = _library.resolve_backend_of(backend, x, op, SUPPORTED)
    if backend == "reference":
        return reference.quantize_fp8_per_token_group(x, group_size, eps, bool(scale_ue8m0),
                                                      bool(column_major_scales))
    return tuple(_call(op, backend, x, group_size, float(eps), bool(scale_ue8m0),
                       bool(column_major_scales)))


def quantize_fp8_block(w: torch.Tensor, block=(128, 128), *, eps: float = 1e-10,
                       backend: str | None = None):
    """w (..., N, K) float -> q (..., N, K) float8_e4m3fn, s (..., ceil(N/bn), ceil(K/bk))
    float32, one scale per block (DeepSeek's weight_scale_inv layout)."""
    op = "quantize_fp8_block"
    check_float_tensor(op, "w", w)
    if w.dim() < 2:
        raise ValueError(f"{op}: w must be at least 2-D (..., N, K), got shape {tuple(w.shape)}")
    bn, bk = _check_block(op, block)
    _check_eps(op, eps)
    backend = _library.resolve_backend_of(backend, w, op, SUPPORTED)
    if backend == "reference":
        return reference.quantize_fp8_block(w, bn, bk, eps)
    return tuple(_call(op, backend, w.contiguous(), bn, bk, float(eps)))


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
    check_scales(op, "s", s, (*q.shape[:-2], _cdiv(N, bn), _cdiv(K, bk)), "q", q)
    if dtype not in FLOAT_DTYPES:
        raise TypeError(f"{op}: dtype must be one of {FLOAT_DTYPES}, got {dtype}")
    backend = _library.resolve_backend_of(backend, q, op, SUPPORTED)
    if backend == "reference":
        return reference.dequantize_fp8_block(q, s, bn, bk, dtype)
    return _call(op, backend, q.contiguous(), s.contiguous(), bn, bk, dtype)


def silu_and_mul_quant_fp8(x: torch.Tensor, group_size: int = 128, *,
                           backend: str | None = None):
    """x (M, 2N) float = [gate | up], last dim contiguous -> quantize(silu(gate) * up) with
    the product in float32: q (M, N) float8_e4m3fn, s (M, ceil(N / group_size)) float32."""
    op = "silu_and_mul_quant_fp8"
    _check_activation(op, x)
    if x.shape[1] % 2:
        raise ValueError(f"{op}: x must be [gate | up] with an even width, got shape "
                         f"{tuple(x.shape)}")
    _check_power_of_two(op, "group_size", group_size)
    backend = _library.resolve_backend_of(backend, x, op, SUPPORTED)
    if backend == "reference":
        return reference.silu_and_mul_quant_fp8(x, group_size)
    return tuple(_call(op, backend, x, group_size, 1e-10))
