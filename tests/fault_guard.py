"""Guards of a test run on a GPU against a kernel breaking the process (the hooks are
imported into conftest.py; benchmarks/gpu_check.sh sets MOE_KERNELS_TEST_TIMEOUT_S).

A kernel's first run on a device can do what no assertion reports and no `except` recovers
from, and without these guards one such test costs the rest of the process's tests:
- it hangs (a barrier that never completes), which nothing in Python can interrupt: past
  MOE_KERNELS_TEST_TIMEOUT_S seconds the stacks are written and the process exits
  (faulthandler). Under pytest-xdist the controller reports the test as crashed and a
  fresh worker runs the tests left;
- it leaves the CUDA context unusable (an illegal address, a device-side assert), after
  which every later CUDA call of the process fails with its error: after a failed test
  the context is checked, and where it is lost the xdist worker exits in the test's
  teardown (its failure already reported; a fresh worker goes on), or without xdist the
  session stops (pytest's "interrupted", the failures' summary printed), naming the test.
What a guard writes goes to the file MOE_KERNELS_FAULT_LOG names (appended): pytest
captures stderr while a test runs, and a process that exits takes the capture with it.
"""

from __future__ import annotations

import faulthandler
import os
import sys

import pytest

TIMEOUT_ENV = "MOE_KERNELS_TEST_TIMEOUT_S"
LOG_ENV = "MOE_KERNELS_FAULT_LOG"
LOST = pytest.StashKey[bool]()
CONTEXT_LOST_STATUS = 3     # an xdist worker's exit status
_log = []


def _fault_log():
    """The file a guard writes to, opened once (faulthandler keeps writing to it); without
    MOE_KERNELS_FAULT_LOG the process's own stderr (a capture may hide it)."""
    if not _log:
        path = os.environ.get(LOG_ENV)
        _log.append(open(path, "a") if path else sys.__stderr__)
    return _log[0]


def _timeout_s() -> float | None:
    value = os.environ.get(TIMEOUT_ENV)
    return float(value) if value else None


def context_lost() -> bool:
    """Whether CUDA is initialised here and can no longer run anything."""
    torch = sys.modules.get("torch")
    if torch is None or not torch.cuda.is_initialized():
        return False
    from moe_kernels.bench.runs import context_lost as device_context_lost
    return device_context_lost("cuda")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
    timeout = _timeout_s()
    if timeout:
        faulthandler.dump_traceback_later(timeout, exit=True, file=_fault_log())
    try:
        yield
    finally:
        if timeout:
            faulthandler.cancel_dump_traceback_later()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if report.when in ("setup", "call") and report.failed and context_lost():
        item.stash[LOST] = True


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_teardown(item, nextitem):
    if not item.stash.get(LOST, False):
        return
    message = f"the CUDA context is unusable after {item.nodeid}"
    log = _fault_log()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        log.write(f"fault_guard: {message}: this worker exits, a fresh one runs the tests "
                  f"left\n")
        log.flush()
        os._exit(CONTEXT_LOST_STATUS)
    message += ": the session stops (each later CUDA test would fail on it)"
    log.write(f"fault_guard: {message}\n")
    log.flush()
    pytest.exit(message)
