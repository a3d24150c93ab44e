"""``Background.map`` and ``amap``: a task per item, a bounded window of calls, lazy input.

::

    input ──next()──> window of at most 2 x limit calls ──Limiter(limit)──> running tasks
                          │ ordered: results in input order (the oldest call first)
                          └ unordered: results as their tasks finish
    leaving the loop, an error, the timeout, the end of the program ──> the rest are stopped

The window is twice the limit so that the places stay busy while the oldest call, slower than
the others, holds back the results behind it. The tasks are ``scoped``: the end of the program
stops them (as a daemon's), rather than waiting for work nobody will read.
"""

from __future__ import annotations

import collections
import os
import queue
import time
from typing import TYPE_CHECKING, Any, AsyncIterator, Callable, Deque, Dict, Iterator, Optional, Set, Tuple

from ._limits import Limiter

if TYPE_CHECKING:
    from ._task import Task

# How a task is started: _decorator._start(fn, args, kwargs, options).
Start = Callable[[Callable[..., Any], Tuple[Any, ...], Dict[str, Any], Dict[str, Any]], "Task[Any]"]


def _prepare(
    options: Dict[str, Any], limit: Optional[int], timeout: Optional[float]
) -> Tuple[Dict[str, Any], int, Optional[float]]:
    if limit is None:
        limit = os.cpu_count() or 1
    if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
        raise ValueError(f"map(): limit must be an int of at least 1, not {limit!r}")
    if timeout is not None and timeout < 0:
        raise ValueError("map(): timeout must be a non-negative number")
    limiter = options["limit"] or Limiter(limit)  # the function's own places come first
    options = dict(options, limit=limiter, scoped=True)
    deadline = None if timeout is None else time.monotonic() + timeout
    return options, 2 * limit, deadline


def _left(deadline: Optional[float]) -> Optional[float]:
    return None if deadline is None else max(0.0, deadline - time.monotonic())


class _Window:
    """The calls made ahead of the results read: at most ``size``, the input read as they leave."""

    def __init__(self, calls: Iterator[Tuple[Any, ...]], size: int) -> None:
        self.calls = calls
        self.size = size
        self.inflight: Deque[Task[Any]] = collections.deque()
        self.exhausted = False

    def next_call(self) -> Optional[Tuple[Any, ...]]:
        """The arguments of the next call to make, or ``None``: the window is full, or the input
        is exhausted."""
        if self.exhausted or len(self.inflight) >= self.size:
            return None
        args = next(self.calls, None)
        self.exhausted = args is None
        return args

    def stop(self) -> None:
        """The loop ended early: stop the tasks still running (pending ones never start)."""
        for task in self.inflight:
            task._request_stop("abandoned")


def map_calls(
    start: Start,
    fn: Callable[..., Any],
    options: Dict[str, Any],
    calls: Iterator[Tuple[Any, ...]],
    *,
    limit: Optional[int],
    ordered: bool,
    timeout: Optional[float],
) -> Iterator[Any]:
    """The results of ``fn(*args)`` for each ``args`` of ``calls`` (see ``Background.map``).

    ``start(fn, args, kwargs, options)`` starts one task (``_decorator._start``).
    """
    options, size, deadline = _prepare(options, limit, timeout)

    def generate() -> Iterator[Any]:
        window = _Window(calls, size)
        inflight = window.inflight
        finished: queue.SimpleQueue[Task[Any]] = queue.SimpleQueue()

        def fill() -> None:
            while (args := window.next_call()) is not None:
                task = start(fn, args, {}, options)
                if not ordered:
                    task.add_done_callback(finished.put)
                inflight.append(task)

        try:
            fill()
            while inflight:
                if ordered:
                    task = inflight[0]
                    try:
                        task.exception(_left(deadline))  # its own error is raised below
                    except TimeoutError:
                        raise _timed_out(fn, timeout) from None
                    inflight.popleft()
                else:
                    try:
                        task = finished.get(timeout=_left(deadline))
                    except queue.Empty:
                        raise _timed_out(fn, timeout) from None
                    inflight.remove(task)
                fill()
                yield task.result(0)
        finally:
            window.stop()

    return generate()


async def start_off_loop(call: Callable[[], Task[Any]]) -> Task[Any]:
    """Run ``call`` (which starts a task) in a thread; cancelled meanwhile, stop what it started."""
    import asyncio

    future = asyncio.get_running_loop().run_in_executor(None, call)
    try:
        return await asyncio.shield(future)
    except asyncio.CancelledError:
        # The thread cannot be interrupted: the task it starts is stopped once it exists.
        future.add_done_callback(_stop_started)
        raise


def _stop_started(future: Any) -> None:
    if not future.cancelled() and future.exception() is None:
        future.result()._request_stop("cancel")


async def _astart(
    start: Start, fn: Callable[..., Any], args: Tuple[Any, ...], options: Dict[str, Any]
) -> Task[Any]:
    return await start_off_loop(lambda: start(fn, args, {}, options))


def amap_calls(
    start: Start,
    fn: Callable[..., Any],
    options: Dict[str, Any],
    calls: Iterator[Tuple[Any, ...]],
    *,
    limit: Optional[int],
    ordered: bool,
    timeout: Optional[float],
) -> AsyncIterator[Any]:
    """``map_calls`` for asyncio: tasks started off the event loop, results awaited."""
    import asyncio

    options, size, deadline = _prepare(options, limit, timeout)

    async def generate() -> AsyncIterator[Any]:
        window = _Window(calls, size)
        inflight = window.inflight

        async def fill() -> None:
            while (args := window.next_call()) is not None:
                inflight.append(await _astart(start, fn, args, options))

        try:
            await fill()
            while inflight:
                if ordered:
                    task = inflight[0]
                    waiting: Set[Any] = {asyncio.ensure_future(task._until(task.done))}
                else:
                    waiting = {asyncio.ensure_future(t._until(t.done)) for t in inflight}
                try:
                    done, waiting = await asyncio.wait(
                        waiting, timeout=_left(deadline), return_when=asyncio.FIRST_COMPLETED
                    )
                finally:
                    for future in waiting:
                        future.cancel()
                if not done:
                    raise _timed_out(fn, timeout)
                if ordered:
                    inflight.popleft()
                else:
                    task = next(t for t in inflight if t.done())
                    inflight.remove(task)
                await fill()
                yield task.result(0)
        finally:
            window.stop()

    return generate()


def _timed_out(fn: Callable[..., Any], timeout: Optional[float]) -> TimeoutError:
    name = getattr(fn, "__qualname__", None) or repr(fn)
    return TimeoutError(f"map() of {name!r} did not finish within {timeout} s")
