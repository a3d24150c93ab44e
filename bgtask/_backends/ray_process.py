"""A task on Ray, followed by the main program as a ``TaskProcess`` is (see ``_monitor.process``).

::

    RayProcess, in the monitor thread
        ref.future() done ──> outcome (kind, body, pid, code) ──> task._ended()
        a stream: _Streams' thread awaits each item ──> task._item_sent(), the next one once
          the program read (resume()); then the outcome
        board.news(key) done ──> task._pid_known(pid); log records and warnings handed on;
          asked again until the end, which waits for the messages posted before it
        signal(SIGTERM, grace) ──> board.request(key) (the task stops itself)
        signal(SIGKILL) or grace over ──> ray.cancel(force=True, recursive=True)
"""

from __future__ import annotations

import concurrent.futures
import functools
import pickle
import signal
import threading
import time
from typing import Any, Callable, List, Optional, Tuple

from .._monitor import loop as _monitor
from .._monitor.process import _NOBODY, Consumer, handle_record, reissue_warning
from .._shared import forks
from .._shared import wire as _wire
from .._shared.buffers import Mapped
from .._shared.errors import BgTaskError
from . import ray_worker as _ray_task


class RayProcess:
    """A task submitted to Ray, followed as a ``TaskProcess`` is (see ``_monitor.process``).

    Every field is the monitor thread's once ``watch()`` handed the record over; Ray's own
    callback thread only schedules work there.
    """

    def __init__(self, ray: Any, ref: Any, board: Any, key: str, stream: bool = False) -> None:
        self.pid: Optional[int] = None  # the worker's, once it runs (a Ray worker may be elsewhere)
        self._stream = stream  # ``ref`` is then the ObjectRefGenerator of a Ray generator task
        self._wake: Optional[concurrent.futures.Future[None]] = None  # set: the pump goes on
        self._draining = False  # a stop was asked for: the pump takes every item as it comes
        self.keep: Any = ()
        self.done = False
        self._ray = ray
        self._ref = ref
        self._board = board
        self._key = key
        self._consumer: Optional[Consumer] = None
        self._requested = 0
        self._escalation: Optional[_monitor.Timer] = None
        self._asked_ready = False
        # The task's messages (log records, warnings), from the board: how many were handed
        # on, whether a call for more is out, whether the board said the task ended; an end
        # that waits for the messages posted before it: (posted or None, end).
        self._seen = 0
        self._polling = False
        self._all_in = False
        self._held: Optional[Tuple[Optional[int], Callable[[], None]]] = None
        self._released = False  # the board was told the task ended
        self._monitor = _monitor.get()
        self._monitor.hold()

    def watch(self, consumer: Consumer) -> None:
        monitor = self._monitor

        def hand_over() -> None:
            self._consumer = consumer
            if self._ref is None:
                return  # discarded meanwhile
            if self._stream:
                _streams.pump(self._pump(self._ref))
            else:
                self._ref.future().add_done_callback(
                    lambda f: monitor.call_soon(lambda: self._finished(f.result))
                )
            self._poll()
            if getattr(consumer, "_ready_wanted", False):  # waited for while it was pending
                self._want_ready()

        monitor.call_soon(hand_over)

    def signal(self, signum: int, escalate_after: Optional[float] = None) -> None:
        self._monitor.call_soon(lambda: self._signal(signum, escalate_after))

    def discard(self) -> None:
        self.done = True
        self._end()

    def resume(self) -> None:
        """The program read a stream's items: its pump takes the next ones from Ray."""
        self._monitor.call_soon(self._go_on)

    def want_ready(self) -> None:
        """Someone waits for the task's ``bgtask.ready()``: ask the board, once."""
        self._monitor.call_soon(self._want_ready)

    def block(self, timeout: Optional[float]) -> None:
        """Wait for the task's end inside a Ray task: ``ray.wait`` lends this task's CPU out."""
        ref = self._ref
        if ref is not None and _ray_task.in_task:
            self._ray.wait([ref.completed() if self._stream else ref], timeout=timeout)

    def abandon(self) -> None:
        self.watch(_NOBODY)
        self.signal(signal.SIGKILL)

    # -- in the monitor thread ----------------------------------------------------------------

    def _want_ready(self) -> None:
        if self._asked_ready or self.done or self._consumer is None:
            return
        self._asked_ready = True
        monitor = self._monitor
        try:
            future = self._board.ready.remote(self._key).future()
        except Exception:  # noqa: BLE001 (the cluster is gone: the end will tell)
            return
        future.add_done_callback(lambda f: monitor.call_soon(lambda: self._ready_known(f)))

    def _ready_known(self, future: Any) -> None:
        try:
            body = future.result()
        except Exception:  # noqa: BLE001 (the board is gone with the cluster)
            return
        if body is not None and self._consumer is not None and not self.done:
            self._consumer._ready_sent(body)

    def _poll(self) -> None:
        """Ask the board for what is new: the pid, messages, the end (one call out at a time)."""
        monitor = self._monitor
        try:
            future = self._board.news.remote(self._key, self._seen, self.pid is not None).future()
        except Exception:  # noqa: BLE001 (the cluster is gone: nothing more comes)
            self._news_over()
            return
        self._polling = True
        future.add_done_callback(lambda f: monitor.call_soon(lambda: self._news(f)))

    def _news(self, future: Any) -> None:
        self._polling = False
        try:
            pid, messages, ended = future.result()
        except Exception:  # noqa: BLE001 (the board is gone with the cluster)
            self._news_over()
            return
        if pid > 0 and self.pid is None:
            self.pid = pid
            if self._consumer is not None and not self.done:
                self._consumer._pid_known(pid)
        for kind, body in messages:
            self._seen += 1
            if kind == _wire.LOG:
                handle_record(body)
            elif kind == _wire.WARNING:
                reissue_warning(body)
        if ended:
            self._news_over()
            return
        held = self._held
        if held is not None and held[0] is not None and self._seen >= held[0]:
            self._held = None
            held[1]()
        if not self.done:
            self._poll()

    def _news_over(self) -> None:
        """Every message the task posted is in (or never will be): a held end goes on."""
        self._all_in = True
        held, self._held = self._held, None
        if held is not None:
            held[1]()

    def _signal(self, signum: int, escalate_after: Optional[float]) -> None:
        if self.done:
            return
        # A stream held back by a slow reader is no longer: Ray resumes the generator only for
        # an item taken, and the stop is seen there (it may come after the next item or two).
        self._draining = True
        self._go_on()
        try:
            if signum == signal.SIGKILL:
                self._requested = signal.SIGKILL
                self._ray.cancel(self._ref, force=True, recursive=True)
            elif signum:
                self._requested = self._requested or signum
                self._board.request.remote(self._key)
        except Exception:  # noqa: BLE001 (the task already ended, or the cluster is gone)
            pass
        if escalate_after is not None and self._escalation is None:
            self._escalation = self._monitor.call_at(
                time.monotonic() + escalate_after, lambda: self._signal(signal.SIGKILL, None)
            )

    async def _pump(self, items: Any) -> None:
        """In the streams' thread: a stream task's items to the monitor, in order, then its end.

        Each item waits for the monitor to take it; one that leaves too much unread (see
        ``_main.stream``) holds the next ones in Ray until the program reads: Ray then holds the
        task once it is ``STREAM_AHEAD`` items ahead.
        """
        import asyncio

        monitor = self._monitor
        end: Callable[[], Any] = _no_end
        try:
            async for ref in items:
                value = await ref
                if not isinstance(value, bytes):  # the end, as run() returns it
                    end = functools.partial(_given, value)
                    break
                taken: concurrent.futures.Future[Any] = concurrent.futures.Future()
                monitor.call_soon(functools.partial(self._item, value, taken))
                wake = await asyncio.wrap_future(taken)
                if wake is not None:
                    await asyncio.wrap_future(wake)
        except BaseException as exc:  # noqa: BLE001 (whatever Ray raises is this task's end)
            end = functools.partial(_raise, exc)
        monitor.call_soon(lambda: self._finished(end))

    def _item(self, body: bytes, taken: concurrent.futures.Future[Any]) -> None:
        wake = None
        consumer = self._consumer
        if not self.done and consumer is not None and consumer._item_sent(body) and not self._draining:
            wake = self._wake = self._wake or concurrent.futures.Future()
        taken.set_result(wake)

    def _go_on(self) -> None:
        wake, self._wake = self._wake, None
        if wake is not None:
            wake.set_result(None)

    def _finished(self, outcome: Callable[[], Any]) -> None:
        """The task's end came from Ray. It is handed on once the messages the task posted
        before it are: their number comes with the end; a task that ended otherwise (killed,
        its worker dead) posted what the board has once it is told of the end."""
        self._go_on()  # a stream's pump waiting for the program goes on, to its end
        if self.done or self._consumer is None or self._held is not None:
            return
        messages: List[Tuple[int, Any]] = []
        exitcode: Optional[int] = None
        ready = pid = posted = None
        try:
            kind, body, pid, exitcode, ready, posted, views = outcome()
            self._released = True  # the worker tells the board itself
            if self._requested == signal.SIGKILL:
                # Killed: Ray cancels the task's own calls (to a queue, to its tasks) before it
                # ends the task, which may report what that did to it first. It was killed.
                exitcode = -signal.SIGKILL
            else:
                if views:  # a return value's large buffers, in Ray's object store
                    body = Mapped(body, views)
                messages.append((kind, body))
        except BaseException as exc:  # noqa: BLE001 (whatever Ray raises is this task's end)
            exitcode, message = self._describe(exc)
            if message is not None:
                messages.append((_wire.EXITED, pickle.dumps(message, pickle.HIGHEST_PROTOCOL)))
            self._release()

        def end() -> None:
            consumer = self._consumer
            if self.done or consumer is None:
                return
            if pid is not None and self.pid is None:
                self.pid = pid
                consumer._pid_known(pid)
            if ready is not None:
                consumer._ready_sent(ready)  # before the outcome, as on a task's channel
            self.done = True
            self._end()
            if messages and messages[0][0] in _wire.EARLY:
                consumer._outcome_sent(*messages[0])
            consumer._ended(exitcode, messages, False, None)
            self._consumer = None

        if self._all_in or not self._polling or (posted is not None and self._seen >= posted):
            end()
        else:
            self._held = (posted, end)

    def _describe(self, exc: BaseException) -> Tuple[Optional[int], Optional[str]]:
        """(exit code, what to tell) for a task that ended without an outcome of its own."""
        exceptions = self._ray.exceptions
        killed = (exceptions.TaskCancelledError, exceptions.WorkerCrashedError)
        if isinstance(exc, killed) and self._requested == signal.SIGKILL:
            return -signal.SIGKILL, None  # killed by stop(), kill() or a timeout: "stopped"
        if isinstance(exc, exceptions.WorkerCrashedError):
            return None, "the Ray worker running it died (WorkerCrashedError: no exit code on Ray)"
        if isinstance(exc, exceptions.TaskCancelledError):
            return None, "it was cancelled from outside bgtask (ray.cancel)"
        if isinstance(exc, exceptions.RayTaskError):
            cause = getattr(exc, "cause", exc)
            return None, f"bgtask's runner failed on the Ray worker: {type(cause).__name__}: {cause}"
        return None, f"Ray reported {type(exc).__name__}: {exc}"

    def _end(self) -> None:
        self._ref = None  # the result stays in Ray's object store while a reference lives
        self.keep = ()  # what its call must keep alive while it runs (queues on Ray)
        self._go_on()
        if self._escalation is not None:
            self._escalation.cancel()
            self._escalation = None
        self._release()
        self._monitor.release()

    def _release(self) -> None:
        """Tell the board the task ended, unless the task did: what waits there returns."""
        if not self._released:
            self._released = True
            try:
                self._board.release.remote(self._key)
            except Exception:  # noqa: BLE001 (the cluster is gone)
                pass


def _no_end() -> Any:
    raise BgTaskError("Ray ended the stream without the task's end")


def _given(value: Any) -> Any:
    return value


def _raise(exc: BaseException) -> Any:
    raise exc


class _Streams:
    """The one thread (an asyncio loop, started with the first stream) that takes the items of
    every stream task on Ray from Ray, as they come: Ray's generators are awaited there."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._loop: Any = None

    def pump(self, coroutine: Any) -> None:
        import asyncio

        with self._lock:
            if self._loop is None:
                loop = asyncio.new_event_loop()
                threading.Thread(target=loop.run_forever, name="bgtask-ray-streams", daemon=True).start()
                self._loop = loop
            loop = self._loop
        asyncio.run_coroutine_threadsafe(coroutine, loop)

    def forget_in_child(self) -> None:
        self._lock = threading.Lock()
        self._loop = None  # its thread is not in the copy


_streams = _Streams()


forks.register(after_in_child=_streams.forget_in_child, order=forks.LAUNCHERS)
