"""Shared fixtures: start methods, and the guard that no test leaves a process or fd behind."""

from __future__ import annotations

import logging
import os
import signal
import sys
import warnings
from typing import Dict, Iterator, List, Optional

import pytest

import bgtask
from bgtask._backends import launch as _launch
from bgtask._main import lifecycle as _lifecycle
from bgtask._monitor import loop as _monitor

from .helpers import Collect, descendants, describe_pids, fd_count, wait_until

START_METHODS = [None, "fork", "spawn", "forkserver"]


@pytest.fixture(params=START_METHODS, ids=lambda m: m or "zygote")
def start_method(request: pytest.FixtureRequest) -> Iterator[Optional[str]]:
    """Each start method: bgtask's zygote (the default) and the three of multiprocessing."""
    method = request.param
    if method == "fork":
        # The test process has threads (bgtask's monitor); fork warns about that on 3.12+,
        # and that warning is the user's to see, not a test failure.
        with warnings.catch_warnings():
            warnings.filterwarnings(
                "ignore", message=".*use of fork\\(\\) may lead to deadlocks", category=DeprecationWarning
            )
            yield method
    else:
        yield method


@pytest.fixture(
    params=[(False, False), (False, True), (True, False), (True, True)],
    ids=["worker", "worker-graceful", "daemon", "daemon-graceful"],
)
def kind(request: pytest.FixtureRequest) -> Dict[str, bool]:
    """Each kind of task: daemon or not, graceful or not (options for ``@background``)."""
    daemon, graceful = request.param
    return {"daemon": daemon, "graceful": graceful}


@pytest.fixture(params=[False, True], ids=["worker", "daemon"])
def daemon(request: pytest.FixtureRequest) -> bool:
    """Daemon and non-daemon tasks, for behaviour that depends on gracefulness alone."""
    return bool(request.param)


@pytest.fixture
def collected() -> Iterator[List[logging.LogRecord]]:
    """The records that reach the main program's ``bgtask_test`` logger (level INFO)."""
    handler = Collect()
    top = logging.getLogger("bgtask_test")
    top.addHandler(handler)
    top.setLevel(logging.INFO)
    top.propagate = False
    try:
        yield handler.records
    finally:
        top.removeHandler(handler)
        top.setLevel(logging.NOTSET)
        top.propagate = True
        for logger in list(logging.root.manager.loggerDict.values()):
            if isinstance(logger, logging.Logger) and logger.name.startswith("bgtask_test."):
                logger.setLevel(logging.NOTSET)


@pytest.fixture(scope="session", autouse=True)
def _multiprocessing_helpers() -> None:
    """Start multiprocessing's own long-lived helpers once, so they do not count as leaks."""
    from multiprocessing import forkserver, resource_tracker

    resource_tracker.ensure_running()
    forkserver.ensure_running()


@pytest.fixture(autouse=True)
def _no_leftovers(request: pytest.FixtureRequest) -> Iterator[None]:
    """Fail a test that leaves a task running, a process behind, or descriptors open."""
    _launch.close_all()
    _monitor.get()  # started once per process; its descriptors are not a leak
    before_fds = fd_count()
    yield
    live = wait_until(lambda: not _lifecycle.live_tasks(), timeout=15)
    leftover_tasks = _lifecycle.live_tasks()
    for task in leftover_tasks:
        task.kill()
    if wait_until(lambda: not _lifecycle.live_tasks(), timeout=15):
        # The exit procedure, as at the end of a program: this also ends the zygote.
        _lifecycle.shutdown()
    else:  # never wait without a bound in a fixture: report instead
        _launch.close_all()
    gone = wait_until(lambda: not descendants(), timeout=15)
    stray = descendants()
    for pid in stray:
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass
    assert live, f"tasks still running after the test: {leftover_tasks}"
    assert gone, f"processes left behind: {describe_pids(stray)}"
    if request.node.get_closest_marker("ray") is not None:
        return  # a Ray client opens connections as it goes, and keeps them
    # Descriptors are released when tasks finish, not when handles are collected.
    assert wait_until(lambda: fd_count() <= before_fds, timeout=10), (
        f"descriptors leaked: {before_fds} before, {fd_count()} after"
    )


def pytest_report_header() -> str:
    return f"bgtask {bgtask.__version__}, python {sys.version.split()[0]}"
