"""moe-bench cases for token permutation, DeepSeek-V3 shapes: top-8 of 256 experts,
H=7168 bf16 (GPU: 4096 tokens; CPU: 512 tokens, H=2048).

Floors (bytes moved / copy bandwidth): permute reads hidden once and writes T*K rows;
unpermute reads the T*K rows and the weights and writes hidden; moe_align_block_size
reads the ids and writes the sorted ids and block experts (tiny: launch-bound).
At 4096 x 7168 bf16 on an H100 (3.0 TB/s): permute 58.7 MB -> 19.6 us, unpermute
58.9 MB -> 19.6 us. Besides the reference (eager, compiled), the torch-native peers:
`index_select` of each row's token (permute) and `index_add_` of the weighted rows into a
float32 sum (unpermute).
"""

from __future__ import annotations

import torch

from moe_kernels._common import FP8
from moe_kernels.bench.common import (Result, device_generator, kernel_backends, measure, meta,
                                      rotating_sets)
from moe_kernels.ops import permute as ops
from moe_kernels.reference import permute as reference

E, K, BLOCK = 256, 8, 64


def default_tokens(device: str) -> list[int]:
    return [64, 4096] if device == "cuda" else [512]


def _ids(T, device, gen):
    return torch.stack([torch.randperm(E, generator=gen)[:K] for _ in range(T)]).int().to(device)


# The public names whose rows this module measures (moe-bench --op).
MEASURES = ("moe_align_block_size", "permute", "unpermute")


def run(device: str, backends: list[str] | None, tokens: list[int] | None,
        compile_reference: bool = True) -> list[Result]:
    backends = kernel_backends(device, backends, ops.PERMUTE.backends)
    H = 7168 if device == "cuda" else 2048
    gen = torch.Generator().manual_seed(0)
    dev = device_generator(gen, device)      # inputs drawn where they are used
    ref_permute = reference.permute
    ref_unpermute = reference.unpermute
    ref_align = reference.moe_align_block_size
    if compile_reference:
        ref_permute = torch.compile(reference.permute, dynamic=False)
        ref_unpermute = torch.compile(reference.unpermute, dynamic=False)
        ref_align = torch.compile(reference.moe_align_block_size, dynamic=False)
    results = []
    for T in tokens or default_tokens(device):
        P = T * K
        n_sets = rotating_sets(T * H * 2 + P * H * 2, device)
        ids = [_ids(T, device, gen) for _ in range(n_sets)]
        hidden = [torch.randn((T, H), generator=dev, device=device).bfloat16()
                  for _ in range(n_sets)]
        w = [torch.rand(T, K, generator=gen).to(device) for _ in range(n_sets)]
        want_out, _, want_idx = reference.permute(hidden[0], ids[0], E, 1, None)
        permuted = [reference.permute(hidden[i], ids[i], E, 1, None) for i in range(n_sets)]
        layouts = [ops.PermuteLayout(*p[2]) for p in permuted]
        # the copy-bound torch peers' indices (align=1: no padding rows)
        token_of_row = [(lay.pair_of_row // K).long() for lay in layouts]
        weight_of_row = [w[i].reshape(-1)[layouts[i].pair_of_row.long()] for i in range(n_sets)]

        case = f"align T={T} K={K} E={E} block={BLOCK}"
        want_align = reference.moe_align_block_size(ids[0], E, BLOCK)
        timed = [(b, lambda i, b=b: ops.moe_align_block_size(ids[i], E, BLOCK, backend=b))
                 for b in backends]
        timed += [("torch-eager", lambda i: reference.moe_align_block_size(ids[i], E, BLOCK))]
        if compile_reference:
            timed += [("torch-compile", lambda i: ref_align(ids[i], E, BLOCK))]
        nbytes = P * 4 + (P + E * (BLOCK - 1)) * 4 * 2
        results += measure("moe_align_block_size", case, device, timed, nbytes, n_sets,
                           lambda out: all(torch.equal(a, b) for a, b in zip(out, want_align)))

        case = f"permute T={T} K={K} E={E} H={H} bf16"
        timed = [(b, lambda i, b=b: ops.permute(hidden[i], ids[i], E, backend=b)[0])
                 for b in backends]
        timed += [("torch-eager", lambda i: reference.permute(hidden[i], ids[i], E, 1, None)[0])]
        if compile_reference:
            timed += [("torch-compile", lambda i: ref_permute(hidden[i], ids[i], E, 1, None)[0])]
        timed += [("torch-index_select", lambda i: hidden[i].index_select(0, token_of_row[i]))]
        nbytes = T * H * 2 + P * H * 2 + P * 4 * 3
        results += measure("permute", case, device, timed, nbytes, n_sets,
                           lambda out: torch.equal(out, want_out))

        case = f"unpermute T={T} K={K} H={H} bf16"
        want_y = reference.unpermute(permuted[0][0], want_idx[3], w[0])
        timed = [(b, lambda i, b=b: ops.unpermute(permuted[i][0], layouts[i], w[i], backend=b))
                 for b in backends]
        timed += [("torch-eager", lambda i: reference.unpermute(permuted[i][0],
                                                                 layouts[i].row_of_pair, w[i]))]
        if compile_reference:
            timed += [("torch-compile", lambda i: ref_unpermute(permuted[i][0],
                                                                 layouts[i].row_of_pair, w[i]))]
        timed += [("torch-index_add", lambda i: index_add_unpermute(
            permuted[i][0], token_of_row[i], weight_of_row[i], T))]
        nbytes = P * H * 2 + P * 8 + T * H * 2
        results += measure("unpermute", case, device, timed, nbytes, n_sets,
                           lambda out: torch.allclose(out.float(), want_y.float(), rtol=1.6e-2,
                                                      atol=1e-2))
    return results


def index_add_unpermute(rows, token_of_row, weight_of_row, T):
    """The torch peer of unpermute: weight each row, `index_add_` it into its token's float32
    sum, round to the rows' dtype."""
    out = torch.zeros(T, rows.shape[1], dtype=torch.float32, device=rows.device)
    out.index_add_(0, token_of_row, rows.float() * weight_of_row[:, None])
    return out.to(rows.dtype)


def sm90_cases():
    """(name, launch) pairs of every Triton launch of this op at DeepSeek-V3 shapes, on
    meta tensors, for the sm_90a compile gate (moe_kernels/bench/sm90.py)."""
    from moe_kernels.triton import permute
    for E, id_dtype in ((256, torch.int32), (256, torch.int64), (384, torch.int32)):
        yield (f"permute_index T=4096x8 E={E} {id_dtype}",
               lambda E=E, d=id_dtype: permute.permute_index(meta(4096, 8, dtype=d), E, 128))
    # decode: one program does the whole index
    for T, E, align in ((1, 256, 128), (16, 256, 1), (16, 384, 64)):
        yield (f"permute_index (one chunk) T={T}x8 E={E} align={align}",
               lambda T=T, E=E, a=align: permute.permute_index(meta(T, 8, dtype=torch.int32), E, a))
    # moe_align_block_size at decode: the same program writes vLLM's layout itself
    for T, block in ((1, 16), (16, 64)):
        yield (f"moe_align_block_size (one chunk) T={T}x8 E=256 block={block}",
               lambda T=T, b=block: permute.moe_align_block_size(
                   meta(T, 8, dtype=torch.int32), 256, b))
    # and beyond one chunk: the scatter kernel writes it (block experts, rows used)
    for block in (64, 128):
        yield (f"moe_align_block_size T=4096x8 E=256 block={block}",
               lambda b=block: permute.moe_align_block_size(
                   meta(4096, 8, dtype=torch.int32), 256, b))
    # the masked layout's index: one chunk (decode) and several (128 tokens per rank)
    for T, E, M in ((1, 256, 32), (16, 256, 32), (128, 256, 128), (4096, 384, 256)):
        yield (f"permute_masked_index T={T}x8 E={E} M={M}",
               lambda T=T, E=E, M=M: permute.permute_masked_index(
                   meta(T, 8, dtype=torch.int32), E, M))
    for D, dt in ((7168, torch.bfloat16), (7168, FP8), (7168, torch.float32), (56, torch.float32)):
        yield (f"gather_rows R=32768 D={D} {dt}", lambda D=D, dt=dt: permute.gather_rows(
            meta(4096, D, dtype=dt), meta(32768 + 256 * 127, dtype=torch.int32),
            meta(4096, 8, dtype=torch.int32)))
    for K, dt, wdt in ((8, torch.bfloat16, torch.float32), (8, torch.float32, torch.float32),
                       (2, torch.bfloat16, torch.bfloat16), (6, torch.float16, torch.float32)):
        yield (f"unpermute T=4096 K={K} H=7168 {dt}", lambda K=K, dt=dt, wdt=wdt: permute.unpermute(
            meta(4096 * K, 7168, dtype=dt), meta(4096, K, dtype=torch.int32), meta(4096, K, dtype=wdt)))
