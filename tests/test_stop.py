"""Stopping a task: graceful and not, escalation after grace, timeouts, the whole tree."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Dict, Optional

import pytest

import bgtask
from bgtask import TaskStopped, background, stop_event

from .helpers import pid_alive, run_script, wait_until


def _marker(tmp_path: Path, name: str) -> Path:
    return tmp_path / name


def test_graceful_task_sees_its_stop_event(start_method: Optional[str], daemon: bool, tmp_path: Path) -> None:
    """A graceful task that watches stop_event() finishes on its own; its return value counts."""
    ready = _marker(tmp_path, "ready")

    @background(graceful=True, daemon=daemon, start_method=start_method)
    def loop() -> str:
        event = stop_event()
        ready.touch()
        while not event.is_set():
            event.wait(0.05)
        return "finished cleanly"

    task = loop()
    assert wait_until(ready.exists)
    task.stop(timeout=60)
    assert task.result(0) == "finished cleanly"
    assert task.exitcode == 0


def test_graceful_task_runs_finally_on_stop(
    start_method: Optional[str], daemon: bool, tmp_path: Path
) -> None:
    """A graceful task that ignores its event gets an exception; its finally block runs."""
    ready, cleaned = _marker(tmp_path, "ready"), _marker(tmp_path, "cleaned")

    @background(graceful=True, daemon=daemon, start_method=start_method)
    def work() -> None:
        try:
            ready.touch()
            threading.Event().wait()
        finally:
            cleaned.touch()

    task = work()
    assert wait_until(ready.exists)
    task.stop(timeout=60)
    assert cleaned.exists()
    with pytest.raises(TaskStopped, match="stopped by stop") as info:
        task.result(0)
    assert info.value.reason == "stop"
    # Where the user's code was: waiting, or (the stop may land a moment after the handshake)
    # still leaving the line that made it.
    cause = str(info.value.__cause__)
    assert "in work" in cause
    assert "threading.Event().wait()" in cause or "ready.touch()" in cause
    assert task.exitcode == -signal.SIGTERM


def test_except_exception_cannot_swallow_the_stop(tmp_path: Path) -> None:
    """The stop exception passes through `except Exception` blocks in the task."""
    ready, cleaned = _marker(tmp_path, "ready"), _marker(tmp_path, "cleaned")

    @background(graceful=True)
    def stubborn() -> None:
        try:
            while True:
                try:
                    ready.touch()
                    time.sleep(3600)
                except Exception:
                    pass
        finally:
            cleaned.touch()

    task = stubborn()
    assert wait_until(ready.exists)
    task.stop(timeout=60)
    assert cleaned.exists()
    assert task.exitcode == -signal.SIGTERM


def test_non_graceful_stop_kills_at_once(start_method: Optional[str], daemon: bool, tmp_path: Path) -> None:
    """A task without graceful=True is killed by stop(): no finally, exitcode -9."""
    ready, cleaned = _marker(tmp_path, "ready"), _marker(tmp_path, "cleaned")

    @background(daemon=daemon, start_method=start_method)
    def work() -> None:
        try:
            ready.touch()
            threading.Event().wait()
        finally:
            cleaned.touch()

    task = work()
    assert wait_until(ready.exists)
    task.stop(timeout=60)
    assert not cleaned.exists()
    assert task.exitcode == -signal.SIGKILL
    with pytest.raises(TaskStopped):
        task.result(0)


def test_task_ignoring_sigterm_is_killed_after_grace(
    start_method: Optional[str], daemon: bool, tmp_path: Path
) -> None:
    """A task ignoring SIGTERM is killed after its grace; stop() returns within grace + 1 s."""
    ready = _marker(tmp_path, "ready")

    @background(graceful=True, grace=0.5, daemon=daemon, start_method=start_method)
    def deaf() -> None:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        ready.touch()
        threading.Event().wait()

    task = deaf()
    assert wait_until(ready.exists)
    started = time.monotonic()
    task.stop(timeout=60)
    elapsed = time.monotonic() - started
    assert task.exitcode == -signal.SIGKILL
    assert elapsed >= 0.5  # the grace was given, not cut short
    assert elapsed < 0.5 + 1.0 + 3.0  # grace + 1 s, plus slack for a loaded machine
    with pytest.raises(TaskStopped):
        task.result(0)


def test_timeout_stops_the_task(start_method: Optional[str], kind: Dict[str, bool]) -> None:
    """timeout= stops a task that runs too long; result() raises TaskStopped(reason='timeout')."""

    @background(timeout=0.2, grace=1.0, start_method=start_method, **kind)
    def forever() -> None:
        threading.Event().wait()

    task = forever()
    with pytest.raises(TaskStopped, match="by its timeout") as info:
        task.result(timeout=60)
    assert info.value.reason == "timeout"


def test_kill_is_immediate_and_does_not_wait(start_method: Optional[str], kind: Dict[str, bool]) -> None:
    """kill() sends SIGKILL to the group; join() then sees exitcode -9."""

    @background(start_method=start_method, **kind)
    def forever() -> None:
        threading.Event().wait()

    task = forever()
    task.pid  # noqa: B018 (wait until it runs)
    task.kill()
    task.join(timeout=60)
    assert task.exitcode == -signal.SIGKILL


def test_stop_after_the_end_does_nothing(start_method: Optional[str], kind: Dict[str, bool]) -> None:
    """stop() and kill() on a finished task return at once and change nothing."""
    task = background(start_method=start_method, **kind)(lambda: 5)()
    task.join(timeout=60)
    task.stop()
    task.kill()
    assert task.result(0) == 5
    assert task.exitcode == 0


def test_stop_kills_subprocess_grandchildren(
    start_method: Optional[str], kind: Dict[str, bool], tmp_path: Path
) -> None:
    """Stopping a task also ends the processes it started with subprocess."""
    pid_file = _marker(tmp_path, "grandchild")

    @background(grace=1.0, start_method=start_method, **kind)
    def parent() -> None:
        child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(3600)"])
        pid_file.write_text(str(child.pid))
        threading.Event().wait()

    task = parent()
    assert wait_until(lambda: pid_file.exists() and pid_file.read_text())
    grandchild = int(pid_file.read_text())
    assert pid_alive(grandchild)
    task.stop(timeout=60)
    assert wait_until(lambda: not pid_alive(grandchild), timeout=5)


def test_stop_kills_grandchildren_left_by_a_finished_task(tmp_path: Path) -> None:
    """Processes a task leaves in its group end when the task ends."""

    @background
    def leave_child() -> int:
        return subprocess.Popen([sys.executable, "-c", "import time; time.sleep(3600)"]).pid

    task = leave_child()
    grandchild = task.result(timeout=60)
    task.join(60)
    assert wait_until(lambda: not pid_alive(grandchild), timeout=5)


def test_stop_event_is_usable_from_threads_of_the_task(tmp_path: Path) -> None:
    """The stop event can be waited for from any thread of the task."""
    ready = _marker(tmp_path, "ready")

    @background(graceful=True)
    def threaded() -> bool:
        event = stop_event()
        seen = []
        worker = threading.Thread(target=lambda: seen.append(event.wait(60)))
        worker.start()
        ready.touch()
        worker.join()
        return seen == [True]

    task = threaded()
    assert wait_until(ready.exists)
    task.stop(timeout=60)
    assert task.result(0) is True


def test_stop_before_the_task_reaches_its_event(tmp_path: Path) -> None:
    """A stop that arrives before the task asked for its event still ends the task."""

    @background(graceful=True)
    def late() -> Any:
        time.sleep(3600)
        return stop_event()

    task = late()
    task.stop(timeout=60)
    with pytest.raises(TaskStopped):
        task.result(0)


def test_stop_from_many_threads_at_once() -> None:
    """Concurrent stop() calls on one task all return once it is gone."""

    @background(graceful=True, grace=2)
    def forever() -> None:
        threading.Event().wait()

    task = forever()
    task.pid  # noqa: B018
    threads = [threading.Thread(target=task.stop, kwargs={"timeout": 60}) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(90)
    assert not task.is_alive()


def test_pid_is_its_own_process_group() -> None:
    """Each task leads its own process group (so that the group can be stopped whole)."""

    @background
    def groups() -> Any:
        return os.getpid(), os.getpgrp()

    pid, pgrp = groups().result(timeout=60)
    assert pid == pgrp


def test_stop_lands_while_the_task_is_inside_its_event_wait(tmp_path: Path) -> None:
    """A stop that arrives inside StopEvent.wait() sets the event; the task cannot deadlock."""
    ready = tmp_path / "ready"

    @background(graceful=True, grace=30.0)
    def busy_waiter() -> int:
        event = stop_event()
        rounds = 0
        while not event.is_set():
            event.wait(0.0001)  # nearly always inside wait() when the signal lands
            rounds += 1
            if rounds == 1:
                ready.touch()  # after a first round: the stop can only land in the loop
        return rounds

    for _ in range(20):
        ready.unlink(missing_ok=True)
        task = busy_waiter()
        assert wait_until(ready.exists)
        task.stop(timeout=10)
        assert task.result(0) > 0
        assert task.exitcode == 0  # finished on its own, not killed after its grace


def test_stop_after_the_outcome_lets_the_cleanup_finish(start_method: Optional[str], tmp_path: Path) -> None:
    """stop() once the result arrived sends no signal: the task's atexit cleanup still runs."""
    if start_method == "fork":
        pytest.skip("under fork a task's atexit handlers are the main program's and do not run")
    go, cleaned = _marker(tmp_path, "go"), _marker(tmp_path, "cleaned")

    @background(grace=60, start_method=start_method)
    def answer() -> int:
        import atexit

        def cleanup() -> None:
            deadline = time.monotonic() + 30
            while not go.exists() and time.monotonic() < deadline:
                time.sleep(0.01)
            cleaned.touch()

        atexit.register(cleanup)
        return 42

    task = answer()
    assert task.result(timeout=60) == 42
    stopper = threading.Thread(target=task.stop, kwargs={"timeout": 60})
    stopper.start()
    assert wait_until(lambda: task._stop_sent is not None)  # the stop was requested first
    go.touch()
    stopper.join(60)
    assert cleaned.exists()
    assert task.exitcode == 0
    assert task.result(0) == 42


def test_a_task_that_execs_another_program_is_stopped(
    start_method: Optional[str], kind: Dict[str, bool]
) -> None:
    """A task replaced by exec (its channel closed on exec) is still stopped and gone."""

    @background(start_method=start_method, **kind)
    def becomes_sleep() -> None:
        os.execvp("sleep", ["sleep", "600"])

    task = becomes_sleep()
    assert task.pid is not None
    assert wait_until(lambda: _command(task.pid) == "sleep")
    started = time.monotonic()
    task.stop(timeout=60)
    assert time.monotonic() - started < 30  # at most its grace; a few milliseconds when plain
    assert not pid_alive(task.pid)


def test_a_daemon_that_execs_is_stopped_at_exit(tmp_path: Path, start_method: Optional[str]) -> None:
    """The program ends at once, not when an exec'd daemon task would have ended."""
    result = run_script(
        tmp_path,
        f"""
import os, time
import bgtask

@bgtask.background(daemon=True, start_method={start_method!r})
def becomes_sleep():
    os.execvp("sleep", ["sleep", "600"])

if __name__ == "__main__":
    task = becomes_sleep()
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            with open(f"/proc/{{task.pid}}/comm") as f:
                if f.read().strip() == "sleep":
                    break
        except OSError:
            pass
        time.sleep(0.01)
    print("PID", task.pid, flush=True)
""",
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    pid = int(result.stdout.split()[1])
    assert wait_until(lambda: not pid_alive(pid))


def _command(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/comm") as f:
            return f.read().strip()
    except OSError:
        return ""


def _late_watcher() -> str:
    bgtask.ready()
    time.sleep(0.5)  # between ready() and stop_event(): a stop lands here
    bgtask.stop_event().wait()
    return "clean"


def test_graceful_event_never_raises_the_stop(start_method: Optional[str], daemon: bool) -> None:
    """graceful="event": a stop before the task's first stop_event() sets the event, raises nothing."""
    task = background(_late_watcher, daemon=daemon, graceful="event", start_method=start_method)()
    task.wait_ready(timeout=60)
    task.stop(timeout=60)
    assert task.result(timeout=0) == "clean"


def test_graceful_true_raises_a_stop_that_comes_before_stop_event(start_method: Optional[str]) -> None:
    """graceful=True: a stop before the task asked for its event is raised in the task."""
    task = background(_late_watcher, graceful=True, start_method=start_method)()
    task.wait_ready(timeout=60)
    task.stop(timeout=60)
    assert isinstance(task.exception(timeout=0), bgtask.TaskStopped)


def test_graceful_takes_a_bool_or_event() -> None:
    """Any other value of graceful is a TypeError at decoration."""
    with pytest.raises(TypeError, match="graceful"):
        background(graceful="yes")(_late_watcher)  # type: ignore[call-overload]


def _kernel_at_least(major: int, minor: int) -> bool:
    try:
        found = tuple(int(part) for part in os.uname().release.split(".")[:2])
    except ValueError:
        return False
    return found >= (major, minor)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="thread-directed signals: Linux")
def test_a_stop_goes_to_the_tasks_main_thread(
    start_method: Optional[str], daemon: bool, tmp_path: Path
) -> None:
    """A stop is sent to the task's main thread, never to another of its threads: Python runs
    the handler only once the main thread runs Python code, so a stop that woke another thread
    left a main thread blocked in a system call (Queue.get) until its grace ran out.

    The task's main thread blocks SIGTERM while another thread does not: a stop sent to the
    process would go to that other thread at once; one sent to the main thread waits there,
    pending, until the main thread lets it in."""
    if start_method is not None and not _kernel_at_least(6, 9):
        pytest.skip("a pidfd's signal reaches a thread from Linux 6.9")
    marker = tmp_path / "pending-in-main"

    @background(graceful=True, daemon=daemon, start_method=start_method, grace=60)
    def task(path: str) -> str:
        other = threading.Thread(target=threading.Event().wait, daemon=True)
        other.start()  # SIGTERM not blocked there
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
        bgtask.ready()
        deadline = time.monotonic() + 60
        while signal.SIGTERM not in signal.sigpending():
            if time.monotonic() > deadline:
                return "no stop came"
            time.sleep(0.005)
        Path(path).write_text("yes")
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM})  # the stop raises here
        return "not stopped"

    running = task(str(marker))
    running.wait_ready(60)
    running.stop(timeout=60)
    assert marker.exists(), "the stop went to another thread of the task"
    with pytest.raises(TaskStopped):
        running.result(0)
