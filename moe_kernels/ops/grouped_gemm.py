"""FP8 grouped GEMMs over experts (SPEC section 3): API and registration.

`grouped_gemm_fp8` takes the contiguous layout of `permute` (DeepGEMM's m_indices: the
expert of each row, -1 rows give zeros); `grouped_gemm_fp8_masked` the masked (E, M, K)
layout of `permute_masked` (decode). Both compute, per 128-wide K block, the exact FP8
product accumulated in float32, times a_scale * b_scale ("promotion every 128"). The
`grouped_gemm_fp8_segments_triton` op is fused_moe_fp8's: the align=1 layout without
padding rows. Tile configs, fast path and floors: docs/fp8.md.
"""

from __future__ import annotations

import torch

from moe_kernels import _library
from moe_kernels._validate import FLOAT_DTYPES, check_last_dim_contiguous, check_tensor
from moe_kernels.ops.fp8 import check_fp8, check_scales
from moe_kernels.reference import grouped_gemm as reference

SUPPORTED = ("reference", "triton", "cpu")
SCALE_BLOCK = 128
INDEX_DTYPES = (torch.int32, torch.int64)
_NAMES = ("grouped_gemm_fp8", "grouped_gemm_fp8_masked")


def _triton():
    from moe_kernels.triton import grouped_gemm as triton_gemm  # imports triton lazily
    return triton_gemm


_EAGER = {name: {"triton": lambda *a, _n=name: getattr(_triton(), _n)(*a)} for name in _NAMES}
_EAGER["grouped_gemm_fp8_segments"] = {
    "triton": lambda *a: _triton().grouped_gemm_fp8_segments(*a)}
if _library.extension_loaded():
    for _name in _NAMES:
        _EAGER[_name]["cpu"] = getattr(_library._C, _name + "_cpu")


def _fake_contiguous(a, a_scales, b, b_scales, m_indices, out_dtype):
    return a.new_empty((a.shape[0], b.shape[1]), dtype=out_dtype)


def _fake_masked(a, a_scales, b, b_scales, masked_m, out_dtype):
    return a.new_empty((a.shape[0], a.shape[1], b.shape[1]), dtype=out_dtype)


def _fake_segments(a, a_scales, b, b_scales, expert_offsets, tokens_per_expert, out_dtype):
    return a.new_empty((a.shape[0], b.shape[1]), dtype=out_dtype)


for _name, _fake in (("grouped_gemm_fp8", _fake_contiguous),
                     ("grouped_gemm_fp8_masked", _fake_masked)):
    _library.register_triton_impl(_name, lambda *a, _n=_name: _EAGER[_n]["triton"](*a))
    for _suffix in ("", "_triton"):
        torch.library.register_fake(f"moe_kernels::{_name}{_suffix}")(_fake)
_library.register_triton_impl("grouped_gemm_fp8_segments",
                              lambda *a: _EAGER["grouped_gemm_fp8_segments"]["triton"](*a))
torch.library.register_fake("moe_kernels::grouped_gemm_fp8_segments_triton")(_fake_segments)


def _cdiv(a, b):
    return -(-a // b)


def _check_operands(op, a, a_scales, b, b_scales, out_dtype, a_ndim):
    """a (..., K) and b (E, N, K) fp8 with their 128-block float32 scales."""
    check_fp8(op, "a", a, ndim=a_ndim)
    check_fp8(op, "b", b, ndim=3)
    K = a.shape[-1]
    if b.shape[2] != K:
        raise ValueError(f"{op}: K mismatch: a has K={K} columns but b has shape "
                         f"{tuple(b.shape)} (E, N, K)")
    check_last_dim_contiguous(op, "a", a)
    check_last_dim_contiguous(op, "b", b)
    if b.device != a.device:
        raise ValueError(f"{op}: b is on {b.device} but a is on {a.device}")
    check_scales(op, "a_scales", a_scales, (*a.shape[:-1], _cdiv(K, SCALE_BLOCK)), "a", a)
    E, N = b.shape[0], b.shape[1]
    check_scales(op, "b_scales", b_scales, (E, _cdiv(N, SCALE_BLOCK), _cdiv(K, SCALE_BLOCK)),
                 "b", b)
    if out_dtype not in FLOAT_DTYPES:
        raise TypeError(f"{op}: out_dtype must be one of {FLOAT_DTYPES}, got {out_dtype}")


def _check_index(op, name, idx, length, ref):
    check_tensor(op, name, idx, ndim=1, dtypes=INDEX_DTYPES)
    if idx.shape[0] != length:
        raise ValueError(f"{op}: {name} must have shape ({length},), got {tuple(idx.shape)}")
    if idx.device != ref.device:
        raise ValueError(f"{op}: {name} is on {idx.device} but a is on {ref.device}")


def grouped_gemm_fp8(a: torch.Tensor, a_scales: torch.Tensor, b: torch.Tensor,
                     b_scales: torch.Tensor, m_indices: torch.Tensor, *,
                     out_dtype: torch.dtype = torch.bfloat16, backend: str | None = None):
    """out[r] = a[r] @ b[m_indices[r]].T with 128-block scales, float32 accumulation.

    a: (R, K) float8_e4m3fn; a_scales: (R, ceil(K/128)) float32 (any strides, e.g.
    column-major); b: (E, N, K) float8_e4m3fn; b_scales: (E, ceil(N/128), ceil(K/128))
    float32; m_indices: (R,) int32 | int64, rows outside [0, E) (the -1 padding of
    `permute`) give zeros. Returns (R, N) out_dtype. Any m_indices is correct; rows of one
    expert in runs aligned to the tile (permute(align=128)) are the fast path."""
    op = "grouped_gemm_fp8"
    _check_operands(op, a, a_scales, b, b_scales, out_dtype, 2)
    _check_index(op, "m_indices", m_indices, a.shape[0], a)
    backend = _library.resolve_backend_of(backend, a, op, SUPPORTED)
    if backend == "reference":
        return reference.grouped_gemm_fp8(a, a_scales, b, b_scales, m_indices, out_dtype)
    return _library.kernel_for(op, backend, _EAGER[op])(a, a_scales, b, b_scales, m_indices,
                                                        out_dtype)


def grouped_gemm_fp8_masked(a: torch.Tensor, a_scales: torch.Tensor, b: torch.Tensor,
                            b_scales: torch.Tensor, masked_m: torch.Tensor, *,
                            out_dtype: torch.dtype = torch.bfloat16,
                            backend: str | None = None):
    """out[e, i] = a[e, i] @ b[e].T for i < masked_m[e]; rows i >= masked_m[e] are zero
    (written without reading the weights, so the output is fully defined).

    a: (E, M, K) float8_e4m3fn; a_scales: (E, M, ceil(K/128)) float32; b: (E, N, K);
    b_scales: (E, ceil(N/128), ceil(K/128)) float32; masked_m: (E,) int32 | int64.
    Returns (E, M, N) out_dtype."""
    op = "grouped_gemm_fp8_masked"
    _check_operands(op, a, a_scales, b, b_scales, out_dtype, 3)
    if b.shape[0] != a.shape[0]:
        raise ValueError(f"{op}: a has {a.shape[0]} groups but b has {b.shape[0]} experts")
    _check_index(op, "masked_m", masked_m, a.shape[0], a)
    backend = _library.resolve_backend_of(backend, a, op, SUPPORTED)
    if backend == "reference":
        return reference.grouped_gemm_fp8_masked(a, a_scales, b, b_scales, masked_m,
                                                 out_dtype)
    return _library.kernel_for(op, backend, _EAGER[op])(a, a_scales, b, b_scales, masked_m,
                                                        out_dtype)


def grouped_gemm_fp8_segments(a, a_scales, b, b_scales, expert_offsets, tokens_per_expert,
                              out_dtype):
    """Triton only, for fused_moe_fp8 (arguments checked there): the align=1 layout of
    `permute`, expert e's rows [expert_offsets[e], + tokens_per_expert[e]); rows past the
    last expert are not written."""
    kernel = _library.kernel_for("grouped_gemm_fp8_segments", "triton",
                                 _EAGER["grouped_gemm_fp8_segments"])
    return kernel(a, a_scales, b, b_scales, expert_offsets, tokens_per_expert, out_dtype)
