"""``Task``: the handle of one task process, a future and a process at once.

States and the only transitions::

    RUNNING ──stop()/kill()/timeout/program exit──> STOPPING
       │                                               │
       └──────── outcome known ───────────────────────>└──> FINISHED

Separately, the process *exits* (``is_alive()`` turns false, ``exitcode`` is set) once it has
been reaped and its socket drained. A returned value, a raised exception or a pickling failure is
known as soon as the task sends it, a moment before the process exits: ``result()`` returns then,
``join()`` waits for the exit. Any other outcome is fixed when the process exits. The outcome is
exactly one of:

    returned   the function returned a value (even after a stop request: the value counts)
    raised     the function raised; result() re-raises it with the task's traceback as cause
    stopped    a stop request ended it first                     -> TaskStopped
    crashed    the process ended without reporting an outcome    -> TaskCrashed
    failed     bgtask could not unpickle the call in the task, or pickle the result there

Done-callbacks run in the monitor thread (``bgtask-monitor``), or at once in the caller when the
task is already finished. The result is unpickled in the thread that asks for it, once.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
from typing import TYPE_CHECKING, Any, Callable, Generator, Generic, List, Optional, Tuple, TypeVar, final

from . import _lifecycle
from ._errors import BgTaskError, describe_exit
from ._outcome import STOP_REASONS, classify, decode, guess_exitcode

if TYPE_CHECKING:
    import concurrent.futures

R = TypeVar("R")

_RUNNING, _STOPPING, _FINISHED = "running", "stopping", "finished"


@final
class Task(Generic[R]):
    """The handle of a task: a process running a function, and that function's future result.

    Returned by calling a function decorated with ``@background``; never created directly. It
    works like a ``multiprocessing.Process`` (``pid``, ``exitcode``, ``is_alive()``, ``join()``,
    ``kill()``), like a ``concurrent.futures.Future`` (``result()``, ``exception()``, ``done()``,
    ``add_done_callback()``, and ``.future`` for ``wait``/``as_completed``) and like an asyncio
    awaitable (``await task``; cancelling the awaiting coroutine stops the task).

    A handle belongs to the process that started the task: it cannot be pickled, and in a forked
    copy of that process every method raises ``BgTaskError``.
    """

    __module__ = "bgtask"

    def __init__(
        self,
        task_id: int,
        name: str,
        *,
        daemon: bool,
        graceful: bool,
        grace: float,
        start_method: Optional[str],
    ) -> None:
        self.id = task_id
        self._name = name
        self._daemon = daemon
        self._graceful = graceful
        self._grace = grace
        self._start_method = start_method
        self._owner = os.getpid()
        self._cond = threading.Condition(threading.Lock())
        self._state = _RUNNING
        self._exited = False
        self._pid: Optional[int] = None
        self._pid_known = False
        self._exitcode: Optional[int] = None
        self._stop_reason: Optional[str] = None
        self._hard_stop_sent = False
        self._outcome: Optional[str] = None
        self._body: Any = None  # the outcome's data, as it came from the task
        self._value: Any = None
        self._error: Optional[BaseException] = None
        self._unpacked = False
        self._callbacks: List[Callable[[Task[R]], object]] = []
        self._future: Optional[concurrent.futures.Future[R]] = None
        # Set by the launcher.
        self._launcher: Any = None
        self._launcher_data: Any = None  # (zygote handle, spare serial) under the default method
        self._watch: Any = None
        self._sock: Any = None

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
        """The task process's id; waits the moment it takes to learn it after the call."""
        self._check_owner()
        with self._cond:
            self._cond.wait_for(lambda: self._pid_known or self._exited)
            return self._pid

    @property
    def exitcode(self) -> Optional[int]:
        """``None`` while the process runs; then its exit code, ``-N`` if killed by signal N."""
        return self._exitcode

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
        if not self._exited:
            self._check_not_monitor()
        self._wait_finished(timeout)

    def stop(self, timeout: Optional[float] = None) -> None:
        """Stop the task and return once its process is gone.

        A graceful task is asked to stop (its stop event is set, or the stop exception is raised
        inside it so that its ``finally`` blocks run) and its process group is killed if it is
        still there ``grace`` seconds later. Any other task's process group is killed at once.
        Stopping a finished task does nothing.

        Raises:
            TimeoutError: the process was not gone within ``timeout`` seconds.
        """
        self._check_owner()
        if not self._exited:
            self._check_not_monitor()
        self._request_stop("stop")
        if not self._wait_finished(timeout):
            raise TimeoutError(f"task {self._name!r} (pid {self._pid}) was not gone within {timeout} s")

    def kill(self) -> None:
        """Kill the task's process group with SIGKILL now; returns without waiting."""
        self._check_owner()
        self._request_stop("kill", hard=True)

    # -- future facets ----------------------------------------------------------------------

    def done(self) -> bool:
        """Return whether the task has finished, however it ended."""
        self._check_owner()
        return self._state == _FINISHED

    def result(self, timeout: Optional[float] = None) -> R:
        """Return the function's return value, waiting up to ``timeout`` seconds for it.

        Raises:
            TimeoutError: the task did not finish within ``timeout`` seconds.
            TaskStopped: the task was stopped before it finished.
            TaskCrashed: the process ended without reporting an outcome.
            SerializationError: the return value could not be pickled or unpickled.
            BgTaskError: the task process could not unpickle the function or its arguments.
            Exception: whatever the function raised, with the task's traceback as its cause.
        """
        self._check_owner()
        if self._state != _FINISHED:
            self._check_not_monitor()
        if not self._wait_outcome(timeout):
            raise TimeoutError(f"task {self._name!r} did not finish within {timeout} s")
        error = self._unpack()
        if error is not None:
            raise error
        return self._value  # type: ignore[no-any-return]

    def exception(self, timeout: Optional[float] = None) -> Optional[BaseException]:
        """Return the exception ``result()`` would raise, or ``None`` if it would return.

        Raises:
            TimeoutError: the task did not finish within ``timeout`` seconds.
        """
        self._check_owner()
        if self._state != _FINISHED:
            self._check_not_monitor()
        if not self._wait_outcome(timeout):
            raise TimeoutError(f"task {self._name!r} did not finish within {timeout} s")
        return self._unpack()

    def add_done_callback(self, fn: Callable[[Task[R]], object]) -> None:
        """Call ``fn(task)`` when the task finishes.

        It is called in bgtask's monitor thread, or at once in this thread if the task has
        already finished. An exception it raises is logged to the ``bgtask`` logger and ignored.
        """
        self._check_owner()
        with self._cond:
            if self._state != _FINISHED:
                self._callbacks.append(fn)
                return
        _run_callback(fn, self)

    @property
    def future(self) -> concurrent.futures.Future[R]:
        """A ``concurrent.futures.Future`` that follows this task (for ``wait``, ``as_completed``).

        Cancelling it does nothing (a running future cannot be cancelled); use ``stop()``.
        """
        self._check_owner()
        with self._cond:
            if self._future is None:
                import concurrent.futures

                future: concurrent.futures.Future[R] = concurrent.futures.Future()
                future.set_running_or_notify_cancel()
                self._future = future
                install = True
            else:
                install = False
        if install:
            self.add_done_callback(_resolve_future)
        return self._future

    def __await__(self) -> Generator[Any, None, R]:
        return self._await().__await__()

    async def _await(self) -> R:
        import asyncio

        self._check_owner()
        loop = asyncio.get_running_loop()
        waiter = loop.create_future()

        def wake(_task: Task[R]) -> None:
            def set_done() -> None:
                if not waiter.done():
                    waiter.set_result(None)

            try:
                loop.call_soon_threadsafe(set_done)
            except RuntimeError:
                pass  # the loop is closed: nobody waits any more

        self.add_done_callback(wake)
        try:
            await waiter
        except asyncio.CancelledError:
            self._request_stop("stop")
            raise
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

    def _describe_state(self) -> str:
        if self._state != _FINISHED:
            return self._state
        if not self._exited:
            return f"finished: {self._outcome}, exiting"
        if self._outcome == "returned":
            return "finished: returned"
        if self._outcome == "raised":
            return f"finished: raised {self._body[1]}" if self._body else "finished: raised"
        if self._outcome == "stopped":
            return f"stopped {STOP_REASONS.get(self._stop_reason or '', '')}".rstrip()
        if self._outcome == "failed":
            return "failed"
        return f"crashed: {describe_exit(self._exitcode)}"

    def _check_owner(self) -> None:
        if os.getpid() != self._owner:
            raise BgTaskError(
                f"the handle of task {self._name!r} belongs to process {self._owner}, which "
                f"started it; it cannot be used in process {os.getpid()} (a forked copy)"
            )

    def _check_not_monitor(self) -> None:
        monitor_module = sys.modules.get("bgtask._monitor")
        monitor = getattr(monitor_module, "_monitor", None)
        if monitor is not None and monitor.in_monitor_thread():
            raise BgTaskError(
                "a done-callback cannot wait for a task: it runs in bgtask's monitor thread, "
                "which finishes tasks; wait elsewhere"
            )

    # -- driven by the launcher, the monitor and the lifecycle ------------------------------

    @property
    def _finished(self) -> bool:
        """Whether the process has exited (the outcome is then known too)."""
        return self._exited

    def _wait_finished(self, timeout: Optional[float]) -> bool:
        """Wait for the process to exit."""
        with self._cond:
            return self._cond.wait_for(lambda: self._exited, timeout)

    def _wait_outcome(self, timeout: Optional[float]) -> bool:
        with self._cond:
            return self._cond.wait_for(lambda: self._state == _FINISHED, timeout)

    def _set_pid(self, pid: Optional[int]) -> None:
        with self._cond:
            self._pid = pid
            self._pid_known = True
            self._cond.notify_all()

    def _request_stop(self, reason: str, hard: bool = False) -> None:
        """Ask the task to stop; ``hard`` (or a non-graceful task) kills its group at once."""
        with self._cond:
            if self._exited or self._launcher is None:  # gone, or never started
                return
            hard = hard or not self._graceful
            if self._state == _STOPPING and (self._hard_stop_sent or not hard):
                return
            if self._stop_reason is None:
                self._stop_reason = reason
            self._state = _STOPPING
            self._hard_stop_sent = hard
        if hard:
            self._launcher.signal(self, signal.SIGKILL, None)
        else:
            self._launcher.signal(self, signal.SIGTERM, self._grace)

    def _set_outcome(self, message: Tuple[int, Any]) -> None:
        """In the monitor: the task sent its outcome; its process is about to exit."""
        outcome, body = classify([message], None, False)
        with self._cond:
            if self._state == _FINISHED:
                return
            self._outcome = outcome
            self._body = body
            self._state = _FINISHED
            callbacks, self._callbacks = self._callbacks, []
            self._cond.notify_all()
        for fn in callbacks:
            _run_callback(fn, self)

    def _finish(self, exitcode: Optional[int], messages: List[Tuple[int, Any]], partial: bool) -> None:
        """In the monitor: the process is reaped; fix the outcome if not yet, run callbacks."""
        outcome, body = classify(messages, self._stop_reason, partial)
        if outcome == "stopped" and self._graceful and exitcode == -signal.SIGKILL and body is None:
            import logging

            logging.getLogger("bgtask").warning(
                "bgtask: task %r (pid %s) did not stop within its grace of %s s; its process group "
                "was killed",
                self._name,
                self._pid,
                self._grace,
            )
        callbacks: List[Callable[[Task[R]], object]] = []
        with self._cond:
            self._exitcode = exitcode if exitcode is not None else guess_exitcode(outcome)
            self._exited = True
            self._pid_known = True
            if self._state != _FINISHED:
                self._outcome = outcome
                self._body = body
                self._state = _FINISHED
                callbacks, self._callbacks = self._callbacks, []
            self._cond.notify_all()
        self._sock = None
        _lifecycle.unregister(self)
        for fn in callbacks:
            _run_callback(fn, self)

    def _forget_in_child(self) -> None:
        if self._sock is not None:
            try:
                self._sock.close()
            except OSError:
                pass

    def _unpack(self) -> Optional[BaseException]:
        """The exception ``result()`` raises (or ``None``); unpickles once, in this thread."""
        with self._cond:
            if self._unpacked:
                return self._error
            self._value, self._error = self._decode()
            self._body = None if self._outcome == "returned" else self._body
            self._unpacked = True
            return self._error

    def _decode(self) -> Tuple[Any, Optional[BaseException]]:
        return decode(
            self._outcome or "crashed",
            self._body,
            name=self._name,
            pid=self._pid,
            exitcode=self._exitcode,
            stop_reason=self._stop_reason,
        )


def _run_callback(fn: Callable[[Any], object], task: Any) -> None:
    try:
        fn(task)
    except Exception:
        import logging

        logging.getLogger("bgtask").exception("bgtask: done-callback %r of %r raised", fn, task)


def _resolve_future(task: Task[Any]) -> None:
    future = task._future
    assert future is not None
    error = task._unpack()
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(task._value)
