"""The rounding helpers of moe_kernels/triton/numerics.py against PyTorch's casts (round
to nearest even), directly: every e4m3 value, every midpoint between neighbours (ties),
points just off the midpoints, subnormals, the carry into the next binade, zero, NaN.

Under the interpreter the software path runs; on a GPU the hardware cast does, so the
same test pins both to PyTorch's numerics.
"""

from __future__ import annotations

import pytest
import torch

from helpers import assert_fp8_close

triton = pytest.importorskip("triton")
tl = triton.language

from moe_kernels.triton.numerics import (SOFTWARE_ROUNDING, fp8_e4m3_bits,  # noqa: E402
                                         fp8_e4m3_value, round_for_store)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
from moe_kernels._common import FP8


@triton.jit
def _fp8_kernel(x_ptr, q_ptr, N, BLOCK: tl.constexpr, SOFTWARE: tl.constexpr):
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    x = tl.load(x_ptr + i, mask=i < N, other=0.0)
    tl.store(q_ptr + i, fp8_e4m3_bits(x, SOFTWARE), mask=i < N)


@triton.jit
def _bf16_kernel(x_ptr, y_ptr, N, BLOCK: tl.constexpr, SOFTWARE: tl.constexpr):
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    x = tl.load(x_ptr + i, mask=i < N, other=0.0)
    y = round_for_store(x, y_ptr.dtype.element_ty, SOFTWARE)
    tl.store(y_ptr + i, y.to(y_ptr.dtype.element_ty), mask=i < N)


@triton.jit
def _fp8_decode_kernel(q_ptr, y_ptr, N, BLOCK: tl.constexpr, SOFTWARE: tl.constexpr):
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    q = tl.load(q_ptr + i, mask=i < N, other=0)
    tl.store(y_ptr + i, fp8_e4m3_value(q, SOFTWARE), mask=i < N)


def test_fp8_e4m3_value_every_pattern():
    """All 256 bit patterns decode as torch decodes them: subnormals, -0, NaN (the
    interpreter's own cast reads 0x7F / 0xFF as +-480)."""
    bits = torch.arange(256, dtype=torch.uint8, device=DEVICE)
    y = torch.empty(256, device=DEVICE)
    _fp8_decode_kernel[(1,)](bits, y, 256, BLOCK=256, SOFTWARE=SOFTWARE_ROUNDING)
    want = bits.view(FP8).float().cpu()
    y = y.cpu()
    assert torch.equal(y.isnan(), want.isnan())
    ok = ~want.isnan()
    assert torch.equal(y[ok], want[ok]) and torch.equal(y[ok].signbit(), want[ok].signbit())


def _fp8_inputs() -> torch.Tensor:
    """All finite e4m3 magnitudes in [0, 448], their midpoints and points 1e-4 relative
    on either side of each midpoint, with both signs, plus NaN."""
    values = torch.arange(0, 0x7F, dtype=torch.uint8).view(FP8).float()   # 0 .. 448
    mids = (values[1:] + values[:-1]) / 2
    xs = torch.cat([values, mids, mids * (1 + 1e-4), mids * (1 - 1e-4)])
    return torch.cat([xs, -xs, torch.tensor([float("nan")])])


def test_fp8_e4m3_bits_round_to_nearest_even():
    x = _fp8_inputs()
    q = torch.empty(x.shape, dtype=FP8, device=DEVICE)
    xd = x.to(DEVICE)
    _fp8_kernel[(triton.cdiv(x.numel(), 256),)](xd, q.view(torch.uint8), x.numel(), BLOCK=256,
                                                SOFTWARE=SOFTWARE_ROUNDING)
    assert_fp8_close(q, x.to(FP8), msg="fp8_e4m3_bits vs torch cast")


def test_round_for_store_bf16_is_round_to_nearest_even():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4096, generator=g) * torch.logspace(-30, 30, 4096)
    # exact ties between neighbouring bf16 values (low 16 bits 0x8000), normal float32 only:
    # the interpreter's bf16 store itself mangles float32 subnormals (< 1.2e-38), which no
    # kernel here produces; the GPU does not
    high = torch.randint(0x0080, 0x7F80, (512,), generator=g, dtype=torch.int32)  # exp 1..254
    sign = torch.randint(0, 2, (512,), generator=g, dtype=torch.int32) << 31
    ties = sign | (high << 16) | 0x8000
    x = torch.cat([x, ties.view(torch.float32), torch.tensor([0.0, -0.0, float("nan")])])
    y = torch.empty(x.shape, dtype=torch.bfloat16, device=DEVICE)
    _bf16_kernel[(triton.cdiv(x.numel(), 256),)](x.to(DEVICE), y, x.numel(), BLOCK=256,
                                                 SOFTWARE=SOFTWARE_ROUNDING)
    want = x.bfloat16()
    assert torch.equal(y.cpu().isnan(), want.isnan())
    ok = ~want.isnan()
    assert torch.equal(y.cpu()[ok].view(torch.int16), want[ok].view(torch.int16))
