"""The monitor: one thread of the main program that watches every task.

::

    callers ──(queue + wake pipe)──> monitor thread ── selector over:
                                        · each task's socket: read eagerly, so a task never
                                          blocks on a full pipe, whatever size its result
                                        · each zygote's control socket: started / reaped reports
                                        · each multiprocessing sentinel (other start methods)
                                        · timers: task timeouts, stop escalation

A task is finished when its process has been reaped: the monitor then reads what is left on the
task's socket without blocking, closes it, and hands the outcome to the ``Task``. It never
unpickles user data (that happens in the thread that asks for the result) and never runs user
code other than done-callbacks.
"""

from __future__ import annotations

import heapq
import itertools
import os
import selectors
import threading
from typing import Any, Callable, Dict, List, Optional, Tuple

Callback = Callable[[], None]


class Monitor:
    """The single I/O thread of one process; created lazily, recreated in a forked child."""

    def __init__(self) -> None:
        self._selector = selectors.DefaultSelector()
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)
        self._selector.register(self._wake_r, selectors.EVENT_READ, None)
        self._lock = threading.Lock()
        self._pending: List[Callback] = []
        self._timers: List[Tuple[float, int, Callback]] = []
        self._seq = itertools.count()
        self._handlers: Dict[int, Callable[[], None]] = {}
        self.owner_pid = os.getpid()
        self._thread = threading.Thread(target=self._run, name="bgtask-monitor", daemon=True)
        self._thread.start()

    # -- called from any thread -------------------------------------------------------------

    def call_soon(self, fn: Callback) -> None:
        """Run ``fn`` in the monitor thread."""
        with self._lock:
            self._pending.append(fn)
        self._wake()

    def call_at(self, when: float, fn: Callback) -> None:
        """Run ``fn`` in the monitor thread at ``time.monotonic() >= when``."""
        with self._lock:
            heapq.heappush(self._timers, (when, next(self._seq), fn))
        self._wake()

    def in_monitor_thread(self) -> bool:
        return threading.current_thread() is self._thread

    def _wake(self) -> None:
        try:
            os.write(self._wake_w, b"\0")
        except BlockingIOError:
            pass  # already full of wake-ups

    def add_reader(self, fileobj: Any, handler: Callable[[], None]) -> None:
        """Call ``handler`` in the monitor thread whenever ``fileobj`` is readable.

        Registering needs no wake-up: the kernel adds the descriptor to the wait in progress.
        """
        with self._lock:
            self._selector.register(fileobj, selectors.EVENT_READ, handler)

    def remove_reader(self, fileobj: Any) -> None:
        with self._lock:
            try:
                self._selector.unregister(fileobj)
            except (KeyError, ValueError):
                pass

    # -- called in the monitor thread -------------------------------------------------------

    def _run(self) -> None:
        while True:
            self._step()

    def _step(self) -> None:
        """One round: wait, then run handlers, queued calls and due timers.

        A method of its own so that its locals (the last callbacks, and the tasks they hold) go
        away after each round instead of staying alive until the next event.
        """
        import time

        with self._lock:
            timeout = None
            if self._timers:
                timeout = max(0.0, self._timers[0][0] - time.monotonic())
        try:
            events = self._selector.select(timeout)
        except InterruptedError:
            return
        for key, _mask in events:
            if key.data is None:
                try:
                    while os.read(self._wake_r, 4096):
                        pass
                except BlockingIOError:
                    pass
            else:
                _guard(key.data)
        with self._lock:
            pending, self._pending = self._pending, []
            due: List[Callback] = []
            now = time.monotonic()
            while self._timers and self._timers[0][0] <= now:
                due.append(heapq.heappop(self._timers)[2])
        for fn in pending:
            _guard(fn)
        for fn in due:
            _guard(fn)

    def close_in_child(self) -> None:
        """Release this monitor's descriptors in a forked child, where its thread does not run."""
        for fd in (self._wake_r, self._wake_w):
            try:
                os.close(fd)
            except OSError:
                pass
        try:
            self._selector.close()
        except Exception:
            pass


def _guard(fn: Callable[[], None]) -> None:
    try:
        fn()
    except Exception:  # the monitor must survive anything; say what went wrong
        import logging

        logging.getLogger("bgtask").exception("bgtask monitor: unexpected error")


_monitor: Optional[Monitor] = None
_monitor_lock = threading.Lock()


def get() -> Monitor:
    """The monitor of this process, started on first use."""
    global _monitor
    monitor = _monitor
    if monitor is not None and monitor.owner_pid == os.getpid():
        return monitor
    with _monitor_lock:
        if _monitor is None or _monitor.owner_pid != os.getpid():
            _monitor = Monitor()
        return _monitor


def forget_in_child() -> None:
    """After a fork: drop the parent's monitor (its thread does not exist here)."""
    global _monitor, _monitor_lock
    if _monitor is not None:
        _monitor.close_in_child()
    _monitor = None
    _monitor_lock = threading.Lock()  # another thread may have held it at the fork
