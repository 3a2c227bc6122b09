"""The `moe_kernels` op namespace: schemas, the soft load of `moe_kernels._C`, backends.

Every schema lives in `csrc/registration.cpp` (one `TORCH_LIBRARY(moe_kernels, m)`), so
C++ users of the `.so` get the ops without Python. When the extension is missing, the same
schemas are defined here from `SCHEMAS`, so that `torch.ops.moe_kernels.<op>` (and its fake,
hence `torch.compile`) exists anyway; `tests/test_registration.py` checks that both lists
agree.

Backends of every op: "reference" (pure PyTorch, float32 math, the oracle), "triton"
(GPU; CPU under TRITON_INTERPRET=1), "cpu" (C++), "cuda" (C++/CUDA).
"""

from __future__ import annotations

import os
import warnings

import torch

NAMESPACE = "moe_kernels"

# name -> schema; must equal the m.def(...) strings of csrc/registration.cpp.
SCHEMAS = {
    "grouped_topk": (
        "grouped_topk(Tensor logits, Tensor? correction_bias, int top_k, "
        "int num_expert_group, int topk_group, str scoring_func, str group_scoring, "
        "bool renormalize, float routed_scaling_factor) -> (Tensor, Tensor)"
    ),
    "grouped_topk_triton": (
        "grouped_topk_triton(Tensor logits, Tensor? correction_bias, int top_k, "
        "int num_expert_group, int topk_group, str scoring_func, str group_scoring, "
        "bool renormalize, float routed_scaling_factor) -> (Tensor, Tensor)"
    ),
    "permute_index": "permute_index(Tensor topk_ids, int num_experts, int align) -> Tensor[]",
    "permute_index_triton": "permute_index_triton(Tensor topk_ids, int num_experts, int align) -> Tensor[]",
    "moe_align_block_size": "moe_align_block_size(Tensor topk_ids, int num_experts, int block_size) -> Tensor[]",
    "moe_align_block_size_triton": "moe_align_block_size_triton(Tensor topk_ids, int num_experts, int block_size) -> Tensor[]",
    "gather_rows": "gather_rows(Tensor x, Tensor pair_of_row, Tensor row_of_pair) -> Tensor",
    "gather_rows_triton": "gather_rows_triton(Tensor x, Tensor pair_of_row, Tensor row_of_pair) -> Tensor",
    "unpermute": "unpermute(Tensor expert_out, Tensor row_of_pair, Tensor topk_weights) -> Tensor",
    "unpermute_triton": "unpermute_triton(Tensor expert_out, Tensor row_of_pair, Tensor topk_weights) -> Tensor",
    "quantize_fp8_per_token_group": "quantize_fp8_per_token_group(Tensor x, int group_size, float eps, bool scale_ue8m0, bool column_major_scales) -> (Tensor, Tensor)",
    "quantize_fp8_per_token_group_triton": "quantize_fp8_per_token_group_triton(Tensor x, int group_size, float eps, bool scale_ue8m0, bool column_major_scales) -> (Tensor, Tensor)",
    "quantize_fp8_block": "quantize_fp8_block(Tensor w, int block_n, int block_k, float eps) -> (Tensor, Tensor)",
    "quantize_fp8_block_triton": "quantize_fp8_block_triton(Tensor w, int block_n, int block_k, float eps) -> (Tensor, Tensor)",
    "dequantize_fp8_block": "dequantize_fp8_block(Tensor q, Tensor s, int block_n, int block_k, ScalarType dtype) -> Tensor",
    "dequantize_fp8_block_triton": "dequantize_fp8_block_triton(Tensor q, Tensor s, int block_n, int block_k, ScalarType dtype) -> Tensor",
    "silu_and_mul_quant_fp8": "silu_and_mul_quant_fp8(Tensor x, int group_size, float eps) -> (Tensor, Tensor)",
    "silu_and_mul_quant_fp8_triton": "silu_and_mul_quant_fp8_triton(Tensor x, int group_size, float eps) -> (Tensor, Tensor)",
    "grouped_gemm_fp8": "grouped_gemm_fp8(Tensor a, Tensor a_scales, Tensor b, Tensor b_scales, Tensor m_indices, ScalarType out_dtype) -> Tensor",
    "grouped_gemm_fp8_triton": "grouped_gemm_fp8_triton(Tensor a, Tensor a_scales, Tensor b, Tensor b_scales, Tensor m_indices, ScalarType out_dtype) -> Tensor",
    "grouped_gemm_fp8_masked": "grouped_gemm_fp8_masked(Tensor a, Tensor a_scales, Tensor b, Tensor b_scales, Tensor masked_m, ScalarType out_dtype) -> Tensor",
    "grouped_gemm_fp8_masked_triton": "grouped_gemm_fp8_masked_triton(Tensor a, Tensor a_scales, Tensor b, Tensor b_scales, Tensor masked_m, ScalarType out_dtype) -> Tensor",
    "grouped_gemm_fp8_segments_triton": "grouped_gemm_fp8_segments_triton(Tensor a, Tensor a_scales, Tensor b, Tensor b_scales, Tensor expert_offsets, Tensor tokens_per_expert, ScalarType out_dtype) -> Tensor",
    "mla_decompress_kv": "mla_decompress_kv(Tensor kv_c, Tensor k_pe, Tensor kv_b_proj, Tensor? kv_b_proj_scale, Tensor(a!) out_k, Tensor(b!) out_v) -> ()",
    "mla_decompress_kv_triton": "mla_decompress_kv_triton(Tensor kv_c, Tensor k_pe, Tensor kv_b_proj, Tensor? kv_b_proj_scale, Tensor(a!) out_k, Tensor(b!) out_v) -> ()",
    "mla_decompress_kv_paged": "mla_decompress_kv_paged(Tensor kv_cache, Tensor block_table, Tensor seq_lens, Tensor kv_b_proj, Tensor? kv_b_proj_scale, Tensor? kv_cache_scale, Tensor(a!) out_k, Tensor(b!) out_v) -> ()",
    "mla_decompress_kv_paged_triton": "mla_decompress_kv_paged_triton(Tensor kv_cache, Tensor block_table, Tensor seq_lens, Tensor kv_b_proj, Tensor? kv_b_proj_scale, Tensor? kv_cache_scale, Tensor(a!) out_k, Tensor(b!) out_v) -> ()",
}

BACKENDS = ("reference", "triton", "cpu", "cuda")


class BackendUnavailableError(RuntimeError):
    """A backend asked for by name cannot run here (never a silent fallback)."""


def _load_extension():
    if os.environ.get("MOE_KERNELS_NO_EXT") == "1":
        return None, "disabled by MOE_KERNELS_NO_EXT=1"
    try:
        from moe_kernels import _C  # noqa: F401  (registers the TORCH_LIBRARY on load)
    except ImportError as exc:
        return None, str(exc)
    return _C, None


_C, _C_ERROR = _load_extension()
_PY_LIB = None
if _C is None:
    warnings.warn(
        "moe_kernels: the compiled extension moe_kernels._C is not loaded "
        f"({_C_ERROR}); backends 'cpu' and 'cuda' are unavailable, 'reference' and "
        "'triton' work. Build it with `make build` (or `pip install -e .`).",
        RuntimeWarning,
        stacklevel=2,
    )
    _PY_LIB = torch.library.Library(NAMESPACE, "DEF")
    for _schema in SCHEMAS.values():
        _PY_LIB.define(_schema)


def extension_loaded() -> bool:
    return _C is not None


# Read once: a pybind call inside a traced function would break torch.compile's graph.
_C_WITH_CUDA = _C is not None and bool(_C.with_cuda())


def extension_has_cuda() -> bool:
    return _C_WITH_CUDA


def triton_interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


_RESOLVED: dict[tuple[str | None, str], str] = {}


def _triton_importable() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


_TRITON_OK = _triton_importable()


def backend_unavailable_reason(backend: str, device: torch.device) -> str | None:
    """None when `backend` can run on `device`, else a sentence saying why not."""
    if backend == "reference":
        return None
    if backend == "triton":
        if not _TRITON_OK:
            return "triton is not installed"
        if device.type == "cuda":
            return None
        if device.type == "cpu" and triton_interpreting():
            return None
        return (f"the triton backend runs on CUDA tensors, or on CPU tensors only under "
                f"TRITON_INTERPRET=1 (set before triton is imported); got {device.type}")
    if backend == "cpu":
        if device.type != "cpu":
            return f"the cpu backend takes CPU tensors, got {device.type}"
        if _C is None:
            return f"moe_kernels._C is not loaded ({_C_ERROR})"
        return None
    if backend == "cuda":
        if device.type != "cuda":
            return f"the cuda backend takes CUDA tensors, got {device.type}"
        if _C is None:
            return f"moe_kernels._C is not loaded ({_C_ERROR})"
        if not _C_WITH_CUDA:
            return "moe_kernels._C was built without CUDA kernels"
        return None
    return f"unknown backend {backend!r}; expected one of {BACKENDS}"


# Which backend `backend=None` picks, best first, per device type. On the GPU "triton"
# leads: its kernel measured faster than "cuda" on an H100 at every token count
# (docs/gating.md, benchmarks/results/).
_DEFAULT_ORDER = {
    "cpu": ("cpu", "reference"),
    "cuda": ("triton", "cuda", "reference"),
}


def resolve_backend(backend: str | None, device: torch.device, op: str) -> str:
    """The backend to run: `backend` if it can run on `device`, or the best one for None.
    Memoised per (backend, device type): this runs on every eager call."""
    hit = _RESOLVED.get((backend, device.type)) if backend is None or type(backend) is str else None
    if hit is not None:
        return hit
    return _resolve_backend_uncached(backend, device, op)


def resolve_backend_of(backend: str | None, x: torch.Tensor, op: str,
                       supported: tuple[str, ...] = BACKENDS) -> str:
    """resolve_backend for tensor x's device, among the backends op implements; reads
    x.is_cuda / x.is_cpu (cheaper than building x.device) on the hot path."""
    kind = "cuda" if x.is_cuda else ("cpu" if x.is_cpu else None)
    if kind is not None and (backend is None or type(backend) is str):
        hit = _RESOLVED.get((backend, kind, supported))
        if hit is not None:
            return hit
    if backend is not None and backend in BACKENDS and backend not in supported:
        raise BackendUnavailableError(f"{op}: backend {backend!r} is not implemented for this "
                                      f"op (it has {supported})")
    if backend is None:
        device = x.device
        resolved = next((c for c in _DEFAULT_ORDER.get(device.type, ("reference",))
                         if c in supported and backend_unavailable_reason(c, device) is None),
                        "reference")
    else:
        resolved = resolve_backend(backend, x.device, op)
    if kind is not None:
        _RESOLVED[(backend, kind, supported)] = resolved
    return resolved


def _resolve_backend_uncached(backend: str | None, device: torch.device, op: str) -> str:
    if backend is None:
        resolved = next((c for c in _DEFAULT_ORDER.get(device.type, ("reference",))
                         if backend_unavailable_reason(c, device) is None), "reference")
    else:
        if not isinstance(backend, str) or backend not in BACKENDS:
            raise ValueError(f"{op}: backend must be None or one of {BACKENDS}, got {backend!r}")
        reason = backend_unavailable_reason(backend, device)
        if reason is not None:
            raise BackendUnavailableError(f"{op}: backend {backend!r} cannot run: {reason}")
        resolved = backend
    _RESOLVED[(backend, device.type)] = resolved
    return resolved


def available_backends(device: torch.device) -> list[str]:
    return [b for b in BACKENDS if backend_unavailable_reason(b, device) is None]


def registered_op(name: str, backend: str):
    """The registered op of `name` for `backend`: the Triton kernel has its own op
    (`<name>_triton`), the C++ kernels share `<name>` across dispatch keys."""
    return getattr(torch.ops.moe_kernels, name + ("_triton" if backend == "triton" else "")).default


def kernel_for(name: str, backend: str, eager: dict, needs_op: bool = False):
    """The registered op under torch.compile or autograd, else the bare kernel
    `eager[backend]` (docs/index.md, eager fast path)."""
    if needs_op or torch.compiler.is_compiling():
        return registered_op(name, backend)
    return eager[backend]


def register_triton_impl(name: str, fn) -> None:
    """Registers fn as `<name>_triton` for CPU (interpreter) and CUDA tensors."""
    torch.library.impl(f"{NAMESPACE}::{name}_triton", ["CPU", "CUDA"])(fn)
