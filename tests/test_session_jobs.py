"""The background lane of subprocess checks (tests/session_jobs.py): a job runs only for
selected tests that read it, the lane runs jobs in the order they are read, a fixture gets
its job's own output, a module's readers run once its jobs have ended, and a job past its
time limit is killed."""

import subprocess
import sys
import time
import types

import pytest

import session_jobs


def _item(module: str, *fixtures: str, name: str = "test"):
    return types.SimpleNamespace(module=types.SimpleNamespace(__name__=module),
                                 fixturenames=list(fixtures), nodeid=f"{module}.py::{name}")


def _declare(key: str, code: str, fixture: str, timeout_s: float = 60):
    session_jobs.declare(key, [sys.executable, "-c", code], module="fake_module",
                         fixture=fixture, timeout_s=timeout_s)
    return key


def test_a_fixture_gets_its_own_jobs_output():
    _declare("selftest-out", "import sys; print('to out'); print('to err', file=sys.stderr);"
             "sys.exit(3)", "fixture_out")
    assert session_jobs.result("selftest-out") == (3, "to out\n", "to err\n")


def test_only_jobs_of_selected_tests_run_in_the_order_they_are_read(tmp_path):
    log = tmp_path / "log"
    code = f"open({str(log)!r}, 'a').write('{{}}\\n')"
    first = _declare("selftest-first", code.format("first"), "fixture_first")
    second = _declare("selftest-second", code.format("second"), "fixture_second")
    unread = _declare("selftest-unread", code.format("unread"), "fixture_unread")
    items = [_item("fake_module", "fixture_second"), _item("other_module", "fixture_unread"),
             _item("fake_module", "tmp_path", "fixture_first")]
    assert [session_jobs.uses_jobs(i) for i in items] == [True, False, True]
    session_jobs.start_lane(items)
    for key in (second, first):   # the lane's order, so these calls start no job themselves
        session_jobs.result(key)
    time.sleep(0.5)   # time for a wrongly queued third job to write its line
    assert log.read_text().split() == ["second", "first"]
    assert session_jobs._JOBS[unread].proc is None


def test_a_job_past_its_time_limit_is_killed():
    key = _declare("selftest-slow", "import time; time.sleep(60)", "fixture_slow",
                   timeout_s=0.5)
    with pytest.raises(subprocess.TimeoutExpired):
        session_jobs.result(key)
    assert session_jobs._JOBS[key].proc.poll() is not None


def test_readers_run_between_the_other_tests_once_their_jobs_have_ended():
    """run_order picks each test as the one before it starts: a module whose jobs have
    not ended waits behind the other tests (here: not started), one whose jobs have ended
    runs next, all its readers together."""
    key = _declare("selftest-order", "pass", "fixture_order")
    others = [_item("other_module", name=f"other_{i}") for i in range(3)]
    readers = [_item("fake_module", "fixture_order", name=f"reader_{i}") for i in range(2)]
    assert [x.nodeid for x in session_jobs.run_order(others + readers)] == \
        [x.nodeid for x in others + readers]

    order = session_jobs.run_order(others + readers)
    assert next(order) is others[0]
    session_jobs.result(key)           # started here, and ended
    assert [next(order) for _ in range(4)] == [readers[0], readers[1], others[1], others[2]]
    assert next(order, None) is None
