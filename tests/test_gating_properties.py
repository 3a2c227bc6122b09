"""grouped_topk, property-tested on every backend: random configurations (groups of one
expert, K = every kept expert, E not a power of two), T = 0 and T = 1 among the sizes,
exact ties, NaN / +-inf logits, and every tensor argument in a drawn memory layout
(tests/properties.py). Each example must follow the layout rule and select what the
reference selects from the same values, laid out contiguously, up to the near-ties of
candidates of different inputs that moe_kernels.testing.gating.acceptable_rows allows."""

from __future__ import annotations

import torch
from hypothesis import strategies as st

import moe_kernels

import properties
from test_gating import assert_same_selection

SPECIALS = (float("nan"), float("inf"), float("-inf"))


def draw_config(data):
    G = data.draw(st.sampled_from([1, 2, 3, 4, 8]), label="num_expert_group")
    gs = data.draw(st.integers(1, 9), label="experts per group")
    tg = data.draw(st.integers(1, G), label="topk_group")
    K = data.draw(st.integers(1, tg * gs), label="top_k")
    scorings = ["max"] + (["top2_sum"] if gs >= 2 or G == 1 else [])
    return G * gs, dict(num_expert_group=G, topk_group=tg, top_k=K,
                        scoring_func=data.draw(st.sampled_from(["sigmoid", "softmax"])),
                        group_scoring=data.draw(st.sampled_from(scorings)),
                        renormalize=data.draw(st.booleans()),
                        routed_scaling_factor=data.draw(st.sampled_from([1.0, 2.5])))


def draw_logits(data, T, E):
    """Integer logits (exact ties everywhere) with NaN / inf sprinkled, or random floats."""
    dtype = data.draw(st.sampled_from([torch.float32, torch.bfloat16, torch.float16]))
    g = torch.Generator().manual_seed(data.draw(st.integers(0, 2**31 - 1)))
    ties = data.draw(st.booleans(), label="exact ties")
    if ties:
        x = torch.randint(-2, 3, (T, E), generator=g).float()
        n = data.draw(st.integers(0, min(T * E, 6)), label="NaN/inf entries")
        flat = x.view(-1)
        for i, v in zip(torch.randperm(T * E, generator=g)[:n].tolist(), SPECIALS * 2):
            flat[i] = v
    else:
        x = torch.randn(T, E, generator=g) * 3
    bias = None
    if data.draw(st.booleans(), label="correction_bias"):
        bias = (torch.randint(-1, 2, (E,), generator=g).float() * 0.5 if ties
                else torch.randn(E, generator=g) * 0.1)
    return x.to(dtype), bias, ties


@properties.property_test("grouped_topk")
def test_grouped_topk_properties(device, backend, data):
    interp = properties.interpreting(device, backend)
    E, cfg = draw_config(data)
    T = data.draw(st.sampled_from([0, 1, 2, 7]) if interp else st.integers(0, 70), label="T")
    logits, bias, ties = draw_logits(data, T, E)
    inputs = dict(logits=logits.to(device), correction_bias=None if bias is None else bias.to(device),
                  **cfg)
    inputs, layouts = properties.draw_layouts(data, inputs, rows=("logits",))
    got = properties.call(moe_kernels.grouped_topk, inputs, backend, rows=("logits",))
    if got is None:
        return
    plain = properties.contiguous_copy(inputs)
    kw = {k: v for k, v in plain.items() if k not in ("logits", "top_k")}
    assert_same_selection(*got, plain["logits"], cfg["top_k"], kw,
                          msg=f"{backend} E={E} T={T} {cfg} {layouts}")
