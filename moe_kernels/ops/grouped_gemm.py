"""FP8 grouped GEMMs over experts: schemas, checks, public API.

`grouped_gemm_fp8` takes the contiguous layout of `permute` (DeepGEMM's m_indices: the
expert of each row, -1 rows give zeros); `grouped_gemm_fp8_masked` the masked (E, M, K)
layout of `permute_masked` (decode). Both compute, per 128-wide K block, the exact FP8
product accumulated in float32, times a_scale * b_scale ("promotion every 128"). The
`grouped_gemm_fp8_segments` op is fused_moe_fp8's (Triton only): the align=1 layout
without padding rows. Semantics: docs/api.md; tile configs, fast path, floors: docs/fp8.md.
"""

from __future__ import annotations

import torch

from moe_kernels import _library
from moe_kernels._common import FLOAT_DTYPES, FP8, INDEX_DTYPES, SCALE_BLOCK, cdiv
from moe_kernels._validate import (all_strided, autodiff_possible, check_bool,
                                   check_forward_only, check_fp8, check_last_dim_contiguous,
                                   check_out, check_same_device, check_scales, check_tensor)
from moe_kernels.reference import grouped_gemm as reference
from moe_kernels.reference.permute import valid_rows


def _fake_contiguous(a, a_scales, b, b_scales, m_indices, out_dtype):
    return a.new_empty((a.shape[0], b.shape[1]), dtype=out_dtype)


def _fake_masked(a, a_scales, b, b_scales, masked_m, out_dtype):
    return a.new_empty((a.shape[0], a.shape[1], b.shape[1]), dtype=out_dtype)


_OPERANDS = "Tensor a, Tensor a_scales, Tensor b, Tensor b_scales"
GROUPED_GEMM_FP8 = _library.Op(
    "grouped_gemm_fp8", f"({_OPERANDS}, Tensor m_indices, ScalarType out_dtype) -> Tensor",
    fake=_fake_contiguous, triton="grouped_gemm", native=("cpu",))
GROUPED_GEMM_FP8_MASKED = _library.Op(
    "grouped_gemm_fp8_masked", f"({_OPERANDS}, Tensor masked_m, ScalarType out_dtype) -> Tensor",
    fake=_fake_masked, triton="grouped_gemm", native=("cpu",))
# Triton only (fused_moe_fp8's): the Triton kernel is registered under the op's own name.
GROUPED_GEMM_FP8_SEGMENTS = _library.Op(
    "grouped_gemm_fp8_segments", f"({_OPERANDS}, Tensor expert_offsets, "
    "Tensor tokens_per_expert, ScalarType out_dtype) -> Tensor",
    fake=lambda a, a_scales, b, b_scales, offsets, counts, out_dtype: _fake_contiguous(
        a, a_scales, b, b_scales, None, out_dtype),
    triton="grouped_gemm", triton_check=lambda *args: _check_segments(*args))
# out= variants: write into the caller's buffer (DeepGEMM's `d`), its dtype the output's.
GROUPED_GEMM_FP8_OUT = _library.Op(
    "grouped_gemm_fp8_out", f"({_OPERANDS}, Tensor m_indices, Tensor(a!) out) -> ()",
    fake=_library.no_output, triton="grouped_gemm", native=("cpu",))
GROUPED_GEMM_FP8_MASKED_OUT = _library.Op(
    "grouped_gemm_fp8_masked_out",
    f"({_OPERANDS}, Tensor masked_m, bool zero_fill, Tensor(a!) out) -> ()",
    fake=_library.no_output, triton="grouped_gemm", native=("cpu",))


def _check_operands(op, a, a_scales, b, b_scales, a_ndim):
    """a (..., K) and b (E, N, K) fp8 with their 128-block float32 scales."""
    check_fp8(op, "a", a, ndim=a_ndim)
    check_fp8(op, "b", b, ndim=3)
    K = a.shape[-1]
    if b.shape[2] != K:
        raise ValueError(f"{op}: K mismatch: a has K={K} columns but b has shape "
                         f"{tuple(b.shape)} (E, N, K)")
    check_last_dim_contiguous(op, "a", a)
    check_last_dim_contiguous(op, "b", b)
    check_same_device(op, "b", b, "a", a)
    check_scales(op, "a_scales", a_scales, (*a.shape[:-1], cdiv(K, SCALE_BLOCK)), "a", a)
    E, N = b.shape[0], b.shape[1]
    check_scales(op, "b_scales", b_scales, (E, cdiv(N, SCALE_BLOCK), cdiv(K, SCALE_BLOCK)),
                 "b", b)

def _plain_call(a, a_scales, b, b_scales, index, a_ndim, out_dtype) -> bool:
    """Whether the call is the common one (plain tensors, no `out`) and valid, in a few
    predicates, each implied by one of the full checks (_check_operands, _output_dtype,
    _check_index, the masked op's group count) or stricter: True means they would pass.
    One at a time they cost ~8 us of an eager call on the CPU (docs/benchmarks.md).
    index: m_indices (R,) with a (R, K), or masked_m (E,) with a (E, M, K)."""
    if not (type(a) is torch.Tensor and type(b) is torch.Tensor
            and type(a_scales) is torch.Tensor and type(b_scales) is torch.Tensor
            and type(index) is torch.Tensor and all_strided(a, a_scales, b, b_scales, index)
            and a.dim() == a_ndim and b.dim() == 3
            and a.dtype == FP8 and b.dtype == FP8 and a.stride(-1) == 1 and b.stride(-1) == 1
            and a_scales.dtype == torch.float32 and b_scales.dtype == torch.float32
            and index.dim() == 1 and index.dtype in INDEX_DTYPES
            and (out_dtype is None or out_dtype in FLOAT_DTYPES)):
        return False
    E, N, K = b.shape
    kb, device = cdiv(K, SCALE_BLOCK), a.device
    return (a.shape[-1] == K and index.shape[0] == a.shape[0]
            and (a_ndim == 2 or a.shape[0] == E)
            and a_scales.shape == (*a.shape[:-1], kb)
            and b_scales.shape == (E, cdiv(N, SCALE_BLOCK), kb)
            and b.device == device and a_scales.device == device
            and b_scales.device == device and index.device == device)


def _check_segments(a, a_scales, b, b_scales, expert_offsets, tokens_per_expert, out_dtype):
    """The arguments of grouped_gemm_fp8_segments (Triton only, no C++ check): the
    operands, expert_offsets (>= E,) and tokens_per_expert (E,) integers, a float
    out_dtype. Their values are fused_moe_fp8's layout; the kernel writes no row outside a
    whatever they hold."""
    op = "grouped_gemm_fp8_segments"
    _check_operands(op, a, a_scales, b, b_scales, 2)
    E = b.shape[0]
    check_tensor(op, "expert_offsets", expert_offsets, ndim=1, dtypes=INDEX_DTYPES)
    if expert_offsets.shape[0] < E:
        raise ValueError(f"{op}: expert_offsets must have at least E = {E} entries, got "
                         f"{tuple(expert_offsets.shape)}")
    _check_index(op, "tokens_per_expert", tokens_per_expert, E, a)
    _output_dtype(op, out_dtype, None)


def _output_dtype(op, out_dtype, out):
    """out_dtype, or out's dtype with out=; bfloat16 when neither is given."""
    if out_dtype is not None and out_dtype not in FLOAT_DTYPES:
        raise TypeError(f"{op}: out_dtype must be one of {FLOAT_DTYPES}, got {out_dtype}")
    if out is None:
        return out_dtype or torch.bfloat16
    check_tensor(op, "out", out, dtypes=FLOAT_DTYPES)
    if out_dtype is not None and out_dtype != out.dtype:
        raise TypeError(f"{op}: out_dtype is {out_dtype} but out is {out.dtype}; give one")
    return out.dtype


def _check_gemm_out(op, out, shape, a, a_scales, b, b_scales, index_name, index):
    check_out(op, "out", out, shape, FLOAT_DTYPES, "a", a,
              {"a": a, "a_scales": a_scales, "b": b, "b_scales": b_scales, index_name: index})


def _check_index(op, name, idx, length, ref):
    check_tensor(op, name, idx, ndim=1, dtypes=INDEX_DTYPES)
    if idx.shape[0] != length:
        raise ValueError(f"{op}: {name} must have shape ({length},), got {tuple(idx.shape)}")
    check_same_device(op, name, idx, "a", ref)


# --- the internal layer: arguments checked, backend resolved -----------------------------

def grouped_gemm_fp8_unchecked(backend, a, a_scales, b, b_scales, m_indices, out_dtype):
    if backend == "reference":
        return reference.grouped_gemm_fp8(a, a_scales, b, b_scales, m_indices, out_dtype)
    return GROUPED_GEMM_FP8.kernel(backend)(a, a_scales, b, b_scales, m_indices, out_dtype)


def grouped_gemm_fp8_out_unchecked(backend, a, a_scales, b, b_scales, m_indices, out):
    if backend == "reference":
        out.copy_(reference.grouped_gemm_fp8(a, a_scales, b, b_scales, m_indices, out.dtype))
    else:
        GROUPED_GEMM_FP8_OUT.kernel(backend)(a, a_scales, b, b_scales, m_indices, out)
    return out


def grouped_gemm_fp8_masked_unchecked(backend, a, a_scales, b, b_scales, masked_m, out_dtype):
    if backend == "reference":
        return reference.grouped_gemm_fp8_masked(a, a_scales, b, b_scales, masked_m,
                                                 out_dtype)
    return GROUPED_GEMM_FP8_MASKED.kernel(backend)(a, a_scales, b, b_scales, masked_m,
                                                   out_dtype)


def grouped_gemm_fp8_masked_out_unchecked(backend, a, a_scales, b, b_scales, masked_m, out,
                                          zero_fill=True):
    """Into out (E, M, N); rows past masked_m zero, or with zero_fill False not written."""
    if backend == "reference":
        result = reference.grouped_gemm_fp8_masked(a, a_scales, b, b_scales, masked_m,
                                                   out.dtype)
        if not zero_fill:
            result = torch.where(valid_rows(masked_m, a.shape[1])[..., None],
                                 result, out)
        out.copy_(result)
    else:
        GROUPED_GEMM_FP8_MASKED_OUT.kernel(backend)(a, a_scales, b, b_scales, masked_m,
                                                    zero_fill, out)
    return out


def grouped_gemm_fp8_segments_unchecked(a, a_scales, b, b_scales, expert_offsets,
                                        tokens_per_expert, out_dtype):
    """Triton only, for fused_moe_fp8: the align=1 layout of `permute`, expert e's rows
    [expert_offsets[e], + tokens_per_expert[e]); rows past the last expert are not written."""
    return GROUPED_GEMM_FP8_SEGMENTS.kernel("triton")(a, a_scales, b, b_scales, expert_offsets,
                                                      tokens_per_expert, out_dtype)


def grouped_gemm_fp8(a: torch.Tensor, a_scales: torch.Tensor, b: torch.Tensor,
                     b_scales: torch.Tensor, m_indices: torch.Tensor, *,
                     out_dtype: torch.dtype | None = None, out: torch.Tensor | None = None,
                     backend: str | None = None):
    """out[r] = a[r] @ b[m_indices[r]].T with 128-block scales, float32 accumulation.

    a: (R, K) float8_e4m3fn; a_scales: (R, ceil(K/128)) float32 (any strides, e.g.
    column-major); b: (E, N, K) float8_e4m3fn; b_scales: (E, ceil(N/128), ceil(K/128))
    float32; m_indices: (R,) int32 | int64, rows outside [0, E) (the -1 padding of
    `permute`) give zeros. Returns (R, N) out_dtype (default bfloat16), or writes into
    `out` (R, N) float, contiguous, sharing no memory with an input, and returns it. Any
    m_indices is correct; rows of one expert in runs aligned to the tile
    (permute(align=128)) are the fast path."""
    op = "grouped_gemm_fp8"
    if autodiff_possible():
        check_forward_only(op, a=a, a_scales=a_scales, b=b, b_scales=b_scales)
    if out is None and _plain_call(a, a_scales, b, b_scales, m_indices, 2, out_dtype):
        out_dtype = _output_dtype(op, out_dtype, None)   # bfloat16 when None: one rule
    else:
        _check_operands(op, a, a_scales, b, b_scales, 2)
        out_dtype = _output_dtype(op, out_dtype, out)
        _check_index(op, "m_indices", m_indices, a.shape[0], a)
    backend = GROUPED_GEMM_FP8.resolve(backend, a)
    if out is None:
        return grouped_gemm_fp8_unchecked(backend, a, a_scales, b, b_scales, m_indices,
                                          out_dtype)
    _check_gemm_out(op, out, (a.shape[0], b.shape[1]), a, a_scales, b, b_scales, "m_indices",
                    m_indices)
    return grouped_gemm_fp8_out_unchecked(backend, a, a_scales, b, b_scales, m_indices, out)


def grouped_gemm_fp8_masked(a: torch.Tensor, a_scales: torch.Tensor, b: torch.Tensor,
                            b_scales: torch.Tensor, masked_m: torch.Tensor, *,
                            out_dtype: torch.dtype | None = None,
                            out: torch.Tensor | None = None, zero_fill: bool = True,
                            backend: str | None = None):
    """out[e, i] = a[e, i] @ b[e].T for i < masked_m[e]; rows i >= masked_m[e] are zero
    (written without reading the weights, so the output is fully defined).

    a: (E, M, K) float8_e4m3fn; a_scales: (E, M, ceil(K/128)) float32; b: (E, N, K);
    b_scales: (E, ceil(N/128), ceil(K/128)) float32; masked_m: (E,) int32 | int64.
    Returns (E, M, N) out_dtype (default bfloat16), or writes into `out` (E, M, N) as
    grouped_gemm_fp8 does. zero_fill=False (with `out` only): rows i >= masked_m[e] of
    `out` are not written, they keep what they held (DeepGEMM's masked GEMM): at decode
    most of an expert-parallel buffer's rows are empty, and zeroing them moves more bytes
    than the valid rows' products."""
    op = "grouped_gemm_fp8_masked"
    check_bool(op, "zero_fill", zero_fill)
    if not zero_fill and out is None:
        raise ValueError(f"{op}: zero_fill=False leaves rows unwritten, so it needs out= "
                         f"(a buffer whose other rows the caller owns)")
    if autodiff_possible():
        check_forward_only(op, a=a, a_scales=a_scales, b=b, b_scales=b_scales)
    if out is None and _plain_call(a, a_scales, b, b_scales, masked_m, 3, out_dtype):
        out_dtype = _output_dtype(op, out_dtype, None)   # bfloat16 when None: one rule
    else:
        _check_operands(op, a, a_scales, b, b_scales, 3)
        out_dtype = _output_dtype(op, out_dtype, out)
        if b.shape[0] != a.shape[0]:
            raise ValueError(f"{op}: a has {a.shape[0]} groups but b has {b.shape[0]} "
                             f"experts")
        _check_index(op, "masked_m", masked_m, a.shape[0], a)
    backend = GROUPED_GEMM_FP8_MASKED.resolve(backend, a)
    if out is None:
        return grouped_gemm_fp8_masked_unchecked(backend, a, a_scales, b, b_scales, masked_m,
                                                 out_dtype)
    _check_gemm_out(op, out, (*a.shape[:2], b.shape[1]), a, a_scales, b, b_scales, "masked_m",
                    masked_m)
    return grouped_gemm_fp8_masked_out_unchecked(backend, a, a_scales, b, b_scales, masked_m,
                                                 out, zero_fill)
