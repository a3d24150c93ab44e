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

Everything about the process comes from its ``TaskProcess`` (``_process``), in the monitor
thread. Done-callbacks run there, or in the thread that calls ``cancel()``, or at once in the
caller when the task is already done. The result is unpickled in the thread that asks for it,
outside any lock, once.
"""

from __future__ import annotations

import concurrent.futures
import os
import signal
import time
from concurrent.futures._base import CANCELLED_AND_NOTIFIED, FINISHED, RUNNING
from typing import TYPE_CHECKING, Any, Callable, Generator, List, NoReturn, Optional, Tuple, TypeVar, final

from . import _lifecycle, _monitor
from ._errors import BgTaskError, describe_exit
from ._outcome import STOP_REASONS, classify, decode

if TYPE_CHECKING:
    from ._process import TaskProcess

R = TypeVar("R")


@final
class Task(concurrent.futures.Future[R]):
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

    def __init__(self, name: str, *, daemon: bool, graceful: bool, grace: float) -> None:
        super().__init__()
        self._done_callbacks: List[Callable[[Task[R]], object]]
        self._state = RUNNING  # the process starts at the call
        self._name = name
        self._daemon = daemon
        self._graceful = graceful
        self._grace = grace
        self._owner = os.getpid()
        self._process: Optional[TaskProcess] = None
        self._pid: Optional[int] = None
        self._exited = False
        self._exitcode: Optional[int] = None
        self._stop_reason: Optional[str] = None
        self._stop_sent: Optional[str] = None  # "soft" or "hard"
        self._outcome: Optional[str] = None
        self._body: Any = None  # the outcome's data, as it came from the task
        self._decoded: Optional[Tuple[Any, Optional[BaseException]]] = None
        self._timeout: Optional[_monitor.Timer] = None
        self._ready: Any = _NOT_READY  # what bgtask.ready() sent, as it came from the task
        self._ready_value: Any = _NOT_READY  # ... unpickled, once
        self._watchers: List[Callable[[], None]] = []  # woken at any change (asyncio waiters)
        self._started = time.monotonic()
        self._ended_at = 0.0
        self._origin: Optional[str] = None  # where the call was made, when tracked (_lifecycle)

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
        """The task process's id."""
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
        """Return whether the task's process is still running."""
        self._check_owner()
        return not self._exited

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
        with self._condition:
            if self._ready is _NOT_READY and self._state == RUNNING:
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
        if not self._ready_or_done():
            try:
                await asyncio.wait_for(self._until(self._ready_or_done), timeout)
            except asyncio.TimeoutError:
                raise TimeoutError(f"task {self._name!r} was not ready within {timeout} s") from None
        if self.cancelled():  # as ``await task`` does
            raise asyncio.CancelledError(f"task {self._name!r} was cancelled")
        return self.wait_ready(0)

    def _ready_or_done(self) -> bool:
        return self._ready is not _NOT_READY or self._state != RUNNING

    # -- future facets ----------------------------------------------------------------------

    def cancel(self) -> bool:
        """Cancel the task: it is stopped, and ``result()`` raises ``CancelledError``.

        Returns ``False`` when its outcome is already known (as ``Future.cancel`` does for a
        finished call), ``True`` otherwise. It does not wait for the process to end; ``join()``
        does. A graceful task gets its ``grace`` as with ``stop()``.
        """
        self._check_owner()
        with self._condition:
            if self._state == FINISHED:
                return False
            if self._state == CANCELLED_AND_NOTIFIED:
                return True
            self._state = CANCELLED_AND_NOTIFIED
            self._outcome = "cancelled"
            self._stop_reason = self._stop_reason or "cancel"
            for waiter in self._waiters:
                waiter.add_cancelled(self)
            self._condition.notify_all()
        self._request_stop("cancel")
        self._invoke_callbacks()
        return True

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
            await self._until(lambda: self._state != RUNNING)
        except asyncio.CancelledError:
            self.cancel()
            raise
        if self.cancelled():
            raise asyncio.CancelledError(f"task {self._name!r} was cancelled")
        return self.result(0)

    async def _until(self, predicate: Callable[[], bool]) -> None:
        """Wait in the running event loop until ``predicate()``, checked at each change."""
        import asyncio

        loop = asyncio.get_running_loop()
        while True:
            waiter = loop.create_future()

            def wake(waiter: Any = waiter) -> None:
                def set_done() -> None:
                    if not waiter.done():
                        waiter.set_result(None)

                try:
                    loop.call_soon_threadsafe(set_done)
                except RuntimeError:
                    pass  # the loop is closed: nobody waits any more

            with self._condition:
                if predicate():
                    return
                self._watchers.append(wake)
            try:
                await waiter
            finally:  # cancelled or timed out: nothing of this wait stays with the task
                with self._condition:
                    if wake in self._watchers:
                        self._watchers.remove(wake)

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

    def _describe_state(self) -> str:
        if self._state == RUNNING:
            return "stopping" if self._stop_sent else "running"
        exiting = "" if self._exited else ", exiting"
        if self._outcome == "raised":
            return (
                f"finished: raised {self._body[1]}{exiting}" if self._body else f"finished: raised{exiting}"
            )
        if self._outcome == "stopped":
            return f"stopped {STOP_REASONS.get(self._stop_reason or '', '')}".rstrip() + exiting
        if self._outcome == "crashed":
            return f"crashed: {describe_exit(self._exitcode)}"
        return f"{'finished: ' if self._outcome != 'cancelled' else ''}{self._outcome}{exiting}"

    def _check_owner(self) -> None:
        if os.getpid() != self._owner:
            raise BgTaskError(
                f"the handle of task {self._name!r} belongs to process {self._owner}, which "
                f"started it; it cannot be used in process {os.getpid()} (a forked copy)"
            )

    def _check_not_monitor(self) -> None:
        if _monitor.in_monitor_thread():
            raise BgTaskError(
                "a done-callback cannot wait for a task: it runs in bgtask's monitor thread, "
                "which finishes tasks; wait elsewhere"
            )

    # -- waiting and decoding ---------------------------------------------------------------

    def _wait_exit(self, timeout: Optional[float]) -> bool:
        """Wait for the process to exit."""
        with self._condition:
            if not self._exited:
                self._check_not_monitor()
            return self._condition.wait_for(lambda: self._exited, timeout)

    def _wait_decoded(self, timeout: Optional[float]) -> Tuple[Any, Optional[BaseException]]:
        self._check_owner()
        with self._condition:
            if self._state == RUNNING:
                self._check_not_monitor()
                if not self._condition.wait_for(lambda: self._state != RUNNING, timeout):
                    raise TimeoutError(f"task {self._name!r} did not finish within {timeout} s")
            if self._state == CANCELLED_AND_NOTIFIED:
                raise concurrent.futures.CancelledError(f"task {self._name!r} was cancelled")
            if self._decoded is not None:
                return self._decoded
            outcome, body = self._outcome, self._body
        # Unpickled outside the lock: the monitor needs it to finish the task, and other tasks
        # must not wait for this one's unpickling. Two threads racing here decode twice; the
        # first to publish wins, so every caller sees the same objects.
        decoded = decode(
            outcome or "crashed",
            body,
            name=self._name,
            pid=self._pid,
            exitcode=self._exitcode,
            stop_reason=self._stop_reason,
        )
        with self._condition:
            if self._decoded is None:
                self._decoded = decoded
                self._body = None if outcome == "returned" else body
            return self._decoded

    # -- driven by the decorator, the lifecycle and the TaskProcess -------------------------

    def _attach(self, process: TaskProcess) -> None:
        """Right after the launcher started the process: follow it."""
        self._pid = process.pid
        self._process = process
        process.watch(self)

    def _arm_timeout(self, seconds: float) -> None:
        import time

        task_ref = _weak(self)

        def expire() -> None:
            task = task_ref()
            if task is not None:
                task._request_stop("timeout")

        self._timeout = _monitor.get().call_at(time.monotonic() + seconds, expire)
        if self._exited:  # it ended before the timer was armed: _ended() could not cancel it
            self._timeout.cancel()

    def _request_stop(self, reason: str, hard: bool = False) -> None:
        """Ask the task to stop; ``hard`` (or a non-graceful task) kills its group at once.

        Once the outcome is known, a stop sends no signal: the process is on its way out,
        running its cleanup, and gets ``grace`` seconds for it before its group is killed.
        """
        with self._condition:
            process = self._process
            if self._exited or process is None:  # gone, or never started
                return
            if self._state == FINISHED and not hard:
                if self._stop_sent is None:
                    self._stop_sent = "soft"
                    process.signal(0, self._grace)  # signal 0: nothing now, SIGKILL later
                return
            hard = hard or not self._graceful
            if self._stop_sent == "hard" or (self._stop_sent == "soft" and not hard):
                return
            if self._stop_reason is None and self._state == RUNNING:
                self._stop_reason = reason
            self._stop_sent = "hard" if hard else "soft"
        if hard:
            process.signal(signal.SIGKILL)
        else:
            process.signal(signal.SIGTERM, self._grace)

    def _outcome_sent(self, kind: int, body: Any) -> None:
        """In the monitor: the task sent its outcome; its process is about to exit."""
        outcome, body = classify([(kind, body)], None, False, None)
        self._set_outcome(outcome, body)

    def _ended(
        self, exitcode: Optional[int], messages: List[Tuple[int, Any]], partial: bool, corrupt: Optional[str]
    ) -> None:
        """In the monitor: the process is gone; fix the outcome if not yet, run callbacks."""
        if self._timeout is not None:
            self._timeout.cancel()
        outcome, body = classify(messages, self._stop_reason, partial, corrupt)
        if outcome == "crashed" and body is None and exitcode is None:
            body = "bgtask's zygote died before it could report the exit status"
        graceful_stop = self._graceful and self._stop_sent == "soft"  # not kill(), which is hard
        if outcome == "stopped" and graceful_stop and exitcode == -signal.SIGKILL and body is None:
            import logging

            logging.getLogger("bgtask").warning(
                "bgtask: task %r (pid %s) did not stop within its grace of %s s; its process group "
                "was killed",
                self._name,
                self._pid,
                self._grace,
            )
        with self._condition:
            self._exitcode = exitcode
            self._ended_at = time.monotonic()
            self._exited = True  # in the same step as the outcome: join() then result(0) works
            self._set_outcome_locked(outcome, body)
            self._condition.notify_all()
        _lifecycle.unregister(self)
        self._invoke_callbacks()

    def _set_outcome(self, outcome: str, body: Any) -> None:
        with self._condition:
            self._set_outcome_locked(outcome, body)
            self._condition.notify_all()
        self._invoke_callbacks()

    def _set_outcome_locked(self, outcome: str, body: Any) -> None:
        if self._state != RUNNING:
            return
        self._outcome = outcome
        self._body = body
        self._state = FINISHED
        for waiter in self._waiters:
            if outcome == "returned":
                waiter.add_result(self)
            else:
                waiter.add_exception(self)

    def _ready_sent(self, body: Any) -> None:
        """In the monitor: the task called ``bgtask.ready()``."""
        with self._condition:
            if self._ready is not _NOT_READY:
                return
            self._ready = body
            self._condition.notify_all()
            watchers, self._watchers = self._watchers, []
        for wake in watchers:
            wake()

    def _invoke_callbacks(self) -> None:
        with self._condition:
            callbacks, self._done_callbacks = self._done_callbacks, []
            watchers, self._watchers = self._watchers, []
        for wake in watchers:
            wake()
        for fn in callbacks:
            _run_callback(fn, self)

    def _forget_in_child(self) -> None:
        """In a forked copy: this handle is the original's; its timer is not ours."""
        self._timeout = None


_NOT_READY: Any = object()


def _decode_ready(body: Any, name: str) -> Any:
    from ._errors import SerializationError
    from ._serialization import loads

    try:
        return loads(body)
    except Exception as exc:
        raise SerializationError(
            f"the value task {name!r} passed to ready() cannot be unpickled here: {type(exc).__name__}: {exc}"
        ) from exc


def _weak(task: Task[Any]) -> Callable[[], Optional[Task[Any]]]:
    import weakref

    return weakref.ref(task)


def _run_callback(fn: Callable[[Any], object], task: Task[Any]) -> None:
    try:
        fn(task)
    except BaseException:
        import logging

        logging.getLogger("bgtask").exception("bgtask: done-callback %r of %r raised", fn, task)
