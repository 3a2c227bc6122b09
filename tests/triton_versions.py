"""Running a script under each triton version the project supports, one process each, no
interpreter: the one installed here, and triton 3.6 (the GPU machine's) from
`.venv/triton-3.6`, which `make setup` installs (or the directories in
MOE_KERNELS_SM90_TRITON, colon-separated). Used by the checks that compile real kernels
without a GPU (tests/test_sm90_compile.py, tests/test_launch.py). They run as
session jobs (tests/session_jobs.py), beside the in-process tests."""

from __future__ import annotations

import json
import os
import pathlib
import sys

import pytest

import session_jobs

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
_AVAILABLE = [p.values[0] for p in VERSIONS if not p.marks]


def version_id(path: str | None) -> str:
    return pathlib.Path(path).name if path else "installed"


def declare_per_version(name: str, argv_of, *, module: str, fixture: str) -> None:
    """A session job per available triton running argv_of(path), read by `fixture` of
    `module` with results_per_version(name)."""
    if _nvidia_backend_reason() is None:
        for path in _AVAILABLE:
            session_jobs.declare(f"{name}-{version_id(path)}", argv_of(path), env=_env(path),
                                 timeout_s=TIMEOUT_S, module=module, fixture=fixture)


def declare_script_per_version(name: str, text: str, *, module: str, fixture: str) -> None:
    """declare_per_version of the Python script `text`."""
    script = session_jobs.scratch(f"{name}.py")
    script.write_text(text)
    declare_per_version(name, lambda path: [sys.executable, str(script)], module=module,
                        fixture=fixture)


def results_per_version(name: str) -> dict:
    """{path: (returncode, stdout, stderr)} of the jobs declare_per_version(name) made.
    Skips without triton's NVIDIA backend."""
    reason = _nvidia_backend_reason()
    if reason:
        pytest.skip(reason)
    keys = {path: f"{name}-{version_id(path)}" for path in _AVAILABLE}
    for key in keys.values():   # all at once: a run of one module waits for one compile
        session_jobs.start(key)
    return {path: session_jobs.result(key) for path, key in keys.items()}


def json_result(result) -> dict:
    """The JSON object a script printed last, from one results_per_version result (the run
    must have succeeded)."""
    rc, out, err = result
    assert rc == 0, err[-4000:]
    return json.loads(out.strip().splitlines()[-1])
