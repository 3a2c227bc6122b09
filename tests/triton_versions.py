"""Running a script under each triton version the project supports, one process each, no
interpreter: the one installed here, and triton 3.6 (the GPU machine's) from
`.venv/triton-3.6`, which `make setup` installs (or the directories in
MOE_KERNELS_SM90_TRITON, colon-separated). Used by the checks that compile real kernels
without a GPU (tests/test_sm90_compile.py, tests/test_launch.py)."""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
EXTRA_TRITON = os.environ.get("MOE_KERNELS_SM90_TRITON", str(ROOT / ".venv" / "triton-3.6"))
TIMEOUT_S = 600


def _nvidia_backend_reason() -> str | None:
    try:
        import triton.backends.nvidia.compiler  # noqa: F401
    except Exception as exc:  # triton without its NVIDIA backend cannot compile for sm_90a
        return f"triton's NVIDIA backend is unavailable: {exc}"
    return None


def _env(extra_path: str | None) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (extra_path, str(ROOT),
                                                     env.get("PYTHONPATH")) if p)
    return env


def _versions() -> list:
    params = [pytest.param(None, id="installed-triton")]
    for path in EXTRA_TRITON.split(os.pathsep):
        marks = [] if (pathlib.Path(path) / "triton").is_dir() else [pytest.mark.skip(
            reason=f"no triton at {path}: `make setup` installs triton 3.6 there")]
        params.append(pytest.param(path, id=f"triton-from-{pathlib.Path(path).name}", marks=marks))
    return params


VERSIONS = _versions()


def run_per_version(argv_of) -> dict:
    """Runs argv_of(path) under every available triton at once, one process each (one per
    core); {path: (returncode, stdout, stderr)}. Skips without triton's NVIDIA backend."""
    reason = _nvidia_backend_reason()
    if reason:
        pytest.skip(reason)
    procs = {p.values[0]: subprocess.Popen(argv_of(p.values[0]), env=_env(p.values[0]),
                                           stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                           text=True)
             for p in VERSIONS if not p.marks}
    results = {}
    for path, proc in procs.items():
        out, err = proc.communicate(timeout=TIMEOUT_S)
        results[path] = (proc.returncode, out, err)
    return results


def run_script_per_version(directory: pathlib.Path, name: str, text: str) -> dict:
    """run_per_version of the Python script `text`, written to directory / name."""
    script = directory / name
    script.write_text(text)
    return run_per_version(lambda path: [sys.executable, str(script)])


def json_result(result) -> dict:
    """The JSON object a script printed last, from one run_per_version result (the run
    must have succeeded)."""
    rc, out, err = result
    assert rc == 0, err[-4000:]
    return json.loads(out.strip().splitlines()[-1])
