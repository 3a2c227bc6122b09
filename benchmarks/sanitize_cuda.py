"""Every CUDA kernel family on small, awkward inputs, for `compute-sanitizer --tool memcheck`
(run so by benchmarks/gpu_check.sh): a read or write out of bounds in any kernel shows in
the sanitizer's report, a wrong result here.

- every op of moe_kernels.testing on its edge cases (empty, one token, partial tiles, E not
  a power of two, ties, NaN/inf, -1 ids, all tokens on one expert), on every CUDA backend
  the op has, compared with the reference;
- the registered MLA paged kernels called directly with block ids out of range and
  lengths past the table (the unchecked CUDA-graph path: they must read nothing out of
  bounds and write zeros for such tokens);
- the grouped GEMM ops again with every tile through TMA descriptors (the `tma` tile
  configs; TMA reads whole tiles, out of bounds included, which the hardware fills), and
  the contiguous one and fused_moe_fp8 (segments) on the warp-specialised kernels (`ws`);
- one DeepseekV3MoE forward (fused shared expert, unpermute into the sum).

A failed check after which the CUDA context is unusable stops the checks, saying where (each
later one would fail on it). Usage: python3 benchmarks/sanitize_cuda.py   (a line per op
and backend; exit 1 on a mismatch)
"""

from __future__ import annotations

import functools
import sys
import time

import torch

import moe_kernels
from moe_kernels import _library, testing


def check_ops(device: str = "cuda", backends=("triton", "cuda"), ops=None,
              tiles: str | None = None) -> int:
    """Each op's edge cases on each backend against the reference; tiles: under a tile
    variant of the grouped GEMMs (`_with_tiles`)."""
    failures = 0
    for op in ops or testing.ops():
        for backend in backends:
            t0 = time.perf_counter()
            check = functools.partial(testing.check, op, functools.partial(
                getattr(moe_kernels, op), backend=backend), preset="edge", device=device,
                raise_on_failure=False)
            try:
                report = check() if tiles is None else _with_tiles(device, check, tiles)
            except _library.BackendUnavailableError:
                continue
            ok = report.passed and not report.skipped
            failures += not ok
            label = backend if tiles is None else f"{backend}-{tiles}"
            print(f"{op:30s} {label:11s} {len(report.results):3d} cases  "
                  f"{'ok' if ok else 'FAILED'}  {time.perf_counter() - t0:5.1f} s", flush=True)
            if not ok:
                print(report.message(), flush=True)
                if context_lost(device):
                    raise ContextLost(f"{op} {label}")
    return failures


class ContextLost(Exception):
    """The CUDA context is unusable after a failed check: every later call of the process
    would fail on it, so the checks stop there (the sanitizer's report names the first
    bad access)."""


def context_lost(device: str) -> bool:
    from moe_kernels.bench.runs import context_lost as lost
    return lost(device)


def _with_tiles(device: str, fn, tiles: str):
    """fn() under the grouped GEMMs' `tiles` variant: "tma" (every tile through TMA
    descriptors) or "ws" (the contiguous and segments GEMMs on the warp-specialised
    kernels)."""
    from moe_kernels.configs import grouped_gemm as configs
    dev = torch.device(device)
    table = (configs.tma_table(dev) if tiles == "tma"
             else configs.with_ws(configs.table_in_force(dev)))
    return configs.with_table(table, fn)


def check_ws() -> int:
    """The ws pass of check_ops, where the ws probe passed (a hang would end the run)."""
    from moe_kernels.bench import ws_probe
    why = ws_probe.failure()
    if why:
        print(f"{'ws kernels':30s} not run: {why}", flush=True)
        return 1
    return check_ops(backends=("triton",), ops=("grouped_gemm_fp8", "fused_moe_fp8"),
                     tiles="ws")


def check_mla_paged_out_of_range(device: str = "cuda") -> int:
    cache = torch.randn(6, 16, 576, device=device).bfloat16()
    w = torch.randn(4 * 256, 512, device=device).bfloat16()
    table = torch.tensor([[0, 99, -3], [5, 2, 1]], dtype=torch.int32, device=device)
    lens = torch.tensor([60, 40], dtype=torch.int32, device=device)
    failures = 0
    for variant in ("mla_decompress_kv_paged_triton", "mla_decompress_kv_paged"):
        fn = getattr(torch.ops.moe_kernels, variant, None)
        if fn is None:
            continue
        k = torch.full((100, 4, 192), float("nan"), device=device).bfloat16()
        v = torch.full((100, 4, 128), float("nan"), device=device).bfloat16()
        fn(cache, table, lens, w, None, None, k, v)
        # sequence 0's tokens 16..47 sit in blocks 99 and -3 (out of range), 48..59 past
        # its table's 3 blocks: zeros
        ok = bool((k[16:60] == 0).all() and (v[16:60] == 0).all() and (k[:16] != 0).any()
                  and not k.isnan().any() and not v.isnan().any())
        failures += not ok
        print(f"{variant:30s} out-of-range blocks -> zeros: {'ok' if ok else 'FAILED'}",
              flush=True)
    return failures


def check_layer(device: str = "cuda", backends=("triton", "cuda")) -> int:
    from types import SimpleNamespace
    H, I, E = 256, 128, 16
    cfg = SimpleNamespace(hidden_size=H, moe_intermediate_size=I, n_routed_experts=E,
                          n_shared_experts=1, num_experts_per_tok=4, n_group=4, topk_group=2,
                          routed_scaling_factor=2.5, norm_topk_prob=True)
    g = torch.Generator().manual_seed(0)
    rnd = lambda *shape: torch.randn(*shape, generator=g) * 0.05
    sd = {"gate.weight": rnd(E, H), "gate.e_score_correction_bias": rnd(E)}
    for prefix in [f"experts.{e}." for e in range(E)] + ["shared_experts."]:
        sd.update({prefix + "gate_proj.weight": rnd(I, H), prefix + "up_proj.weight": rnd(I, H),
                   prefix + "down_proj.weight": rnd(H, I)})
    failures = 0
    want = moe_kernels.DeepseekV3MoE.from_hf(cfg, sd, device=device, backend="reference")
    x = torch.randn(37, H, generator=g).bfloat16().to(device)
    y_ref = want(x)
    for backend in backends:
        layer = moe_kernels.DeepseekV3MoE.from_hf(cfg, sd, device=device, backend=backend)
        try:
            y = layer(x)
        except _library.BackendUnavailableError:
            continue
        diff = testing.rules.calc_diff(y, y_ref)
        # the same FP8 weights and activation codes: float32 summation order apart
        ok = bool(torch.isfinite(y).all()) and diff < 1e-5
        failures += not ok
        print(f"{'DeepseekV3MoE':30s} {backend:7s} T=37 forward vs reference: calc_diff "
              f"{diff:.1e} {'ok' if ok else 'FAILED'}", flush=True)
    return failures


def main() -> int:
    if not torch.cuda.is_available():
        print("sanitize_cuda: no CUDA device")
        return 2
    from moe_kernels.bench.launches import TMA_OPS
    checks = [check_ops, functools.partial(check_ops, backends=("triton",), ops=TMA_OPS,
                                           tiles="tma"),
              check_ws, check_mla_paged_out_of_range, check_layer]
    failures = 0
    try:
        for check in checks:
            failures += check()
    except ContextLost as exc:
        print(f"sanitize_cuda: the CUDA context is unusable after {exc}; the checks after it "
              f"did not run", flush=True)
        failures += 1
    print(f"sanitize_cuda: {failures} failure(s)")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
