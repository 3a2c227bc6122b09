"""A moe-bench run that survives a kernel breaking the process: `--stall-timeout`,
`--resume`, `--supervise` (docs/benchmarks.md, "A run that a kernel breaks").

A kernel run on a device for the first time can do what no `except` catches: hang (a
barrier never completes), kill the process, or leave the CUDA context unusable, after
which every later op's rows fail too. So the run's state lives in its JSON file: beside
the rows, `meta["modules"]` gives each op module's state, written before the module
starts ("running") and when it ends:
  ok        its rows are in the file
  raised    it raised; the process went on
  lost      it raised and the CUDA context was unusable after it: the process stopped
  stalled   it went --stall-timeout seconds without a row checked or timed: the process
            stopped
  died      the process ended inside it (a crash, a hang past an outer time limit)
  interrupted  SIGTERM (an outer time limit) stopped the process inside it: no finding
A resumed run keeps the file's rows and skips every module with a state but
"interrupted", which it runs again; a supervised run runs the measurement in child
processes and starts a fresh one, resumed, after a child stopped inside a module.
"""

from __future__ import annotations

import contextlib
import dataclasses
import faulthandler
import json
import os
import signal
import subprocess
import sys
import threading
import time

import torch

from moe_kernels.bench import common
from moe_kernels.bench.common import Result

# A child's exit status after it stopped inside a module (stalled, lost): the modules
# after it need a fresh process.
RESTART = 3
FAILED_STATES = ("raised", "lost", "stalled", "died")


def module_name(module) -> str:
    return module.__name__.rsplit(".", 1)[-1]


class Interrupted(BaseException):
    """SIGTERM arrived (`stop_on_sigterm`): not an Exception, so that no `except Exception`
    of a module takes it for the module's failure."""


# SIGTERM's Interrupted waits while the main thread records the run (RunState.set): raised
# in the middle, a module's rows could be both stored and run again.
_recording = {"now": False, "pending": False}


@contextlib.contextmanager
def _recording_run():
    main = threading.current_thread() is threading.main_thread()
    if main:
        _recording["now"] = True
    try:
        yield
    finally:
        if main:
            _recording["now"] = False
            if _recording["pending"]:
                _recording["pending"] = False
                raise Interrupted()


@contextlib.contextmanager
def stop_on_sigterm():
    """Within: SIGTERM raises Interrupted in the main thread (an outer time limit ends the
    run: the module it stopped in is recorded as interrupted, to be run again)."""
    def handler(signum, frame):
        # ignored from here to the exit: a supervisor passes on the SIGTERM its process
        # group already got, which must not end the process before the run is written
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        if _recording["now"]:
            _recording["pending"] = True
            return
        raise Interrupted()

    if threading.current_thread() is not threading.main_thread():
        yield                     # signal handlers belong to the main thread
        return
    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    except Interrupted:
        raise                     # SIGTERM stays ignored
    except BaseException:
        signal.signal(signal.SIGTERM, previous)
        raise
    signal.signal(signal.SIGTERM, previous)


class RunState:
    """The rows and module states of one run, rewritten to `path` (if any) on each change:
    what a process that stops at any moment leaves behind is the run so far."""

    def __init__(self, path: str | None, meta: dict, results=None, modules=None):
        self.path, self.meta = path, meta
        self.results: list[Result] = list(results or [])
        self.modules: dict[str, str] = dict(modules or {})
        self.running: str | None = None
        self._lock = threading.Lock()     # the watchdog's thread writes too

    @classmethod
    def resumed(cls, path: str, meta: dict) -> "RunState":
        """The run recorded at `path` (a fresh one where there is none), a module it was
        inside when its process ended marked "died", an interrupted one to run again."""
        if not os.path.exists(path):
            return cls(path, meta)
        with open(path) as f:
            data = json.load(f)
        fields = {f.name for f in dataclasses.fields(Result)}
        results = [Result(**{k: v for k, v in r.items() if k in fields})
                   for r in data["results"]]
        modules = {name: "died" if state == "running" else state
                   for name, state in data["meta"].get("modules", {}).items()
                   if state != "interrupted"}
        return cls(path, meta, results, modules)

    def set(self, module: str, state: str, rows=()) -> None:
        with _recording_run(), self._lock:
            self.results += rows
            self.modules[module] = state
            self.running = module if state == "running" else None
            self.write()

    def write(self) -> None:
        if not self.path:
            return
        tmp = f"{self.path}.tmp"
        meta = dict(self.meta, modules=self.modules)
        with open(tmp, "w") as f:
            json.dump({"meta": meta, "results": [dict(dataclasses.asdict(r), gbps=r.gbps,
                                                      roofline_pct=r.roofline_pct,
                                                      tflops=r.tflops)
                                                 for r in self.results]}, f, indent=1)
        os.replace(tmp, self.path)

    def failed(self) -> list[str]:
        return [f"{name} ({state})" for name, state in self.modules.items()
                if state in FAILED_STATES]


def context_lost(device: str) -> bool:
    """Whether the device can no longer run anything: after an illegal address or a
    device-side assert, every CUDA call of the process fails."""
    if device != "cuda":
        return False
    try:
        torch.cuda.synchronize()
        torch.ones(1, device="cuda").add_(1).cpu()
        return False
    except Exception:
        return True


@contextlib.contextmanager
def watchdog(seconds: float | None, state: RunState, module: str):
    """Within: where `seconds` pass without progress (common.progress(): a row's first
    call or its timing done), the stacks of every thread go to stderr, the module is
    marked "stalled" and the process exits (RESTART). A kernel that hangs cannot be
    interrupted from Python; a thread can still end the process. Progress, not a bound on
    the module: a module's rows take minutes in all, one row's compile and timing
    seconds, so a hang is found in `seconds` wherever it happens."""
    if not seconds:
        yield
        return
    last = [time.monotonic()]
    done = threading.Event()

    def watch():
        while not done.wait(min(1.0, seconds / 4)):
            if time.monotonic() - last[0] > seconds:
                print(f"moe-bench: {module} made no progress for --stall-timeout {seconds:g} "
                      f"s; its stacks:", file=sys.stderr, flush=True)
                faulthandler.dump_traceback(file=sys.stderr, all_threads=True)
                state.set(module, "stalled")
                sys.stderr.flush()
                os._exit(RESTART)

    watcher = threading.Thread(target=watch, daemon=True)
    with common.on_progress(lambda: last.__setitem__(0, time.monotonic())):
        watcher.start()
        try:
            yield
        finally:
            done.set()
            watcher.join()


def supervise(argv: list[str], json_path: str, command: list[str] | None = None) -> int:
    """moe-bench's arguments `argv` (without --supervise) run in child processes, each
    resuming the run at `json_path` (started afresh here unless argv has --resume), until
    one finishes: its exit status. `command` runs a child (default: this moe-bench)."""
    command = command or [sys.executable, "-m", "moe_kernels.bench"]
    if "--resume" not in argv and os.path.exists(json_path):
        os.remove(json_path)
    child = [*command, *argv, *([] if "--resume" in argv else ["--resume"])]
    # each restart follows a module that stopped a child, so the modules bound them
    from moe_kernels.bench import MODULES
    for _ in range(len(MODULES) + 1):
        rc = _run_child(child)
        if rc >= 0 and rc != RESTART:
            return rc
        why = f"signal {-rc}" if rc < 0 else "a module stopped it"
        print(f"moe-bench: the measuring process ended ({why}); a fresh one goes on",
              file=sys.stderr, flush=True)
    return 1


def _run_child(command: list[str]) -> int:
    """command's exit status; SIGTERM here is passed on to it, which records where it was
    stopped and ends with 128 + SIGTERM (no further child is started then)."""
    proc = subprocess.Popen(command)
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: proc.send_signal(signum))
    try:
        return proc.wait()
    finally:
        signal.signal(signal.SIGTERM, previous)
