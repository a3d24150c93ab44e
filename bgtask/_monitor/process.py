"""``TaskProcess``: one started task process, seen from the main program.

A launcher makes one per process it starts and returns it; the ``Task`` consumes it. It is the
only place where a task's end is decided, and every decision runs in the monitor thread, so none
needs a lock::

    caller thread                      monitor thread (owns every field below)
    ─────────────                      ──────────────────────────────────────────
    launcher.start() -> TaskProcess
    process.watch(task) ────────────>  hand-over: the consumer and the channel's reader
                                       are in place together, under the monitor's lock
                                       reader on the channel; an early outcome
                                       (RESULT, ERROR, FAILED) -> task._outcome_sent()
    process.signal(signum) ─────────>  the launcher's signaller, or directly
                                       (pidfd) once the launcher cannot
    launcher, in the monitor:          reaped(exitcode) / lost()
                                       end = watched and (reaped, or lost and channel at EOF)
                                         -> drain the channel, close it, cancel timers
                                         -> task._ended(exitcode, messages, ...)

"Lost" means the launcher can no longer tell the exit (bgtask's zygote died): the end is then
the channel's EOF, and the exit code is unknown.
"""

from __future__ import annotations

import contextlib
import os
import pickle
import signal
import socket
import sys
import threading
import time
from typing import Any, Callable, Iterator, List, Optional, Protocol, Set, Tuple, Union

from .._shared import forks
from .._shared import green as _green
from .._shared import platform as _platform
from .._shared import wire as _wire
from .._shared.buffers import MAX_BUFFER_FILES, receive_buffers
from . import loop as _monitor

# A signaller delivers a signal through the launcher (the zygote, or the parent's own kill);
# it returns False when the launcher cannot (its zygote is gone), and the process then signals
# directly. ``escalate_after``: the launcher kills the group that many seconds later itself.
Signaller = Callable[[int, Optional[float]], bool]


class Consumer(Protocol):
    """What a ``TaskProcess`` reports to (the ``Task``), in the monitor thread."""

    def _ready_sent(self, body: Any) -> None: ...

    def _pid_known(self, pid: int) -> None: ...

    def _item_sent(self, body: Any) -> bool: ...

    def _outcome_sent(self, kind: int, body: Any) -> None: ...

    def _ended(
        self, exitcode: Optional[int], messages: List[Tuple[int, Any]], partial: bool, corrupt: Optional[str]
    ) -> None: ...


class TaskProcess:
    """One started task process; see the module docstring. Made by a launcher."""

    __slots__ = (
        "_consumer",
        "_early_sent",
        "_escalation",
        "_exitcode",
        "_lost",
        "_monitor",
        "_on_end",
        "_on_helper",
        "_paused",
        "_reader",
        "_reading",
        "_reaped",
        "_requested",
        "_signaller",
        "channel",
        "done",
        "keep",
        "pid",
        "pidfd",
    )

    def __init__(
        self,
        pid: int,
        channel: socket.socket,
        signaller: Signaller,
        *,
        pidfd: Optional[int] = None,
        on_end: Optional[Callable[[], None]] = None,
        on_helper: Optional[Callable[[int, int], None]] = None,
    ) -> None:
        """``pidfd``: one the launcher opened (this record closes it), else one is opened here."""
        self.pid = pid
        self.channel: Optional[socket.socket] = channel
        # A pidfd names the process even after its pid is reaped elsewhere and reused: used to
        # signal it when the launcher cannot.
        self.pidfd = _platform.open_pidfd(pid) if pidfd is None else pidfd
        self.done = False
        self.keep: Any = ()  # what its call sent along that must live as long as it does
        self._signaller = signaller
        self._on_end = on_end
        self._on_helper = on_helper  # the task started a zygote of its own (pid, start time)
        # A return value's large buffers come as memory files with its message: mapped as it arrives.
        self._reader = _wire.MessageReader(MAX_BUFFER_FILES, receive_buffers)
        self._consumer: Optional[Consumer] = None
        self._early_sent = False
        self._reading = False
        self._paused = False  # a stream's reader stopped reading its channel: see resume()
        self._reaped = False
        self._lost = False
        self._exitcode: Optional[int] = None
        self._requested = 0  # the strongest signal asked for so far
        self._escalation: Optional[_monitor.Timer] = None
        self._monitor = _monitor.get()
        self._monitor.hold()
        with _live_lock:
            _live.add(self)

    # -- from any thread ------------------------------------------------------------------

    def watch(self, consumer: Consumer) -> None:
        """Start following the process for ``consumer``; once, after the payload was sent.

        The one step taken outside the monitor: it hands the record over. The consumer is set
        under the monitor's lock together with the channel's registration, so the monitor
        acts on the record only once both are in place, and only from then on.
        """
        assert self.channel is not None

        def hand_over() -> None:
            self._reading = True
            self._consumer = consumer  # last: the monitor acts once it sees a consumer

        self._monitor.add_reader(self.channel, self._on_readable, before=hand_over)
        if self._reaped or self._lost:
            # The launcher reported first, while nobody was watching: decide now, not on a
            # channel event that may never come (children of the task may hold it open).
            self._monitor.call_soon(self._maybe_end)

    def signal(self, signum: int, escalate_after: Optional[float] = None) -> None:
        """Send ``signum`` (SIGKILL: to the whole group); SIGKILL the group ``escalate_after`` later."""
        self._monitor.call_soon(lambda: self._signal(signum, escalate_after))

    def discard(self) -> None:
        """The start failed before the task got its call: let go of everything.

        Called by the launcher before the record is handed over; ``done`` keeps the monitor
        from acting on it from then on.
        """
        self.done = True
        self._close()

    def resume(self) -> None:
        """Read the channel again: the program took items of a stream that filled up."""
        self._monitor.call_soon(self._resume)

    def abandon(self) -> None:
        """The call was interrupted after the process started: kill it and follow it to its end."""
        self.watch(_NOBODY)
        self.signal(signal.SIGKILL)

    # -- in the monitor thread, from the launcher -----------------------------------------

    def reaped(self, exitcode: int) -> None:
        """The launcher reaped the process."""
        self._reaped = True
        self._exitcode = exitcode
        self._maybe_end()

    def lost(self) -> None:
        """The launcher can no longer report the exit: the channel's EOF will tell it.

        A signal the launcher took as it died may never have arrived: it goes again, directly.
        """
        self._lost = True
        if self._requested and not self.done:
            self._signal_directly(self._requested)
        self._maybe_end()

    # -- in the monitor thread ------------------------------------------------------------

    def _on_readable(self) -> None:
        if self.channel is None:
            return
        reader = self._reader
        if not reader.eof:
            reader.feed_from(self.channel)
        self._deliver()
        if reader.eof and self._reading:
            self._reading = False
            self._monitor.remove_reader(self.channel)
            if reader.corrupt is not None:
                # The task wrote something else to its channel: it would block writing its
                # outcome to a reader that no longer reads. Its writes now fail instead.
                try:
                    self.channel.shutdown(socket.SHUT_RD)
                except OSError:
                    pass
            self._maybe_end()

    def _deliver(self) -> None:
        """Hand what arrived on: records and readiness in order, at once; an early outcome once."""
        reader = self._reader
        consumer = self._consumer
        if consumer is None or not reader.messages:
            return
        if any(kind in _wire.ASIDES for kind, _ in reader.messages):
            outcomes = []
            full = False
            for kind, body in reader.messages:
                if kind == _wire.ITEM:
                    full = consumer._item_sent(body)
                    continue
                if kind == _wire.LOG:
                    handle_record(body)
                elif kind == _wire.WARNING:
                    reissue_warning(body)
                elif kind == _wire.READY:
                    consumer._ready_sent(body)
                elif kind == _wire.HELPER:
                    if self._on_helper is not None:
                        self._on_helper(*pickle.loads(body))
                elif kind == _wire.QUEUED:
                    _adopt_queued(body)
                else:
                    outcomes.append((kind, body))
            reader.messages = outcomes
            if full:
                self._pause()
        if reader.messages and not self._early_sent:
            kind, body = reader.messages[0]
            if kind in _wire.EARLY:
                self._early_sent = True
                consumer._outcome_sent(kind, body)

    def _pause(self) -> None:
        """Stop reading the channel: the task then waits to send its next item (backpressure).
        Not once a stop was asked for: the task may wait to finish sending an item, the stop
        deferred until it has (the item goes out whole), and only reading lets it see the stop."""
        if self._requested:
            return
        if self._reading and not self._paused and self.channel is not None:
            self._paused = True
            self._monitor.remove_reader(self.channel)

    def _resume(self) -> None:
        if self._paused:
            self._paused = False
            if self._reading and self.channel is not None and not self.done:
                self._monitor.add_reader(self.channel, self._on_readable)

    def _maybe_end(self) -> None:
        if self.done or self._consumer is None:
            return
        if not (self._reaped or (self._lost and self._reader.eof)):
            return
        if not self._reader.eof and self.channel is not None:
            self._reader.feed_from(self.channel)  # what the task wrote before it exited is all there
            self._deliver()
        self.done = True
        self._close()
        reader = self._reader
        messages, reader.messages = reader.messages, []  # the consumer keeps what it needs
        self._consumer._ended(self._exitcode, messages, reader.partial, reader.corrupt)
        self._consumer = None

    def _close(self) -> None:
        if self._escalation is not None:
            self._escalation.cancel()
            self._escalation = None
        if self.channel is not None:
            if self._reading:
                self._reading = False
                self._monitor.remove_reader(self.channel)
            self.channel.close()
            self.channel = None
        # Taken off the record before it is closed: a copy of this program forked meanwhile
        # either holds a copy of the descriptor (and closes it) or finds none, never a number
        # that a new descriptor got after the close.
        pidfd, self.pidfd = self.pidfd, None
        if pidfd is not None:
            os.close(pidfd)
        with _live_lock:
            _live.discard(self)
        if self._on_end is not None:
            self._on_end()
            self._on_end = None
        for kept in self.keep:
            release = getattr(kept, "release_task", None)
            if release is not None:  # a queue: what this task died before it sent is not coming
                try:
                    release(self.pid)
                except Exception:  # noqa: BLE001 (the monitor goes on whatever happens)
                    pass
        self.keep = ()
        self._monitor.release()

    def _signal(self, signum: int, escalate_after: Optional[float]) -> None:
        if self.done or self._reaped:
            return
        if signum and self._requested != signal.SIGKILL:
            self._requested = signum
        self._resume()  # a stream waiting to send its next item must see the stop
        if not self._signaller(signum, escalate_after):
            self._signal_directly(signum)
        # Also where the launcher escalates itself (the zygote): it may die meanwhile.
        if escalate_after is not None and self._escalation is None:
            self._escalation = self._monitor.call_at(
                time.monotonic() + escalate_after, lambda: self._signal(signal.SIGKILL, None)
            )

    def _signal_directly(self, signum: int) -> None:
        """Signal a process this program is not the parent of, and whose launcher is gone."""
        pidfd = self.pidfd
        if pidfd is not None:
            if _platform.pidfd_exited(pidfd):
                return
            # While the pidfd says the leader runs, its pid is its group's id and is not reused.
            if signum == signal.SIGKILL:
                _killpg(self.pid)
            _platform.pidfd_signal(pidfd, signum)
            return
        # No pidfd (macOS): the channel tells whether the process still runs; it closes when it
        # exits, a moment before its pid can be reaped and reused.
        if self._reader.eof:
            return
        try:
            if signum == signal.SIGKILL:
                os.killpg(self.pid, signum)
            else:
                _platform.signal_main_thread(self.pid, signum)
        except OSError:
            pass


class _Nobody:
    """The consumer of a process whose call was interrupted: nothing waits for its end."""

    def _ready_sent(self, body: Any) -> None:
        pass

    def _pid_known(self, pid: int) -> None:
        pass

    def _item_sent(self, body: Any) -> bool:
        return False

    def _outcome_sent(self, kind: int, body: Any) -> None:
        pass

    def _ended(
        self, exitcode: Optional[int], messages: List[Tuple[int, Any]], partial: bool, corrupt: Optional[str]
    ) -> None:
        pass


_NOBODY = _Nobody()


def _adopt_queued(body: Union[bytes, bytearray]) -> None:
    from .. import _queue

    try:
        _queue.adopt(body)
    except Exception:  # noqa: BLE001 (a task's bytes: they must not stop the monitor)
        pass


def reissue_warning(body: Union[bytes, bytearray]) -> None:
    from .._shared import logs as _logs

    _logs.reissue(body)


def handle_record(body: Union[bytes, bytearray]) -> None:
    """A task's logging record, to this program's handlers; whatever they raise stays here."""
    from .._shared import logs as _logs

    try:
        _logs.handle(body)
    except Exception:  # noqa: BLE001 (a user's handler or filter: reported, the monitor goes on)
        import traceback

        print("bgtask: a task's logging record could not be handled:", file=sys.stderr)
        traceback.print_exc()


def _killpg(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except OSError:
        pass


# Processes not yet ended, whose descriptors a forked copy of this program must not keep: a
# daemon task learns of the main program's death by its channel's EOF.
_live: Set[TaskProcess] = set()
_live_lock = threading.Lock()
# Channels made for a process being started, before its TaskProcess exists: under "fork" the
# task itself is such a copy, and must not keep the main program's end of its own channel.
_starting: Set[socket.socket] = set()


@contextlib.contextmanager
def new_channel() -> Iterator[Tuple[socket.socket, socket.socket]]:
    """A socket pair for a process about to start: (this program's end, the process's end).

    This program's end stays out of copies of the program forked meanwhile (``started()``
    lets go of it once something else follows it); the process's end is closed on leaving the
    block, and this program's end too if the start failed.
    """
    mine, theirs = _green.socketpair()
    starting(mine)
    try:
        yield mine, theirs
    except BaseException:
        started(mine)
        mine.close()
        raise
    finally:
        theirs.close()


def starting(channel: socket.socket) -> None:
    """Keep a forked copy of this program from holding ``channel`` until its process follows it."""
    with _live_lock:
        _starting.add(channel)


def started(channel: socket.socket) -> None:
    with _live_lock:
        _starting.discard(channel)


def forget_in_child() -> None:
    """After a fork: close every channel and pidfd of the original's task processes."""
    global _live_lock
    _live_lock = threading.Lock()
    for process in _live:
        if process.channel is not None:
            process.channel.close()
        if process.pidfd is not None:
            os.close(process.pidfd)
    _live.clear()
    for channel in _starting:
        channel.close()
    _starting.clear()


forks.register(after_in_child=forget_in_child, order=forks.PROCESSES)
