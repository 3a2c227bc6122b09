"""Every public op under torch.compile(fullgraph=True, dynamic=True), as engines compile
for any batch size: sizes and Python float arguments become symbolic, so every check must
trace on them. Three token counts through one compiled function, each equal to eager,
bit for bit. (The per-op tests compile with the default, which specialises floats.)
Catches a check that calls math.isfinite on a float argument, which breaks the graph on a
symbolic float."""

from __future__ import annotations

import functools

import pytest
import torch

import moe_kernels
from moe_kernels import _library
from moe_kernels.reference import fp8 as ref_fp8

from helpers import device_backend_params

E, K, H = 8, 2, 256
TOKENS = (5, 9, 1)


def _g(T: int) -> torch.Generator:
    return torch.Generator().manual_seed(T)


def _ids(T: int) -> torch.Tensor:
    return torch.stack([torch.randperm(E, generator=_g(T + t))[:K] for t in range(T)]).int()


def _weights(E_, N, K_, seed):
    return ref_fp8.quantize_fp8_block(torch.randn(E_, N, K_, generator=_g(seed)) / K_ ** 0.5)


def _paged(T):
    cache = torch.randn(4, 4, 192, generator=_g(T)).to(torch.float8_e4m3fn)
    table = torch.tensor([[0, 1], [2, 3]], dtype=torch.int32)
    lens = torch.tensor([T % 8 + 1, 3], dtype=torch.int32)
    return cache, table, lens, 0.5 * T


@functools.lru_cache(maxsize=None)
def _constants(device: str) -> dict:
    """The weights and counts every call shares (not inputs of the compiled function)."""
    c = dict(w13=_weights(E, 256, H, 1), w2=_weights(E, H, 128, 2), wq=_weights(3, 192, 256, 3),
             kv_b=(torch.randn(2 * 256, 128, generator=_g(4)) * 0.05).bfloat16(),
             masked_m=torch.tensor([2, 0, 3], dtype=torch.int32))
    return {k: tuple(t.to(device) for t in v) if isinstance(v, tuple) else v.to(device)
            for k, v in c.items()}


# op: (function of the constants, the inputs and a backend; inputs at T tokens). Float
# arguments are inputs, so that they arrive symbolic.
CASES = {
    "grouped_topk": (
        lambda c, x, s, b: moe_kernels.grouped_topk(x, 2, num_expert_group=2, topk_group=1,
                                                 routed_scaling_factor=s, backend=b),
        lambda T: (torch.randn(T, E, generator=_g(T)), 1.5 + T)),
    "moe_align_block_size": (
        lambda c, i, b: moe_kernels.moe_align_block_size(i, E, 4, backend=b),
        lambda T: (_ids(T),)),
    "permute+unpermute": (
        lambda c, h, i, w, b: moe_kernels.unpermute(
            *moe_kernels.permute(h, i, E, align=4, backend=b), w, backend=b),
        lambda T: (torch.randn(T, H, generator=_g(T)), _ids(T), torch.rand(T, K, generator=_g(T)))),
    "permute_masked": (
        lambda c, h, i, b: moe_kernels.permute_masked(h, i, E, 4, backend=b)[0],
        lambda T: (torch.randn(T, H, generator=_g(T)), _ids(T))),
    "quantize_fp8_per_token_group": (
        lambda c, x, eps, b: moe_kernels.quantize_fp8_per_token_group(x, eps=eps, backend=b),
        lambda T: (torch.randn(T, 512, generator=_g(T)).bfloat16(), 1e-6 * T)),
    "silu_and_mul_quant_fp8": (
        lambda c, x, b: moe_kernels.silu_and_mul_quant_fp8(x, backend=b),
        lambda T: (torch.randn(T, 512, generator=_g(T)).bfloat16(),)),
    "quantize_fp8_block+dequantize_fp8_block": (
        lambda c, w, eps, b: moe_kernels.dequantize_fp8_block(
            *moe_kernels.quantize_fp8_block(w, eps=eps, backend=b), backend=b),
        lambda T: (torch.randn(T, 200, generator=_g(T)), 1e-6 * T)),
    "grouped_gemm_fp8": (
        lambda c, a, s, m, b: moe_kernels.grouped_gemm_fp8(a, s, *c["wq"], m, backend=b),
        lambda T: (*ref_fp8.quantize_fp8_per_token_group(torch.randn(T, 256, generator=_g(T))),
                   torch.randint(-1, 3, (T,), dtype=torch.int32, generator=_g(T)))),
    "grouped_gemm_fp8_masked": (
        lambda c, a, s, b: moe_kernels.grouped_gemm_fp8_masked(a, s, *c["wq"], c["masked_m"],
                                                                 backend=b),
        lambda T: tuple(x.view(3, T, -1) for x in ref_fp8.quantize_fp8_per_token_group(
            torch.randn(3 * T, 256, generator=_g(T))))),
    "fused_moe_fp8": (
        lambda c, h, w, i, b: moe_kernels.fused_moe_fp8(h, *c["w13"], *c["w2"], w, i,
                                                              backend=b),
        lambda T: (torch.randn(T, H, generator=_g(T)).bfloat16(),
                   torch.rand(T, K, generator=_g(T)), _ids(T))),
    "mla_decompress_kv": (
        lambda c, kv, pe, b: moe_kernels.mla_decompress_kv(kv, pe, c["kv_b"], num_heads=2,
                                                           backend=b),
        lambda T: (torch.randn(T, 128, generator=_g(T)).bfloat16(),
                   torch.randn(T, 64, generator=_g(T)).bfloat16())),
    "mla_decompress_kv_paged": (
        lambda c, cache, t, lens, s, b: moe_kernels.mla_decompress_kv_paged(
            cache, t, lens, c["kv_b"], num_heads=2, kv_cache_scale=s, num_tokens=16, backend=b),
        _paged),
}


def _tensors(result) -> list:
    if isinstance(result, torch.Tensor):
        return [result]
    return [t for r in result for t in _tensors(r)] if isinstance(result, (tuple, list)) else []


# The kernel backends, which torch.compile sees as opaque ops (so eager and compiled run the
# same kernels, bit for bit); the reference's torch code, which Inductor would compile
# itself, is compiled (default dynamic) in each op's own test.
@pytest.mark.parametrize("device,backend", device_backend_params(("cpu", "triton", "cuda")))
@pytest.mark.parametrize("name", list(CASES))
def test_dynamic_compile_equals_eager(device, backend, name):
    missing = [op for op in name.split("+") if backend not in _library.OPS[op].backends]
    if missing:
        pytest.skip(f"{', '.join(missing)} has no {backend} backend")
    fn, inputs = CASES[name]
    c = _constants(device)
    torch._dynamo.reset()
    compiled = torch.compile(lambda *args: fn(c, *args, backend), fullgraph=True, dynamic=True)
    for T in TOKENS:
        args = [a.to(device) if isinstance(a, torch.Tensor) else a for a in inputs(T)]
        got, want = _tensors(compiled(*args)), _tensors(fn(c, *args, backend))
        assert len(got) == len(want) and got, f"T={T}"
        for g, w in zip(got, want):
            assert g.shape == w.shape and g.dtype == w.dtype, f"T={T}"
            assert torch.equal(g.view(torch.uint8) if g.dtype == torch.float8_e4m3fn else g,
                               w.view(torch.uint8) if w.dtype == torch.float8_e4m3fn else w), \
                f"T={T}"
