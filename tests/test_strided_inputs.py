"""Memory layout never changes a result: every tensor argument of every op, in turn, passed
strided (rows padded; every other element) and expanded (stride 0), on every backend.

The rule: the op either refuses the layout with a ValueError / TypeError before any launch
(the big operands need a contiguous last dimension, documented per op), or returns exactly
what it returns for the same values laid out contiguously. The risk it guards: a kernel
reading a small index or scale tensor at flat offsets, so that a column of a per-layer bias
table (stride 3) picks wrong experts and a stride-0 tensor reads past its storage.
"""

from __future__ import annotations

import inspect
import re

import pytest
import torch

import moe_kernels
from moe_kernels.reference import fp8 as ref_fp8
from moe_kernels.reference import permute as ref_permute

from helpers import device_backend_params, non_strided
from test_layer import make_fp8_layer, make_hidden

BACKENDS = ("triton", "cpu", "reference")


def _g(seed):
    return torch.Generator().manual_seed(seed)


def _gemm(masked=False):
    g = _g(0)
    E, N, K = 3, 160, 200
    b, bs = ref_fp8.quantize_fp8_block(torch.randn(E, N, K, generator=g) / 15)
    if masked:
        a, a_s = ref_fp8.quantize_fp8_per_token_group(torch.randn(E * 4, K, generator=g))
        return [a.view(E, 4, K), a_s.view(E, 4, -1), b, bs,
                torch.tensor([2, 0, 4], dtype=torch.int32)], {}
    a, a_s = ref_fp8.quantize_fp8_per_token_group(torch.randn(6, K, generator=g))
    return [a, a_s, b, bs, torch.tensor([0, 0, 2, -1, 1, 2], dtype=torch.int32)], {}


def _routing(T=5, K=2, E=8):
    g = _g(1)
    ids = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(T)]).int()
    return ids, torch.randn(T, 16, generator=g), torch.rand(T, K, generator=g)


def _unpermute():
    ids, hidden, w = _routing()
    rows, _, index = ref_permute.permute(hidden, ids, 8, 2, None)
    return [rows, moe_kernels.PermuteLayout(*index), w], {}


def _mla(paged=False):
    g = _g(2)
    H, dn, dv, R, rope = 2, 16, 16, 64, 8
    w = torch.randn(H * (dn + dv), R, generator=g) / 8
    kw = dict(num_heads=H, qk_nope_head_dim=dn, v_head_dim=dv)
    if paged:
        cache = torch.randn(4, 3, R + rope, generator=g)
        table = torch.tensor([[2, 0], [1, 3]], dtype=torch.int32)
        return [cache, table, torch.tensor([4, 5], dtype=torch.int32), w], kw
    return [torch.randn(5, R, generator=g), torch.randn(5, rope, generator=g), w], kw


def _fused():
    g = _g(3)
    E, H, I = 4, 128, 128
    w13, s13 = ref_fp8.quantize_fp8_block(torch.randn(E, 2 * I, H, generator=g) / 11)
    w2, s2 = ref_fp8.quantize_fp8_block(torch.randn(E, H, I, generator=g) / 11)
    ids, _, w = _routing(T=3, K=2, E=E)
    return [torch.randn(3, H, generator=g), w13, s13, w2, s2, w, ids], {}


def _permute():
    ids, hidden, _ = _routing()
    return [hidden, ids, 8], dict(align=2, scales=torch.rand(5, 2, generator=_g(5)))


def _gating():
    g = _g(4)
    return [torch.randn(4, 16, generator=g), 3], dict(
        num_expert_group=4, topk_group=2, correction_bias=torch.randn(16, generator=g) / 4)


CASES = {
    "grouped_topk": (moe_kernels.grouped_topk, _gating),
    "permute": (moe_kernels.permute, _permute),
    "unpermute": (moe_kernels.unpermute, _unpermute),
    "quantize_fp8_per_token_group": (moe_kernels.quantize_fp8_per_token_group,
                                     lambda: ([torch.randn(4, 200, generator=_g(6))], {})),
    "silu_and_mul_quant_fp8": (moe_kernels.silu_and_mul_quant_fp8,
                               lambda: ([torch.randn(4, 200, generator=_g(7))], {})),
    "dequantize_fp8_block": (moe_kernels.dequantize_fp8_block, lambda: (
        list(ref_fp8.quantize_fp8_block(torch.randn(130, 140, generator=_g(8)))), {})),
    "grouped_gemm_fp8": (moe_kernels.grouped_gemm_fp8, _gemm),
    "grouped_gemm_fp8_masked": (moe_kernels.grouped_gemm_fp8_masked, lambda: _gemm(True)),
    "mla_decompress_kv": (moe_kernels.mla_decompress_kv, _mla),
    "mla_decompress_kv_paged": (moe_kernels.mla_decompress_kv_paged, lambda: _mla(True)),
    "fused_moe_fp8": (moe_kernels.fused_moe_fp8, _fused),
}


def _padded_rows(t):
    """Same values, rows padded (last dimension contiguous, larger row stride)."""
    buf = torch.zeros(*t.shape[:-1], t.shape[-1] + 3, dtype=t.dtype)
    view = buf[..., :t.shape[-1]]
    view.copy_(t)
    return view


def _every_other(t):
    """Same values at every other element of a larger tensor (last stride 2)."""
    buf = torch.zeros(*t.shape[:-1], 2 * t.shape[-1], dtype=t.dtype)
    view = buf[..., ::2]
    view.copy_(t)
    return view


def _expanded(t):
    """The first entry repeated along dim 0 with stride 0 (other values, same shape)."""
    return t[:1].expand(t.shape)


LAYOUTS = {"padded rows": _padded_rows, "every other": _every_other, "expanded": _expanded}
# the layouts that keep every value, whose contiguous form is the base case's argument
# (its result is computed once: the Triton cases run under the interpreter)
SAME_VALUES = ("padded rows", "every other")


def _tensor_slots(args, kwargs):
    """(get, set) pairs for every tensor argument, the layout's row_of_pair included."""
    slots = []
    for i, a in enumerate(args):
        if isinstance(a, torch.Tensor):
            slots.append((f"arg{i}", lambda a_, k_, i=i: a_[i],
                          lambda a_, k_, v, i=i: a_.__setitem__(i, v)))
        elif isinstance(a, moe_kernels.PermuteLayout):
            slots.append(("layout.row_of_pair", lambda a_, k_, i=i: a_[i].row_of_pair,
                          lambda a_, k_, v, i=i: a_.__setitem__(i, a_[i]._replace(row_of_pair=v))))
    for key, v in kwargs.items():
        if isinstance(v, torch.Tensor):
            slots.append((key, lambda a_, k_, key=key: k_[key],
                          lambda a_, k_, v, key=key: k_.__setitem__(key, v)))
    return slots


def _flat(result):
    if isinstance(result, torch.Tensor):
        return [result]
    out = []
    for r in result:
        out += _flat(r) if isinstance(r, (tuple, list)) else ([r] if r is not None else [])
    return out


def _bits(t):
    return t.contiguous().view(torch.uint8)


@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("device,backend", device_backend_params(BACKENDS, devices=("cpu",)))
def test_layout_never_changes_the_result(name, device, backend):
    fn, make = CASES[name]
    base_args, base_kwargs = make()
    checked, base = 0, None
    for slot, get, put in _tensor_slots(base_args, base_kwargs):
        for layout, relayout in LAYOUTS.items():
            args, kwargs = list(base_args), dict(base_kwargs)
            original = get(args, kwargs)
            if original.dim() == 0 or original.numel() == 0:
                continue
            variant = relayout(original)
            put(args, kwargs, variant)
            try:
                got = fn(*args, **kwargs, backend=backend)
            except (ValueError, TypeError) as exc:
                assert "contiguous" in str(exc) or "stride" in str(exc) or \
                    "layout" in str(exc), f"{name} {slot} {layout}: refused for {exc}"
                continue
            if layout in SAME_VALUES:   # contiguous, these are the base arguments
                if base is None:
                    base = fn(*base_args, **base_kwargs, backend=backend)
                want = base
            else:
                put(args, kwargs, variant.contiguous())
                want = fn(*args, **kwargs, backend=backend)
            for i, (a, b) in enumerate(zip(_flat(got), _flat(want))):
                assert a.shape == b.shape and torch.equal(_bits(a), _bits(b)), \
                    f"{name} {backend}: {slot} {layout} changed output {i}"
            checked += 1
    assert checked > 0, f"{name}: no layout variant ran"


# --- layouts without strides ---------------------------------------------------------------

def _with_out(make, out_of):
    """make's arguments plus out= (out_of(args): a buffer the op takes)."""
    def made():
        args, kwargs = make()
        return args, {**kwargs, "out": out_of(args)}
    return made


def _align():
    return [_routing()[0], 8, 4], {}


def _masked():
    ids, hidden, _ = _routing()
    return [hidden, ids, 8, 3], dict(scales=torch.rand(5, 2, generator=_g(9)))


# The ops CASES leaves out, and out= buffers (the same check_tensor as inputs).
REFUSING = {
    **CASES,
    "moe_align_block_size": (moe_kernels.moe_align_block_size, _align),
    "permute_masked": (moe_kernels.permute_masked, _masked),
    "quantize_fp8_block": (moe_kernels.quantize_fp8_block,
                           lambda: ([torch.randn(130, 140, generator=_g(10))], {})),
    "unpermute out=": (moe_kernels.unpermute, _with_out(
        _unpermute, lambda a: torch.empty(a[2].shape[0], a[0].shape[1]))),
    "grouped_gemm_fp8 out=": (moe_kernels.grouped_gemm_fp8, _with_out(
        _gemm, lambda a: torch.empty(a[0].shape[0], a[2].shape[1]))),
}


def _argument_name(fn, slot: str) -> str:
    """The name an error gives the tensor of `slot` ("arg1" -> fn's second parameter)."""
    if slot.startswith("arg"):
        return list(inspect.signature(fn).parameters)[int(slot[3:])]
    return slot


@pytest.mark.parametrize("name", list(REFUSING))
@pytest.mark.parametrize("device,backend", device_backend_params(BACKENDS, devices=("cpu",)))
def test_non_strided_tensors_are_refused_by_name(name, device, backend):
    """A sparse or mkldnn tensor has no strides (CSR raises on reading them) and no data
    pointer: each op refuses one in any argument with a TypeError naming it, on every
    backend, before torch's own errors from inside a kernel or the reference (a
    RuntimeError, a NotImplementedError, or a C++ throw from the extension)."""
    fn, make = REFUSING[name]
    base_args, base_kwargs = make()
    refused = 0
    for slot, get, put in _tensor_slots(base_args, base_kwargs):
        original = get(base_args, base_kwargs)
        if original.dim() == 0:
            continue
        argument = _argument_name(fn, slot)
        for layout, variant in non_strided(original):
            args, kwargs = list(base_args), dict(base_kwargs)
            put(args, kwargs, variant)
            with pytest.raises(TypeError, match=re.escape(f"{argument} must be a dense")):
                fn(*args, **kwargs, backend=backend)
            refused += 1
    assert refused > 0, f"{name}: no tensor argument"


@pytest.mark.parametrize("name,fn,make", [
    ("update_correction_bias_", moe_kernels.update_correction_bias_,
     lambda: ([torch.zeros(8), torch.arange(8, dtype=torch.int32), 0.1], {})),
    ("mla_pack_kv_b_proj", moe_kernels.mla_pack_kv_b_proj,
     lambda: ([torch.randn(64, 32).to(torch.bfloat16)], {})),
])
def test_non_strided_tensors_are_refused_by_backendless_ops(name, fn, make):
    base_args, base_kwargs = make()
    for slot, get, put in _tensor_slots(base_args, base_kwargs):
        argument = _argument_name(fn, slot)
        for layout, variant in non_strided(get(base_args, base_kwargs)):
            args = list(base_args)
            put(args, base_kwargs, variant)
            with pytest.raises(TypeError, match=re.escape(f"{argument} must be a dense")):
                fn(*args, **base_kwargs)


def test_layer_refuses_non_strided_hidden_and_weights():
    layer, cfg = make_fp8_layer()
    hidden = make_hidden(3, cfg)
    for layout, variant in non_strided(hidden):
        with pytest.raises(TypeError, match="hidden must be a dense"):
            layer(variant)
    weights = {"gate.weight": torch.randn(cfg.n_routed_experts, cfg.hidden_size)}
    with pytest.raises(TypeError, match="'gate.weight' must be a dense"):
        moe_kernels.DeepseekV3MoE.from_hf(cfg, {k: v.to_sparse() for k, v in weights.items()})
