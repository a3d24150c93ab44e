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
import concurrent.futures
import os
import time
from typing import (
    TYPE_CHECKING,
    Any,
    AsyncIterator,
    Callable,
    Deque,
    Dict,
    Iterator,
    List,
    Optional,
    Set,
    Tuple,
)

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


class _Engine:
    """What a map does, whatever waits: which call to make next, which tasks' ends to wait for,
    which result comes next, and what is stopped when the loop ends. ``map`` and ``amap`` each
    drive it with their own way of starting a task and of waiting (a thread blocks; a coroutine
    awaits), in the same loop::

        while True:
            start every call next_call() gives (started() or failed_to_start() each)
            task = take(): its result is the next one, if any
            no task and nothing in flight: done (raise_error())
            wait until one of watched() is done, or the deadline

    The window holds the calls made ahead of the results read: at most ``size``, the input read
    as they leave. ``unfinished``: also at most this many calls not finished yet (a map's limit
    below the function's own). An error reading the input, or starting a call, is raised once
    the results of the items read before it are out, as the builtin ``map`` does.
    """

    def __init__(
        self, calls: Iterator[Tuple[Any, ...]], size: int, unfinished: Optional[int], ordered: bool
    ) -> None:
        self.calls = calls
        self.size = size
        self.unfinished = unfinished
        self.ordered = ordered
        self.inflight: Deque[Task[Any]] = collections.deque()
        self.exhausted = False
        self.error: Optional[BaseException] = None
        self.read = 0  # items read from the input
        # Wake on every task's end (not only the oldest's) where the loop makes the calls that
        # take the places freed: the limiter does not hold calls ahead for them then.
        self.wake_on_any = not ordered or unfinished is not None

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

    def started(self, task: Task[Any]) -> None:
        self.inflight.append(task)

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

    def take(self) -> Optional[Task[Any]]:
        """The task whose result comes next, out of the window, if it is done."""
        inflight = self.inflight
        if self.ordered:
            task = inflight[0] if inflight and inflight[0].done() else None
        else:
            task = next((t for t in inflight if t.done()), None)
        if task is not None:
            inflight.remove(task)
        return task

    def watched(self) -> List[Task[Any]]:
        """The tasks whose end the loop waits for: those not done (an end already seen would
        wake the loop at once, again and again). Empty if all ended since ``take()``."""
        tasks = list(self.inflight) if self.wake_on_any else [self.inflight[0]]
        return [t for t in tasks if not t.done()]

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
        engine = _Engine(calls, size, unfinished, ordered)
        try:
            while True:
                while (args := engine.next_call()) is not None:
                    try:
                        engine.started(start(fn, args, {}, options))
                    except Exception as exc:  # noqa: BLE001 (raised in its turn, see _Engine)
                        engine.failed_to_start(exc)
                task = engine.take()
                if task is not None:
                    yield task.result(0)
                elif not engine.inflight:
                    break
                elif not _wait(engine.watched(), _left(deadline)):
                    raise _timed_out(fn, timeout)
            engine.raise_error()
        finally:
            engine.stop()

    return generate()


def _wait(tasks: List[Task[Any]], timeout: Optional[float]) -> bool:
    """Block until one of ``tasks`` is done; whether one is within ``timeout``."""
    if not tasks:
        return True
    if len(tasks) == 1:  # a task's own wait: on Ray, it lends the CPU out meanwhile
        try:
            tasks[0].exception(timeout)
        except TimeoutError:
            return False
        except concurrent.futures.CancelledError:
            pass
        return True
    done, _ = concurrent.futures.wait(tasks, timeout, concurrent.futures.FIRST_COMPLETED)
    return bool(done)


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
    """``map_calls`` for asyncio: the same engine; tasks started off the event loop, ends awaited."""
    options, size, unfinished, deadline = _prepare(options, limit, timeout)

    async def generate() -> AsyncIterator[Any]:
        engine = _Engine(calls, size, unfinished, ordered)
        try:
            while True:
                while (args := engine.next_call()) is not None:
                    try:
                        engine.started(await _astart(start, fn, args, options))
                    except Exception as exc:  # noqa: BLE001 (raised in its turn, see _Engine)
                        engine.failed_to_start(exc)
                task = engine.take()
                if task is not None:
                    yield task.result(0)
                elif not engine.inflight:
                    break
                elif not await _await(engine.watched(), _left(deadline)):
                    raise _timed_out(fn, timeout, "amap")
            engine.raise_error()
        finally:
            engine.stop()

    return generate()


async def _await(tasks: List[Task[Any]], timeout: Optional[float]) -> bool:
    """Wait in the event loop until one of ``tasks`` is done; whether one is within ``timeout``."""
    import asyncio

    if not tasks:
        return True
    waiting: Set[Any] = {asyncio.ensure_future(t._until(t.done)) for t in tasks}
    try:
        done, waiting = await asyncio.wait(waiting, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for future in waiting:
            future.cancel()
    return bool(done)


def _timed_out(fn: Callable[..., Any], timeout: Optional[float], how: str = "map") -> TimeoutError:
    name = getattr(fn, "__qualname__", None) or repr(fn)
    return TimeoutError(f"{how}() of {name!r} did not finish within {timeout} s")
