"""permute, permute_masked, unpermute and moe_align_block_size, property-tested on every
backend: random routings (-1 ids, ids of another rank's experts, every pair on one
expert, K = E, duplicate ids in a row), T = 0 and T = 1 among the sizes, E = 1, align = 1,
M = 1, fp8 and float rows, and every tensor argument (the layouts' fields included) in a
drawn memory layout (tests/properties.py). Each example must follow the layout rule and
give what the reference gives for the same values laid out contiguously: index tensors
and moved rows exactly, weighted sums by the float rule."""

from __future__ import annotations

import torch
from hypothesis import strategies as st

import moe_kernels

import properties
from helpers import assert_close, assert_int_equal

FP8 = torch.float8_e4m3fn


def draw_routing(data, interp):
    T = data.draw(st.sampled_from([0, 1, 3, 6]) if interp else st.integers(0, 60), label="T")
    E = data.draw(st.sampled_from([1, 2, 5, 8, 13]), label="E")
    K = data.draw(st.integers(1, 6), label="K")
    g = torch.Generator().manual_seed(data.draw(st.integers(0, 2**31 - 1)))
    kind = data.draw(st.sampled_from(["random", "one expert", "all skipped"]), label="routing")
    # ids in [-1, E + 2): -1 skipped, >= E another rank's expert; duplicates in a row allowed
    ids = torch.randint(-1, E + 2, (T, K), generator=g)
    if kind == "one expert":
        ids = torch.full((T, K), E - 1)
    elif kind == "all skipped":
        ids = torch.full((T, K), -1)
    ids = ids.to(data.draw(st.sampled_from([torch.int32, torch.int64]), label="ids dtype"))
    return T, E, K, ids, g


def draw_hidden(data, T, g):
    H = data.draw(st.sampled_from([1, 8, 24]), label="H")
    dtype = data.draw(st.sampled_from([torch.float32, torch.bfloat16, FP8]), label="dtype")
    return (torch.randn(T, H, generator=g) * 4).to(dtype)


def _equal(a, b):
    return torch.equal(a.view(torch.uint8), b.view(torch.uint8)) if a.dtype == FP8 \
        else torch.equal(a, b)


def assert_same_tensors(got, want, msg):
    for i, (a, b) in enumerate(zip(properties.flat(got), properties.flat(want))):
        if a.dtype in (torch.int32, torch.int64):
            assert_int_equal(a.cpu(), b.cpu(), f"{msg}: output {i}")
        else:
            assert a.shape == b.shape and _equal(a.cpu(), b.cpu()), f"{msg}: output {i}"


@properties.property_test("permute")
def test_permute_properties(device, backend, data):
    T, E, K, ids, g = draw_routing(data, properties.interpreting(device, backend))
    hidden = draw_hidden(data, T, g)
    scales = torch.rand(T, 2, generator=g) if data.draw(st.booleans(), label="scales") else None
    masked = data.draw(st.booleans(), label="masked")
    inputs = dict(hidden=hidden, topk_ids=ids, num_experts=E, scales=scales)
    if masked:
        inputs["max_tokens_per_expert"] = data.draw(st.sampled_from([1, 2, 7]), label="M")
    else:
        inputs["align"] = data.draw(st.sampled_from([1, 2, 16]), label="align")
    fn = moe_kernels.permute_masked if masked else moe_kernels.permute
    inputs = properties.on(device, inputs)
    inputs, layouts = properties.draw_layouts(data, inputs)
    got = properties.call(fn, inputs, backend)
    want = properties.reference(fn, inputs)
    assert_same_tensors(got, want, f"{backend} {fn.__name__} T={T} E={E} K={K} {layouts}")


@properties.property_test("unpermute")
def test_unpermute_properties(device, backend, data):
    T, E, K, ids, g = draw_routing(data, properties.interpreting(device, backend))
    hidden = draw_hidden(data, T, g)
    if hidden.dtype == FP8:
        hidden = hidden.float()
    if data.draw(st.booleans(), label="masked"):
        rows, layout = moe_kernels.permute_masked(hidden, ids, E, data.draw(st.sampled_from([1, 3])),
                                                  backend="reference")
    else:
        rows, layout = moe_kernels.permute(hidden, ids, E, align=data.draw(st.sampled_from([1, 4])),
                                           backend="reference")
    inputs = properties.on(device, dict(expert_out=rows * 1.5 + 0.25, layout=layout,
                                        topk_weights=torch.rand(T, K, generator=g)))
    inputs, layouts = properties.draw_layouts(data, inputs)
    if layouts["expert_out"] != "expanded" and data.draw(st.booleans(), label="NaN padding"):
        # rows no routed pair reads (padding) hold NaN, which must never show
        padding = (layout.pair_of_row < 0).view(rows.shape[:-1]).to(device)
        inputs["expert_out"][padding] = float("nan")
    got = properties.call(moe_kernels.unpermute, inputs, backend)
    want = properties.reference(moe_kernels.unpermute, inputs)
    assert got.shape == want.shape and got.dtype == want.dtype
    assert_close(got, want, msg=f"{backend} T={T} E={E} K={K} {layouts}")


@properties.property_test("moe_align_block_size")
def test_moe_align_block_size_properties(device, backend, data):
    T, E, K, ids, _ = draw_routing(data, properties.interpreting(device, backend))
    inputs = properties.on(device, dict(topk_ids=ids, num_experts=E,
                                        block_size=data.draw(st.sampled_from([1, 4, 16]))))
    inputs, layouts = properties.draw_layouts(data, inputs)
    got = properties.call(moe_kernels.moe_align_block_size, inputs, backend)
    want = properties.reference(moe_kernels.moe_align_block_size, inputs)
    assert_same_tensors(got, want, f"{backend} T={T} E={E} K={K} {layouts}")
