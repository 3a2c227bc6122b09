"""MLA latent KV decompression: mla_decompress_kv and mla_decompress_kv_paged. k and v
compare by the per-dtype rule of their dtype; rows past the cache's tokens must be zero."""

from __future__ import annotations

import torch

from moe_kernels.testing import rules
from moe_kernels.testing.core import Case, OpSpec, register
from moe_kernels.testing.inputs import fp8_weights, pick, small

SMALL = dict(num_heads=2, qk_nope_head_dim=32, v_head_dim=16)     # kv_b_proj rows 2 * 48


def _weight(g, heads, dn, dv, R, dev, dtype, fp8):
    rows = heads * (dn + dv)
    if fp8:
        q, s = fp8_weights(g, (rows, R), std=0.1, device=dev)
        return dict(kv_b_proj=q, kv_b_proj_scale=s)
    return dict(kv_b_proj=(torch.randn(rows, R, generator=g) * 0.1).to(dtype).to(dev))


def _dense_cases(preset, g, dev):
    def mk(name, why, T, *, R=256, rope=16, dims=SMALL, dtype=torch.bfloat16, fp8=False,
           joint=False):
        if joint:   # kv_c and k_pe as slices of one latent cache row (row stride R + rope)
            latent = torch.randn(T, R + rope, generator=g).to(dtype).to(dev)
            kv_c, k_pe = latent[:, :R], latent[:, R:]
        else:
            kv_c = torch.randn(T, R, generator=g).to(dtype).to(dev)
            k_pe = torch.randn(T, rope, generator=g).to(dtype).to(dev)
        inputs = dict(kv_c=kv_c, k_pe=k_pe, **dims,
                      **_weight(g, dims["num_heads"], dims["qk_nope_head_dim"],
                                dims["v_head_dim"], R, dev, dtype, fp8))
        return Case("mla_decompress_kv", name, inputs, why)
    if preset == "edge":
        return [
            mk("empty", "T = 0", 0),
            mk("one_token", "T = 1", 1),
            mk("slices_of_one_latent", "kv_c and k_pe slices of one (T, R + rope) row "
               "(row stride R + rope), as a latent cache stores them", 7, joint=True),
            mk("fp8_weight", "FP8 kv_b_proj with 128x128 scales", 5, fp8=True),
            mk("partial_blocks", "R = 200, 2*(40+24) = 128 rows: partial scale blocks", 4,
               R=200, dims=dict(num_heads=2, qk_nope_head_dim=40, v_head_dim=24), fp8=True),
            mk("float32", "float32 throughout", 6, dtype=torch.float32),
            mk("float16", "float16", 3, dtype=torch.float16),
        ]
    if preset == "deepseek_v3":
        heads, T = (128, 1024) if dev.type == "cuda" else (8, 64)
        dims = dict(num_heads=heads, qk_nope_head_dim=128, v_head_dim=128)
        return [mk(f"T{T}_H{heads}_fp8", "R = 512, rope 64, dn = dv = 128, FP8 kv_b_proj",
                   T, R=512, rope=64, dims=dims, fp8=True, joint=True)]
    return [mk(f"random_{i}", "drawn sizes and dtype", small(g, 12), R=pick(g, [64, 200, 256]),
               rope=pick(g, [8, 16]), dtype=pick(g, [torch.float32, torch.bfloat16]),
               fp8=pick(g, [False, True]), joint=pick(g, [False, True]))
            for i in range(5)]


def _paged_cases(preset, g, dev):
    def mk(name, why, lens, *, page=4, R=128, rope=16, dims=SMALL, dtype=torch.bfloat16,
           fp8_cache=False, fp8_weight=False, extra_rows=0, blocks=None):
        per_seq = [-(-n // page) for n in lens]
        nblocks = blocks or (sum(per_seq) + 2)
        perm = torch.randperm(nblocks, generator=g)
        width = max(per_seq + [1])
        table = torch.zeros(len(lens), width, dtype=torch.int32)
        used = 0
        for b, n in enumerate(per_seq):
            table[b, :n] = perm[used:used + n]
            used += n
        cache = torch.randn(nblocks, page, R + rope, generator=g)
        inputs = dict(block_table=table.to(dev),
                      seq_lens=torch.tensor(lens, dtype=torch.int32, device=dev), **dims,
                      num_tokens=sum(lens) + extra_rows,
                      **_weight(g, dims["num_heads"], dims["qk_nope_head_dim"],
                                dims["v_head_dim"], R, dev, dtype, fp8_weight))
        if fp8_cache:
            from moe_kernels.reference import fp8 as ref_fp8
            inputs["kv_cache"] = ref_fp8.to_fp8(cache * 8).to(dev)
            inputs["kv_cache_scale"] = 0.125
        else:
            inputs["kv_cache"] = cache.to(dtype).to(dev)
        return Case("mla_decompress_kv_paged", name, inputs, why)
    if preset == "edge":
        return [
            mk("no_tokens", "every sequence empty", [0, 0]),
            mk("empty_sequence_between", "a length-0 sequence between others", [5, 0, 3]),
            mk("page_size_1", "one token per page", [3, 2], page=1),
            mk("partial_last_page", "lengths not multiples of the page", [7, 1, 9]),
            mk("fp8_cache", "FP8 cache with its per-tensor scale, bf16 weight", [6, 2],
               fp8_cache=True),
            mk("fp8_cache_and_weight", "both FP8: bf16 output", [4, 4], fp8_cache=True,
               fp8_weight=True),
            mk("rows_past_the_tokens", "num_tokens > sum(seq_lens): the extra rows are zero",
               [3, 2], extra_rows=4),
        ]
    if preset == "deepseek_v3":
        heads = 128 if dev.type == "cuda" else 8
        dims = dict(num_heads=heads, qk_nope_head_dim=128, v_head_dim=128)
        lens = [int(x) for x in torch.randint(1, 200, (8,), generator=g)]
        return [mk("prefill_8_sequences", "R = 512, rope 64, page 64, FP8 weight", lens,
                   page=64, R=512, rope=64, dims=dims, fp8_weight=True)]
    return [mk(f"random_{i}", "drawn lengths, page and dtypes",
               [small(g, 9) for _ in range(1 + small(g, 3))], page=pick(g, [1, 2, 16]),
               fp8_cache=pick(g, [False, True]), fp8_weight=pick(g, [False, True]))
            for i in range(5)]


def compare_kv(got: dict, want: dict, case=None) -> list:
    """k / v close as dot products (rules.dot_products); NaN and inf as one class
    (docs/api.md: a non-finite FP8 weight value or scale gives either, by backend)."""
    return [rules.dot_products(name, got[name], want[name], any_non_finite=True)
            for name in ("k", "v")]


register(
    OpSpec("mla_decompress_kv", ("kv_c", "k_pe", "kv_b_proj"), _dense_cases,
           lambda r: {"k": r[0], "v": r[1]}, compare_kv),
    OpSpec("mla_decompress_kv_paged", ("kv_cache", "block_table", "seq_lens", "kv_b_proj"),
           _paged_cases, lambda r: {"k": r[0], "v": r[1]}, compare_kv),
)
