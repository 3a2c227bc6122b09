"""moe-bench's command line: a real (small) run to JSON, --compare's speedups and
regression flags, --plot's PNG."""

from __future__ import annotations

import json

import pytest

from moe_kernels import _library
from moe_kernels.bench import cli
from moe_kernels.bench.common import Result


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
