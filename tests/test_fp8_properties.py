"""The FP8 quantizers and dequantize_fp8_block, property-tested on every backend: random
sizes (M = 0 and 1 among them, partial groups and blocks, one group per row), the
smallest valid eps, all-zero groups, +-inf and NaN values, ue8m0 and column-major scales,
and every tensor argument in a drawn memory layout (tests/properties.py). Each example must
follow the layout rule and give what the reference gives for the same values laid out
contiguously: scales exactly, fp8 data bit for bit (silu_and_mul: within one fp8 step,
as exp differs by an ulp between libraries)."""

from __future__ import annotations

import torch
from hypothesis import strategies as st

import moe_kernels
from moe_kernels.ops.fp8 import MIN_EPS

import properties
from helpers import assert_close, assert_fp8_close

SPECIALS = (0.0, float("inf"), float("-inf"), float("nan"))


def draw_x(data, rows_shape, K):
    """Values over 12 decades with zero groups and drawn specials."""
    g = torch.Generator().manual_seed(data.draw(st.integers(0, 2**31 - 1)))
    x = torch.randn(*rows_shape, K, generator=g) * torch.logspace(-6, 4, K)[torch.randperm(K, generator=g)]
    flat = x.view(-1)
    n = data.draw(st.integers(0, min(flat.numel(), 4)), label="special values")
    for i in torch.randperm(flat.numel(), generator=g)[:n].tolist():
        flat[i] = data.draw(st.sampled_from(SPECIALS))
    if x.shape[0] > 1 and data.draw(st.booleans(), label="a zero row"):
        x[1] = 0.0
    dtype = data.draw(st.sampled_from([torch.float32, torch.bfloat16, torch.float16]))
    return x.to(dtype)


def draw_eps(data):
    return data.draw(st.sampled_from([1e-10, MIN_EPS, 1.0]), label="eps")


@properties.property_test("quantize_fp8_per_token_group")
def test_quantize_fp8_per_token_group_properties(device, backend, data):
    interp = properties.interpreting(device, backend)
    M = data.draw(st.sampled_from([0, 1, 5]) if interp else st.integers(0, 40), label="M")
    K = data.draw(st.integers(1, 300), label="K")
    inputs = dict(x=draw_x(data, (M,), K).to(device),
                  group_size=data.draw(st.sampled_from([16, 64, 128, 512])),
                  eps=draw_eps(data), scale_ue8m0=data.draw(st.booleans()),
                  column_major_scales=data.draw(st.booleans()))
    inputs, layouts = properties.draw_layouts(data, inputs, rows=("x",))
    got = properties.call(moe_kernels.quantize_fp8_per_token_group, inputs, backend, rows=("x",))
    if got is None:
        return
    q, s = properties.reference(moe_kernels.quantize_fp8_per_token_group, inputs)
    assert got[1].t().is_contiguous() == s.t().is_contiguous(), "scales' layout"
    assert torch.equal(got[1].cpu(), s), f"{backend} scales {layouts}"
    assert_fp8_close(got[0], q, msg=f"{backend} M={M} K={K} {layouts}")


@properties.property_test("silu_and_mul_quant_fp8")
def test_silu_and_mul_quant_fp8_properties(device, backend, data):
    interp = properties.interpreting(device, backend)
    M = data.draw(st.sampled_from([0, 1, 5]) if interp else st.integers(0, 40), label="M")
    N = data.draw(st.integers(1, 200), label="N")
    g = torch.Generator().manual_seed(data.draw(st.integers(0, 2**31 - 1)))
    x = (torch.randn(M, 2 * N, generator=g) * 4).to(
        data.draw(st.sampled_from([torch.float32, torch.bfloat16])))
    inputs = dict(x=x.to(device), group_size=data.draw(st.sampled_from([16, 128])))
    inputs, layouts = properties.draw_layouts(data, inputs, rows=("x",))
    got = properties.call(moe_kernels.silu_and_mul_quant_fp8, inputs, backend, rows=("x",))
    if got is None:
        return
    q, s = properties.reference(moe_kernels.silu_and_mul_quant_fp8, inputs)
    assert_close(got[1], s, dtype=torch.float32, msg=f"{backend} scales {layouts}")
    assert_fp8_close(got[0], q, max_steps=1, msg=f"{backend} M={M} N={N} {layouts}")


@properties.property_test("quantize_fp8_block", max_examples=20)
def test_block_quantization_properties(device, backend, data):
    """quantize_fp8_block, then dequantize_fp8_block of its result in another layout."""
    interp = properties.interpreting(device, backend)
    lead = data.draw(st.sampled_from([(), (1,), (2,)]), label="leading dims")
    N = data.draw(st.sampled_from([0, 1, 130]) if interp else st.integers(0, 300), label="N")
    K = data.draw(st.integers(1, 200), label="K")
    block = (data.draw(st.sampled_from([32, 128])), data.draw(st.sampled_from([64, 128])))
    w = draw_x(data, (*lead, N), K)
    inputs = dict(w=w.to(device), block=block, eps=draw_eps(data))
    inputs, layouts = properties.draw_layouts(data, inputs)   # copied: any layout
    got = properties.call(moe_kernels.quantize_fp8_block, inputs, backend)
    if got is None:
        return
    q, s = properties.reference(moe_kernels.quantize_fp8_block, inputs)
    assert torch.equal(got[1].cpu(), s), f"{backend} scales {layouts}"
    assert_fp8_close(got[0], q, msg=f"{backend} {tuple(w.shape)} {layouts}")

    dtype = data.draw(st.sampled_from([torch.bfloat16, torch.float32]), label="dequantized dtype")
    inputs = dict(q=got[0], s=got[1], block=block, dtype=dtype)
    inputs, layouts = properties.draw_layouts(data, inputs)
    out = properties.call(moe_kernels.dequantize_fp8_block, inputs, backend)
    if out is None:
        return
    want = properties.reference(moe_kernels.dequantize_fp8_block, inputs)
    assert out.dtype == dtype
    assert torch.equal(out.cpu().isnan(), want.isnan())
    assert_close(out.nan_to_num(), want.nan_to_num(), msg=f"{backend} dequantize {layouts}")
