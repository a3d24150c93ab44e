"""Services: readiness, scoped tasks (``with``), ``active()`` and ``shutdown()``."""

from __future__ import annotations

import asyncio
import concurrent.futures
import http.server
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any, Dict, List, Optional

import pytest

import bgtask
from bgtask import BgTaskError, SerializationError, TaskCrashed, TaskStopped, background, ready

from .helpers import pid_alive, run_script, wait_until


def _serve_http(cleaned: Optional[Path] = None) -> None:
    """A tiny HTTP server on port 0 that reports its port with ready()."""
    server = http.server.HTTPServer(("127.0.0.1", 0), _Quiet)
    try:
        ready(server.server_address[1])
        server.serve_forever(poll_interval=0.05)
    finally:
        server.server_close()
        if cleaned is not None:
            cleaned.write_text("cleaned")


class _Quiet(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        body = b"hello from the task"
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: Any) -> None:
        pass


def test_a_server_task_reports_its_port_and_serves(
    start_method: Optional[str], kind: Dict[str, bool]
) -> None:
    """A server on port 0 sends its port with ready(); a request to it is served."""
    serve = background(start_method=start_method, **kind)(_serve_http)
    with serve() as task:
        port = task.wait_ready(60)
        assert isinstance(port, int)
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=60) as response:
            assert response.read() == b"hello from the task"
        assert task.is_alive()
    assert not task.is_alive()


def test_a_task_that_crashes_before_ready_raises_at_once(start_method: Optional[str]) -> None:
    """wait_ready() raises the task's own error as soon as it ends, not at its timeout."""

    @background(start_method=start_method)
    def broken() -> None:
        raise ValueError("no configuration")

    started = time.monotonic()
    with pytest.raises(ValueError, match="no configuration"):
        broken().wait_ready(120)
    assert time.monotonic() - started < 60  # a few milliseconds; the guard is generous


def test_a_task_killed_before_ready_raises_task_crashed(start_method: Optional[str]) -> None:
    """A task that dies without reporting gives TaskCrashed from wait_ready()."""

    @background(start_method=start_method)
    def dies() -> None:
        import os

        os._exit(3)

    with pytest.raises(TaskCrashed):
        dies().wait_ready(120)


def test_a_task_stopped_before_ready_raises_task_stopped(
    start_method: Optional[str], kind: Dict[str, bool]
) -> None:
    """stop() before ready(): wait_ready() raises TaskStopped."""

    @background(start_method=start_method, **kind)
    def slow_start() -> None:
        threading.Event().wait()

    task = slow_start()
    task.stop(timeout=60)
    with pytest.raises(TaskStopped):
        task.wait_ready(60)


def test_a_task_that_never_calls_ready_times_out(start_method: Optional[str]) -> None:
    """wait_ready(timeout) raises the builtin TimeoutError while the task runs unready."""

    @background(daemon=True, start_method=start_method)
    def never_ready() -> None:
        threading.Event().wait()

    task = never_ready()
    try:
        with pytest.raises(TimeoutError, match="not ready within"):
            task.wait_ready(0.2)
        assert task.is_alive()
    finally:
        task.stop(timeout=60)


def test_a_task_that_returns_without_ready_is_an_error(start_method: Optional[str]) -> None:
    """A task that returns without calling ready(): wait_ready() raises BgTaskError."""

    @background(start_method=start_method)
    def returns() -> int:
        return 5

    task = returns()
    with pytest.raises(BgTaskError, match=r"without calling bgtask\.ready"):
        task.wait_ready(60)
    assert task.result(0) == 5


def test_ready_value_arrives_before_the_result() -> None:
    """A value passed to ready() is there, unchanged, also after the task has finished."""

    @background
    def reports() -> str:
        ready({"port": 8080, "host": "localhost"})
        return "done"

    task = reports()
    assert task.result(60) == "done"
    task.join(60)
    assert task.wait_ready(0) == {"port": 8080, "host": "localhost"}


def test_ready_from_another_thread_of_the_task(start_method: Optional[str]) -> None:
    """ready() works from any thread of the task."""

    @background(start_method=start_method)
    def threaded() -> str:
        thread = threading.Thread(target=ready, args=("from a thread",))
        thread.start()
        thread.join()
        return "done"

    task = threaded()
    assert task.wait_ready(60) == "from a thread"
    assert task.result(60) == "done"


def test_ready_twice_is_an_error(start_method: Optional[str]) -> None:
    """A second ready() in a task raises BgTaskError there; the first value stays."""

    @background(start_method=start_method)
    def twice() -> None:
        ready(1)
        ready(2)

    task = twice()
    with pytest.raises(BgTaskError, match="already called"):
        task.result(60)
    assert task.wait_ready(0) == 1


def test_ready_with_a_value_that_cannot_be_pickled() -> None:
    """ready(unpicklable) raises SerializationError in the task, naming the value's type."""

    @background
    def bad() -> None:
        ready(threading.Lock())

    with pytest.raises(SerializationError, match="ready\\(\\): the value"):
        bad().wait_ready(60)


def test_ready_outside_a_task_is_an_error() -> None:
    """ready() in the main program raises BgTaskError."""
    with pytest.raises(BgTaskError, match="outside a bgtask task"):
        ready()


def test_ready_in_a_process_the_task_forked_is_an_error() -> None:
    """A child the task forks is not the task: ready() there raises BgTaskError."""

    @background
    def forks() -> str:
        import os

        pid = os.fork()
        if pid == 0:
            try:
                ready("from the child")
            except BgTaskError:
                os._exit(7)
            os._exit(0)
        _, status = os.waitpid(pid, 0)
        return str(os.waitstatus_to_exitcode(status))

    task = forks()
    assert task.result(60) == "7"


def test_a_stop_during_ready_never_tears_the_channel(start_method: Optional[str]) -> None:
    """A graceful task stopped while it sends a large ready() value ends stopped, never crashed."""

    @background(graceful=True, start_method=start_method)
    def big_ready() -> None:
        ready(b"x" * (8 << 20))
        threading.Event().wait()

    for _ in range(3):
        task = big_ready()
        time.sleep(0.005)  # not an ordering: only varies where the stop lands
        task.stop(timeout=60)
        assert isinstance(task.exception(0), TaskStopped), task.exception(0)


def test_wait_ready_after_cancel_raises_cancelled() -> None:
    """A task cancelled before it was ready: wait_ready() raises CancelledError."""

    @background
    def slow() -> None:
        threading.Event().wait()

    task = slow()
    task.cancel()
    with pytest.raises(concurrent.futures.CancelledError):
        task.wait_ready(60)
    task.join(60)


def test_wait_ready_in_a_done_callback_gets_the_error() -> None:
    """A done-callback waiting for readiness of a task that never calls ready() gets an error."""
    seen: List[BaseException] = []
    called = threading.Event()

    @background
    def unready() -> None:
        threading.Event().wait(0.1)

    def callback(task: Any) -> None:
        try:
            other.wait_ready(1)
        except BaseException as exc:
            seen.append(exc)
        called.set()

    other = unready()
    first = unready()
    first.add_done_callback(callback)
    assert called.wait(60)
    assert isinstance(seen[0], (BgTaskError, TimeoutError))
    other.join(60)


def test_wait_ready_async(start_method: Optional[str]) -> None:
    """wait_ready_async() returns the value without blocking the event loop."""
    serve = background(daemon=True, graceful=True, start_method=start_method)(_serve_http)

    async def main() -> Any:
        ticks = 0

        async def tick() -> None:
            nonlocal ticks
            while True:
                ticks += 1
                await asyncio.sleep(0.001)

        ticker = asyncio.ensure_future(tick())
        async with serve() as task:
            port = await task.wait_ready_async(60)
        ticker.cancel()
        return port, task, ticks

    port, task, ticks = asyncio.run(main())
    assert isinstance(port, int)
    assert not task.is_alive()
    assert ticks > 0


def test_wait_ready_async_times_out_and_raises_the_outcome() -> None:
    """wait_ready_async(): TimeoutError on timeout; the task's error when it ends unready."""

    @background(daemon=True)
    def never_ready() -> None:
        threading.Event().wait()

    @background
    def broken() -> None:
        raise KeyError("missing")

    async def main() -> None:
        task = never_ready()
        try:
            with pytest.raises(TimeoutError):
                await task.wait_ready_async(0.2)
        finally:
            task.stop(timeout=60)
        with pytest.raises(KeyError):
            await broken().wait_ready_async(60)

    asyncio.run(main())


def test_leaving_a_with_block_by_an_exception_stops_a_graceful_task(
    start_method: Optional[str], daemon: bool, tmp_path: Path
) -> None:
    """An exception in the block propagates; the task is stopped and its cleanup ran."""
    cleaned = tmp_path / "cleaned"
    serve = background(graceful=True, daemon=daemon, start_method=start_method)(_serve_http)
    task = serve(cleaned)

    def leave_by_an_exception() -> None:
        with task:
            task.wait_ready(60)
            raise KeyError("from the block")

    with pytest.raises(KeyError, match="from the block"):
        leave_by_an_exception()
    assert not task.is_alive()
    assert cleaned.read_text() == "cleaned"
    assert isinstance(task.exception(0), TaskStopped)


def test_leaving_an_async_with_block_by_an_exception(
    start_method: Optional[str], daemon: bool, tmp_path: Path
) -> None:
    """async with: the same, and the exception is not hidden."""
    cleaned = tmp_path / "cleaned"
    serve = background(graceful=True, daemon=daemon, start_method=start_method)(_serve_http)

    async def main() -> Any:
        async with serve(cleaned) as task:
            await task.wait_ready_async(60)
            raise KeyError("from the block")

    with pytest.raises(KeyError):
        asyncio.run(main())
    assert cleaned.read_text() == "cleaned"


def test_a_with_block_on_a_finished_task_returns() -> None:
    """Leaving the block after the task finished keeps its result."""

    @background
    def quick() -> int:
        return 3

    with quick() as task:
        assert task.result(60) == 3
    assert not task.is_alive()
    assert task.result(0) == 3


def _wait_for(path: Path) -> None:
    while not path.exists():
        time.sleep(0.01)


def test_active_lists_running_tasks_until_they_end(
    start_method: Optional[str], daemon: bool, tmp_path: Path
) -> None:
    """active() names the running tasks (oldest first) and is empty once they ended."""
    release = tmp_path / "release"
    first = background(daemon=daemon, name="first", start_method=start_method)(_wait_for)
    second = background(daemon=daemon, name="second", start_method=start_method)(_wait_for)
    one, two = first(release), second(release)
    try:
        tasks = bgtask.active()
        assert tasks == [one, two]
        assert [t.name for t in tasks] == ["first", "second"]
        assert all(t.pid and pid_alive(t.pid) for t in tasks)
        assert all(t.is_daemon is daemon for t in tasks)
        assert tasks[0].age >= tasks[1].age >= 0
    finally:
        release.touch()
    one.join(60)
    two.join(60)
    assert bgtask.active() == []


def test_active_lists_pending_tasks_too(daemon: bool, tmp_path: Path) -> None:
    """A task waiting for a Limiter's place is in active(), with pid None, until it ends."""
    release = tmp_path / "release"
    limited = background(daemon=daemon, limit=1)(_wait_for)
    running, pending = limited(release), limited(release)
    try:
        assert bgtask.active() == [running, pending]
        assert pending.pid is None
    finally:
        release.touch()
    running.join(60)
    pending.join(60)
    assert bgtask.active() == []


def test_shutdown_waits_for_workers_then_stops_daemons(start_method: Optional[str], tmp_path: Path) -> None:
    """shutdown(): non-daemon tasks finish, daemon ones are stopped with their cleanup."""
    cleaned, finished = tmp_path / "cleaned", tmp_path / "finished"

    @background(start_method=start_method)
    def worker() -> None:
        time.sleep(0.3)
        finished.write_text("finished")

    serve = background(daemon=True, graceful=True, start_method=start_method)(_serve_http)
    server = serve(cleaned)
    server.wait_ready(60)
    job = worker()
    bgtask.shutdown()
    assert finished.read_text() == "finished"
    assert job.result(0) is None
    assert cleaned.read_text() == "cleaned"
    assert isinstance(server.exception(0), TaskStopped)
    assert bgtask.active() == []
    bgtask.shutdown()  # twice: nothing left to do


def test_shutdown_with_a_timeout_stops_the_workers_left(tmp_path: Path) -> None:
    """shutdown(timeout=...) stops the non-daemon tasks still running at its end."""

    @background(graceful=True)
    def forever() -> None:
        threading.Event().wait()

    task = forever()
    started = time.monotonic()
    bgtask.shutdown(timeout=0.2)
    assert time.monotonic() - started < 60
    assert not task.is_alive()
    assert isinstance(task.exception(0), TaskStopped)


def test_shutdown_without_wait_stops_every_task(start_method: Optional[str], kind: Dict[str, bool]) -> None:
    """shutdown(wait=False) stops every task, non-daemon ones too, at once."""

    @background(start_method=start_method, **kind)
    def forever() -> None:
        threading.Event().wait()

    task = forever()
    bgtask.shutdown(wait=False)
    assert not task.is_alive()
    assert isinstance(task.exception(0), TaskStopped)


def test_tasks_start_after_shutdown() -> None:
    """After shutdown() a new call works (a new zygote starts)."""

    @background
    def double(x: int) -> int:
        return 2 * x

    assert double(1).result(60) == 2
    bgtask.shutdown()
    assert double(2).result(60) == 4


def test_active_and_shutdown_before_any_task() -> None:
    """In a program that never started a task: active() is empty, shutdown() does nothing."""
    assert bgtask.active() == []
    bgtask.shutdown()
    assert wait_until(lambda: bgtask.active() == [])


def test_shutdown_in_a_done_callback_runs_the_exit_procedure(tmp_path: Path) -> None:
    """shutdown() from a done-callback (its own thread, not the monitor) stops the tasks."""
    cleaned = tmp_path / "cleaned"
    errors: List[BaseException] = []
    called = threading.Event()
    serve = background(daemon=True, graceful=True)(_serve_http)

    @background
    def quick() -> int:
        return 1

    server = serve(cleaned)
    server.wait_ready(60)

    def callback(task: Any) -> None:
        try:
            bgtask.shutdown(timeout=60)
        except BaseException as exc:
            errors.append(exc)
        called.set()

    quick().add_done_callback(callback)
    assert called.wait(90)
    assert errors == []
    assert server.join(timeout=60) is None
    assert not server.is_alive()
    assert cleaned.read_text() == "cleaned"


def test_ctrl_c_during_shutdown_is_raised_once_every_task_is_gone(tmp_path: Path) -> None:
    """A Ctrl-C stops the non-daemon tasks shutdown() waits for; KeyboardInterrupt follows."""
    result = run_script(
        tmp_path,
        """
import os, signal, threading, time
import bgtask

@bgtask.background(graceful=True)
def forever():
    bgtask.ready()
    threading.Event().wait()

task = forever()
task.wait_ready(60)
threading.Timer(0.3, os.kill, (os.getpid(), signal.SIGINT)).start()
try:
    bgtask.shutdown()
except KeyboardInterrupt:
    print("RAISED", task.is_alive(), task.exception(0).reason, bgtask.active())
""",
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["RAISED", "False", "shutdown", "[]"]


def test_a_cancelled_async_with_still_waits_for_the_process(tmp_path: Path) -> None:
    """Cancelling the coroutine while async with stops the task: it waits, then is cancelled."""
    started, cleaned = tmp_path / "started", tmp_path / "cleaned"

    @background(graceful=True, daemon=True)
    def slow_cleanup() -> None:
        try:
            started.touch()
            threading.Event().wait()
        finally:
            time.sleep(0.5)
            cleaned.touch()

    async def main() -> Any:
        box: List[Any] = []

        async def user() -> None:
            async with slow_cleanup() as task:
                box.append(task)
                while not started.exists():
                    await asyncio.sleep(0.01)
            await asyncio.sleep(60)  # not reached before the cancellation below

        job = asyncio.ensure_future(user())
        while not started.exists():
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.1)  # not an ordering: __aexit__ is waiting by now, or soon
        job.cancel()
        with pytest.raises(asyncio.CancelledError):
            await job
        return box[0]

    task = asyncio.run(main())
    assert not task.is_alive()
    assert cleaned.exists()


def test_wait_ready_async_on_a_cancelled_task_raises_asyncio_cancelled() -> None:
    """As ``await task`` does, ``wait_ready_async`` raises asyncio.CancelledError."""

    @background
    def slow() -> None:
        threading.Event().wait()

    async def main() -> None:
        task = slow()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task.wait_ready_async(60)
        task.join(60)

    asyncio.run(main())


def test_age_stops_at_the_end() -> None:
    """A finished task's age is the time its process lived, not the time since."""

    @background
    def quick() -> None:
        return None

    task = quick()
    task.join(60)
    age = task.age
    time.sleep(0.05)  # a moment after the end, not an ordering
    assert task.age == age


def test_a_stop_cause_shows_the_users_code_only() -> None:
    """TaskStopped's cause is where the user's code was, with no frame of bgtask's."""

    @background(graceful=True)
    def serves() -> None:
        ready()
        threading.Event().wait()

    task = serves()
    task.wait_ready(60)
    task.stop(timeout=60)
    error = task.exception(0)
    assert isinstance(error, TaskStopped)
    cause = str(error.__cause__)
    assert "serves" in cause
    assert "bgtask/_" not in cause


def test_service_passes_keywords_named_fn_through() -> None:
    """The plugin's service(): the function is positional-only, so ``fn=`` reaches the server."""
    from bgtask.pytest_plugin import service

    def echo(fn: str) -> None:
        ready(fn)
        threading.Event().wait()

    with service(echo, fn="given") as value:
        assert value == "given"


def test_wait_ready_async_with_no_time_left_returns_a_ready_value() -> None:
    """wait_ready_async(0) on a ready task returns its value, as wait_ready(0) does."""

    @background(daemon=True, graceful=True)
    def reports() -> None:
        ready(1234)
        threading.Event().wait()

    async def main() -> Any:
        return await task.wait_ready_async(0)

    task = reports()
    try:
        task.wait_ready(60)
        assert asyncio.run(main()) == 1234
    finally:
        task.stop(timeout=60)


def test_waits_that_time_out_leave_nothing_with_the_task() -> None:
    """Many timed-out asyncio waits for readiness hold nothing afterwards."""

    @background(daemon=True)
    def never_ready() -> None:
        threading.Event().wait()

    async def main() -> None:
        for _ in range(200):
            with pytest.raises(TimeoutError):
                await task.wait_ready_async(0.001)

    task = never_ready()
    try:
        asyncio.run(main())
        assert task._watchers == []
    finally:
        task.stop(timeout=60)


def test_the_leak_checks_origin_is_the_users_line() -> None:
    """A task started through a ``with`` helper names the user's line, not contextlib's."""
    from bgtask._main import lifecycle as _lifecycle
    from bgtask.pytest_plugin import service

    def serve() -> None:
        ready()
        threading.Event().wait()

    _lifecycle.track_origins = True
    try:
        with service(serve):
            (task,) = bgtask.active()
            origin = task._origin
    finally:
        _lifecycle.track_origins = False
    assert origin is not None
    assert "test_services.py" in origin
    assert "test_the_leak_checks_origin_is_the_users_line" in origin


def test_an_unexpected_error_in_shutdown_is_raised_as_itself(monkeypatch: pytest.MonkeyPatch) -> None:
    """An error inside the procedure kills the tasks and comes out as itself, not as Ctrl-C."""
    from bgtask._main import lifecycle as _lifecycle

    @background(graceful=True)
    def forever() -> None:
        threading.Event().wait()

    def broken(reason: str) -> bool:
        raise RuntimeError("broken step")

    task = forever()
    monkeypatch.setattr(_lifecycle, "_stop_all", broken)
    with pytest.raises(RuntimeError, match="broken step"):
        bgtask.shutdown(wait=False)
    task.join(60)  # killed: its zygote closed meanwhile, so its exit code may be unknown
    assert not task.is_alive()
    assert isinstance(task.exception(0), TaskStopped)
