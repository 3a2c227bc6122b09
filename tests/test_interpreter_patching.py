"""tests/interpreter_patching.py: the interpreter that skips redundant re-patching runs
kernels exactly as Triton's own does, skips where the launch patched the helper's modules,
and patches where it did not."""

from __future__ import annotations

import importlib
import os
import sys
import textwrap

import pytest
import torch

import interpreter_patching

pytestmark = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1",
                                reason="kernels run compiled here, not interpreted")

# A helper whose module holds `triton.language.core` (which a kernel module holding only
# `tl` leaves unpatched) and calls a builtin through it: a wrongly skipped patching fails.
_CORE_HELPERS = """
import triton
from triton.language import core


@triton.jit
def doubled_if_positive(x):
    return core.where(x > 0, x * 2, x)
"""

# Helpers called in a loop, one calling another, in a module holding only `tl`.
_KERNELS = """
import triton
import triton.language as tl

from {core_module} import doubled_if_positive


@triton.jit
def _plus_one(x):
    return x + 1


@triton.jit
def _step(x, i):
    return _plus_one(x) * tl.where(i % 2 == 0, 1.0, -1.0)


@triton.jit
def steps_kernel(x_ptr, out_ptr, n, STEPS: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    x = tl.load(x_ptr + offs, mask=offs < n, other=0.0)
    for i in range(STEPS):
        x = _step(x, i)
    tl.store(out_ptr + offs, doubled_if_positive(x), mask=offs < n)
"""


@pytest.fixture()
def kernels(tmp_path, request):
    name = f"interp_{request.node.name.replace('[', '_').replace(']', '')}"
    (tmp_path / f"{name}_core.py").write_text(textwrap.dedent(_CORE_HELPERS))
    (tmp_path / f"{name}.py").write_text(_KERNELS.format(core_module=f"{name}_core"))
    sys.path.insert(0, str(tmp_path))
    try:
        yield importlib.import_module(name)
    finally:
        sys.path.remove(str(tmp_path))
        sys.modules.pop(name, None)
        sys.modules.pop(f"{name}_core", None)


def _run(module, x):
    out = torch.full_like(x, float("nan"))
    module.steps_kernel[(3,)](x, out, x.numel(), STEPS=5, BLOCK=16)
    return out


def test_installed_here():
    """conftest installs it for every test process: without it the suite is slower, not
    wrong, so only a Triton that lacks the interpreter's names may leave it out."""
    import triton.runtime.interpreter as interpreter
    if not hasattr(interpreter, "_patch_lang"):
        pytest.skip("this Triton's interpreter has no _patch_lang: it runs as it is")
    assert interpreter_patching.install()
    assert interpreter._patch_lang.__module__ == "interpreter_patching"


def test_same_results_as_triton_and_helpers_skip_their_patching(kernels):
    if not interpreter_patching.install():
        pytest.skip("this Triton's interpreter lacks the names the patching relies on")
    x = torch.randn(40, generator=torch.Generator().manual_seed(0))
    with interpreter_patching.triton_as_it_is():
        want = _run(kernels, x)
    before = interpreter_patching.skipped_patchings()
    got = _run(kernels, x)
    # 3 programs x 5 steps x (_step, and _plus_one inside it) skip. doubled_if_positive's
    # module holds tl.core, which the launch had not patched: the first program's call
    # patches it as Triton does, the other two programs' skip
    assert interpreter_patching.skipped_patchings() - before == 3 * 5 * 2 + 2
    assert torch.equal(got, want)
    expected = x.clone()
    for i in range(5):
        expected = (expected + 1) * (1.0 if i % 2 == 0 else -1.0)
    assert torch.equal(got, torch.where(expected > 0, expected * 2, expected))
