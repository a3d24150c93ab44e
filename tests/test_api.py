"""The public surface: names, docstrings, the decorator's shapes and options, the handle."""

from __future__ import annotations

import inspect
import pickle
import queue
import sys
import time
from pathlib import Path
from typing import Optional

import pytest

import bgtask
from bgtask import BgTaskError, SerializationError, Task, background

from .helpers import Script, pid_alive, run_script, wait_until

EXPECTED = {
    "Background",
    "BgTaskError",
    "Limiter",
    "Queue",
    "SerializationError",
    "ShutDown",
    "StopEvent",
    "StreamTask",
    "Task",
    "TaskCrashed",
    "TaskError",
    "TaskStopped",
    "active",
    "background",
    "preload",
    "ready",
    "set_initializer",
    "shutdown",
    "stop_event",
    "use_ray",
}


def test_all_is_the_documented_api() -> None:
    """`bgtask.__all__` lists exactly the public names."""
    assert set(bgtask.__all__) == EXPECTED


def test_public_names_have_docstrings_and_module() -> None:
    """Every public name has a docstring and reports `bgtask` as its module."""
    for name in bgtask.__all__:
        obj = getattr(bgtask, name)
        assert inspect.getdoc(obj), name
        if name == "ShutDown" and sys.version_info >= (3, 13):
            assert obj is queue.ShutDown  # the stdlib's own, as the docs say
            continue
        assert obj.__module__ == "bgtask", name


def test_exception_tree() -> None:
    """Errors derive from BgTaskError; SerializationError is also a TypeError."""
    for name in ("TaskCrashed", "TaskStopped", "TaskError", "SerializationError"):
        assert issubclass(getattr(bgtask, name), BgTaskError)
    assert issubclass(SerializationError, TypeError)


def add(a: int, b: int = 1) -> int:
    """Add two numbers."""
    return a + b


def test_bare_decorator_keeps_metadata_and_is_not_daemon() -> None:
    """Bare @background keeps the function's name, doc, signature and __wrapped__."""
    wrapped = background(add)
    assert wrapped.__name__ == "add"
    assert wrapped.__doc__ == "Add two numbers."
    assert wrapped.__wrapped__ is add
    assert inspect.signature(wrapped) == inspect.signature(add)
    assert wrapped.is_daemon is False


def test_called_decorator_sets_daemon() -> None:
    """@background(daemon=True) marks the function and its tasks as daemons."""
    wrapped = background(daemon=True)(add)
    assert wrapped.is_daemon is True
    task = wrapped(1, 2)
    assert task.is_daemon is True
    assert task.result(timeout=30) == 3


@pytest.mark.parametrize(
    ("options", "error"),
    [
        ({"daemon": 1}, TypeError),
        ({"graceful": "yes"}, TypeError),
        ({"grace": -1}, ValueError),
        ({"grace": "5"}, TypeError),
        ({"grace": float("nan")}, ValueError),
        ({"timeout": 0}, ValueError),
        ({"timeout": "Foo"}, TypeError),
        ({"timeout": float("inf")}, ValueError),
        ({"name": 3}, TypeError),
        ({"start_method": "threads"}, ValueError),
    ],
)
def test_bad_options_fail_at_decoration(options: dict, error: type) -> None:
    """A bad option fails when decorating, naming the option: a wrong type is a TypeError."""
    with pytest.raises(error, match=next(iter(options))):
        background(**options)


def test_call_returns_a_task_at_once() -> None:
    """Calling starts a process and returns its handle with name, pid and a done state."""

    @background(name="adder")
    def slow_add(a: int, b: int) -> int:
        return a + b

    task = slow_add(2, 3)
    assert isinstance(task, Task)
    assert task.name == "adder"
    assert isinstance(task.pid, int)
    assert task.result(timeout=30) == 5
    task.join(timeout=30)
    assert task.done()
    assert not task.is_alive()
    assert task.exitcode == 0


def test_default_name_is_the_qualified_name() -> None:
    """A task is named after its function's qualified name."""
    task = background(add)(1)
    assert task.name == "add"
    task.join(30)


def test_repr_tells_the_state() -> None:
    """`repr(task)` names the task, its pid and its state."""

    @background
    def sleeper() -> None:
        time.sleep(3600)

    task = sleeper()
    pid = task.pid
    text = repr(task)
    assert text.startswith("<bgtask.Task ")
    assert "running" in text
    assert f"pid={pid}" in text
    task.kill()
    task.join(30)
    assert "stopped by kill()" in repr(task)


def test_task_handle_cannot_be_pickled() -> None:
    """A Task belongs to the process that started it: pickling it is a clear error."""
    task = background(add)(1)
    with pytest.raises(BgTaskError, match="cannot be sent to another process"):
        pickle.dumps(task)
    task.join(30)


def test_passing_a_handle_to_a_task_fails_at_the_call() -> None:
    """Sending a handle as an argument fails at the call, naming the argument."""
    first = background(add)(1)
    with pytest.raises(SerializationError, match="positional argument 0"):
        background(add)(first)
    first.join(30)


def test_stop_event_outside_a_task_is_an_error() -> None:
    """stop_event() outside a task raises BgTaskError."""
    with pytest.raises(BgTaskError, match="outside a bgtask task"):
        bgtask.stop_event()


def test_join_on_the_decorated_function_waits_for_all() -> None:
    """`fn.join()` waits for every task the function started."""

    @background
    def nap(seconds: float) -> float:
        time.sleep(seconds)
        return seconds

    tasks = [nap(0.05 * i) for i in range(4)]
    nap.join(timeout=60)
    assert all(not t.is_alive() for t in tasks)
    assert [t.result(0) for t in tasks] == [0.0, 0.05, 0.1, 0.15000000000000002]


class Counter:
    def __init__(self, start: int) -> None:
        self.start = start

    @background
    def plus(self, n: int) -> int:
        return self.start + n


def test_methods_get_their_instance() -> None:
    """A decorated method runs with its instance, pickled by value."""
    assert Counter(10).plus(5).result(timeout=30) == 15
    assert Counter.plus.is_daemon is False


def test_a_background_function_travels_without_its_handles() -> None:
    """A background function used inside a task arrives without the caller's task handles."""
    inner = background(add)
    first = inner(1)
    first.join(30)

    @background
    def outer() -> int:
        return inner(41).result(30)

    assert outer().result(timeout=60) == 42
    assert first.result(0) == 2


def test_import_starts_nothing(tmp_path: Path) -> None:
    """`import bgtask` starts no process and no thread: the zygote starts on the first call."""
    from .helpers import run_script

    result = run_script(
        tmp_path,
        """
import os, threading
import bgtask
children = open(f"/proc/{os.getpid()}/task/{os.getpid()}/children").read().split()
print(len(children), threading.active_count())
""",
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["0", "1"]


GEVENT_SCRIPT = """
from gevent import monkey

monkey.patch_all()
import os
import sys
import time

import gevent

import bgtask


@bgtask.background
def work(x):
    time.sleep(0.3)
    return x * 2


@bgtask.background(daemon=True, graceful=True)
def sidecar(path):
    ev = bgtask.stop_event()
    print("SIDECAR", os.getpid(), flush=True)
    try:
        while not ev.is_set():
            ev.wait(0.05)
    finally:
        with open(path, "w") as f:
            f.write("cleaned")


@bgtask.background
def worker(path):
    time.sleep(0.5)
    with open(path, "w") as f:
        f.write("done")


if __name__ == "__main__":
    side = sidecar("sidecar-cleaned")
    ticks = []

    def ticker():
        while True:
            ticks.append(time.monotonic())
            gevent.sleep(0.01)

    clock = gevent.spawn(ticker)
    started = time.monotonic()
    calls = [gevent.spawn(lambda i=i: work(i).result(30)) for i in range(6)]
    gevent.joinall(calls, timeout=30, raise_error=True)
    elapsed = time.monotonic() - started
    print("RESULTS", *[call.value for call in calls], flush=True)
    # The greenlets went on while the callers waited for their results.
    print("TICKS", sum(1 for t in ticks if started <= t <= started + elapsed), flush=True)
    clock.kill()
    stopped = work(1)
    stopped.stop(timeout=10)
    print("STOPPED", type(stopped.exception(5)).__name__, flush=True)
    try:
        bgtask.background(start_method="spawn")(abs)(-1)
    except bgtask.BgTaskError as exc:
        print("REFUSED", "default start method" in str(exc), flush=True)
    # The exit procedure: the worker runs to its end, the sidecar is stopped gracefully.
    worker("worker-done")
"""


def test_a_gevent_patched_program_runs_tasks(tmp_path: Path) -> None:
    """gevent's monkey-patching (``gunicorn -k gevent``): tasks run, waits are cooperative.

    Callers in several greenlets wait at once, the other greenlets run meanwhile, stop works,
    the exit procedure stops daemons gracefully and waits for workers, nothing is left. The
    start methods that would run a task in a patched interpreter are refused at once.
    """
    pytest.importorskip("gevent")
    script = Script(tmp_path, GEVENT_SCRIPT)
    try:
        sidecar = int(script.expect("SIDECAR"))
        assert script.expect("RESULTS").split() == ["0", "2", "4", "6", "8", "10"]
        assert int(script.expect("TICKS")) >= 3  # 10 ms ticks through a wait of 0.3 s or more
        assert script.expect("STOPPED") == "TaskStopped"
        assert script.expect("REFUSED") == "True"
        assert script.wait() == 0, script.stderr()
        assert (tmp_path / "worker-done").read_text() == "done"
        assert (tmp_path / "sidecar-cleaned").read_text() == "cleaned"
        assert wait_until(lambda: not pid_alive(sidecar))
        assert "Traceback" not in script.stderr()
    finally:
        script.close()


@pytest.mark.parametrize(
    "patch", ["patch_all(select=False)", "patch_all(thread=False)", "patch_thread()", "patch_socket()"]
)
def test_a_partly_gevent_patched_program_is_refused(tmp_path: Path, patch: str) -> None:
    """Threads, sockets and select patched apart from each other: a clear error, no hang."""
    pytest.importorskip("gevent")
    script = Script(
        tmp_path,
        f"""
from gevent import monkey

monkey.{patch}
import bgtask

try:
    bgtask.background(abs)(-1).result(30)
    print("RAN")
except bgtask.BgTaskError as exc:
    print("REFUSED", "patch_all()" in str(exc))
""",
    )
    try:
        assert script.expect("REFUSED") == "True"
        assert script.wait() == 0, script.stderr()
    finally:
        script.close()


def test_a_task_cannot_return_a_multiprocessing_connection(start_method: Optional[str]) -> None:
    """Nor can one come back as a result: SerializationError, not a stray number here."""

    @background(start_method=start_method)
    def make() -> object:
        import multiprocessing

        return multiprocessing.Pipe()[0]

    with pytest.raises(SerializationError, match="stands for a descriptor"):
        make().result(60)


def test_calls_work_while_multiprocessing_connection_is_being_imported(tmp_path: Path) -> None:
    """A half-imported multiprocessing.connection (another thread imports it) breaks no call."""
    result = run_script(
        tmp_path,
        """
import sys, types
import bgtask

real = sys.modules.pop("multiprocessing.connection", None)
sys.modules["multiprocessing.connection"] = types.ModuleType("multiprocessing.connection")
print("DURING", bgtask.background(abs)(-1).result(60))
del sys.modules["multiprocessing.connection"]
import multiprocessing

ours, theirs = multiprocessing.Pipe()
print("AFTER", bgtask.background(lambda conn: conn.send("sent along"))(theirs).result(60), ours.recv())
""",
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["DURING", "1", "AFTER", "None", "sent", "along"]
