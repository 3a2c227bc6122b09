"""FP8 grouped GEMMs: grouped_gemm_fp8 (DeepGEMM's contiguous layout) and
grouped_gemm_fp8_masked (its masked layout). Outputs compare by DeepGEMM's calc_diff, over
the whole output and row by row (one wrong row among thousands is not averaged away);
padding rows (m_indices -1) and masked rows past masked_m must be zero (the contract; the
DeepGEMM adapter zero-fills its output, as DeepGEMM's callers do)."""

from __future__ import annotations

import torch

from moe_kernels.testing import rules
from moe_kernels.testing.core import Case, OpSpec, register
from moe_kernels.testing.inputs import column_major, fp8_rows, fp8_weights, pick, small


def _contiguous_case(g, dev, name, why, m_indices, *, E=4, N=256, K=384, out_dtype=None,
                     col_major=False):
    R = len(m_indices)
    a, a_s = fp8_rows(g, R, K, dev)
    b, b_s = fp8_weights(g, (E, N, K), device=dev)
    # scales far from 1, different per block: a kernel that drops or misplaces one is off
    b_s = b_s * torch.exp2(torch.randint(-3, 4, b_s.shape, generator=g)).to(dev)
    inputs = dict(a=a, a_scales=column_major(a_s) if col_major else a_s, b=b, b_scales=b_s,
                  m_indices=torch.tensor(m_indices, dtype=torch.int32, device=dev))
    if out_dtype is not None:
        inputs["out_dtype"] = out_dtype
    return Case("grouped_gemm_fp8", name, inputs, why)


def _runs(sizes, align=1):
    """m_indices of expert segments of the given sizes, each padded to align with -1."""
    out = []
    for e, n in enumerate(sizes):
        out += [e] * n + [-1] * (-n % align)
    return out


def _contiguous_cases(preset, g, dev):
    mk = lambda name, why, m, **kw: _contiguous_case(g, dev, name, why, m, **kw)
    if preset == "edge":
        return [
            mk("empty", "R = 0", []),
            mk("one_row", "R = 1, the decode step", [2]),
            mk("partial_tile", "130 rows of one expert: a full tile and a 2-row tile",
               [1] * 130),
            mk("padded_segments", "segments padded to 128 with -1 rows (must be zero)",
               _runs([3, 0, 130, 5], 128)),
            mk("interleaved_experts", "experts alternating row by row (any m_indices is "
               "correct)", [r % 3 for r in range(37)]),
            mk("n_k_not_multiples_of_128", "N = 200, K = 300: partial scale blocks",
               [0, 1, 1, 2, 3, 3, 3], N=200, K=300),
            mk("experts_not_power_of_two", "E = 5", _runs([4, 1, 0, 7, 2]), E=5),
            mk("column_major_a_scales", "a_scales strides (1, R), as DeepGEMM takes them",
               _runs([9, 0, 6, 3]), col_major=True),
            mk("float32_out", "out_dtype float32", _runs([5, 5, 5, 5]),
               out_dtype=torch.float32),
            mk("k_zero", "K = 0: every output an empty sum, zero (no K block, no scales to "
               "read); expert 0's 12 rows take the CPU's GEMM of many rows, not its GEMV",
               [0] * 12 + [1, -1, 2], K=0),
        ]
    if preset == "deepseek_v3":
        N, K, rows = (4096, 7168, 256) if dev.type == "cuda" else (512, 1024, 48)
        sizes = [int(x) for x in torch.randint(0, rows, (8,), generator=g)]
        return [mk("gemm1_tile_aligned", f"w13: N={N}, K={K}, segments padded to 128",
                   _runs(sizes, 128), E=8, N=N, K=K),
                mk("gemm2", "w2: N=K_of_gemm1, K=2048 (scaled on CPU)", _runs(sizes, 128), E=8,
                   N=K // 2, K=N // 2)]
    out = []
    for i in range(6):
        E = 1 + small(g, 6)
        sizes = [small(g, 40) for _ in range(E)]
        out.append(mk(f"random_{i}", f"E={E} segments {sizes}",
                      _runs(sizes, pick(g, [1, 16, 128])), E=E,
                      N=pick(g, [64, 128, 200]), K=pick(g, [128, 256, 300]),
                      col_major=pick(g, [False, True])))
    return out


def _masked_case(g, dev, name, why, masked_m, *, M=8, N=256, K=384, col_major=False):
    E = len(masked_m)
    a, a_s = fp8_rows(g, E * M, K, dev)
    b, b_s = fp8_weights(g, (E, N, K), device=dev)
    b_s = b_s * torch.exp2(torch.randint(-3, 4, b_s.shape, generator=g)).to(dev)
    a_s = a_s.view(E, M, a_s.shape[1])
    if col_major:    # per expert (M, G) column-major, DeepGEMM's layout
        a_s = a_s.transpose(1, 2).contiguous().transpose(1, 2)
    return Case("grouped_gemm_fp8_masked", name, dict(
        a=a.view(E, M, K), a_scales=a_s, b=b, b_scales=b_s,
        masked_m=torch.tensor(masked_m, dtype=torch.int32, device=dev)), why)


def _masked_cases(preset, g, dev):
    mk = lambda name, why, m, **kw: _masked_case(g, dev, name, why, m, **kw)
    if preset == "edge":
        return [
            mk("all_empty", "masked_m all 0: output all zero", [0, 0, 0]),
            mk("full_and_empty", "masked_m 0 and M side by side", [8, 0, 8, 3]),
            mk("partial_tile", "M = 130 rows per expert, 129 valid", [129, 2], M=130),
            mk("n_k_not_multiples_of_128", "N = 200, K = 300", [3, 5], N=200, K=300),
            mk("column_major_scales", "per-expert column-major a_scales", [7, 1, 4],
               col_major=True),
            mk("k_zero", "K = 0: every output an empty sum, zero", [8, 0, 3], K=0),
            mk("no_groups", "E = 0: an empty output", []),
        ]
    if preset == "deepseek_v3":
        N, K, M = (4096, 7168, 256) if dev.type == "cuda" else (512, 1024, 16)
        return [mk("decode", f"32 local experts, M={M}, N={N}, K={K}",
                   [int(x) for x in torch.randint(0, M + 1, (8 if dev.type == "cpu" else 32,),
                                                  generator=g)], M=M, N=N, K=K)]
    return [mk(f"random_{i}", "drawn masked_m and sizes",
               [small(g, 9) for _ in range(1 + small(g, 4))], M=9,
               N=pick(g, [64, 200]), K=pick(g, [128, 300]), col_major=pick(g, [False, True]))
            for i in range(5)]


register(
    OpSpec("grouped_gemm_fp8", ("a", "a_scales", "b", "b_scales", "m_indices"),
           _contiguous_cases, lambda r: {"out": r},
           lambda got, want, case=None: [rules.gemm("out", got["out"], want["out"])]),
    OpSpec("grouped_gemm_fp8_masked", ("a", "a_scales", "b", "b_scales", "masked_m"),
           _masked_cases, lambda r: {"out": r},
           lambda got, want, case=None: [rules.gemm("out", got["out"], want["out"])]),
)
