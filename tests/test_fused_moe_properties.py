"""fused_moe_fp8, property-tested on every backend: random layers (E = 1, H and I not
multiples of 128), routings with -1 ids, ids of another rank's experts and every pair on
one expert, T = 0 and T = 1 among the sizes, and every tensor argument in a drawn memory
layout (tests/properties.py). Each example must follow the layout rule and agree with the
reference on the same values laid out contiguously (relative Frobenius error < 2e-2,
the bound of docs/api.md, plus what the other rounding of each intermediate value within
float32 noise of a midpoint moves the output: moe_kernels.testing.fused_moe.check_out)."""

from __future__ import annotations

import torch
from hypothesis import strategies as st

import moe_kernels
from moe_kernels.reference import fp8 as ref_fp8
from moe_kernels.testing import fused_moe as fused_rule

import properties

ROWS = ("hidden", "w13", "w2")


@properties.property_test("fused_moe_fp8", max_examples=15)
def test_fused_moe_fp8_properties(device, backend, data):
    interp = properties.interpreting(device, backend)
    E = data.draw(st.integers(1, 4), label="E")
    H = data.draw(st.sampled_from([64, 128, 200]), label="H")
    inter = data.draw(st.sampled_from([32, 128, 136]), label="I")
    T = data.draw(st.sampled_from([0, 1, 3]) if interp else st.integers(0, 24), label="T")
    K = data.draw(st.integers(1, 3), label="K")
    g = torch.Generator().manual_seed(data.draw(st.integers(0, 2**31 - 1)))
    w13, s13 = ref_fp8.quantize_fp8_block(torch.randn(E, 2 * inter, H, generator=g) / H ** 0.5)
    w2, s2 = ref_fp8.quantize_fp8_block(torch.randn(E, H, inter, generator=g) / inter ** 0.5)
    ids = torch.randint(-1, E + 1, (T, K), generator=g)     # -1 and E: not this rank's
    if data.draw(st.booleans(), label="every pair on one expert"):
        ids = torch.full((T, K), E - 1)
    inputs = dict(hidden=torch.randn(T, H, generator=g).to(
                      data.draw(st.sampled_from([torch.bfloat16, torch.float32]))),
                  w13=w13, w13_scales=s13, w2=w2, w2_scales=s2,
                  topk_weights=torch.rand(T, K, generator=g), topk_ids=ids.int())
    inputs, layouts = properties.draw_layouts(data, properties.on(device, inputs), rows=ROWS)
    got = properties.call(moe_kernels.fused_moe_fp8, inputs, backend, rows=ROWS)
    if got is None:
        return
    want = properties.reference(moe_kernels.fused_moe_fp8, inputs)
    msg = f"{backend} E={E} H={H} I={inter} T={T} K={K} {layouts}"
    assert got.shape == want.shape and got.dtype == want.dtype, msg
    assert not got.float().isnan().any(), msg
    verdict = fused_rule.check_out(got, want, properties.contiguous_copy(
        properties.on("cpu", inputs)))
    assert verdict.passed, f"{msg}: {verdict}"
