"""``Task``: the handle of one task process, a future and a process at once.

A ``Task`` is a ``concurrent.futures.Future``: ``concurrent.futures.wait``, ``as_completed`` and
``asyncio.wrap_future`` take it as it is. Its states, and the only transitions::

    RUNNING ──outcome known──────────> FINISHED      (returned, raised, stopped, crashed, failed)
       └─────cancel()────────────────> CANCELLED     (the process is stopped)

Both ends are final: ``done()`` never goes back to ``False``. A stop request (``stop()``,
``kill()``, a timeout, the program's exit) changes no state; it decides the outcome only if the
process then ends without reporting one. Separately, the process *exits* (``is_alive()`` turns
false, ``exitcode`` is set) once it has been reaped and its channel drained. A returned value, a
raised exception or a pickling failure is known as soon as the task sends it, a moment before the
process exits: ``result()`` returns then, ``join()`` waits for the exit. The outcome is exactly
one of:

    returned   the function returned a value (even after a stop request: the value counts)
    raised     the function raised; result() re-raises it with the task's traceback as cause
    stopped    a stop request ended it first                     -> TaskStopped
    crashed    the process ended without reporting an outcome    -> TaskCrashed
    failed     bgtask could not unpickle the call in the task, or pickle the result there
    cancelled  cancel() came first                                -> CancelledError

Everything about the process comes from its ``TaskProcess`` (``_monitor.process``), in the monitor
thread, through the transitions of ``TaskCore`` (``_main.state``), the class this one adds the
public methods to. Done-callbacks run there, or in the thread that calls ``cancel()``, or at once in the
caller when the task is already done. The result is unpickled in the thread that asks for it,
outside any lock, once.
"""

from __future__ import annotations

import collections
import concurrent.futures
import time
from concurrent.futures._base import CANCELLED_AND_NOTIFIED, FINISHED
from typing import (
    Any,
    AsyncIterator,
    Callable,
    Generator,
    Generic,
    Iterator,
    NoReturn,
    Optional,
    TypeVar,
    final,
)

from .._monitor import loop as _monitor
from .._shared.errors import BgTaskError, SerializationError
from .limits import Limiter
from .state import TaskCore, _decode_ready, _run_callback
from .stream import NO_ITEM as _NO_ITEM
from .waits import NOT_READY as _NOT_READY
from .waits import UNFINISHED

R = TypeVar("R")
Y = TypeVar("Y")


class Task(TaskCore[R]):
    """The handle of a task: a process running a function, and that function's future result.

    Returned by calling a function decorated with ``@background``; never created directly. It
    works like a ``multiprocessing.Process`` (``pid``, ``exitcode``, ``is_alive()``, ``join()``,
    ``kill()``), is a ``concurrent.futures.Future`` (``result()``, ``exception()``, ``done()``,
    ``cancel()``, ``add_done_callback()``; ``wait`` and ``as_completed`` take it) and is
    awaitable (``await task``; cancelling the awaiting coroutine cancels the task). A task that
    calls ``bgtask.ready(value)`` hands ``value`` to ``wait_ready()``. ``with fn(...) as task:``
    (or ``async with``) stops the task when the block is left.

    A handle belongs to the process that started the task: it cannot be pickled, and in a forked
    copy of that process every method raises ``BgTaskError``.
    """

    __module__ = "bgtask"

    # -- process facets ---------------------------------------------------------------------

    @property
    def name(self) -> str:
        """The task's name: the decorator's ``name``, or the function's qualified name."""
        return self._name

    @property
    def is_daemon(self) -> bool:
        """Whether the task is a daemon: stopped, not waited for, when the program ends."""
        return self._daemon

    @property
    def pid(self) -> Optional[int]:
        """The task process's id; ``None`` while the task waits for a place in its ``Limiter``."""
        return self._pid

    @property
    def exitcode(self) -> Optional[int]:
        """``None`` while the process runs; then its exit code, ``-N`` if killed by signal N.

        Also ``None`` after the end in one case: bgtask's zygote died before it could report the
        exit (``is_alive()`` tells the two apart).
        """
        return self._exitcode

    @property
    def age(self) -> float:
        """Seconds since the task was started, until its process ended."""
        return (self._ended_at or time.monotonic()) - self._started

    def is_alive(self) -> bool:
        """Return whether the task's process is running (``False`` while the task is pending)."""
        self._check_owner()
        return self._process is not None and not self._exited

    def join(self, timeout: Optional[float] = None) -> None:
        """Wait until the task's process has ended, or ``timeout`` seconds have passed.

        Never raises for the task's outcome, as ``multiprocessing.Process.join``; check
        ``done()`` or ``exitcode`` afterwards when a timeout was given.
        """
        self._check_owner()
        self._wait_exit(timeout)

    def stop(self, timeout: Optional[float] = None) -> None:
        """Stop the task and return once its process is gone.

        A graceful task is asked to stop (its stop event is set, or the stop exception is raised
        inside it so that its ``finally`` blocks run) and its process group is killed if it is
        still there ``grace`` seconds later. Any other task's process group is killed at once.
        A task whose outcome is known gets no signal: its process, already on its way out, gets
        ``grace`` seconds to finish its cleanup (``atexit``), then its group is killed.

        Raises:
            TimeoutError: the process was not gone within ``timeout`` seconds.
        """
        self._check_owner()
        self._request_stop("stop")
        if not self._wait_exit(timeout):
            raise TimeoutError(f"task {self._name!r} (pid {self._pid}) was not gone within {timeout} s")

    def kill(self) -> None:
        """Kill the task's process group with SIGKILL now; returns without waiting."""
        self._check_owner()
        self._request_stop("kill", hard=True)

    def __enter__(self) -> Task[R]:
        """``with fn(...) as task:`` stops the task when the block is left (see ``__exit__``)."""
        self._check_owner()
        return self

    def __exit__(self, *exc_info: object) -> None:
        """Stop the task, as ``stop()`` does, and wait until its process is gone.

        Whether the block ended normally or by an exception, which is never hidden. The task's
        own outcome is not raised here: ask ``result()`` for it.
        """
        self.stop()

    async def __aenter__(self) -> Task[R]:
        """``async with fn(...) as task:``, the same as ``with``, without blocking the loop."""
        self._check_owner()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        """Stop the task and wait, without blocking the event loop, until its process is gone.

        Cancelled meanwhile, it still waits (at most the task's ``grace``: its group is killed
        then), and the cancellation is raised once the process is gone.
        """
        import asyncio

        self._check_owner()
        self._request_stop("stop")
        cancelled: Optional[BaseException] = None
        while True:
            try:
                await self._until(lambda: self._exited)
                break
            except asyncio.CancelledError as exc:
                cancelled = exc
        if cancelled is not None:
            raise cancelled

    # -- readiness --------------------------------------------------------------------------

    def wait_ready(self, timeout: Optional[float] = None) -> Any:
        """Wait until the task calls ``bgtask.ready(value)``, and return ``value``.

        A server task reports the port it bound this way, for example. A task that never calls
        ``ready()`` is never ready: this waits until ``timeout``, or until the task ends.

        Raises:
            TimeoutError: the task was not ready within ``timeout`` seconds.
            concurrent.futures.CancelledError: the task was cancelled before it was ready.
            BgTaskError: the task returned without calling ``ready()``.
            Exception: what ``result()`` raises when the task ended before it was ready: its
                own exception, ``TaskCrashed``, ``TaskStopped``...
        """
        self._check_owner()
        self._want_ready()
        with self._condition:
            if self._ready is _NOT_READY and self._state in UNFINISHED:
                self._check_not_monitor()
                if not self._condition.wait_for(self._ready_or_done, timeout):
                    raise TimeoutError(f"task {self._name!r} was not ready within {timeout} s")
            body = self._ready
        if body is _NOT_READY:  # it ended first
            error = self._wait_decoded(None)[1]
            if error is not None:
                raise error
            raise BgTaskError(f"task {self._name!r} returned without calling bgtask.ready()")
        if self._ready_value is _NOT_READY:
            self._ready_value = _decode_ready(body, self._name)  # racing threads get equal values
        return self._ready_value

    async def wait_ready_async(self, timeout: Optional[float] = None) -> Any:
        """``wait_ready()`` for asyncio: waits without blocking the event loop.

        Cancelling the waiting coroutine only stops the wait, not the task.
        """
        import asyncio

        self._check_owner()
        self._want_ready()
        if not self._ready_or_done():
            try:
                await asyncio.wait_for(self._until(self._ready_or_done), timeout)
            except asyncio.TimeoutError:
                raise TimeoutError(f"task {self._name!r} was not ready within {timeout} s") from None
        if self.cancelled():  # as ``await task`` does
            raise asyncio.CancelledError(f"task {self._name!r} was cancelled")
        return self.wait_ready(0)

    # -- future facets ----------------------------------------------------------------------

    def cancel(self) -> bool:
        """Cancel the task: it is stopped, and ``result()`` raises ``CancelledError``.

        Returns ``False`` when its outcome is already known (as ``Future.cancel`` does for a
        finished call), ``True`` otherwise. It does not wait for the process to end; ``join()``
        does. A graceful task gets its ``grace`` as with ``stop()``.
        """
        self._check_owner()

        def cancel() -> bool:  # in the monitor thread, the one writer of outcomes
            with self._condition:
                if self._state == FINISHED:
                    return False
                if self._state == CANCELLED_AND_NOTIFIED:
                    return True
                self._stop_reason = self._stop_reason or "cancel"
                self._finish_locked("cancelled", None)
                self._condition.notify_all()
            self._invoke_callbacks()
            return True

        cancelled: bool = _monitor.get().call_and_wait(cancel)
        if cancelled:
            self._request_stop("cancel")
        return cancelled

    def running(self) -> bool:
        """Return whether the task runs: from the call until its outcome is known."""
        return bool(super().running())

    def result(self, timeout: Optional[float] = None) -> R:
        """Return the function's return value, waiting up to ``timeout`` seconds for it.

        Raises:
            TimeoutError: the task did not finish within ``timeout`` seconds.
            concurrent.futures.CancelledError: ``cancel()`` was called first.
            TaskStopped: the task was stopped before it finished.
            TaskCrashed: the process ended without reporting an outcome.
            SerializationError: the return value could not be pickled or unpickled.
            BgTaskError: the task process could not unpickle the function or its arguments.
            Exception: whatever the function raised, with the task's traceback as its cause.
        """
        value, error = self._wait_decoded(timeout)
        if error is not None:
            raise error
        return value  # type: ignore[no-any-return]

    def exception(self, timeout: Optional[float] = None) -> Optional[BaseException]:
        """Return the exception ``result()`` would raise, or ``None`` if it would return.

        Raises:
            TimeoutError: the task did not finish within ``timeout`` seconds.
            concurrent.futures.CancelledError: ``cancel()`` was called first.
        """
        return self._wait_decoded(timeout)[1]

    def add_done_callback(self, fn: Callable[[Task[R]], object]) -> None:
        """Call ``fn(task)`` when the task is done.

        It is called in bgtask's monitor thread, or in the thread that calls ``cancel()``, or at
        once in this thread if the task is already done. Whatever it raises (``SystemExit``
        included) is logged to the ``bgtask`` logger and ignored. In the monitor thread it must
        not wait for a task: that raises ``BgTaskError``.
        """
        self._check_owner()
        self._retrieved = True  # the callback sees the outcome
        with self._condition:
            if self._state not in (FINISHED, CANCELLED_AND_NOTIFIED):
                self._done_callbacks.append(fn)
                return
        _run_callback(fn, self)

    def set_running_or_notify_cancel(self) -> NoReturn:
        """Not for tasks: a task's state comes from its process."""
        raise BgTaskError("a Task's state is set by its process, not by set_running_or_notify_cancel()")

    def set_result(self, result: object) -> NoReturn:
        """Not for tasks: a task's result comes from its process."""
        raise BgTaskError("a Task's result is set by its process, not by set_result()")

    def set_exception(self, exception: Optional[BaseException]) -> NoReturn:
        """Not for tasks: a task's exception comes from its process."""
        raise BgTaskError("a Task's exception is set by its process, not by set_exception()")

    @property
    def future(self) -> concurrent.futures.Future[R]:
        """The task itself, which is a ``concurrent.futures.Future`` (kept for older code)."""
        return self

    def __await__(self) -> Generator[Any, None, R]:
        return self._await().__await__()

    async def _await(self) -> R:
        import asyncio

        self._check_owner()
        try:
            with self._unthrottled():
                await self._until(lambda: self._state not in UNFINISHED)
        except asyncio.CancelledError:
            self.cancel()
            raise
        if self.cancelled():
            raise asyncio.CancelledError(f"task {self._name!r} was cancelled")
        return self.result(0)

    # -- misc -------------------------------------------------------------------------------

    def __repr__(self) -> str:
        pid = f" pid={self._pid}" if self._pid is not None else ""
        daemon = " daemon" if self._daemon else ""
        return f"<bgtask.Task {self._name!r}{pid}{daemon} {self._describe_state()}>"

    def __reduce__(self) -> Any:
        raise BgTaskError(
            f"a Task handle cannot be sent to another process: it belongs to pid {self._owner}, "
            "which started the task"
        )


@final
class StreamTask(Task[R], Generic[Y, R]):
    """The task of a generator function: a ``Task`` whose values arrive as they are yielded.

    ``for item in task`` (or ``async for``) yields them in order, then ends as ``result()``
    does: it returns when the generator returned, and raises what ``result()`` raises otherwise
    (the task's own exception after the items it yielded first, ``TaskStopped``...).
    ``result()`` is the generator's return value. Items are read by one consumer: two loops
    over one task share its items.

    A loop that is left before the end (``break``, an exception, a cancelled ``async for``)
    stops the task, as leaving a loop over a generator closes it. While a loop reads more
    slowly than the task yields, the task waits (about 8 MiB unread at most). Without a loop
    in progress, or while the program waits for the end (``result()``, ``join()``, ``await``),
    the task runs on and its items are kept for a later loop.
    """

    __module__ = "bgtask"

    def __init__(
        self, name: str, *, daemon: bool, graceful: bool, grace: float, limiter: Optional[Limiter] = None
    ) -> None:
        super().__init__(name, daemon=daemon, graceful=graceful, grace=grace, limiter=limiter)
        self._items = collections.deque()

    def __iter__(self) -> Iterator[Y]:
        self._check_owner()
        self._reading(1)
        finished = False
        try:
            while True:
                with self._condition:
                    if not self._items and self._state in UNFINISHED:
                        self._check_not_monitor()
                        self._condition.wait_for(lambda: bool(self._items) or self._state not in UNFINISHED)
                    body, resume = self._take_item()
                if resume:
                    self._resume_reading()
                if body is _NO_ITEM:
                    finished = True
                    self._end_of_items()
                    return
                yield self._decode_item(body)
        finally:
            self._loop_left(finished)

    def __aiter__(self) -> AsyncIterator[Y]:
        return self._aiter()

    async def _aiter(self) -> AsyncIterator[Y]:
        import asyncio

        self._check_owner()
        self._reading(1)
        finished = False
        try:
            while True:
                await self._until(lambda: bool(self._items) or self._state not in UNFINISHED)
                with self._condition:
                    body, resume = self._take_item()
                if resume:
                    self._resume_reading()
                if body is _NO_ITEM:
                    finished = True
                    if self.cancelled():
                        raise asyncio.CancelledError(f"task {self._name!r} was cancelled")
                    self._end_of_items()
                    return
                yield self._decode_item(body)
        finally:
            self._loop_left(finished)

    def _resume_reading(self) -> None:
        if self._process is not None:
            self._process.resume()

    def _loop_left(self, finished: bool) -> None:
        """A loop over the items ended. Left early (``break``, an error, a cancellation), it
        stops the task, as leaving a loop over a generator closes the generator."""
        if self._reading(-1):
            self._resume_reading()
        if not finished and self._state in UNFINISHED:  # a finished task is left to its exit
            self._request_stop("abandoned")

    def _end_of_items(self) -> None:
        """Every item was read and the outcome is known: raise it if it is an error."""
        error = self._wait_decoded(None)[1]
        if error is not None:
            raise error

    def _decode_item(self, body: Any) -> Y:
        from .._shared.serialization import loads

        try:
            item: Y = loads(body)
        except Exception as exc:
            raise SerializationError(
                f"a value task {self._name!r} yielded cannot be unpickled here: {type(exc).__name__}: {exc}"
            ) from exc
        return item

    def __repr__(self) -> str:
        return super().__repr__().replace("<bgtask.Task ", "<bgtask.StreamTask ", 1)
