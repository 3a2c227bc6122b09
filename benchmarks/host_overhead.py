"""Host time our Python adds to one eager call of each public op on the Triton backend,
measured without a GPU: the ops run on CPU tensors under the Triton interpreter with every
kernel launch replaced by a no-op, so what is timed is argument checks, backend choice,
output allocation, grid arithmetic and the torch calls between kernels, not the kernels
nor Triton's launcher (on the GPU, `moe-bench`'s eager-call rows time everything).

Inputs: each op's smallest non-empty edge case of moe_kernels.testing, as in those rows.
An op whose host code fed one kernel's output to torch indexing could not run on
unlaunched kernels; it would be listed as such.

Usage: python3 benchmarks/host_overhead.py   (us per call, best of 5 runs of 1000 calls)
"""

from __future__ import annotations

import os
import sys
import time

os.environ["TRITON_INTERPRET"] = "1"

import triton.runtime.interpreter as interpreter  # noqa: E402

LAUNCHES = [0]


def _no_launch(self, grid):
    def launch(*args, **kwargs):
        LAUNCHES[0] += 1
    return launch


interpreter.InterpretedFunction.__getitem__ = _no_launch

import moe_kernels  # noqa: E402
from moe_kernels import testing  # noqa: E402
from moe_kernels.bench.common import smallest_case  # noqa: E402


def host_us(call, calls: int = 1000, runs: int = 5) -> tuple[float, float]:
    """(best us per call over `runs` runs, launches per call)."""
    for _ in range(50):
        call()
    best = float("inf")
    for _ in range(runs):
        LAUNCHES[0] = 0
        t0 = time.perf_counter()
        for _ in range(calls):
            call()
        best = min(best, (time.perf_counter() - t0) / calls * 1e6)
    return best, LAUNCHES[0] / calls


def main() -> int:
    print(f"{'op':30s} {'host us':>8s} {'launches':>8s}  case")
    for op in testing.ops():
        case = smallest_case(op, "cpu")
        args, kwargs = testing.run(op, lambda *a, **k: (a, k), case)
        public = getattr(moe_kernels, op)
        try:
            us, launches = host_us(lambda: public(*args, backend="triton", **kwargs))
        except (RuntimeError, IndexError):
            print(f"{op:30s} {'-':>8s} {'-':>8s}  (its host code reads a kernel's output)")
            continue
        print(f"{op:30s} {us:8.1f} {launches:8.0f}  {case.name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
