"""Argument checks shared by every op: each raises before any launch and names the argument.

They read only metadata (shape, dtype, device, strides), never tensor values, so they cost
no host synchronisation and trace cleanly under torch.compile.
"""

from __future__ import annotations

import torch

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


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
