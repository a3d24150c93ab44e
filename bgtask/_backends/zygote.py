"""The zygote: a small single-threaded process that forks task processes for one main program.

::

    zygote --fork--> spare (waits on its task channel)
       |  --Spare(pid, task channel)--> main program   two spares ahead, always
       |                                    | a call takes a spare it holds: no round trip
       |  <--Activate(spare, daemon...)--   +--settings, payload--> spare: runs the task
       |
       +-- reaps tasks, kills what they left behind, reports exit codes to the main program
       +-- main program gone (control socket EOF): stops daemon tasks (SIGTERM, then SIGKILL of
           the group after grace), kills unused spares, and stays until its tasks have ended

The zygote is started once, lazily, with exec (so it never inherits the main program's threads,
locks or file descriptors), in a session of its own (so terminal signals do not reach it or its
tasks). It has bgtask and cloudpickle imported and keeps two children forked ahead, whose task
channels it hands to the main program: a call writes the task straight to a process that already
exists, so it cannot fail to start, and no call waits for the zygote unless the spares ran out.
Being the parent of every task, the zygote is the one process that can signal a task without
racing pid reuse: it kills a group only while the group's leader is not yet reaped. It is a
child subreaper (Linux): what a task leaves outside its group comes back to it when the task
ends, and is killed.

It imports only the task runtime; it never unpickles user data itself.
"""

from __future__ import annotations

import atexit
import collections
import gc
import itertools
import os
import select
import selectors
import signal
import socket
import struct
import sys
import time
from typing import Any, Callable, Deque, Dict, List, Optional, Set, Tuple

from .._runtime import child as _child
from .._shared import context as _taskctx
from .._shared import logs as _logs
from .._shared import platform as _platform
from .._shared import wire as _wire

# Children forked ahead and handed to the main program: a call finds its process ready.
SPARES = 2
# At most this many forks beyond SPARES for calls that wait: what a burst may leave unused.
MAX_OWED = 8
# How long the loop waits at most: a lost SIGCHLD or a failed fork costs at most this.
IDLE_WAIT_S = 1.0
# How long after a send that found no room poll can see (ENOBUFS, ETOOMANYREFS) it tries again.
RETRY_S = 0.02


class _Proc:
    """A child of the zygote: a spare until the main program activates it, then a task."""

    __slots__ = ("daemon", "grace", "graceful", "pid", "serial", "task")

    def __init__(self, serial: int, pid: int) -> None:
        self.serial = serial
        self.pid = pid
        self.task = False
        self.daemon = False
        self.graceful = False
        self.grace = 0.0


class Children:
    """The zygote's children: by pid and by serial, their signals, their reaping, and what
    tasks left behind when they ended."""

    def __init__(self) -> None:
        self.by_pid: Dict[int, _Proc] = {}  # until reaped
        self.by_serial: Dict[int, _Proc] = {}
        self.idle: Set[int] = set()  # serials of spares not activated yet
        # When to SIGKILL the groups of graceful tasks asked to stop. Each round of the loop
        # looks only at these: work per round does not grow with the number of tasks.
        self.kill_at: Dict[int, float] = {}  # by pid
        self._serials = itertools.count(1)
        self.watcher = _platform.exit_watcher()
        self.subreaper = _platform.set_child_subreaper()
        self.adopted: Set[int] = set()  # zygotes of ended tasks, left to end on their own
        # The zygotes tasks started, as the main program reported them: pid -> start time.
        self.helpers: Dict[int, int] = {}

    def add(self, pid: int) -> _Proc:
        self.watcher.watch(pid)
        proc = _Proc(next(self._serials), pid)
        self.by_pid[pid] = proc
        self.by_serial[proc.serial] = proc
        self.idle.add(proc.serial)
        return proc

    def remove(self, pid: int) -> Optional[_Proc]:
        proc = self.by_pid.pop(pid, None)
        self.kill_at.pop(pid, None)
        if proc is not None:
            del self.by_serial[proc.serial]
            self.idle.discard(proc.serial)
        return proc

    def tasks_left(self) -> bool:
        return any(p.task for p in self.by_pid.values())

    def signal(self, proc: _Proc, signum: int, escalate_after: Optional[float]) -> None:
        """Signal a child (SIGKILL: its group), and SIGKILL its group ``escalate_after`` s later."""
        try:
            if signum == signal.SIGKILL:
                os.killpg(proc.pid, signal.SIGKILL)
            else:
                _platform.signal_main_thread(proc.pid, signum)
        except OSError:
            pass
        if escalate_after is not None:
            kill_at = time.monotonic() + escalate_after
            if kill_at < self.kill_at.get(proc.pid, kill_at + 1):
                self.kill_at[proc.pid] = kill_at

    def escalate(self, now: float) -> None:
        """SIGKILL the groups whose grace is over."""
        kill_at = self.kill_at
        for pid, when in list(kill_at.items()):
            if when <= now:
                del kill_at[pid]
                self.signal(self.by_pid[pid], signal.SIGKILL, None)

    def reap(self) -> List[Tuple[_Proc, int]]:
        """Reap the children that exited, kill what they left, and return the zygote's own
        children among them (spares and tasks) with their exit codes.

        What a task left outside its group came back here (child subreaper) when it exited,
        before SIGCHLD: it is killed now, before the end is reported, so a task the main program
        knows to have ended left nothing running, even if the zygote is killed right after.
        """
        ended: List[Tuple[_Proc, int]] = []
        reaped = False
        for pid in self.watcher.exited():
            # The child has exited and is not reaped: its group id cannot be reused yet, so
            # this reaches only what it left behind in its group.
            try:
                os.killpg(pid, signal.SIGKILL)
            except OSError:
                pass
            exitcode = _platform.reap(pid)
            self.watcher.forget(pid)
            self.adopted.discard(pid)
            proc = self.remove(pid)
            reaped = True
            if proc is not None:
                ended.append((proc, exitcode))
        if reaped and self.subreaper:
            self.kill_adopted()  # also what an escapee killed here left in turn
        return ended

    def kill_adopted(self) -> None:
        """Kill the processes that left a task's group and came back here when the task ended."""
        pids = _platform.children(single_threaded=True)
        for pid in pids or ():
            if pid in self.by_pid or pid in self.adopted:
                continue
            self.watcher.watch(pid)  # reaped like any child once it is gone
            start = self.helpers.get(pid)
            if start is not None and start == _platform.process_start_time(pid):
                # A task's own zygote: it stops that task's daemon tasks (gracefully) now
                # that the task is gone, then exits.
                self.adopted.add(pid)
                continue
            for kill in (os.killpg, os.kill):  # a child here is not reaped: its ids are its own
                try:
                    kill(pid, signal.SIGKILL)
                except OSError:
                    pass


class OutQueue:
    """Messages for the main program not sent yet: the zygote never blocks writing to it.

    So it always reads what the main program sends, and neither can wait for the other. Each
    entry is [bytes, the spare channel to attach to its first byte or None].
    """

    def __init__(self) -> None:
        self.entries: Deque[List[Any]] = collections.deque()
        # A send that failed for want of room poll does not see (ENOBUFS, and ETOOMANYREFS:
        # more descriptors in flight than the user may open): when to try again.
        self.retry_at: Optional[float] = None

    def __bool__(self) -> bool:
        return bool(self.entries)

    def add(self, data: bytes, channel: Optional[socket.socket] = None) -> None:
        if channel is None and self.entries and self.entries[-1][1] is None:
            self.entries[-1][0] += data  # goes out in the same system call
        else:
            self.entries.append([bytearray(data), channel])

    def flush(self, ctl: socket.socket) -> None:
        """Send what the main program can take now; raise ``OSError`` if it is gone."""
        while self.entries:
            entry = self.entries[0]
            data, channel = entry
            try:
                if channel is None:
                    sent = ctl.send(data, socket.MSG_DONTWAIT)
                else:  # the channel rides on the message's first byte
                    rights = struct.pack("i", channel.fileno())
                    ancillary = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, rights)]
                    sent = ctl.sendmsg([data], ancillary, socket.MSG_DONTWAIT)
                    channel.close()
                    entry[1] = None
            except BlockingIOError:
                return
            except OSError as exc:
                if not _platform.no_room(exc):
                    raise  # the main program is gone
                self.retry_at = time.monotonic() + RETRY_S  # not the main program's end
                return
            self.retry_at = None
            del data[:sent]
            if not data:
                self.entries.popleft()

    def clear(self) -> None:
        for _data, channel in self.entries:
            if channel is not None:
                channel.close()
        self.entries.clear()


class Zygote:
    """The zygote's loop."""

    def __init__(self, ctl: socket.socket, fork: Callable[[], int]) -> None:
        self.ctl: Optional[socket.socket] = ctl
        self.fork = fork
        self.reader = _wire.MessageReader()
        self.procs = Children()
        self.out = OutQueue()
        self.generation = 0  # bumped by every change of environment or preloaded modules
        # Calls that found no spare and wait: each gets a fork beyond SPARES, so that a burst of
        # calls keeps the zygote forking instead of waiting for its spares to be taken.
        self.owed = 0
        self.paused = False  # the main program ran out of descriptors: fork only when asked
        self.pid = os.getpid()
        self.wake_r, self.wake_w = os.pipe()
        os.set_blocking(self.wake_r, False)
        os.set_blocking(self.wake_w, False)
        signal.signal(signal.SIGCHLD, lambda signum, frame: None)
        signal.set_wakeup_fd(self.wake_w)
        # Terminal signals never reach this session, but a stray SIGINT (kill -INT) must not
        # kill the zygote with a traceback.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        # selectors, not select(): the control socket keeps the number it had in the main
        # program, which may be over FD_SETSIZE (1024) in a busy server.
        self.selector = selectors.DefaultSelector()
        self.selector.register(self.wake_r, selectors.EVENT_READ)
        self.selector.register(ctl, selectors.EVENT_READ)
        self.writing = False  # whether the selector waits for ctl to take more output
        # "Is a message waiting?", without waiting: asked before every fork, so the cheapest.
        self.ctl_ready = select.poll()
        self.ctl_ready.register(ctl, select.POLLIN)

    # -- the loop ---------------------------------------------------------------------------

    def serve(self) -> None:
        self._refill()
        # Once the main program is gone the zygote stays until its tasks end (daemon ones are
        # being stopped; the others run to their end): it reaps them and kills what they leave
        # behind, and a task's own zygote, adopted by an outer one, keeps its tasks as children.
        while self.ctl is not None or self.procs.tasks_left():
            self._wait()
            self._drain_wakeups()
            # Activations first: a task that already ended must be known as a task when it
            # is reaped (the main program sends the activation before the task's payload).
            if self.ctl is not None:
                self._read_control()
            # A call may be waiting for a spare: fork before reaping. The pids of exited
            # children are not reused before they are reaped, so no report can come too late.
            self._flush()
            self._refill(report=False)
            for proc, exitcode in self.procs.reap():
                self._report(_wire.Reaped(proc.serial, exitcode))
            self.procs.escalate(time.monotonic())
            self._flush()
            self._refill()
        if self.procs.subreaper:
            self.procs.kill_adopted()  # the last ones: nothing adopts them after this process
        os._exit(0)

    def _wait(self) -> None:
        timeout = IDLE_WAIT_S
        if self.procs.kill_at:
            timeout = max(0.0, min(timeout, min(self.procs.kill_at.values()) - time.monotonic()))
        retry_at = self.out.retry_at
        if retry_at is not None:  # writable as far as poll can tell: wait for the time instead
            timeout = max(0.0, min(timeout, retry_at - time.monotonic()))
        writing = bool(self.out) and retry_at is None
        if self.ctl is not None and writing != self.writing:
            self.writing = writing
            events = selectors.EVENT_READ | (selectors.EVENT_WRITE if self.writing else 0)
            self.selector.modify(self.ctl, events)
        self.selector.select(timeout)

    def _refill(self, report: bool = True) -> None:
        """Fork spares up to ``SPARES``; a fork that fails is reported to a waiting call.

        Not while earlier messages wait to be sent: the main program is not reading. Before the
        round's reaping (``report`` false), a failure is not reported yet: the zombies it reaps
        may be what held the process limit, and the fork after the reaping is the one that counts.
        """
        procs = self.procs
        while (len(procs.idle) < SPARES or self.owed) and self.ctl is not None and not self.paused:
            if self.out:
                return
            if self.ctl_ready.poll(0):
                return  # activations and requests first: the next round forks
            try:
                self._fork_spare()
            except OSError as exc:  # EAGAIN at RLIMIT_NPROC, ENOMEM, EMFILE...
                if report and self.owed and not procs.idle:
                    self.owed = 0
                    self._report(_wire.NoSpare(f"fork() failed: {exc}"))
                    self._flush()
                return

    def _drain_wakeups(self) -> None:
        try:
            while os.read(self.wake_r, 4096):
                pass
        except BlockingIOError:
            pass

    # -- control messages -------------------------------------------------------------------

    def _read_control(self) -> None:
        assert self.ctl is not None
        self.reader.feed_from(self.ctl)
        messages, self.reader.messages = self.reader.messages, []
        procs = self.procs
        for kind, body in messages:
            try:
                message = _wire.decode(kind, body)
            except Exception:  # a torn frame: nothing more from this channel can be trusted
                self._main_program_gone()
                return
            if isinstance(message, _wire.Activate):
                self._activate(message)
            elif isinstance(message, _wire.Signal):
                proc = procs.by_serial.get(message.serial)
                if proc is not None:
                    self.procs.signal(proc, message.signum, message.escalate_after)
            elif isinstance(message, _wire.Want):
                self.owed = min(self.owed + 1, MAX_OWED)
                self.paused = False
            elif isinstance(message, _wire.Helper):
                self.procs.helpers[message.pid] = message.start
            elif isinstance(message, _wire.Drop):
                proc = procs.by_serial.get(message.serial)
                if proc is not None and not proc.task:
                    self.procs.signal(proc, signal.SIGKILL, None)
                self.paused = True
            elif isinstance(message, _wire.SetEnv):
                os.environ.clear()
                os.environ.update(message.environ)
                sys.path[:] = message.sys_path
                self.generation += 1
            elif isinstance(message, _wire.Preload):
                preload(message.modules)
                self.fork = os.fork  # the modules may have at-fork work of their own
                self.generation += 1
                # Spares forked without the modules: the main program drops them too.
                for serial in procs.idle:
                    self.procs.signal(procs.by_serial[serial], signal.SIGKILL, None)
        if self.reader.eof:
            self._main_program_gone()

    def _activate(self, message: _wire.Activate) -> None:
        proc = self.procs.by_serial.get(message.serial)
        if proc is None or proc.task:
            return  # it died before the main program took it: its reap was reported
        self.procs.idle.discard(message.serial)
        proc.task = True
        proc.daemon = message.daemon
        proc.graceful = message.graceful
        proc.grace = message.grace

    def _main_program_gone(self) -> None:
        """Stop every daemon task (graceful ones get SIGTERM and ``grace`` seconds), kill spares."""
        if self.ctl is not None:
            self._last_activations()
            self.selector.unregister(self.ctl)
            self.ctl_ready.unregister(self.ctl)
            self.ctl.close()
            self.ctl = None
        self.out.clear()
        for proc in list(self.procs.by_pid.values()):
            if not proc.task:
                self.procs.signal(proc, signal.SIGKILL, None)
            elif not proc.daemon:
                continue
            elif proc.graceful:
                self.procs.signal(proc, signal.SIGTERM, proc.grace)
            else:
                self.procs.signal(proc, signal.SIGKILL, None)

    def _last_activations(self) -> None:
        """What the main program sent before it went may still be unread (a write to it failed
        first): a spare it made a task (its call is in the spare's channel) is a task, not a
        spare to kill."""
        assert self.ctl is not None
        try:
            self.reader.feed_from(self.ctl)
        except OSError:
            pass
        messages, self.reader.messages = self.reader.messages, []
        for kind, body in messages:
            try:
                message = _wire.decode(kind, body)
            except Exception:  # a torn frame: nothing after it can be trusted
                return
            if isinstance(message, _wire.Activate):
                self._activate(message)

    def _report(self, message: Any) -> None:
        if self.ctl is not None:
            self.out.add(_wire.encode(message))

    def _flush(self) -> None:
        if self.ctl is None:
            return
        try:
            self.out.flush(self.ctl)
        except OSError:
            self._main_program_gone()

    def _fork_spare(self) -> None:
        """Fork a spare and hand its task channel to the main program."""
        assert self.ctl is not None
        mine, theirs = socket.socketpair()
        gc.freeze()  # objects of the zygote stay in pages the tasks share, unwritten
        try:
            pid = self.fork()
        except OSError:
            mine.close()
            theirs.close()
            raise
        if pid == 0:
            mine.close()
            self._close_in_spare()
            _child.become_spare(theirs, self.pid)
        theirs.close()
        try:
            os.setpgid(pid, pid)  # also done in the child: whichever runs first wins the race
        except OSError:
            pass
        proc = self.procs.add(pid)
        self.owed = max(0, self.owed - 1)
        message = _wire.encode(_wire.Spare(proc.serial, pid, self.generation))
        # After the reports queued before it: a reaped pid is reported before its reuse here.
        self.out.add(message, mine)
        self._flush()

    def _close_in_spare(self) -> None:
        """In a freshly forked spare: let go of what is the zygote's."""
        signal.set_wakeup_fd(-1)
        _taskctx.set_handler(signal.SIGCHLD, _child.SIG_DFL)  # SIGINT: prepare_process()
        # The descriptors only: the objects' memory stays shared with the zygote, unwritten.
        fileno = getattr(self.selector, "fileno", None)
        if fileno is not None:
            try:
                os.close(fileno())
            except OSError:  # kqueue: not inherited at all
                pass
        for fd in (self.wake_r, self.wake_w):
            os.close(fd)
        self.procs.watcher.close()
        if self.ctl is not None:
            self.ctl.close()


def preload(names: List[str]) -> None:
    """Import modules in the zygote, so that every task forked later has them imported.

    What they register with ``atexit`` is dropped: those hooks are not the tasks' (the fork
    server clears them the same way), and the zygote itself never runs them.
    """
    for name in names:
        try:
            __import__(name)
        except BaseException as exc:  # report any failure, keep serving
            print(f"bgtask: could not preload {name!r}: {type(exc).__name__}: {exc}", file=sys.stderr)
            continue
        if _platform.thread_count() > 1:
            print(
                f"bgtask: preloading {name!r} started a thread in the zygote; tasks forked from "
                "a process with threads can deadlock: do not preload it",
                file=sys.stderr,
            )
    _clear_atexit()


def _clear_atexit() -> None:
    clear = getattr(atexit, "_clear", None)
    if clear is not None:
        clear()


def main(ctl_fd: int) -> None:
    """Entry point of the zygote process; ``ctl_fd`` is its control socket."""
    ctl = socket.socket(fileno=ctl_fd)
    ctl.set_inheritable(False)
    first = _wire.recv_message(ctl)
    if first is None:
        os._exit(0)
    boot = _wire.decode(first[0], first[1])
    sys.path[:] = boot.sys_path
    _platform.set_parent_death_signal(0)  # loads libc here once, not in every task
    _platform.set_process_name(_platform.ZYGOTE_NAME)
    # A task's name shows in multiprocessing.current_process(): imported once here.
    import multiprocessing.process  # noqa: F401

    fork = None if boot.preload else _platform.plain_fork()
    preload(boot.preload)  # also clears atexit: a task runs only the hooks registered in it
    _logs.prepare()  # every task's logging relay, in place ahead
    _child.prepare_streams()  # inherited by every task
    Zygote(ctl, fork or os.fork).serve()
