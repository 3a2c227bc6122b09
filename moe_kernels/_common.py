"""Constants and helpers shared by every layer of the package (ops, kernels' launchers,
references, benchmarks): one definition each."""

from __future__ import annotations

import functools

import torch

FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0                 # largest finite float8_e4m3fn
SCALE_BLOCK = 128               # the FP8 scale block: 1 x 128 activations, 128 x 128 weights
FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# float64 too: the dtypes torch computes with, a checkpoint's weights or a bias may hold
# (fp8 has no arithmetic in torch)
FLOAT_DTYPES_F64 = (*FLOAT_DTYPES, torch.float64)
INDEX_DTYPES = (torch.int32, torch.int64)   # expert ids, m_indices, block tables, lengths


def rows_in_place(x):
    """x (T, D) as the row kernels read it (a row stride, elements of a row adjacent):
    itself where its last dimension is contiguous, else a contiguous copy."""
    return x if x.shape[1] <= 1 or x.stride(1) == 1 else x.contiguous()


def cdiv(a: int, b: int) -> int:
    """ceil(a / b) for ints (b > 0). Host code uses this, not `triton.cdiv`: that one is a
    constexpr function whose call unwraps its arguments, ~2.2 us a call against 0.1."""
    return -(-a // b)


def next_power_of_2(n: int) -> int:
    """The smallest power of two >= n (0 for n = 0), as `triton.next_power_of_2` computes
    it at a twentieth of the host cost."""
    return 1 << (n - 1).bit_length() if n > 0 else 0


def _autocast_device_types() -> frozenset:
    """The device types with autocast, read once: torch.amp.is_autocast_available is not
    traceable by torch.compile under torch 2.11 (a fullgraph compile of the layer broke
    on it), a frozenset lookup is."""
    types = set()
    for name in ("cpu", "cuda", "xpu", "mps", "hpu", "mtia", "maia", "xla", "privateuseone"):
        try:
            if torch.amp.is_autocast_available(name):
                types.add(name)
        except RuntimeError:
            pass
    return frozenset(types)


AUTOCAST_DEVICE_TYPES = _autocast_device_types()


def without_autocast(fn):
    """fn run with autocast off on its first argument's device (a tensor): its float32
    math stays float32 inside a caller's `torch.autocast` region, which would otherwise run
    every matmul in the autocast dtype (the references' GEMMs, the layer's router).
    Checked first: the query took ~0.2 us, entering the context ~4 us (2-core CPU)."""
    @functools.wraps(fn)
    def run(x, *args, **kwargs):
        device_type = x.device.type
        # (a device without autocast, e.g. meta, has none to turn off; asking raises)
        if device_type in AUTOCAST_DEVICE_TYPES and torch.is_autocast_enabled(device_type):
            with torch.autocast(device_type, enabled=False):
                return fn(x, *args, **kwargs)
        return fn(x, *args, **kwargs)

    return run
