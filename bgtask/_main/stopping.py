"""What a stop asks of a ``Task``, from whichever thread asks: ``stop()``, ``kill()``, a
timeout, ``cancel()``, the program's end.

::

    pending in its Limiter  -> taken out of the queue: ends without a process
    being started           -> kept (the strongest asked for), sent by ``_attach()``
    running                 -> SIGTERM, SIGKILL of its group after ``grace`` (graceful)
                               SIGKILL of its group at once (not graceful, or kill())
    outcome known, exiting  -> nothing now, SIGKILL of its group after ``grace``

A part of ``TaskCore`` (a mixin): a stop never writes the outcome; it records why it was asked
(``_stop_reason``), which decides the outcome only if the process then ends without one.
"""

from __future__ import annotations

import signal
import time
from concurrent.futures._base import FINISHED
from typing import TYPE_CHECKING, Callable, Optional, Tuple

from .._monitor import loop as _monitor
from .waits import UNFINISHED

if TYPE_CHECKING:
    import threading

    from .._monitor.process import TaskProcess
    from .limits import Limiter


class Stopping:
    """The stop requests of a ``Task``, and its timeout; see the module docstring."""

    _condition: threading.Condition
    _state: str
    _process: Optional[TaskProcess]
    _pid: Optional[int]
    _exited: bool
    _limiter: Optional[Limiter]
    _early_stop: Optional[Tuple[str, bool]]
    _stop_reason: Optional[str]
    _stop_sent: Optional[str]
    _soft_stop_at: float
    _graceful: bool
    _grace: float
    _timeout: Optional[_monitor.Timer]

    if TYPE_CHECKING:

        def _pending_stopped(self, reason: str) -> None: ...

    def _arm_timeout(self, seconds: float) -> None:
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
            if self._exited:
                return
            if process is None:
                limiter = self._limiter
                if limiter is None:
                    return  # interrupted before its start: nothing runs
                if not limiter._discard(self):
                    # Being started: stopped once it is (by the strongest stop asked for).
                    earlier = self._early_stop
                    self._early_stop = (reason, hard or (earlier is not None and earlier[1]))
                    return
        if process is None:
            self._pending_stopped(reason)
            return
        with self._condition:
            if self._state == FINISHED and not hard:
                if self._stop_sent is None:
                    self._stop_sent = "soft"
                    self._soft_stop_at = time.monotonic()
                    process.signal(0, self._grace)  # signal 0: nothing now, SIGKILL later
                return
            hard = hard or not self._graceful
            if self._stop_sent == "hard" or (self._stop_sent == "soft" and not hard):
                return
            if self._stop_reason is None and self._state in UNFINISHED:
                self._stop_reason = reason
            self._stop_sent = "hard" if hard else "soft"
            if not hard:
                self._soft_stop_at = time.monotonic()
        if hard:
            process.signal(signal.SIGKILL)
        else:
            process.signal(signal.SIGTERM, self._grace)


def _weak(task: Stopping) -> Callable[[], Optional[Stopping]]:
    import weakref

    return weakref.ref(task)
