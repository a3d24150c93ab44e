"""Nothing that can block runs in the monitor thread, and only the monitor writes outcomes."""

from __future__ import annotations

import os
import signal
import threading
from concurrent.futures import CancelledError
from pathlib import Path
from typing import Any, Dict, List, Optional

import pytest

import bgtask
from bgtask import Limiter, TaskStopped, background
from bgtask._main.state import TaskCore

from .helpers import run_script, wait_until


def _plus_one(i: int) -> int:
    return i + 1


def test_a_done_callback_may_start_tasks(start_method: Optional[str]) -> None:
    """A chain of tasks, each started by the previous one's done-callback, runs to its end."""
    step = background(_plus_one, start_method=start_method)
    finished = threading.Event()
    seen: List[int] = []

    def next_step(task: Any) -> None:
        value = task.result()
        seen.append(value)
        if value < 8:
            step(value).add_done_callback(next_step)
        else:
            finished.set()

    step(0).add_done_callback(next_step)
    assert step(99).result(timeout=30) == 100  # meanwhile, other tasks start and end
    assert finished.wait(60), seen
    assert seen == list(range(1, 9))


release = threading.Event()


class WaitsToUnpickle:
    """A result whose unpickling, in the main program, waits until the test releases it."""

    def __init__(self) -> None:
        self.value = 1

    def __setstate__(self, state: Dict[str, Any]) -> None:
        self.__dict__.update(state)
        if os.environ.get("BGTASK_TEST_MAIN") == str(os.getpid()):
            release.wait(60)


def _slow_result() -> WaitsToUnpickle:
    return WaitsToUnpickle()


def test_a_callback_unpickling_a_slow_result_holds_up_no_other_task(
    start_method: Optional[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """While a done-callback unpickles a slow result, other tasks start, end and report."""
    monkeypatch.setenv("BGTASK_TEST_MAIN", str(os.getpid()))
    release.clear()
    values: List[int] = []
    slow = background(_slow_result, start_method=start_method)()
    slow.add_done_callback(lambda task: values.append(task.result().value))
    slow.join(timeout=30)
    try:
        assert background(_plus_one, start_method=start_method)(1).result(timeout=30) == 2
        assert values == []  # the callback is still unpickling
    finally:
        release.set()
    assert wait_until(lambda: values == [1])


SIGNAL_HANDLER_STARTS = """
import os, signal, threading, bgtask

@bgtask.background
def ident(x):
    return x

started = []
busy = []
def handler(signum, frame):
    if busy:                         # a handler interrupted by its own signal: let it finish
        return
    busy.append(1)
    try:
        started.append(ident("h"))   # may land while the main thread is inside a start
    finally:
        busy.clear()
signal.signal(signal.SIGUSR1, handler)

stop = threading.Event()
def pester():
    while not stop.wait(0.003):
        signal.pthread_kill(threading.main_thread().ident, signal.SIGUSR1)
threading.Thread(target=pester, daemon=True).start()
results = [ident(i).result(timeout=60) for i in range(40)]
stop.set()
extra = [t.result(timeout=60) for t in list(started)]
print("done", results == list(range(40)), len(extra) > 0, set(extra) <= {"h"}, flush=True)
"""


def test_a_signal_handler_may_start_tasks_during_a_start(tmp_path: Path) -> None:
    """Tasks started by a signal handler that interrupts a start run, and nothing deadlocks."""
    result = run_script(tmp_path, SIGNAL_HANDLER_STARTS, timeout=150)
    assert result.stdout.split() == ["done", "True", "True", "True"], result.stderr


def _sleep_forever() -> None:
    threading.Event().wait()


def test_every_outcome_is_written_in_the_monitor_thread(monkeypatch: pytest.MonkeyPatch) -> None:
    """Results, crashes, cancels, stops while pending and kills all set outcomes in the monitor."""
    threads: List[str] = []
    original = TaskCore._finish_locked

    def recording(self: Any, *args: Any, **kwargs: Any) -> bool:
        threads.append(threading.current_thread().name)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(TaskCore, "_finish_locked", recording)
    limiter = Limiter(1)
    sleeper = background(_sleep_forever, limit=limiter)
    assert background(_plus_one)(1).result(timeout=30) == 2
    running = sleeper()
    pending_cancelled = sleeper()
    pending_stopped = sleeper()
    assert pending_cancelled.cancel()
    with pytest.raises(CancelledError):
        pending_cancelled.result(timeout=30)
    pending_stopped.stop()
    assert isinstance(pending_stopped.exception(timeout=30), TaskStopped)
    assert running.cancel()
    running.join(timeout=30)
    crash = background(os._exit)(3)
    assert isinstance(crash.exception(timeout=30), bgtask.TaskCrashed)
    assert len(threads) >= 5
    assert set(threads) == {"bgtask-monitor"}, threads


PENDING_AT_EXIT = """
import sys, time, pathlib, bgtask

@bgtask.background(limit=1)
def work(i):
    time.sleep(0.2)
    pathlib.Path(sys.argv[1], f"{i}.done").touch()

tasks = [work(i) for i in range(3)]   # two wait for the place when the script ends
"""


def test_tasks_pending_at_the_end_of_the_program_run(tmp_path: Path) -> None:
    """Non-daemon tasks still waiting for a Limiter's place when the script ends all run."""
    result = run_script(tmp_path, PENDING_AT_EXIT, args=[str(tmp_path)])
    assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in tmp_path.glob("*.done")) == ["0.done", "1.done", "2.done"], result.stderr


def test_a_log_handler_may_start_a_task(start_method: Optional[str]) -> None:
    """A main-program log handler (run in the monitor thread) that starts a task gets it started."""
    import logging

    started: List[Any] = []
    step = background(_plus_one, start_method=start_method)

    class Starts(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if record.getMessage() == "start one":
                started.append(step(1))

    handler = Starts()
    logger = logging.getLogger("bgtask-test-starter")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        background(_logs_start_one, start_method=start_method)().result(timeout=30)
        assert wait_until(lambda: len(started) == 1)
        assert started[0].result(timeout=30) == 2
    finally:
        logger.removeHandler(handler)


def _logs_start_one() -> None:
    import logging

    logging.getLogger("bgtask-test-starter").info("start one")


def test_signal_module_is_untouched_by_a_start() -> None:
    """A start leaves the main program's SIGINT handler as it found it."""
    before = signal.getsignal(signal.SIGINT)
    background(_plus_one)(1).result(timeout=30)
    assert signal.getsignal(signal.SIGINT) is before
