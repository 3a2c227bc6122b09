"""grouped_gemm_fp8 and grouped_gemm_fp8_masked, property-tested on every backend: random
sizes (no rows, one row, partial N and K blocks, E = 1), m_indices in any order with -1
and out-of-range ids, masked_m of 0 and of M, and every tensor argument in a drawn memory
layout (tests/properties.py; column-major scales among them), and at times one non-finite
value (a NaN code, or a NaN / +-inf scale) drawn into a drawn operand. Each example must
follow the layout rule and agree with the reference on the same values laid out
contiguously (moe_kernels.testing's GEMM rule: calc_diff < 1e-5 over the whole output and
each row, non-finite exactly where the reference is, NaN and inf alike: docs/api.md), with
rows that have no expert exactly zero."""

from __future__ import annotations

import torch
from hypothesis import strategies as st

import moe_kernels
from moe_kernels.reference import fp8 as ref_fp8

import properties
from moe_kernels.testing import rules

ROWS = ("a", "b")


def draw_operands(data, E, rows, interp):
    N = data.draw(st.sampled_from([1, 64, 130]) if interp else st.integers(1, 300), label="N")
    K = data.draw(st.sampled_from([1, 128, 200]) if interp else st.integers(1, 300), label="K")
    g = torch.Generator().manual_seed(data.draw(st.integers(0, 2**31 - 1)))
    b, bs = ref_fp8.quantize_fp8_block(torch.randn(E, N, K, generator=g) / K ** 0.5)
    a, a_s = ref_fp8.quantize_fp8_per_token_group(torch.randn(rows, K, generator=g) * 2)
    a, a_s, b, bs = draw_non_finite(data, a, a_s, b, bs)
    return a, a_s, b, bs, g


def draw_non_finite(data, *operands):
    """The operands, or copies with one drawn element of one drawn operand made
    non-finite: an fp8 one gets the NaN code, a scale NaN, +inf or -inf."""
    which = data.draw(st.sampled_from([None, None, 0, 1, 2, 3]), label="non-finite in")
    if which is None or not operands[which].numel():
        return operands
    t = operands[which].clone()
    at = data.draw(st.integers(0, t.numel() - 1), label="at")
    if t.dtype == torch.float8_e4m3fn:
        t.view(torch.uint8).view(-1)[at] = 0x7F
    else:
        t.view(-1)[at] = data.draw(st.sampled_from([float("nan"), float("inf"), -float("inf")]))
    return tuple(t if i == which else x for i, x in enumerate(operands))


def check(fn, inputs, device, backend, data, expert_of_row, msg):
    """fn on inputs in drawn layouts under the layout rule, against the reference;
    expert_of_row(contiguous inputs) -> (rows,) expert of each output row, -1 for none."""
    inputs, layouts = properties.draw_layouts(data, properties.on(device, inputs), rows=ROWS)
    got = properties.call(fn, inputs, backend, rows=ROWS)
    if got is None:
        return
    want = properties.reference(fn, inputs)
    msg = f"{backend} {msg} {layouts}"
    assert got.shape == want.shape and got.dtype == want.dtype, msg
    verdict = rules.gemm("out", got, want)
    assert verdict.passed, f"{msg}: {verdict}"
    no_expert = expert_of_row(properties.contiguous_copy(properties.on("cpu", inputs))) < 0
    assert not got.cpu()[no_expert].float().any(), f"{msg}: rows without an expert"


@properties.property_test("grouped_gemm_fp8", max_examples=20)
def test_grouped_gemm_fp8_properties(device, backend, data):
    interp = properties.interpreting(device, backend)
    E = data.draw(st.integers(1, 5), label="E")
    R = data.draw(st.sampled_from([0, 1, 9]) if interp else st.integers(0, 80), label="R")
    a, a_s, b, bs, g = draw_operands(data, E, R, interp)
    m = torch.randint(-1, E + 1, (R,), generator=g)       # any order, -1 and E: no expert
    if data.draw(st.booleans(), label="all rows on one expert"):
        m = torch.full((R,), E - 1)
    inputs = dict(a=a, a_scales=a_s, b=b, b_scales=bs,
                  m_indices=m.to(data.draw(st.sampled_from([torch.int32, torch.int64]))),
                  out_dtype=data.draw(st.sampled_from([torch.bfloat16, torch.float32])))
    check(moe_kernels.grouped_gemm_fp8, inputs, device, backend, data,
          lambda x: torch.where((x["m_indices"] >= 0) & (x["m_indices"] < E), x["m_indices"], -1),
          f"E={E} R={R}")


@properties.property_test("grouped_gemm_fp8_masked", max_examples=20)
def test_grouped_gemm_fp8_masked_properties(device, backend, data):
    interp = properties.interpreting(device, backend)
    E = data.draw(st.integers(1, 4), label="E")
    M = data.draw(st.sampled_from([1, 3]) if interp else st.integers(1, 40), label="M")
    a, a_s, b, bs, g = draw_operands(data, E, E * M, interp)
    masked = torch.tensor([data.draw(st.sampled_from([0, 1, M])) for _ in range(E)])
    inputs = dict(a=a.view(E, M, -1), a_scales=a_s.view(E, M, -1), b=b, b_scales=bs,
                  masked_m=masked.to(data.draw(st.sampled_from([torch.int32, torch.int64]))))
    slot = torch.arange(M).expand(E, M)
    check(moe_kernels.grouped_gemm_fp8_masked, inputs, device, backend, data,
          lambda x: torch.where(slot < x["masked_m"][:, None].long(), torch.arange(E)[:, None], -1),
          f"E={E} M={M} masked_m={masked.tolist()}")
