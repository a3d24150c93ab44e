"""How the methods of a ``Task`` wait: for the outcome, the exit, readiness, and from asyncio.

A part of ``TaskCore`` (a mixin, as ``StreamState`` is): it uses the task's condition and the
fields the monitor thread sets through ``TaskCore``'s transitions, and writes none of them but
the decoded outcome, once. Every wait first checks that it is not in the monitor thread (which
would wait on itself) and, on Ray, lets Ray lend the task's CPU out.
"""

from __future__ import annotations

import concurrent.futures
import os
from concurrent.futures._base import CANCELLED_AND_NOTIFIED, PENDING, RUNNING
from typing import TYPE_CHECKING, Any, Callable, List, Optional, Tuple

from .._monitor import loop as _monitor
from .._shared.context import atomic
from .._shared.errors import BgTaskError
from .outcome import decode
from .stream import StreamState

if TYPE_CHECKING:
    from .._monitor.process import TaskProcess

# The states before the outcome: waiting for a place in its Limiter, and started.
UNFINISHED = (PENDING, RUNNING)
# What ``_ready`` holds until the task calls ``bgtask.ready()``.
NOT_READY: Any = object()


class Waits(StreamState):
    """The waits a ``Task``'s methods are built on; see the module docstring."""

    _state: str
    _owner: int
    _name: str
    _process: Optional[TaskProcess]
    _pid: Optional[int]
    _exited: bool
    _exitcode: Optional[int]
    _outcome: Optional[str]
    _body: Any
    _decoded: Optional[Tuple[Any, Optional[BaseException]]]
    _stop_reason: Optional[str]
    _ready: Any
    _retrieved: bool
    _ready_wanted: bool
    _watchers: List[Callable[[], None]]

    def _check_owner(self) -> None:
        if os.getpid() != self._owner:
            raise BgTaskError(
                f"the handle of task {self._name!r} belongs to process {self._owner}, which "
                f"started it; it cannot be used in process {os.getpid()} (a forked copy)"
            )

    def _check_not_monitor(self) -> None:
        if _monitor.in_monitor_thread():
            raise BgTaskError(
                "bgtask's monitor thread (where the main program's log handlers run for records "
                "of tasks) cannot wait for a task: it is the thread that finishes them; wait elsewhere"
            )

    # -- waiting ---------------------------------------------------------------------

    def _let_others_run(self, timeout: Optional[float]) -> None:
        """Before a wait: a Ray task waiting for a task of its own lets Ray lend its CPU out,
        or two tasks each waiting for their nested one would hold every CPU between them."""
        block = getattr(self._process, "block", None)
        if block is not None and not self._exited:
            block(timeout)

    def _wait_exit(self, timeout: Optional[float]) -> bool:
        """Wait for the process to exit."""
        self._let_others_run(timeout)
        with self._unthrottled(), self._condition:
            if not self._exited:
                self._check_not_monitor()
            return self._condition.wait_for(lambda: self._exited, timeout)

    def _wait_decoded(self, timeout: Optional[float]) -> Tuple[Any, Optional[BaseException]]:
        self._check_owner()
        self._retrieved = True
        if self._state in UNFINISHED:
            self._let_others_run(timeout)
        with self._unthrottled(), self._condition:
            if self._state in UNFINISHED:
                self._check_not_monitor()
                if not self._condition.wait_for(lambda: self._state not in UNFINISHED, timeout):
                    raise TimeoutError(f"task {self._name!r} did not finish within {timeout} s")
            if self._state == CANCELLED_AND_NOTIFIED:
                raise concurrent.futures.CancelledError(f"task {self._name!r} was cancelled")
            if self._decoded is not None:
                return self._decoded
            outcome, body = self._outcome, self._body
        # Unpickled outside the lock: the monitor needs it to finish the task, and other tasks
        # must not wait for this one's unpickling. Two threads racing here decode twice; the
        # first to publish wins, so every caller sees the same objects. A Ctrl-C meanwhile is
        # raised once the outcome is kept (atomic): what the unpickling itself raises is data.
        with atomic():
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
                decoded = self._decoded
        return decoded

    def _want_ready(self) -> None:
        """Before a wait for readiness: a Ray task's readiness is fetched only when asked for."""
        self._ready_wanted = True  # a Ray task pending in its Limiter asks once it is started
        want = getattr(self._process, "want_ready", None)
        if want is not None and self._ready is NOT_READY:
            want()

    def _ready_or_done(self) -> bool:
        return self._ready is not NOT_READY or self._state not in UNFINISHED

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
