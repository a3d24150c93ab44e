"""The task side of the Ray backend: what runs on a Ray worker, and the stop board.

::

    main program ──run.remote(call, settings, board, key)──> Ray worker (its main thread)
        |                                                    run(): the call, its outcome returned
        |                                                    as (kind, body, pid), as a local task
        |                                                    would send it
        +──board.ready(key) <──────── board.post_ready(key) ── bgtask.ready(value) in the task
        +──board.request(key)──> StopBoard actor ──wakes──> the task's stop watcher (a thread):
                                                             graceful: stop event set, or SIGUSR1
                                                             to its main thread, whose handler
                                                             raises the stop exception
        +──board.pid(key) <──────────── board.wait(key, pid) ── the task started; its watcher
        |                                                        waits there for a stop
        +──board.release(key) at the task's end ── and ── board.release(key) as run() returns

A Ray worker is reused from task to task, so a task leaves it as it found it: the SIGUSR1 handler
is put back, and the watcher can no longer send the signal, before ``run`` returns (a signal in
flight once the default handler is back would kill the worker). SIGTERM is Ray's own: it ends
the worker. The board is one async actor per main program; a waiting watcher costs it nothing.

This module is imported on Ray workers: it imports only the task side of bgtask, and Ray only
when its functions are called.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
from typing import Any, Dict, List, Optional, Tuple

from .._runtime.runner import run_call, stopped
from .._shared import context as _taskctx
from .._shared import wire as _wire
from .._shared.context import Context, TaskState
from .._shared.stop import _StopRequest

# Set while a task runs in this process: bgtask calls made by the task go to Ray as well.
in_task = False

# The signal a stop arrives by. Not SIGTERM: Ray's handler for it ends the worker.
STOP_SIGNAL = signal.SIGUSR1


class _Entry:
    __slots__ = ("pid", "ready", "ready_body", "started", "stop", "stopped")

    def __init__(self, asyncio: Any) -> None:
        self.stop = asyncio.Event()  # set by a stop request, or by the task's end
        self.stopped = False  # a stop was requested
        self.started = asyncio.Event()
        self.pid = -1
        self.ready = asyncio.Event()  # set by bgtask.ready() in the task, or by its end
        self.ready_body: Optional[bytes] = None


class StopBoard:
    """Where the main program asks its Ray tasks to stop, and learns where they run.

    Made an actor (async, so that thousands of waiting watchers cost one coroutine each) by the
    main program's side of the backend; every method takes the task's key. An async actor need
    not run calls in the order they were sent: a released key is remembered (the last
    ``ENDED_KEPT``), so a ``wait`` or ``pid`` that arrives after its task's end returns at once
    instead of waiting for ever.
    """

    ENDED_KEPT = 100_000

    def __init__(self) -> None:
        import asyncio
        import collections

        self._asyncio = asyncio
        self._entries: Dict[str, _Entry] = {}
        self._ended: Any = collections.OrderedDict()

    def _entry(self, key: str) -> _Entry:
        entry = self._entries.get(key)
        if entry is None:
            entry = self._entries[key] = _Entry(self._asyncio)
            if key in self._ended:  # its end came first: nothing will wake it otherwise
                entry.stop.set()
                entry.started.set()
                entry.ready.set()
        return entry

    async def request(self, key: str) -> None:
        """The main program asks the task to stop."""
        if key in self._ended:
            return
        entry = self._entry(key)
        entry.stopped = True
        entry.stop.set()

    async def wait(self, key: str, pid: int) -> bool:
        """The task started in process ``pid``, and its watcher waits here: ``True`` to stop,
        ``False`` when the task ended first. (One call for both: each call to the board costs
        about as much as a whole plain Ray task.)"""
        entry = self._entry(key)
        entry.pid = pid
        entry.started.set()
        await entry.stop.wait()
        self._forget(key)
        return entry.stopped

    async def pid(self, key: str) -> int:
        """The task's worker pid once it runs; -1 if it ended without running."""
        entry = self._entry(key)
        await entry.started.wait()
        self._forget(key)
        return entry.pid

    async def post_ready(self, key: str, body: bytes) -> None:
        """The task called ``bgtask.ready()``: its value, pickled."""
        if key in self._ended:
            return
        entry = self._entry(key)
        entry.ready_body = body
        entry.ready.set()

    async def ready(self, key: str) -> Optional[bytes]:
        """The value the task passed to ``bgtask.ready()``, once it did; ``None`` if it ended
        first (the task's result then carries the value, if it had one)."""
        entry = self._entry(key)
        await entry.ready.wait()
        return entry.ready_body

    async def release(self, key: str) -> None:
        """The task ended (said by the task, and by the main program): wake what waits."""
        self._ended[key] = True
        self._ended.move_to_end(key)
        while len(self._ended) > self.ENDED_KEPT:
            self._ended.popitem(last=False)
        entry = self._entries.get(key)
        if entry is not None:
            entry.stop.set()
            entry.started.set()
            entry.ready.set()
            self._forget(key)

    def _forget(self, key: str) -> None:
        """Drop an ended task's entry (the coroutines still waiting hold it)."""
        if key in self._ended:
            self._entries.pop(key, None)


def session() -> Any:
    """The Ray session this process is connected to: a new one after ``ray.shutdown()`` and
    ``ray.init()`` (read off Ray's worker, without importing Ray)."""
    worker = getattr(sys.modules.get("ray._private.worker"), "global_worker", None)
    return getattr(getattr(worker, "node", None), "session_name", None) or id(worker)


def run(
    body: bytes, settings: Dict[str, Any], board: Any, key: str
) -> Tuple[int, bytes, int, int, Optional[bytes]]:
    """Run one call on this Ray worker: its outcome message, this process's pid, the exit code
    a task process of its own would have had, and what it passed to ``bgtask.ready()``."""
    global in_task
    import ray

    pid = os.getpid()
    main = threading.get_ident()  # run() runs in the main thread (its signal handler needs it)
    stop_requested = board.wait.remote(key, pid)  # submitted before release(): see StopBoard
    state = TaskState(settings["graceful"])  # "event": a cooperative task from its first line
    # Until the call is loaded: a worker outlives its task, and an import a stop tore halfway
    # would stay broken for every later task (C extensions do not load twice).
    state.running = False
    guard = threading.Lock()
    done = [False]

    def watch() -> None:
        try:
            stop = ray.get(stop_requested)
        except Exception:
            return
        with guard:
            if stop and not done[0]:
                # To the main thread, where run() waits: not one of Ray's many threads, which
                # would leave it blocked in a system call until the grace ran out.
                signal.pthread_kill(main, STOP_SIGNAL)

    readiness: List[bytes] = []

    def post_ready(kind: int, body: bytes) -> None:
        readiness.append(body)  # the result carries it too: it is known before the outcome
        ray.get(board.post_ready.remote(key, body))  # there before ready() returns

    # No channel: only readiness goes home, through the board.
    context = Context(state, home=(frozenset((_wire.READY,)), post_ready))
    previous_context = _taskctx.install(context)
    previous_handler = signal.signal(STOP_SIGNAL, _taskctx.on_stop_signal)
    in_task = True
    try:
        threading.Thread(target=watch, name="bgtask-stop-watch", daemon=True).start()
        try:
            kind, sent, code = run_call(body, [], state, by_reference=False)
            data = sent if isinstance(sent, bytes) else sent.body  # no descriptor: never WithFiles
        except _StopRequest as stop:
            state.running_done()
            kind, data, code = _wire.STOPPED, stopped(stop), -signal.SIGTERM
        context.run_at_end()  # a stop now raises nothing: the function is no longer running
    finally:
        try:
            with guard:
                done[0] = True
        finally:
            try:
                signal.signal(STOP_SIGNAL, previous_handler)
            finally:
                _taskctx.install(previous_context)
                in_task = False
                _close_event(state)
                board.release.remote(key)
    return kind, data, pid, code, readiness[0] if readiness else None


def _close_event(state: TaskState) -> None:
    """The stop event's pipe: a worker runs task after task, and must not collect them."""
    event = state.event
    for fd in (event._r, event._w):
        if fd >= 0:
            try:
                os.close(fd)
            except OSError:
                pass
    event._r = event._w = -1
