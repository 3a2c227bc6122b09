"""FP8 quantization ops: quantize_fp8_per_token_group, silu_and_mul_quant_fp8,
quantize_fp8_block, dequantize_fp8_block. FP8 values may differ by one representable step
(a scale's last bit moves a value across a rounding boundary); scales compare by the
float32 rule; NaN must stay exactly where the reference has it. Column-major scales are
also checked for their strides: DeepGEMM reads the storage, not the values."""

from __future__ import annotations

import torch

from moe_kernels.testing import rules
from moe_kernels.testing.core import Case, OpSpec, register
from moe_kernels.testing.inputs import pick, row_strided, small

FP8 = torch.float8_e4m3fn


def _act(g, M, K, dev, dtype=torch.bfloat16, scale=1.0):
    return (torch.randn(M, K, generator=g) * scale).to(dtype).to(dev)


def _special(g, M, K, dev, dtype=torch.bfloat16):
    """Rows with every special value: past FP8's range, tiny, zero groups, NaN, +-inf."""
    x = torch.randn(M, K, generator=g)
    x[0, :5] = torch.tensor([1e6, -3e5, 448.0, 449.0, 1e-8])
    x[1, :128] = 0.0                                  # an all-zero group: scale eps / 448
    x[2, 7] = float("nan")
    x[3, 3], x[3, 200 % K] = float("inf"), float("-inf")
    return x.to(dtype).to(dev)


def _exp_top_end(M, I, dev):
    """[gate | up] (M, 2I) float32: gate from -88.72283 (exp just below FLT_MAX) to -88.38,
    where exp's 2^n is 2^128, up 3e38."""
    gate = torch.linspace(-88.72283, -88.38, I).expand(M, I)
    return torch.cat([gate, torch.full((M, I), 3e38)], 1).contiguous().to(dev)


def _quant_cases(preset, g, dev):
    mk = lambda name, why, x, **kw: Case("quantize_fp8_per_token_group", name, dict(x=x, **kw),
                                         why)
    if preset == "edge":
        return [
            mk("empty", "M = 0", _act(g, 0, 256, dev)),
            mk("one_row", "M = 1", _act(g, 1, 256, dev)),
            mk("special_values", "past FP8's range, tiny, zero group, NaN, +-inf",
               _special(g, 6, 256, dev)),
            mk("partial_group", "K = 200: the last group has 72 columns", _act(g, 5, 200, dev)),
            mk("ue8m0_scales", "scales rounded up to powers of two (DeepGEMM on sm_100)",
               _act(g, 7, 384, dev, scale=3.0), scale_ue8m0=True),
            mk("column_major_scales", "s strides (1, M), as DeepGEMM reads activation scales",
               _act(g, 9, 256, dev), column_major_scales=True),
            mk("row_strided_x", "x a column slice of a wider tensor",
               row_strided(_act(g, 6, 512, dev), 256)),
            mk("group_64_float16", "group_size 64, float16 input",
               _act(g, 5, 256, dev, torch.float16), group_size=64),
            mk("float32_large_eps", "float32 input, eps larger than some groups' amax",
               _act(g, 4, 256, dev, torch.float32, scale=1e-4), eps=1e-3),
        ]
    if preset == "deepseek_v3":
        H = 7168 if dev.type == "cuda" else 1024
        T = 4096 if dev.type == "cuda" else 128
        return [mk(f"T{t}_H{H}", "DeepSeek-V3 activations, 1x128 groups, bf16",
                   _act(g, t, H, dev), column_major_scales=cm)
                for t, cm in ((1, False), (T, False), (T, True))]
    return [mk(f"random_{i}", "drawn sizes, dtype, group, options",
               _act(g, small(g, 20), pick(g, [64, 128, 200, 384]), dev,
                    pick(g, [torch.float32, torch.bfloat16, torch.float16]),
                    scale=pick(g, [1e-3, 1.0, 300.0])),
               group_size=pick(g, [32, 64, 128]), scale_ue8m0=pick(g, [False, True]),
               column_major_scales=pick(g, [False, True]))
            for i in range(8)]


def _silu_cases(preset, g, dev):
    mk = lambda name, why, x, **kw: Case("silu_and_mul_quant_fp8", name, dict(x=x, **kw), why)
    if preset == "edge":
        return [
            mk("empty", "M = 0", _act(g, 0, 512, dev)),
            mk("one_row", "M = 1", _act(g, 1, 512, dev)),
            mk("special_values", "silu of huge, NaN and inf inputs; products past FP8's range",
               _special(g, 6, 512, dev)),
            mk("partial_group", "I = 200: a partial last group", _act(g, 4, 400, dev)),
            mk("exp_top_end", "gates in [-88.72, -88.38]: exp(-gate) below FLT_MAX but at "
               "or past 2^127.5 (its 2^n is 2^128), times ups near bf16's max (silu * up "
               "~ -100)",
               _exp_top_end(2, 256, dev)),
            mk("row_strided_x", "x a column slice of a wider tensor",
               row_strided(_act(g, 5, 1024, dev), 512)),
            mk("float16_group_64", "float16, group_size 64", _act(g, 3, 256, dev, torch.float16),
               group_size=64),
        ]
    if preset == "deepseek_v3":
        T = 4096 if dev.type == "cuda" else 128
        I = 2048 if dev.type == "cuda" else 512
        return [mk(f"T{t}_I{I}", "GEMM1's bf16 output [gate | up], I = 2048",
                   _act(g, t, 2 * I, dev)) for t in (1, T)]
    return [mk(f"random_{i}", "drawn sizes and dtype",
               _act(g, small(g, 20), 2 * pick(g, [64, 128, 200]), dev,
                    pick(g, [torch.float32, torch.bfloat16, torch.float16]),
                    scale=pick(g, [0.1, 1.0, 30.0])), group_size=pick(g, [64, 128]))
            for i in range(6)]


def _block_cases(preset, g, dev):
    mk = lambda name, why, w, **kw: Case("quantize_fp8_block", name, dict(w=w, **kw), why)
    if preset == "edge":
        return [
            mk("partial_blocks", "N = 200, K = 300: partial blocks on both edges",
               _act(g, 200, 300, dev, torch.float32)),
            mk("special_values", "past FP8's range, zero block, NaN, +-inf",
               _special(g, 130, 256, dev, torch.float32)),
            mk("batched_experts", "(E, N, K) expert weights", torch.randn(
                3, 256, 128, generator=g).to(dev) * 0.05),
            mk("column_strided_w", "w a column slice", row_strided(
                _act(g, 128, 512, dev), 256)),
            mk("block_64x32", "another block shape", _act(g, 100, 100, dev), block=(64, 32)),
        ]
    if preset == "deepseek_v3":
        N, K = (4096, 7168) if dev.type == "cuda" else (512, 1024)
        return [mk(f"w13_{N}x{K}", "an expert's gate_up weight, 128x128 blocks",
                   torch.randn(N, K, generator=g).bfloat16().to(dev) * 0.02)]
    return [mk(f"random_{i}", "drawn shape and dtype",
               _act(g, 1 + small(g, 300), 1 + small(g, 300), dev,
                    pick(g, [torch.float32, torch.bfloat16])),
               block=pick(g, [(128, 128), (64, 64), (32, 128)])) for i in range(5)]


def _dequant_cases(preset, g, dev):
    def mk(name, why, shape, *, dtype=torch.bfloat16, block=(128, 128), nan=False):
        from moe_kernels.reference import fp8 as ref_fp8
        q, s = ref_fp8.quantize_fp8_block(torch.randn(*shape, generator=g) * 0.1, *block)
        if nan:
            q.view(torch.uint8).view(-1)[::97] = 0x7F      # e4m3fn NaN
        return Case("dequantize_fp8_block", name, dict(q=q.to(dev), s=s.to(dev), block=block,
                                                        dtype=dtype), why)
    if preset == "edge":
        return [
            mk("partial_blocks", "N = 200, K = 300", (200, 300)),
            mk("nan_values", "FP8 NaN (0x7F) dequantizes to NaN", (128, 256), nan=True),
            mk("float32_out", "float32 output", (130, 130), dtype=torch.float32),
            mk("float16_out_batched", "float16 output, (E, N, K)", (2, 128, 256),
               dtype=torch.float16),
            mk("block_64x32", "another block shape", (100, 100), block=(64, 32)),
        ]
    if preset == "deepseek_v3":
        N, K = (4096, 7168) if dev.type == "cuda" else (512, 1024)
        return [mk(f"w_{N}x{K}", "an expert's weight back to bf16", (N, K))]
    return [mk(f"random_{i}", "drawn shape and dtype", (1 + small(g, 260), 1 + small(g, 260)),
               dtype=pick(g, [torch.float32, torch.bfloat16, torch.float16]))
            for i in range(5)]


def compare_quantized(got: dict, want: dict, case=None) -> list:
    out = [rules.fp8_steps("q", got["q"], want["q"]), rules.close("s", got["s"], want["s"])]
    if case is not None and case.inputs.get("column_major_scales") and \
            isinstance(got["s"], torch.Tensor) and got["s"].numel() > 1:
        M = got["s"].shape[0]
        strides_ok = got["s"].stride(0) == 1 and (got["s"].shape[1] == 1 or
                                                  got["s"].stride(1) == M)
        out.append(rules.Verdict("s strides", "column-major (1, M)", strides_ok, 0.0, None,
                                 f"strides {got['s'].stride()}"))
    return out


register(
    OpSpec("quantize_fp8_per_token_group", ("x", "group_size"), _quant_cases,
           lambda r: {"q": r[0], "s": r[1]}, compare_quantized),
    OpSpec("silu_and_mul_quant_fp8", ("x", "group_size"), _silu_cases,
           lambda r: {"q": r[0], "s": r[1]}, compare_quantized),
    OpSpec("quantize_fp8_block", ("w", "block"), _block_cases,
           lambda r: {"q": r[0], "s": r[1]}, compare_quantized),
    OpSpec("dequantize_fp8_block", ("q", "s", "block", "dtype"), _dequant_cases,
           lambda r: {"out": r}, lambda got, want, case=None: [
               rules.close("out", got["out"], want["out"])]),
)
