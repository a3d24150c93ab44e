"""The zygote: a small single-threaded process that forks task processes for one main program.

::

    main program --control socket--> zygote --fork--> spare (forked ahead, waiting)
         |                              |                  | activated: gets its task socket,
         +------- task socket ---------------------------->+ becomes the task process
                                        |
                                        +-- reaps tasks, reports exit codes to the main program
                                        +-- main program gone (control socket EOF): stops daemon
                                            tasks (SIGTERM, then SIGKILL of the group after grace)

The zygote is started once, lazily, with exec (so it never inherits the main program's threads,
locks or file descriptors), in a session of its own (so terminal signals do not reach it or its
tasks). It has bgtask and cloudpickle imported and keeps one child forked ahead, so a call only
hands over a socket. Being the parent of every task, it is the one process that can signal a task
without racing pid reuse: it kills a group only while the group's leader is not yet reaped.

It imports only the task runtime; it never unpickles user data itself.
"""

from __future__ import annotations

import collections
import gc
import os
import pickle
import select
import signal
import socket
import sys
import time
from typing import Any, Deque, Dict, List, Optional, Tuple

from . import _child, _wire
from ._platform import set_parent_death_signal

# Children forked ahead, waiting for a task: a burst of calls does not wait for forks.
SPARES = 2


class _Child:
    __slots__ = ("daemon", "grace", "graceful", "kill_at", "pid", "task_id")

    def __init__(self, task_id: int, pid: int, settings: Dict[str, Any]) -> None:
        self.task_id = task_id
        self.pid = pid
        self.daemon: bool = settings["daemon"]
        self.graceful: bool = settings["graceful"]
        self.grace: float = settings["grace"]
        self.kill_at: Optional[float] = None


class Zygote:
    """The zygote's state and loop."""

    def __init__(self, ctl: socket.socket) -> None:
        self.ctl: Optional[socket.socket] = ctl
        self.reader = _wire.MessageReader()
        self.children: Dict[int, _Child] = {}  # by pid, until reaped
        self.by_task: Dict[int, int] = {}  # task id -> pid, until reaped
        self.spares: Deque[Tuple[int, socket.socket]] = collections.deque()
        self.pid = os.getpid()
        self.served = 0  # spawn requests handled, for the main program's count of spares
        self.reported: Tuple[int, int] = (-1, -1)
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
            self._reap()
            if self.ctl is not None and self.ctl in readable:
                self._read_control()
            self._escalate()
            self._refill()
            self._report_spares()
        for _pid, sock in self.spares:
            sock.close()  # the spare sees EOF and exits
        os._exit(0)

    def _report_spares(self) -> None:
        """Tell the main program how many spares are ready, so a call can know it will start."""
        state = (self.served, len(self.spares))
        if state != self.reported:
            self.reported = state
            self._report(_wire.Z_SPARES, state)

    def _refill(self) -> None:
        """Fork spares up to ``SPARES``, but serve a waiting request first."""
        while len(self.spares) < SPARES and self.ctl is not None:
            if select.select([self.ctl], [], [], 0)[0]:
                return
            try:
                self._fork_spare()
            except OSError:
                return  # out of processes or descriptors: a request will say so

    def _wait(self) -> List[Any]:
        fds: List[Any] = [self.wake_r]
        if self.ctl is not None:
            fds.append(self.ctl)
        deadlines = [c.kill_at for c in self.children.values() if c.kill_at is not None]
        timeout = 1.0  # a lost SIGCHLD costs at most this; reaping never depends on it alone
        if deadlines:
            timeout = max(0.0, min(timeout, min(deadlines) - time.monotonic()))
        try:
            readable, _, _ = select.select(fds, [], [], timeout)
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
        return any(c.daemon for c in self.children.values())

    # -- control messages -------------------------------------------------------------------

    def _read_control(self) -> None:
        assert self.ctl is not None
        try:
            message = _wire.recv_message_with_fds(self.ctl, 1)
        except OSError:
            message = None
        if message is None:
            self._main_program_gone()
            return
        kind, body, fds = message
        if kind == _wire.Z_SPAWN:
            self._spawn(body, fds[0])
        elif kind == _wire.Z_PRELOAD:
            preload(pickle.loads(body))
            for _pid, sock in self.spares:  # forked without the modules: let them go
                sock.close()
            self.spares.clear()
        elif kind == _wire.Z_SIGNAL:
            for fd in fds:
                os.close(fd)
            task_id, signum, escalate_after = pickle.loads(body)
            pid = self.by_task.get(task_id)
            if pid is not None:
                self._signal(self.children[pid], signum, escalate_after)

    def _spawn(self, body: bytes, fd: int) -> None:
        settings: Dict[str, Any] = pickle.loads(body)
        task_id: int = settings["task_id"]
        started: Any = "no process could be started"
        for _attempt in range(2):
            if not self.spares:
                try:
                    self._fork_spare(close_in_child=fd)
                except OSError as exc:  # EAGAIN at RLIMIT_NPROC, ENOMEM, EMFILE...
                    started = f"fork() failed: {exc}"
                    break
            pid, sock = self.spares.popleft()
            try:
                _wire.send_message_with_fds(sock, _wire.Z_SPAWN, body, [fd])
            except OSError:  # the spare died (killed from outside): fork another
                sock.close()
                continue
            sock.close()
            started = pid
            self.children[pid] = _Child(task_id, pid, settings)
            self.by_task[task_id] = pid
            break
        os.close(fd)
        self.served += 1
        # The count of spares rides along: one message, one wake-up of the main program.
        self.reported = (self.served, len(self.spares))
        self._report(_wire.Z_STARTED, (task_id, (started, *self.reported)))
        # What the main program changed since the last task also holds for the next spare.
        env = settings.get("env")
        if env is not None:
            os.environ.clear()
            os.environ.update(env)
        if settings.get("sys_path") is not None:
            sys.path[:] = settings["sys_path"]

    def _signal(self, child: _Child, signum: int, escalate_after: Optional[float]) -> None:
        try:
            if signum == signal.SIGKILL:
                os.killpg(child.pid, signal.SIGKILL)
            else:
                os.kill(child.pid, signum)
        except OSError:
            pass
        if escalate_after is not None:
            kill_at = time.monotonic() + escalate_after
            if child.kill_at is None or kill_at < child.kill_at:
                child.kill_at = kill_at

    def _main_program_gone(self) -> None:
        """Stop every daemon task: graceful ones get SIGTERM and ``grace`` seconds."""
        if self.ctl is not None:
            self.ctl.close()
            self.ctl = None
        for child in list(self.children.values()):
            if not child.daemon:
                continue
            if child.graceful:
                self._signal(child, signal.SIGTERM, child.grace)
            else:
                self._signal(child, signal.SIGKILL, None)

    def _escalate(self) -> None:
        now = time.monotonic()
        for child in self.children.values():
            if child.kill_at is not None and child.kill_at <= now:
                child.kill_at = None
                self._signal(child, signal.SIGKILL, None)

    def _report(self, kind: int, data: Any) -> None:
        if self.ctl is None:
            return
        try:
            self.ctl.sendall(_wire.pack_data(kind, data))
        except OSError:
            self._main_program_gone()

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
            child = self.children.pop(pid, None)
            if child is not None:
                # The leader is a zombie: its group id cannot be reused yet, so this reaches
                # only what the task left behind in its group.
                try:
                    os.killpg(pid, signal.SIGKILL)
                except OSError:
                    pass
            _, status = os.waitpid(pid, 0)
            if child is not None:
                del self.by_task[child.task_id]
                self._report(_wire.Z_REAPED, (child.task_id, os.waitstatus_to_exitcode(status)))
            else:
                for spare in self.spares:
                    if spare[0] == pid:  # a spare died (killed from outside)
                        spare[1].close()
                        self.spares.remove(spare)
                        break

    def _fork_spare(self, close_in_child: int = -1) -> None:
        """Fork a spare; ``close_in_child`` is a task's socket the spare must not hold."""
        mine, theirs = socket.socketpair()
        gc.freeze()  # objects of the zygote stay in pages the tasks share, unwritten
        try:
            pid = os.fork()
        except OSError:
            mine.close()
            theirs.close()
            raise
        if pid == 0:
            mine.close()
            if close_in_child >= 0:
                os.close(close_in_child)
            self._become_task(theirs)
        theirs.close()
        try:
            os.setpgid(pid, pid)  # also done in the child: whichever runs first wins the race
        except OSError:
            pass
        self.spares.append((pid, mine))

    def _become_task(self, sock: socket.socket) -> None:
        """In the spare: wait to be activated, then run the task; never returns."""
        try:
            signal.set_wakeup_fd(-1)
            signal.signal(signal.SIGCHLD, signal.SIG_DFL)
            signal.signal(signal.SIGINT, signal.SIG_DFL)
            os.close(self.wake_r)
            os.close(self.wake_w)
            if self.ctl is not None:
                self.ctl.close()
            try:
                os.setpgid(0, 0)
            except OSError:
                pass
            # A daemon task dies with its zygote; the zygote itself outlives the main program
            # only to stop its daemon tasks gracefully.
            set_parent_death_signal(signal.SIGKILL)
            if os.getppid() != self.pid:
                os._exit(0)
            _child.prepare_process()
            message = _wire.recv_message_with_fds(sock, 1)
            sock.close()
            if message is None:
                os._exit(0)
            _kind, body, fds = message
            settings = pickle.loads(body)
            for _pid, other in self.spares:  # the spares forked before this one
                other.close()
            if not settings["daemon"]:
                set_parent_death_signal(0)
            task_sock = socket.socket(fileno=fds[0])
            task_sock.set_inheritable(False)
        except BaseException:
            os._exit(1)
        _child.run(task_sock, settings, prepared=True)


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
    preload(config.get("preload", ()))
    _child.prepare_streams()  # inherited by every task
    Zygote(ctl).serve()
