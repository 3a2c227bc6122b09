"""mla_decompress_kv and mla_decompress_kv_paged, property-tested on every backend: random
head counts and dimensions (1 among them), T = 0, empty sequences, page size 1, fp8
weights and caches, and every tensor argument in a drawn memory layout
(tests/properties.py; kv_c and k_pe as column slices of one tensor among them), and at
times one non-finite value in an fp8 weight (a NaN code, or a NaN / +-inf block scale).
Each example must follow the layout rule and agree with the reference on the same values
laid out contiguously, by moe_kernels.testing's rule for MLA: the float rule of the output
dtype, non-finite exactly where the reference is, NaN and inf alike (docs/api.md)."""

from __future__ import annotations

import torch
from hypothesis import strategies as st

import moe_kernels
from moe_kernels.reference import fp8 as ref_fp8

import properties
from moe_kernels.testing import rules

FP8 = torch.float8_e4m3fn
ROWS = ("kv_c", "k_pe", "kv_b_proj", "kv_cache")


def draw_heads(data, interp):
    top = 24 if interp else 64
    return dict(num_heads=data.draw(st.integers(1, 3 if interp else 8), label="H"),
                qk_nope_head_dim=data.draw(st.integers(1, top), label="dn"),
                v_head_dim=data.draw(st.integers(1, top), label="dv"))


def draw_weight(data, heads, R, dtype, g):
    rows = heads["num_heads"] * (heads["qk_nope_head_dim"] + heads["v_head_dim"])
    w = torch.randn(rows, R, generator=g) / R ** 0.5
    if data.draw(st.booleans(), label="fp8 kv_b_proj"):
        q, s = ref_fp8.quantize_fp8_block(w)
        which = data.draw(st.sampled_from([None, None, "code", "scale"]), label="non-finite")
        if which == "code":
            q.view(torch.uint8).view(-1)[data.draw(st.integers(0, q.numel() - 1))] = 0x7F
        elif which == "scale":
            s.view(-1)[data.draw(st.integers(0, s.numel() - 1))] = data.draw(
                st.sampled_from([float("nan"), float("inf"), -float("inf")]))
        return dict(kv_b_proj=q, kv_b_proj_scale=s)
    return dict(kv_b_proj=w.to(dtype))


def check(got, inputs, fn, msg):
    want = properties.reference(fn, inputs)
    for a, b, name in zip(got, want, ("k", "v")):
        assert a.shape == b.shape and a.dtype == b.dtype, f"{msg}: {name}"
        verdict = rules.dot_products(name, a, b, any_non_finite=True)
        assert verdict.passed, f"{msg}: {verdict}"


@properties.property_test("mla_decompress_kv", max_examples=20)
def test_mla_decompress_kv_properties(device, backend, data):
    interp = properties.interpreting(device, backend)
    heads = draw_heads(data, interp)
    T = data.draw(st.sampled_from([0, 1, 5]) if interp else st.integers(0, 40), label="T")
    R = data.draw(st.integers(1, 160), label="R")
    rope = data.draw(st.integers(1, 24), label="rope")
    dtype = data.draw(st.sampled_from([torch.float32, torch.bfloat16]), label="dtype")
    g = torch.Generator().manual_seed(data.draw(st.integers(0, 2**31 - 1)))
    fused = torch.randn(T, R + rope, generator=g).to(dtype)   # a fused kv_a_proj output
    inputs = dict(kv_c=fused[:, :R], k_pe=fused[:, R:], **draw_weight(data, heads, R, dtype, g),
                  **heads)
    inputs, layouts = properties.draw_layouts(data, properties.on(device, inputs), rows=ROWS)
    got = properties.call(moe_kernels.mla_decompress_kv, inputs, backend, rows=ROWS)
    if got is not None:
        check(got, inputs, moe_kernels.mla_decompress_kv, f"{backend} T={T} R={R} {heads} {layouts}")


@properties.property_test("mla_decompress_kv_paged", max_examples=20)
def test_mla_decompress_kv_paged_properties(device, backend, data):
    interp = properties.interpreting(device, backend)
    heads = draw_heads(data, interp)
    R = data.draw(st.integers(1, 160), label="R")
    rope = data.draw(st.integers(1, 24), label="rope")
    page = data.draw(st.sampled_from([1, 3, 16]), label="page size")
    B = data.draw(st.integers(0, 4), label="sequences")
    max_blocks = data.draw(st.integers(1, 3), label="table width")
    num_blocks = data.draw(st.integers(1, 6), label="cache blocks")
    g = torch.Generator().manual_seed(data.draw(st.integers(0, 2**31 - 1)))
    # every table entry a valid block and every length within the table: the values stay
    # valid under any layout, the stride-0 one (which repeats row 0) included
    table = torch.randint(0, num_blocks, (B, max_blocks), generator=g)
    lens = torch.randint(0, max_blocks * page + 1, (B,), generator=g)
    cache_fp8 = data.draw(st.booleans(), label="fp8 cache")
    dtype = data.draw(st.sampled_from([torch.float32, torch.bfloat16]), label="dtype")
    cache = torch.randn(num_blocks, page, R + rope, generator=g)
    inputs = dict(kv_cache=ref_fp8.to_fp8(cache) if cache_fp8 else cache.to(dtype),
                  block_table=table.int(), seq_lens=lens.to(data.draw(st.sampled_from(
                      [torch.int32, torch.int64]))),
                  **draw_weight(data, heads, R, dtype, g), **heads)
    if cache_fp8:
        inputs["kv_cache_scale"] = data.draw(st.sampled_from([0.37, 1.0]))
    inputs, layouts = properties.draw_layouts(data, properties.on(device, inputs), rows=ROWS)
    # rows: every token, read on the host from the (possibly expanded) seq_lens
    inputs["num_tokens"] = int(inputs["seq_lens"].sum()) + data.draw(st.integers(0, 2))
    got = properties.call(moe_kernels.mla_decompress_kv_paged, inputs, backend, rows=ROWS)
    if got is not None:
        check(got, inputs, moe_kernels.mla_decompress_kv_paged,
              f"{backend} B={B} page={page} {heads} {layouts}")
