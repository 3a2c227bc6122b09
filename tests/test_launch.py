"""The launch cache (moe_kernels/triton/launch.py): a cached launch is exactly the launch
`JITFunction.run` makes.

- In this process: the cache's key of an argument is at least as fine as Triton's own
  specialisation of it (`native_specialize_impl`, what `JITFunction.run` keys its
  compiled kernels by), so two calls that share a key get the same kernel.
- In a process per triton version, with real compiled kernels and a recording stand-in
  for the C launcher (moe_kernels/bench/launches.py): every op's launches, cached and
  not, hand the launcher the same kernel and arguments; that check fails when the key is
  made too coarse; a launch hook sends launches through `JITFunction.run`.
- On a GPU: outputs through the cache equal those through `JITFunction.run`.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from moe_kernels.triton import launch
from triton_versions import (VERSIONS, declare_per_version, declare_script_per_version,
                             json_result, results_per_version)


def _specialise():
    """Triton's specialisation of one positional argument, as the binder computes it for a
    parameter without annotation (or a skip where triton's NVIDIA backend is missing)."""
    try:
        from triton._C.libtriton import native_specialize_impl
        from triton.backends.nvidia.compiler import CUDABackend
    except Exception as exc:
        pytest.skip(f"triton's native specialisation is unavailable: {exc}")
    return lambda a: native_specialize_impl(CUDABackend, a, False, True, True)


def _assert_key_is_finer(values):
    """Values with one key have one specialisation."""
    specialise = _specialise()
    seen = {}
    for v in values:
        key, spec = launch._args_key((v,)), specialise(v)
        assert seen.setdefault(key, (spec, v))[0] == spec, \
            f"{v!r} and {seen[key][1]!r} share a key but Triton specialises them apart"
    return seen


# ints at every boundary Triton's specialisation has: 1 (compiled in as a constant), 0 and
# the multiples of 16, the int32 / int64 / uint64 ranges, negatives
_BOUNDARY_INTS = sorted({b + d for b in (0, 1, 16, -16, 2**31, -2**31, 2**32, 2**63, -2**63,
                                         2**64 - 16) for d in (-17, -16, -2, -1, 0, 1, 2, 15, 16)
                         if -2**63 <= b + d < 2**64})


def test_int_keys_separate_every_specialisation_triton_makes():
    seen = _assert_key_is_finer(_BOUNDARY_INTS)
    # the ints above reach each of Triton's int specialisations, so the check is not vacuous
    specs = {spec for spec, _ in seen.values()}
    assert {("constexpr", 1), ("i32", "D"), ("i32", ""), ("i64", "D"), ("i64", ""),
            ("u64", "D"), ("u64", "")} <= specs, specs


@given(st.lists(st.integers(min_value=-2**63, max_value=2**64 - 1), min_size=1, max_size=50))
def test_random_int_keys_are_finer_than_tritons(values):
    _assert_key_is_finer(values + _BOUNDARY_INTS)


_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.int32, torch.int64,
           torch.uint8, torch.float8_e4m3fn)


def test_tensor_keys_separate_dtype_and_16_byte_alignment():
    """Views at every byte offset 0-32 of a buffer, in every dtype the kernels take: aligned
    and unaligned ones never share a key, nor do two dtypes."""
    buf = torch.empty(256, dtype=torch.uint8)
    views = [buf[off:off + 64].view(dt) for dt in _DTYPES for off in range(0, 33)
             if off % dt.itemsize == 0]
    params = [torch.nn.Parameter(buf[off:off + 64].view(torch.float32), requires_grad=False)
              for off in (0, 4, 16)]               # a tensor subclass: keyed as its data
    seen = _assert_key_is_finer(views + params + [1.5, -0.0, 1e300, float("nan"), True,
                                                  False, None] + _BOUNDARY_INTS[:5])
    assert {spec[1] for spec, _ in seen.values() if spec[0].startswith("*")} == {"D", ""}


def test_tensor_descriptor_keys_separate_dtype_block_shape_and_padding():
    """TMA descriptors (the grouped GEMMs' TMA tiles): Triton specialises them on dtype
    and block shape; descriptors of other shapes, strides and bases share a kernel."""
    import moe_kernels.triton.grouped_gemm  # noqa: F401  (binds launch's triton names)
    from triton.tools.tensor_descriptor import TensorDescriptor
    descs = []
    for dt in (torch.float8_e4m3fn, torch.uint8, torch.bfloat16, torch.float32):
        for rows, cols in ((64, 256), (48, 512)):
            t = torch.empty(rows, cols, dtype=dt)
            for block in ((16, 128), (64, 128), (64, 64)):
                descs.append(TensorDescriptor.from_tensor(t, list(block)))
                if dt.is_floating_point:
                    descs.append(TensorDescriptor.from_tensor(t, list(block), padding="nan"))
    seen = _assert_key_is_finer(descs)
    assert len({spec for spec, _ in seen.values()}) == 4 * 3


def test_arguments_without_a_derived_key_go_through_jit_run():
    """Types whose specialisation the key does not model raise _Unkeyed, which sends the
    call through JITFunction.run (launch.CachedLaunch.launch)."""
    import numpy as np
    for odd in (np.int64(16), (1, 2), torch.float32, "text"):
        with pytest.raises(launch._Unkeyed):
            launch._args_key((odd,))


def _counts(out: str) -> tuple[int, int, int]:
    """(cases, launches, problems: mismatches and unwrapped kernels) from the check's last
    line."""
    words = out.strip().splitlines()[-1].split(": ", 1)[1].replace(",", "").split()
    return int(words[0]), int(words[2]), int(words[4])


declare_per_version("launch-checks",
                    lambda path: [sys.executable, "-m", "moe_kernels.bench.launches"],
                    module=__name__, fixture="launch_checks")


@pytest.fixture(scope="module")
def launch_checks():
    return results_per_version("launch-checks")


@pytest.mark.parametrize("triton_path", VERSIONS)
def test_cached_launches_are_jit_runs_launches(launch_checks, triton_path):
    """Each op's smallest edge case (every kernel the ops launch at small sizes)."""
    rc, out, err = launch_checks[triton_path]
    assert rc == 0, (out + err)[-4000:]
    cases, launches, problems = _counts(out)
    assert problems == 0 and cases >= 14 and launches >= 20, out[-2000:]


if not torch.cuda.is_available():   # the test below skips on a GPU machine
    declare_per_version("launch-checks-every-case",
                        lambda path: [sys.executable, "-m", "moe_kernels.bench.launches",
                                      "--every-case"],
                        module=__name__, fixture="every_case_checks")


@pytest.fixture(scope="module")
def every_case_checks():
    return results_per_version("launch-checks-every-case")


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.is_available(), reason=(
    "with a GPU the CUDA tests launch through the cache for real, and "
    "test_cuda_outputs_with_the_cache_equal_jit_runs compares; the slow stage of "
    "gpu_check.sh has no 3 min for these compiles"))
@pytest.mark.parametrize("triton_path", VERSIONS)
def test_cached_launches_are_jit_runs_launches_on_every_edge_case(every_case_checks,
                                                                  triton_path):
    """Every edge case of every op in one process (~3 min of compiles per triton)."""
    rc, out, err = every_case_checks[triton_path]
    assert rc == 0, (out + err)[-4000:]
    cases, launches, problems = _counts(out)
    assert problems == 0 and cases >= 100 and launches >= 100, out[-2000:]


# Two probes in one process per triton (one compile of the gating kernel). A launch hook
# set (a profiler): every launch goes through JITFunction.run, which calls the hook. Then
# a key that ignores alignment: a misaligned tensor gets the kernel compiled for an
# aligned one, which the check must report.
_PROBES = textwrap.dedent('''
    import json
    import torch
    from triton import knobs
    from moe_kernels.bench import launches
    from moe_kernels.triton import launch
    import moe_kernels

    buf = torch.randn(2 * 64 + 1)
    topk = lambda x: moe_kernels.grouped_topk(x, 2, scoring_func="softmax", backend="triton")
    aligned = lambda: topk(buf[:128].view(2, 64))
    misaligned = lambda: topk(buf[1:129].view(2, 64))     # 4 bytes past a 16-byte boundary
    found = {}

    seen = []
    hook = lambda metadata: seen.append(metadata)
    launches.check_call("warm", aligned)            # the entry exists before the hook
    knobs.runtime.launch_enter_hook.add(hook)
    runs = launches._launches(aligned, cached=True)
    knobs.runtime.launch_enter_hook.remove(hook)
    found["hooked"] = [through_run for *_, through_run in runs]
    found["hook_calls"] = len(seen)

    fine = launch._args_key
    launch._args_key = lambda args: fine(tuple(   # every tensor keyed as if aligned
        torch.empty(0, dtype=a.dtype) if isinstance(a, torch.Tensor) else a for a in args))
    found["aligned"] = launches.check_call("aligned", aligned)[1]
    found["misaligned"] = launches.check_call("misaligned", misaligned)[1]
    print(json.dumps(found))
''')


declare_script_per_version("launch-probes", _PROBES, module=__name__, fixture="probes")


@pytest.fixture(scope="module")
def probes():
    return results_per_version("launch-probes")


@pytest.mark.parametrize("triton_path", VERSIONS)
def test_a_launch_hook_sends_launches_through_jit_run(probes, triton_path):
    """A profiler's hook must see every launch: the cache steps aside while one is set."""
    found = json_result(probes[triton_path])
    assert found["hooked"] == [True] and found["hook_calls"] == 1, found


@pytest.mark.parametrize("triton_path", VERSIONS)
def test_the_check_catches_a_key_too_coarse(probes, triton_path):
    found = json_result(probes[triton_path])
    assert found["aligned"] == [], found
    assert any("first cached call" in p for p in found["misaligned"]), found


def _all_cached_launches():
    return [obj for _, _, obj in launch.package_globals()
            if isinstance(obj, launch.CachedLaunch)]


_SAME_SIZE_INT = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(_SAME_SIZE_INT[t.element_size()]) if t.dtype.is_floating_point else t


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_outputs_with_the_cache_equal_jit_runs():
    """On the GPU: each op's smallest edge case (the grouped GEMMs' also with TMA tiles),
    run through JITFunction.run and then twice through the cache (miss, hit), gives
    bit-identical outputs (every op is deterministic), and the cache was used."""
    import moe_kernels
    from moe_kernels import testing
    from moe_kernels.bench.common import smallest_case, tensors_in
    from moe_kernels.bench.launches import TMA_OPS
    from moe_kernels.configs import grouped_gemm as configs
    for cached in _all_cached_launches():
        cached._cache.clear()
    tma = configs.tma_table(torch.device("cuda"))
    # the grouped GEMMs also with TMA descriptors (arguments the C launcher expands), on
    # every edge case: the smallest ones have rows TMA cannot describe (K % 16 != 0)
    runs = [(op, None, smallest_case(op, "cuda")) for op in testing.ops()]
    runs += [(op, tma, case) for op in TMA_OPS for case in testing.cases(op, "edge", device="cuda")]
    for op, table, case in runs:
        public = getattr(moe_kernels, op)
        call = lambda: tensors_in(testing.run(
            op, lambda *a, **k: public(*a, backend="triton", **k), case))
        results = []
        for enabled in (False, True, True):
            with launch.cache_enabled(enabled):
                results.append(call() if table is None else configs.with_table(table, call))
        want = results[0]
        assert want, op
        for got in results[1:]:
            assert len(got) == len(want), op
            for g, w in zip(got, want):
                assert g.dtype == w.dtype and g.shape == w.shape, op
                assert torch.equal(_bits(g), _bits(w)), op
    assert sum(len(c._cache) for c in _all_cached_launches()) >= 14


@pytest.mark.parametrize("mode,enabled,warned", [("jit", False, False), ("JIT", True, True)])
def test_launch_mode_from_the_environment(mode, enabled, warned):
    """MOE_KERNELS_TRITON_LAUNCH: "jit" turns the cache off; a value that is neither (a
    typo) keeps it, with a RuntimeWarning naming the value."""
    run = subprocess.run([sys.executable, "-c", "from moe_kernels.triton import launch; "
                          "print(launch._ENABLED)"], capture_output=True, text=True,
                         env={**os.environ, "MOE_KERNELS_TRITON_LAUNCH": mode}, timeout=120)
    assert run.returncode == 0, run.stderr
    assert run.stdout.split()[-1] == str(enabled)
    assert (f"MOE_KERNELS_TRITON_LAUNCH={mode!r} is neither" in run.stderr) == warned
