"""Bounded concurrency: ``Limiter``, and the pending tasks that wait for a place in one.

::

    call ──> Limiter._submit(task, start)
               │ a place is free: start() now, in the caller (errors raise at the call)
               └ none: the task waits, pending (a Future in its PENDING state, pid None)
    a task of the limiter ends (monitor thread) ──> Limiter._release()
               └ the oldest pending task gets the place: the starter thread starts it

A pending task is started by ``_Starter``, one thread per program that runs only while a
pending task waits to be started: the monitor thread, which reports ends, must not start tasks
itself (a start may wait for the zygote, whose reports arrive through the monitor). A pending
task that is stopped or cancelled leaves the queue and ends without a process.
"""

from __future__ import annotations

import collections
import threading
import weakref
from typing import Any, Callable, Deque, Optional, Tuple

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
        """Start ``task`` now if a place is free (``start()`` raises here), else queue it."""
        with self._lock:
            now = self._running < self._limit and not self._pending
            if now:
                self._running += 1
            else:
                self._pending[task] = call
        if now:
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
            entry = self._pending.popitem(last=False)
        _starter.start(self, entry)

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


class _Starter:
    """Starts pending tasks whose place freed: one thread, only while there is one to start."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.queue: Deque[Tuple[Limiter, Tuple[Any, Call]]] = collections.deque()
        self.thread: Optional[threading.Thread] = None

    def start(self, limiter: Limiter, entry: Tuple[Any, Call]) -> None:
        with self.lock:
            self.queue.append((limiter, entry))
            if self.thread is not None:
                return
            thread = threading.Thread(target=self._run, name="bgtask-starter", daemon=True)
            try:
                thread.start()
            except RuntimeError as exc:  # no thread left, or the interpreter is shutting down
                error: BaseException = exc
                failed = list(self.queue)
                self.queue.clear()
            else:
                self.thread = thread
                return
        for owner, (task, call) in failed:
            call.abandon()
            task._failed_to_start(error)
            owner._release()

    def _run(self) -> None:
        while True:
            with self.lock:
                if not self.queue:
                    self.thread = None
                    return
                limiter, (task, call) = self.queue.popleft()
            early = task._early_stop
            if early is not None:  # stopped after it left the queue: it never starts
                call.abandon()
                task._pending_stopped(early[0])
                limiter._release()
                continue
            try:
                call.start()
            except BaseException as exc:  # noqa: BLE001 (the task reports it; the others go on)
                if task._process is None:
                    task._failed_to_start(exc)
                    limiter._release()

    def forget_in_child(self) -> None:
        self.lock = threading.Lock()
        self.queue.clear()
        self.thread = None


_starter = _Starter()
_limiters: weakref.WeakSet[Limiter] = weakref.WeakSet()


def forget_in_child() -> None:
    """In a forked copy: the pending tasks, the places and the starter thread are the original's."""
    _starter.forget_in_child()
    for limiter in list(_limiters):
        limiter._forget_in_child()
