"""benchmarks/gpu_check.sh runs only on the GPU machine, whose time is short and rare: its
stage logic (bounded stages, logs, the second bench pass merged into one JSON, the table
and the summary) runs here on the CPU with stand-ins for nvidia-smi and compute-sanitizer,
so a broken script is found before a device call is spent on it."""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import pytest

from moe_kernels import _library

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _stub(path: pathlib.Path, body: str) -> None:
    path.write_text("#!/bin/sh\n" + body + "\n")
    path.chmod(0o755)


@pytest.mark.skipif(not _library.extension_loaded(), reason="moe_kernels._C is not built")
def test_gpu_check_stages_merge_and_summary(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    _stub(bin_dir / "nvidia-smi", 'echo "Stand-in GPU"')
    # runs the program as the sanitizer would, keeping its exit code
    _stub(bin_dir / "compute-sanitizer",
          'while [ "${1#-}" != "$1" ]; do case $1 in --tool|--error-exitcode) shift;; esac; '
          'shift; done; "$@"; rc=$?; echo "========= ERROR SUMMARY: 0 errors"; exit $rc')
    out = tmp_path / "out"
    env = dict(os.environ, OUT=str(out), BUDGET_S="300", STAGES="warm bench compile sanitizer",
               BENCH_ARGS="--op unpermute --tokens 2 --backend cpu",
               PATH=f"{bin_dir}:{pathlib.Path(sys.executable).parent}:{os.environ['PATH']}")
    r = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh")], env=env,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    benches = list(out.glob("bench_Stand-in_GPU_*.json"))
    assert len(benches) == 1 and not list(out.glob("bench_compile_*")), sorted(out.iterdir())
    bench = json.loads(benches[0].read_text())
    assert bench["meta"]["modules"] == {"permute": "ok"}     # the supervised run's state
    rows = bench["results"]
    backends = {(r["case"], r["backend"]) for r in rows if r["op"] == "unpermute"}
    case = "unpermute T=2 K=8 H=2048 bf16"
    assert {(case, "cpu"), (case, "torch-eager"), (case, "torch-compile")} <= backends
    lines = r.stdout.splitlines()
    table = [ln for ln in lines if ln.startswith("unpermute ") and " cpu " in ln]
    assert table and "x" in table[0].split()[-2]           # ours over compile
    summary = lines[lines.index(next(ln for ln in lines if ln.startswith("== gpu_check"))) + 1:]
    assert [ln.split()[:2] for ln in summary] == [["warm", "ok"], ["bench", "ok"],
                                                  ["compile", "ok"], ["sanitizer", "rc=2"]], summary
    assert "moe-bench --warm: 1 module(s) in 2 processes" in summary[0]
    assert "ERROR SUMMARY: 0 errors" in summary[3] and "no CUDA device" in summary[3]


def test_gpu_check_stops_a_stage_that_leaves_too_little_host_memory(tmp_path):
    """A machine out of memory stops answering and returns nothing of the call: a stage
    under the floor is ended (here every stage is, the floor being above any machine's
    memory), the run goes on and says why, with the low point it saw."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    _stub(bin_dir / "nvidia-smi", 'echo "Stand-in GPU"')
    out = tmp_path / "out"
    env = dict(os.environ, OUT=str(out), BUDGET_S="300", STAGES="bench compile",
               MIN_AVAIL_MB=str(1 << 40), STAMP="20000101T0000",
               BENCH_ARGS="--op unpermute --tokens 2 --backend cpu",
               PATH=f"{bin_dir}:{pathlib.Path(sys.executable).parent}:{os.environ['PATH']}")
    r = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh")], env=env,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    lines = r.stdout.splitlines()
    summary = lines[lines.index(next(ln for ln in lines if ln.startswith("== gpu_check"))) + 1:]
    assert [ln.split()[:2] for ln in summary] == [["bench", "low-mem"], ["compile", "low-mem"]]
    assert all(int(ln.split()[2].rstrip("s")) < 30 for ln in summary), summary
    log = (out / "bench_Stand-in_GPU_20000101T0000.txt").read_text()
    low = [int(part.split(">=")[1].split()[0]) for part in log.split("host memory free")[1:]]
    assert len(low) == 2 and all(0 < mb < (1 << 40) for mb in low), log[:2000]


def test_gpu_check_resumes_the_bench_of_an_earlier_call(tmp_path):
    """RESUME_BENCH: a second device call goes on with the first call's bench JSON, whose
    finished modules keep their rows and are not measured again (its interrupted ones
    would be); and the ws stage's verdict reaches the summary."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    _stub(bin_dir / "nvidia-smi", 'echo "Stand-in GPU"')
    earlier = tmp_path / "earlier.json"
    row = dict(op="unpermute", case="from the first call", backend="cpu", device="cpu",
               time_us=2.0, bytes=8, correct=True)
    earlier.write_text(json.dumps({"meta": {"modules": {"permute": "ok"}}, "results": [row]}))
    out = tmp_path / "out"
    env = dict(os.environ, OUT=str(out), BUDGET_S="120", STAGES="ws bench",
               STAMP="20000101T0000", TMPDIR=str(tmp_path), RESUME_BENCH=str(earlier),
               BENCH_ARGS="--op unpermute --backend cpu",
               PATH=f"{bin_dir}:{pathlib.Path(sys.executable).parent}:{os.environ['PATH']}")
    r = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh")], env=env,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    bench = json.loads((out / "bench_Stand-in_GPU_20000101T0000.json").read_text())
    assert bench["meta"]["modules"] == {"permute": "ok"}
    assert [(x["op"], x["case"]) for x in bench["results"]] == [("unpermute",
                                                                  "from the first call")]
    log = (out / "bench_Stand-in_GPU_20000101T0000.txt").read_text()
    assert "permute: ok (resumed run)" in log and " --resume " in log
    # the ws stage ran the probe once (here it fails: no GPU) and the summary says so
    lines = r.stdout.splitlines()
    summary = lines[lines.index(next(ln for ln in lines if ln.startswith("== gpu_check"))) + 1:]
    assert [ln.split()[:2] for ln in summary] == [["ws", "rc=1"], ["bench", "ok"],
                                                  ["ws-probe", "the"]], summary
    assert "ws probe: the ws probe failed" in summary[0]
    verdict = (tmp_path / "moe_kernels_ws_probe_20000101T0000").read_text()
    assert verdict.startswith("the ws probe failed") and verdict[:100] in summary[2]


def test_gpu_check_slow_stage_runs_the_gpus_slow_tests_int64_first(tmp_path):
    """The slow stage spends device time on the GPU's slow tests alone (the CPU's, the C++
    kernels' int64 cases, the interpreter's sweeps and the 4-rank gloo layer, run off the
    device), the int64 sweeps in a first pass, the direct calls (minutes of compiles)
    after; both passes' summaries reach the stage's line. Here every one of them skips
    (no CUDA device), which the stage takes as passing."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    _stub(bin_dir / "nvidia-smi", 'echo "Stand-in GPU"')
    out = tmp_path / "out"
    env = dict(os.environ, OUT=str(out), BUDGET_S="120", STAGES="slow",
               STAMP="20000101T0000", TMPDIR=str(tmp_path),
               PATH=f"{bin_dir}:{pathlib.Path(sys.executable).parent}:{os.environ['PATH']}")
    r = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh")], env=env,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    log = (out / "tests_Stand-in_GPU_20000101T0000.txt").read_text()
    ran = [ln.split()[0] for ln in log.splitlines() if " SKIPPED " in ln]
    int64 = [t for t in ran if "int64_addressing" in t]
    assert int64 and all("cuda" in t for t in int64), ran
    assert ran[:len(int64)] == int64 and "test_triton_direct_calls_on_the_gpu" in ran[-1]
    assert not [t for t in ran if "test_testing" in t or "test_expert_parallel" in t], ran
    lines = r.stdout.splitlines()
    summary = lines[lines.index(next(ln for ln in lines if ln.startswith("== gpu_check"))) + 1:]
    assert [ln.split()[:2] for ln in summary] == [["slow", "ok"]], summary
    assert summary[0].count("skipped") == 2, summary


# --- tests/fault_guard.py: a test that hangs or breaks the CUDA context ends its process,
# not the rest of the stage (stand-ins for the kernel, run in a pytest of their own) ------

_STANDS_IN_FOR_A_BROKEN_CONTEXT = """
import fault_guard

fault_guard.context_lost = lambda: True    # as after an illegal address on the GPU

def test_before():
    pass

def test_breaks():
    assert False, "an illegal memory access (stand-in)"

def test_after():
    pass
"""


def _guarded_pytest(tmp_path, source: str, **env) -> tuple[subprocess.CompletedProcess, str]:
    """(the pytest run of `source`, what the guards wrote to MOE_KERNELS_FAULT_LOG)."""
    (tmp_path / "test_guarded.py").write_text(source)
    log = tmp_path / "faults.txt"
    # this run's own guards (the GPU run, under xdist, sets them too) are not the child's
    inherited = {k: v for k, v in os.environ.items()
                 if k not in ("PYTEST_XDIST_WORKER", "MOE_KERNELS_TEST_TIMEOUT_S")}
    r = subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "fault_guard", "-p", "no:cacheprovider", "-q",
         "--tb=short", "test_guarded.py"], cwd=tmp_path, capture_output=True, text=True,
        timeout=120, env=dict(inherited, MOE_KERNELS_FAULT_LOG=str(log), **env,
                              PYTHONPATH=os.pathsep.join([str(ROOT / "tests"), str(ROOT)])))
    return r, log.read_text() if log.exists() else ""


def test_a_test_that_hangs_ends_its_process_with_its_stack(tmp_path):
    """Past MOE_KERNELS_TEST_TIMEOUT_S the process exits, its stacks in the fault log
    (under xdist the worker: the controller reports the test crashed, starts another)."""
    r, log = _guarded_pytest(tmp_path, "import time\n\ndef test_hangs():\n    time.sleep(60)\n",
                             MOE_KERNELS_TEST_TIMEOUT_S="2")
    assert r.returncode == 1 and "Timeout (0:00:02)" in log, (r.stdout[-2000:], log)
    assert "in test_hangs" in log


def test_a_lost_cuda_context_stops_the_session_after_the_failing_test(tmp_path):
    """Without xdist the session stops at the test after which the context is lost (each
    later CUDA test would fail on its error), with the failure's summary; the tests
    before it ran."""
    r, log = _guarded_pytest(tmp_path, _STANDS_IN_FOR_A_BROKEN_CONTEXT)
    assert r.returncode == 2, r.stdout[-2000:]      # pytest's "interrupted"
    message = "the CUDA context is unusable after test_guarded.py::test_breaks: the session stops"
    assert message in r.stdout and message in log
    assert "an illegal memory access (stand-in)" in r.stdout    # the failure's summary
    assert "1 failed, 1 passed" in r.stdout and "test_after" not in r.stdout


def test_a_lost_cuda_context_ends_its_xdist_worker(tmp_path):
    """In an xdist worker the process exits in the failing test's teardown, its failure
    already reported, so that a fresh worker runs the tests left."""
    r, log = _guarded_pytest(tmp_path, _STANDS_IN_FOR_A_BROKEN_CONTEXT,
                             PYTEST_XDIST_WORKER="gw0")
    assert r.returncode == 3, r.stdout[-2000:]
    assert "unusable after test_guarded.py::test_breaks: this worker exits" in log
    assert "1 failed" not in r.stdout             # the process ended before its summary
