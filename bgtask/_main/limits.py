"""Bounded concurrency: ``Limiter``, and the pending tasks that wait for a place in one.

::

    call ──> Limiter._submit(task, start)
               │ a place is free: start() now, in the caller (errors raise at the call)
               └ none: the task waits, pending (a Future in its PENDING state, pid None)
    a task of the limiter ends (monitor thread) ──> Limiter._release()
               └ the oldest pending task gets the place: the starter thread starts it

A pending task is started by the offload thread of starts (``_monitor.offload``): the monitor thread,
which reports ends, must not start tasks itself (a start may wait for the zygote, whose reports
arrive through the monitor). A start made in the monitor thread (a log handler's) or in a
signal handler that interrupted a start is handed over the same way: the task returns pending
and starts a moment later. A pending task that is stopped or cancelled leaves the queue and
ends without a process.
"""

from __future__ import annotations

import collections
import sys
import threading
import weakref
from typing import Any, Callable, Optional

from .._monitor import offload as _offload
from .._shared import forks

Start = Callable[[], None]


class Call:
    """What a pending task needs to start: ``start()``, or ``abandon()`` if it never will."""

    __slots__ = ("abandon", "start")

    def __init__(self, start: Start, abandon: Start) -> None:
        self.start = start
        self.abandon = abandon


class Limiter:
    """At most ``limit`` tasks run at once, among those of every function given this limiter.

    ``@background(limit=4)`` gives a function a limiter of its own; ``@background(limit=shared)``
    with one ``Limiter`` makes several functions share the places. A call beyond the limit
    returns its task at once, pending: it starts when a place frees, in call order.
    """

    __module__ = "bgtask"

    def __init__(self, limit: int) -> None:
        if isinstance(limit, bool) or not isinstance(limit, int):
            raise TypeError(f"Limiter(): limit must be an int, not {type(limit).__name__}")
        if limit < 1:
            raise ValueError(f"Limiter(): limit must be at least 1, not {limit}")
        self._limit = limit
        self._running = 0
        # Pending tasks in call order (a dict: one leaves the queue in constant time).
        self._pending: collections.OrderedDict[Any, Call] = collections.OrderedDict()
        # Reentrant: a collection of a map left unfinished may stop its tasks from anywhere.
        self._lock = threading.RLock()
        _limiters.add(self)

    @property
    def limit(self) -> int:
        """How many tasks may run at once."""
        return self._limit

    @property
    def running(self) -> int:
        """How many places are taken: tasks whose process runs (or is being started)."""
        return self._running

    @property
    def pending(self) -> int:
        """How many tasks wait for a place."""
        return len(self._pending)

    def __repr__(self) -> str:
        return f"<bgtask.Limiter limit={self._limit} running={self._running} pending={len(self._pending)}>"

    def __reduce__(self) -> Any:
        # A task that calls limited functions limits its own calls: places are per process.
        return Limiter, (self._limit,)

    def _submit(self, task: Any, call: Call) -> None:
        """Start ``task`` now if a place is free (``start()`` raises here), else queue it.

        Where a start must not run now (``must_hand_over``), a free place still goes to the
        task, and the offload thread starts it.
        """
        hand_over = must_hand_over()
        with self._lock:
            now = self._running < self._limit and not self._pending
            if now:
                self._running += 1
            else:
                self._pending[task] = call
        if now and hand_over:
            _offload.starts.post(lambda: _start_pending(self, task, call), inline=False)
        elif now:
            try:
                call.start()
            except BaseException:
                if task._process is None:  # it never started: its place is free again
                    self._release()
                raise

    def _release(self) -> None:
        """A task of this limiter ended (or never started): its place goes to the next one."""
        with self._lock:
            self._running -= 1
            if not self._pending or self._running >= self._limit:
                return
            self._running += 1
            task, call = self._pending.popitem(last=False)
        _offload.starts.post(lambda: _start_pending(self, task, call))

    def _discard(self, task: Any) -> bool:
        """Take ``task`` out of the queue; ``False`` if it is no longer there (being started)."""
        with self._lock:
            call = self._pending.pop(task, None)
        if call is None:
            return False
        call.abandon()
        return True

    def _forget_in_child(self) -> None:
        self._lock = threading.RLock()
        self._running = 0
        self._pending.clear()


def _start_pending(limiter: Limiter, task: Any, call: Call) -> None:
    """In the offload thread: start a task that got a place (or was handed over to start)."""
    early = task._early_stop
    if early is not None:  # stopped after it left the queue: it never starts
        call.abandon()
        task._pending_stopped(early[0])
        limiter._release()
        return
    try:
        call.start()
    except BaseException as exc:  # noqa: BLE001 (the task reports it; the others go on)
        if task._process is None:
            task._failed_to_start(exc)
            limiter._release()


def must_hand_over() -> bool:
    """Whether a start here must go to the offload thread instead of running now.

    In the monitor thread, a start could wait for the zygote's next spare, which only the
    monitor delivers; in a thread already inside a start (a signal handler that interrupted
    it), it could wait for a lock that thread holds.
    """
    return _offload.in_monitor_thread() or getattr(_starting, "depth", 0) > 0


class starting:
    """Marks the current thread as inside a start (see ``must_hand_over``)."""

    __slots__ = ()

    def __enter__(self) -> None:
        _starting.depth = getattr(_starting, "depth", 0) + 1

    def __exit__(self, *exc: object) -> None:
        _starting.depth -= 1
        if _starting.depth == 0 and _offload.starts.stranded:
            _offload.starts.run_stranded()  # handed over meanwhile, with no thread to take it


_starting = threading.local()


class _Unbounded(Limiter):
    """Where a task without a limit waits when its start is handed over (``must_hand_over``)."""

    def __init__(self) -> None:
        super().__init__(1)
        self._limit = sys.maxsize

    def __repr__(self) -> str:
        return "<bgtask handed-over starts>"


_handed_over: Optional[Limiter] = None


def handed_over() -> Limiter:
    """The unbounded limiter of starts handed over to the offload thread."""
    global _handed_over
    if _handed_over is None:
        _handed_over = _Unbounded()
    return _handed_over


_limiters: weakref.WeakSet[Limiter] = weakref.WeakSet()


def forget_in_child() -> None:
    """In a forked copy: the pending tasks and the places are the original's."""
    for limiter in list(_limiters):
        limiter._forget_in_child()


forks.register(after_in_child=forget_in_child, order=forks.MAIN)
