"""The build: it degrades to CPU kernels with a reason instead of failing, and it is
incremental (nothing rebuilt when csrc/ did not change)."""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _setup_module():
    spec = importlib.util.spec_from_file_location("moe_kernels_setup", ROOT / "setup.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)      # not __main__: defines, does not build
    return module


def _toolkit(tmp_path, headers):
    inc = tmp_path / "cuda" / "include"
    inc.mkdir(parents=True)
    for h in headers:
        (inc / h).write_text("")
    return str(tmp_path / "cuda")


def test_cuda_toolkit_without_cusparse_builds_cpu_only_with_the_reason(tmp_path):
    setup = _setup_module()
    home = _toolkit(tmp_path, ["cuda_runtime_api.h", "cublas_v2.h", "cublasLt.h"])
    reason = setup.cuda_build_reason(environ={}, torch_cuda="12.8", cuda_home=home, nvcc=None)
    assert reason is not None and "cusparse.h" in reason and home in reason


def test_complete_toolkit_builds_cuda(tmp_path):
    setup = _setup_module()
    home = _toolkit(tmp_path, setup.TORCH_CUDA_HEADERS)
    assert setup.cuda_build_reason(environ={}, torch_cuda="12.8", cuda_home=home) is None
    assert "MOE_KERNELS_SKIP_CUDA" in setup.cuda_build_reason(
        environ={"MOE_KERNELS_SKIP_CUDA": "1"}, torch_cuda="12.8", cuda_home=home)
    assert setup.cuda_build_reason(environ={}, torch_cuda=None, cuda_home=home) == \
        "torch has no CUDA"


@pytest.mark.skipif(shutil.which("make") is None, reason="make is not installed")
@pytest.mark.skipif(not (ROOT / "build" / ".ext-built").exists(),
                    reason="the extension was not built by `make build` here")
def test_make_build_is_incremental():
    """After a build, `make build` has nothing to compile (make -n prints no pip install)."""
    out = subprocess.run(["make", "-n", "build"], cwd=ROOT, capture_output=True, text=True,
                         env={**os.environ, "MAKEFLAGS": ""}, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "--no-build-isolation" not in out.stdout, (
        "make build would rebuild the extension: csrc/ changed since the last build, or "
        "the build is not incremental\n" + out.stdout)


def _carried_build_module():
    spec = importlib.util.spec_from_file_location("carried_build",
                                                  ROOT / "benchmarks" / "carried_build.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_carried_build_stamp_follows_every_build_input(tmp_path):
    """A build carried to the GPU machine stands in for one there only while no file the
    build reads has changed: the digest moves with any csrc/ file and setup.py."""
    cb = _carried_build_module()
    (tmp_path / "csrc" / "cpu").mkdir(parents=True)
    (tmp_path / "csrc" / "cpu" / "a.cpp").write_text("int a;")
    (tmp_path / "setup.py").write_text("setup()")
    (tmp_path / "pyproject.toml").write_text("")
    base = cb.source_digest(tmp_path)
    assert cb.source_digest(tmp_path) == base
    (tmp_path / "csrc" / "cpu" / "a.cpp").write_text("int b;")
    changed_source = cb.source_digest(tmp_path)
    (tmp_path / "setup.py").write_text("setup(x=1)")
    assert len({base, changed_source, cb.source_digest(tmp_path)}) == 3
    (tmp_path / "csrc" / "cuda").mkdir()
    (tmp_path / "csrc" / "cuda" / "k.cu").write_text("")
    assert cb.source_digest(tmp_path) not in {base, changed_source}
