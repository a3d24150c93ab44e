"""bgtask's pytest plugin, run in pytest processes of their own (pytester)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import List

import pytest

from .helpers import DEADLINE_S, pid_alive, proc_stat, wait_until

pytest_plugins = ["pytester"]

SERVER = '''
import http.server
import os
import pathlib

import bgtask


def serve(record=None):
    """An HTTP server on port 0; it writes its pid to ``record`` and reports its port."""
    server = http.server.HTTPServer(("127.0.0.1", 0), http.server.BaseHTTPRequestHandler)
    if record:
        pathlib.Path(record + ".tmp").write_text(str(os.getpid()))
        os.replace(record + ".tmp", record)
    try:
        bgtask.ready(server.server_address[1])
        server.serve_forever(poll_interval=0.05)
    finally:
        server.server_close()
'''

LEAKY = """
import os
import pathlib
import threading

import pytest

import bgtask


@bgtask.background(daemon=True, name="forgotten")
def forgotten(record):
    # Whole or not at all: the test goes on (and the check kills this task) once it exists.
    pathlib.Path(record + ".tmp").write_text(str(os.getpid()))
    os.replace(record + ".tmp", record)
    threading.Event().wait()


@bgtask.background(daemon=True, name="scoped")
def scoped():
    threading.Event().wait()


def test_leaks(tmp_path_factory):
    record = pathlib.Path(os.environ["LEAK_RECORD"])
    forgotten(str(record))
    while not record.exists():
        pass


def test_clean():
    with scoped():
        pass
"""


def _pids_in(directory: Path) -> List[int]:
    """The pids the tasks recorded, each in a file of its own, written whole (``os.replace``)."""
    return [int(path.read_text()) for path in directory.glob("pid-*") if path.suffix != ".tmp"]


def _session_processes(sid: int) -> List[int]:
    """Live processes of session ``sid`` (a pytest run started in a session of its own)."""
    found = []
    for name in os.listdir("/proc"):
        if name.isdigit():
            fields = proc_stat(int(name))
            if fields is not None and fields[0] != "Z" and int(fields[3]) == sid:
                found.append(int(name))
    return found


def test_the_plugin_is_inert_unless_used(pytester: pytest.Pytester) -> None:
    """Loaded but unused, the plugin starts nothing: no thread, no process, no bgtask runtime."""
    pytester.makepyfile(
        """
        import os, sys, threading

        def test_nothing_of_bgtask_runs():
            assert "bgtask.pytest_plugin" in sys.modules
            assert [t.name for t in threading.enumerate()] == ["MainThread"]
            assert "bgtask._monitor.loop" not in sys.modules
            assert "bgtask._backends.zygote_client" not in sys.modules
        """
    )
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider")
    result.assert_outcomes(passed=1)


@pytest.mark.parametrize("how", ["marker", "fixture", "option", "ini"])
def test_the_leak_check_fails_a_leaking_test_and_stops_its_task(
    pytester: pytest.Pytester, how: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A test that leaves a task running errors at teardown, naming it; a clean one passes."""
    source = LEAKY
    args = ["-p", "no:cacheprovider"]
    if how == "marker":
        source += "\npytestmark = pytest.mark.bgtask_leaks\n"
    elif how == "fixture":
        source = source.replace("def test_leaks(tmp_path_factory)", "def test_leaks(bgtask_leak_check)")
        source = source.replace("def test_clean()", "def test_clean(bgtask_leak_check)")
    elif how == "option":
        args.append("--bgtask-leaks")
    else:
        pytester.makeini("[pytest]\nbgtask_leaks = true\n")
    pytester.makepyfile(test_leaky=source)
    record = pytester.path / "pid-forgotten"
    monkeypatch.setenv("LEAK_RECORD", str(record))
    result = pytester.runpytest_subprocess(*args)
    result.assert_outcomes(passed=2, errors=1)
    result.stdout.fnmatch_lines(
        [
            "*ERROR at teardown of test_leaks*",
            "*the test left 1 bgtask task(s) running; stopped now:*",
            "*'forgotten' (pid *, daemon), started at *test_leaky.py:* in test_leaks*",
        ]
    )
    assert "test_clean" not in result.stdout.str().split("short test summary")[-1]
    pid = int(record.read_text())
    assert wait_until(lambda: not pid_alive(pid))


def test_without_the_check_a_leaking_test_passes(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Unless asked for, nothing is checked; the exit procedure still ends the task."""
    pytester.makepyfile(test_leaky=LEAKY)
    record = pytester.path / "pid-forgotten"
    monkeypatch.setenv("LEAK_RECORD", str(record))
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider")
    result.assert_outcomes(passed=2)
    pid = int(record.read_text())
    assert wait_until(lambda: not pid_alive(pid))


def test_service_fixtures_start_and_stop_servers(pytester: pytest.Pytester) -> None:
    """bgtask_session_service and bgtask_service return the port; servers end with their scope."""
    pytester.makepyfile(server=SERVER)
    pytester.makeconftest(
        """
        import pytest
        from server import serve

        @pytest.fixture(scope="session")
        def session_port(bgtask_session_service, tmp_path_factory):
            return bgtask_session_service(serve, str(tmp_path_factory.getbasetemp().parent / "pid-session"))
        """
    )
    pytester.makepyfile(
        test_services="""
        import pathlib, urllib.error, urllib.request
        import pytest
        from server import serve

        pytestmark = pytest.mark.bgtask_leaks

        def get(port):
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=30)
            except urllib.error.HTTPError as exc:
                return exc.code  # the bare handler answers 501: the server is there

        def test_first(session_port):
            assert get(session_port) == 501

        def test_second(session_port, bgtask_service, tmp_path_factory):
            own = bgtask_service(serve, str(tmp_path_factory.getbasetemp().parent / "pid-own"))
            assert own != session_port
            assert get(own) == 501
            assert get(session_port) == 501
        """
    )
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "--basetemp", str(pytester.path / "tmp"))
    result.assert_outcomes(passed=2)
    pids = _pids_in(pytester.path)
    assert len(pids) == 2
    assert wait_until(lambda: not any(pid_alive(pid) for pid in pids))


XDIST_TESTS = """
import os, pathlib, threading, urllib.error, urllib.request
import pytest

WAIT = os.environ.get("BGTASK_TEST_WAIT") == "1"

@pytest.mark.parametrize("n", range(6))
def test_uses_the_server(port, n):
    try:
        urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=30)
    except urllib.error.HTTPError as exc:
        assert exc.code == 501
    if WAIT:
        threading.Event().wait()  # until the run is interrupted
"""

XDIST_CONFTEST = """
import os, pathlib
import pytest
from server import serve

@pytest.fixture(scope="session")
def port(bgtask_session_service):
    worker = os.environ.get("PYTEST_XDIST_WORKER", "main")
    return bgtask_session_service(serve, str(pathlib.Path(os.environ["PID_DIR"]) / f"pid-{worker}"))
"""


def _xdist_project(pytester: pytest.Pytester) -> None:
    pytest.importorskip("xdist")
    pytester.makepyfile(server=SERVER, test_xdist=XDIST_TESTS)
    pytester.makeconftest(XDIST_CONFTEST)


def test_xdist_workers_each_run_a_server_and_leave_nothing(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Three xdist workers, a session server each: all served, all gone after the run."""
    _xdist_project(pytester)
    monkeypatch.setenv("PID_DIR", str(pytester.path))
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "-n", "3", "--bgtask-leaks")
    result.assert_outcomes(passed=6)
    pids = _pids_in(pytester.path)
    assert len(pids) == 3
    assert wait_until(lambda: not any(pid_alive(pid) for pid in pids))


def test_ctrl_c_during_an_xdist_run_leaves_nothing(pytester: pytest.Pytester) -> None:
    """Ctrl-C while three workers each run a server: the run ends and no process is left."""
    _xdist_project(pytester)
    env = dict(os.environ, PID_DIR=str(pytester.path), BGTASK_TEST_WAIT="1")
    run = subprocess.Popen(
        [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-n", "3", "-q"],
        cwd=str(pytester.path),
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,  # a terminal of its own: Ctrl-C reaches its whole group
    )
    try:
        assert wait_until(lambda: len(_pids_in(pytester.path)) == 3, timeout=DEADLINE_S * 2)
        servers = _pids_in(pytester.path)
        os.killpg(run.pid, signal.SIGINT)
        try:
            run.wait(DEADLINE_S * 2)
        except subprocess.TimeoutExpired:
            os.killpg(run.pid, signal.SIGINT)  # pytest asks for a second Ctrl-C at times
            run.wait(DEADLINE_S)
        assert wait_until(lambda: not any(pid_alive(pid) for pid in servers))
        assert wait_until(lambda: not _session_processes(run.pid)), _session_processes(run.pid)
    finally:
        if run.poll() is None:
            os.killpg(run.pid, signal.SIGKILL)
            run.wait()
        for pid in _session_processes(run.pid):
            os.kill(pid, signal.SIGKILL)
        assert run.stdout is not None
        with run.stdout:
            output = run.stdout.read().decode(errors="replace")
    assert "KeyboardInterrupt" in output or "Interrupted" in output, textwrap.shorten(output, 2000)
