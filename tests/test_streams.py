"""Generator tasks: values streamed as they are yielded, with backpressure, on every start method."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any, AsyncIterator, Dict, Generator, Iterator, List, Optional

import pytest

import bgtask
from bgtask import StreamTask, TaskStopped, background

from .helpers import run_script

RESULT_S = 120.0


def _read_into(task: StreamTask[Any, Any], items: List[object], stop_at: Optional[int] = None) -> None:
    """Read a stream to its end into ``items``; ``stop()`` the task after item ``stop_at``."""
    for item in task:
        items.append(item)
        if item == stop_at:
            task.stop()


def test_items_in_order_then_the_return_value(start_method: Optional[str], kind: Dict[str, bool]) -> None:
    """``for item in task`` yields each value in order; ``result()`` is what the generator returned."""

    @background(start_method=start_method, **kind)
    def count(n: int) -> Generator[int, None, str]:
        yield from range(n)
        return f"counted {n}"

    task = count(1000)
    assert isinstance(task, StreamTask)
    assert list(task) == list(range(1000))
    assert task.result(RESULT_S) == "counted 1000"
    assert list(task) == []  # read once: a second loop finds nothing left


def test_an_error_comes_after_the_items_before_it(start_method: Optional[str], daemon: bool) -> None:
    """The items yielded before the exception arrive first; then the iteration raises it."""

    @background(start_method=start_method, daemon=daemon)
    def fail_after(n: int) -> Iterator[int]:
        yield from range(n)
        raise ValueError("no more")

    got: List[object] = []
    with pytest.raises(ValueError, match="no more"):
        _read_into(fail_after(3), got)
    assert got == [0, 1, 2]


def test_a_stream_stopped_midway_ends_with_task_stopped(
    start_method: Optional[str], kind: Dict[str, bool]
) -> None:
    """stop() while iterating: the items so far, then TaskStopped out of the loop."""

    @background(start_method=start_method, **kind)
    def forever() -> Iterator[int]:
        i = 0
        while True:
            yield i
            i += 1

    task = forever()
    seen: List[object] = []
    with pytest.raises(TaskStopped):
        _read_into(task, seen, stop_at=50)
    assert seen[:51] == list(range(51))
    assert seen == list(range(len(seen)))


def test_async_iteration(start_method: Optional[str]) -> None:
    """``async for`` over the task of an async generator function."""

    @background(start_method=start_method)
    async def ticks(n: int) -> AsyncIterator[str]:
        for i in range(n):
            await asyncio.sleep(0)
            yield f"tick {i}"

    async def main() -> List[str]:
        return [tick async for tick in ticks(5)]

    assert asyncio.run(main()) == [f"tick {i}" for i in range(5)]


def test_an_async_generator_runs_in_one_task_from_start_to_end(start_method: Optional[str]) -> None:
    """Context variables and the current task span the ``yield``s, as under ``asyncio.run``."""

    @background(start_method=start_method)
    async def agen() -> AsyncIterator[Any]:
        import contextvars

        var = contextvars.ContextVar("var", default="unset")
        var.set("kept")
        first = asyncio.current_task()
        yield "first"
        yield var.get(), asyncio.current_task() is first

    assert list(agen()) == ["first", ("kept", True)]


def test_async_iteration_of_a_plain_generator_task() -> None:
    """A sync generator's task is read with ``async for`` too, without blocking the loop."""

    @background
    def letters() -> Iterator[str]:
        yield from "abc"

    async def main() -> List[str]:
        return [letter async for letter in letters()]

    assert asyncio.run(main()) == ["a", "b", "c"]


def test_result_without_reading_does_not_wait_forever() -> None:
    """A program that waits for the end without reading: the task runs on; items stay readable."""

    @background
    def chunks() -> Generator[bytes, None, int]:
        for _ in range(40):
            yield b"x" * (1 << 20)  # 40 MiB: far past what is read ahead
        return 40

    task = chunks()
    assert task.result(RESULT_S) == 40
    assert sum(len(chunk) for chunk in task) == 40 << 20


def test_an_item_that_cannot_be_pickled_is_named() -> None:
    """The task fails at that item, saying which one; the items before it arrive."""

    @background
    def bad() -> Iterator[object]:
        yield 1
        yield lambda: None  # cloudpickle takes it
        yield threading_lock()

    got: List[object] = []
    with pytest.raises(TypeError, match=r"item 2 the task yielded \(a _thread\.lock\) cannot be pickled"):
        _read_into(bad(), got)
    assert len(got) == 2


def threading_lock() -> object:
    import threading

    return threading.Lock()


@pytest.mark.parametrize("method", [None, "spawn"], ids=["zygote", "spawn"])
def test_a_slow_reader_holds_the_producer_back(tmp_path: Path, method: Optional[str]) -> None:
    """1 GiB yielded in 1 MiB pieces to a slow reader: the main program grows by less than 64 MiB."""
    result = run_script(
        tmp_path,
        f"""
import time
import bgtask

def rss_mib():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096 / 2**20

@bgtask.background(start_method={method!r})
def produce():
    piece = b"x" * (1 << 20)
    for _ in range(1024):
        yield piece

if __name__ == "__main__":
    before = rss_mib()
    peak = before
    total = 0
    for i, piece in enumerate(produce()):
        total += len(piece)
        if i % 16 == 0:
            time.sleep(0.005)  # a slow reader
            peak = max(peak, rss_mib())
    print("TOTAL", total)
    print("GROWTH", peak - before)
""",
        timeout=RESULT_S,
    )
    assert result.returncode == 0, result.stderr
    lines = dict(line.split(" ", 1) for line in result.stdout.splitlines() if " " in line)
    assert int(lines["TOTAL"]) == 1 << 30
    assert float(lines["GROWTH"]) < 64, result.stdout


def test_a_plain_task_is_not_iterable() -> None:
    """Only generator functions stream: a plain task is a Task, not a StreamTask."""

    @background
    def plain() -> int:
        return 1

    task = plain()
    assert type(task) is bgtask.Task
    with pytest.raises(TypeError):
        iter(task)  # type: ignore[call-overload]
    assert task.result(RESULT_S) == 1


def test_leaving_the_loop_stops_the_task(start_method: Optional[str], tmp_path: Path) -> None:
    """``break`` out of the loop: the task is stopped (its generator's ``finally`` runs)."""
    marker = tmp_path / "closed"

    @background(start_method=start_method, graceful=True)
    def forever() -> Iterator[int]:
        try:
            i = 0
            while True:
                yield i
                i += 1
        finally:
            marker.write_text("closed")

    task = forever()
    for item in task:
        if item == 10:
            break
    with pytest.raises(TaskStopped, match="when the loop over its items was left"):
        task.result(RESULT_S)
    assert marker.read_text() == "closed"


def test_a_cancelled_async_loop_stops_the_task() -> None:
    """Cancelling the coroutine in an ``async for`` stops the task, as cancelling ``await`` does."""

    @background
    def slow() -> Iterator[int]:
        import time

        while True:
            yield 1
            time.sleep(0.05)

    async def main() -> bgtask.StreamTask[int, None]:
        task = slow()

        async def read() -> None:
            async for _ in task:
                pass

        reader = asyncio.ensure_future(read())
        await asyncio.sleep(0.3)
        reader.cancel()
        with pytest.raises(asyncio.CancelledError):
            await reader
        return task

    task = asyncio.run(main())
    with pytest.raises(TaskStopped):
        task.result(RESULT_S)


def test_waiting_without_a_loop_never_blocks_the_task() -> None:
    """``await``, ``concurrent.futures.wait`` and ``result()``: no loop reads, the task runs on."""
    import concurrent.futures

    @background
    def chunks() -> Generator[bytes, None, str]:
        for _ in range(30):
            yield b"x" * (1 << 20)
        return "all sent"

    async def awaited() -> str:
        return await chunks()

    assert asyncio.run(awaited()) == "all sent"
    task = chunks()
    done, _ = concurrent.futures.wait([task], timeout=RESULT_S)
    assert done == {task}
    assert sum(len(c) for c in task) == 30 << 20


def test_a_stop_while_the_task_waits_to_send_runs_its_finally(tmp_path: Path) -> None:
    """Stopped while held back by a slow reader: the generator is closed, its ``finally`` runs."""
    marker = tmp_path / "cleaned"

    @background(graceful=True)
    def produce() -> Iterator[bytes]:
        try:
            while True:
                yield b"x" * (1 << 20)
        finally:
            marker.write_text("cleaned")

    task = produce()
    iterator = iter(task)
    next(iterator)  # a loop in progress: the task is held back once 8 MiB wait unread
    task.stop()
    assert marker.read_text() == "cleaned"
    with pytest.raises(TaskStopped):
        list(iterator)


def test_an_unpicklable_item_still_runs_the_generators_finally(tmp_path: Path) -> None:
    """The item that cannot be pickled ends the task; the generator is closed first."""
    marker = tmp_path / "cleaned"

    @background
    def bad() -> Iterator[object]:
        try:
            yield threading_lock()
        finally:
            marker.write_text("cleaned")

    with pytest.raises(TypeError, match="cannot be pickled"):
        list(bad())
    assert marker.read_text() == "cleaned"


def test_a_wrapped_generator_function_that_returns_a_plain_iterator() -> None:
    """functools.wraps around a generator function: whatever it returns is streamed."""
    import functools

    def numbers(n: int) -> Iterator[int]:
        yield from range(n)

    @functools.wraps(numbers)
    def listed(n: int) -> Iterator[int]:
        return iter(list(numbers(n)))

    task = background(listed)(4)
    assert list(task) == [0, 1, 2, 3]
    assert task.result(RESULT_S) is None


def test_leaving_the_loop_of_a_finished_task_lets_it_exit(tmp_path: Path) -> None:
    """Its outcome is known: leaving the loop early does not stop it; its atexit handlers run."""
    marker = tmp_path / "atexit"

    @background
    def three() -> Iterator[int]:
        import atexit

        atexit.register(marker.write_text, "ran")
        yield from range(3)

    task = three()
    items = iter(task)
    next(items)
    assert task.exception(RESULT_S) is None  # finished
    items.close()  # type: ignore[attr-defined]
    task.join(RESULT_S)
    assert task.exitcode == 0
    assert marker.read_text() == "ran"


def test_a_wait_that_timed_out_leaves_the_stream_held_back() -> None:
    """result(timeout) lifts the backpressure only while it waits."""

    @background
    def endless() -> Iterator[bytes]:
        while True:
            yield b"x" * 1024

    task = endless()
    items = iter(task)
    next(items)
    with pytest.raises(TimeoutError):
        task.result(0.05)
    assert task._end_waiters == 0
    items.close()  # type: ignore[attr-defined]
    with pytest.raises(TaskStopped):
        task.result(RESULT_S)
