"""Test set-up shared by every test module.

Without a GPU, Triton kernels run under the interpreter: TRITON_INTERPRET must be set
before triton is first imported, which is why it is set here, at collection start.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import interpreter_patching  # noqa: E402
interpreter_patching.install()    # a third off the interpreted GEMMs' time, same results

import pytest  # noqa: E402
from hypothesis import HealthCheck, settings  # noqa: E402

import session_jobs  # noqa: E402
# a kernel that hangs or breaks the CUDA context costs its own test only (tests/fault_guard.py)
from fault_guard import (pytest_runtest_makereport, pytest_runtest_protocol,  # noqa: E402,F401
                         pytest_runtest_teardown)
import work_sharing  # noqa: E402

# Interpreter runs are slow and vary in time: no per-example deadline.
settings.register_profile("default", deadline=None,
                          suppress_health_check=[HealthCheck.too_slow])
settings.load_profile("default")


class CppCheckReached(BaseException):
    """A public function called a kernel (C++ entry point or Triton launcher) with
    arguments the kernel's own checks refuse: the Python checks missed a precondition, and
    the call would have thrown in C++ (which kills the process on one platform:
    csrc/checks.h) or launched out of bounds. A BaseException, so that no
    `pytest.raises(ValueError)` around the call can take it for the expected error."""


def _checked_first(name: str, backend: str, entry):
    from moe_kernels import _library
    check = getattr(_library._C, f"{name}_{backend}_check")

    def call(*args):
        kind, message = check(*args)
        if kind:
            raise CppCheckReached(f"{name}_{backend} reached with arguments its check refuses: "
                                  f"{message}")
        return entry(*args)

    return call


def _triton_checked_first(op, launcher):
    def call(*args):
        try:
            op.check_triton_args(*args)
        except (ValueError, TypeError) as exc:
            raise CppCheckReached(f"{op.name}_triton reached with arguments its checks "
                                  f"refuse: {exc}") from None
        return launcher(*args)

    call.__wrapped__ = launcher
    return call


def pytest_configure(config):
    # several processes sharing the tests (tests/run_parallel.py, `make test`)
    config.pluginmanager.register(work_sharing, "moe_kernels_work_sharing")


def pytest_sessionstart(session):
    """Every kernel the eager path calls (`Op._eager`) runs its own checks first, for the
    whole session: the C++ entry points their C++ check, the Triton launchers the Triton
    variant's checks. Any test input that passes the public checks but not the kernel's
    fails its test (CppCheckReached)."""
    from moe_kernels import _library
    for name, op in _library.OPS.items():
        for backend in op.entries:
            op._eager[backend] = _checked_first(name, backend, op._bare(backend))
        if op.triton_module is not None and _library.backend_unavailable_reason(
                "triton", torch.device("cuda" if torch.cuda.is_available() else "cpu")) is None:
            op._eager["triton"] = _triton_checked_first(op, op._bare("triton"))


_LANE = pytest.StashKey[bool]()


@pytest.hookimpl(trylast=True)   # after -m / -k deselection
def pytest_collection_modifyitems(session, config, items):
    """The jobs that the selected tests read (tests/session_jobs.py) start now, one at a
    time beside the other tests, and each module's readers run once its jobs have ended
    (pytest_runtestloop). Not in an xdist worker: each one collects every test but runs
    few, so there a job starts when a test reads it. In a shared run
    (tests/work_sharing.py) the readers are process 0's."""
    work_sharing.select(config, items)
    items[:] = sorted(items, key=session_jobs.uses_jobs)
    if not config.option.collectonly and not hasattr(config, "workerinput"):
        config.stash[_LANE] = session_jobs.start_lane(items)


@pytest.hookimpl(tryfirst=True)
def pytest_runtestloop(session):
    """pytest's loop, over session_jobs.run_order: the next test is chosen as the one
    before it starts. Without a lane of jobs, pytest's own loop."""
    if not session.config.stash.get(_LANE, False) or session.testsfailed:
        return None
    order = session_jobs.run_order(session.items)
    item = next(order, None)
    while item is not None:
        nextitem = next(order, None)
        item.config.hook.pytest_runtest_protocol(item=item, nextitem=nextitem)
        if session.shouldfail:
            raise session.Failed(session.shouldfail)
        if session.shouldstop:
            raise session.Interrupted(session.shouldstop)
        item = nextitem
    return True


# Measured on the 2-core VM: with one core busy beside it (a session job, another test
# process), a test using torch's two intra-op threads ran 6x slower (3.7 -> 21.8 s), each
# parallel region waiting on a descheduled thread; with one thread, 4.9 s. So each test runs
# with the threads the other test processes and the running session jobs leave it.
_THREADS = torch.get_num_threads()


def pytest_runtest_setup(item):
    processes = work_sharing.process()[1]
    torch.set_num_threads(max(1, _THREADS // processes - session_jobs.running()))


def pytest_sessionfinish(session, exitstatus):
    session_jobs.stop_all()
