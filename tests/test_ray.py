"""The Ray backend, on a real Ray cluster: the task contract, local and on Ray, and what is Ray's.

One head node serves the session (``ray start --head`` in a temporary directory, its processes
in a session of their own, stopped by pid, never with ``ray stop``), which the test process
joins by address. They run in a pytest of their own, without xdist (``scripts/test.sh``:
``pytest -p no:xdist tests/test_ray.py``): under xdist each worker would start a head node.
Without Ray installed they are skipped, unless ``BGTASK_REQUIRE_RAY=1`` (CI) makes that an
error.
"""

from __future__ import annotations

import asyncio
import logging
import os
import pickle
import queue
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from pathlib import Path
from typing import Any, AsyncIterator, Dict, Iterator, List

import pytest

import bgtask
from bgtask import TaskCrashed, TaskStopped, background, stop_event

from .helpers import (
    ANNOUNCE_EXIT_WAIT,
    LOGGER,
    Script,
    kill_quietly,
    pid_alive,
    run_script,
    script_env,
    wait_until,
)


def _token_auth() -> None:
    """Newer Ray releases have token authentication: the session's head node and every process
    that joins it use a token of the session's own (older ones ignore these variables). A head
    node would otherwise turn it on by itself once ``~/.ray/auth_token`` exists, and refuse the
    clients that did not. Set before Ray is imported: it reads them once."""
    import atexit
    import secrets

    folder = tempfile.mkdtemp(prefix="bgray-token-")
    path = os.path.join(folder, "auth_token")
    with open(os.open(path, os.O_WRONLY | os.O_CREAT, 0o600), "w") as f:
        f.write(secrets.token_hex(32))
    atexit.register(shutil.rmtree, folder, True)
    os.environ["RAY_AUTH_MODE"] = "token"
    os.environ["RAY_AUTH_TOKEN_PATH"] = path


_token_auth()
try:
    os.environ.setdefault("RAY_DISABLE_FAILURE_SIGNAL_HANDLER", "1")
    import ray
except ImportError:  # pragma: no cover (CI installs the extra)
    if os.environ.get("BGTASK_REQUIRE_RAY") == "1":
        raise
    pytest.skip("Ray is not installed (pip install 'bgtask[ray]')", allow_module_level=True)

if os.environ.get("PYTEST_XDIST_WORKER"):
    pytest.skip(
        "the Ray tests share one head node: run them without xdist "
        "(pytest -p no:xdist tests/test_ray.py, as scripts/test.sh does)",
        allow_module_level=True,
    )

pytestmark = pytest.mark.ray

RESULT_S = 120.0
# The last line of examples/ray_cluster.py when all went well.
EXAMPLE_OK = "ok: results in order, one crash reported, every report queued, the daemon's cleanup ran"
ENV = {"RAY_USAGE_STATS_ENABLED": "0", "RAY_DISABLE_FAILURE_SIGNAL_HANDLER": "1"}
AUTH = ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN_PATH")
ENV.update({key: os.environ[key] for key in AUTH})
# Stopped in this order, as `ray stop` does: the raylet first, the GCS last.
FIRST, LAST = ("raylet",), ("gcs_server",)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class _Node:
    """A Ray node of the tests' own (``ray start``), and every process it started: its processes
    are in a session of their own, found by its id, stopped by pid (never with ``ray stop``)."""

    def __init__(self, *options: str) -> None:
        ray_cli = os.path.join(os.path.dirname(sys.executable), "ray")
        ports = {
            "--dashboard-agent-listen-port": _free_port(),
            "--dashboard-agent-grpc-port": _free_port(),
            "--metrics-export-port": _free_port(),
            "--runtime-env-agent-port": _free_port(),
        }
        args = [
            ray_cli,
            "start",
            *options,
            "--disable-usage-stats",
            *(f"{flag}={port}" for flag, port in ports.items()),
        ]
        proc = subprocess.Popen(
            args,
            env=dict(os.environ, **ENV),
            start_new_session=True,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.pgid = proc.pid
        _, err = proc.communicate(timeout=120)
        if proc.returncode != 0:
            self.stop()
            raise RuntimeError(f"ray start failed ({proc.returncode}): {err[-2000:]}")

    def members(self) -> Dict[int, str]:
        found = {}
        for name in os.listdir("/proc"):
            if not name.isdigit():
                continue
            try:
                with open(f"/proc/{name}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
                with open(f"/proc/{name}/comm") as f:
                    comm = f.read().strip()
            except OSError:
                continue
            if int(fields[2]) == self.pgid and fields[0] != "Z":
                found[int(name)] = comm
        return found

    def stop(self) -> None:
        members = self.members()
        order = [
            [p for p, c in members.items() if c in FIRST],
            [p for p, c in members.items() if c not in FIRST + LAST],
            [p for p, c in members.items() if c in LAST],
        ]
        for group in order:
            for pid in group:
                try:
                    os.kill(pid, signal.SIGTERM)
                except OSError:
                    pass
            wait_until(lambda group=group: not any(pid_alive(p) for p in group), timeout=5)
        kill_quietly(list(self.members()))
        wait_until(lambda: not self.members(), timeout=10)

    def lose(self) -> None:
        """The node dies at once, as a machine that loses its power: every process SIGKILLed."""
        kill_quietly(list(self.members()))
        wait_until(lambda: not self.members(), timeout=10)


class HeadNode(_Node):
    """The session's head node: two CPUs."""

    def __init__(self) -> None:
        self.tmp = tempfile.mkdtemp(prefix="bgray-")  # short: Ray's socket paths have a limit
        self.port = _free_port()
        super().__init__(
            "--head",
            f"--port={self.port}",
            f"--temp-dir={self.tmp}",
            "--num-cpus=2",
            "--include-dashboard=false",
        )
        self.address = f"127.0.0.1:{self.port}"

    def stop(self) -> None:
        super().stop()
        shutil.rmtree(self.tmp, ignore_errors=True)


class WorkerNode(_Node):
    """A second node of the head's cluster, on this machine: one CPU, and a resource of its own
    (``{name: 100}``) that places a task there."""

    def __init__(self, head: HeadNode, name: str) -> None:
        self.resource = name
        super().__init__(f"--address={head.address}", "--num-cpus=1", f'--resources={{"{name}": 100}}')


@pytest.fixture(scope="session")
def head() -> Iterator[HeadNode]:
    node = HeadNode()
    try:
        yield node
    finally:
        node.stop()


@pytest.fixture(scope="session")
def cluster(head: HeadNode) -> Iterator[str]:
    """This test process joined to the head node; bgtask uses that connection."""
    import warnings

    for key, value in ENV.items():
        os.environ.setdefault(key, value)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=FutureWarning, module="ray")  # GPU advice
        ray.init(address=head.address, logging_level="WARNING")
    try:
        yield head.address
    finally:
        ray.shutdown()


@pytest.fixture(params=["local", "ray"])
def backend(request: pytest.FixtureRequest) -> str:
    """The task contract, on this machine and on Ray."""
    if request.param == "ray":
        request.getfixturevalue("cluster")
    return str(request.param)


# -- the contract, on both backends ---------------------------------------------------------


def test_result_and_exception(backend: str) -> None:
    @background(backend=backend)
    def add(a: int, b: int) -> int:
        return a + b

    @background(backend=backend)
    def fail() -> None:
        raise KeyError("missing")

    task = add(2, 3)
    assert task.result(RESULT_S) == 5
    task.join(RESULT_S)
    assert task.exitcode == 0
    assert isinstance(task.pid, int)
    assert task.pid > 0
    with pytest.raises(KeyError, match="missing") as caught:
        fail().result(RESULT_S)
    assert "in fail" in str(caught.value.__cause__)  # the task's own traceback, as the cause


def test_large_buffers_go_both_ways(backend: str) -> None:
    """An argument and a result holding 2 MiB out-of-band buffers (as NumPy arrays do): on
    Ray they travel in the task's specification and its result, not as descriptors."""
    import hashlib
    import pickle

    class Blob:
        def __init__(self, data: Any) -> None:
            self.data = data

        def __reduce_ex__(self, protocol: Any) -> Any:
            return Blob, (pickle.PickleBuffer(self.data),)

    @background(backend=backend)
    def echo(blob: Blob) -> Any:
        return Blob(bytearray(blob.data)), hashlib.sha256(blob.data).hexdigest()

    data = bytearray(b"0123456789abcdef" * (128 * 1024))
    back, digest = echo(Blob(data)).result(RESULT_S)
    assert digest == hashlib.sha256(data).hexdigest()
    assert bytes(back.data) == bytes(data)


def test_large_arrays_arrive_writable_and_private(backend: str) -> None:
    """On Ray, as locally: an argument's and a result's large arrays (Ray's object store
    carries them) arrive writable, and writing to one changes nobody else's."""
    np = pytest.importorskip("numpy")

    @background(backend=backend)
    def touch(a: Any) -> Any:
        writable = bool(a.flags.writeable)
        a[0] = 7
        return writable, int(a.sum()), np.full(4 << 20, 3, dtype=np.uint8)

    original = np.ones(8 << 20, dtype=np.uint8)
    writable, total, made = touch(original).result(RESULT_S)
    assert writable
    assert total == (8 << 20) + 6
    assert original[0] == 1  # the task wrote to its own copy
    assert made.flags.writeable
    made[0] = 0
    assert int(made.sum()) == 3 * ((4 << 20) - 1)


def test_readiness(backend: str) -> None:
    """ready(value) reaches wait_ready() while the task runs, and after it ended; a task that
    returns without it raises BgTaskError; a task pending in its limiter is waited for too."""
    import threading

    @background(backend=backend, graceful="event")
    def serve(port: int) -> str:
        bgtask.ready({"port": port})
        stop_event().wait()
        return "served"

    @background(backend=backend)
    def quick() -> int:
        bgtask.ready("up")
        return 7

    @background(backend=backend)
    def never() -> None:
        return None

    task = serve(8080)
    assert task.wait_ready(RESULT_S) == {"port": 8080}
    task.stop(RESULT_S)
    assert task.result(0) == "served"
    done = quick()
    assert done.result(RESULT_S) == 7
    assert done.wait_ready(0) == "up"  # after the end: the value came before the outcome
    with pytest.raises(bgtask.BgTaskError, match=r"without calling bgtask\.ready"):
        never().wait_ready(RESULT_S)

    limited = background(backend=backend, limit=1, graceful="event")(_ready_then_wait)
    first, second = limited(1), limited(2)  # the second waits for the first's place
    got: List[Any] = []
    waiter = threading.Thread(target=lambda: got.append(second.wait_ready(RESULT_S)))
    waiter.start()
    assert first.wait_ready(RESULT_S) == 1
    first.stop(RESULT_S)
    waiter.join(RESULT_S)
    assert got == [2]
    second.stop(RESULT_S)


def _ready_then_wait(value: int) -> int:
    bgtask.ready(value)
    stop_event().wait()
    return value


def test_a_crash_is_task_crashed(backend: str) -> None:
    @background(backend=backend)
    def crash() -> None:
        os._exit(3)

    with pytest.raises(TaskCrashed):
        crash().result(RESULT_S)


def test_sys_exit_is_a_crash_with_its_code(backend: str) -> None:
    @background(backend=backend)
    def leave() -> None:
        sys.exit(4)

    task = leave()
    with pytest.raises(TaskCrashed, match=r"sys.exit\(4\)"):
        task.result(RESULT_S)
    assert task.exitcode == 4


def test_graceful_stop_runs_finally_out_of_a_blocking_call(backend: str, tmp_path: Path) -> None:
    marker = tmp_path / "cleaned"
    started = tmp_path / "started"

    @background(backend=backend, graceful=True, grace=30)
    def sleeper(started: str, marker: str) -> None:
        Path(started).write_text("yes")
        try:
            time.sleep(120)
        finally:
            Path(marker).write_text("yes")

    task = sleeper(str(started), str(marker))
    assert wait_until(started.exists, timeout=RESULT_S)
    task.stop()
    with pytest.raises(TaskStopped) as caught:
        task.result(RESULT_S)
    assert caught.value.reason == "stop"
    assert marker.read_text() == "yes"
    assert task.exitcode == -signal.SIGTERM


def test_a_task_with_its_stop_event_ends_on_its_own(backend: str, tmp_path: Path) -> None:
    started = tmp_path / "started"

    @background(backend=backend, graceful=True, grace=30)
    def loop(started: str) -> str:
        event = stop_event()
        Path(started).write_text("yes")
        while not event.is_set():
            event.wait(0.05)
        return "finished"

    task = loop(str(started))
    assert wait_until(started.exists, timeout=RESULT_S)
    assert wait_until(lambda: task.pid is not None, timeout=RESULT_S)
    task.stop()
    assert task.result(RESULT_S) == "finished"


def test_kill_and_grace_over(backend: str, tmp_path: Path) -> None:
    started = tmp_path / "started"

    @background(backend=backend)
    def forever(started: str) -> None:
        Path(started).write_text("yes")
        time.sleep(120)

    @background(backend=backend, graceful=True, grace=0.5)
    def stubborn(started: str) -> None:
        Path(started).write_text("yes")
        while True:
            try:
                time.sleep(120)
            except BaseException:  # ignores its stop: killed after its grace
                continue

    task = forever(str(started))
    assert wait_until(started.exists, timeout=RESULT_S)
    task.kill()
    with pytest.raises(TaskStopped):
        task.result(RESULT_S)
    assert task.exitcode == -signal.SIGKILL
    started.unlink()
    task = stubborn(str(started))
    assert wait_until(started.exists, timeout=RESULT_S)
    task.stop()
    with pytest.raises(TaskStopped):
        task.result(RESULT_S)
    assert task.exitcode == -signal.SIGKILL


def test_timeout(backend: str) -> None:
    @background(backend=backend, timeout=1.0)
    def forever() -> None:
        time.sleep(120)

    with pytest.raises(TaskStopped) as caught:
        forever().result(RESULT_S)
    assert caught.value.reason == "timeout"


def test_future_await_and_callbacks(backend: str) -> None:
    import asyncio
    import concurrent.futures

    @background(backend=backend)
    def square(x: int) -> int:
        return x * x

    seen: List[Any] = []
    tasks = [square(i) for i in range(4)]
    tasks[0].add_done_callback(lambda t: seen.append(t.result()))
    done, _ = concurrent.futures.wait(tasks, timeout=RESULT_S)
    assert len(done) == 4
    assert wait_until(lambda: seen == [0], timeout=10)

    async def main() -> List[int]:
        return [await square(i) for i in range(3)]

    assert asyncio.run(main()) == [0, 1, 4]


def test_cancelling_the_await_stops_the_task(backend: str, tmp_path: Path) -> None:
    import asyncio

    started = tmp_path / "started"

    @background(backend=backend)
    def forever(started: str) -> None:
        Path(started).write_text("yes")
        time.sleep(120)

    async def main() -> Any:
        task = forever(str(started))
        waiter = asyncio.ensure_future(asyncio.wrap_future(task))
        while not started.exists():
            await asyncio.sleep(0.01)
        waiter.cancel()
        try:
            await waiter
        except asyncio.CancelledError:
            pass
        return task

    task = asyncio.run(main())
    task.join(RESULT_S)
    assert not task.is_alive()
    assert task.cancelled()


def test_limit_and_map(backend: str) -> None:
    @background(backend=backend, limit=2)
    def double(x: int) -> int:
        return 2 * x

    assert list(double.map(range(6))) == [0, 2, 4, 6, 8, 10]


def test_nested_tasks_end_with_their_parent(backend: str) -> None:
    """A task's own tasks run where it runs: on Ray without being told, inside a Ray task."""

    @background
    def inner(x: int) -> Any:
        runner = sys.modules.get("bgtask._backends.ray_worker")
        return x + 1, bool(getattr(runner, "in_task", False))

    @background(backend=backend)
    def outer() -> Any:
        (a, on_ray_a), (b, on_ray_b) = inner(1).result(60), inner(2).result(60)
        return a + b, on_ray_a and on_ray_b

    assert outer().result(RESULT_S) == (5, backend == "ray")


def test_a_stream_yields_in_order_then_its_return_value(backend: str) -> None:
    @background(backend=backend)
    def count(n: int) -> Iterator[int]:
        yield from range(n)
        return f"counted {n}"  # type: ignore[misc]

    @background(backend=backend)
    async def ticks(n: int) -> AsyncIterator[str]:
        for i in range(n):
            await asyncio.sleep(0)
            yield f"tick {i}"

    task = count(300)
    assert isinstance(task, bgtask.StreamTask)
    assert list(task) == list(range(300))
    assert task.result(RESULT_S) == "counted 300"

    async def read() -> List[str]:
        return [tick async for tick in ticks(5)]

    assert asyncio.run(read()) == [f"tick {i}" for i in range(5)]


def test_a_streams_error_comes_after_its_items(backend: str) -> None:
    @background(backend=backend)
    def fail_after(n: int) -> Iterator[int]:
        yield from range(n)
        raise ValueError("no more")

    got: List[int] = []

    def read() -> None:
        got.extend(fail_after(3))

    with pytest.raises(ValueError, match="no more"):
        read()
    assert got == [0, 1, 2]


def test_leaving_a_streams_loop_stops_it_with_its_cleanup(backend: str, tmp_path: Path) -> None:
    marker = tmp_path / "closed"

    @background(backend=backend, graceful=True, grace=30)
    def forever(marker: str) -> Iterator[int]:
        try:
            i = 0
            while True:
                yield i
                i += 1
        finally:
            Path(marker).write_text("closed")

    task = forever(str(marker))
    for item in task:
        if item == 10:
            break
    with pytest.raises(TaskStopped, match="when the loop over its items was left"):
        task.result(RESULT_S)
    assert marker.read_text() == "closed"


def test_a_slow_reader_holds_a_stream_back_and_a_stop_then_runs_its_cleanup(
    backend: str, tmp_path: Path
) -> None:
    """1 MiB items, read one: the task is held a few dozen items ahead (the program's unread
    8 MiB, and on Ray the items Ray holds); stopped while held, its ``finally`` runs."""
    progress = tmp_path / "progress"
    marker = tmp_path / "cleaned"

    @background(backend=backend, graceful=True, grace=30)
    def produce(progress: str, marker: str) -> Iterator[bytes]:
        piece = b"x" * (1 << 20)
        try:
            for _ in range(1000):
                with open(progress, "ab") as f:
                    f.write(b".")  # one byte per item
                yield piece
        finally:
            Path(marker).write_text("cleaned")

    task = produce(str(progress), str(marker))
    iterator = iter(task)
    assert len(next(iterator)) == 1 << 20
    # The task runs ahead until it is held; a second later it is still held.
    assert wait_until(lambda: progress.exists() and progress.stat().st_size >= 8, timeout=RESULT_S)
    time.sleep(1.0)
    assert progress.stat().st_size < 64
    task.stop()
    with pytest.raises(TaskStopped):
        list(iterator)
    assert marker.read_text() == "cleaned"


def test_log_records_reach_the_programs_handlers(backend: str, collected: List[logging.LogRecord]) -> None:
    """Formatted, at the program's levels, with the task's name and pid and its exception, all
    handled before the result is known."""
    logging.getLogger(LOGGER + ".quiet").setLevel(logging.WARNING)

    @background(backend=backend, name="reporter")
    def report() -> int:
        log = logging.getLogger(LOGGER)
        log.debug("below the level: not sent")
        for i in range(50):
            log.info("record %d", i)
        logging.getLogger(LOGGER + ".quiet").info("below its own level: not sent")
        try:
            raise KeyError("broken")
        except KeyError:
            log.exception("it failed")
        return os.getpid()

    pid = report().result(RESULT_S)
    assert [r.getMessage() for r in collected] == [f"record {i}" for i in range(50)] + ["it failed"]
    assert all(r.name == LOGGER and r.processName == "reporter" and r.process == pid for r in collected)
    exc_info = collected[-1].exc_info
    assert exc_info is not None
    assert exc_info[0] is KeyError
    assert "KeyError: 'broken'" in (collected[-1].exc_text or "")


def test_warnings_follow_the_programs_filters(backend: str) -> None:
    @background(backend=backend)
    def warns() -> str:
        warnings.warn("deprecated thing", DeprecationWarning, stacklevel=1)
        return "no error"

    with warnings.catch_warnings():
        warnings.simplefilter("error", DeprecationWarning)
        task = warns()
    with pytest.raises(DeprecationWarning, match="deprecated thing"):
        task.result(RESULT_S)
    with pytest.warns(DeprecationWarning, match="deprecated thing"):
        assert warns().result(RESULT_S) == "no error"


def test_nested_tasks_relay_their_records(backend: str, collected: List[logging.LogRecord]) -> None:
    @background(backend=backend, name="inner")
    def inner() -> None:
        logging.getLogger(LOGGER).info("from the inner task")

    @background(backend=backend, name="outer")
    def outer() -> None:
        inner().result(60)
        logging.getLogger(LOGGER).info("from the outer task")

    outer().result(RESULT_S)
    assert [(r.getMessage(), r.processName) for r in collected] == [
        ("from the inner task", "inner"),
        ("from the outer task", "outer"),
    ]


def test_an_async_stream_runs_in_one_task_from_start_to_end(backend: str) -> None:
    """Context variables and the current task span the generator's ``yield``s, as under
    ``asyncio.run``."""

    @background(backend=backend)
    async def agen() -> AsyncIterator[Any]:
        import contextvars

        var = contextvars.ContextVar("var", default="unset")
        var.set("kept")
        first = asyncio.current_task()
        yield "first"
        yield var.get(), asyncio.current_task() is first

    assert list(agen()) == ["first", ("kept", True)]


def test_a_timeout_stops_a_stream_held_back_by_its_reader(backend: str, tmp_path: Path) -> None:
    """A loop in progress that reads no more: the timeout's graceful stop still reaches the
    task (which waits to yield), and its ``finally`` runs."""
    marker = tmp_path / "cleaned"

    @background(backend=backend, graceful=True, grace=60, timeout=2)
    def produce(marker: str) -> Iterator[bytes]:
        try:
            while True:
                yield b"x" * (1 << 20)
        finally:
            Path(marker).write_text("cleaned")

    task = produce(str(marker))
    iterator = iter(task)
    next(iterator)  # then nothing more is read until the task is stopped
    assert wait_until(marker.exists, timeout=RESULT_S)
    with pytest.raises(TaskStopped):
        list(iterator)
    assert task.exitcode == -signal.SIGTERM


def test_records_logged_until_a_stop_all_arrive_in_order(
    backend: str, collected: List[logging.LogRecord]
) -> None:
    """A burst of records, a stop in the middle of it, one more record in ``finally``: every
    record arrives, in order, the last one included."""

    @background(backend=backend, graceful=True, grace=60)
    def chatty() -> None:
        log = logging.getLogger(LOGGER)
        i = 0
        try:
            while True:
                log.info("record %d", i)
                i += 1
        finally:
            log.info("cleanup after %d", i)

    task = chatty()
    assert wait_until(lambda: len(collected) >= 500, timeout=RESULT_S)
    task.stop()
    with pytest.raises(TaskStopped):
        task.result(RESULT_S)
    messages = [r.getMessage() for r in collected]
    count = len(messages) - 1
    assert messages[:-1] == [f"record {i}" for i in range(count)]
    # The record the stop came in: sent whole (the stop waited for it), or not at all.
    assert messages[-1] in (f"cleanup after {count}", f"cleanup after {count - 1}")


# -- queues, on both backends ---------------------------------------------------------------


def test_a_queue_carries_items_both_ways_each_once(backend: str) -> None:
    """Two producers and two relays in tasks, the main program between them: every item
    arrives once, and join() waits for every task_done()."""
    inbox: bgtask.Queue[Any] = bgtask.Queue(backend=backend)
    outbox: bgtask.Queue[Any] = bgtask.Queue(maxsize=8, backend=backend)

    @background(backend=backend)
    def produce(name: str, n: int, q: bgtask.Queue[Any]) -> int:
        for i in range(n):
            q.put((name, i))
        return n

    @background(backend=backend)
    def relay(inbox: bgtask.Queue[Any], outbox: bgtask.Queue[Any]) -> int:
        moved = 0
        for item in inbox:
            outbox.put(item)
            inbox.task_done()
            moved += 1
        return moved

    relays = [relay(inbox, outbox) for _ in range(2)]
    producers = [produce(name, 150, inbox) for name in "ab"]
    got = [outbox.get(timeout=RESULT_S) for _ in range(300)]
    assert [p.result(RESULT_S) for p in producers] == [150, 150]
    inbox.join()
    assert inbox.unfinished_tasks == 0
    inbox.shutdown()
    assert sum(r.result(RESULT_S) for r in relays) == 300
    assert sorted(got) == sorted((name, i) for name in "ab" for i in range(150))
    assert outbox.qsize() == 0
    assert outbox.empty()


def test_a_bounded_queue_holds_its_producer_back(backend: str) -> None:
    q: bgtask.Queue[int] = bgtask.Queue(maxsize=2, backend=backend)

    @background(backend=backend)
    def produce(q: bgtask.Queue[int]) -> str:
        for i in range(5):
            q.put(i)
        try:
            q.put(99, block=False)
        except queue.Full:
            return "full"
        return "room"

    task = produce(q)
    assert wait_until(q.full, timeout=RESULT_S)
    assert not task.done()  # it waits for a place
    assert [q.get(timeout=RESULT_S) for _ in range(3)] == [0, 1, 2]
    assert task.result(RESULT_S) == "full"
    assert q.qsize() == 2
    with pytest.raises(queue.Full):
        q.put(5, timeout=0.05)
    with pytest.raises(queue.Full):
        q.put_nowait(5)
    assert [q.get_nowait(), q.get(block=False)] == [3, 4]
    with pytest.raises(queue.Empty):
        q.get(timeout=0.05)
    with pytest.raises(queue.Empty):
        q.get_nowait()


def test_a_shutdown_drains_then_ends_every_waiting_task(backend: str) -> None:
    q: bgtask.Queue[int] = bgtask.Queue(backend=backend)

    @background(backend=backend)
    def consume(q: bgtask.Queue[int]) -> List[int]:
        bgtask.ready()
        return list(q)  # until the queue is shut down and empty

    consumers = [consume(q) for _ in range(2)]
    for task in consumers:
        task.wait_ready(RESULT_S)
    for i in range(10):
        q.put(i)
    q.shutdown()
    assert q.is_shutdown
    with pytest.raises(bgtask.ShutDown):
        q.put(10)
    got = [task.result(RESULT_S) for task in consumers]
    assert sorted(got[0] + got[1]) == list(range(10))
    with pytest.raises(bgtask.ShutDown):
        q.get(timeout=RESULT_S)
    assert "shut down" in repr(q)


def test_an_immediate_shutdown_drops_the_items_as_done(backend: str) -> None:
    q: bgtask.Queue[int] = bgtask.Queue(backend=backend)

    @background(backend=backend)
    def join_then_report(q: bgtask.Queue[int]) -> str:
        bgtask.ready()
        q.join()
        return "joined"

    for i in range(5):
        q.put(i)
    assert q.get(timeout=RESULT_S) == 0
    q.task_done()
    task = join_then_report(q)
    task.wait_ready(RESULT_S)
    assert q.unfinished_tasks == 4
    q.shutdown(immediate=True)
    assert task.result(RESULT_S) == "joined"
    assert q.qsize() == 0
    assert q.unfinished_tasks == 0
    with pytest.raises(bgtask.ShutDown):
        q.get_nowait()
    with pytest.raises(ValueError, match="more times"):
        q.task_done()


def test_items_put_before_a_producer_crashed_are_kept(backend: str) -> None:
    q: bgtask.Queue[str] = bgtask.Queue(backend=backend)

    @background(backend=backend)
    def produce_then_die(q: bgtask.Queue[str]) -> None:
        for word in ("before", "the", "crash"):
            q.put(word)
        os._exit(3)

    with pytest.raises(TaskCrashed):
        produce_then_die(q).result(RESULT_S)
    assert [q.get(timeout=RESULT_S) for _ in range(3)] == ["before", "the", "crash"]
    assert q.qsize() == 0


def test_a_stop_loses_no_item_of_a_busy_consumer(backend: str) -> None:
    """A graceful consumer moving items from one queue to another is stopped halfway: each
    item is in one of the two queues, none twice, none lost."""
    inbox: bgtask.Queue[int] = bgtask.Queue(backend=backend)
    outbox: bgtask.Queue[int] = bgtask.Queue(backend=backend)

    @background(backend=backend, graceful=True, grace=60)
    def move(inbox: bgtask.Queue[int], outbox: bgtask.Queue[int]) -> None:
        for item in inbox:
            outbox.put(item)

    for i in range(300):
        inbox.put(i)
    task = move(inbox, outbox)
    assert wait_until(lambda: outbox.qsize() >= 50, timeout=RESULT_S)
    task.stop()
    with pytest.raises(TaskStopped):
        task.result(RESULT_S)
    inbox.shutdown()
    outbox.shutdown()
    moved, left = list(outbox), list(inbox)
    assert moved + left == list(range(300))  # the stop may come once all were moved
    assert len(moved) >= 50


def test_a_stop_ends_a_consumer_waiting_on_an_empty_queue(backend: str, tmp_path: Path) -> None:
    marker = tmp_path / "cleaned"
    q: bgtask.Queue[int] = bgtask.Queue(backend=backend)

    @background(backend=backend, graceful=True, grace=60)
    def wait_for_one(q: bgtask.Queue[int], marker: str) -> int:
        try:
            bgtask.ready()  # in the try: the stop may come as soon as ready() returned
            return q.get()
        finally:
            Path(marker).write_text("yes")

    task = wait_for_one(q, str(marker))
    task.wait_ready(RESULT_S)
    task.stop()
    with pytest.raises(TaskStopped):
        task.result(RESULT_S)
    assert marker.read_text() == "yes"
    q.put(7)  # nobody took an item meanwhile
    assert q.get(timeout=RESULT_S) == 7


def test_large_queue_items_arrive_writable_and_private(backend: str) -> None:
    np = pytest.importorskip("numpy")
    q: bgtask.Queue[Any] = bgtask.Queue(backend=backend)

    @background(backend=backend)
    def double(q: bgtask.Queue[Any]) -> bool:
        array = q.get()
        writable = bool(array.flags.writeable)
        array *= 2
        q.put(array)
        return writable

    original = np.ones(4 << 20, dtype=np.uint8)
    q.put(original)
    assert double(q).result(RESULT_S)
    back = q.get(timeout=RESULT_S)
    assert int(back.sum()) == 2 * (4 << 20)
    assert back.flags.writeable
    assert int(original.sum()) == 4 << 20  # nobody wrote to the program's own


def test_an_item_that_cannot_be_unpickled_is_dropped_as_done(backend: str) -> None:
    """An item whose unpickling fails where it is got: that get raises SerializationError,
    the item counts as done, the next get returns the next item."""
    q: bgtask.Queue[Any] = bgtask.Queue(backend=backend)

    def explode() -> None:
        raise RuntimeError("not here")

    class Bomb:
        def __reduce__(self) -> Any:
            return explode, ()

    @background(backend=backend)
    def get_two(q: bgtask.Queue[Any]) -> Any:
        try:
            q.get()
        except bgtask.SerializationError as exc:
            error = str(exc)
        after = q.get()
        q.task_done()
        return error, after

    with pytest.raises(bgtask.SerializationError, match="cannot put an item of type"):
        q.put(threading.Lock())
    q.put(Bomb())
    q.put("after")
    error, after = get_two(q).result(RESULT_S)
    assert "the item is dropped" in error
    assert "RuntimeError: not here" in error
    assert after == "after"
    q.join()  # the dropped one counts as done
    assert q.unfinished_tasks == 0


def test_a_killed_consumer_takes_no_item_with_it(backend: str) -> None:
    """A consumer killed while it waits in get() takes nothing: the next item put is there."""
    q: bgtask.Queue[int] = bgtask.Queue(backend=backend)

    @background(backend=backend)
    def wait_for_one(q: bgtask.Queue[int]) -> int:
        bgtask.ready()
        return q.get()

    task = wait_for_one(q)
    task.wait_ready(RESULT_S)
    task.kill()
    with pytest.raises(TaskStopped):
        task.result(RESULT_S)
    q.put(1)
    assert q.get(timeout=RESULT_S) == 1
    assert q.qsize() == 0


def test_a_task_killed_while_it_waits_for_its_own_task_is_stopped(backend: str) -> None:
    """Killing a task that waits for a task of its own ends it as killed (on Ray, the inner
    task is cancelled first: the outer one's report of that is not its outcome)."""

    @background(backend=backend, daemon=True)  # a daemon: it ends with its killed parent
    def inner() -> None:
        stop_event().wait(RESULT_S)

    @background(backend=backend)
    def outer() -> None:
        task = inner()
        bgtask.ready()
        task.result()

    task = outer()
    task.wait_ready(RESULT_S)
    task.kill()
    with pytest.raises(TaskStopped) as caught:
        task.result(RESULT_S)
    assert caught.value.reason == "kill"


def test_a_queue_passes_on_to_nested_tasks_and_outlives_its_handle(backend: str) -> None:
    """A task hands the queue to a task of its own; the program dropped its Queue before
    they used it (the task keeps it alive)."""
    import gc

    @background(backend=backend)
    def inner(q: bgtask.Queue[int]) -> None:
        q.put(2)

    @background(backend=backend)
    def outer(q: bgtask.Queue[int]) -> List[int]:
        q.put(1)
        inner(q).result()
        return [q.get(), q.get()]

    task = outer(bgtask.Queue(backend=backend))
    gc.collect()
    assert task.result(RESULT_S) == [1, 2]


def test_a_queue_made_in_a_task_serves_its_tasks(backend: str) -> None:
    @background(backend=backend)
    def fan_in(n: int) -> int:
        q: bgtask.Queue[int] = bgtask.Queue()  # on the task's own backend
        workers = [square(i, q) for i in range(n)]
        for w in workers:
            w.result()
        return sum(q.get() for _ in range(n))

    @background(backend=backend)
    def square(i: int, q: bgtask.Queue[int]) -> None:
        q.put(i * i)

    assert fan_in(4).result(RESULT_S) == 0 + 1 + 4 + 9


def test_a_call_waiting_in_a_queues_actor_takes_nothing(cluster: str) -> None:
    """Ray does not cancel a call whose caller died: a get waiting in the actor (here, one that
    nobody will collect) must not take the item it was waiting for."""
    q: bgtask.Queue[int] = bgtask.Queue(backend="ray")
    actor = q._end.actor  # type: ignore[union-attr]
    waiting = actor.wait_for_item.remote(RESULT_S)
    put = actor.put.remote(pickle.dumps(0), [], "int")  # queued behind the wait: it has begun
    ray.get(put)
    q.put(1)
    assert [q.get(timeout=RESULT_S), q.get(timeout=RESULT_S)] == [0, 1]
    ray.get(waiting, timeout=RESULT_S)  # it ended when the first came, and took nothing
    assert q.qsize() == 0


def test_a_queue_used_after_its_connection_ended_is_shut_down(head: HeadNode, tmp_path: Path) -> None:
    """``bgtask.shutdown()`` ends the connection bgtask made (the next task connects again);
    a queue on Ray made before then raises ShutDown: no call goes to Ray, which would start a
    cluster of its own when it has no connection."""
    result = run_script(
        tmp_path,
        f"""
import ray
import bgtask

def use(q):
    for call in (lambda: q.get(timeout=1), lambda: q.put(2), q.qsize):
        try:
            call()
        except bgtask.ShutDown as exc:
            print("ShutDown:", exc)

bgtask.use_ray({head.address!r}, logging_level="WARNING")
q = bgtask.Queue()
q.put(1)
bgtask.shutdown()
print("connected:", ray.is_initialized())
use(q)
print("a task:", bgtask.background(lambda: "ran")().result(60))  # connected again
use(q)
q2 = bgtask.Queue()
ray.shutdown()  # the program's own call
use(q2)
print("connected:", ray.is_initialized())
""",
        env=dict(script_env(), **ENV),
        timeout=RESULT_S,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("ShutDown: the queue is gone") == 9, result.stdout
    assert result.stdout.count("connected: False") == 2, result.stdout
    assert "a task: ran" in result.stdout


@pytest.mark.parametrize("queue_backend", ["local", "ray"])
def test_ctrl_c_in_a_blocked_get_is_a_plain_keyboard_interrupt(
    head: HeadNode, tmp_path: Path, queue_backend: str
) -> None:
    """A Ctrl-C while the main program waits in get() raises KeyboardInterrupt from get(), with
    no other exception as its context and no frame of Ray's (it is not raised inside Ray)."""
    result = run_script(
        tmp_path,
        f"""
import os, signal, sys, threading, traceback
import bgtask

bgtask.use_ray({head.address!r}, logging_level="WARNING")
q = bgtask.Queue(backend={queue_backend!r})
main = threading.main_thread().ident

def interrupt_once_waiting():
    while True:  # until the main thread is inside get()
        frame = sys._current_frames().get(main)
        names = []
        while frame is not None:
            names.append(frame.f_code.co_name)
            frame = frame.f_back
        if "get" in names and "<module>" in names:
            os.kill(os.getpid(), signal.SIGINT)
            return
        threading.Event().wait(0.01)

threading.Thread(target=interrupt_once_waiting, daemon=True).start()
try:
    q.get()
except KeyboardInterrupt as exc:
    text = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    print("context:", "During handling" not in text and "direct cause" not in text)
    print("ray frames:", "ray/_private" in text or "_raylet" in text)
""",
        env=dict(script_env(), **ENV),
        timeout=RESULT_S,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "context: True" in result.stdout, result.stdout
    assert "ray frames: False" in result.stdout, result.stdout


# -- Ray's own ------------------------------------------------------------------------------


def test_a_killed_ray_task_is_not_run_again(cluster: str, tmp_path: Path) -> None:
    """max_retries is 0: a worker killed from outside is a crash, not a silent second run."""
    runs = tmp_path / "runs"

    @background(backend="ray")
    def once(runs: str) -> int:
        with open(runs, "a") as f:
            f.write("run\n")
        os.kill(os.getpid(), signal.SIGKILL)
        return 1

    with pytest.raises(TaskCrashed, match="Ray worker"):
        once(str(runs)).result(RESULT_S)
    assert runs.read_text() == "run\n"


def test_a_worker_is_left_as_the_relay_found_it(cluster: str, collected: List[logging.LogRecord]) -> None:
    """Ray runs task after task in a worker: its logging and warnings are put back after each."""

    @background(backend="ray")
    def logs() -> None:
        logging.getLogger(LOGGER).info("relayed")
        warnings.warn("relayed too", UserWarning, stacklevel=1)

    @background(backend="ray", relay_logging=False)
    def state() -> Any:
        root = logging.getLogger()
        return (
            root.level,
            [type(handler).__name__ for handler in root.handlers],
            logging.getLogger(LOGGER).level,
            logging.root.manager.disable,
            warnings.showwarning.__module__,
        )

    for _ in range(4):
        with pytest.warns(UserWarning, match="relayed too"):
            logs().result(RESULT_S)
    assert [r.getMessage() for r in collected] == ["relayed"] * 4
    for _ in range(4):
        assert state().result(RESULT_S) == (logging.WARNING, [], logging.NOTSET, 0, "warnings")


def test_a_level_a_task_set_holds_only_for_that_task(
    cluster: str, collected: List[logging.LogRecord]
) -> None:
    """A task that mutes a logger on a worker: the next task there logs at the main program's
    levels again."""

    @background(backend="ray")
    def mute() -> int:
        logging.getLogger(LOGGER).setLevel(logging.ERROR)
        return os.getpid()

    @background(backend="ray")
    def speak(i: int) -> int:
        logging.getLogger(LOGGER).info("spoke %d", i)
        return os.getpid()

    muted = set()
    spoke = set()
    for i in range(10):  # until one runs where the other did (Ray picks the worker)
        muted.add(mute().result(RESULT_S))
        spoke.add(speak(i).result(RESULT_S))
        if muted & spoke:
            break
    assert muted & spoke
    assert [r.getMessage() for r in collected] == [f"spoke {i}" for i in range(len(collected))]
    assert len(collected) == i + 1


def test_a_process_a_ray_task_forks_logs_as_the_worker_does(cluster: str) -> None:
    """Ray's connection is not the forked process's: its records go where the worker's would,
    and it neither hangs nor fails."""

    @background(backend="ray")
    def forks() -> Any:
        import multiprocessing

        def child() -> None:
            logging.getLogger(LOGGER).warning("from a forked process")

        process = multiprocessing.get_context("fork").Process(target=child)
        process.start()
        process.join(60)
        alive = process.is_alive()
        if alive:
            process.kill()
            process.join()
        return alive, process.exitcode

    assert forks().result(RESULT_S) == (False, 0)


def test_what_cannot_go_to_ray_is_refused(cluster: str) -> None:
    @background(backend="ray")
    def takes(q: Any) -> None:
        pass

    @background(backend="local")
    def takes_locally(q: Any) -> None:
        pass

    @background(backend="ray")
    def makes() -> Any:
        return bgtask.Queue()

    with pytest.raises(bgtask.SerializationError, match=r"Queue\(backend='ray'\)"):
        takes(bgtask.Queue(backend="local"))
    with pytest.raises(bgtask.SerializationError, match=r"Queue\(backend='local'\)"):
        takes_locally(bgtask.Queue(backend="ray"))
    with pytest.raises(bgtask.SerializationError, match="can be an argument of a task"):
        makes().result(RESULT_S)
    left, right = socket.socketpair()
    with left, right, pytest.raises(bgtask.BgTaskError, match="descriptors"):
        takes(left)
    with pytest.raises(ValueError, match="backend must be"):
        bgtask.Queue(backend="dask")
    with pytest.raises(ValueError, match="start_method"):
        background(backend="ray", start_method="spawn")
    with pytest.raises(TypeError, match="ray_options does not take 'gpu'"):
        background(backend="ray", ray_options={"gpu": 1})
    with pytest.raises(ValueError, match="backend"):
        background(backend="dask")


def test_ray_options_reach_ray(cluster: str) -> None:
    @background(backend="ray", ray_options={"fresh_worker": True, "num_cpus": 0.5})
    def where() -> int:
        return os.getpid()

    first, second = where().result(RESULT_S), where().result(RESULT_S)
    assert first != second  # a worker of its own each time, which exits after it
    assert wait_until(lambda: not pid_alive(first), timeout=60)


def test_a_daemon_holds_no_cpu_slot(cluster: str) -> None:
    """Two CPUs on the head: three daemons and a worker task all run at once."""

    @background(backend="ray", daemon=True, graceful=True)
    def daemon() -> None:
        stop_event().wait(120)

    @background(backend="ray")
    def work() -> str:
        return "ran"

    daemons = [daemon() for _ in range(3)]
    try:
        assert work().result(RESULT_S) == "ran"
        assert wait_until(lambda: all(d.pid is not None for d in daemons), timeout=RESULT_S)  # running
    finally:
        for d in daemons:
            d.stop()
        for d in daemons:
            d.join(RESULT_S)


def test_use_ray_at_the_end_of_a_program(head: HeadNode, tmp_path: Path) -> None:
    """A program that joins by address: daemon tasks stop gracefully at its end (their
    finally runs), non-daemon tasks are waited for, before Ray's own exit ends the job."""
    env = dict(script_env(), **ENV)
    result = run_script(
        tmp_path,
        f"""
import pathlib, time
import bgtask

HERE = pathlib.Path(__file__).parent

@bgtask.background(daemon=True, graceful=True, grace=30)
def daemon():
    (HERE / "daemon-started").write_text("yes")
    try:
        time.sleep(120)
    finally:
        time.sleep(0.5)
        (HERE / "daemon-cleaned").write_text("yes")

@bgtask.background
def worker():
    while not (HERE / "daemon-started").exists():
        time.sleep(0.01)
    time.sleep(1)
    (HERE / "worker-done").write_text("yes")

if __name__ == "__main__":
    bgtask.use_ray({head.address!r}, logging_level="WARNING")
    daemon()
    worker()
""",
        env=env,
        timeout=RESULT_S,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert (tmp_path / "worker-done").exists()
    assert (tmp_path / "daemon-cleaned").exists()


def test_ray_tasks_die_with_a_killed_main_program(head: HeadNode, tmp_path: Path) -> None:
    """Documented limit: on Ray, every task of a killed main program dies with it, daemon or not."""
    env = dict(script_env(), **ENV)
    script = Script(
        tmp_path,
        f"""
import os, pathlib, time
import bgtask

HERE = pathlib.Path(__file__).parent

@bgtask.background
def worker():
    (HERE / "pid.tmp").write_text(str(os.getpid()))
    (HERE / "pid.tmp").rename(HERE / "pid")  # whole when it appears
    time.sleep(120)

if __name__ == "__main__":
    bgtask.use_ray({head.address!r}, logging_level="WARNING")
    worker()
    time.sleep(120)
""",
        env=env,
    )
    pid = 0
    try:
        assert wait_until((tmp_path / "pid").exists, timeout=RESULT_S), script.stderr()
        pid = int((tmp_path / "pid").read_text())
        os.kill(script.proc.pid, signal.SIGKILL)
        script.wait(RESULT_S)
        assert wait_until(lambda: not pid_alive(pid), timeout=60)
    finally:
        script.close()


def test_without_ray_installed_the_error_names_the_extra(tmp_path: Path) -> None:
    result = run_script(
        tmp_path,
        """
import sys
sys.modules["ray"] = None  # as if not installed
import bgtask
try:
    bgtask.use_ray()
except bgtask.BgTaskError as exc:
    print(exc)
print("ray imported by bgtask:", "ray" in sys.modules and sys.modules["ray"] is not None)
""",
        timeout=RESULT_S,
    )
    assert "pip install 'bgtask[ray]'" in result.stdout, result.stderr
    assert "ray imported by bgtask: False" in result.stdout


@pytest.mark.parametrize("join", [True, False], ids=["joined-by-address", "private-cluster"])
def test_the_ray_example(head: HeadNode, join: bool) -> None:
    """examples/ray_cluster.py, on the session's head node and on a private cluster of its own."""
    _run_the_ray_example(head.address if join else None)


def _run_the_ray_example(address: Any) -> None:
    example = Path(__file__).resolve().parent.parent / "examples" / "ray_cluster.py"
    args = [sys.executable, str(example)] + (["--address", address] if address else [])
    result = subprocess.run(  # noqa: PLW1510 (the exit code is asserted)
        args, capture_output=True, text=True, timeout=RESULT_S, env=dict(script_env(), **ENV)
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    assert EXAMPLE_OK in result.stdout


def test_runtime_env_sets_the_tasks_environment(cluster: str) -> None:
    """A Ray task runs in its worker's environment; runtime_env is how to give it variables."""

    @background(backend="ray", ray_options={"runtime_env": {"env_vars": {"BGTASK_RAY_TEST": "given"}}})
    def read() -> str:
        return os.environ.get("BGTASK_RAY_TEST", "absent")

    os.environ["BGTASK_RAY_TEST_MAIN_ONLY"] = "1"
    try:

        @background(backend="ray")
        def main_only() -> str:
            return os.environ.get("BGTASK_RAY_TEST_MAIN_ONLY", "absent")

        assert read().result(RESULT_S) == "given"
        assert main_only().result(RESULT_S) == "absent"  # the main program's are not sent
    finally:
        del os.environ["BGTASK_RAY_TEST_MAIN_ONLY"]


def test_nested_fan_out_lends_the_waiting_tasks_cpus(cluster: str) -> None:
    """Two CPUs, two outer tasks each waiting for an inner one: the waits lend their CPUs out
    (without that, the inner tasks would never be scheduled)."""

    @background(backend="ray")
    def inner(x: int) -> int:
        return x * 10

    @background(backend="ray")
    def outer(x: int) -> int:
        return inner(x).result(RESULT_S) + 1

    assert list(outer.map(range(4), limit=2, timeout=RESULT_S)) == [1, 11, 21, 31]


def test_stopping_and_killing_a_task_still_queued_in_ray(cluster: str, tmp_path: Path) -> None:
    """Both CPUs busy: a queued task stopped or killed ends as TaskStopped, without running."""
    ran = tmp_path / "ran"

    @background(backend="ray", graceful=True, grace=30)
    def busy() -> None:
        stop_event().wait(RESULT_S)

    # Stopped while Ray holds it in its queue, it is killed once its grace is over.
    @background(backend="ray", graceful=True, grace=3)
    def queued(ran: str) -> None:
        Path(ran).write_text("yes")

    blockers = [busy() for _ in range(2)]
    try:
        assert wait_until(lambda: all(b.pid is not None for b in blockers), timeout=RESULT_S)
        stopped, killed = queued(str(ran)), queued(str(ran))
        stopped.stop()
        killed.kill()
        for task in (stopped, killed):
            with pytest.raises(TaskStopped):
                task.result(RESULT_S)
    finally:
        for blocker in blockers:
            blocker.stop()
        for blocker in blockers:
            blocker.join(RESULT_S)
    assert not ran.exists()


def test_workers_stay_healthy_across_stops_racing_their_tasks_end(cluster: str) -> None:
    """Stops that land as tasks finish never kill a worker (the SIGUSR1 handler is put back
    under a lock), and a worker's descriptors do not grow with the tasks it ran."""

    @background(backend="ray", graceful=True, grace=30)
    def short(i: int) -> int:
        stop_event()  # a task that asks for its event: its pipe is closed at its end
        time.sleep(0.001 * (i % 5))
        return i

    def look() -> Any:
        """Run by Ray itself, between bgtask's tasks: the worker as a task leaves it."""
        import signal as signals
        import sys as system

        runner = system.modules.get("bgtask._backends.ray_worker")
        default = signals.getsignal(signals.SIGUSR1) == signals.SIG_DFL
        clean = default and not getattr(runner, "in_task", False)
        return os.getpid(), len(os.listdir("/proc/self/fd")), clean

    probe = ray.remote(look)
    before = {pid: fds for pid, fds, _ in ray.get([probe.remote() for _ in range(6)], timeout=RESULT_S)}
    outcomes = []
    for i in range(60):
        task = short(i)
        task.stop()
        try:
            outcomes.append(task.result(RESULT_S))
        except TaskStopped:
            outcomes.append("stopped")
    assert len(outcomes) == 60  # none crashed: TaskCrashed would have been raised
    after = ray.get([probe.remote() for _ in range(6)], timeout=RESULT_S)
    for pid, fds, clean in after:
        assert clean, pid  # SIGUSR1 back to its default, bgtask's task flag off
        if pid in before:
            # A leak is two per task (60 tasks over a few workers); Ray's own connections vary
            assert fds <= before[pid] + 16, (pid, before[pid], fds)


def test_ctrl_c_at_the_end_stops_the_waited_for_ray_tasks(head: HeadNode, tmp_path: Path) -> None:
    """At the program's end, a Ctrl-C stops the non-daemon tasks it waits for (their finally
    runs), a second one kills them; no traceback from a task either way."""
    env = dict(script_env(), **ENV)
    script = Script(
        tmp_path,
        f"""
import pathlib, sys, threading, time
import bgtask

HERE = pathlib.Path(__file__).parent

{ANNOUNCE_EXIT_WAIT}
@bgtask.background(graceful=True, grace=60)
def polite():
    (HERE / "polite-started").write_text("yes")
    try:
        time.sleep(120)
    finally:
        (HERE / "polite-cleaned").write_text("yes")

@bgtask.background(graceful=True, grace=60)
def stubborn():
    (HERE / "stubborn-started").write_text("yes")
    while True:
        try:
            time.sleep(120)
        except BaseException:
            pass

if __name__ == "__main__":
    bgtask.use_ray({head.address!r}, logging_level="WARNING")
    polite()
    stubborn()
    announce_exit_wait()
""",
        env=env,
    )
    try:
        assert wait_until((tmp_path / "polite-started").exists, timeout=RESULT_S)
        assert wait_until((tmp_path / "stubborn-started").exists, timeout=RESULT_S)
        script.expect("IN-EXIT-WAIT", timeout=RESULT_S)  # main returned; bgtask waits for them
        script.signal_group(signal.SIGINT)  # the terminal's Ctrl-C: stops both
        assert wait_until((tmp_path / "polite-cleaned").exists, timeout=RESULT_S)
        script.signal_group(signal.SIGINT)  # the second: kills the one that ignored it
        script.wait(RESULT_S)
        assert "Traceback" not in script.stderr()
    finally:
        script.close()


LISTENERS = r"""
import os, socket, bgtask

def listening(pids):
    inodes = {}
    for name in ("tcp", "tcp6"):
        with open(f"/proc/net/{name}") as f:
            for line in f.readlines()[1:]:
                fields = line.split()
                if fields[3] == "0A":  # LISTEN
                    inodes[fields[9]] = fields[1]
    found = []
    for pid in pids:
        try:
            links = [os.readlink(f"/proc/{pid}/fd/{fd}") for fd in os.listdir(f"/proc/{pid}/fd")]
        except OSError:
            continue
        sockets = [link[8:-1] for link in links if link.startswith("socket:[")]
        found += [inodes[inode] for inode in sockets if inode in inodes]
    return found

def tree(root):
    children = {}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/stat") as f:
                ppid = f.read().rsplit(")", 1)[1].split()[1]
        except OSError:
            continue
        children.setdefault(int(ppid), []).append(int(pid))
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo += children.get(pid, [])
    return out

bgtask.use_ray()

@bgtask.background
def where():
    return os.getpid()

where().result(120)
addresses = listening(tree(os.getpid()))
loopback = {"0100007F", "00000000000000000000000001000000", "0000000000000000FFFF00000100007F"}
on_loopback = all(address.split(":")[0] in loopback for address in addresses)
print("listeners", len(addresses), "all loopback", on_loopback, flush=True)
if not on_loopback:
    # Newer Ray binds wider, with token authentication on: a client without the token (none in
    # its home, the mode off) must be refused, and one with it accepted.
    import subprocess, sys, tempfile
    import ray

    gcs = ray.get_runtime_context().gcs_address
    probe = f"import ray; ray.init(address={gcs!r}); print('JOINED', ray.get(ray.remote(lambda: 1).remote()))"

    def joins(env):
        run = subprocess.run([sys.executable, "-c", probe], env=env,
                             capture_output=True, text=True, timeout=100)
        return "JOINED 1" in run.stdout

    # This program's environment, as Ray set it up (the mode, the token's file), joins; one
    # without the token (another home, the mode off) is refused.
    stranger = {k: v for k, v in os.environ.items() if not k.startswith("RAY_AUTH")}
    with tempfile.TemporaryDirectory() as home:
        refused = not joins(dict(stranger, RAY_AUTH_MODE="disabled", HOME=home))
    print("token refused", refused, "accepted", joins(dict(os.environ)), flush=True)
"""


def test_a_private_cluster_listens_on_loopback_only(tmp_path: Path) -> None:
    """use_ray() with no address: every port of the cluster it starts is on the loopback address,
    or, where the Ray release binds wider, a client without Ray's token is refused."""
    # As a user's program starts it: no address, and Ray's own default for authentication.
    env = {
        key: value for key, value in dict(script_env(), **ENV).items() if key not in ("RAY_ADDRESS", *AUTH)
    }
    result = run_script(tmp_path, LISTENERS, timeout=RESULT_S, env=env)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    words = result.stdout.split()
    assert words[0] == "listeners", result.stdout
    assert int(words[1]) >= 3  # the GCS, the raylet, a worker at least
    if words[4] != "True":  # ... "token refused True accepted True"
        assert words[5:] == ["token", "refused", "True", "accepted", "True"], result.stdout


PRIVATE_CLUSTER_KILLED = """
import time
import bgtask

@bgtask.background
def worker():
    time.sleep(120)

if __name__ == "__main__":
    import ray
    bgtask.use_ray()
    task = worker()
    while task.pid is None:
        time.sleep(0.01)
    print("session", ray._private.worker._global_node.get_session_dir_path(), flush=True)
    time.sleep(120)
"""


def _processes_naming(text: str) -> List[int]:
    found = []
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                with open(f"/proc/{name}/cmdline", "rb") as f:
                    if text.encode() in f.read():
                        found.append(int(name))
            except OSError:
                continue
    return found


@pytest.mark.parametrize("signum", [signal.SIGKILL, signal.SIGTERM], ids=["SIGKILL", "SIGTERM"])
def test_a_private_cluster_ends_with_its_killed_program(tmp_path: Path, signum: int) -> None:
    """Nothing of a program's own cluster outlives it (Ray's agents alone take about a minute to
    notice): every process that names the cluster's session is gone within seconds."""
    env = {
        key: value for key, value in dict(script_env(), **ENV).items() if key not in ("RAY_ADDRESS", *AUTH)
    }
    script = Script(tmp_path, PRIVATE_CLUSTER_KILLED, env=env)
    session = ""
    try:
        session = script.expect("session", timeout=RESULT_S)
        assert len(session) > 8
        assert _processes_naming(session)
        os.kill(script.proc.pid, signum)
        script.wait(RESULT_S)
        assert wait_until(lambda: not _processes_naming(session), timeout=30), _processes_naming(session)
    finally:
        script.close()
        if session:
            kill_quietly(_processes_naming(session))


def _set_marker(value: str) -> None:
    os.environ["BGTASK_RAY_INIT"] = value


def _read_marker() -> str:
    return os.environ.pop("BGTASK_RAY_INIT", "absent")  # popped: workers are reused


def _late_watcher() -> str:
    ready_at = time.monotonic()
    while time.monotonic() - ready_at < 0.5:  # a stop lands here, before stop_event()
        time.sleep(0.01)
    stop_event().wait()
    return "clean"


def test_initializers_run_on_ray(cluster: str) -> None:
    """The program's initializer and the function's run on the Ray worker, before the function."""
    bgtask.set_initializer(_set_marker, ("program",))
    try:
        plain = background(backend="ray")(_read_marker)
        own = background(backend="ray", initializer=_set_marker, initargs=("own",))(_read_marker)
        assert plain().result(RESULT_S) == "program"
        assert own().result(RESULT_S) == "own"
    finally:
        bgtask.set_initializer(None)


def test_graceful_event_on_ray(cluster: str) -> None:
    """graceful="event" on Ray: a stop before the task's first stop_event() only sets it."""
    task = background(backend="ray", graceful="event")(_late_watcher)()
    wait_until(lambda: task.pid is not None, timeout=RESULT_S)
    task.stop(timeout=RESULT_S)
    assert task.result(timeout=RESULT_S) == "clean"


# -- many nodes ------------------------------------------------------------------------------


def _node_up(node: WorkerNode) -> bool:
    return bool(ray.cluster_resources().get(node.resource))


def _node_id(node: WorkerNode) -> str:
    return str(next(n["NodeID"] for n in ray.nodes() if n["Alive"] and node.resource in n["Resources"]))


@pytest.fixture(scope="class")
def second_node(head: HeadNode, cluster: str) -> Iterator[WorkerNode]:
    """A second node beside the head, for this class's tests only (the others count on the
    head's two CPUs being the cluster's)."""
    node = WorkerNode(head, "bgtask_node_b")
    try:
        assert wait_until(lambda: _node_up(node), timeout=RESULT_S)
        yield node
    finally:
        node.stop()
        wait_until(lambda: not _node_up(node), timeout=RESULT_S)


class TestManyNodes:
    """A cluster of two nodes (and a third that dies), all on this machine."""

    def test_a_task_placed_by_resources_runs_on_the_other_node(self, second_node: WorkerNode) -> None:
        @background(backend="ray", ray_options={"resources": {second_node.resource: 1}})
        def where() -> str:
            import ray as ray_in_task

            return str(ray_in_task.get_runtime_context().get_node_id())

        @background(backend="ray")
        def ready_and_where() -> str:
            bgtask.ready("placed")
            return str(where().result(RESULT_S))

        task = ready_and_where()
        assert task.wait_ready(RESULT_S) == "placed"
        assert task.result(RESULT_S) == _node_id(second_node)

    def test_a_queue_between_tasks_on_two_nodes(self, second_node: WorkerNode) -> None:
        """A producer on the other node, a consumer on the head node, a bounded queue between
        them (made by the main program): every item once, in order, backpressure across."""
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        head_id = next(
            n["NodeID"] for n in ray.nodes() if n["Alive"] and "node:__internal_head__" in n["Resources"]
        )
        here = NodeAffinitySchedulingStrategy(node_id=head_id, soft=False)

        @background(backend="ray", ray_options={"resources": {second_node.resource: 1}})
        def produce(q: bgtask.Queue[Any], n: int) -> str:
            import ray as ray_in_task

            for i in range(n):
                q.put(i)
            q.shutdown()
            return str(ray_in_task.get_runtime_context().get_node_id())

        @background(backend="ray", ray_options={"scheduling_strategy": here})
        def consume(q: bgtask.Queue[Any]) -> Any:
            import ray as ray_in_task

            return list(q), str(ray_in_task.get_runtime_context().get_node_id())

        q: bgtask.Queue[Any] = bgtask.Queue(maxsize=4, backend="ray")
        consumer = consume(q)
        producer = produce(q, 500)
        items, consumed_on = consumer.result(RESULT_S)
        assert items == list(range(500))
        assert producer.result(RESULT_S) == _node_id(second_node)
        assert consumed_on == head_id != _node_id(second_node)

    def test_runtime_env_ships_the_code_a_task_needs(
        self, head: HeadNode, second_node: WorkerNode, tmp_path: Path
    ) -> None:
        """Functions from packages the workers cannot import: the one ``use_ray(runtime_env=)``
        ships runs on the other node, from Ray's copy of it; the other is refused, by name.
        (Both are importable by the main program only once it connected: Ray gives workers on
        its machine the main program's ``sys.path`` as it was then.)"""
        for name in ("bgtask_shipped_pkg", "bgtask_unshipped_pkg"):
            package = tmp_path / "lib" / name
            package.mkdir(parents=True)
            (package / "__init__.py").write_text("def where():\n    return __file__\n")
        env = dict(script_env(), **ENV)
        result = run_script(
            tmp_path,
            f"""
import pathlib
import sys
import bgtask

LIB = pathlib.Path(__file__).parent / "lib"
FAR = {{"resources": {{{second_node.resource!r}: 1}}}}

bgtask.use_ray({head.address!r}, logging_level="WARNING",
               runtime_env={{"py_modules": [str(LIB / "bgtask_shipped_pkg")]}})
bgtask.background(lambda: None)().result(60)  # connected
sys.path.insert(0, str(LIB))
import bgtask_shipped_pkg, bgtask_unshipped_pkg

print("shipped:", bgtask.background(bgtask_shipped_pkg.where, ray_options=FAR)().result(60))
try:
    bgtask.background(bgtask_unshipped_pkg.where, ray_options=FAR)().result(60)
except bgtask.BgTaskError as exc:
    print("unshipped:", exc)
""",
            env=env,
            timeout=RESULT_S,
        )
        assert result.returncode == 0, result.stderr[-3000:]
        lines = dict(line.split(": ", 1) for line in result.stdout.splitlines() if ": " in line)
        assert lines["shipped"].endswith("__init__.py"), result.stdout
        assert not lines["shipped"].startswith(str(tmp_path)), result.stdout  # Ray's copy
        assert "bgtask_unshipped_pkg" in lines["unshipped"], result.stdout

    def test_streams_and_records_come_from_the_other_node(
        self, second_node: WorkerNode, collected: List[logging.LogRecord]
    ) -> None:
        @background(backend="ray", name="far", ray_options={"resources": {second_node.resource: 1}})
        def far(n: int) -> Iterator[int]:
            logging.getLogger(LOGGER).info("streaming %d", n)
            yield from range(n)

        assert list(far(100)) == list(range(100))
        assert [(r.getMessage(), r.processName) for r in collected] == [("streaming 100", "far")]

    def test_a_graceful_daemon_on_the_other_node_is_stopped_with_its_cleanup(
        self, head: HeadNode, second_node: WorkerNode, tmp_path: Path
    ) -> None:
        env = dict(script_env(), **ENV)
        result = run_script(
            tmp_path,
            f"""
import pathlib
import bgtask

HERE = pathlib.Path(__file__).parent
FAR = {{"resources": {{{second_node.resource!r}: 1}}}}

@bgtask.background(daemon=True, graceful=True, grace=30, ray_options=FAR)
def daemon():
    import ray
    (HERE / "daemon-node").write_text(ray.get_runtime_context().get_node_id())
    try:
        bgtask.stop_event().wait()
    finally:
        (HERE / "daemon-cleaned").write_text("yes")

@bgtask.background(ray_options=FAR)
def worker():
    import time
    while not (HERE / "daemon-node").exists():
        time.sleep(0.01)
    (HERE / "worker-done").write_text("yes")

if __name__ == "__main__":
    bgtask.use_ray({head.address!r}, logging_level="WARNING")
    daemon()
    worker()
""",
            env=env,
            timeout=RESULT_S,
        )
        assert result.returncode == 0, result.stderr[-3000:]
        assert (tmp_path / "worker-done").exists()
        assert (tmp_path / "daemon-cleaned").exists()
        assert (tmp_path / "daemon-node").read_text() == _node_id(second_node)

    def test_the_ray_example_on_two_nodes(self, head: HeadNode, second_node: WorkerNode) -> None:
        _run_the_ray_example(head.address)

    def test_a_node_lost_mid_task_is_task_crashed_and_never_run_again(
        self, head: HeadNode, cluster: str, tmp_path: Path
    ) -> None:
        ran = tmp_path / "ran"
        doomed = WorkerNode(head, "bgtask_doomed")
        try:
            assert wait_until(lambda: _node_up(doomed), timeout=RESULT_S)

            from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

            node_id = _node_id(doomed)
            # Soft: a second run, were there one, could go to the head node.
            there = NodeAffinitySchedulingStrategy(node_id=node_id, soft=True)

            @background(backend="ray", ray_options={"scheduling_strategy": there})
            def lasts(ran: str) -> None:
                with open(ran, "a") as f:
                    f.write("ran\n")
                time.sleep(RESULT_S)

            task = lasts(str(ran))
            assert wait_until(ran.exists, timeout=RESULT_S)
            doomed.lose()
            with pytest.raises(TaskCrashed):
                task.result(RESULT_S)
            time.sleep(2.0)  # a second run would have started by now, on the head node
        finally:
            doomed.stop()
        assert ran.read_text() == "ran\n"
