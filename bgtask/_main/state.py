"""The state under a ``Task``: its fields, and the transitions that set its outcome.

``Task`` (``_main.task``) is the public handle; this base class holds its fields and the
transitions, which run in the monitor thread, the one writer of outcomes: those the
``TaskProcess`` drives (``_outcome_sent``, ``_ready_sent``, ``_ended``), and the ends of a task
that never had a process (stopped while pending, failed to start), posted there from any thread.
Its parts, each a mixin in a module of its own::

    TaskCore   fields, transitions, done-callbacks, the log of a failure nobody retrieved
    Stopping   (_main.stopping) the stop requests of stop(), kill(), timeouts, the exit
    Waits      (_main.waits) the waits for the outcome, the exit, readiness; from asyncio
    StreamState (_main.stream) a stream's items on their way, and their backpressure

The states and transitions are drawn in ``_main.task``.
"""

from __future__ import annotations

import concurrent.futures
import os
import signal
import time
from concurrent.futures._base import CANCELLED_AND_NOTIFIED, FINISHED, PENDING, RUNNING
from typing import TYPE_CHECKING, Any, Callable, Deque, List, Optional, Tuple, TypeVar

from .._monitor import loop as _monitor
from .._monitor import offload as _offload
from .._shared.errors import BgTaskError, describe_exit
from . import lifecycle as _lifecycle
from .outcome import FAILURES, STOP_REASONS, classify, describe_failure
from .stopping import Stopping
from .waits import NOT_READY, UNFINISHED, Waits

if TYPE_CHECKING:
    from .._monitor.process import TaskProcess
    from .limits import Limiter

R = TypeVar("R")


class TaskCore(Stopping, Waits, concurrent.futures.Future[R]):
    """The fields and internal workings of a ``Task``; see the module docstring."""

    def __init__(
        self, name: str, *, daemon: bool, graceful: bool, grace: float, limiter: Optional[Limiter] = None
    ) -> None:
        super().__init__()
        self._done_callbacks: List[Callable[[Any], object]]  # each gets the Task
        # The process starts at the call, or once its limiter has a place (PENDING until then).
        self._state = RUNNING if limiter is None else PENDING
        self._limiter = limiter
        self._scoped = False  # a task of map(): the end of the program stops it, as a daemon
        self._early_stop: Optional[Tuple[str, bool]] = None  # asked while it was being started
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
        self._soft_stop_at = 0.0  # when the (graceful) stop signal was sent
        self._outcome: Optional[str] = None
        self._body: Any = None  # the outcome's data, as it came from the task
        self._decoded: Optional[Tuple[Any, Optional[BaseException]]] = None
        self._timeout: Optional[_monitor.Timer] = None
        self._ready: Any = NOT_READY  # what bgtask.ready() sent, as it came from the task
        self._ready_value: Any = NOT_READY  # ... unpickled, once
        self._ready_wanted = False  # someone waited for readiness (a Ray task fetches it then)
        self._watchers: List[Callable[[], None]] = []  # woken at any change (asyncio waiters)
        self._started = time.monotonic()
        self._ended_at = 0.0
        self._origin: Optional[str] = None  # where the call was made, when tracked (_main.lifecycle)
        self._items: Optional[Deque[Any]] = None  # a stream's items not yet read (StreamTask)
        self._items_size = 0
        self._readers = 0  # loops over the stream in progress: only they hold the task back
        self._throttled = False  # the channel is not read until the program reads items
        self._end_waiters = 0  # threads waiting for the end (result(), join()...): no throttle
        # Whether anyone looked at the outcome (result(), exception(), await, a done-callback):
        # a failure nobody looked at is logged once (see _unretrieved).
        self._retrieved = False
        self._reported = False

    def _describe_state(self) -> str:
        if self._state == PENDING:
            return "stopping" if self._early_stop else "pending"
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

    # -- driven by the decorator, the lifecycle and the TaskProcess ------------------

    def _attach(self, process: TaskProcess) -> None:
        """Right after the launcher started the process: follow it."""
        with self._condition:
            self._pid = process.pid
            self._process = process
            if self._state == PENDING:
                self._state = RUNNING
            early, self._early_stop = self._early_stop, None
        process.watch(self)
        if early is not None:  # stopped while it was being started
            self._request_stop(*early)

    def _pending_stopped(self, reason: str) -> None:
        """Stopped (or cancelled) while it waited for a place: it ends without a process."""

        def stopped() -> None:
            if self._stop_reason is None:
                self._stop_reason = reason
            self._finish_locked("stopped", None)

        self._end_without_process(stopped)

    def _failed_to_start(self, exc: BaseException) -> None:
        """A pending task's process could not start (no descriptor or process left...)."""
        error: BaseException = exc
        if isinstance(exc, OSError):
            from .._backends.launch import why_not_started

            error = BgTaskError(f"could not start task {self._name!r}: {why_not_started(exc)}")
            error.__cause__ = exc
        elif isinstance(exc, Exception) and not isinstance(exc, BgTaskError):
            error = BgTaskError(f"could not start task {self._name!r}: {type(exc).__name__}: {exc}")
            error.__cause__ = exc

        def failed() -> None:
            self._finish_locked("failed", None, decoded=(None, error))

        self._end_without_process(failed)

    def _end_without_process(self, set_outcome: Callable[[], None]) -> None:
        """The end of a task that never had a process: its outcome, then as ``_ended`` does.
        In the monitor thread, the one writer of outcomes, whichever thread asks."""

        def end() -> None:
            with self._condition:
                set_outcome()
                self._exited = True
                self._ended_at = time.monotonic()
                self._condition.notify_all()
            _lifecycle.unregister(self)
            self._invoke_callbacks()

        _monitor.get().call_and_wait(end)

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
        # A graceful stop whose grace ran out (not kill(), which is hard; nor a task that killed
        # itself, or was killed from outside, before its grace was over).
        graceful_stop = (
            self._graceful
            and self._stop_sent == "soft"
            and time.monotonic() - self._soft_stop_at >= self._grace
        )
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
            self._finish_locked(outcome, body)
            self._condition.notify_all()
        _lifecycle.unregister(self)
        if self._limiter is not None:
            # Its place goes to the next pending task once this one is seen ended: never more
            # than the limit alive at once, for whoever counts.
            try:
                self._limiter._release()
            except Exception:  # the monitor must finish this task whatever happens
                import logging

                logging.getLogger("bgtask").exception("bgtask: the next pending task could not be started")
        self._invoke_callbacks()

    def _set_outcome(self, outcome: str, body: Any) -> None:
        with self._condition:
            self._finish_locked(outcome, body)
            self._condition.notify_all()
        self._invoke_callbacks()

    def _finish_locked(
        self, outcome: str, body: Any, decoded: Optional[Tuple[Any, Optional[BaseException]]] = None
    ) -> bool:
        """The one transition to an outcome, under the condition, in the monitor thread.

        ``"cancelled"`` leads to CANCELLED_AND_NOTIFIED, any other outcome to FINISHED; a task
        whose outcome is known keeps it. Returns whether this call set it.
        """
        if self._state not in UNFINISHED:
            return False
        self._outcome = outcome
        self._body = body
        if decoded is not None:
            self._decoded = decoded
        self._state = CANCELLED_AND_NOTIFIED if outcome == "cancelled" else FINISHED
        if self._done_callbacks:
            # A callback sees the outcome. concurrent.futures.wait() and as_completed() (the
            # waiters) only tell that the task ended: what it raised counts as seen once
            # result() or exception() is called, as for a task they found already done.
            self._retrieved = True
        elif outcome in FAILURES:
            _lifecycle.unretrieved.add(self)
        for waiter in self._waiters:
            if outcome == "cancelled":
                waiter.add_cancelled(self)
            elif outcome == "returned":
                waiter.add_result(self)
            else:
                waiter.add_exception(self)
        return True

    def _pid_known(self, pid: int) -> None:
        """In the monitor: where the process runs became known after its start (Ray)."""
        with self._condition:
            if self._pid is None:
                self._pid = pid

    def _ready_sent(self, body: Any) -> None:
        """In the monitor: the task called ``bgtask.ready()``."""
        with self._condition:
            if self._ready is not NOT_READY:
                return
            self._ready = body
            self._condition.notify_all()
            watchers, self._watchers = self._watchers, []
        for wake in watchers:
            wake()

    def _invoke_callbacks(self) -> None:
        """Wake the asyncio waiters; run the done-callbacks in the offload thread of callbacks
        (user code never runs in the monitor thread), in the order they were added."""
        with self._condition:
            callbacks, self._done_callbacks = self._done_callbacks, []
            watchers, self._watchers = self._watchers, []
        for wake in watchers:
            wake()
        if callbacks:
            _offload.callbacks.post(lambda: _run_callbacks(callbacks, self))

    def _report_unretrieved(self) -> None:
        """Log a failure nobody retrieved, once (logger ``bgtask.unretrieved``), as asyncio logs
        "Task exception was never retrieved". From the garbage collector, or at the program's end."""
        if self._retrieved or self._reported or self._outcome not in FAILURES or os.getpid() != self._owner:
            return
        self._reported = True
        what, details = describe_failure(self._outcome, self._body, self._decoded, self._exitcode)
        try:
            import logging

            logging.getLogger("bgtask.unretrieved").error(
                "bgtask: task %r (pid %s) %s, and nothing retrieved its outcome%s",
                self._name,
                self._pid,
                what,
                f"\n{details}".rstrip() if details else "",
            )
        except Exception:  # noqa: BLE001 (at the interpreter's end, logging may be gone)
            pass

    def __del__(self) -> None:
        if not self._retrieved and self._outcome in FAILURES:
            self._report_unretrieved()

    def _forget_in_child(self) -> None:
        """In a forked copy: this handle is the original's; its timer is not ours."""
        self._timeout = None


def _decode_ready(body: Any, name: str) -> Any:
    from .._shared.errors import SerializationError
    from .._shared.serialization import loads

    try:
        return loads(body)
    except Exception as exc:
        raise SerializationError(
            f"the value task {name!r} passed to ready() cannot be unpickled here: {type(exc).__name__}: {exc}"
        ) from exc


def _run_callbacks(callbacks: List[Callable[[Any], object]], task: TaskCore[Any]) -> None:
    for fn in callbacks:
        _run_callback(fn, task)


def _run_callback(fn: Callable[[Any], object], task: TaskCore[Any]) -> None:
    try:
        fn(task)
    except BaseException:
        import logging

        logging.getLogger("bgtask").exception("bgtask: done-callback %r of %r raised", fn, task)
