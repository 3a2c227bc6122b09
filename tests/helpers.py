"""Helpers shared by the op tests: devices and backends (with skip reasons), output
poisoning, and the one tolerance rule for floats."""

from __future__ import annotations

import pytest
import torch

from moe_kernels import _library

HAS_CUDA = torch.cuda.is_available()
DEVICES = ["cpu"] + (["cuda"] if HAS_CUDA else [])


def backend_params(device: str, backends=_library.BACKENDS):
    """pytest params of the backends on `device`; those that cannot run here are skipped
    with the reason (never silently dropped, never a vacuous pass)."""
    params = []
    for b in backends:
        reason = _library.backend_unavailable_reason(b, torch.device(device))
        marks = [pytest.mark.skip(reason=f"{b} on {device}: {reason}")] if reason else []
        params.append(pytest.param(b, marks=marks, id=f"{device}-{b}"))
    return params


# The C++ backends are bound to one device type each; other pairs are not even listed.
_DEVICE_ONLY = {"cpu": "cpu", "cuda": "cuda"}


def device_backend_params(backends=_library.BACKENDS, devices=("cpu", "cuda")):
    """(device, backend) params over every device, skipping what cannot run here."""
    params = []
    for d in devices:
        if d == "cuda" and not HAS_CUDA:
            params.append(pytest.param(d, "any", id="cuda-any",
                                       marks=pytest.mark.skip(reason="no CUDA device")))
            continue
        usable = [b for b in backends if _DEVICE_ONLY.get(b, d) == d]
        params += [pytest.param(d, p.values[0], marks=p.marks, id=p.id)
                   for p in backend_params(d, usable)]
    return params


def poison_allocator(device: str) -> None:
    """Fill the CUDA caching allocator's free blocks with NaN so that an output element a
    kernel forgets to write reads as NaN (or a huge int) instead of a plausible value.
    On the CPU, fresh allocations hold whatever malloc returns; every test compares every
    element with the reference, which catches unwritten outputs there too."""
    if device != "cuda":
        return
    free, _ = torch.cuda.mem_get_info()
    n = min(free // 4, 256 << 20) // 4
    junk = torch.full((n,), float("nan"), device=device)
    del junk


# Float comparison rule, written once: (rtol, atol) per dtype the math ran in. Kernels do
# their arithmetic in float32 when the output is float32, so those get float32 bounds.
TOLERANCES = {
    torch.float32: (1e-5, 1e-6),
    torch.float16: (1e-3, 1e-5),
    torch.bfloat16: (1.6e-2, 1e-5),
}


def assert_close(actual: torch.Tensor, expected: torch.Tensor, *, dtype=None, msg=""):
    rtol, atol = TOLERANCES[dtype or actual.dtype]
    torch.testing.assert_close(actual.cpu().to(expected.dtype), expected.cpu(), rtol=rtol,
                               atol=atol, equal_nan=False, msg=lambda m: f"{msg}\n{m}")


def assert_int_equal(actual: torch.Tensor, expected: torch.Tensor, msg=""):
    assert actual.dtype == expected.dtype, f"{msg}: dtype {actual.dtype} != {expected.dtype}"
    assert actual.shape == expected.shape, f"{msg}: shape {actual.shape} != {expected.shape}"
    bad = (actual.cpu() != expected.cpu())
    assert not bad.any(), (f"{msg}: {int(bad.sum())} of {bad.numel()} differ, first at "
                           f"{bad.nonzero()[0].tolist()}")
