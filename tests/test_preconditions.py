"""Every documented precondition of every public op (docs/api.md), violated one at a time:
the op raises the documented TypeError / ValueError naming the argument, before any
launch, with the same type and message on every backend that implements the op.

The risk it guards: a check that lives in one backend only, so that a wrong dtype reaches
`NotImplementedError: "unpermute_cpu" not implemented for 'Long'` on one backend, an
interpreter traceback on another and garbage on a third.

Each case starts from a valid call (`BASE[op]`, run on every backend by
`test_valid_call_runs`, so that a case fails for the one thing it changes) and changes one
argument. Cases are (op, id, change, exception type, argument the message must name).
"""

from __future__ import annotations

import math

import pytest
import torch

import moe_kernels
from moe_kernels import _library
from moe_kernels.reference import fp8 as ref_fp8
from moe_kernels.reference import permute as ref_permute

from helpers import HAS_CUDA

FP8 = torch.float8_e4m3fn
META = torch.device("meta")   # "another device" that exists on every machine


def _g(seed=0):
    return torch.Generator().manual_seed(seed)


def _ids(T=4, K=2, E=6):
    return torch.stack([torch.randperm(E, generator=_g(t))[:K] for t in range(T)]).int()


def _gemm_inputs(masked=False):
    E, N, K = 3, 64, 256
    b, bs = ref_fp8.quantize_fp8_block(torch.randn(E, N, K, generator=_g(1)) / 16)
    if masked:
        a, a_s = ref_fp8.quantize_fp8_per_token_group(torch.randn(E * 4, K, generator=_g(2)))
        return dict(a=a.view(E, 4, K), a_scales=a_s.view(E, 4, 2), b=b, b_scales=bs,
                    masked_m=torch.tensor([1, 0, 4], dtype=torch.int32))
    a, a_s = ref_fp8.quantize_fp8_per_token_group(torch.randn(5, K, generator=_g(2)))
    return dict(a=a, a_scales=a_s, b=b, b_scales=bs,
                m_indices=torch.tensor([0, 2, -1, 1, 1], dtype=torch.int32))


def _fused_inputs():
    E, H, I = 4, 128, 128
    w13, s13 = ref_fp8.quantize_fp8_block(torch.randn(E, 2 * I, H, generator=_g(3)) / 11)
    w2, s2 = ref_fp8.quantize_fp8_block(torch.randn(E, H, I, generator=_g(4)) / 11)
    return dict(hidden=torch.randn(3, H, generator=_g(5)), w13=w13, w13_scales=s13, w2=w2,
                w2_scales=s2, topk_weights=torch.rand(3, 2, generator=_g(6)),
                topk_ids=_ids(3, 2, E))


MLA = dict(num_heads=2, qk_nope_head_dim=16, v_head_dim=8)   # kv_b_proj rows 2 * 24


def _mla_inputs():
    return dict(kv_c=torch.randn(5, 64, generator=_g(7)), k_pe=torch.randn(5, 8, generator=_g(8)),
                kv_b_proj=torch.randn(48, 64, generator=_g(9)) / 8, **MLA)


def _mla_paged_inputs():
    return dict(kv_cache=torch.randn(4, 3, 72, generator=_g(10)),
                block_table=torch.tensor([[2, 0], [1, 3]], dtype=torch.int32),
                seq_lens=torch.tensor([4, 5], dtype=torch.int32),
                kv_b_proj=torch.randn(48, 64, generator=_g(11)) / 8, **MLA)


def _unpermute_inputs(masked=False):
    hidden, ids = torch.randn(4, 16, generator=_g(12)), _ids()
    if masked:
        rows, layout = moe_kernels.permute_masked(hidden, ids, 6, 3, backend="reference")
    else:
        rows, _, index = ref_permute.permute(hidden, ids, 6, 2, None)
        layout = moe_kernels.PermuteLayout(*index)
    return dict(expert_out=rows, layout=layout, topk_weights=torch.rand(4, 2, generator=_g(13)))


# A valid call of every public op: keyword arguments (fresh tensors per call).
BASE = {
    "grouped_topk": lambda: dict(logits=torch.randn(4, 16, generator=_g(14)), top_k=3,
                                 num_expert_group=4, topk_group=2,
                                 correction_bias=torch.randn(16, generator=_g(15))),
    "update_correction_bias_": lambda: dict(correction_bias=torch.zeros(6),
                                            tokens_per_expert=torch.arange(6), rate=1e-3),
    "permute": lambda: dict(hidden=torch.randn(4, 16, generator=_g(16)), topk_ids=_ids(),
                            num_experts=6, align=2, scales=torch.rand(4, 2, generator=_g(17))),
    "permute_masked": lambda: dict(hidden=torch.randn(4, 16, generator=_g(18)), topk_ids=_ids(),
                                   num_experts=6, max_tokens_per_expert=3),
    "unpermute": _unpermute_inputs,
    "unpermute(masked)": lambda: _unpermute_inputs(masked=True),
    "moe_align_block_size": lambda: dict(topk_ids=_ids(), num_experts=6, block_size=4),
    "quantize_fp8_per_token_group": lambda: dict(x=torch.randn(3, 256, generator=_g(19)),
                                                 group_size=128),
    "silu_and_mul_quant_fp8": lambda: dict(x=torch.randn(3, 256, generator=_g(20)), group_size=64),
    "quantize_fp8_block": lambda: dict(w=torch.randn(2, 130, 140, generator=_g(21))),
    "dequantize_fp8_block": lambda: dict(zip(("q", "s"), ref_fp8.quantize_fp8_block(
        torch.randn(130, 140, generator=_g(22))))),
    "grouped_gemm_fp8": _gemm_inputs,
    "grouped_gemm_fp8_masked": lambda: _gemm_inputs(masked=True),
    "fused_moe_fp8": _fused_inputs,
    "mla_decompress_kv": _mla_inputs,
    "mla_decompress_kv_paged": _mla_paged_inputs,
}


def _set(**changes):
    """A change: replace arguments (a callable value is applied to the argument's value)."""
    def change(kw):
        for k, v in changes.items():
            kw[k] = v(kw[k]) if callable(v) and not isinstance(v, type) else v
    return change


def _drop_cols(t):
    return t[..., :-1]


def _f64(t):
    return t.double()


def _int(t):
    return t.long()


def _float(t):
    return t.float()


def _on_meta(t):
    return torch.empty_like(t, device=META)


def _strided_last(t):
    return torch.cat([t, t], -1)[..., ::2]


def _layout_field(**fields):
    return _set(layout=lambda lay: lay._replace(**{k: v(getattr(lay, k)) for k, v in fields.items()}))


NAN, INF = math.nan, math.inf

CASES = [  # (op, id, change, exception, the argument the message names)
    # grouped_topk
    ("grouped_topk", "logits not a tensor", _set(logits=lambda t: t.tolist()), TypeError, "logits"),
    ("grouped_topk", "int logits", _set(logits=_int), TypeError, "logits"),
    ("grouped_topk", "1-D logits", _set(logits=lambda t: t[0]), ValueError, "logits"),
    ("grouped_topk", "3-D logits", _set(logits=lambda t: t[None]), ValueError, "logits"),
    ("grouped_topk", "strided last dim", _set(logits=_strided_last), ValueError, "logits"),
    ("grouped_topk", "groups do not divide E", _set(num_expert_group=3), ValueError, "num_expert_group"),
    ("grouped_topk", "zero groups", _set(num_expert_group=0), ValueError, "num_expert_group"),
    ("grouped_topk", "topk_group 0", _set(topk_group=0), ValueError, "topk_group"),
    ("grouped_topk", "topk_group > groups", _set(topk_group=5), ValueError, "topk_group"),
    ("grouped_topk", "top_k 0", _set(top_k=0), ValueError, "top_k"),
    ("grouped_topk", "top_k > kept experts", _set(top_k=9), ValueError, "top_k"),
    ("grouped_topk", "top_k not an int", _set(top_k=2.5), TypeError, "top_k"),
    ("grouped_topk", "top2_sum on 1-expert groups",
     _set(num_expert_group=16, topk_group=4, group_scoring="top2_sum"), ValueError, "top2_sum"),
    ("grouped_topk", "unknown scoring_func", _set(scoring_func="relu"), ValueError, "scoring_func"),
    ("grouped_topk", "unknown group_scoring", _set(group_scoring="mean"), ValueError, "group_scoring"),
    ("grouped_topk", "NaN routed_scaling_factor", _set(routed_scaling_factor=NAN), ValueError,
     "routed_scaling_factor"),
    ("grouped_topk", "inf routed_scaling_factor", _set(routed_scaling_factor=INF), ValueError,
     "routed_scaling_factor"),
    ("grouped_topk", "bias of E+1", _set(correction_bias=lambda b: torch.cat([b, b[:1]])),
     ValueError, "correction_bias"),
    ("grouped_topk", "int bias", _set(correction_bias=_int), TypeError, "correction_bias"),
    ("grouped_topk", "bias on another device", _set(correction_bias=_on_meta), ValueError,
     "correction_bias"),
    ("grouped_topk", "unknown backend", _set(backend="tpu"), ValueError, "backend"),
    # bool("false") is True: the flag renormalized where the caller said not to
    ("grouped_topk", "renormalize a string", _set(renormalize="false"), TypeError,
     "renormalize"),
    # update_correction_bias_
    ("update_correction_bias_", "counts of E+1", _set(tokens_per_expert=lambda c: torch.arange(7)),
     ValueError, "tokens_per_expert"),
    ("update_correction_bias_", "int bias", _set(correction_bias=_int), TypeError, "correction_bias"),
    # torch has no in-place add for fp8: its NotImplementedError names no argument
    ("update_correction_bias_", "fp8 bias", _set(correction_bias=lambda b: b.to(FP8)), TypeError,
     "correction_bias"),
    # an expanded bias: torch's in-place add refuses it with a RuntimeError
    ("update_correction_bias_", "expanded bias",
     _set(correction_bias=lambda b: b[:1].expand(6)), ValueError, "correction_bias"),
    # a NaN / inf rate would turn the whole bias NaN / inf (every later routing with it)
    ("update_correction_bias_", "NaN rate", _set(rate=float("nan")), ValueError, "rate"),
    ("update_correction_bias_", "inf rate", _set(rate=float("inf")), ValueError, "rate"),
    ("update_correction_bias_", "negative rate", _set(rate=-1e-3), ValueError, "rate"),
    ("update_correction_bias_", "tensor rate", _set(rate=torch.tensor(1e-3)), TypeError, "rate"),
    # permute
    ("permute", "num_experts 0", _set(num_experts=0), ValueError, "num_experts"),
    ("permute", "align 0", _set(align=0), ValueError, "align"),
    ("permute", "1-D hidden", _set(hidden=lambda h: h[0]), ValueError, "hidden"),
    ("permute", "hidden rows != T", _set(hidden=lambda h: h[:3]), ValueError, "hidden"),
    ("permute", "16-byte elements", _set(hidden=lambda h: h.to(torch.complex128)), TypeError, "hidden"),
    ("permute", "float ids", _set(topk_ids=_float), TypeError, "topk_ids"),
    ("permute", "1-D ids", _set(topk_ids=lambda i: i.flatten()), ValueError, "topk_ids"),
    ("permute", "1-D scales", _set(scales=lambda s: s[:, 0]), ValueError, "scales"),
    ("permute", "scales rows != T", _set(scales=lambda s: s[:2]), ValueError, "scales"),
    ("permute", "ids on another device", _set(topk_ids=_on_meta), ValueError, "topk_ids"),
    ("permute", "num_experts not an int", _set(num_experts=6.0), TypeError, "num_experts"),
    # layouts are addressed by int32 indices (row_of_pair, pair_of_row, m_indices)
    ("permute", "num_experts 2^31", _set(num_experts=2**31), ValueError, "num_experts"),
    ("permute", "align 2^31", _set(align=2**31), ValueError, "align"),
    ("permute", "rows past int32", _set(align=2**30), ValueError, "align"),
    # permute_masked
    ("permute_masked", "M 0", _set(max_tokens_per_expert=0), ValueError, "max_tokens_per_expert"),
    ("permute_masked", "num_experts 0", _set(num_experts=0), ValueError, "num_experts"),
    ("permute_masked", "float ids", _set(topk_ids=_float), TypeError, "topk_ids"),
    ("permute_masked", "M 2^31", _set(max_tokens_per_expert=2**31), ValueError,
     "max_tokens_per_expert"),
    ("permute_masked", "rows past int32", _set(max_tokens_per_expert=2**29), ValueError,
     "max_tokens_per_expert"),
    # unpermute
    ("unpermute", "rows sliced", _set(expert_out=lambda r: r[:5]), ValueError, "expert_out"),
    ("unpermute", "int expert_out", _set(expert_out=_int), TypeError, "expert_out"),
    ("unpermute", "1-D expert_out", _set(expert_out=lambda r: r[:, 0]), ValueError, "expert_out"),
    ("unpermute", "weights (T, K+1)", _set(topk_weights=lambda w: torch.cat([w, w[:, :1]], 1)),
     ValueError, "topk_weights"),
    ("unpermute", "int weights", _set(topk_weights=_int), TypeError, "topk_weights"),
    ("unpermute", "layout not a layout", _set(layout=lambda lay: tuple(lay)), TypeError, "layout"),
    ("unpermute", "float row_of_pair", _layout_field(row_of_pair=_float), TypeError, "row_of_pair"),
    # the fields the kernels do not read are checked too: a broken layout is refused
    ("unpermute", "row_of_pair not a tensor", _layout_field(row_of_pair=lambda t: None),
     TypeError, "row_of_pair"),
    ("unpermute", "pair_of_row not a tensor", _layout_field(pair_of_row=lambda t: None),
     TypeError, "pair_of_row"),
    ("unpermute", "int64 pair_of_row", _layout_field(pair_of_row=_int), TypeError,
     "pair_of_row"),
    ("unpermute", "2-D pair_of_row", _layout_field(pair_of_row=lambda t: t[:, None]),
     ValueError, "pair_of_row"),
    ("unpermute", "weights on another device", _set(topk_weights=_on_meta), ValueError,
     "topk_weights"),
    ("unpermute(masked)", "wrong M", _set(expert_out=lambda r: r[:, :2]), ValueError, "expert_out"),
    ("unpermute(masked)", "2-D expert_out", _set(expert_out=lambda r: r.flatten(0, 1)), ValueError,
     "expert_out"),
    ("unpermute(masked)", "masked_m not a tensor", _layout_field(masked_m=lambda t: None),
     TypeError, "masked_m"),
    ("unpermute(masked)", "2-D masked_m", _layout_field(masked_m=lambda t: t[:, None]),
     ValueError, "masked_m"),
    ("unpermute(masked)", "pair_of_row not a tensor", _layout_field(pair_of_row=lambda t: None),
     TypeError, "pair_of_row"),
    # moe_align_block_size
    ("moe_align_block_size", "block_size 0", _set(block_size=0), ValueError, "block_size"),
    ("moe_align_block_size", "num_experts 0", _set(num_experts=0), ValueError, "num_experts"),
    ("moe_align_block_size", "float ids", _set(topk_ids=_float), TypeError, "topk_ids"),
    ("moe_align_block_size", "num_experts 2^31", _set(num_experts=2**31), ValueError,
     "num_experts"),
    ("moe_align_block_size", "block_size 2^31", _set(block_size=2**31), ValueError,
     "block_size"),
    ("moe_align_block_size", "rows past int32", _set(block_size=2**30), ValueError,
     "block_size"),
    # quantize_fp8_per_token_group
    # flags are bools: bool("false") is True, the opposite of what the caller said
    ("quantize_fp8_per_token_group", "scale_ue8m0 a string", _set(scale_ue8m0="false"),
     TypeError, "scale_ue8m0"),
    ("quantize_fp8_per_token_group", "column_major_scales an int",
     _set(column_major_scales=1), TypeError, "column_major_scales"),
    ("silu_and_mul_quant_fp8", "zero_fill a string", _set(zero_fill="false"), TypeError,
     "zero_fill"),
    ("grouped_gemm_fp8_masked", "zero_fill a string", _set(zero_fill="false"), TypeError,
     "zero_fill"),
    ("quantize_fp8_per_token_group", "int x", _set(x=_int), TypeError, "x"),
    ("quantize_fp8_per_token_group", "fp8 x", _set(x=lambda x: x.to(FP8)), TypeError, "x"),
    ("quantize_fp8_per_token_group", "3-D x", _set(x=lambda x: x[None]), ValueError, "x"),
    ("quantize_fp8_per_token_group", "strided last dim", _set(x=_strided_last), ValueError, "x"),
    ("quantize_fp8_per_token_group", "group 0", _set(group_size=0), ValueError, "group_size"),
    ("quantize_fp8_per_token_group", "group 96", _set(group_size=96), ValueError, "group_size"),
    ("quantize_fp8_per_token_group", "eps 0", _set(eps=0.0), ValueError, "eps"),
    ("quantize_fp8_per_token_group", "eps underflows", _set(eps=1e-40), ValueError, "eps"),
    ("quantize_fp8_per_token_group", "eps inf", _set(eps=INF), ValueError, "eps"),
    ("quantize_fp8_per_token_group", "eps NaN", _set(eps=NAN), ValueError, "eps"),
    ("quantize_fp8_per_token_group", "out q of wrong shape",
     _set(out=(torch.empty(3, 255, dtype=FP8), torch.empty(3, 2))), ValueError, "out"),
    # silu_and_mul_quant_fp8
    ("silu_and_mul_quant_fp8", "odd width", _set(x=_drop_cols), ValueError, "x"),
    ("silu_and_mul_quant_fp8", "int x", _set(x=_int), TypeError, "x"),
    ("silu_and_mul_quant_fp8", "group 48", _set(group_size=48), ValueError, "group_size"),
    # quantize_fp8_block
    ("quantize_fp8_block", "1-D w", _set(w=lambda w: w[0, 0]), ValueError, "w"),
    ("quantize_fp8_block", "block 0", _set(block=(0, 128)), ValueError, "block"),
    ("quantize_fp8_block", "block 100", _set(block=(128, 100)), ValueError, "block"),
    ("quantize_fp8_block", "int w", _set(w=_int), TypeError, "w"),
    # one check for every backend: the C++ kernel cannot take an fp8 w, the others could
    ("quantize_fp8_block", "fp8 w", _set(w=lambda w: w.to(FP8)), TypeError, "w"),
    ("quantize_fp8_block", "eps NaN", _set(eps=NAN), ValueError, "eps"),
    # dequantize_fp8_block
    ("dequantize_fp8_block", "float q", _set(q=_float), TypeError, "q"),
    ("dequantize_fp8_block", "scales of wrong shape", _set(s=_drop_cols), ValueError, "s"),
    ("dequantize_fp8_block", "f64 scales", _set(s=_f64), TypeError, "s"),
    ("dequantize_fp8_block", "int output dtype", _set(dtype=torch.int32), TypeError, "dtype"),
    ("dequantize_fp8_block", "block 3", _set(block=(3, 128)), ValueError, "block"),
    # grouped_gemm_fp8
    ("grouped_gemm_fp8", "float a", _set(a=_float), TypeError, "a"),
    ("grouped_gemm_fp8", "2-D b", _set(b=lambda b: b[0]), ValueError, "b"),
    ("grouped_gemm_fp8", "K mismatch", _set(a=lambda a: a[:, :128], a_scales=lambda s: s[:, :1]),
     ValueError, "K"),
    ("grouped_gemm_fp8", "a_scales of wrong shape", _set(a_scales=_drop_cols), ValueError, "a_scales"),
    ("grouped_gemm_fp8", "bf16 a_scales", _set(a_scales=lambda s: s.bfloat16()), TypeError, "a_scales"),
    ("grouped_gemm_fp8", "b_scales of wrong shape", _set(b_scales=_drop_cols), ValueError, "b_scales"),
    ("grouped_gemm_fp8", "float m_indices", _set(m_indices=_float), TypeError, "m_indices"),
    ("grouped_gemm_fp8", "m_indices of R+1", _set(m_indices=lambda m: torch.cat([m, m[:1]])),
     ValueError, "m_indices"),
    ("grouped_gemm_fp8", "int out_dtype", _set(out_dtype=torch.int32), TypeError, "out_dtype"),
    ("grouped_gemm_fp8", "strided a", _set(a=lambda a: _strided_last(a.view(torch.uint8)).view(FP8)),
     ValueError, "a"),
    # grouped_gemm_fp8_masked
    ("grouped_gemm_fp8_masked", "masked_m of E+1", _set(masked_m=lambda m: torch.cat([m, m[:1]])),
     ValueError, "masked_m"),
    ("grouped_gemm_fp8_masked", "2-D a", _set(a=lambda a: a[0]), ValueError, "a"),
    ("grouped_gemm_fp8_masked", "float masked_m", _set(masked_m=_float), TypeError, "masked_m"),
    # fused_moe_fp8
    ("fused_moe_fp8", "hidden H mismatch", _set(hidden=_drop_cols), ValueError, "w13"),
    ("fused_moe_fp8", "float w13", _set(w13=_float), TypeError, "w13"),
    ("fused_moe_fp8", "w2 of wrong shape", _set(w2=lambda w: w[:, :, :64]), ValueError, "w2"),
    ("fused_moe_fp8", "weights shape != ids", _set(topk_weights=lambda w: w[:, :1]), ValueError,
     "topk_weights"),
    ("fused_moe_fp8", "float ids", _set(topk_ids=_float), TypeError, "topk_ids"),
    ("fused_moe_fp8", "int hidden", _set(hidden=_int), TypeError, "hidden"),
    # mla_decompress_kv
    ("mla_decompress_kv", "num_heads 0", _set(num_heads=0), ValueError, "num_heads"),
    ("mla_decompress_kv", "kv_b_proj rows", _set(kv_b_proj=lambda w: w[:40]), ValueError, "kv_b_proj"),
    ("mla_decompress_kv", "k_pe rows != T", _set(k_pe=lambda k: k[:4]), ValueError, "k_pe"),
    ("mla_decompress_kv", "fp8 weight, no scale", _set(kv_b_proj=lambda w: w.to(FP8)), ValueError,
     "kv_b_proj_scale"),
    ("mla_decompress_kv", "bf16 kv_c, f16 weight", _set(kv_c=lambda c: c.bfloat16(),
                                                        kv_b_proj=lambda w: w.half()),
     TypeError, "kv_b_proj"),
    ("mla_decompress_kv", "out_k of wrong shape", _set(out_k=torch.empty(5, 2, 23)), ValueError, "out_k"),
    ("mla_decompress_kv", "int kv_c", _set(kv_c=_int), TypeError, "kv_c"),
    # mla_decompress_kv_paged
    ("mla_decompress_kv_paged", "page size 0", _set(kv_cache=lambda c: c[:, :0]), ValueError, "kv_cache"),
    ("mla_decompress_kv_paged", "float block_table", _set(block_table=_float), TypeError, "block_table"),
    ("mla_decompress_kv_paged", "seq_lens of B+1", _set(seq_lens=lambda s: torch.cat([s, s[:1]])),
     ValueError, "seq_lens"),
    ("mla_decompress_kv_paged", "negative length", _set(seq_lens=lambda s: -s), ValueError, "seq_lens"),
    ("mla_decompress_kv_paged", "table too short", _set(seq_lens=lambda s: s * 3), ValueError,
     "block_table"),
    ("mla_decompress_kv_paged", "block id out of range", _set(block_table=lambda t: t + 3), ValueError,
     "block_table"),
    ("mla_decompress_kv_paged", "num_tokens -1", _set(num_tokens=-1), ValueError, "num_tokens"),
    ("mla_decompress_kv_paged", "NaN cache scale", _set(kv_cache_scale=NAN), ValueError,
     "kv_cache_scale"),
]


def _backends(op: str) -> list[str]:
    """The backends that implement `op` and can run on the CPU here."""
    name = op.split("(")[0]
    if name not in _library.OPS:       # a function without backends (update_correction_bias_)
        return [None]
    here = _library.available_backends("cpu")       # by name, as torch takes devices
    return [b for b in _library.OPS[name].backends if b in here]


def _call(op: str, kw: dict, backend):
    fn = getattr(moe_kernels, op.split("(")[0])
    return fn(**kw) if backend is None else fn(**kw, backend=backend)


@pytest.mark.parametrize("op", list(BASE))
def test_valid_call_runs(op):
    """Every case's starting point runs on every backend (so each case fails only for the
    argument it changes)."""
    backends = _backends(op)
    assert backends, f"{op}: no backend runs here"
    for backend in backends:
        _call(op, BASE[op](), backend)


def test_every_op_has_cases():
    public = {op.split("(")[0] for op in BASE}
    covered = {op.split("(")[0] for op, *_ in CASES}
    assert public == covered, f"ops without precondition cases: {public - covered}"


@pytest.mark.parametrize("op,why,change,exc,arg", CASES, ids=[f"{c[0]}-{c[1]}" for c in CASES])
def test_precondition(op, why, change, exc, arg):
    messages = {}
    for backend in _backends(op):
        kw = BASE[op]()
        change(kw)
        if backend is not None and kw.get("backend") is not None:
            backend = None            # the case is about the backend argument itself
        with pytest.raises(Exception) as info:
            _call(op, kw, backend)
        got = info.value
        assert type(got) is exc, f"{op} [{backend}] {why}: {type(got).__name__}: {got}"
        assert arg in str(got), f"{op} [{backend}] {why}: message does not name {arg!r}: {got}"
        messages[backend] = str(got)
    assert len(set(messages.values())) == 1, f"{op} {why}: messages differ by backend: {messages}"


def _to_cuda(v):
    if isinstance(v, torch.Tensor):
        return v.cuda() if v.device.type == "cpu" else v
    if isinstance(v, tuple) and hasattr(v, "_fields"):
        return type(v)(*map(_to_cuda, v))
    return tuple(map(_to_cuda, v)) if isinstance(v, tuple) else v


@pytest.mark.skipif(not HAS_CUDA, reason="no CUDA device")
@pytest.mark.parametrize("op,why,change,exc,arg", CASES, ids=[f"{c[0]}-{c[1]}" for c in CASES])
def test_precondition_cuda(op, why, change, exc, arg):
    """The same case on CUDA tensors, every backend that runs there: the same error."""
    name = op.split("(")[0]
    backends = ([b for b in _library.OPS[name].backends
                 if b in _library.available_backends(torch.device("cuda"))]
                if name in _library.OPS else [None])
    for backend in backends:
        kw = {k: _to_cuda(v) for k, v in BASE[op]().items()}
        change(kw)
        if backend is not None and kw.get("backend") is not None:
            backend = None
        with pytest.raises(Exception) as info:
            _call(op, kw, backend)
        got = info.value
        assert type(got) is exc, f"{op} [cuda {backend}] {why}: {type(got).__name__}: {got}"
        assert arg in str(got), f"{op} [cuda {backend}] {why}: message does not name {arg!r}: {got}"
