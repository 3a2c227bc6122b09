"""Several pytest processes sharing one list of tests (`make test`, tests/run_parallel.py).

Every process collects the same tests in the same order and walks them; before running a
test it claims it by creating a file named after it in the shared directory
MOE_KERNELS_TEST_CLAIMS (O_EXCL: exactly one process gets each), and passes over a test
another process claimed. So the processes stay balanced whatever each test costs, which a
fixed split cannot do: a split by a hash of the node id left one of two processes 77 s
behind the other (558 against 481 s), a handful of interpreter and torch.compile tests
weighing 10-25 s each.

The session jobs (tests/session_jobs.py) and the tests that read them belong to process 0
alone: its lane runs the jobs once, beside everyone's tests.

Measured on the 2-core VM (`make test`'s selection): in a fresh clone, whose inductor
cache is cold (its compile tests alone ~145 s), two processes 648-657 s against 663 s for
one; with the cache warm, one process 669-701 s, two 518-561 s. Process 0 runs the job
readers: run last, alone, they left it 75-108 s behind the other process (706 against
598 s); run first, waiting on the lane, both ended together but later (617 s against
518-561); run between the other tests once their jobs have ended
(session_jobs.run_order), 672 and 662 s (the run before it: 706 and 598). Two processes
gain where they once lost (10m31s against 10m57s, each test in one of two by a hash)
because each test now runs with the threads left to it (conftest.py), no longer two
intra-op threads per process on two cores.
"""

from __future__ import annotations

import hashlib
import os
import pathlib

import pytest

CLAIMS_ENV = "MOE_KERNELS_TEST_CLAIMS"
PROCESS_ENV = "MOE_KERNELS_TEST_PROCESS"   # "k/n": this is process k of n


def process() -> tuple[int, int]:
    """(k, n): this process is k of n (0 of 1 outside a shared run)."""
    k, n = os.environ.get(PROCESS_ENV, "0/1").split("/")
    return int(k), int(n)


def _claims() -> pathlib.Path | None:
    path = os.environ.get(CLAIMS_ENV)
    return pathlib.Path(path) if path else None


def select(config, items) -> None:
    """Leaves the tests that read session jobs to process 0 (deselected elsewhere)."""
    if process()[0] == 0:
        return
    import session_jobs   # here, not above: the runner imports this module's names alone
    others = [item for item in items if session_jobs.uses_jobs(item)]
    if others:
        config.hook.pytest_deselected(items=others)
        items[:] = [item for item in items if not session_jobs.uses_jobs(item)]


def claim(nodeid: str) -> bool:
    """Whether this process runs `nodeid`: it is the first to claim it (always true outside
    a shared run)."""
    claims = _claims()
    if claims is None:
        return True
    name = hashlib.sha1(nodeid.encode()).hexdigest()
    try:
        os.close(os.open(claims / name, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
    except FileExistsError:
        return False
    return True


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_protocol(item, nextitem):
    """A test another process claimed is passed over: not run, not reported. The fixtures
    the test before it kept for it are torn down as far as the next test needs, as pytest
    does after a test it ran (_setupstate: pytest >= 7)."""
    if claim(item.nodeid):
        return None
    item.session._setupstate.teardown_exact(nextitem)
    return True
