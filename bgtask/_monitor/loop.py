"""The monitor: one thread of the main program that watches every task.

::

    callers ──(queue + wake pipe)──> monitor thread ── selector over:
                                        · each task's channel: read eagerly, so a task never
                                          blocks on a full pipe, whatever size its result
                                        · each zygote's control socket: spares, reaped reports
                                        · each multiprocessing sentinel (other start methods)
                                        · timers: task timeouts, stop escalation

Everything that decides a task's end runs here (``_monitor.process.TaskProcess``), so those decisions
need no lock. Nothing that can block runs here: the monitor unpickles no result (that happens
in the thread that asks for it; only a log record's exception, at most 64 KiB pickled, is
rebuilt here) and runs no done-callback (the offload threads do, ``_monitor.offload``). The one
user code it runs is the main program's log handlers, for tasks' records, in their order; a
start they make is handed over, a wait they make raises ``BgTaskError``. Whatever it runs
raises, a ``SystemExit`` included, is logged and the monitor goes on.

The thread starts with the first task and stays. Each started process holds it (``hold()``)
until its end is known; when the program forks with no task running and nothing queued, the
thread is stopped first (``stop_if_idle()``, from an at-fork hook), so that a pre-forking server
forks with no thread of bgtask's, and the next call starts it again.
"""

from __future__ import annotations

import heapq
import itertools
import os
import selectors
import threading
import time
from typing import Any, Callable, List, Optional, Tuple

from .._shared import forks
from . import offload as _offload

Callback = Callable[[], None]


class Timer:
    """A call scheduled with :meth:`Monitor.call_at`; ``cancel()`` drops it and what it holds."""

    __slots__ = ("_monitor", "fn", "when")

    def __init__(self, monitor: Monitor, when: float, fn: Callback) -> None:
        self._monitor = monitor
        self.when = when
        self.fn: Optional[Callback] = fn

    def cancel(self) -> None:
        """Drop the call, from any thread; nothing if it ran already."""
        self._monitor._cancel(self)


class Monitor:
    """The I/O thread of one process; created lazily, recreated in a forked child."""

    def __init__(self) -> None:
        self._selector = selectors.DefaultSelector()
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)
        self._selector.register(self._wake_r, selectors.EVENT_READ, None)
        # epoll and kqueue add a descriptor registered meanwhile to a wait in progress; the
        # others (poll, select, gevent's cooperative selector) only see it in the next wait.
        self._sees_new_readers = type(self._selector).__name__ in ("EpollSelector", "KqueueSelector")
        # Reentrant: a signal handler may start a task (which holds the monitor) while the
        # thread it interrupted is in here. What the lock guards is a list, a heap, counters.
        self._lock = threading.RLock()
        self._pending: List[Callback] = []
        self._timers: List[Tuple[float, int, Timer]] = []
        self._live_timers = 0
        self._seq = itertools.count()
        self._holds = 0
        self._thread: Optional[threading.Thread] = None
        self._stop_when_idle = False
        self.owner_pid = os.getpid()

    # -- called from any thread -------------------------------------------------------------

    def call_soon(self, fn: Callback) -> None:
        """Run ``fn`` in the monitor thread.

        At the interpreter's shutdown, where no thread can start any more (3.12), a stopped
        monitor cannot run it: it runs here, as no monitor thread exists to race with.
        """
        with self._lock:
            self._pending.append(fn)
            running = self._ensure_thread()
        if running:
            self._wake()
            return
        with self._lock:
            pending, self._pending = self._pending, []
        for call in pending:
            _guard(call)

    def call_and_wait(self, fn: Callable[[], Any]) -> Any:
        """Run ``fn`` in the monitor thread and return what it returns (at once, if called there).

        For the transitions of a task's state that start in another thread (``cancel()``, a
        stop while pending, a failed start): the monitor is their one writer.
        """
        if self.in_monitor_thread():
            return fn()
        done = threading.Event()
        outcome: List[Any] = []

        def run() -> None:
            try:
                outcome.append(fn())
            finally:
                done.set()

        self.call_soon(run)
        done.wait()
        return outcome[0] if outcome else None

    def call_at(self, when: float, fn: Callback) -> Timer:
        """Run ``fn`` in the monitor thread at ``time.monotonic() >= when``."""
        timer = Timer(self, when, fn)
        with self._lock:
            heapq.heappush(self._timers, (when, next(self._seq), timer))
            self._live_timers += 1
            self._ensure_thread()
        self._wake()
        return timer

    def _cancel(self, timer: Timer) -> None:
        with self._lock:
            if timer.fn is not None:
                timer.fn = None
                self._live_timers -= 1
                # Cancelled timers leave the heap when due; many long ones (a timeout= on
                # thousands of short tasks) are swept out once they are most of it.
                if len(self._timers) > 64 and self._live_timers * 2 < len(self._timers):
                    self._timers = [entry for entry in self._timers if entry[2].fn is not None]
                    heapq.heapify(self._timers)

    def hold(self) -> None:
        """Keep the thread running until :meth:`release` (one per started process)."""
        with self._lock:
            self._holds += 1
            self._ensure_thread()

    def release(self) -> None:
        # No wake-up: an idle thread is stopped only on request (stop_if_idle), which wakes it.
        with self._lock:
            self._holds -= 1

    def add_reader(self, fileobj: Any, handler: Callback, before: Optional[Callback] = None) -> None:
        """Call ``handler`` in the monitor thread whenever ``fileobj`` is readable.

        ``before`` runs first, under the lock that ``remove_reader`` takes: what it sets is in
        place before the handler can run, and the monitor cannot unregister the object before
        it is registered. With epoll and kqueue, registering needs no wake-up: the kernel adds
        the descriptor to the wait in progress.
        """
        with self._lock:
            if before is not None:
                before()
            self._selector.register(fileobj, selectors.EVENT_READ, handler)
        if not self._sees_new_readers:
            self._wake()

    def remove_reader(self, fileobj: Any) -> None:
        with self._lock:
            try:
                self._selector.unregister(fileobj)
            except (KeyError, ValueError):
                pass

    def in_monitor_thread(self) -> bool:
        return threading.current_thread() is self._thread

    def stop_if_idle(self, timeout: float) -> None:
        """Stop the thread and wait for it, if no task runs and no timer waits.

        Calls already queued run first (the zygote's release at the program's end, say).
        """
        with self._lock:
            thread = self._thread
            if thread is None or thread is threading.current_thread() or self._holds or self._live_timers:
                return
            self._stop_when_idle = True
        self._wake()
        thread.join(timeout)

    def _idle(self) -> bool:
        return not (self._holds or self._pending or self._live_timers)

    def _ensure_thread(self) -> bool:
        """Under the lock: start the thread if it is not running; ``False`` if it cannot."""
        self._stop_when_idle = False
        if self._thread is None:
            thread = threading.Thread(target=self._run, name="bgtask-monitor", daemon=True)
            _offload.monitor_thread = thread
            try:
                thread.start()
            except RuntimeError:  # "can't create new thread at interpreter shutdown"
                return False
            self._thread = thread
        return True

    def _wake(self) -> None:
        try:
            os.write(self._wake_w, b"\0")
        except BlockingIOError:
            pass  # already full of wake-ups

    # -- called in the monitor thread -------------------------------------------------------

    def _run(self) -> None:
        while True:
            self._step()
            with self._lock:
                if self._stop_when_idle and self._idle():
                    self._stop_when_idle = False
                    self._thread = None
                    return

    def _step(self) -> None:
        """One round: wait, then run handlers, queued calls and due timers.

        A method of its own so that its locals (the last callbacks, and the tasks they hold) go
        away after each round instead of staying alive until the next event.
        """
        with self._lock:
            timeout = None
            if self._timers:
                timeout = max(0.0, self._timers[0][0] - time.monotonic())
            if self._pending:
                timeout = 0.0
        try:
            events = self._selector.select(timeout)
        except Exception:  # never dies: every task's end depends on this thread
            import logging

            logging.getLogger("bgtask").exception("bgtask monitor: waiting for events failed")
            time.sleep(0.01)
            events = []
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
                timer = heapq.heappop(self._timers)[2]
                if timer.fn is not None:
                    due.append(timer.fn)
                    timer.fn = None
                    self._live_timers -= 1
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


def _guard(fn: Callback) -> None:
    """Run ``fn``; whatever it raises is logged, so that the monitor outlives anything."""
    try:
        fn()
    except BaseException:
        try:
            import logging

            logging.getLogger("bgtask").exception("bgtask monitor: unexpected error in %r", fn)
        except BaseException:
            pass


_monitor: Optional[Monitor] = None
_monitor_lock = threading.Lock()


def get() -> Monitor:
    """The monitor of this process, made on first use."""
    global _monitor
    monitor = _monitor
    if monitor is not None and monitor.owner_pid == os.getpid():
        return monitor
    with _monitor_lock:
        if _monitor is None or _monitor.owner_pid != os.getpid():
            _monitor = Monitor()
        return _monitor


def in_monitor_thread() -> bool:
    """Whether the caller runs in this process's monitor thread."""
    monitor = _monitor
    return monitor is not None and monitor.owner_pid == os.getpid() and monitor.in_monitor_thread()


# How long a fork, or the end of the program, waits for an idle monitor thread to end.
STOP_IDLE_S = 1.0


def stop_idle_thread() -> None:
    """End the monitor thread if it has nothing to do, and the offload threads that linger:
    before a fork, and at the program's end (so that no thread of bgtask's runs while the
    interpreter finalizes)."""
    monitor = _monitor
    if monitor is not None and monitor.owner_pid == os.getpid():
        monitor.stop_if_idle(STOP_IDLE_S)
        _offload.dismiss_idle(STOP_IDLE_S)


def forget_in_child() -> None:
    """After a fork: drop the parent's monitor (its thread does not exist here)."""
    global _monitor, _monitor_lock
    if _monitor is not None:
        _monitor.close_in_child()
    _monitor = None
    _monitor_lock = threading.Lock()  # another thread may have held it at the fork


forks.register(before=stop_idle_thread, after_in_child=forget_in_child, order=forks.MONITOR)
