"""The offload threads: where the main program runs what must not run in the monitor thread.

::

    monitor thread (ends tasks) ──post()──> callbacks: done-callbacks, in order (user code:
                                              may wait, start tasks, unpickle a slow result)
                                 ──post()──> starts: pending tasks' starts, in order (a
                                              Limiter's place freed; a task started from the
                                              monitor thread, or from a signal handler that
                                              interrupted a start)

Two threads, not one: a callback may wait for a task whose start is queued, and a start never
waits for a callback.

The monitor never waits for anything a task's end depends on: a start may wait for the
zygote's next spare, which reaches the program through the monitor, and a callback may do
anything. The thread runs while there is work, and lingers ``LINGER_S`` for more (a map's
tasks each free a place for the next start: one thread for them all, not one per start); asked
to go (``dismiss_idle``: before a fork, at the program's end), it ends as soon as it has
nothing to do. At the interpreter's shutdown, where no thread can start (CPython 3.12.0 and
3.12.1 refuse it in ``atexit``), the work posted from the monitor waits until the exit
procedure runs it in the main thread (``run_stranded``); work posted from any other thread
runs there and then.
"""

from __future__ import annotations

import collections
import threading
from typing import Callable, Deque, Optional

from .._shared import forks

Work = Callable[[], None]

# How long an offload thread with nothing to do waits for more before it ends.
LINGER_S = 0.5


class _Offload:
    """One queue of work and the thread that runs it, only while there is some."""

    def __init__(self, name: str) -> None:
        self.name = name
        # Reentrant: a signal handler may post while this thread is in here; never held
        # while a thread starts (see post()).
        self.lock = threading.RLock()
        self.more = threading.Condition(self.lock)  # work was posted, or the thread may go
        self.leaving = False  # asked to end once nothing is queued (dismiss_idle)
        self.lingering = False  # the thread waits for more work
        self.queue: Deque[Work] = collections.deque()
        self.thread: Optional[threading.Thread] = None  # set by the thread itself
        self.spawning = False  # a thread is being started: it will take what is queued
        self.stranded = False  # work waits that no thread could be started for

    def post(self, work: Work, inline: bool = True) -> None:
        """Run ``work`` in the offload thread, after what was posted before it.

        Where no thread can be started, the work runs here and now if ``inline`` (and this is
        not the monitor thread); else it waits (``stranded``) for a thread that can run it:
        the next post's, the end of the start it interrupted, or the exit procedure. A signal
        handler may post while this thread is in here: nothing is held while a thread starts.
        """
        with self.lock:
            self.queue.append(work)
            if self.thread is not None or self.spawning:
                self.more.notify()  # that thread takes it (it may be lingering)
                return
            self.spawning = True
        thread = threading.Thread(target=self._run, name=self.name, daemon=True)
        try:
            thread.start()
        except RuntimeError:  # no thread left, or the interpreter is shutting down
            with self.lock:
                self.spawning = False
                self.stranded = True
            if inline and not in_monitor_thread():
                self.run_stranded()

    def run_stranded(self) -> None:
        """Run, in this thread, the work no offload thread could be started for."""
        while True:
            with self.lock:
                if self.thread is not None or self.spawning or not self.queue:
                    self.stranded = False
                    return
                work = self.queue.popleft()
            _guard(work)

    def _run(self) -> None:
        with self.lock:
            self.thread = threading.current_thread()
            self.spawning = False
        while True:
            with self.lock:
                if not self.queue and not self.leaving:
                    self.lingering = True
                    self.more.wait(LINGER_S)
                    self.lingering = False
                if not self.queue:
                    self.thread = None
                    self.leaving = False
                    return
                work = self.queue.popleft()
            _guard(work)
            del work  # not kept alive (with the task it holds) while the thread waits

    def dismiss_idle(self, timeout: float) -> None:
        """End the thread as soon as it has nothing to do, rather than after it lingered: now
        if it lingers (waited for), else once its queue is empty (not waited for)."""
        with self.lock:
            thread = self.thread
            if thread is None or thread is threading.current_thread():
                return
            self.leaving = True
            self.more.notify()
            lingering = self.lingering
        if lingering:
            thread.join(timeout)

    def forget_in_child(self) -> None:
        self.lock = threading.RLock()
        self.more = threading.Condition(self.lock)
        self.leaving = False
        self.lingering = False
        self.queue.clear()
        self.thread = None
        self.spawning = False
        self.stranded = False


def _guard(work: Work) -> None:
    try:
        work()
    except BaseException:  # noqa: BLE001 (the thread serves every task: log and go on)
        try:
            import logging

            logging.getLogger("bgtask").exception("bgtask: unexpected error in %r", work)
        except BaseException:  # noqa: BLE001
            pass


# The monitor's thread, set by the monitor: whether a start must be handed over is decided
# without importing the monitor (a signal handler may find it half imported).
monitor_thread: Optional[threading.Thread] = None


def in_monitor_thread() -> bool:
    return threading.current_thread() is monitor_thread


callbacks = _Offload("bgtask-callbacks")
starts = _Offload("bgtask-starts")


def stranded() -> bool:
    """Whether work waits for the main thread (see ``run_stranded``)."""
    return callbacks.stranded or starts.stranded


def run_stranded() -> None:
    """In the main thread, at the exit procedure: the work no thread could be started for."""
    starts.run_stranded()
    callbacks.run_stranded()


def forget_in_child() -> None:
    """In a forked copy: the queued work and the threads are the original's."""
    global monitor_thread
    monitor_thread = None
    callbacks.forget_in_child()
    starts.forget_in_child()


forks.register(after_in_child=forget_in_child, order=forks.OFFLOAD)


def dismiss_idle(timeout: float) -> None:
    """End both threads as soon as they have nothing to do (see ``_Offload.dismiss_idle``)."""
    for offload in (callbacks, starts):
        offload.dismiss_idle(timeout)
