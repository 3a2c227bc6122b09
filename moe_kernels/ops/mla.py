"""MLA latent KV decompression: schemas, checks, public API.

`mla_decompress_kv` (contiguous latent) and `mla_decompress_kv_paged` (paged latent cache)
rebuild per-head K (T, H, dn + rope) and V (T, H, dv) for prefill attention, in the layout
of flash_attn_varlen_func. The registered ops write into out_k / out_v (`Tensor(a!)`), so
callers that pass their own buffers allocate nothing per call and can capture CUDA graphs;
the Python functions allocate them otherwise. Semantics: docs/api.md; decisions (dtypes,
scales, num_tokens, what is checked where): docs/mla.md.
"""

from __future__ import annotations

import numpy as np
import torch

from moe_kernels import _library
from moe_kernels._common import FLOAT_DTYPES, FP8, INDEX_DTYPES, SCALE_BLOCK, cdiv
from moe_kernels._validate import (STRIDED, all_strided, autodiff_possible, check_forward_only,
                                   check_elements_apart, check_int, check_last_dim_contiguous,
                                   check_no_overlap, check_same_device, check_scales,
                                   check_tensor, holds_no_data)
from moe_kernels.reference import mla as reference

WEIGHT_DTYPES = FLOAT_DTYPES + (FP8,)


_KERNELS = dict(fake=_library.no_output, triton="mla", native=("cpu",))
_OUTPUTS = "Tensor(a!) out_k, Tensor(b!) out_v) -> ()"
# The Triton variants refuse the CPU kernels' packed weight (argument 2, or 3 when paged).
MLA_DECOMPRESS_KV = _library.Op(
    "mla_decompress_kv", "(Tensor kv_c, Tensor k_pe, Tensor kv_b_proj, "
    f"Tensor? kv_b_proj_scale, {_OUTPUTS}", **_KERNELS,
    triton_check=lambda *a: _check_packed_backend("mla_decompress_kv", a[2], "triton"))
MLA_DECOMPRESS_KV_PAGED = _library.Op(
    "mla_decompress_kv_paged", "(Tensor kv_cache, Tensor block_table, Tensor seq_lens, "
    f"Tensor kv_b_proj, Tensor? kv_b_proj_scale, Tensor? kv_cache_scale, {_OUTPUTS}",
    **_KERNELS,
    triton_check=lambda *a: _check_packed_backend("mla_decompress_kv_paged", a[3], "triton"))


# --- checks ----------------------------------------------------------------------------------

def _check_dims(op, num_heads, dn, dv):
    check_int(op, "num_heads", num_heads, low=1)
    check_int(op, "qk_nope_head_dim", dn, low=1)
    check_int(op, "v_head_dim", dv, low=1)


def _packed_shape(N: int, R: int) -> tuple[int, int, int, int]:
    return (N // 16, R // 32, 16, 32)


def _check_packed_weight(op, kv_b_proj, kv_b_proj_scale, num_heads, dn, dv, R, ref_name, ref):
    """A packed kv_b_proj (mla_pack_kv_b_proj): bf16 tiles, scales optional."""
    check_tensor(op, "kv_b_proj", kv_b_proj, ndim=4, dtypes=(torch.bfloat16,))
    N = num_heads * (dn + dv)
    want = _packed_shape(N, R)
    if N % 32 or R % 32 or tuple(kv_b_proj.shape) != want:
        raise ValueError(f"{op}: a packed kv_b_proj (4-D, from mla_pack_kv_b_proj) of "
                         f"num_heads * (qk_nope_head_dim + v_head_dim) = {N} rows and R = {R} "
                         f"columns (R from {ref_name}) has shape {want}, both multiples of 32; "
                         f"got {tuple(kv_b_proj.shape)}")
    if not kv_b_proj.is_contiguous():
        raise ValueError(f"{op}: a packed kv_b_proj must be contiguous")
    check_same_device(op, "kv_b_proj", kv_b_proj, ref_name, ref)
    if kv_b_proj_scale is not None:
        check_scales(op, "kv_b_proj_scale", kv_b_proj_scale,
                     (cdiv(N, SCALE_BLOCK), cdiv(R, SCALE_BLOCK)), "kv_b_proj", kv_b_proj)


def _check_packed_backend(op, kv_b_proj, backend):
    if kv_b_proj.dim() == 4 and backend not in PACKED_BACKENDS:
        raise ValueError(f"{op}: a packed kv_b_proj (mla_pack_kv_b_proj) is a layout of the "
                         f"CPU kernels: backend must be one of {PACKED_BACKENDS}, got "
                         f"{backend!r}")


def _check_weight(op, kv_b_proj, kv_b_proj_scale, num_heads, dn, dv, R, ref_name, ref):
    """kv_b_proj (H*(dn+dv), R) float or fp8 (+ 128x128 float32 scales), or packed."""
    check_tensor(op, "kv_b_proj", kv_b_proj)
    if kv_b_proj.dim() == 4:
        return _check_packed_weight(op, kv_b_proj, kv_b_proj_scale, num_heads, dn, dv, R,
                                    ref_name, ref)
    check_tensor(op, "kv_b_proj", kv_b_proj, ndim=2, dtypes=WEIGHT_DTYPES)
    if R < 1:    # the C++ kernels' check says the same: no latent, nothing to project
        raise ValueError(f"{op}: the latent width R ({ref_name}'s, kv_b_proj's columns) must "
                         f"be >= 1, got kv_b_proj of shape {tuple(kv_b_proj.shape)}")
    want = (num_heads * (dn + dv), R)
    if tuple(kv_b_proj.shape) != want:
        raise ValueError(f"{op}: kv_b_proj must have shape (num_heads * (qk_nope_head_dim + "
                         f"v_head_dim), R) = {want} (R from {ref_name}), got "
                         f"{tuple(kv_b_proj.shape)}")
    check_last_dim_contiguous(op, "kv_b_proj", kv_b_proj)
    check_same_device(op, "kv_b_proj", kv_b_proj, ref_name, ref)
    if kv_b_proj.dtype == FP8:
        if kv_b_proj_scale is None:
            raise ValueError(f"{op}: kv_b_proj is float8_e4m3fn, so kv_b_proj_scale (its "
                             f"128x128 block scales) is required")
        check_scales(op, "kv_b_proj_scale", kv_b_proj_scale,
                     (cdiv(want[0], SCALE_BLOCK), cdiv(R, SCALE_BLOCK)), "kv_b_proj", kv_b_proj)
    elif kv_b_proj_scale is not None:
        raise ValueError(f"{op}: kv_b_proj_scale is only for an fp8 kv_b_proj, but kv_b_proj "
                         f"is {kv_b_proj.dtype}")


def _check_matching_dtypes(op, name, x, kv_b_proj):
    """Float operands of the up-projection share one dtype (fp8 converts exactly to any, and
    so do the packed weight's values, which are those of a bf16 or fp8 checkpoint)."""
    if kv_b_proj.dim() == 4:
        return
    if FP8 not in (x.dtype, kv_b_proj.dtype) and x.dtype != kv_b_proj.dtype:
        raise TypeError(f"{op}: {name} is {x.dtype} but kv_b_proj is {kv_b_proj.dtype}; use "
                        f"one dtype (or an fp8 kv_b_proj with scales)")


def _check_out(op, name, out, shape, ref, inputs):
    if out is None:
        return
    check_tensor(op, name, out, ndim=3, dtypes=FLOAT_DTYPES)
    if tuple(out.shape) != shape:
        raise ValueError(f"{op}: {name} must have shape {shape}, got {tuple(out.shape)}")
    check_last_dim_contiguous(op, name, out)
    if not holds_no_data(out):
        check_elements_apart(op, name, out)
    check_same_device(op, name, out, "the inputs", ref)
    check_no_overlap(op, name, out, inputs)


def _outputs(out_k, out_v, T, H, dn, dv, rope, dtype, ref):
    # new_empty: 2.8 us a call from Python on the CPU, torch.empty(..., device=) 4.1 us
    if out_k is None:
        out_k = ref.new_empty((T, H, dn + rope), dtype=dtype)
    if out_v is None:
        out_v = ref.new_empty((T, H, dv), dtype=dtype)
    return out_k, out_v


def _run(op: _library.Op, backend, args, out_k, out_v, ref_fn, ref_args):
    if backend == "reference":
        k, v = ref_fn(*ref_args, torch.float32)
        out_k.copy_(k)     # each float32 value rounded once, to each output's dtype
        out_v.copy_(v)
    else:
        op.kernel(backend)(*args, out_k, out_v)
    return out_k, out_v


# --- public API -------------------------------------------------------------------------------

# Backends that take a packed kv_b_proj: the C++ CPU kernels, and the reference (unpacked).
PACKED_BACKENDS = ("cpu", "reference")


def mla_pack_kv_b_proj(kv_b_proj: torch.Tensor) -> torch.Tensor:
    """kv_b_proj (N, R) bf16 or float8_e4m3fn on the CPU, N and R multiples of 32 -> the
    form the `cpu` backend runs fastest on this machine, made once at load: where its AMX
    tile path or its AVX512-BF16 path runs, the packed tiles (pack_kv_b_proj_tiles: bf16
    (N / 16, R / 32, 16, 32), the values exact); elsewhere (neither, or
    MOE_KERNELS_CPU_ISA narrower than avx512bf16), kv_b_proj itself. Pass the result as
    kv_b_proj with the same kv_b_proj_scale (for an fp8 checkpoint) to mla_decompress_kv and
    mla_decompress_kv_paged (backend "cpu" or "reference"); it saves the per-call packing
    (docs/mla.md). Memory: 2 bytes per weight when packed."""
    _check_packable("mla_pack_kv_b_proj", kv_b_proj)
    if not _cpu_tiles_run():
        return kv_b_proj
    return pack_kv_b_proj_tiles(kv_b_proj)


def _cpu_tiles_run() -> bool:
    """The cpu backend's build reads the packed tiles in place (csrc/cpu/simd.h): the AMX
    build's tile path, or the AVX512-BF16 build's dot products, whose panels are the tiles'
    16 rows by k pair."""
    return _library.extension_loaded() and _library._C.cpu_isa() in ("amx", "avx512bf16")


def _check_packable(op, kv_b_proj):
    check_tensor(op, "kv_b_proj", kv_b_proj, ndim=2, dtypes=(torch.bfloat16, FP8))
    N, R = kv_b_proj.shape
    if N % 32 or R % 32 or N == 0 or R == 0:
        raise ValueError(f"{op}: kv_b_proj must have rows and columns that are positive "
                         f"multiples of 32, got shape {(N, R)}; pass such a weight unpacked")
    if not kv_b_proj.is_cpu:
        raise ValueError(f"{op}: the packed form is for the CPU kernels; kv_b_proj is on "
                         f"{kv_b_proj.device}")


def pack_kv_b_proj_tiles(kv_b_proj: torch.Tensor) -> torch.Tensor:
    """The packed form on any machine (mla_pack_kv_b_proj picks it where it pays): bf16
    (N / 16, R / 32, 16, 32) with [j, c, p, 2 q + e] = kv_b_proj[16 j + q, 32 c + 2 p + e]
    (reference.unpack_kv_b_proj inverts it). The `cpu` backend without the tile path
    unpacks it per call (correct, slower than the weight as stored)."""
    _check_packable("pack_kv_b_proj_tiles", kv_b_proj)
    N, R = kv_b_proj.shape
    return (kv_b_proj.to(torch.bfloat16).view(N // 16, 16, R // 32, 16, 2)
            .permute(0, 2, 3, 1, 4).reshape(_packed_shape(N, R)))


def _check_args(kv_c, k_pe, kv_b_proj, kv_b_proj_scale, num_heads, dn, dv, out_k, out_v):
    """Every check of mla_decompress_kv's arguments, each error naming its argument."""
    op = "mla_decompress_kv"
    check_tensor(op, "kv_c", kv_c, ndim=2, dtypes=FLOAT_DTYPES)
    check_tensor(op, "k_pe", k_pe, ndim=2, dtypes=FLOAT_DTYPES)
    check_last_dim_contiguous(op, "kv_c", kv_c)
    check_last_dim_contiguous(op, "k_pe", k_pe)
    check_same_device(op, "k_pe", k_pe, "kv_c", kv_c)
    T, R = kv_c.shape
    if k_pe.shape[0] != T or k_pe.shape[1] < 1:
        raise ValueError(f"{op}: k_pe must have shape (T={T}, rope_dim >= 1), got "
                         f"{tuple(k_pe.shape)}")
    _check_dims(op, num_heads, dn, dv)
    H, rope = num_heads, k_pe.shape[1]
    _check_weight(op, kv_b_proj, kv_b_proj_scale, H, dn, dv, R, "kv_c", kv_c)
    _check_matching_dtypes(op, "kv_c", kv_c, kv_b_proj)
    inputs = {"kv_c": kv_c, "k_pe": k_pe, "kv_b_proj": kv_b_proj,
              "kv_b_proj_scale": kv_b_proj_scale}
    _check_out(op, "out_k", out_k, (T, H, dn + rope), kv_c, inputs)
    _check_out(op, "out_v", out_v, (T, H, dv), kv_c, {**inputs, "out_k": out_k})


def _plain_call(kv_c, k_pe, kv_b_proj, kv_b_proj_scale, num_heads, dn, dv) -> bool:
    """Whether the call is the common one (plain tensors, an unpacked weight, no out_k /
    out_v) and valid, in a few predicates, each implied by one of _check_args' checks (or
    stricter): True means _check_args would pass. _check_args one check at a time took
    ~12 us of a 33 us eager call at one token on the CPU (docs/benchmarks.md)."""
    if not (type(kv_c) is torch.Tensor and type(k_pe) is torch.Tensor
            and type(kv_b_proj) is torch.Tensor and all_strided(kv_c, k_pe, kv_b_proj)
            and type(num_heads) is int
            and type(dn) is int and type(dv) is int and num_heads >= 1 and dn >= 1
            and dv >= 1 and kv_c.dim() == 2 and k_pe.dim() == 2 and kv_b_proj.dim() == 2
            and kv_c.dtype in FLOAT_DTYPES and k_pe.dtype in FLOAT_DTYPES
            and kv_c.stride(1) == 1 and k_pe.stride(1) == 1 and kv_b_proj.stride(1) == 1):
        return False
    T, R = kv_c.shape
    N, device = num_heads * (dn + dv), kv_c.device
    if (R < 1 or k_pe.shape[0] != T or k_pe.shape[1] < 1 or kv_b_proj.shape != (N, R)
            or k_pe.device != device or kv_b_proj.device != device):
        return False
    if kv_b_proj.dtype != FP8:
        return kv_b_proj.dtype == kv_c.dtype and kv_b_proj_scale is None
    s = kv_b_proj_scale
    return (type(s) is torch.Tensor and s.layout is STRIDED and s.dtype == torch.float32
            and s.device == device
            and s.shape == (cdiv(N, SCALE_BLOCK), cdiv(R, SCALE_BLOCK)))


def mla_decompress_kv(kv_c: torch.Tensor, k_pe: torch.Tensor, kv_b_proj: torch.Tensor, *,
                      num_heads: int, qk_nope_head_dim: int = 128, v_head_dim: int = 128,
                      kv_b_proj_scale: torch.Tensor | None = None,
                      out_k: torch.Tensor | None = None, out_v: torch.Tensor | None = None,
                      backend: str | None = None):
    """k[t, h] = concat(kv_c[t] @ W_UK_h.T, k_pe[t]), v[t, h] = kv_c[t] @ W_UV_h.T.

    kv_c: (T, R) float32 | bfloat16 | float16, k_pe: (T, rope) float (row strides allowed,
    e.g. slices of one (T, R + rope) tensor; last dim contiguous); kv_b_proj:
    (H * (dn + dv), R) in kv_c's dtype, or float8_e4m3fn with kv_b_proj_scale
    (ceil(H*(dn+dv)/128), ceil(R/128)) float32; rows per head: W_UK_h (dn) then W_UV_h (dv).
    Returns k (T, H, dn + rope), v (T, H, dv) in kv_c's dtype, or written into out_k / out_v
    (any float dtype, last dim contiguous) and returned."""
    op = "mla_decompress_kv"
    if autodiff_possible():
        check_forward_only(op, kv_c=kv_c, k_pe=k_pe, kv_b_proj=kv_b_proj,
                           kv_b_proj_scale=kv_b_proj_scale)
    if not (out_k is None and out_v is None
            and _plain_call(kv_c, k_pe, kv_b_proj, kv_b_proj_scale, num_heads,
                            qk_nope_head_dim, v_head_dim)):
        _check_args(kv_c, k_pe, kv_b_proj, kv_b_proj_scale, num_heads, qk_nope_head_dim,
                    v_head_dim, out_k, out_v)
    H, dn, dv, T, rope = num_heads, qk_nope_head_dim, v_head_dim, kv_c.shape[0], k_pe.shape[1]
    backend = MLA_DECOMPRESS_KV.resolve(backend, kv_c)
    _check_packed_backend(op, kv_b_proj, backend)
    out_k, out_v = _outputs(out_k, out_v, T, H, dn, dv, rope, kv_c.dtype, kv_c)
    return _run(MLA_DECOMPRESS_KV, backend, (kv_c, k_pe, kv_b_proj, kv_b_proj_scale), out_k, out_v,
                reference.mla_decompress_kv,
                (kv_c, k_pe, kv_b_proj, kv_b_proj_scale, H, dn, dv))


def _cache_scale(op, kv_cache, kv_cache_scale):
    """None (no scaling) or a 0-dim float32 tensor on the cache's device."""
    if kv_cache_scale is None:
        return None
    if kv_cache.dtype != FP8:
        raise ValueError(f"{op}: kv_cache_scale applies to an fp8 kv_cache only, but kv_cache "
                         f"is {kv_cache.dtype}")
    if isinstance(kv_cache_scale, torch.Tensor):
        check_tensor(op, "kv_cache_scale", kv_cache_scale, dtypes=(torch.float32,))
        if kv_cache_scale.numel() != 1:
            raise ValueError(f"{op}: kv_cache_scale must hold one value, got shape "
                             f"{tuple(kv_cache_scale.shape)}")
        check_same_device(op, "kv_cache_scale", kv_cache_scale, "kv_cache", kv_cache)
        return kv_cache_scale.reshape(())
    if isinstance(kv_cache_scale, bool) or not isinstance(kv_cache_scale, (int, float)):
        raise TypeError(f"{op}: kv_cache_scale must be a float or a float32 tensor, got "
                        f"{type(kv_cache_scale).__name__}")
    # a fill kernel, not a host-to-device copy: capturable in a CUDA graph
    return torch.full((), float(kv_cache_scale), dtype=torch.float32, device=kv_cache.device)


def _paged_value_problem(block_table, seq_lens, num_blocks, block_size):
    """The first problem of the values as (kind, b, j, value, need): kind 0 none (value =
    sum(seq_lens)), 1 seq_lens[b] = value < 0, 2 sequence b of length value needs `need`
    blocks, more than block_table has, 3 block_table[b, j] = value is not a block, 4
    block_size = value < 1 (the callers check it first), 5 block_table not (B, max_blocks)
    or seq_lens not (B,) (likewise). In C++
    (reported, not thrown) where the extension is loaded: ~1 us against ~15 us for numpy;
    numpy otherwise (torch's small ops cost ~10 us each on the CPU)."""
    # one host sync on CUDA; `.cpu()` of a CPU tensor costs 0.2 us more than the test
    table = block_table if block_table.is_cpu else block_table.cpu()
    seq_lens = seq_lens if seq_lens.is_cpu else seq_lens.cpu()
    if table.dim() != 2 or seq_lens.dim() != 1 or seq_lens.shape[0] != table.shape[0]:
        return 5, 0, 0, 0, 0
    if block_size < 1:
        return 4, 0, 0, block_size, 0
    if _library.extension_loaded():
        return tuple(_library._C.mla_paged_values_cpu(table, seq_lens, num_blocks, block_size))
    lens = seq_lens.numpy().astype(np.int64)
    table = table.numpy()
    max_blocks = table.shape[1]
    need = np.where(lens > 0, (lens + block_size - 1) // block_size, 0)
    if (lens < 0).any():
        b = int(np.argmax(lens < 0))
        return 1, b, 0, int(lens[b]), 0
    if (need > max_blocks).any():
        b = int(np.argmax(need > max_blocks))
        return 2, b, 0, int(lens[b]), int(need[b])
    used = np.arange(max_blocks)[None, :] < need[:, None]
    bad = used & ((table < 0) | (table >= num_blocks))
    if bad.any():
        b, j = (int(i) for i in np.argwhere(bad)[0])
        return 3, b, j, int(table[b, j]), 0
    return 0, 0, 0, int(lens.sum()), 0


def _check_paged_values(op, block_table, seq_lens, num_blocks, block_size, num_tokens):
    """The checks that read values (one host sync on CUDA): lengths >= 0, block tables long
    enough, block ids in range where used; returns sum(seq_lens)."""
    kind, b, j, value, need = _paged_value_problem(block_table, seq_lens, num_blocks,
                                                   block_size)
    if kind == 1:
        raise ValueError(f"{op}: seq_lens must be >= 0, got seq_lens[{b}] = {value}")
    if kind == 2:
        raise ValueError(f"{op}: block_table is too short for sequence {b}: seq_lens[{b}] = "
                         f"{value} needs {need} blocks of {block_size}, block_table has "
                         f"{block_table.shape[1]} per sequence")
    if kind == 4:
        raise ValueError(f"{op}: kv_cache's block_size must be >= 1, got {value}")
    if kind == 5:
        raise ValueError(f"{op}: block_table must be (B, max_blocks) and seq_lens (B,), got "
                         f"shapes {tuple(block_table.shape)} and {tuple(seq_lens.shape)}")
    if kind == 3:
        raise ValueError(f"{op}: block_table[{b}, {j}] = {value} is not a block of "
                         f"kv_cache (num_blocks = {num_blocks})")
    if num_tokens is not None and num_tokens < value:
        raise ValueError(f"{op}: num_tokens = {num_tokens} (or out_k's rows) is less than "
                         f"sum(seq_lens) = {value}")
    return value


def _latent_width(kv_b_proj) -> int:
    """R: kv_b_proj's columns (a packed weight's tiles are 32 wide)."""
    return kv_b_proj.shape[1] * (32 if kv_b_proj.dim() == 4 else 1)


def _check_paged_args(kv_cache, block_table, seq_lens, kv_b_proj, kv_b_proj_scale, H, dn, dv,
                      num_tokens):
    """Every metadata check of mla_decompress_kv_paged's inputs, each error naming its
    argument (kv_cache_scale, out_k / out_v and the values are checked after)."""
    op = "mla_decompress_kv_paged"
    check_tensor(op, "kv_cache", kv_cache, ndim=3, dtypes=WEIGHT_DTYPES)
    check_last_dim_contiguous(op, "kv_cache", kv_cache)
    if kv_cache.shape[1] < 1:
        raise ValueError(f"{op}: kv_cache must be (num_blocks, block_size, R + rope) with "
                         f"block_size >= 1, got shape {tuple(kv_cache.shape)}")
    check_tensor(op, "block_table", block_table, ndim=2, dtypes=INDEX_DTYPES)
    check_tensor(op, "seq_lens", seq_lens, ndim=1, dtypes=INDEX_DTYPES)
    check_same_device(op, "block_table", block_table, "kv_cache", kv_cache)
    check_same_device(op, "seq_lens", seq_lens, "kv_cache", kv_cache)
    if seq_lens.shape[0] != block_table.shape[0]:
        raise ValueError(f"{op}: seq_lens has {seq_lens.shape[0]} sequences but block_table "
                         f"has {block_table.shape[0]} rows")
    _check_dims(op, H, dn, dv)
    check_tensor(op, "kv_b_proj", kv_b_proj)
    if kv_b_proj.dim() not in (2, 4):
        raise ValueError(f"{op}: kv_b_proj must be 2-D, or 4-D packed (mla_pack_kv_b_proj), "
                         f"got shape {tuple(kv_b_proj.shape)}")
    R = _latent_width(kv_b_proj)
    rope = kv_cache.shape[2] - R
    if rope < 1:
        raise ValueError(f"{op}: kv_cache rows ({kv_cache.shape[2]}) must hold the latent "
                         f"(R = {R}, kv_b_proj's columns) and k_pe (at least 1)")
    _check_weight(op, kv_b_proj, kv_b_proj_scale, H, dn, dv, R, "kv_cache", kv_cache)
    _check_matching_dtypes(op, "kv_cache", kv_cache, kv_b_proj)
    if num_tokens is not None:
        check_int(op, "num_tokens", num_tokens, low=0)


def _plain_paged_call(kv_cache, block_table, seq_lens, kv_b_proj, kv_b_proj_scale, H, dn, dv,
                      num_tokens) -> bool:
    """Whether the call is the common one (plain tensors, an unpacked weight) and valid, in
    a few predicates, each implied by one of _check_paged_args' checks (or stricter): True
    means _check_paged_args would pass. As _plain_call for the contiguous op."""
    if not (type(kv_cache) is torch.Tensor and type(block_table) is torch.Tensor
            and type(seq_lens) is torch.Tensor and type(kv_b_proj) is torch.Tensor
            and all_strided(kv_cache, block_table, seq_lens, kv_b_proj)
            and type(H) is int and type(dn) is int and type(dv) is int and H >= 1
            and dn >= 1 and dv >= 1
            and (num_tokens is None or (type(num_tokens) is int and num_tokens >= 0))
            and kv_cache.dim() == 3 and block_table.dim() == 2 and seq_lens.dim() == 1
            and kv_b_proj.dim() == 2 and kv_cache.dtype in WEIGHT_DTYPES
            and block_table.dtype in INDEX_DTYPES and seq_lens.dtype in INDEX_DTYPES
            and kv_cache.stride(2) == 1 and kv_b_proj.stride(1) == 1):
        return False
    N, R = H * (dn + dv), kv_b_proj.shape[1]
    device = kv_cache.device
    if (R < 1 or kv_cache.shape[1] < 1 or kv_cache.shape[2] <= R or kv_b_proj.shape[0] != N
            or seq_lens.shape[0] != block_table.shape[0] or block_table.device != device
            or seq_lens.device != device or kv_b_proj.device != device):
        return False
    if kv_b_proj.dtype != FP8:
        return (kv_b_proj_scale is None and kv_b_proj.dtype in FLOAT_DTYPES
                and kv_cache.dtype in (FP8, kv_b_proj.dtype))
    s = kv_b_proj_scale
    return (type(s) is torch.Tensor and s.layout is STRIDED and s.dtype == torch.float32
            and s.device == device
            and s.shape == (cdiv(N, SCALE_BLOCK), cdiv(R, SCALE_BLOCK)))


def _paged_output_dtype(cache_dtype: torch.dtype, weight_dtype: torch.dtype) -> torch.dtype:
    """The cache's dtype, for an fp8 cache the weight's, bf16 if both are fp8."""
    if cache_dtype != FP8:
        return cache_dtype
    return weight_dtype if weight_dtype != FP8 else torch.bfloat16


def mla_decompress_kv_paged(kv_cache: torch.Tensor, block_table: torch.Tensor,
                            seq_lens: torch.Tensor, kv_b_proj: torch.Tensor, *,
                            num_heads: int, qk_nope_head_dim: int = 128,
                            v_head_dim: int = 128, kv_b_proj_scale: torch.Tensor | None = None,
                            kv_cache_scale: float | torch.Tensor | None = None,
                            num_tokens: int | None = None, out_k: torch.Tensor | None = None,
                            out_v: torch.Tensor | None = None, backend: str | None = None):
    """mla_decompress_kv over a paged latent cache, tokens of sequence 0, then 1, ...

    kv_cache: (num_blocks, block_size, R + rope) bf16 | fp16 | fp32, or float8_e4m3fn with
    kv_cache_scale (a float or a one-element float32 tensor; real = fp8 * scale; None = 1);
    block_table: (B, max_blocks) int32 | int64; seq_lens: (B,) int32 | int64; kv_b_proj as
    in mla_decompress_kv (R from its columns). Output rows: num_tokens (default: out_k's
    rows, else sum(seq_lens), which reads it on the host); rows past sum(seq_lens) are
    zeros. Output dtype: the cache's, for an fp8 cache kv_b_proj's, bf16 if both are fp8.

    Values (lengths, block ids) are checked on the host in eager calls on CPU tensors and
    whenever num_tokens is read from seq_lens; a CUDA call given num_tokens or out_k, and
    any call under torch.compile (which needs num_tokens or out_k), checks shapes only (no
    sync: CUDA-graph capturable), and the kernel reads nothing out of bounds: tokens
    without a valid block get zeros."""
    op = "mla_decompress_kv_paged"
    if autodiff_possible():
        check_forward_only(op, kv_cache=kv_cache, kv_b_proj=kv_b_proj,
                           kv_b_proj_scale=kv_b_proj_scale, kv_cache_scale=kv_cache_scale)
    H, dn, dv = num_heads, qk_nope_head_dim, v_head_dim
    if not (out_k is None and out_v is None
            and _plain_paged_call(kv_cache, block_table, seq_lens, kv_b_proj, kv_b_proj_scale,
                                  H, dn, dv, num_tokens)):
        _check_paged_args(kv_cache, block_table, seq_lens, kv_b_proj, kv_b_proj_scale, H, dn,
                          dv, num_tokens)
    rope = kv_cache.shape[2] - _latent_width(kv_b_proj)
    scale = _cache_scale(op, kv_cache, kv_cache_scale)
    if out_k is not None:
        check_tensor(op, "out_k", out_k, ndim=3)
        if num_tokens is not None and out_k.shape[0] != num_tokens:
            raise ValueError(f"{op}: out_k has {out_k.shape[0]} rows but num_tokens = "
                             f"{num_tokens}")
        num_tokens = out_k.shape[0]
    symbolic = holds_no_data(seq_lens)
    if symbolic and num_tokens is None:
        raise ValueError(f"{op}: under torch.compile or with meta / fake tensors pass "
                         f"num_tokens (or out_k): the output size cannot be read from seq_lens")
    if not symbolic and (kv_cache.is_cpu or num_tokens is None):
        total = _check_paged_values(op, block_table, seq_lens, kv_cache.shape[0],
                                    kv_cache.shape[1], num_tokens)
        num_tokens = total if num_tokens is None else num_tokens
    T = num_tokens
    if out_k is not None or out_v is not None:
        inputs = {"kv_cache": kv_cache, "block_table": block_table, "seq_lens": seq_lens,
                  "kv_b_proj": kv_b_proj, "kv_b_proj_scale": kv_b_proj_scale}
        _check_out(op, "out_k", out_k, (T, H, dn + rope), kv_cache, inputs)
        _check_out(op, "out_v", out_v, (T, H, dv), kv_cache, {**inputs, "out_k": out_k})
    backend = MLA_DECOMPRESS_KV_PAGED.resolve(backend, kv_cache)
    _check_packed_backend(op, kv_b_proj, backend)
    dtype = _paged_output_dtype(kv_cache.dtype, kv_b_proj.dtype)
    out_k, out_v = _outputs(out_k, out_v, T, H, dn, dv, rope, dtype, kv_cache)
    return _run(MLA_DECOMPRESS_KV_PAGED, backend,
                (kv_cache, block_table, seq_lens, kv_b_proj, kv_b_proj_scale, scale), out_k,
                out_v, reference.mla_decompress_kv_paged,
                (kv_cache, block_table, seq_lens, kv_b_proj, kv_b_proj_scale, scale, H, dn, dv,
                 T))
