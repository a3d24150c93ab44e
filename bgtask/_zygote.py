"""The zygote: a small single-threaded process that forks task processes for one main program.

::

    zygote --fork--> spare (waits on its task channel)
       |  --spare(pid, task channel)--> main program   two spares ahead, always
       |                                    | a call takes a spare it holds: no round trip
       |  <--activate(spare, daemon...)--   +--settings, payload--> spare: runs the task
       |
       +-- reaps tasks, reports exit codes to the main program
       +-- main program gone (control socket EOF): stops daemon tasks (SIGTERM, then SIGKILL of
           the group after grace), kills unused spares

The zygote is started once, lazily, with exec (so it never inherits the main program's threads,
locks or file descriptors), in a session of its own (so terminal signals do not reach it or its
tasks). It has bgtask and cloudpickle imported and keeps two children forked ahead, whose task
channels it hands to the main program: a call writes the task straight to a process that already
exists, so it cannot fail to start, and no call waits for the zygote unless the spares ran out.
Being the parent of every task, the zygote is the one process that can signal a task without
racing pid reuse: it kills a group only while the group's leader is not yet reaped.

It imports only the task runtime; it never unpickles user data itself.
"""

from __future__ import annotations

import collections
import gc
import itertools
import os
import pickle
import select
import signal
import socket
import struct
import sys
import time
from typing import Any, Callable, Deque, Dict, List, Optional, Set

from . import _child, _wire
from ._platform import set_parent_death_signal

# Children forked ahead and handed to the main program: a call finds its process ready.
SPARES = 2
# At most this many forks beyond SPARES for calls that wait: what a burst may leave unused.
MAX_OWED = 8


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


class Zygote:
    """The zygote's state and loop."""

    def __init__(self, ctl: socket.socket, fork: Callable[[], int]) -> None:
        self.ctl: Optional[socket.socket] = ctl
        self.fork = fork
        self.reader = _wire.MessageReader()
        self.procs: Dict[int, _Proc] = {}  # by pid, until reaped
        self.by_serial: Dict[int, _Proc] = {}
        # When to SIGKILL the groups of graceful tasks asked to stop. Each round of the loop
        # looks only at these: work per round does not grow with the number of tasks.
        self.kill_at: Dict[int, float] = {}  # by pid
        self.idle: Set[int] = set()  # serials of spares not activated yet
        self.serials = itertools.count(1)
        self.generation = 0  # bumped by every change of environment or preloaded modules
        # Calls that found no spare and wait: each gets a fork beyond SPARES, so that a burst of
        # calls keeps the zygote forking instead of waiting for its spares to be taken.
        self.owed = 0
        self.paused = False  # the main program ran out of descriptors: fork only when asked
        # Messages not sent yet: [bytes, the spare channel to attach or None]. The zygote never
        # blocks on writing to the main program, so it always reads what the main program
        # sends, and neither can wait for the other.
        self.out: Deque[List[Any]] = collections.deque()
        self.pid = os.getpid()
        self.wake_r, self.wake_w = os.pipe()
        os.set_blocking(self.wake_r, False)
        os.set_blocking(self.wake_w, False)
        signal.signal(signal.SIGCHLD, lambda signum, frame: None)
        signal.set_wakeup_fd(self.wake_w)
        # Terminal signals never reach this session, but a stray SIGINT (kill -INT) must not
        # kill the zygote with a traceback.
        signal.signal(signal.SIGINT, signal.SIG_IGN)

    # -- the loop ---------------------------------------------------------------------------

    def serve(self) -> None:
        self._refill()
        while self.ctl is not None or self._daemons_left():
            readable = self._wait()
            if self.wake_r in readable:
                self._drain_wakeups()
            # Activations first: a task that already ended must be known as a task when it
            # is reaped (the main program sends the activation before the task's payload).
            if self.ctl is not None:
                self._read_control()
            self._reap()
            self._escalate()
            self._flush()
            self._refill()
        os._exit(0)

    def _refill(self) -> None:
        """Fork spares up to ``SPARES``; a fork that fails is reported to a waiting call.

        Not while earlier messages wait to be sent: the main program is not reading.
        """
        while (len(self.idle) < SPARES or self.owed) and self.ctl is not None and not self.paused:
            if self.out:
                return
            if select.select([self.ctl], [], [], 0)[0]:
                return  # activations and requests first: the next round forks
            try:
                self._fork_spare()
            except OSError as exc:  # EAGAIN at RLIMIT_NPROC, ENOMEM, EMFILE...
                if self.owed and not self.idle:
                    self.owed = 0
                    self._report(_wire.Z_NOSPARE, f"fork() failed: {exc}")
                    self._flush()
                return

    def _wait(self) -> List[Any]:
        readers: List[Any] = [self.wake_r]
        writers: List[Any] = []
        if self.ctl is not None:
            readers.append(self.ctl)
            if self.out:
                writers.append(self.ctl)
        timeout = 1.0  # a lost SIGCHLD or a failed fork costs at most this
        if self.kill_at:
            timeout = max(0.0, min(timeout, min(self.kill_at.values()) - time.monotonic()))
        try:
            readable, _, _ = select.select(readers, writers, [], timeout)
        except InterruptedError:
            return []
        return readable

    def _drain_wakeups(self) -> None:
        try:
            while os.read(self.wake_r, 4096):
                pass
        except (BlockingIOError, InterruptedError):
            pass

    def _daemons_left(self) -> bool:
        return any(p.daemon for p in self.procs.values())

    # -- control messages -------------------------------------------------------------------

    def _read_control(self) -> None:
        assert self.ctl is not None
        self.reader.feed_from(self.ctl)
        messages, self.reader.messages = self.reader.messages, []
        for kind, body in messages:
            data = pickle.loads(body)
            if kind == _wire.Z_ACTIVATE:
                self._activate(*data)
            elif kind == _wire.Z_SIGNAL:
                serial, signum, escalate_after = data
                proc = self.by_serial.get(serial)
                if proc is not None:
                    self._signal(proc, signum, escalate_after)
            elif kind == _wire.Z_WANT:
                self.owed = min(self.owed + 1, MAX_OWED)
                self.paused = False
            elif kind == _wire.Z_DROP:
                proc = self.by_serial.get(data)
                if proc is not None and not proc.task:
                    self._signal(proc, signal.SIGKILL, None)
                self.paused = True
            elif kind == _wire.Z_SETENV:
                env, path = data
                os.environ.clear()
                os.environ.update(env)
                sys.path[:] = path
                self.generation += 1
            elif kind == _wire.Z_PRELOAD:
                preload(data)
                self.fork = os.fork  # the modules may have at-fork work of their own
                self.generation += 1
                # Spares forked without the modules: the main program drops them too.
                for serial in self.idle:
                    self._signal(self.by_serial[serial], signal.SIGKILL, None)
        if self.reader.eof:
            self._main_program_gone()

    def _activate(self, serial: int, daemon: bool, graceful: bool, grace: float) -> None:
        proc = self.by_serial.get(serial)
        if proc is None or proc.task:
            return  # it died before the main program took it: its reap was reported
        self.idle.discard(serial)
        proc.task = True
        proc.daemon = daemon
        proc.graceful = graceful
        proc.grace = grace

    def _signal(self, proc: _Proc, signum: int, escalate_after: Optional[float]) -> None:
        try:
            if signum == signal.SIGKILL:
                os.killpg(proc.pid, signal.SIGKILL)
            else:
                os.kill(proc.pid, signum)
        except OSError:
            pass
        if escalate_after is not None:
            kill_at = time.monotonic() + escalate_after
            if kill_at < self.kill_at.get(proc.pid, kill_at + 1):
                self.kill_at[proc.pid] = kill_at

    def _main_program_gone(self) -> None:
        """Stop every daemon task (graceful ones get SIGTERM and ``grace`` seconds), kill spares."""
        if self.ctl is not None:
            self.ctl.close()
            self.ctl = None
        self._drop_output()
        for proc in list(self.procs.values()):
            if not proc.task:
                self._signal(proc, signal.SIGKILL, None)
            elif not proc.daemon:
                continue
            elif proc.graceful:
                self._signal(proc, signal.SIGTERM, proc.grace)
            else:
                self._signal(proc, signal.SIGKILL, None)

    def _escalate(self) -> None:
        if not self.kill_at:
            return
        now = time.monotonic()
        for pid, kill_at in list(self.kill_at.items()):
            if kill_at <= now:
                del self.kill_at[pid]
                self._signal(self.procs[pid], signal.SIGKILL, None)

    def _report(self, kind: int, data: Any) -> None:
        if self.ctl is None:
            return
        message = _wire.pack_data(kind, data)
        if self.out:
            self.out[-1][0] += message  # goes out in the same system call
        else:
            self.out.append([bytearray(message), None])

    def _flush(self) -> None:
        """Send what the main program can take now; the rest waits for the socket."""
        while self.out and self.ctl is not None:
            entry = self.out[0]
            data, channel = entry
            try:
                if channel is None:
                    sent = self.ctl.send(data, socket.MSG_DONTWAIT)
                else:  # the channel rides on the message's first byte
                    rights = struct.pack("i", channel.fileno())
                    ancillary = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, rights)]
                    sent = self.ctl.sendmsg([data], ancillary, socket.MSG_DONTWAIT)
                    channel.close()
                    entry[1] = None
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                self._main_program_gone()
                return
            del data[:sent]
            if not data:
                self.out.popleft()

    def _drop_output(self) -> None:
        for _data, channel in self.out:
            if channel is not None:
                channel.close()
        self.out.clear()

    # -- children ---------------------------------------------------------------------------

    def _reap(self) -> None:
        while True:
            try:
                info = os.waitid(os.P_ALL, 0, os.WEXITED | os.WNOHANG | os.WNOWAIT)
            except ChildProcessError:
                return
            if info is None or info.si_pid == 0:
                return
            pid = info.si_pid
            # The leader is a zombie: its group id cannot be reused yet, so this reaches only
            # what the task left behind in its group.
            try:
                os.killpg(pid, signal.SIGKILL)
            except OSError:
                pass
            _, status = os.waitpid(pid, 0)
            proc = self.procs.pop(pid, None)
            self.kill_at.pop(pid, None)
            if proc is not None:
                del self.by_serial[proc.serial]
                self.idle.discard(proc.serial)
                self._report(_wire.Z_REAPED, (proc.serial, os.waitstatus_to_exitcode(status)))

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
            self._become_task(theirs)
        theirs.close()
        try:
            os.setpgid(pid, pid)  # also done in the child: whichever runs first wins the race
        except OSError:
            pass
        proc = _Proc(next(self.serials), pid)
        self.procs[pid] = proc
        self.by_serial[proc.serial] = proc
        self.idle.add(proc.serial)
        self.owed = max(0, self.owed - 1)
        message = pickle.dumps((proc.serial, pid, self.generation), pickle.HIGHEST_PROTOCOL)
        # After the reports queued before it: a reaped pid is reported before its reuse here.
        self.out.append([bytearray(_wire.pack(_wire.Z_SPARE, message)), mine])
        self._flush()

    def _become_task(self, sock: socket.socket) -> None:
        """In the spare: wait for a task from the main program, then run it; never returns."""
        try:
            signal.set_wakeup_fd(-1)
            _child.set_handler(signal.SIGCHLD, _child.SIG_DFL)  # SIGINT: prepare_process()
            os.close(self.wake_r)
            os.close(self.wake_w)
            if self.ctl is not None:
                self.ctl.close()
            self._drop_output()
            try:
                os.setpgid(0, 0)
            except OSError:
                pass
            _child.prepare_process()
            # A spare ends when its channel does: the main program holds the other end, and
            # closes it when the zygote dies; the kernel closes it when the main program does.
            message = _wire.recv_message(sock)
            if message is None or message[0] != _wire.SETTINGS:
                os._exit(0)  # dropped unused: the main program ended, or preloaded modules
            settings = pickle.loads(message[1])
            if settings["daemon"]:
                # A daemon task dies with its zygote (which outlives the main program only to
                # stop daemon tasks gracefully). Set here, not at the fork: a non-daemon task
                # must outlive the zygote, and clearing the signal later would race its exit.
                set_parent_death_signal(signal.SIGKILL)
                if os.getppid() != self.pid:
                    os._exit(1)  # the zygote is already gone
        except BaseException:
            os._exit(1)
        _child.run(sock, settings, prepared=True)


def preload(names: List[str]) -> None:
    """Import modules in the zygote, so that every task forked later has them imported."""
    for name in names:
        try:
            __import__(name)
        except BaseException as exc:  # report any failure, keep serving
            print(f"bgtask: could not preload {name!r}: {type(exc).__name__}: {exc}", file=sys.stderr)
            continue
        if _thread_count() > 1:
            print(
                f"bgtask: preloading {name!r} started a thread in the zygote; tasks forked from "
                "a process with threads can deadlock: do not preload it",
                file=sys.stderr,
            )


def _thread_count() -> int:
    try:
        return len(os.listdir("/proc/self/task"))
    except OSError:
        import threading

        return threading.active_count()


def plain_fork() -> Optional[Callable[[], int]]:
    """The C library's ``fork()``, for a zygote that imported nothing beyond its own modules.

    ``os.fork()`` also runs CPython's after-fork work in the child: it re-creates the locks
    and thread records that other threads may have held, and runs the after-fork functions
    modules registered. In this single-threaded process with only bgtask, cloudpickle and
    their standard modules imported, that work has nothing to repair: those functions belong to
    ``threading`` and ``logging`` and reset thread and lock state. Yet it writes to memory the
    child shares with the zygote, and the copies cost each task about 0.4 ms, a third of what
    it spends starting. So the zygote calls ``fork()`` itself, through ``ctypes``, which lets go
    of the GIL around the call: the child takes it again as the only thread.

    ``None`` (use ``os.fork``) when that reasoning may not hold: not Linux, not CPython with a
    GIL, more than one thread, or a module with after-fork work of its own imported (``random``
    reseeds itself in a child). A preload switches the zygote to ``os.fork`` for good.
    """
    if not sys.platform.startswith("linux") or sys.implementation.name != "cpython":
        return None
    if "t" in getattr(sys, "abiflags", "") or _thread_count() != 1:  # "t": free-threaded
        return None
    if any(name in sys.modules for name in ("random", "concurrent.futures.thread", "multiprocessing")):
        return None
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        c_fork = libc.fork
    except (OSError, AttributeError):
        return None
    c_fork.restype = ctypes.c_int
    c_fork.argtypes = []

    def fork() -> int:
        pid: int = c_fork()
        if pid < 0:
            errno = ctypes.get_errno()
            raise OSError(errno, os.strerror(errno))
        return pid

    return fork


def main(ctl_fd: int) -> None:
    """Entry point of the zygote process; ``ctl_fd`` is its control socket."""
    ctl = socket.socket(fileno=ctl_fd)
    ctl.set_inheritable(False)
    boot = _wire.recv_message(ctl)
    if boot is None:
        os._exit(0)
    config = pickle.loads(boot[1])
    sys.path[:] = config["sys_path"]
    set_parent_death_signal(0)  # loads libc here once, not in every task
    modules = config.get("preload", ())
    fork = None if modules else plain_fork()
    preload(modules)
    _child.prepare_streams()  # inherited by every task
    Zygote(ctl, fork or os.fork).serve()
