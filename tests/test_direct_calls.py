"""Direct torch.ops calls of every op with a C++ or Triton kernel, with each argument mutated
in every way its schema type allows (tests/direct_calls_worker.py): the C++ check reports
every argument the kernel cannot take, the registered op raises that report as a Python
error before any C++ code runs, and a kernel whose check passed never throws. That contract
(csrc/checks.h) keeps C++ exceptions, which killed the process on one platform, off every
path a user reaches. The Triton variants are held to the same checks (plus one device per
call and what only Triton cannot take), so that no argument makes a launch read or write
out of bounds (which kills the process too: a segfault under the interpreter, an illegal
address on the GPU)."""

import os
import pathlib
import subprocess
import sys

import pytest
import torch

import session_jobs
from moe_kernels import _library

WORKER = pathlib.Path(__file__).with_name("direct_calls_worker.py")
KERNELS = sorted((name, backend) for name, op in _library.OPS.items()
                 for backend in (*op.native, *(("triton",) if op.triton_module else ())))

pytestmark = pytest.mark.skipif(not _library.extension_loaded(),
                                reason="moe_kernels._C is not built")


def _run_worker(backends: str):
    """The worker's lines, one process for every op (a crash ends it: the last `case`
    line names the case that crashed)."""
    env = dict(os.environ, MOE_KERNELS_DIRECT_CALLS=backends)
    r = subprocess.run([sys.executable, str(WORKER)], capture_output=True, text=True,
                       timeout=1200, env=env)
    return r.returncode, r.stdout.splitlines(), r.stderr


if _library.extension_loaded():
    session_jobs.declare("direct-calls", [sys.executable, str(WORKER)], timeout_s=1200,
                         module=__name__, fixture="worker_output")


@pytest.fixture(scope="module")
def worker_output():
    rc, out, err = session_jobs.result("direct-calls")
    return rc, out.splitlines(), err


def test_worker_finishes(worker_output):
    rc, lines, err = worker_output
    cases = [line for line in lines if line.startswith("case ")]
    assert rc == 0 and lines and lines[-1] == "done", (
        f"the worker died (rc {rc}) at: {cases[-1] if cases else None}\n{err[-3000:]}")


def _runs_here(backend: str) -> bool:
    if backend == "triton":   # under the interpreter; on the GPU: the slow test below
        return _library.backend_unavailable_reason("triton", torch.device("cpu")) is None
    return _library.backend_unavailable_reason(backend, torch.device(backend)) is None \
        and (backend != "cuda" or torch.cuda.is_available())


def _lines_of(lines, kind, name, backend):
    """The worker's `kind` lines ("case" or "FAIL") of op `name` on `backend`, any device:
    `<kind> <backend>:<device> <name> [<sample>] ...`."""
    out = []
    for line in lines:
        parts = line.split(" ", 3)
        if len(parts) > 2 and parts[0] == kind and parts[1].split(":")[0] == backend \
                and parts[2] == name:
            out.append(line)
    return out


@pytest.mark.parametrize("name,backend", KERNELS)
def test_direct_calls_keep_the_check_contract(worker_output, name, backend):
    if not _runs_here(backend):
        pytest.skip(f"the {backend} kernels cannot run here")
    _, lines, _ = worker_output
    ran = _lines_of(lines, "case", name, backend)
    failures = _lines_of(lines, "FAIL", name, backend)
    # every op has samples: an op added without them would pass vacuously
    assert len(ran) > 20, f"{name}: {len(ran)} cases ran"
    assert not failures, "\n".join(failures[:20])


@pytest.mark.slow
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_triton_direct_calls_on_the_gpu():
    """The Triton variants' direct calls on CUDA tensors: every case compiles its own
    specialization (minutes), hence the slow marker; an illegal address ends the worker."""
    rc, lines, err = _run_worker("triton:cuda")
    cases = [line for line in lines if line.startswith("case ")]
    failures = [line for line in lines if line.startswith("FAIL ")]
    assert rc == 0 and lines and lines[-1] == "done", (
        f"the worker died (rc {rc}) at: {cases[-1] if cases else None}\n{err[-3000:]}")
    assert len(cases) > 1000 and not failures, "\n".join(failures[:20])
