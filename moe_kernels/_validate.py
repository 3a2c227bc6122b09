"""Argument checks shared by every op: each raises before any launch and names the argument.

They read only metadata (shape, dtype, device, strides), never tensor values, so they cost
no host synchronisation and trace cleanly under torch.compile.
"""

from __future__ import annotations

import torch

from moe_kernels._common import FLOAT_DTYPES, FP8


def check_tensor(op: str, name: str, x, *, ndim: int | None = None, dtypes=None) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(x).__name__}")
    if ndim is not None and x.dim() != ndim:
        raise ValueError(f"{op}: {name} must be {ndim}-D, got shape {tuple(x.shape)}")
    if dtypes is not None and x.dtype not in dtypes:
        names = ", ".join(str(d).replace("torch.", "") for d in dtypes)
        raise TypeError(f"{op}: {name} must have dtype in ({names}), got {x.dtype}")


def check_float_tensor(op: str, name: str, x, *, ndim: int | None = None) -> None:
    check_tensor(op, name, x, ndim=ndim)
    if not x.is_floating_point():
        raise TypeError(f"{op}: {name} must be a float tensor, got {x.dtype}")


def check_same_device(op: str, name: str, x: torch.Tensor, ref_name: str, ref: torch.Tensor) -> None:
    if x.device != ref.device:
        raise ValueError(f"{op}: {name} is on {x.device} but {ref_name} is on {ref.device}")


def check_last_dim_contiguous(op: str, name: str, x: torch.Tensor) -> None:
    if x.dim() >= 1 and x.shape[-1] > 1 and x.stride(-1) != 1:
        raise ValueError(
            f"{op}: {name} must have a contiguous last dimension (stride 1), got strides "
            f"{tuple(x.stride())}; call .contiguous() first")


def check_int(op: str, name: str, value, *, low: int | None = None, high: int | None = None,
              high_name: str | None = None) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{op}: {name} must be an int, got {type(value).__name__}")
    if low is not None and value < low:
        raise ValueError(f"{op}: {name} must be >= {low}, got {value}")
    if high is not None and value > high:
        bound = f"{high_name} = {high}" if high_name else str(high)
        raise ValueError(f"{op}: {name} must be <= {bound}, got {value}")


def check_choice(op: str, name: str, value, choices) -> None:
    if value not in choices:
        raise ValueError(f"{op}: {name} must be one of {tuple(choices)}, got {value!r}")


def check_fp8(op: str, name: str, x, ndim: int | None = None) -> None:
    check_tensor(op, name, x, ndim=ndim)
    if x.dtype != FP8:
        raise TypeError(f"{op}: {name} must be float8_e4m3fn, got {x.dtype}")


def check_scales(op: str, name: str, s, shape: tuple, ref_name: str, ref) -> None:
    """s: float32 of exactly `shape` (derived from ref's shape), on ref's device."""
    check_tensor(op, name, s, dtypes=(torch.float32,))
    if tuple(s.shape) != tuple(shape):
        raise ValueError(f"{op}: {name} must have shape {tuple(shape)} (from {ref_name}'s "
                         f"shape {tuple(ref.shape)}), got {tuple(s.shape)}")
    check_same_device(op, name, s, ref_name, ref)
