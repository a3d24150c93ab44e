"""The task side's one context, and the one rule for a message: it goes out whole.

::

    task runtime (_runtime.child: a task     install(Context(state, channel, parent_pid))
    process; _backends.ray_worker: Ray)      ───────────────────────────────> current
                                                                                 │
    Queue, ready(), the logging relay  ── current.send() / forward() / parent_fd() ┘
    anything with a critical section   ── with atomic(): ...

``atomic()`` is the only way bgtask keeps a message (or a count that goes with it) whole: in
the main thread, a stop of a graceful task (SIGTERM, or SIGUSR1 on Ray) and a Ctrl-C that come
during the block are raised at its end instead. Signals run their Python handlers in the main
thread only, so other threads need nothing.

``Context.send`` is safe from a signal handler that interrupts another send in the same thread
(a handler that logs): the nested message waits until the outer one is out, then follows it.

Both sides import this module: the task runtimes fill the context, and the main program uses
``atomic()`` around its own messages. It imports only what is shared (the stop event, the wire
format, the platform, the fork hooks).
"""

from __future__ import annotations

import collections
import fcntl
import os
import signal
import socket
import sys
import threading
from typing import Any, Callable, Deque, FrozenSet, List, Optional, Set, Tuple, Union

from . import forks, is_bgtask_file, platform
from . import wire as _wire
from .stop import StopEvent, _StopRequest


def _c_signal() -> Tuple[Callable[[int, Any], Any], Callable[[int], Any]]:
    """``signal.signal`` and ``getsignal`` without their conversions to and from enums.

    Those touch memory a task would otherwise share with its zygote, and ``atomic()`` calls
    them twice per message.
    """
    try:
        import _signal  # type: ignore[import-not-found]
    except ImportError:  # not CPython
        return signal.signal, signal.getsignal
    return _signal.signal, _signal.getsignal


set_handler, get_handler = _c_signal()
_SIGINT = int(signal.SIGINT)


class TaskState:
    """What the running task knows about its stop; one per task (per call, on a Ray worker)."""

    __slots__ = ("atomic", "call", "cooperative", "event", "graceful", "pending", "running", "stopping")

    def __init__(self, graceful: Any) -> None:
        self.event = StopEvent()
        # The task asked for its stop event (or said so at decoration: graceful="event").
        self.cooperative = graceful == "event"
        if self.cooperative:
            self.event._open()
        self.stopping = False  # a stop was requested
        self.running = True  # the function has not returned yet: a stop may still be raised
        self.graceful = bool(graceful)
        self.call: Any = None  # the task's function, once loaded (see _runtime.runner)
        self.atomic = False  # the main thread is inside atomic(): a stop waits for its end
        self.pending = False  # a stop came meanwhile: raised at the end of the block

    def running_done(self) -> None:
        """Mark the function as returned: from now on a stop request raises nothing."""
        self.running = False

    def on_stop(self) -> None:
        """A stop request arrived (in the main thread, from a signal handler).

        The stop event is set; the stop exception is raised unless the task asked for its
        event, or the function returned, or (then at the end of the block) ``atomic()`` runs.
        """
        first = not self.stopping
        self.stopping = True
        self.event._set()
        if first and self.running and not self.cooperative:
            if self.atomic:
                self.pending = True
            else:
                raise _StopRequest()


class Context:
    """What a task's code may use of its runtime: its stop state and its channel home.

    ``channel`` is ``None`` where there is none (a Ray worker, or a process the task forked):
    ``send`` then sends nothing and ``has_channel`` is ``False``, except the kinds ``home``
    takes ``(kinds, send)``: on a Ray worker, readiness goes to the stop board.
    """

    __slots__ = (
        "_later",
        "_lock",
        "_peers_lock",
        "_writing",
        "at_end",
        "channel",
        "helpers",
        "home",
        "log_channel",
        "parent_pid",
        "ready_sent",
        "state",
    )

    def __init__(
        self,
        state: TaskState,
        channel: Optional[socket.socket] = None,
        parent_pid: int = 0,
        home: Optional[Tuple[FrozenSet[int], Callable[[int, bytes], None]]] = None,
    ) -> None:
        self.state = state
        self.channel = channel
        self.home = home
        self.ready_sent = False  # bgtask.ready() was called (once per task)
        self.parent_pid = parent_pid
        # Reentrant, with messages that arrive during a send queued behind it: a signal handler
        # that logs while the same thread sends must neither deadlock nor cut into a message.
        self._lock = threading.RLock()
        self._writing = False
        self._later: Deque[Tuple[int, Any]] = collections.deque()
        # Where log records go: the channel in the task; in a process the task forked, the same
        # channel, for records only (``forked``). Once the task forks, each message goes out
        # under a lockf lock on this file, shared with the forked processes: whole, never cut
        # into by a record of theirs.
        self.log_channel = channel
        self._peers_lock = -1
        # Run by the runtime once the function returned, before the task reports its end is
        # complete: the main side adds the end of the tasks this task started (_main.lifecycle).
        self.at_end: List[Callable[[], None]] = []
        # Processes of bgtask's this task started (its own zygote): spared at its end.
        self.helpers: Set[int] = set()

    def run_at_end(self) -> None:
        for hook in self.at_end:
            hook()

    @property
    def has_channel(self) -> bool:
        return self.channel is not None

    def can_send(self, kind: int) -> bool:
        """Whether a message of ``kind`` reaches the main program from here."""
        return self.channel is not None or (self.home is not None and kind in self.home[0])

    def send(self, kind: int, body: Union[bytes, _wire.WithFiles]) -> None:
        """Send one message home, whole; nothing if the main program is gone. The descriptors
        of a ``WithFiles`` body go with it, and are closed."""
        try:
            self._send(kind, body)
        except OSError:  # the main program is gone (BrokenPipeError) or closed our channel
            if isinstance(body, _wire.WithFiles):
                _close_files(body)

    def forward(self, body: bytes) -> None:
        """Send a queue's items home (a QUEUED message), whole.

        Raises:
            OSError: the main program is gone, or this process has no channel.
        """
        self._send(_wire.QUEUED, body)

    def _send(self, kind: int, body: Union[bytes, _wire.WithFiles]) -> None:
        channel = self.log_channel if kind in _TO_PEERS else self.channel
        if channel is None:
            if self.home is not None and kind in self.home[0] and isinstance(body, bytes):
                self.home[1](kind, body)
                return
            raise BrokenPipeError("this process has no channel to a main program")
        with atomic(), self._lock:
            if self._writing:  # a signal handler interrupted this thread's own send
                self._later.append((kind, body))
                return
            self._writing = True
            locked = self._peers_lock
            try:
                if locked >= 0:
                    fcntl.lockf(locked, fcntl.LOCK_EX)
                _send_one(channel, kind, body)
                while self._later:
                    _send_one(channel, *self._later.popleft())
            finally:
                self._writing = False
                if locked >= 0:
                    fcntl.lockf(locked, fcntl.LOCK_UN)

    def before_fork(self) -> None:
        """The task forks: from now on, messages go out under the lock it shares with its
        forked processes, which relay their log records on its channel."""
        if self._peers_lock < 0 and self.log_channel is not None:
            try:
                self._peers_lock = platform.memory_file("bgtask-channel-lock")
            except OSError:
                self.log_channel = None  # no lock, no sharing: the forked processes stay quiet

    def parent_fd(self) -> Optional[int]:
        """The channel's descriptor: readable once the main program is gone; ``None`` if none."""
        channel = self.channel
        if channel is None:
            return None
        try:
            fd = channel.fileno()
        except OSError:
            return None
        return fd if fd >= 0 else None

    def forked(self) -> None:
        """In a process the task forked: it is not the task (no ``ready()``, no queue
        forwarding, no outcome) and holds no lock another thread held; its log records still go
        to the main program, on the task's channel, under the lock shared with the task."""
        self.channel = None
        self.home = None  # a Ray task's board: the task's own, reached through Ray's connection
        self._lock = threading.RLock()
        self._writing = False
        self._later.clear()


# What the processes a task forks send home on its channel: log records and warnings.
_TO_PEERS = frozenset((_wire.LOG, _wire.WARNING))

current: Optional[Context] = None


def install(context: Optional[Context]) -> Optional[Context]:
    """Make ``context`` this process's (``None``: not a task); returns the one it replaces.

    A stop that came before (``_early_stop``) is the task's from the start: its event is set,
    and the runner does not start a function that did not ask for the event.
    """
    global current, _early_stop
    previous, current = current, context
    if context is not None and _early_stop:
        _early_stop = False
        if not context.state.graceful:
            # Not a stop bgtask asked for (it kills such a task with SIGKILL): a SIGTERM from
            # outside, which ends the process as it would have without the handler.
            _die_by_sigterm()
        context.state.stopping = True
        context.state.event._set()
    return previous


def stop_event() -> StopEvent:
    """Return the stop event of the task this code runs in.

    Calling it tells bgtask that the task stops cooperatively: when it is asked to stop, the event
    is set and no exception is raised into it. A task that never calls it gets an exception raised
    inside it instead, so its ``finally`` and ``with`` blocks run.

    Raises:
        BgTaskError: when called outside a task started by bgtask.
    """
    context = current
    if context is None:
        from .errors import BgTaskError

        raise BgTaskError(
            "stop_event() was called outside a bgtask task; it is only available in the process "
            "of a function decorated with @background"
        )
    state = context.state
    state.event._open()  # before the task counts as cooperative: a stop then always wakes it
    state.cooperative = True
    return state.event


stop_event.__module__ = "bgtask"


def on_stop_signal(signum: int, frame: Any) -> None:
    """The handler of the signal a stop arrives by (SIGTERM; SIGUSR1 on a Ray worker).

    Installed in a task process before its call arrives (``_runtime.child.prepare_process``): a
    stop that comes before the task has a context is kept for it (``install``).
    """
    global _early_stop
    context = current
    if context is None:
        _early_stop = True
    elif signum == signal.SIGTERM and not context.state.graceful:
        _die_by_sigterm()  # not a stop bgtask asks for (it kills such a task): from outside
    else:
        context.state.on_stop()


def _die_by_sigterm() -> None:
    """End this process as SIGTERM would have without a handler."""
    set_handler(signal.SIGTERM, int(signal.SIG_DFL))
    os.kill(os.getpid(), signal.SIGTERM)


_early_stop = False  # a stop came before the task's context was installed


class NothingYet(Exception):
    """Raised in an ``atomic()`` block that found nothing to hand back (no item, no place) and
    will wait: a stop or a Ctrl-C that came during the block is raised in its place, alone."""


class atomic:
    """Defer a stop and a Ctrl-C that come during the block to its end (main thread only).

    A graceful task's stop is raised when the block ends; a Ctrl-C, where the program has
    Python's default SIGINT handler, raises ``KeyboardInterrupt`` then. A program with a SIGINT
    handler of its own keeps it: such handlers set a flag rather than raise. Nested blocks
    defer to the outermost.

    ``to_caller``: the block hands a value back (``Queue.get``), which an exception at its end
    would lose. The stop or Ctrl-C is raised instead as the caller's next line starts, once the
    value is its own (see ``_raise_in_caller``).
    """

    __slots__ = ("_sigint", "_state", "_to_caller")

    def __init__(self, to_caller: bool = False) -> None:
        self._to_caller = to_caller

    def __enter__(self) -> None:
        global _depth
        self._state = None
        self._sigint = False
        if threading.current_thread() is not threading.main_thread():
            return
        _depth += 1
        if _depth > 1:
            return
        context = current
        if context is not None and not context.state.atomic:
            self._state = context.state
            context.state.atomic = True
        if get_handler(_SIGINT) is signal.default_int_handler:
            set_handler(_SIGINT, _defer_interrupt)
            self._sigint = True

    def __exit__(self, *exc: object) -> None:
        global _depth, _interrupted
        if threading.current_thread() is not threading.main_thread():
            return
        _depth -= 1
        if self._sigint:
            set_handler(_SIGINT, signal.default_int_handler)
        state = self._state
        if state is not None:
            state.atomic = False
        # Raised also when the block raises: the stop (or Ctrl-C) asked for more than its error.
        error: Optional[BaseException] = None
        if state is not None and state.pending:
            state.pending = False
            error = _StopRequest()
        elif self._sigint and _interrupted:
            _interrupted = False
            error = KeyboardInterrupt()
        if error is None:
            return
        if self._to_caller and exc[0] is None:
            _raise_in_caller(error)
            return
        if isinstance(exc[1], NothingYet):
            raise error from None  # what the block found is moot: not shown as its context
        raise error


_depth = 0  # how many atomic() blocks the main thread is in
_interrupted = False  # a Ctrl-C came during the outermost one


def _defer_interrupt(signum: int, frame: Any) -> None:
    global _interrupted
    _interrupted = True


def _raise_in_caller(error: BaseException) -> None:
    """Raise ``error`` in the first frame outside bgtask once it is done with the value returned.

    That is when the frame goes back in a loop (``for item in q``, ``while True: item =
    q.get()``: the next round, before the next item is taken) or raises; where it returns first
    (``return q.get()``), the same holds for the frame it returns to, and once the value reaches
    bgtask's runner (the task's function returned) the stop is moot. A line tracer does it, on
    those frames only, and puts back the program's own tracer (a debugger's, coverage's) when
    it fires. Meanwhile the stop event is set, as for any stop.
    """
    frame: Any = sys._getframe(1)
    while frame is not None and _is_ours(frame):
        frame = frame.f_back
    if frame is None:
        raise error
    previous: Any = sys.gettrace()
    marks = {id(frame): frame.f_lineno}

    def disarm(traced: Any) -> None:
        traced.f_trace = None
        sys.settrace(previous)

    def tracer(traced: Any, event: str, arg: Any) -> Any:
        if event == "call":
            return previous(traced, event, arg) if previous is not None else None
        if event == "line" and traced.f_lineno > marks.get(id(traced), 0):
            return tracer  # onwards in the same round
        if event == "return":
            caller = traced.f_back
            traced.f_trace = None
            if caller is None or _is_ours(caller):
                sys.settrace(previous)  # the function returned: a stop now raises nothing
                return None
            marks[id(caller)] = caller.f_lineno
            caller.f_trace = tracer
            return None
        if event in ("line", "exception"):
            disarm(traced)
            raise error
        return tracer

    frame.f_trace_lines = True
    frame.f_trace = tracer
    sys.settrace(tracer)


def _is_ours(frame: Any) -> bool:
    return is_bgtask_file(frame.f_code.co_filename)


def before_fork() -> None:
    if current is not None:
        current.before_fork()


def forget_in_child() -> None:
    """After a fork: the task's channel is not this process's (see ``Context.forked``)."""
    global _depth
    _depth = 0
    if current is not None:
        current.forked()


forks.register(before=before_fork, after_in_child=forget_in_child, order=forks.TASKS)


def _send_one(channel: socket.socket, kind: int, body: Union[bytes, _wire.WithFiles]) -> None:
    if not isinstance(body, _wire.WithFiles):
        _wire.send_message(channel, kind, body)
        return
    try:
        _wire.send_messages(channel, [(kind, body.body)], body.fds)
    finally:
        _close_files(body)


def _close_files(body: _wire.WithFiles) -> None:
    """Close the descriptors of a body, once (sent, or never to be)."""
    fds = list(body.fds)
    body.fds.clear()
    _wire.close_all(fds)
