"""The launch cache (moe_kernels/triton/launch.py) against Triton's own launcher path, on
any machine (no GPU needed).

How: every public op runs on CPU tensors with `backend="triton"` and real compiled kernels
(no interpreter): the kernels compile for sm_90 as in the compile gate (sm90.py's stand-in
driver) and the compiled kernels' C launcher is replaced by a stand-in that records its
arguments. Each edge case of `moe_kernels.testing` runs through `JITFunction.run` (cache
off), then twice with the cache on, in one process, so an entry cached by one case is what
a later case with the same key gets. Both cached calls must hand the launcher exactly
what `JITFunction.run` did: the same compiled kernel (function handle), grid, stream,
packed metadata and kernel arguments (tensors by dtype, shape, strides and 16-byte
alignment, other values by value); the second without launch metadata or hooks (a hit).

It also lists any `*_kernel` of moe_kernels.triton left without `@cached_launch`.
`python -m moe_kernels.bench.launches` prints one line per problem and a count of cases,
launches and problems, and exits 1 on any problem;
tests/test_launch.py runs it under each triton version the project supports.
`stub_launches()` is also what benchmarks/host_overhead.py --compiled times under.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import sys

import torch

from moe_kernels.bench.sm90 import _StubDriver

# launcher positions: grid x, y, z, stream, function, packed metadata, launch metadata,
# enter hook, exit hook, then the kernel's arguments
_LAUNCH_METADATA, _FIRST_ARG = 6, 9


class _StubUtils:
    def __init__(self):
        self._handles = itertools.count(1)

    def load_binary(self, name, kernel, shared, device):
        """(module, function, registers, spills, max threads): new handles per compiled
        kernel, so a launch names the kernel it runs (a module of None would be loaded
        again at each launch)."""
        handle = next(self._handles)
        return handle, handle, 32, 0, 1024

    def get_device_properties(self, device):
        return {"max_shared_mem": 232448, "multiprocessor_count": 132}


class _RecordingDriver(_StubDriver):
    """sm90's stand-in driver, whose compiled kernels' launchers record into `sink` (the
    one set at launch time: a compiled kernel keeps its launcher) instead of launching,
    and call the launch hooks they are given, as the C launcher does."""

    def __init__(self):
        self.sink = None
        self.utils = _StubUtils()

    def launcher_cls(self, src, metadata):
        return self._launch

    def _launch(self, *args):
        metadata, enter, leave = args[_LAUNCH_METADATA:_FIRST_ARG]
        if enter is not None:
            enter(metadata)
        if self.sink is not None:
            self.sink.append(args)
        if leave is not None:
            leave(metadata)


_DRIVER = _RecordingDriver()


@contextlib.contextmanager
def stub_launches(sink: list | None = None):
    """Within: every Triton kernel compiles for sm_90 and each launch appends its launcher
    arguments to `sink` (or does nothing); the triton backend accepts CPU tensors."""
    from triton.runtime.driver import driver

    from moe_kernels import _library
    from moe_kernels.triton.launch import package_globals
    # the kernels' modules read the interpreter flag once, at import: imported here first,
    # they compile what a GPU runs, not the interpreter's software paths
    list(package_globals())
    saved = (driver._active, _library.triton_interpreting, dict(_library._RESOLVED))
    _DRIVER.sink = sink
    driver.set_active(_DRIVER)
    _library.triton_interpreting = lambda: True
    _library._RESOLVED.clear()
    try:
        yield sink
    finally:
        _DRIVER.sink = None
        driver._active, _library.triton_interpreting = saved[0], saved[1]
        _library._RESOLVED.clear()
        _library._RESOLVED.update(saved[2])


def _comparable(arg):
    if isinstance(arg, torch.Tensor):
        return ("tensor", arg.dtype, tuple(arg.shape), arg.stride(), arg.data_ptr() & 15)
    if type(arg).__name__ == "TensorDescriptor":
        return ("tensordesc", _comparable(arg.base), tuple(arg.shape), tuple(arg.strides),
                tuple(arg.block_shape), arg.padding, getattr(arg, "layout", None))
    return arg


def _launches(call, cached: bool) -> list:
    """The launches of call() with the cache on or off: (grid, stream, function, packed
    metadata, arguments) and whether it went through `JITFunction.run` (which passes
    launch metadata; the cache passes None)."""
    from moe_kernels.triton import launch
    sink: list = []
    with launch.cache_enabled(cached), stub_launches(sink):
        call()
    return [(a[:_LAUNCH_METADATA], tuple(map(_comparable, a[_FIRST_ARG:])),
             a[_LAUNCH_METADATA] is not None) for a in sink]


def check_call(where: str, call, seen: list | None = None) -> tuple[int, list[str]]:
    """(launches compared, mismatches) between call()'s launches through
    `JITFunction.run` and through the cache: its first cached call (a miss, or a hit on
    an entry of an earlier call, which must then be that kernel) and its second (a hit).
    seen: extended by the `JITFunction.run` launches' arguments."""
    jit = _launches(call, cached=False)
    if seen is not None:
        seen.extend(args for _, args, _ in jit)
    if not all(through_run for *_, through_run in jit):
        return 0, [f"{where}: the cache was off, yet a launch bypassed JITFunction.run"]
    problems = []
    for attempt in ("first", "repeated"):
        cached = _launches(call, cached=True)
        if len(cached) != len(jit):
            return 0, problems + [f"{where}: {len(jit)} launches through JITFunction.run, "
                                  f"{len(cached)} by the {attempt} cached call"]
        for i, ((head_j, args_j, _), (head_c, args_c, through_run)) in \
                enumerate(zip(jit, cached)):
            if attempt == "repeated" and through_run:
                problems.append(f"{where} launch {i}: a repeated launch missed the cache")
            elif head_c != head_j or args_c != args_j:
                problems.append(f"{where} launch {i}, {attempt} cached call: {head_c} "
                                f"{args_c} != JITFunction.run's {head_j} {args_j}")
    return len(jit), problems


def check_case(op: str, case, seen: list | None = None) -> tuple[int, list[str]]:
    """check_call on one case of `op` (moe_kernels.testing) with backend="triton"."""
    import moe_kernels
    from moe_kernels import testing
    public = getattr(moe_kernels, op)
    return check_call(f"{op} [{case.name}]", lambda: testing.run(
        op, lambda *a, **k: public(*a, backend="triton", **k), case), seen)


def check_all(select: str | None = None,
              every_case: bool = False) -> tuple[int, int, list[str]]:
    """(cases run, launches compared, mismatches) over each op's smallest non-empty edge
    case, or all its edge cases (each new launch configuration compiles: ~3 min on 2
    cores for all)."""
    from moe_kernels import testing
    from moe_kernels.bench.common import smallest_case
    runs, launches, problems = 0, 0, []
    for op in testing.ops():
        if select and select not in op:
            continue
        for case in testing.cases(op, "edge") if every_case else [smallest_case(op, "cpu")]:
            n, found = check_case(op, case)
            runs, launches, problems = runs + 1, launches + n, problems + found
    return runs, launches, problems


TMA_OPS = ("grouped_gemm_fp8", "grouped_gemm_fp8_masked", "fused_moe_fp8")


def _check_under_table(ops, table, what: str, select: str | None):
    """check_case over the edge cases of each of `ops` with the grouped-GEMM tile table
    `table` in force; each op must launch a TMA descriptor in at least one case, or the
    variant (`what`) went unchecked."""
    from moe_kernels import testing
    from moe_kernels.configs import grouped_gemm as configs
    runs, launches, problems = 0, 0, []
    for op in ops:
        if select and select not in op:
            continue
        seen: list = []
        for case in testing.cases(op, "edge"):
            n, found = configs.with_table(table, check_case, op, case, seen)
            runs, launches, problems = runs + 1, launches + n, problems + found
        if not any(type(a) is tuple and a[0] == "tensordesc" for args in seen for a in args):
            problems.append(f"{op}: no launch through TMA descriptors under the {what} table")
    return runs, launches, problems


def check_tma(select: str | None = None) -> tuple[int, int, list[str]]:
    """The grouped-GEMM ops with every tile config loading through TMA descriptors
    (configs.grouped_gemm.tma_table)."""
    from moe_kernels.configs import grouped_gemm as configs
    return _check_under_table(TMA_OPS, configs.tma_table(torch.device("cpu")), "TMA", select)


def check_ws(select: str | None = None) -> tuple[int, int, list[str]]:
    """The contiguous GEMM and fused_moe_fp8 (segments) on the warp-specialised kernels
    (configs.grouped_gemm.with_ws), the CPU tensors taken for an sm_90 device's, which the
    stand-in driver compiles for."""
    from unittest import mock

    from moe_kernels.configs import grouped_gemm as configs
    from moe_kernels.triton import grouped_gemm as gemm
    table = configs.with_ws(configs.table_in_force(torch.device("cpu")))
    with mock.patch.object(gemm, "_runs_wgmma", lambda device: True):
        return _check_under_table(("grouped_gemm_fp8", "fused_moe_fp8"), table, "ws", select)


def uncached_kernels() -> list[str]:
    """`*_kernel` JIT functions of moe_kernels.triton launched without `@cached_launch`
    (compiled mode only: under the interpreter no kernel is wrapped)."""
    from triton.runtime.jit import JITFunction

    from moe_kernels.triton.launch import package_globals
    return [f"{module.__name__}.{name}" for module, name, obj in package_globals()
            if name.endswith("_kernel") and isinstance(obj, JITFunction)]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--select", help="only ops whose name contains this")
    ap.add_argument("--every-case", action="store_true",
                    help="every edge case, not only each op's smallest")
    args = ap.parse_args(argv)
    import triton
    runs, launches, problems = check_all(args.select, args.every_case)
    for check in (check_tma, check_ws):
        more_runs, more_launches, more_problems = check(args.select)
        runs, launches, problems = (runs + more_runs, launches + more_launches,
                                    problems + more_problems)
    problems += [f"{k}: launched without @cached_launch" for k in uncached_kernels()]
    for p in problems:
        print(p)
    print(f"triton {triton.__version__}: {runs} cases, {launches} launches, "
          f"{len(problems)} problems")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
