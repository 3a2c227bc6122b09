"""One call of each op's Triton kernels at the H100 goal shapes (docs/benchmarks.md), between
cudaProfilerStart / Stop after a warm-up, for Nsight Compute: the counters that say what
limits a kernel that misses its goal (memory or compute throughput, occupancy).

Run by `STAGES="build ncu" bash benchmarks/gpu_check.sh`, i.e.
  ncu --profile-from-start off --section SpeedOfLight --section Occupancy --csv \\
      python3 benchmarks/ncu_cases.py [case ...]
cases: gating permute quant gemm1 gemm1-ws gemm2 gemm2-ws masked mla fused (default:
all).
`--smoke`: the same calls at small sizes on the CPU backend, no profiler (a test runs it).
"""

from __future__ import annotations

import sys

import torch

import moe_kernels
from moe_kernels.configs import grouped_gemm as configs

# (T tokens, E experts, top-k, H hidden, I expert width, GEMM rows per expert, masked E and
# M, MLA tokens and heads): the goal shapes on the GPU, small ones for --smoke.
GOAL = dict(T=4096, E=256, K=8, H=7168, I=2048, rows=4096, mE=32, mM=32, mT=8192, mH=128)
SMOKE = dict(T=12, E=16, K=4, H=256, I=128, rows=8, mE=4, mM=8, mT=6, mH=2)


def cases(device: str, backend: str, d: dict) -> dict:
    """{name: zero-argument call} at the sizes of d."""
    T, E, K, H, I = d["T"], d["E"], d["K"], d["H"], d["I"]
    bf16 = torch.bfloat16
    run = dict(backend=backend)

    def fp8_weights(n_exp, n, k):
        w = torch.randn(n_exp, n, k, device=device, dtype=bf16) / k ** 0.5
        return moe_kernels.quantize_fp8_block(w, **run)

    def activations(rows, k):
        return moe_kernels.quantize_fp8_per_token_group(
            torch.randn(rows, k, device=device, dtype=bf16), **run)

    logits = torch.randn(T, E, device=device, dtype=bf16)
    bias = torch.randn(E, device=device) * 0.1
    ids = torch.stack([torch.randperm(E, device=device)[:K] for _ in range(T)]).int()
    w = torch.rand(T, K, device=device)
    hidden = torch.randn(T, H, device=device, dtype=bf16)
    permuted, layout = moe_kernels.permute(hidden, ids, E, **run)
    x2 = torch.randn(T, 2 * I, device=device, dtype=bf16)
    out = {
        "gating": lambda: moe_kernels.grouped_topk(
            logits, K, num_expert_group=8, topk_group=4, correction_bias=bias,
            routed_scaling_factor=2.5, **run),
        "permute": lambda: (moe_kernels.moe_align_block_size(ids, E, 64, **run),
                            moe_kernels.permute(hidden, ids, E, **run),
                            moe_kernels.unpermute(permuted, layout, w, **run)),
        "quant": lambda: (moe_kernels.quantize_fp8_per_token_group(hidden, **run),
                          moe_kernels.silu_and_mul_quant_fp8(x2, **run)),
    }
    for name, (n, k) in (("gemm1", (2 * I, H)), ("gemm2", (H, I))):
        a, a_s = activations(8 * d["rows"], k)
        b, b_s = fp8_weights(8, n, k)
        m = torch.arange(8, device=device, dtype=torch.int32).repeat_interleave(d["rows"])
        out[name] = lambda a=a, a_s=a_s, b=b, b_s=b_s, m=m: moe_kernels.grouped_gemm_fp8(
            a, a_s, b, b_s, m, **run)
        # the same call on the warp-specialised kernel (configs/grouped_gemm.py `ws`)
        out[f"{name}-ws"] = lambda call=out[name], dev=a.device: configs.with_table(
            configs.with_ws(configs.table_in_force(dev)), call)
    mE, mM = d["mE"], d["mM"]
    a, a_s = activations(mE * mM, H)
    b, b_s = fp8_weights(mE, 2 * I, H)
    masked = torch.randint(mM // 4, mM + 1, (mE,), device=device, dtype=torch.int32)
    out["masked"] = lambda: moe_kernels.grouped_gemm_fp8_masked(
        a.view(mE, mM, -1), a_s.view(mE, mM, -1), b, b_s, masked, **run)
    mT, mH = d["mT"], d["mH"]
    kv = torch.randn(mT, 576, device=device, dtype=bf16)
    wkv = torch.randn(mH * 256, 512, device=device, dtype=bf16) / 512 ** 0.5
    out["mla"] = lambda: moe_kernels.mla_decompress_kv(kv[:, :512], kv[:, 512:], wkv,
                                                       num_heads=mH, **run)
    w13, s13 = fp8_weights(E, 2 * I, H)
    w2, s2 = fp8_weights(E, H, I)
    out["fused"] = lambda: moe_kernels.fused_moe_fp8(hidden[:1], w13, s13, w2, s2, w[:1],
                                                     ids[:1], **run)
    return out


def main(argv) -> int:
    smoke = "--smoke" in argv
    names = [a for a in argv if a != "--smoke"]
    all_cases = cases("cpu", "cpu", SMOKE) if smoke else cases("cuda", "triton", GOAL)
    names = names or list(all_cases)
    unknown = [n for n in names if n not in all_cases]
    if unknown:
        print(f"ncu_cases: unknown {unknown}; known: {sorted(all_cases)}")
        return 2
    for n in names:   # warm-up: compiles every kernel outside the profiled range
        all_cases[n]()
    if smoke:
        print(f"ncu_cases: ran {', '.join(names)} (smoke)")
        return 0
    torch.cuda.synchronize()
    torch.cuda.profiler.start()
    for n in names:
        all_cases[n]()
    torch.cuda.synchronize()
    torch.cuda.profiler.stop()
    print(f"ncu_cases: profiled {', '.join(names)}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
