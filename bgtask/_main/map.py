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

from .limits import Limiter

if TYPE_CHECKING:
    from .task import Task

# How a task is started: call.start_call(fn, args, kwargs, options).
Start = Callable[[Callable[..., Any], Tuple[Any, ...], Dict[str, Any], Dict[str, Any]], "Task[Any]"]


def _prepare(
    options: Dict[str, Any], limit: Optional[int], timeout: Optional[float]
) -> Tuple[Dict[str, Any], int, Optional[int], Optional[float]]:
    """(options for the tasks, the window's size, at most how many may be unfinished at once
    when the limiter alone does not ensure it, the deadline)."""
    own: Optional[Limiter] = options["limit"]
    if limit is None:
        limit = own._limit if own is not None else _cpus(options)
    if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
        raise ValueError(f"map(): limit must be an int of at least 1, not {limit!r}")
    if timeout is not None and timeout < 0:
        raise ValueError("map(): timeout must be a non-negative number")
    # The function's own places come first; a smaller limit of the map's holds within them.
    unfinished = limit if own is not None and limit < own._limit else None
    # Map tasks are not waited for at the end of the program, nor kept if it dies: daemons.
    options = dict(options, limit=own or Limiter(limit), scoped=True, daemon=True)
    deadline = None if timeout is None else time.monotonic() + timeout
    return options, 2 * limit, unfinished, deadline


def _cpus(options: Dict[str, Any]) -> int:
    """The CPUs the map's tasks run on: this machine's, or the Ray cluster's."""
    from .._backends import ray as _ray

    if _ray.wants_ray(options):
        return _ray.launcher().cluster_cpus() or os.cpu_count() or 1
    return os.cpu_count() or 1


def _left(deadline: Optional[float]) -> Optional[float]:
    return None if deadline is None else max(0.0, deadline - time.monotonic())


class _Window:
    """The calls made ahead of the results read: at most ``size``, the input read as they leave.

    ``unfinished``: also at most this many calls not finished yet (a map's limit below the
    function's own). An error reading the input is raised once the results of the items read
    before it are out, as the builtin ``map`` does.
    """

    def __init__(self, calls: Iterator[Tuple[Any, ...]], size: int, unfinished: Optional[int] = None) -> None:
        self.calls = calls
        self.size = size
        self.unfinished = unfinished
        self.inflight: Deque[Task[Any]] = collections.deque()
        self.exhausted = False
        self.error: Optional[BaseException] = None
        self.read = 0  # items read from the input

    def next_call(self) -> Optional[Tuple[Any, ...]]:
        """The arguments of the next call to make, or ``None``: the window is full, or the input
        is exhausted."""
        if self.exhausted or len(self.inflight) >= self.size:
            return None
        if self.unfinished is not None and sum(not t.done() for t in self.inflight) >= self.unfinished:
            return None
        try:
            args = next(self.calls, None)
        except Exception as exc:  # noqa: BLE001 (the input's own error, raised in its turn)
            self.error = exc
            args = None
        self.exhausted = args is None
        if args is not None:
            self.read += 1
        return args

    def failed_to_start(self, exc: Exception) -> None:
        """The last call read could not start (its item cannot be pickled, say): like an error
        of the input, raised once the results before it are out, naming the item."""
        from .._shared.errors import SerializationError

        error: Exception = exc
        if isinstance(exc, SerializationError):
            error = SerializationError(f"map(): item {self.read - 1}: {exc}")
            error.__cause__ = exc
        self.error = error
        self.exhausted = True

    def raise_error(self) -> None:
        """Every call made has been read: the input's error now, if it had one."""
        error, self.error = self.error, None
        if error is not None:
            raise error

    def stop(self) -> None:
        """The loop ended early: stop the tasks still running (pending ones never start)."""
        for task in self.inflight:
            task._retrieved = True  # the map reported its first error: the rest are its own
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

    ``start(fn, args, kwargs, options)`` starts one task (``call.start_call``).
    """
    options, size, unfinished, deadline = _prepare(options, limit, timeout)

    def generate() -> Iterator[Any]:
        window = _Window(calls, size, unfinished)
        inflight = window.inflight
        finished: queue.SimpleQueue[Task[Any]] = queue.SimpleQueue()
        # Wake on every task's end (not only the oldest's) where this loop makes the calls that
        # take the places freed: the limiter does not hold calls ahead for them then.
        wake_on_any = not ordered or unfinished is not None

        def fill() -> None:
            while (args := window.next_call()) is not None:
                try:
                    task = start(fn, args, {}, options)
                except Exception as exc:  # noqa: BLE001 (raised in its turn, see _Window)
                    window.failed_to_start(exc)
                    return
                if wake_on_any:
                    task.add_done_callback(finished.put)
                inflight.append(task)

        try:
            fill()
            while inflight:
                if ordered:
                    task = inflight[0]
                    while wake_on_any and not task.done():
                        try:
                            finished.get(timeout=_left(deadline))
                        except queue.Empty:
                            raise _timed_out(fn, timeout) from None
                        fill()
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
            window.raise_error()
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

    options, size, unfinished, deadline = _prepare(options, limit, timeout)

    async def generate() -> AsyncIterator[Any]:
        window = _Window(calls, size, unfinished)
        inflight = window.inflight
        wake_on_any = not ordered or unfinished is not None  # as in map_calls

        async def fill() -> None:
            while (args := window.next_call()) is not None:
                try:
                    task = await _astart(start, fn, args, options)
                except Exception as exc:  # noqa: BLE001 (raised in its turn, see _Window)
                    window.failed_to_start(exc)
                    return
                inflight.append(task)

        try:
            await fill()
            while inflight:
                watched = list(inflight) if wake_on_any else [inflight[0]]
                waiting: Set[Any] = {asyncio.ensure_future(t._until(t.done)) for t in watched}
                try:
                    done, waiting = await asyncio.wait(
                        waiting, timeout=_left(deadline), return_when=asyncio.FIRST_COMPLETED
                    )
                finally:
                    for future in waiting:
                        future.cancel()
                if not done:
                    raise _timed_out(fn, timeout, "amap")
                if ordered:
                    if not inflight[0].done():
                        await fill()  # a later one ended: its place goes to the next call
                        continue
                    task = inflight.popleft()
                else:
                    task = next(t for t in inflight if t.done())
                    inflight.remove(task)
                await fill()
                yield task.result(0)
            window.raise_error()
        finally:
            window.stop()

    return generate()


def _timed_out(fn: Callable[..., Any], timeout: Optional[float], how: str = "map") -> TimeoutError:
    name = getattr(fn, "__qualname__", None) or repr(fn)
    return TimeoutError(f"{how}() of {name!r} did not finish within {timeout} s")
