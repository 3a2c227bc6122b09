"""DeepseekV3MoE, property-tested over its configurations: E not a power of two, one group
or several (group-limited routing, top_k up to what the kept groups hold), no shared
expert, one (stacked with the routed ones) or a wider one (run apart), I and H not
multiples of 128, T = 0 and T = 1 among the sizes, bf16 and float32 `hidden` of any
leading shape, and the chunked path (CHUNK_TOKENS patched small), on the reference and
cpu backends, and triton on a GPU (the ops' Triton paths are property-tested op by op; the
layer under the interpreter takes ~19 s an example).

Each example's output is held to the FP8 pipeline's oracle: the reference router, then
`reference.moe_forward` with the activations rounded where the pipeline rounds them (the
shared expert stacked as one more expert of weight 1, or its own call when wider), within
fused_moe_fp8's rule (docs/api.md: relative Frobenius error 2e-2 plus the other roundings
of near-midpoint values). Against HF's float32 layer on the same FP8 weights the
difference is the activation quantization, which a small layer at one token leaves
larger than test_layer.py's fixed cases do (calc_diff 3e-3 at H=200, I=32, T=1, where
those see ~1e-3): that bound is checked loosely here, against a routing or shared-expert
error."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import moe_kernels
from moe_kernels.ops import fused_moe as fused_ops
from moe_kernels.reference import fused_moe as ref_fused
from moe_kernels.reference import layer as ref_layer
from moe_kernels.testing import fused_moe as fused_rule
from moe_kernels.testing import rules

from helpers import calc_diff, device_backend_params
from test_layer import as_fp8_checkpoint, dequantized, make_config, make_weights, reference_output


def pipeline_oracle(layer, x):
    """(float32 output, allowance) on the CPU: the reference router and
    reference.moe_forward over the layer's FP8 weights, activations quantized; the
    allowance is fused_moe's rounding allowance of each call (testing/fused_moe.py),
    summed. x (T, H) on the CPU."""
    E, T = layer.num_experts, x.shape[0]
    b = {name: t.cpu() for name, t in layer.named_buffers()}
    w, ids = ref_layer.route(x, b["gate_weight"], b["e_score_correction_bias"], layer.top_k,
                             layer.n_group, layer.topk_group, layer.norm_topk_prob,
                             layer.routed_scaling_factor)
    routed = (b["w13"], b["w13_scale"], b["w2"], b["w2_scale"])
    if layer.shared_stacked:
        calls = [(*routed, torch.cat([w, w.new_ones(T, 1)], 1),
                  torch.cat([ids, ids.new_full((T, 1), E)], 1))]
    else:
        calls = [(*routed, w, ids)]
        if "shared_w13" in b:
            calls.append((b["shared_w13"], b["shared_w13_scale"], b["shared_w2"],
                          b["shared_w2_scale"], w.new_ones(T, 1), ids.new_zeros(T, 1)))
    want, allowance = torch.zeros(x.shape), 0.0
    for w13, s13, w2, s2, cw, cids in calls:
        args = dict(hidden=x, w13=w13, w13_scales=s13, w2=w2, w2_scales=s2,
                    topk_weights=cw, topk_ids=cids.int())
        want += ref_fused.moe_forward(*args.values(), out_dtype=torch.float32)
        allowance += fused_rule.rounding_allowance(args)
    return want, allowance


@st.composite
def layer_configs(draw):
    """A configuration grouped_topk takes: G groups of S experts, topk_group of them kept,
    top_k <= topk_group * S; top2_sum group scores need S >= 2 where groups are dropped."""
    G = draw(st.integers(1, 3), label="n_group")
    topk_group = draw(st.integers(1, G), label="topk_group")
    S = draw(st.integers(2 if topk_group < G else 1, 5), label="experts per group")
    return make_config(
        hidden_size=draw(st.sampled_from([64, 128, 200]), label="H"),
        moe_intermediate_size=draw(st.sampled_from([32, 96, 128]), label="I"),
        n_routed_experts=G * S, n_group=G, topk_group=topk_group,
        num_experts_per_tok=draw(st.integers(1, topk_group * S), label="top_k"),
        n_shared_experts=draw(st.integers(0, 2), label="n_shared_experts"),
        routed_scaling_factor=draw(st.sampled_from([1.0, 2.5]), label="scaling"),
        norm_topk_prob=draw(st.booleans(), label="norm_topk_prob"))


@pytest.mark.parametrize("device,backend",
                         device_backend_params(("reference", "cpu"), devices=("cpu",)))
@settings(max_examples=20, deadline=None)
@given(cfg=layer_configs(), data=st.data())
def test_layer_properties(device, backend, cfg, data):
    check_layer(device, backend, cfg, data)


# On the GPU each drawn configuration compiles Triton specialisations of its own (seconds
# each): fewer examples, within the tests stage's per-test bound.
@pytest.mark.parametrize("device,backend", device_backend_params(("reference", "triton"),
                                                                 devices=("cuda",)))
@settings(max_examples=8, deadline=None)
@given(cfg=layer_configs(), data=st.data())
def test_layer_properties_on_the_gpu(device, backend, cfg, data):
    check_layer(device, backend, cfg, data)


def check_layer(device, backend, cfg, data):
    """One drawn example (module docstring)."""
    seed = data.draw(st.integers(0, 2**31 - 1), label="seed")
    sd = make_weights(cfg, seed=seed % 1000)
    layer = moe_kernels.DeepseekV3MoE.from_hf(cfg, as_fp8_checkpoint(sd), device=device,
                                              backend=backend)
    lead = data.draw(st.sampled_from([(0,), (1,), (7,), (2, 5)]), label="leading shape")
    dtype = data.draw(st.sampled_from([torch.bfloat16, torch.float32]), label="dtype")
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(*lead, cfg.hidden_size, generator=g).to(dtype).to(device)
    chunk = data.draw(st.sampled_from([None, 3]), label="CHUNK_TOKENS")
    saved = fused_ops.CHUNK_TOKENS
    fused_ops.CHUNK_TOKENS = chunk or saved
    try:
        out = layer(hidden)
    finally:
        fused_ops.CHUNK_TOKENS = saved
    assert out.shape == hidden.shape and out.dtype == dtype
    flat = hidden.reshape(-1, cfg.hidden_size).cpu()
    if flat.shape[0] == 0:
        return
    got = out.reshape(-1, cfg.hidden_size).float().cpu()
    assert not got.isnan().any()
    want, allowance = pipeline_oracle(layer, flat)
    err, bound = float((got - want).norm()), rules.FUSED_REL_ERR * float(want.norm())
    assert err <= bound + allowance, (vars(cfg), lead, dtype, chunk, err, bound, allowance)
    hf = reference_output(flat.float(), dequantized(sd), cfg)
    assert calc_diff(got, hf) < 2e-2, (vars(cfg), lead, dtype, chunk)
