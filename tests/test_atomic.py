"""A stop or a Ctrl-C never cuts a message or a hand-over in two (bgtask._shared.context.atomic)."""

from __future__ import annotations

import logging
import os
import signal
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

import pytest

import bgtask
from bgtask import Queue, TaskStopped, background

from .helpers import run_script, wait_until


class SlowToUnpickle:
    """An item whose unpickling announces itself (a file) and then takes a while: a stop sent
    once the file exists lands while ``get()`` holds the item."""

    def __init__(self, index: int, mark: str, seconds: float = 1.0) -> None:
        self.index = index
        self.mark = mark
        self.seconds = seconds

    def __setstate__(self, state: Dict[str, Any]) -> None:
        self.__dict__.update(state)
        if os.environ.get("BGTASK_TEST_CONSUMER") == "1":
            Path(self.mark).touch()
            time.sleep(self.seconds)  # the work of unpickling a large object


def _consumer(q: Queue[Any], done: Queue[int]) -> None:
    os.environ["BGTASK_TEST_CONSUMER"] = "1"
    while True:
        item = q.get()
        done.put(item.index)
        q.task_done()


def test_a_stop_during_get_delivers_the_item(
    start_method: Optional[str], daemon: bool, tmp_path: Path
) -> None:
    """A graceful task stopped while get() holds an item gets the item; the stop comes after."""
    consumer = background(_consumer, daemon=daemon, graceful=True, start_method=start_method)
    q: Queue[Any] = Queue()
    done: Queue[int] = Queue()
    mark = tmp_path / "unpickling"
    q.put(SlowToUnpickle(0, str(mark)))
    q.put(SlowToUnpickle(1, str(tmp_path / "second"), seconds=0))
    task = consumer(q, done)
    assert wait_until(mark.exists)
    task.stop()
    assert isinstance(task.exception(timeout=20), TaskStopped)
    delivered = []
    while not done.empty():
        delivered.append(done.get_nowait())
    assert delivered == [0]  # got, put and marked done before the stop was raised
    assert q.qsize() == 1  # the next item was not taken
    assert q.get_nowait().index == 1
    q.task_done()
    assert (q.qsize(), q.unfinished_tasks) == (0, 0)


def _put_and_mark(q: Queue[bytes], mark: str) -> None:
    for i in range(2):
        q.put(b"x" * 300_000_000)
        Path(mark).write_text(f"put {i + 1} returned")


@pytest.mark.parametrize("maxsize", [0, 1])
def test_a_stop_during_put_comes_once_put_returned(
    start_method: Optional[str], daemon: bool, tmp_path: Path, maxsize: int
) -> None:
    """A graceful task stopped while put() sends an item: put() returns, the item arrives, and
    the stop comes as the task's loop goes round, as after get()."""
    producer = background(_put_and_mark, daemon=daemon, graceful=True, start_method=start_method)
    q: Queue[bytes] = Queue(maxsize=maxsize)
    mark = tmp_path / "mark"
    task = producer(q, str(mark))
    assert wait_until(lambda: q.qsize() == 1, timeout=60)  # counted: put() is sending it
    task.stop()
    assert isinstance(task.exception(timeout=60), TaskStopped)
    assert mark.read_text() == "put 1 returned"
    assert len(q.get(timeout=60)) == 300_000_000
    q.task_done()
    assert (q.qsize(), q.unfinished_tasks) == (0, 0)


CTRL_C_IN_GET = """
import os, signal, bgtask

class Interrupts:
    def __init__(self):
        self.state = "some"                  # unpickling calls __setstate__ only with a state

    def __setstate__(self, state):
        self.__dict__.update(state)
        os.kill(os.getpid(), signal.SIGINT)   # a Ctrl-C while get() holds this item

q = bgtask.Queue()
q.put(Interrupts()); q.put("second")
got = []
try:
    for item in q:
        got.append(type(item).__name__)
except KeyboardInterrupt:
    print("interrupted after", got, "left", q.qsize(), flush=True)
"""


def test_a_ctrl_c_during_get_comes_once_the_item_is_the_programs(tmp_path: Path) -> None:
    """A Ctrl-C while get() unpickles in the main program comes at the loop's next round."""
    result = run_script(tmp_path, CTRL_C_IN_GET)
    assert "interrupted after ['Interrupts'] left 1" in result.stdout, result.stderr


def _logs_from_a_signal_handler(seconds: float) -> int:
    signal.signal(signal.SIGUSR1, lambda *a: logging.getLogger("t").info("got SIGUSR1"))
    bgtask.ready()
    end = time.monotonic() + seconds
    n = 0
    while time.monotonic() < end:
        logging.getLogger("t").info("work %d", n)
        n += 1
    return n


def test_a_signal_handler_that_logs_during_a_send_does_not_deadlock(
    start_method: Optional[str], daemon: bool, caplog: pytest.LogCaptureFixture
) -> None:
    """A task's signal handler may log while its main thread sends a record: both arrive."""
    caplog.set_level(logging.INFO, logger="t")
    task = background(_logs_from_a_signal_handler, daemon=daemon, start_method=start_method)(1.5)
    task.wait_ready(timeout=20)
    pid = task.pid
    assert pid is not None
    sent = 0
    while not task.done() and sent < 40:
        try:
            os.kill(pid, signal.SIGUSR1)
        except ProcessLookupError:
            break
        sent += 1
        time.sleep(0.01)  # pacing the signals, not ordering: each may land anywhere
    n = task.result(timeout=30)
    messages: List[str] = [r.getMessage() for r in caplog.records if r.name == "t"]
    assert [m for m in messages if m.startswith("work")] == [f"work {i}" for i in range(n)]
    assert sum(m == "got SIGUSR1" for m in messages) >= 1


class _ExitOnReduce(Exception):
    def __reduce__(self) -> Any:
        raise SystemExit(3)


def _raises_exit_on_reduce() -> None:
    raise _ExitOnReduce("the message")


def test_an_exception_whose_reduce_exits_comes_back_as_a_stand_in(start_method: Optional[str]) -> None:
    """An exception whose ``__reduce__`` raises SystemExit is reported by name, not as a crash."""
    task = background(_raises_exit_on_reduce, start_method=start_method)()
    error = task.exception(timeout=20)
    assert isinstance(error, bgtask.TaskError), repr(error)
    assert "_ExitOnReduce" in str(error)
    assert "the message" in str(error)
    assert "_raises_exit_on_reduce" in str(error.__cause__)


CTRL_C_IN_RESULT = """
import os, signal, time, bgtask

class Slow:
    def __setstate__(self, state):
        self.__dict__.update(state)
        os.kill(os.getpid(), signal.SIGINT)   # a Ctrl-C while result() unpickles
        time.sleep(0.2)

@bgtask.background
def make():
    s = Slow(); s.x = 42
    return s

task = make()
task.join()
try:
    task.result()
except KeyboardInterrupt:
    print("interrupted", flush=True)
print("then", task.result().x, flush=True)
"""


def test_a_ctrl_c_during_result_unpickling_is_raised_and_the_value_kept(tmp_path: Path) -> None:
    """Ctrl-C while result() unpickles raises KeyboardInterrupt; the next result() has the value."""
    result = run_script(tmp_path, CTRL_C_IN_RESULT)
    assert result.stdout.split() == ["interrupted", "then", "42"], result.stderr


def _wait_in_get_with_a_slow_empty_read(q: Queue[Any], mark: str) -> str:
    """A consumer whose every read of the queue finds nothing, slowly: a stop lands in one."""
    from bgtask._queue import transport

    read = transport.Transport.receive

    def slow_read(self: Any, bounded: bool) -> Any:
        Path(mark).touch()
        time.sleep(0.3)
        return read(self, bounded)

    transport.Transport.receive = slow_read  # type: ignore[method-assign]
    try:
        q.get()
    finally:
        transport.Transport.receive = read  # type: ignore[method-assign]
    return "got an item"


def test_a_stop_during_a_get_that_finds_nothing_ends_the_get(
    start_method: Optional[str], daemon: bool, tmp_path: Path
) -> None:
    """A graceful task stopped while get() reads an empty queue: the stop ends the get at once,
    rather than waiting for an item."""
    consumer = background(
        _wait_in_get_with_a_slow_empty_read, daemon=daemon, graceful=True, grace=60, start_method=start_method
    )
    q: Queue[Any] = Queue()
    mark = tmp_path / "reading"
    task = consumer(q, str(mark))
    assert wait_until(mark.exists, timeout=60)
    started = time.monotonic()
    task.stop()
    assert isinstance(task.exception(timeout=30), TaskStopped)
    assert task.exitcode != -signal.SIGKILL  # not killed after its grace: the stop ended it
    assert time.monotonic() - started < 30
