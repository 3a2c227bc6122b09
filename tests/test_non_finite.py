"""Every op with one non-finite value planted in one float input, on every backend against
the reference, judged by moe_kernels.testing's rules for the op (docs/testing.md): NaN
where the reference has NaN, +-inf where it has them (GEMM and MLA outputs: non-finite
where it is, NaN and inf alike, as docs/api.md leaves the kind open), and the finite
outputs within the op's tolerance; or both refuse the call with the same error type.

The per-op tests hold the details (which outputs a value reaches, zero rows); this one
sweeps every input of every op, so that no backend treats a NaN or an inf in a way of its
own: for instance a masked GEMM that writes NaN into its rows past masked_m from a NaN
weight scale, or an interpreted GEMM that reads NaN codes as 480.
"""

from __future__ import annotations

import pytest
import torch

import moe_kernels
from moe_kernels import testing
from moe_kernels.testing.core import Case

from helpers import device_backend_params, outcome

# fused_moe_fp8's weights: the contract leaves the outputs of the tokens routed to an
# expert with a non-finite weight value unspecified (GEMM1's output is quantized again,
# which saturates inf), so they are not swept.
UNSPECIFIED = {("fused_moe_fp8", n) for n in ("w13", "w13_scales", "w2", "w2_scales")}
VALUES = ("nan", "inf", "-inf")


def _case(op: str, device="cpu") -> Case:
    """The op's first drawn case (small sizes; the interpreter runs it)."""
    return testing.cases(op, "random", seed=1, device=device)[0]


def _planted() -> list:
    """(op, input name, value) for every float tensor input of every op; an FP8 input
    gets a NaN code only (e4m3fn has no inf)."""
    out = []
    for op in testing.ops():
        for name, t in _case(op).inputs.items():
            if not isinstance(t, torch.Tensor) or not t.is_floating_point() or not t.numel() \
                    or (op, name) in UNSPECIFIED:
                continue
            values = ("nan",) if t.dtype == torch.float8_e4m3fn else VALUES
            out += [(op, name, v) for v in values]
    return out


def _plant(t: torch.Tensor, value: str) -> torch.Tensor:
    """A copy of t (its strides kept) with its middle element set to value."""
    t = t.clone()
    middle = torch.unravel_index(torch.tensor(t.numel() // 2), t.shape)
    if t.dtype == torch.float8_e4m3fn:
        t.view(torch.uint8)[middle] = 0x7F                  # e4m3fn NaN
    else:
        t[middle] = float(value)
    return t


def _outcome(op: str, fn, case: Case):
    """(result, None) or (None, the error's type)."""
    return outcome(lambda: testing.run(op, fn, case))


@pytest.mark.parametrize("device,backend", device_backend_params(("triton", "cpu", "cuda")))
@pytest.mark.parametrize("op,name,value", _planted())
def test_backend_agrees_with_the_reference(device, backend, op, name, value):
    """On the GPU this is where the tensor cores' handling of NaN codes shows."""
    if backend not in moe_kernels._library.OPS[op].backends:
        pytest.skip(f"{op} has no {backend} backend")
    base = _case(op, device)
    case = Case(op, base.name, {**base.inputs, name: _plant(base.inputs[name], value)})
    want, want_error = _outcome(op, testing.reference(op), case)
    got, got_error = _outcome(op, lambda *a, **k: getattr(moe_kernels, op)(
        *a, **k, backend=backend), case)
    assert got_error == want_error, f"reference: {want_error}, {backend}: {got_error}"
    if want_error is None:
        comparison = testing.compare(op, got, want, case)
        assert comparison.passed, str(comparison)
