"""tests/run_parallel.py and tests/work_sharing.py (`make test`): several pytest processes
share one list of tests, each test run by exactly one of them, on a stand-in suite."""

import json
import pathlib
import signal
import subprocess
import sys
import textwrap
import time

TESTS = pathlib.Path(__file__).resolve().parent

CONFTEST = f"""
import sys
sys.path.insert(0, {str(TESTS)!r})
import work_sharing


def pytest_configure(config):
    config.pluginmanager.register(work_sharing, "work_sharing")


def pytest_collection_modifyitems(session, config, items):
    work_sharing.select(config, items)
"""

# Two modules with a module-scoped fixture each: a process passing over tests must still
# set up and tear down each module's fixture in order (pytest errors otherwise).
MODULE = """
import json, os, time
import pytest

LOG = {log!r}


def record(event):
    with open(LOG, "a") as f:
        f.write(json.dumps([os.getpid(), event]) + "\\n")


@pytest.fixture(scope="module")
def resource():
    record("setup {name}")
    yield
    record("teardown {name}")


@pytest.mark.parametrize("i", range(8))
def test_case(resource, i, request):
    time.sleep(0.1)
    record(request.node.nodeid)
    assert not ({fail!r} and i == 5)
"""


def _suite(tmp_path, fail_in=None):
    log = tmp_path / "log.jsonl"
    (tmp_path / "conftest.py").write_text(textwrap.dedent(CONFTEST))
    for name in ("test_a", "test_b"):
        text = MODULE.format(log=str(log), name=name, fail=name == fail_in)
        (tmp_path / f"{name}.py").write_text(textwrap.dedent(text))
    return log


def _run(tmp_path, procs):
    env = {"MOE_KERNELS_TEST_PROCS": str(procs), "PATH": "/usr/bin:/bin"}
    return subprocess.run([sys.executable, str(TESTS / "run_parallel.py"), str(tmp_path),
                           "-q", "-p", "no:cacheprovider"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)


def test_each_test_runs_once_and_fixtures_pair_up(tmp_path):
    log = _suite(tmp_path)
    r = _run(tmp_path, 2)
    assert r.returncode == 0, r.stdout + r.stderr
    events = [json.loads(line) for line in log.read_text().splitlines()]
    ran = [e for pid, e in events if "::" in e]
    assert sorted(ran) == sorted(f"test_{m}.py::test_case[{i}]" for m in "ab"
                                 for i in range(8))
    pids = {pid for pid, e in events if "::" in e}
    assert len(pids) == 2, f"one process ran every test: {events}"
    for pid in pids:   # each process that ran a module's test set it up once, tore it down
        mine = [e for p, e in events if p == pid and "::" not in e]
        for name in ("test_a", "test_b"):
            if any(p == pid and e.startswith(name) for p, e in events):
                assert mine.count(f"setup {name}") == mine.count(f"teardown {name}") == 1
    assert "test process 1 of 2" in r.stdout and "16 passed" not in r.stdout


def test_a_failure_in_any_process_fails_the_run(tmp_path):
    _suite(tmp_path, fail_in="test_b")
    r = _run(tmp_path, 2)
    assert r.returncode == 1, r.stdout + r.stderr
    assert "1 failed" in r.stdout and "test_b.py::test_case[5]" in r.stdout


def test_one_process_is_plain_pytest(tmp_path):
    _suite(tmp_path)
    r = _run(tmp_path, 1)
    assert r.returncode == 0 and "16 passed" in r.stdout, r.stdout + r.stderr
    assert "test process" not in r.stdout


def test_a_stopped_run_leaves_no_test_process(tmp_path):
    """A CI time limit's SIGTERM to the runner ends its pytest processes too."""
    log = tmp_path / "log.jsonl"
    (tmp_path / "conftest.py").write_text(textwrap.dedent(CONFTEST))
    (tmp_path / "test_slow.py").write_text(textwrap.dedent(f"""
        import json, os, time
        import pytest

        @pytest.mark.parametrize("i", range(4))
        def test_slow(i):
            with open({str(log)!r}, "a") as f:
                f.write(json.dumps(os.getpid()) + "\\n")
            time.sleep(60)
        """))
    env = {"MOE_KERNELS_TEST_PROCS": "2", "PATH": "/usr/bin:/bin"}
    runner = subprocess.Popen([sys.executable, str(TESTS / "run_parallel.py"), str(tmp_path),
                               "-q", "-p", "no:cacheprovider"], cwd=tmp_path, env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and (not log.exists()
                                           or len(log.read_text().splitlines()) < 2):
        time.sleep(0.1)
    pids = {json.loads(line) for line in log.read_text().splitlines()}
    assert len(pids) == 2, "both processes should be inside a test"
    runner.send_signal(signal.SIGTERM)
    assert runner.wait(timeout=30) != 0
    for pid in pids:
        assert not pathlib.Path(f"/proc/{pid}").exists() or \
            pathlib.Path(f"/proc/{pid}/stat").read_text().split()[2] == "Z", \
            f"test process {pid} outlived the runner"
