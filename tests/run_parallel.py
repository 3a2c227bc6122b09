"""`make test`: pytest as several processes sharing one list of tests (tests/work_sharing.py).

    python tests/run_parallel.py [pytest arguments]

Process 0 writes to this terminal as it goes; the others' output follows once all are done.
The exit status is the first non-zero one among the processes (0 when all passed).
MOE_KERNELS_TEST_PROCS sets how many processes (default: the cores this process may use,
at most 4; 1 runs plain pytest).
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile

from work_sharing import CLAIMS_ENV, PROCESS_ENV

MAX_PROCS = 4
STOP_GRACE_S = 10


def procs() -> int:
    value = os.environ.get("MOE_KERNELS_TEST_PROCS")
    if value:
        return max(1, int(value))
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return max(1, min(MAX_PROCS, cores or 1))


def _stop(running: list) -> None:
    """After an interrupt or a time limit: no test process left behind. SIGINT first, which
    pytest ends the session on (its session jobs killed: tests/session_jobs.py)."""
    live = [p for p in running if p.poll() is None]
    for p in live:
        p.send_signal(signal.SIGINT)
    for p in live:
        try:
            p.wait(timeout=STOP_GRACE_S)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def main(args: list) -> int:
    n = procs()
    pytest = [sys.executable, "-m", "pytest", *args]
    if n == 1:
        return subprocess.call(pytest)
    # a time limit's SIGTERM unwinds through the `finally` below, which ends the processes
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))
    claims = tempfile.mkdtemp(prefix="moe_kernels_claims_")
    logs, running = [], []
    try:
        for k in range(n):
            env = dict(os.environ, **{CLAIMS_ENV: claims, PROCESS_ENV: f"{k}/{n}"})
            # one .pytest_cache writer: the processes would overwrite each other's record
            argv = pytest if k == 0 else [*pytest, "-p", "no:cacheprovider"]
            out = None
            if k:
                out = tempfile.TemporaryFile("w+")
                logs.append(out)
            running.append(subprocess.Popen(argv, env=env, stdout=out, stderr=subprocess.STDOUT
                                            if out else None))
        codes = [p.wait() for p in running]
    finally:
        _stop(running)
        shutil.rmtree(claims, ignore_errors=True)
    for k, log in enumerate(logs, 1):
        log.seek(0)
        print(f"\n===== test process {k} of {n} =====", flush=True)
        shutil.copyfileobj(log, sys.stdout)
    sys.stdout.flush()
    print(f"\ntest processes' exit codes: {codes}")
    return next((code for code in codes if code), 0)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
