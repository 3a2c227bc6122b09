"""moe-bench's command line: a real (small) run to JSON, --compare's speedups and
regression flags, --plot's PNG."""

from __future__ import annotations

import contextlib
import json
import re
import sys

import pytest

from moe_kernels import _library
from moe_kernels.bench import cli
from moe_kernels.bench.common import Result


@pytest.fixture
def quick_timing(monkeypatch):
    """For the tests of the CLI's plumbing (which rows, which files, which exit code), not
    of its figures: each case's rows are timed for ~0.02 s instead of ~0.3 s (these five
    tests 45 -> 11 s on 2 cores)."""
    from moe_kernels.bench import common
    real = common._time_cpu_interleaved
    monkeypatch.setattr(common, "_time_cpu_interleaved",
                        lambda fns, n_sets, min_time_s=0.3: real(fns, n_sets, 0.02))


def _write(path, rows, commit):
    meta = {"device": "test device", "commit": commit}
    results = [dict(op=op, case=case, backend=b, time_us=t, correct=ok)
               for op, case, b, t, ok in rows]
    path.write_text(json.dumps({"meta": meta, "results": results}))
    return str(path)


def test_compare_flags_regressions(tmp_path, capsys):
    a = _write(tmp_path / "a.json", [("op1", "c", "triton", 10.0, True),
                                     ("op1", "c", "cpu", 10.0, True),
                                     ("op2", "c", "cpu", 5.0, True),
                                     ("op3", "c", "cpu", 1.0, True)], "aaa")
    b = _write(tmp_path / "b.json", [("op1", "c", "triton", 5.0, True),     # 2x faster
                                     ("op1", "c", "cpu", 10.4, True),       # within 5%
                                     ("op2", "c", "cpu", 6.0, True),        # 20% slower
                                     ("op4", "c", "cpu", 1.0, True)], "bbb")
    assert cli.main(["--compare", a, b]) == 1
    out = capsys.readouterr().out
    lines = {tuple(line.split()[:3]): line for line in out.splitlines()}
    assert "2.00x" in lines[("op1", "c", "triton")]
    assert "REGRESSION" not in lines[("op1", "c", "cpu")]
    assert "0.83x" in lines[("op2", "c", "cpu")] and "REGRESSION" in lines[("op2", "c", "cpu")]
    assert "new" in lines[("op4", "c", "cpu")] and "missing in B" in lines[("op3", "c", "cpu")]
    assert "1 regression(s)" in out
    assert cli.main(["--compare", a, b, "--threshold", "0.25"]) == 0


def test_compare_flags_kernels_behind_compile(tmp_path, capsys):
    rows = [("op", "c", "cpu", 10.0, True), ("op", "c", "torch-compile", 8.0, True),
            ("op", "c", "torch-eager", 50.0, True),
            ("op", "d", "cpu", 7.0, True), ("op", "d", "torch-compile", 8.0, True)]
    b = _write(tmp_path / "b.json", rows, "b")
    assert cli.main(["--compare", b]) == 1
    out = capsys.readouterr().out
    lines = {tuple(line.split()[:3]): line for line in out.splitlines()}
    assert "BEHIND COMPILE (0.80x)" in lines[("op", "c", "cpu")]
    assert "BEHIND" not in lines[("op", "d", "cpu")] + lines[("op", "c", "torch-eager")]
    assert "1 case(s) behind torch.compile" in out
    a = _write(tmp_path / "a.json", rows, "a")        # no regression, still behind
    assert cli.main(["--compare", a, b]) == 1
    ahead = _write(tmp_path / "ahead.json", rows[3:], "c")
    assert cli.main(["--compare", ahead]) == 0


def test_compare_flags_incorrect(tmp_path, capsys):
    a = _write(tmp_path / "a.json", [("op", "c", "cpu", 10.0, True)], "a")
    b = _write(tmp_path / "b.json", [("op", "c", "cpu", 1.0, False)], "b")
    assert cli.main(["--compare", a, b]) == 1
    assert "INCORRECT" in capsys.readouterr().out


@pytest.mark.skipif(not _library.extension_loaded(), reason="moe_kernels._C is not built")
def test_small_run_writes_json(tmp_path, capsys):
    """The layer's case end to end: every row checked against the torch path and timed."""
    path = tmp_path / "r.json"
    assert cli.main(["--op", "DeepseekV3MoE", "--tokens", "1", "--backend", "cpu",
                     "--no-compile", "--json", str(path)]) == 0
    data = json.loads(path.read_text())
    rows = {r["backend"]: r for r in data["results"]}
    assert set(rows) == {"cpu", "torch-eager"}
    assert all(r["correct"] and r["time_us"] > 0 and r["bytes"] > 0 for r in rows.values())
    assert "DeepseekV3MoE" in capsys.readouterr().out


def test_op_names_are_the_public_names():
    """--op takes what users call: each name a public function or class of moe_kernels."""
    import moe_kernels
    from moe_kernels.bench import OPS
    assert OPS and all(callable(getattr(moe_kernels, name, None)) for name in OPS), sorted(OPS)


@pytest.mark.skipif(not _library.extension_loaded(), reason="moe_kernels._C is not built")
def test_op_selects_rows_inside_a_module(tmp_path):
    """--op unpermute times unpermute only, although its module also measures permute."""
    path = tmp_path / "r.json"
    assert cli.main(["--op", "unpermute", "--tokens", "2", "--backend", "cpu", "--no-compile",
                     "--json", str(path)]) == 0
    ops = {r["op"] for r in json.loads(path.read_text())["results"]}
    assert ops == {"unpermute"}


def test_plot_writes_png(tmp_path):
    pytest.importorskip("matplotlib", reason="--plot's optional dependency is not installed")
    results = [Result("op", "case", "triton", "cuda", 10.0, 3_000_000, copy_gbps=3000.0),
               Result("op", "case", "torch-eager", "cuda", 40.0, 3_000_000, copy_gbps=3000.0)]
    path = tmp_path / "roofline.png"
    cli.plot_roofline(results, {"device": "test", "commit": "x"}, str(path))
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_noisy_rows_are_flagged():
    """A loaded machine slowed CPU rows ~20x between repetitions: such rows are marked and
    the run warns, so a noisy figure is not published unnoticed."""
    from moe_kernels.bench import common
    quiet = Result("op", "case", "cpu", "cpu", 10.0, 1000, spread=0.05)
    noisy = Result("op", "case2", "torch-eager", "cpu", 30.0, 1000, spread=1.9)
    assert common.noise_warning([quiet]) is None
    warning = common.noise_warning([quiet, noisy])
    assert warning and "1 of 2 rows" in warning and "190%" in warning and "case2" in warning
    lines = common.format_table([quiet, noisy]).splitlines()
    assert "190%!" in lines[3] and "5%" in lines[2] and "!" not in lines[2]


def test_spread_is_the_deciles_over_the_median():
    from moe_kernels.bench import common
    median, spread = common._summary([1.0] * 10, 1e6)
    assert median == 1e6 and spread == 0.0
    times = [float(i) for i in range(1, 102)]          # median 51, p10 ~10.2, p90 ~91.8
    _, spread = common._summary(times, 1.0)
    assert abs(spread - (91.8 - 10.2) / 51) < 0.01


def test_cpu_timing_interleaves_the_rows_of_a_case():
    """The rows of one case are timed in turns (CPU_ROUNDS rounds), each keeping its own
    repetitions: a call log shows the alternation, and each median is its own function's."""
    import time

    from moe_kernels.bench import common
    log = []

    def sleeper(name, seconds):
        def fn(i):
            log.append(name)
            time.sleep(seconds)
        return fn

    (slow, _), (fast, _) = common._time_cpu_interleaved(
        [sleeper("slow", 2e-3), sleeper("fast", 2e-4)], n_sets=1, min_time_s=0.03)
    assert slow > 2000 and 200 < fast < slow / 3, (slow, fast)
    timed = log[4:]   # after each function's two warm-up calls
    switches = sum(a != b for a, b in zip(timed, timed[1:]))
    assert switches >= 2 * common.CPU_ROUNDS - 1, timed


def test_a_peer_that_cannot_run_is_an_untimed_row():
    """A torch peer this build or device lacks (block-scaled `_scaled_mm` before CUDA 12.9)
    leaves a row saying why and the other rows timed; one of our kernels raising is a failed
    row; the table, compile flags and --compare pass over the untimed rows."""
    import torch

    from moe_kernels.bench import common

    def unsupported(i):
        raise RuntimeError("no such kernel here")

    x = torch.ones(4)
    timed = [("cpu", lambda i: x + 1), ("torch-scaled_mm", unsupported),
             ("torch-compile", lambda i: x + 1)]
    rows = common.measure("op", "case", "cpu", timed, 16, 1, lambda out: bool((out == 2).all()))
    by = {r.backend: r for r in rows}
    assert set(by) == {"cpu", "torch-scaled_mm", "torch-compile"}
    assert by["torch-scaled_mm"].time_us == 0 and by["torch-scaled_mm"].correct is None
    assert "unavailable: RuntimeError: no such kernel here" in by["torch-scaled_mm"].note
    assert by["cpu"].time_us > 0 and by["cpu"].correct
    line = next(ln for ln in common.format_table(rows).splitlines() if "scaled_mm" in ln)
    assert line.split()[3] == "-"
    assert all(b != "torch-scaled_mm" for _, _, b, _ in common.behind_compile(rows))
    rows = common.measure("op", "case", "cpu", [("cpu", unsupported), ("torch-eager",
                          lambda i: x + 1)], 16, 1, lambda out: bool((out == 2).all()))
    by = {r.backend: r for r in rows}
    assert by["cpu"].correct is False and by["cpu"].time_us == 0
    assert by["cpu"].note == "raised RuntimeError: no such kernel here"
    assert by["torch-eager"].correct and by["torch-eager"].time_us > 0


def test_compare_skips_untimed_rows(tmp_path, capsys):
    a = _write(tmp_path / "a.json", [("op", "c", "torch-scaled_mm", 0.0, None)], "a")
    b = _write(tmp_path / "b.json", [("op", "c", "torch-scaled_mm", 10.0, True)], "b")
    assert cli.main(["--compare", a, b]) == 0
    assert "REGRESSION" not in capsys.readouterr().out


@pytest.mark.skipif(not _library.extension_loaded(), reason="moe_kernels._C is not built")
def test_eager_call_rows_time_each_implemented_backend():
    """One row per op and backend it implements (none for a backend it lacks), on the op's
    smallest non-empty edge case."""
    from moe_kernels.bench import common
    rows = common.eager_call_rows(["permute", "unpermute"], "cpu", ["cpu"])
    assert [(r.op, r.backend, r.case) for r in rows] == [
        ("permute", "cpu", common.EAGER_CASE), ("unpermute", "cpu", common.EAGER_CASE)]
    assert all(0 < r.time_us < 1e5 and "case '" in r.note for r in rows)
    assert "kernel calls alone (2)" in rows[0].note and "kernel calls alone (1)" in rows[1].note
    assert common.eager_call_rows(["grouped_topk"], "cpu", ["cuda"]) == []


@pytest.mark.skipif(not _library.extension_loaded(), reason="moe_kernels._C is not built")
def test_kernels_alone_replays_the_top_level_kernel_calls():
    """The eager rows' `kernel calls alone`: the kernels one public call ran, in order,
    with its arguments; none for the reference backend."""
    import torch

    import moe_kernels
    from moe_kernels.bench import common
    original = _library.Op.kernel
    hidden = torch.randn(3, 8)
    ids = torch.tensor([[0, 2], [1, 2], [2, -1]], dtype=torch.int32)
    call = lambda: moe_kernels.permute(hidden, ids, 4, align=2, backend="cpu")
    with common.recording_kernels([]) as calls:
        rows, layout = call()
    assert [name for name, *_ in calls] == ["permute_index_cpu", "gather_rows_cpu"]
    assert calls[0][2][0] is ids and calls[1][2][0].data_ptr() == hidden.data_ptr()
    replay, n = common.kernels_alone(call)
    assert n == 2 and replay() is None
    assert common.kernels_alone(lambda: moe_kernels.permute(hidden, ids, 4, align=2,
                                                            backend="reference")) == (None, 0)
    assert _library.Op.kernel is original


@pytest.mark.skipif(not _library.extension_loaded(), reason="moe_kernels._C is not built")
def test_json_is_written_after_each_op(tmp_path, monkeypatch, quick_timing):
    """A run stopped by a time limit keeps the rows of the ops it finished, and names the
    module it stopped in."""
    from moe_kernels.bench import MODULES
    path = tmp_path / "r.json"
    seen = []
    real_eager_rows = cli.eager_call_rows

    def spy(*a, **k):
        data = json.loads(path.read_text())
        seen.append((data["results"], data["meta"]["modules"]))
        return real_eager_rows(*a, **k)

    monkeypatch.setattr(cli, "eager_call_rows", spy)
    assert cli.main(["--op", "unpermute", "--op", "grouped_gemm_fp8_masked", "--tokens", "2",
                     "--backend", "cpu", "--no-compile", "--json", str(path)]) == 0
    # the second op's module runs after the first's rows were written
    assert seen[0] == ([], {"permute": "running"})
    assert {r["op"] for r in seen[1][0]} == {"unpermute"}
    assert seen[1][1] == {"permute": "ok", "grouped_gemm": "running"}
    assert [m.__name__ for m in MODULES].index("moe_kernels.bench.permute") < \
        [m.__name__ for m in MODULES].index("moe_kernels.bench.grouped_gemm")


@pytest.mark.skipif(not _library.extension_loaded(), reason="moe_kernels._C is not built")
def test_copy_bound_peers_agree_with_the_reference(quick_timing):
    """permute's index_select and unpermute's index_add_ peers give the reference's rows."""
    from moe_kernels.bench import permute
    rows = permute.run("cpu", ["cpu"], [3], compile_reference=False)
    peers = {r.backend: r for r in rows if r.backend in ("torch-index_select", "torch-index_add")}
    assert set(peers) == {"torch-index_select", "torch-index_add"}
    assert all(r.correct and r.time_us > 0 for r in peers.values())


def test_grouped_gemm_peers_on_the_cpu_tensors():
    """The GPU peers' data preparation, checked where torch runs it: `_grouped_mm` on the
    bf16 operands equals the per-expert reference (segments of unequal and zero length),
    and each segment's activation scales are M-major, as cuBLAS reads 1x128 scales."""
    import torch

    from moe_kernels.bench import grouped_gemm as g
    if not hasattr(torch, "_grouped_mm"):
        pytest.skip("this torch has no _grouped_mm")
    a, a_s, b, b_s = g._operands(3, 32, 256, 384, "cpu", torch.Generator().manual_seed(0))
    bounds = [(0, 32), (32, 50), (64, 64)]
    want = g.torch_per_expert(a, a_s, b, b_s, bounds)
    peers = dict(g.torch_peers(a, a_s, b, b_s, bounds, "cuda"))
    assert set(peers) == {"torch-scaled_mm", "torch-grouped_mm-bf16"}
    assert g._close(peers["torch-grouped_mm-bf16"](), want)
    for (lo, hi), s in zip(bounds, g.m_major_scales(a_s, bounds)):
        assert torch.equal(s, a_s[lo:hi]) and (hi - lo < 2 or s.stride() == (1, hi - lo))
    assert g.torch_peers(a, a_s, b, b_s, bounds, "cpu") == []


@pytest.mark.skipif(not _library.extension_loaded(), reason="moe_kernels._C is not built")
def test_mla_cases_time_the_float32_reference_on_the_cpu(quick_timing):
    """The CPU goal's bar is the float32 reference, which the unfused bf16 path timed as
    `torch-eager` is not: every MLA case on the CPU times it too, and it agrees. The GPU
    run spends no device time on it."""
    from moe_kernels.bench import mla
    rows = mla.run("cpu", ["cpu"], [16], compile_reference=False)
    cases: dict[str, set[str]] = {}
    for r in rows:
        cases.setdefault(r.case, set()).add(r.backend)
    assert len(cases) == 3 and all(b == {"cpu", "torch-eager", "torch-reference"}
                                   for b in cases.values()), cases
    refs = [r for r in rows if r.backend == "torch-reference"]
    assert all(r.correct and r.time_us > 0 for r in refs)
    assert mla._reference_rows("cuda", True)(mla.unfused, None) == []


@pytest.mark.skipif(not _library.extension_loaded(), reason="moe_kernels._C is not built")
def test_a_failing_op_module_costs_only_its_own_rows(tmp_path, monkeypatch, capsys,
                                                    quick_timing):
    """A kernel that breaks on the device fails its op's rows; the run goes on to the next
    op, keeps its rows and exits 1 naming what raised."""
    from moe_kernels.bench import fp8

    def broken(*a, **k):
        raise RuntimeError("does not compile here")

    monkeypatch.setattr(fp8, "run", broken)   # fp8's rows come before the GEMMs'
    path = tmp_path / "r.json"
    rc = cli.main(["--op", "quantize_fp8_per_token_group", "--op", "grouped_gemm_fp8_masked",
                   "--backend", "cpu", "--no-compile", "--json", str(path)])
    assert rc == 1
    data = json.loads(path.read_text())
    assert {r["op"] for r in data["results"]} == {"grouped_gemm_fp8_masked"}
    assert data["meta"]["modules"] == {"fp8": "raised", "grouped_gemm": "ok"}
    err = capsys.readouterr().err
    assert "does not compile here" in err and "modules that failed" in err
    assert "fp8 (raised)" in err


# A measuring process whose op modules are stubs: permute's takes longer than the stall
# limit but reports progress as it goes, and gives one row; fp8's hangs (a kernel whose
# barrier never completes); grouped_gemm's raises and leaves the CUDA context unusable (an
# illegal address). The CPU has no such failures to provoke.
_BREAKING_CHILD = """
import sys, time
from moe_kernels.bench import cli, common, fp8, grouped_gemm, permute, runs
from moe_kernels.bench.common import Result

def slow_rows(*args, **kwargs):
    for _ in range(3):
        time.sleep(0.8)
        common.progress()
    return [Result("unpermute", "stub", "cpu", "cpu", 1.0, 100)]

def hang(*args, **kwargs):
    time.sleep(60)      # bounded: a broken watchdog fails the test, not CI's clock

def illegal_address(*args, **kwargs):
    raise RuntimeError("CUDA error: an illegal memory access was encountered (stub)")

permute.run = slow_rows
fp8.run = hang
grouped_gemm.run = illegal_address
runs.context_lost = lambda device: True
cli.eager_call_rows = lambda *args, **kwargs: []
sys.exit(cli.main(sys.argv[1:]))
"""


def test_supervised_run_goes_on_past_a_hang_and_a_lost_context(tmp_path, capfd):
    """The first GPU run of a kernel can hang or break the process's CUDA context, which no
    `except` recovers from: --supervise measures in child processes and starts a fresh one
    (resumed from the JSON) after each, so the modules after it still get their rows."""
    from moe_kernels.bench import runs
    script, path = tmp_path / "child.py", tmp_path / "r.json"
    script.write_text(_BREAKING_CHILD)
    path.write_text("a stale file of an earlier run")
    argv = ["--op", "unpermute", "--op", "quantize_fp8_per_token_group", "--op",
            "grouped_gemm_fp8_masked", "--backend", "cpu", "--no-compile",
            "--stall-timeout", "2", "--json", str(path)]
    assert runs.supervise(argv, str(path), command=[sys.executable, str(script)]) == 1
    data = json.loads(path.read_text())
    assert data["meta"]["modules"] == {"permute": "ok", "fp8": "stalled", "grouped_gemm": "lost"}
    assert [(r["op"], r["case"]) for r in data["results"]] == [("unpermute", "stub")]
    err = capfd.readouterr().err
    assert "fp8 made no progress for --stall-timeout 2 s" in err and "in hang" in err
    assert "the CUDA context is unusable after grouped_gemm" in err
    assert err.count("a fresh one goes on") == 2
    assert "fp8 (stalled), grouped_gemm (lost)" in err


# A measuring process whose fp8 module takes long (HANG=1) or gives one row: a stand-in for
# a run that an outer time limit stops.
_LONG_CHILD = """
import os, sys, time
from moe_kernels.bench import cli, fp8, permute
from moe_kernels.bench.common import Result

def fp8_rows(*args, **kwargs):
    if os.environ["HANG"] == "1":
        time.sleep(60)
    return [Result("quantize_fp8_per_token_group", "stub", "cpu", "cpu", 2.0, 100)]

permute.run = lambda *args, **kwargs: [Result("unpermute", "stub", "cpu", "cpu", 1.0, 100)]
fp8.run = fp8_rows
cli.eager_call_rows = lambda *args, **kwargs: []
sys.exit(cli.main(sys.argv[1:]))
"""


def test_a_run_stopped_by_a_time_limit_resumes_where_it_stopped(tmp_path):
    """SIGTERM to the run's process group (what `timeout` sends) records the module it
    stopped in as interrupted, which --resume runs again (a second device call finishing
    the bench of a first one that ran out of time)."""
    import os
    import signal
    import subprocess
    import time
    script, path = tmp_path / "child.py", tmp_path / "r.json"
    script.write_text(_LONG_CHILD)
    argv = ["--op", "unpermute", "--op", "quantize_fp8_per_token_group", "--backend", "cpu",
            "--no-compile", "--json", str(path)]
    supervisor = ("import sys; from moe_kernels.bench import runs; "
                  f"sys.exit(runs.supervise(sys.argv[1:], {str(path)!r}, "
                  f"command=[sys.executable, {str(script)!r}]))")
    run = lambda *extra, hang: subprocess.Popen(
        [sys.executable, "-c", supervisor, *argv, *extra], start_new_session=True,
        env=dict(os.environ, HANG=hang), stderr=subprocess.PIPE, text=True)
    first = run(hang="1")
    deadline = time.monotonic() + 60
    while not (path.exists() and '"fp8": "running"' in path.read_text()):
        assert first.poll() is None and time.monotonic() < deadline, first.stderr.read()
        time.sleep(0.1)
    os.killpg(first.pid, signal.SIGTERM)
    assert first.wait(timeout=30) == 128 + signal.SIGTERM
    assert "stopped by SIGTERM inside fp8" in first.stderr.read()
    data = json.loads(path.read_text())
    assert data["meta"]["modules"] == {"permute": "ok", "fp8": "interrupted"}
    second = run("--resume", hang="0")
    assert second.wait(timeout=60) == 0, second.stderr.read()
    data = json.loads(path.read_text())
    assert data["meta"]["modules"] == {"permute": "ok", "fp8": "ok"}
    assert [r["op"] for r in data["results"]] == ["unpermute", "quantize_fp8_per_token_group"]


def test_sigterm_while_the_run_is_written_waits_for_the_write(tmp_path, monkeypatch):
    """A SIGTERM that lands while a module's rows are being recorded is raised once they
    are: the file holds the module as done, never done and to be run again."""
    import os
    import signal

    from moe_kernels.bench import runs
    run = runs.RunState(str(tmp_path / "r.json"), {})
    real_write = runs.RunState.write

    def write_then_term(self):
        os.kill(os.getpid(), signal.SIGTERM)
        real_write(self)

    saved = signal.getsignal(signal.SIGTERM)
    try:
        with pytest.raises(runs.Interrupted):
            with runs.stop_on_sigterm():
                monkeypatch.setattr(runs.RunState, "write", write_then_term)
                run.set("permute", "ok", [Result("unpermute", "c", "cpu", "cpu", 1.0, 8)])
        assert signal.getsignal(signal.SIGTERM) == signal.SIG_IGN   # once, until the exit
    finally:
        signal.signal(signal.SIGTERM, saved)
    assert run.running is None
    data = json.loads((tmp_path / "r.json").read_text())
    assert data["meta"]["modules"] == {"permute": "ok"} and len(data["results"]) == 1


def test_a_module_with_its_own_bound_runs_without_the_stall_watchdog(monkeypatch):
    """expert_parallel's ranks are processes of their own: ending moe-bench on a stall would
    leave them on the device, so their own timeout bounds that module instead."""
    from types import SimpleNamespace

    from moe_kernels.bench import expert_parallel, runs
    seen = []

    @contextlib.contextmanager
    def watchdog(seconds, state, module):
        seen.append(seconds)
        yield

    monkeypatch.setattr(runs, "watchdog", watchdog)
    args = SimpleNamespace(stall_timeout=90.0, device="cpu", backend=None, tokens=None,
                           no_compile=True, only_compile=False)
    stub = lambda **attrs: SimpleNamespace(run=lambda *a, **k: [], MEASURES=(), **attrs)
    cli._measure_module(stub(), args, None, "gating")
    cli._measure_module(stub(OWN_TIMEOUT_S=expert_parallel.OWN_TIMEOUT_S), args, None, "ep")
    assert seen == [90.0, None]
    assert hasattr(expert_parallel, "OWN_TIMEOUT_S")


def test_resumed_run_marks_the_module_a_process_ended_in(tmp_path):
    """A module still "running" in the file is one its process ended inside (a crash, a
    kill that no handler saw): "died", skipped and failed; an interrupted one runs again;
    the finished modules' rows stay."""
    from moe_kernels.bench import runs
    path = tmp_path / "r.json"
    row = dict(op="unpermute", case="c", backend="cpu", device="cpu", time_us=2.0, bytes=8,
               gbps=0.004, roofline_pct=0.0, tflops=0.0)
    path.write_text(json.dumps({"meta": {"modules": {"permute": "ok", "fp8": "running",
                                                     "gating": "interrupted"}},
                                "results": [row]}))
    run = runs.RunState.resumed(str(path), {"device": "cpu"})
    assert run.modules == {"permute": "ok", "fp8": "died"}      # gating: to run again
    assert run.failed() == ["fp8 (died)"]
    assert [(r.op, r.case, r.time_us) for r in run.results] == [("unpermute", "c", 2.0)]
    assert runs.RunState.resumed(str(tmp_path / "none.json"), {}).modules == {}


def test_supervisor_restarts_a_child_killed_by_a_signal(tmp_path):
    """A child that dies by a signal (a segfault in a launcher) is followed by a fresh one,
    given --resume; the supervisor returns the child's status once one finishes."""
    from moe_kernels.bench import runs
    log = tmp_path / "calls"
    child = ("import os, signal, sys\n"
             f"log = open({str(log)!r}, 'a'); log.write(' '.join(sys.argv[1:]) + '\\n'); "
             "log.close()\n"
             f"if len(open({str(log)!r}).readlines()) == 1: os.kill(os.getpid(), signal.SIGKILL)\n"
             "sys.exit(0)\n")
    assert runs.supervise(["--json", "x.json"], str(tmp_path / "x.json"),
                          command=[sys.executable, "-c", child]) == 0
    assert log.read_text().splitlines() == ["--json x.json --resume"] * 2


@pytest.mark.skipif(not _library.extension_loaded(), reason="moe_kernels._C is not built")
def _load_script(name):
    """benchmarks/<name>.py as a module."""
    import importlib.util
    import pathlib
    path = pathlib.Path(__file__).parents[1] / "benchmarks" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_gpu_scripts_run_at_small_sizes_on_the_cpu():
    """benchmarks/ncu_cases.py and sanitize_cuda.py run only on the GPU machine, where a
    broken call would cost device time: their calls run here on the CPU backend."""
    from types import SimpleNamespace
    load = _load_script

    assert load("ncu_cases").main(["--smoke"]) == 0
    sanitize = load("sanitize_cuda")
    assert sanitize.check_layer("cpu", ("cpu",)) == 0
    assert sanitize.check_mla_paged_out_of_range("cpu") == 0
    assert sanitize.check_ops("cpu", ("cpu",), ops=["unpermute"]) == 0
    # a failed check after which the CUDA context is unusable stops the checks (stand-ins)
    sanitize.testing = SimpleNamespace(check=lambda *a, **k: SimpleNamespace(
        passed=False, skipped=0, results=[], message=lambda: "an illegal address (stand-in)"))
    sanitize.context_lost = lambda device: True
    with pytest.raises(sanitize.ContextLost, match="unpermute cpu"):
        sanitize.check_ops("cpu", ("cpu",), ops=["unpermute"])


@pytest.mark.skipif(not _library.extension_loaded(), reason="moe_kernels._C is not built")
def test_compile_rows_in_a_second_pass(tmp_path, quick_timing):
    """--no-compile then --only-compile: every row once, the compile rows in the second
    file alone (the GPU run times every op first, then spends what is left on compiling)."""
    first, second = tmp_path / "a.json", tmp_path / "b.json"
    common = ["--op", "unpermute", "--tokens", "2", "--backend", "cpu"]
    assert cli.main(common + ["--no-compile", "--json", str(first)]) == 0
    assert cli.main(common + ["--only-compile", "--json", str(second)]) == 0
    a = [(r["case"], r["backend"]) for r in json.loads(first.read_text())["results"]]
    b = [(r["case"], r["backend"]) for r in json.loads(second.read_text())["results"]]
    assert b and {backend for _, backend in b} == {"torch-compile"}
    assert "torch-compile" not in {backend for _, backend in a} and len(set(a)) == len(a)
    assert {case for case, _ in b} <= {case for case, _ in a}
    with pytest.raises(SystemExit, match="exclude each other"):
        cli.main(common + ["--no-compile", "--only-compile"])


def test_an_eager_call_that_raises_is_a_failed_row(monkeypatch):
    """The eager-call row of an op whose call raises says so (and fails the run) instead of
    costing its op's timed rows."""
    import moe_kernels
    from moe_kernels.bench import common

    def broken(*a, backend=None, **k):
        raise RuntimeError("launch failed")

    monkeypatch.setattr(moe_kernels, "unpermute", broken)
    rows = common.eager_call_rows(["unpermute"], "cpu", ["cpu"])
    assert len(rows) == 1 and rows[0].correct is False and rows[0].time_us == 0
    assert "raised RuntimeError: launch failed" in rows[0].note


def test_tile_variant_rows_run_under_the_tma_tables(monkeypatch):
    """The GPU-only `triton-tma*` rows of the GEMM benches: each calls the op under the
    TMA variant of the table in force (every tile tma; the second also capped at 128
    registers where an 8-warp tile has at most 64 x 128), and where asked `triton-ws`
    under its warp-specialised variant (contiguous and segments buckets); none on the
    CPU."""
    import torch

    from moe_kernels.bench import grouped_gemm as bench
    from moe_kernels.configs import grouped_gemm as configs
    monkeypatch.setattr(configs, "table_in_force", lambda device: (
        configs._FORCED[-1] if configs._FORCED else configs.DEFAULTS))
    seen = lambda i: configs.table_in_force(torch.device("cuda"))
    rows = bench.tile_variants("cuda", ["triton", "cuda"], seen)
    assert [name for name, _ in rows] == ["triton-tma", "triton-tma-maxnreg128"]
    plain, capped = (fn(0) for _, fn in rows)
    for table in (plain, capped):
        assert all(b["tma"] for buckets in table.values() for b in buckets)
    assert not any("maxnreg" in b for buckets in plain.values() for b in buckets)
    capped_tiles = {(b["BLOCK_M"], b["BLOCK_N"], b["num_warps"])
                    for buckets in capped.values() for b in buckets if b.get("maxnreg") == 128}
    # DEFAULTS' 8-warp tiles of at most 64 x 128 elements; not its 128 x 128 ones
    assert capped_tiles == {(64, 128, 8), (128, 64, 8)}
    assert configs.table_in_force(torch.device("cuda")) is configs.DEFAULTS   # restored
    from moe_kernels.bench import ws_probe
    from moe_kernels.triton import grouped_gemm as kernels
    monkeypatch.setattr(kernels, "_runs_wgmma", lambda device: False)    # not an sm_90
    assert len(bench.tile_variants("cuda", ["triton"], seen, ws=True)) == 2
    monkeypatch.setattr(kernels, "_runs_wgmma", lambda device: True)
    monkeypatch.setattr(ws_probe, "failure", lambda: None)
    rows = bench.tile_variants("cuda", ["triton"], seen, ws=True)
    assert [name for name, _ in rows] == ["triton-tma", "triton-tma-maxnreg128", "triton-ws"]
    ws = rows[-1][1](0)
    assert all(b["ws"] for kind in ("contiguous", "segments") for b in ws[kind])
    assert not any(b.get("ws") or b.get("tma") for b in ws["masked"])
    # a failed ws probe: the row raises its finding (a failed row), the call never runs
    monkeypatch.setattr(ws_probe, "failure", lambda: "the ws probe did not finish (stand-in)")
    rows = bench.tile_variants("cuda", ["triton"], lambda i: pytest.fail("ran"), ws=True)
    with pytest.raises(RuntimeError, match="did not finish"):
        rows[-1][1](0)
    assert bench.tile_variants("cpu", ["triton", "cpu"], seen) == []
    assert bench.tile_variants("cuda", ["cuda"], seen) == []


def test_quant_variant_row_runs_the_separate_kernels():
    """The GPU-only `triton-quant-then-permute` row of the fused_moe bench: the op with the
    gathered quantization off for that call only, and only where it would be on."""
    import torch

    from moe_kernels.bench import fused_moe as bench
    from moe_kernels.ops import fused_moe as ops
    small, large = torch.empty(16, 7168, dtype=torch.bfloat16), torch.empty(1024, 7168)
    seen = lambda i: ops.GATHERED_QUANT_MAX_BYTES
    rows = bench.quant_variants("cuda", ["triton", "cuda"], small, seen)
    assert [name for name, _ in rows] == ["triton-quant-then-permute"]
    assert rows[0][1](0) < 0 < ops.GATHERED_QUANT_MAX_BYTES      # off in the call, restored
    assert bench.quant_variants("cuda", ["triton"], large, seen) == []
    assert bench.quant_variants("cpu", ["triton", "cpu"], small, seen) == []
    assert bench.quant_variants("cuda", ["cuda"], small, seen) == []


@pytest.fixture
def ws_probe(monkeypatch):
    """moe_kernels.bench.ws_probe with its verdict cache emptied before and after."""
    from moe_kernels.bench import ws_probe
    monkeypatch.delenv(ws_probe.VERDICT_ENV, raising=False)
    ws_probe.failure.cache_clear()
    yield ws_probe
    ws_probe.failure.cache_clear()


def _probe_child(monkeypatch, probe, code: str):
    monkeypatch.setattr(probe, "_command", lambda: [sys.executable, "-c", code])


def test_ws_probe_verdicts(ws_probe, monkeypatch):
    """A probe child that passes, fails, stalls or hangs after a launch (stand-ins: the ws
    kernels need an sm_90 GPU): None, its last output lines, or where it was stopped,
    each once per process."""
    _probe_child(monkeypatch, ws_probe, "print('ws probe: both ran')")
    assert ws_probe.failure() is None
    ws_probe.failure.cache_clear()
    _probe_child(monkeypatch, ws_probe,
                 "import sys; print('ws probe: the contiguous kernel is off'); sys.exit(5)")
    why = ws_probe.failure()
    assert why.startswith("the ws probe failed (exit status 5)") and "is off" in why
    _probe_child(monkeypatch, ws_probe, "pass")
    assert ws_probe.failure() == why                 # probed once per process
    ws_probe.failure.cache_clear()
    monkeypatch.setattr(ws_probe, "COMPILE_S", 1.5)
    monkeypatch.setattr(ws_probe, "RUN_S", 0.5)
    _probe_child(monkeypatch, ws_probe, "import time; time.sleep(30)")  # a start that stalls
    why = ws_probe.failure()
    assert re.search(r"was stopped after \d+ s; its last line: no output$", why), why
    ws_probe.failure.cache_clear()
    # a compile that takes longer than a run may, printing as it goes, then a hang
    _probe_child(monkeypatch, ws_probe, "import time\n"
                 "for _ in range(2):\n    time.sleep(0.8); print('compiling', flush=True)\n"
                 f"print({ws_probe.LAUNCHED!r} + ' the contiguous kernel', flush=True)\n"
                 "time.sleep(30)\n")
    why = ws_probe.failure()
    assert re.search(r"was stopped after \d+ s \(a ws kernel that hangs\); its last line: "
                     r"ws probe: launched the contiguous kernel$", why), why


def test_ws_probe_verdict_command(ws_probe, monkeypatch, capsys):
    """`python -m moe_kernels.bench.ws_probe --verdict` (gpu_check.sh's ws stage): the
    verdict printed, exit 0 only where the kernels ran."""
    _probe_child(monkeypatch, ws_probe, "print('ws probe: both ran')")
    assert ws_probe.main(["--verdict"]) == 0 and "ws probe: ok" in capsys.readouterr().out
    ws_probe.failure.cache_clear()
    _probe_child(monkeypatch, ws_probe, "import sys; sys.exit(4)")
    assert ws_probe.main(["--verdict"]) == 1
    assert "ws probe: the ws probe failed (exit status 4)" in capsys.readouterr().out


def test_ws_probe_verdict_is_shared_through_its_file(ws_probe, monkeypatch, tmp_path):
    """With MOE_KERNELS_WS_PROBE_FILE the first process probes and the others (xdist
    workers, the bench's children) read its verdict instead of probing again."""
    monkeypatch.setenv(ws_probe.VERDICT_ENV, str(tmp_path / "verdict"))
    _probe_child(monkeypatch, ws_probe, "import sys; sys.exit(7)")
    why = ws_probe.failure()
    assert why.startswith("the ws probe failed (exit status 7)")
    ws_probe.failure.cache_clear()                   # as in another process
    _probe_child(monkeypatch, ws_probe, "pass")
    assert ws_probe.failure() == why


def test_ws_probe_checks_the_kernels_it_runs(monkeypatch, capsys):
    """The probe's own operands, layout and checks, on the CPU where its calls run the
    interpreter's fallback tiles (the ws kernels need an sm_90 GPU): it passes on correct
    kernels and stops on a wrong one."""
    import torch

    from moe_kernels.bench import ws_probe
    from moe_kernels.triton import grouped_gemm as kernels
    ws_probe.probe("cpu")
    assert capsys.readouterr().out.count("kernel ran") == 2
    monkeypatch.setattr(kernels, "grouped_gemm_fp8", lambda a, a_s, b, b_s, m, dtype: torch.zeros(
        a.shape[0], b.shape[1], dtype=dtype))
    with pytest.raises(SystemExit, match="the contiguous kernel is off"):
        ws_probe.probe("cpu")


def _row(op, case, backend, time_us, correct=True, **extra):
    return dict(dict(op=op, case=case, backend=backend, time_us=time_us, correct=correct,
                     note="", gbps=0.0, tflops=0.0, roofline_pct=0.0, copy_gbps=0.0), **extra)


def test_targets_judge_each_goal_on_our_fastest_correct_row(tmp_path, capsys):
    """moe-bench --targets: per goal and case, our fastest row that agrees with the
    reference (a faster wrong one does not count), its figure in the goal's unit against
    the bound, the strongest torch row beside it; the largest-T case where a goal says so,
    cases under its token floor left out, and goals without rows named, not passed."""
    from moe_kernels.bench import targets
    eager = "eager call, tiny input (host us)"
    rows = [
        _row("grouped_topk", "T=4096 E=256 G=8/4 K=8 bf16", "triton", 7.0),
        _row("grouped_topk", "T=4096 E=256 G=8/4 K=8 bf16", "cuda", 9.0),
        _row("grouped_topk", "T=4096 E=256 G=8/4 K=8 bf16", "torch-eager", 280.0),
        _row("grouped_topk", "T=1 E=256 G=8/4 K=8 bf16", "triton", 3.0, correct=False),
        _row("grouped_topk", "T=1 E=256 G=8/4 K=8 bf16", "cuda", 5.0),
        _row("permute", "permute T=4096 K=8 E=256 H=7168 bf16", "triton", 50.0, gbps=2700.0,
             copy_gbps=3000.0),
        _row("grouped_gemm_fp8", "GEMM1 8x4096 rows N=4096 K=7168", "triton", 100.0,
             tflops=1000.0),
        _row("grouped_gemm_fp8", "GEMM1 8x4096 rows N=4096 K=7168", "triton-ws", 80.0,
             tflops=1250.0),
        _row("grouped_gemm_fp8", "GEMM1 8x4096 rows N=4096 K=7168", "torch-scaled_mm", 90.0,
             tflops=1111.0),
        _row("quantize_fp8_per_token_group", "quant 1x128 T=1 H=7168 bf16", "triton", 3.0,
             gbps=10.0),
        _row("quantize_fp8_per_token_group", "quant 1x128 T=4096 H=7168 bf16", "triton", 40.0,
             gbps=2950.0),
        _row("mla_decompress_kv", "contiguous T=4096 H=128 bf16, fp8", "triton", 400.0),
        _row("mla_decompress_kv", "contiguous T=16384 H=128 bf16, fp8", "triton", 600.0),
        _row("DeepseekV3MoE", "DeepseekV3MoE T=1 E=256+1 H=7168", "triton", 200.0,
             roofline_pct=70.0),
        _row("unpermute", eager, "triton", 20.0,
             note="case 'one_token'; kernel calls alone (1) 7.5 us: +12.5 us"),
        _row("unpermute", eager, "cuda", 9.0, note="case 'one_token'"),
        _row("permute", eager, "triton", 0.0, correct=False, note="raised RuntimeError: x"),
    ]
    verdicts = {(v.goal.name, v.case): v for v in targets.judge(rows)}

    def check(goal, case, ours, figure, met):
        v = verdicts[(goal, case)]
        assert (v.ours, v.met) == (ours, met) and (v.figure == pytest.approx(figure)
                                                    if figure is not None else v.figure is None)
        return v

    v = check("grouped_topk at 4096 tokens", "T=4096 E=256 G=8/4 K=8 bf16", "triton", 7.0, True)
    assert (v.peer, v.peer_figure) == ("torch-eager", 280.0)
    check("grouped_topk at decode (1-64 tokens)", "T=1 E=256 G=8/4 K=8 bf16", "cuda", 5.0, False)
    check("permute, 4096 tokens, H=7168", "permute T=4096 K=8 E=256 H=7168 bf16", "triton",
          90.0, True)
    check("grouped_gemm_fp8 N=4096 K=7168", "GEMM1 8x4096 rows N=4096 K=7168", "triton-ws",
          1250.0, True)
    check("grouped_gemm_fp8 over cuBLAS block-scaled _scaled_mm",
          "GEMM1 8x4096 rows N=4096 K=7168", "triton-ws", 90.0 / 80.0, True)
    check("quantize_fp8_per_token_group, most rows", "quant 1x128 T=4096 H=7168 bf16",
          "triton", 2950.0, True)
    check("mla_decompress_kv, T >= 8192", "contiguous T=16384 H=128 bf16, fp8", "triton",
          600e3 / 16384, True)
    check("DeepseekV3MoE decode, 1 token", "DeepseekV3MoE T=1 E=256+1 H=7168", "triton",
          100 / 70, False)
    check("eager call above its kernels", "unpermute (triton)", "triton", 12.5, False)
    v = check("eager call above its kernels", "unpermute (cuda)", "cuda", None, None)
    assert v.why == "no kernel-alone figure in the row"
    v = check("eager call above its kernels", "permute (triton)", "triton", None, None)
    assert v.why == "the call raised"
    judged_cases = {case for (goal, case) in verdicts if goal.startswith(("quant", "mla"))}
    assert judged_cases == {"quant 1x128 T=4096 H=7168 bf16",
                            "contiguous T=16384 H=128 bf16, fp8"}
    assert verdicts[("grouped_gemm_fp8 N=7168 K=2048", "-")].why == "no row in the file"
    path = tmp_path / "r.json"
    path.write_text(json.dumps({"meta": {"device": "Stand-in GPU", "commit": "abc"},
                                "results": rows}))
    assert cli.main(["--targets", str(path)]) == 0
    out = capsys.readouterr().out
    assert "Goals judged on Stand-in GPU (commit abc)" in out
    assert ("| grouped_topk at 4096 tokens | T=4096 E=256 G=8/4 K=8 bf16 | triton | 7 | <= 8 us "
            "| yes | torch-eager 280 us |") in out
    assert "| grouped_gemm_fp8 N=7168 K=2048 | - | - | - | >= 1050 TFLOPS | no row in the file |" \
        in out
    # met: topk 4096, permute, GEMM1 twice, quant, MLA; not: topk T=1, the layer, eager triton
    assert out.rstrip().endswith("6 of 9 judged cases meet their goal; 8 without a figure.")


def test_bench_weights_are_drawn_on_their_device_one_expert_at_a_time(monkeypatch):
    """The bench's FP8 expert weights (bench/common.py random_fp8_weights): every draw is
    one expert's (N, K), made on the weights' device (a host copy of DeepSeek-V3's 256
    experts would be 30 GB and ~45 s of a seeded CPU generator before the first GPU row),
    and each expert is the reference's 128x128-block quantization of its draw."""
    import torch

    from moe_kernels.bench import common
    from moe_kernels.reference import fp8 as ref_fp8
    draws, randn = [], torch.randn

    def recorded(*args, **kwargs):
        x = randn(*args, **kwargs)
        draws.append(x)
        return x

    monkeypatch.setattr(torch, "randn", recorded)
    q, s = common.random_fp8_weights((3, 200, 130), 0.5, "cpu",
                                     torch.Generator().manual_seed(0))
    monkeypatch.undo()
    assert [tuple(d.shape) for d in draws] == [(200, 130)] * 3
    assert q.shape == (3, 200, 130) and s.shape == (3, 2, 2)
    for e, d in enumerate(draws):
        want_q, want_s = ref_fp8.quantize_fp8_block(d * 0.5)
        assert torch.equal(q[e].view(torch.uint8), want_q.view(torch.uint8)), e
        assert torch.equal(s[e], want_s), e
    assert 0.4 < ref_fp8.dequantize_fp8_block(q, s).std() < 0.6


def test_warm_calls_each_of_our_rows_once_and_times_nothing(monkeypatch, quick_timing):
    """moe-bench --warm (bench/warm.py): under common.warming a module calls exactly the
    rows of ours that its timed run has (same ops, cases, backends; eager-call rows too),
    each once, untimed and unchecked, and no torch peer; a call that raises is passed on
    to the timed run."""
    from moe_kernels.bench import common, gating
    timed_rows = gating.run("cpu", None, [1, 16], compile_reference=False)
    timed_rows += common.eager_call_rows(gating.MEASURES, "cpu", None)
    ours = {(r.op, r.case, r.backend) for r in timed_rows if not common.is_peer(r.backend)}
    assert len(ours) >= 3 and any(common.is_peer(r.backend) for r in timed_rows)

    def untimed(*args, **kwargs):
        raise AssertionError("a warm pass timed a row")

    for name in ("timed_spread", "_time_cpu_interleaved", "host_us_per_call",
                 "copy_bandwidth_gbps"):
        monkeypatch.setattr(common, name, untimed)
    with common.warming() as calls:
        assert gating.run("cpu", None, [1, 16], compile_reference=False) == []
        assert common.eager_call_rows(gating.MEASURES, "cpu", None) == []
        made = []
        entries = [("cpu", lambda i: made.append("cpu")),
                   ("torch-eager", lambda i: made.append("peer")),
                   ("triton", lambda i: 1 / 0)]
        assert common.measure("permute", "c", "cpu", entries, 0, 1, check=untimed) == []
    assert made == ["cpu"]
    assert calls[-2:] == [("permute", "c", "cpu"), ("permute", "c", "triton")]
    assert sorted(calls[:-2]) == sorted(ours)
    # shards (processes of one module): each row in exactly one
    shares = []
    for index in range(3):
        with common.warming(index, 3) as calls:
            gating.run("cpu", None, [1, 16], compile_reference=False)
            common.eager_call_rows(gating.MEASURES, "cpu", None)
        shares.append(calls)
    assert sorted(sum(shares, [])) == sorted(ours) and sum(map(bool, shares)) >= 2, shares


def test_warm_pass_computes_no_expected_value(monkeypatch):
    """The fused MoE and layer modules' expected values (DeepSeek-V3's experts through the
    torch path: ~50 GB of float32 temporaries at the layer's T=16 on the GPU) are computed
    at the first check (common.once), which a warm pass never makes."""
    from moe_kernels.bench import common, fused_moe, layer
    from moe_kernels.reference import fused_moe as ref_fused

    def expected(*args, **kwargs):
        raise AssertionError("a warm pass computed an expected value")

    monkeypatch.setattr(ref_fused, "moe_forward", expected)
    monkeypatch.setattr(layer, "torch_layer", expected)
    with common.warming() as calls:
        fused_moe.run("cpu", ["cpu"], [1], compile_reference=False)
        layer.run("cpu", ["cpu"], [1], compile_reference=False)
    assert [c[2] for c in calls] == ["cpu", "cpu"]


def test_warm_pass_runs_each_selected_module_but_the_expert_parallel_one():
    """The module list of a warm pass: each selected op module once (its processes then
    split its rows); the expert-parallel one (its ranks are processes of their own)
    never. --warm times nothing, so it takes no --json."""
    from moe_kernels.bench import expert_parallel, fused_moe, permute, warm
    assert warm.warmed_modules(["permute", "unpermute", "fused_moe_fp8"]) == [permute, fused_moe]
    assert expert_parallel not in warm.warmed_modules(None)
    assert len(warm.warmed_modules(None)) == len(cli.MODULES) - 1
    with pytest.raises(SystemExit, match="--warm times nothing"):
        cli.main(["--warm", "--json", "x.json"])


def test_gpu_timing_of_a_slow_call_is_bounded():
    """A row's CUDA-graph timing keeps 16 calls x 20 replays for the kernels (up to ~3 ms
    a call), and spends about a second of device time on a slow torch path instead of
    339 calls (a 35 ms one: 12 s); every input set still runs, 5 replays at least. Rows
    timed by events likewise."""
    from moe_kernels.bench import common
    for call_ms in (0.003, 0.05, 1.0, 3.0):
        assert common.graph_shape(call_ms, 4) == (16, 20)
    assert common.graph_shape(0.003, 64) == (64, 20)
    for call_ms, n_sets in ((10.0, 1), (35.0, 1), (35.0, 4), (400.0, 2)):
        calls, reps = common.graph_shape(call_ms, n_sets)
        assert calls >= n_sets and reps >= 5
        assert calls * reps * call_ms <= max(1200.0, 5 * n_sets * call_ms), (call_ms, n_sets)
    assert common.graph_shape(35.0, 1) == (1, 20)
    assert common.events_reps(0.01) == 200 and common.events_reps(35.0) == 28
    assert common.events_reps(400.0) == 20


def test_grouped_gemm_tuner_compiles_each_candidate_in_one_of_its_processes(monkeypatch):
    """benchmarks/tune_grouped_gemm.py compiles its candidates in several processes before
    the sweep: the shares are the sweep's candidates, each in one share, each share with
    candidates of every kind; a share calls each of its candidates at both shapes with the
    candidate's table in force (stand-in operands: the real ones are CUDA tensors)."""
    from moe_kernels.configs import grouped_gemm as configs
    tune = _load_script("tune_grouped_gemm")
    items = tune.sweep(quick=True, ws=True)
    shares = [tune.shard(items, i, 8) for i in range(8)]
    assert sorted(map(repr, sum(shares, []))) == sorted(map(repr, items))
    assert all({kind for kind, _, _ in share} == set(configs.KINDS) for share in shares)
    calls = []

    def operands(kind, rows, N, K):
        return lambda: calls.append((kind, rows, N, K, configs.table_in_force(None)))

    monkeypatch.setattr(tune, "operands", operands)
    monkeypatch.setattr(tune.torch.cuda, "synchronize", lambda: None)
    tune.compile_share(True, True, 3, 8)
    assert len(calls) == 2 * len(shares[3])
    for (kind, bucket, cfg), pair in zip(shares[3], zip(calls[::2], calls[1::2])):
        assert [c[2:4] for c in pair] == tune.SHAPES
        assert all(c[0] == kind and c[1] == tune.ROWS_OF_BUCKET[bucket] for c in pair)
        assert all(c[4][kind] == [dict(cfg, max_m=None)] for c in pair)
