"""The task side of the Ray backend: what runs on a Ray worker, and the stop board.

::

    main program ──run.remote(call, settings, board, key)──> Ray worker (its main thread)
        |                                                    run(): the call; its end returned as
        |                                                    (kind, body, pid, code, ready value,
        |                                                    messages posted), see _OnWorker.end
        |           run_stream (a Ray generator task) ───>   each item yielded (bytes), then the
        |                                                    end, as run() returns it
        +──board.ready(key) <──────── board.post_ready(key) ── bgtask.ready(value) in the task
        +──board.request(key)──> StopBoard actor ──wakes──> the task's stop watcher (a thread):
                                                             graceful: stop event set, or SIGUSR1
                                                             to its main thread, whose handler
                                                             raises the stop exception
        +──board.news(key, seen) <──── board.wait(key, pid) ── the task started; its watcher
        |     (the pid, messages,                               waits there for a stop
        |      the end)           <──── board.post(key, n, batch) ── log records, warnings
        +──board.release(key) when the task ended     board.release(key) as run() returns,
           otherwise (killed, its worker dead)        once its messages are on the board

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
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple, Union

from .._queue import on_ray as _queue_on_ray
from .._runtime.runner import run_call, run_steps, stopped
from .._shared import context as _taskctx
from .._shared import forks
from .._shared import logs as _logs
from .._shared import wire as _wire
from .._shared.context import Context, TaskState, atomic
from .._shared.stop import _StopRequest

# A task's end: its outcome message (kind, body), the worker's pid, its exit code, its ready()
# value, the number of messages it posted, and the large buffers of its return value.
_End = Tuple[int, bytes, int, int, Optional[bytes], int, List[Any]]

# How long a task's end waits for its messages to reach the board (a board that does not
# answer: the main program is gone).
POST_WAIT_S = 60.0

# Set while a task runs in this process: bgtask calls made by the task go to Ray as well.
in_task = False

# The signal a stop arrives by. Not SIGTERM: Ray's handler for it ends the worker.
STOP_SIGNAL = signal.SIGUSR1


class _Entry:
    __slots__ = ("ended", "messages", "news", "pid", "ready", "ready_body", "stop", "stopped")

    def __init__(self, asyncio: Any) -> None:
        self.stop = asyncio.Event()  # set by a stop request, or by the task's end
        self.stopped = False  # a stop was requested
        self.pid = -1
        self.ready = asyncio.Event()  # set by bgtask.ready() in the task, or by its end
        self.ready_body: Optional[bytes] = None
        self.messages: Dict[int, Tuple[int, bytes]] = {}  # by number: log records, warnings
        self.news = asyncio.Event()  # set when the pid, a message or the end is there
        self.ended = False


class StopBoard:
    """Where the main program asks its Ray tasks to stop, and learns where they run.

    Made an actor (async, so that thousands of waiting watchers cost one coroutine each) by the
    main program's side of the backend; every method takes the task's key. An async actor need
    not run calls in the order they were sent: a released key is remembered (the last
    ``ENDED_KEPT``), so a ``wait`` or ``news`` that arrives after its task's end returns at once
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
                entry.ended = True
                entry.stop.set()
                entry.news.set()
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
        entry.news.set()
        await entry.stop.wait()
        self._drop(key, entry)
        return entry.stopped

    async def post(self, key: str, first: int, messages: List[Tuple[int, bytes]]) -> None:
        """The task's messages (log records, warnings) numbered from ``first`` (the first
        message of the task is number 1)."""
        if key in self._ended:
            return  # too late: the main program heard of the end already
        entry = self._entry(key)
        for number, message in enumerate(messages, first):
            entry.messages[number] = message
        entry.news.set()

    async def news(self, key: str, seen: int, pid_known: bool) -> Tuple[int, List[Tuple[int, bytes]], bool]:
        """What the main program has not had yet, once there is something: the task's pid
        (-1 until it runs), its messages after number ``seen`` (in order, none missing), and
        whether the task ended (every message it posted is then in, or it never will be)."""
        entry = self._entry(key)
        while True:
            entry.news.clear()
            messages: List[Tuple[int, bytes]] = []
            while seen + 1 + len(messages) in entry.messages:
                messages.append(entry.messages.pop(seen + 1 + len(messages)))
            if entry.ended and entry.messages:  # none comes any more: what is there, in order
                messages.extend(entry.messages.pop(number) for number in sorted(entry.messages))
            if messages or entry.ended or (entry.pid > 0 and not pid_known):
                self._drop(key, entry)
                return entry.pid, messages, entry.ended
            await entry.news.wait()

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
        self._drop(key, entry)
        return entry.ready_body

    async def release(self, key: str) -> None:
        """The task ended (said by the task once its messages are in, or by the main program
        when it ended otherwise): wake what waits. The entry stays while messages wait for the
        main program; the last ``ENDED_KEPT`` ones at most."""
        self._ended[key] = True
        self._ended.move_to_end(key)
        while len(self._ended) > self.ENDED_KEPT:
            old, _ = self._ended.popitem(last=False)
            self._entries.pop(old, None)
        entry = self._entries.get(key)
        if entry is not None:
            entry.ended = True
            entry.stop.set()
            entry.news.set()
            entry.ready.set()
            self._drop(key, entry)

    def _drop(self, key: str, entry: _Entry) -> None:
        """Forget an ended task's entry once no message waits in it (the coroutines still
        waiting hold it)."""
        if entry.ended and not entry.messages and self._entries.get(key) is entry:
            del self._entries[key]


def session() -> Any:
    """The connection to Ray this process has: a new one after ``ray.shutdown()`` and
    ``ray.init()``, also to the same cluster (its session and this program's job there, read
    off Ray's worker, without importing Ray)."""
    worker = getattr(sys.modules.get("ray._private.worker"), "global_worker", None)
    cluster = getattr(getattr(worker, "node", None), "session_name", None) or id(worker)
    try:
        job = worker.current_job_id.hex() if worker is not None else None
    except Exception:  # another Ray release: the session alone
        job = None
    return cluster, job


_queue_on_ray.backend.session = session  # a queue on Ray is good for the session it was made on


def run(body: bytes, settings: Dict[str, Any], board: Any, key: str, views: List[Any]) -> _End:
    """Run one call on this Ray worker (``views``: its large buffers, carried by Ray's object
    store); its end, as ``_OnWorker.end`` gives it."""
    with _OnWorker(settings, board, key) as task:
        try:
            kind, sent, code = run_call(body, [], task.state, by_reference=False, views=(views, task.views))
            data = sent if isinstance(sent, bytes) else sent.body  # no descriptor: never WithFiles
        except _StopRequest as stop:
            kind, data, code = task.stopped(stop)
        task.context.run_at_end()  # a stop now raises nothing: the function is no longer running
    return task.end(kind, data, code)


def run_stream(
    body: bytes, settings: Dict[str, Any], board: Any, key: str, views: List[Any]
) -> Iterator[Union[bytes, _End]]:
    """``run`` for a generator function, as a Ray generator task: each item the function
    yields, pickled (bytes), as it comes; then the end, as ``run`` returns it (a tuple)."""
    with _OnWorker(settings, board, key) as task:
        state = task.state
        steps = run_steps(body, [], state, True, False, views=(views, task.views))
        try:
            try:
                item = next(steps)
                while True:
                    # Until Ray asks for the next item (it may wait for the program to read
                    # some first), Ray's code has this thread: a stop that comes then raises
                    # nothing there, and is raised in the stream once it goes on.
                    asked = state.stopping
                    state.running = False
                    yield item
                    state.running = True
                    if state.stopping and not asked and not state.cooperative:
                        item = steps.throw(_StopRequest())
                    else:
                        item = next(steps)
            except StopIteration as end:
                kind, sent, code = end.value
                data = sent if isinstance(sent, bytes) else sent.body
            finally:
                steps.close()
        except _StopRequest as stop:
            kind, data, code = task.stopped(stop)
        task.context.run_at_end()
    yield task.end(kind, data, code)


class _OnWorker:
    """One call on this Ray worker, from its start to its end: its stop state, its context, the
    watcher that turns a stop request into a signal; the worker is left as it was found."""

    def __init__(self, settings: Dict[str, Any], board: Any, key: str) -> None:
        import ray

        self._ray = ray
        self._board = board
        self._key = key
        self.pid = os.getpid()
        self._main = threading.get_ident()  # the call runs in the main thread (its handler needs it)
        self._stop_requested = board.wait.remote(key, self.pid)  # before release(): see StopBoard
        self.state = TaskState(settings["graceful"])  # "event": cooperative from its first line
        # Until the call is loaded: a worker outlives its task, and an import a stop tore halfway
        # would stay broken for every later task (C extensions do not load twice).
        self.state.running = False
        self._guard = threading.Lock()
        self._done = False
        self._readiness: List[bytes] = []
        self.views: List[Any] = []  # the return value's large buffers, out of band
        # No channel: readiness, log records and warnings go home through the board.
        self.context = Context(self.state, home=(_HOME, self._post))
        self._previous: Any = None
        # Messages for the board, numbered from 1 in the order they were made; one call to
        # the board at a time takes those made meanwhile (a call per record would flood it).
        self._posted = 0
        self._outbox: List[Tuple[int, bytes]] = []
        self._in_flight = False
        self._posting = threading.Condition(threading.RLock())  # a handler may log during a post
        self._logging = settings.get("logging")  # the main program's, for its relay
        self._name = settings["name"]
        self._give_back: Optional[Callable[[], None]] = None

    def __enter__(self) -> _OnWorker:
        global in_task, _running
        self._previous = (_taskctx.install(self.context), signal.signal(STOP_SIGNAL, _taskctx.on_stop_signal))
        in_task = True
        _running = self
        try:
            if self._logging is not None:
                self._give_back = _logs.borrow(
                    self._logging,
                    lambda body: self.context.send(_wire.LOG, body),
                    lambda body: self.context.send(_wire.WARNING, body),
                    self._name,
                )
            threading.Thread(target=self._watch, name="bgtask-stop-watch", daemon=True).start()
        except BaseException:
            self.__exit__()  # the worker as it was found, for its next task
            raise
        return self

    def __exit__(self, *exc_info: Any) -> None:
        global in_task, _running
        previous_context, previous_handler = self._previous
        try:
            with self._guard:
                self._done = True
        finally:
            try:
                signal.signal(STOP_SIGNAL, previous_handler)
            finally:
                _taskctx.install(previous_context)
                in_task = False
                _running = None
                _close_event(self.state)
                self.give_back_logging()
                with self._posting:  # on the board before the outcome is known
                    self._posting.wait_for(lambda: not self._in_flight, timeout=POST_WAIT_S)
                self._board.release.remote(self._key)

    def end(self, kind: int, data: bytes, code: int) -> _End:
        """What ``run`` returns: the outcome message, this process's pid, the exit code a task
        process would have had, the value given to ``bgtask.ready()``, and how many messages
        the task posted (the main program hands them on before the outcome)."""
        ready = self._readiness[0] if self._readiness else None
        return kind, data, self.pid, code, ready, self._posted, self.views

    def give_back_logging(self) -> None:
        give_back, self._give_back = self._give_back, None
        if give_back is not None:
            give_back()

    def stopped(self, stop: BaseException) -> Tuple[int, bytes, int]:
        """The end of a call the stop exception ended."""
        self.state.running_done()
        return _wire.STOPPED, stopped(stop), -signal.SIGTERM

    def _watch(self) -> None:
        try:
            stop = self._ray.get(self._stop_requested)
        except Exception:
            return
        with self._guard:
            if stop and not self._done:
                # To the main thread, where the call runs: not one of Ray's many threads, which
                # would leave it blocked in a system call until the grace ran out.
                signal.pthread_kill(self._main, STOP_SIGNAL)

    def _post(self, kind: int, body: bytes) -> None:
        if kind == _wire.READY:
            self._readiness.append(body)  # the result carries it too: known before the outcome
            self._ray.get(self._board.post_ready.remote(self._key, body))  # there before ready() returns
            return
        with atomic(), self._posting:  # a stop during the post: raised once it is out
            self._outbox.append((kind, body))
            if not self._in_flight:
                self._send_batch()

    def _send_batch(self) -> None:
        """Under ``_posting``: the messages waiting go to the board in one call."""
        batch, self._outbox = self._outbox, []
        first = self._posted + 1
        self._posted += len(batch)
        self._in_flight = True
        try:
            future = self._board.post.remote(self._key, first, batch).future()
        except Exception:  # the board is gone with the main program
            self._in_flight = False
            self._posting.notify_all()
            return
        future.add_done_callback(self._sent)

    def _sent(self, _future: Any) -> None:
        """In a thread of Ray's: the last batch is on the board; the next one goes."""
        with self._posting:
            self._in_flight = False
            if self._outbox:
                self._send_batch()
            else:
                self._posting.notify_all()


# What a task on Ray sends home, through the board.
_HOME = frozenset((_wire.READY, _wire.LOG, _wire.WARNING))
_running: Optional[_OnWorker] = None  # the task this worker runs now


def _forget_in_child() -> None:
    """In a process a Ray task forked: Ray's connection is not its own, so it logs as the worker
    does (its context sends nothing home, see ``Context.forked``)."""
    global _running
    task, _running = _running, None
    if task is not None:
        task.give_back_logging()


forks.register(after_in_child=_forget_in_child, order=forks.LAUNCHERS)


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
