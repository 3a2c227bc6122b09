"""Subprocess checks that run beside the in-process tests.

A few checks are one long subprocess each: the sm_90a compile gate under each triton
(about 2 min of compiles apiece), the direct-call worker (about 70 s), the launch checks.
Run from their fixtures they kept one of CI's two cores idle for all that time, while the
in-process tests, which use one core, waited. Instead, a test module declares each such
subprocess as a job at import, tied to the fixture that reads it; once collection has
picked the tests (conftest.py), the jobs those tests need queue on one background lane,
and a module's tests that read them run once its jobs have ended (run_order), or last.
A fixture whose job has not started yet starts it itself, so a job is never waited for
behind another.

Under `make test` the tests are shared by several pytest processes (tests/work_sharing.py);
the lane and the tests that read its jobs are process 0's alone, so each job runs once.
"""

from __future__ import annotations

import atexit
import collections
import dataclasses
import pathlib
import shutil
import subprocess
import tempfile
import threading
import time

_DIR = pathlib.Path(tempfile.mkdtemp(prefix="moe_kernels_jobs_"))
atexit.register(shutil.rmtree, _DIR, ignore_errors=True)


def scratch(name: str) -> pathlib.Path:
    """A path in the session's scratch directory, for a job's script or output files."""
    return _DIR / name


@dataclasses.dataclass
class _Job:
    argv: list
    env: dict | None
    timeout_s: float
    module: str
    fixture: str
    proc: subprocess.Popen | None = None
    started: float = 0.0

    def wait(self) -> int:
        """The return code, waiting at most what is left of the job's time limit; a job
        past it is killed and raises subprocess.TimeoutExpired."""
        left = self.timeout_s - (time.monotonic() - self.started)
        try:
            return self.proc.wait(timeout=max(left, 0.01))
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise


_JOBS: dict[str, _Job] = {}
_LOCK = threading.Lock()
_STOPPED = threading.Event()


def declare(key: str, argv: list, *, module: str, fixture: str, env: dict | None = None,
            timeout_s: float = 600) -> None:
    """A job the fixture `fixture` of test module `module` (its __name__) reads with
    result(key); it starts only if a selected test uses that fixture."""
    _JOBS[key] = _Job(list(argv), env, timeout_s, module, fixture)


def start(key: str) -> _Job:
    """Job `key`, started now unless it has started (by the lane, or by a reader about to
    wait on several)."""
    with _LOCK:
        job = _JOBS[key]
        if job.proc is None:
            if _STOPPED.is_set():
                raise RuntimeError(f"job {key} asked for after the session ended")
            with open(_DIR / f"{key}.out", "w") as out, open(_DIR / f"{key}.err", "w") as err:
                job.proc = subprocess.Popen(job.argv, env=job.env, stdout=out, stderr=err,
                                            stdin=subprocess.DEVNULL)
                job.started = time.monotonic()
        return job


def result(key: str) -> tuple[int, str, str]:
    """(returncode, stdout, stderr) of job `key`, started now if the lane has not got to it;
    a job past its time limit is killed and raises subprocess.TimeoutExpired."""
    rc = start(key).wait()
    return rc, (_DIR / f"{key}.out").read_text(), (_DIR / f"{key}.err").read_text()


def uses_jobs(item) -> bool:
    """Whether a collected test reads a job through one of its fixtures."""
    return bool(_keys_of(item))


def _keys_of(item) -> list:
    module = getattr(getattr(item, "module", None), "__name__", None)
    names = set(getattr(item, "fixturenames", ()))
    return [k for k, job in _JOBS.items() if job.module == module and job.fixture in names]


def start_lane(items) -> bool:
    """Runs the jobs that `items` (the selected tests, readers last) read, one at a time in
    the order they are first read, on a daemon thread; whether there are any."""
    order = list(dict.fromkeys(k for item in items for k in _keys_of(item)))

    def lane():
        for key in order:
            if _STOPPED.is_set():
                return
            try:
                start(key).wait()
            except (subprocess.TimeoutExpired, RuntimeError):
                pass   # the fixture that reads it reports the timeout or the end

    if order:
        threading.Thread(target=lane, name="session-jobs", daemon=True).start()
    return bool(order)


def _ended(items) -> bool:
    """Whether every job that `items` read has ended: running them waits for nothing."""
    with _LOCK:
        jobs = [_JOBS[k] for item in items for k in _keys_of(item)]
        return all(job.proc is not None and job.proc.poll() is not None for job in jobs)


def run_order(items):
    """`items` (collected, the readers of jobs last) in the order to run them, chosen one at
    a time: each test module's readers together, in their order, as soon as every job the
    module reads has ended, between the other tests; once the others are done, the rest.

    Run last and alone, the readers kept process 0 of `make test` busy ~110 s after the
    other process had ended (706 against 598 s; test_cuda_emulated's ASan runs alone 89 s):
    their jobs end long before the other tests do."""
    others, modules = collections.deque(), {}
    for item in items:
        if uses_jobs(item):
            modules.setdefault(item.nodeid.split("::")[0], []).append(item)
        else:
            others.append(item)
    readers = collections.deque(modules.values())
    while others or readers:
        if readers and (not others or _ended(readers[0])):
            yield from readers.popleft()
        else:
            yield others.popleft()


def running() -> int:
    """How many jobs are running now."""
    with _LOCK:
        return sum(job.proc is not None and job.proc.poll() is None for job in _JOBS.values())


def stop_all() -> None:
    """Kills jobs still running when the session ends (a failure with -x, an interrupt)."""
    with _LOCK:
        _STOPPED.set()
        for job in _JOBS.values():
            if job.proc is not None and job.proc.poll() is None:
                job.proc.kill()
                job.proc.wait()
