"""Host time of one eager call of each public op on the Triton backend, measured without a
GPU, on CPU tensors, each op's smallest non-empty edge case of moe_kernels.testing (as in
`moe-bench`'s eager-call rows, which time everything on the GPU).

Default: the ops run under the Triton interpreter with every kernel launch replaced by a
no-op, so what is timed is our Python: argument checks, backend choice, output
allocation, grid arithmetic and the torch calls between kernels, not Triton's launcher.

The last row is one decode forward of a small DeepseekV3MoE layer (its own Python between
the ops included).

`--compiled`: the kernels are compiled for sm_90 (no interpreter) and only their C
launcher is replaced, by a no-op (moe_kernels/bench/launches.py `stub_launches`), so
Triton's Python launcher path is timed too: through `JITFunction.run`
(`MOE_KERNELS_TRITON_LAUNCH=jit`) and through the launch cache (moe_kernels/triton/
launch.py), side by side. What the GPU adds on top: the C launcher and the driver call.

An op whose host code fed one kernel's output to torch indexing could not run on
unlaunched kernels; it would be listed as such.

Usage: python3 benchmarks/host_overhead.py [--compiled]
(us per call, best of 5 runs of 1000 calls)
"""

from __future__ import annotations

import os
import sys
import time

COMPILED = "--compiled" in sys.argv[1:]
if not COMPILED:
    os.environ["TRITON_INTERPRET"] = "1"

LAUNCHES: list = []


def _stub_interpreted_launches():
    import triton.runtime.interpreter as interpreter

    def no_launch(self, grid):
        return lambda *args, **kwargs: LAUNCHES.append(None)

    interpreter.InterpretedFunction.__getitem__ = no_launch


def host_us(call, calls: int = 1000, runs: int = 5) -> tuple[float, float]:
    """(best us per call over `runs` runs, launches per call)."""
    for _ in range(50):
        call()
    best = float("inf")
    for _ in range(runs):
        LAUNCHES.clear()
        t0 = time.perf_counter()
        for _ in range(calls):
            call()
        best = min(best, (time.perf_counter() - t0) / calls * 1e6)
    return best, len(LAUNCHES) / calls


def _timed(call, cached: bool | None):
    """host_us of call(); with the launch cache on or off where `cached` is not None."""
    if cached is None:
        return host_us(call)
    from moe_kernels.bench.launches import stub_launches
    from moe_kernels.triton import launch
    with launch.cache_enabled(cached), stub_launches(LAUNCHES):
        return host_us(call)


def main() -> int:
    if not COMPILED:
        _stub_interpreted_launches()
    import moe_kernels
    from moe_kernels import testing
    from moe_kernels.bench.common import smallest_case

    modes = (False, True) if COMPILED else (None,)
    heads = ["JITFunction.run", "cached"] if COMPILED else ["host us"]
    print(f"{'op':30s} " + " ".join(f"{h:>15s}" for h in heads) + f" {'launches':>8s}  case")
    for op in testing.ops():
        case = smallest_case(op, "cpu")
        args, kwargs = testing.run(op, lambda *a, **k: (a, k), case)
        public = getattr(moe_kernels, op)
        call = lambda: public(*args, backend="triton", **kwargs)
        try:
            times = [_timed(call, mode) for mode in modes]
        except (RuntimeError, IndexError):
            print(f"{op:30s} {'-':>15s}  (its host code reads a kernel's output)")
            continue
        print(f"{op:30s} " + " ".join(f"{us:15.1f}" for us, _ in times)
              + f" {times[-1][1]:8.0f}  {case.name}")
    forward = _decode_layer()
    times = [_timed(forward, mode) for mode in modes]
    print(f"{'DeepseekV3MoE forward':30s} " + " ".join(f"{us:15.1f}" for us, _ in times)
          + f" {times[-1][1]:8.0f}  T=1, 16 + 1 experts, H=256, top-4 of 4 groups / 2")
    return 0


def _decode_layer():
    """One decode step of a small DeepseekV3MoE on the triton backend: the layer's own
    Python between its ops counts too."""
    import torch

    from moe_kernels.bench.layer import CPU_CONFIG, random_layer
    cfg = dict(CPU_CONFIG, hidden_size=256, moe_intermediate_size=128, num_experts_per_tok=4)
    layer = random_layer(cfg, "cpu", torch.Generator().manual_seed(0))
    layer.backend = "triton"
    hidden = torch.randn(1, 256).bfloat16()
    return lambda: layer(hidden)


if __name__ == "__main__":
    sys.exit(main())
