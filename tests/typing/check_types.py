"""Static checks of bgtask's types: run `mypy tests/typing` (it is not a pytest module)."""

from __future__ import annotations

import asyncio
import concurrent.futures
from typing import Any, AsyncIterator, Callable, Generator, Iterator, List, Optional

from typing_extensions import assert_type

import bgtask
from bgtask import Background, StopEvent, StreamTask, Task, background, stop_event


@background
def add(a: int, b: int = 1) -> int:
    return a + b


@background(daemon=True, graceful=True, grace=2.0, name="logger", timeout=None)
def log(path: str) -> None:
    event = stop_event()
    assert_type(event, StopEvent)
    assert_type(event.wait(1.0), bool)


def check() -> None:
    as_callable: Callable[[int], Task[int]] = add
    assert isinstance(as_callable, Background)
    task = add(1, b=2)
    assert_type(task, Task[int])
    assert_type(task.result(), int)
    assert_type(task.result(timeout=1.0), int)
    assert_type(task.exception(), Optional[BaseException])
    assert_type(task.pid, Optional[int])
    assert_type(task.exitcode, Optional[int])
    assert_type(task.is_daemon, bool)
    assert_type(task.done(), bool)
    assert_type(task.future, concurrent.futures.Future[int])
    assert_type(log("app.log"), Task[None])
    assert_type(add.is_daemon, bool)
    add.join(timeout=1.0)
    add("one")  # type: ignore[arg-type]
    add(1, 2, 3)  # type: ignore[call-arg]


async def check_async() -> None:
    value = await add(1)
    assert_type(value, int)
    await asyncio.sleep(0)


def check_services() -> None:
    with add(1) as task:
        assert_type(task, Task[int])
        assert_type(task.wait_ready(1.0), Any)
        assert_type(task.age, float)
    assert_type(bgtask.active(), List[Task[Any]])
    bgtask.shutdown(wait=False, timeout=1.0)


async def check_async_services() -> None:
    async with add(1) as task:
        assert_type(task, Task[int])
        assert_type(await task.wait_ready_async(1.0), Any)


@background
def numbers(n: int) -> Iterator[int]:
    yield from range(n)


@background
def progress(n: int) -> Generator[float, None, str]:
    for i in range(n):
        yield i / n
    return "done"


@background
async def events(n: int) -> AsyncIterator[str]:
    for i in range(n):
        yield str(i)


def check_streams() -> None:
    task = numbers(3)
    assert_type(task, StreamTask[int, None])
    for item in task:
        assert_type(item, int)
    bar = progress(10)
    assert_type(bar, StreamTask[float, str])
    assert_type(bar.result(), str)
    assert_type(next(iter(bar)), float)
    assert_type(add(1), Task[int])
    numbers("3")  # type: ignore[call-overload]


async def check_async_streams() -> None:
    async for event in events(2):
        assert_type(event, str)


def check_queue() -> None:
    q: bgtask.Queue[int] = bgtask.Queue(maxsize=10)
    on_ray: bgtask.Queue[bytes] = bgtask.Queue(backend="ray")
    on_ray.put(b"x")
    bgtask.Queue(10, "ray")  # type: ignore[call-arg]
    q.put(1)
    assert_type(q.get(), int)
    assert_type(q.get_nowait(), int)
    assert_type(q.qsize(), int)
    for item in q:
        assert_type(item, int)
    q.shutdown(immediate=True)
    q.put("x")  # type: ignore[arg-type]
    try:
        q.get(timeout=1.0)
    except bgtask.ShutDown:
        pass


@background(limit=bgtask.Limiter(2))
def double(x: int) -> int:
    return 2 * x


def check_many() -> None:
    for result in double.map([1, 2, 3], limit=2, ordered=False, timeout=5.0):
        assert_type(result, int)
    limiter = bgtask.Limiter(3)
    assert_type(limiter.pending, int)


async def check_many_async() -> None:
    async for result in double.amap(range(3)):
        assert_type(result, int)
    task = await double.astart(1)
    assert_type(task, Task[int])
    await double.astart("x")  # type: ignore[arg-type]


def _setup(level: int) -> None: ...


@bgtask.background(daemon=True, graceful="event", initializer=_setup, initargs=(20,))
def watcher(path: str) -> bool:
    return bgtask.stop_event().wait()


def check_setup() -> None:
    assert_type(watcher("x"), Task[bool])
    bgtask.set_initializer(_setup, (10,))
    bgtask.set_initializer(None)
    bgtask.background(graceful="yes")  # type: ignore[call-overload]
