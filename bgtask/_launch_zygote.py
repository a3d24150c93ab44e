"""Starting tasks through bgtask's zygote: the main program's side of it (see ``_zygote``).

::

    zygote ──spare(serial, pid, generation) + its channel──> spares held here (usually two)
    call: take a spare (wait for one if none is held) ──activate(serial, daemon...)──> zygote
          write settings + payload to the spare's channel: it is the task now
    zygote ──reaped(serial, exit code)──> the task's watch

Spares are named by serial numbers the zygote never reuses, so a message cannot reach a process
that only got a recycled pid. The environment and ``sys.path`` travel to the zygote when they
change (a new generation); a spare forked in an older generation gets them with its task.
"""

from __future__ import annotations

import collections
import os
import pickle
import socket
import subprocess
import sys
import threading
import time
from typing import Any, Deque, Dict, List, Optional

from . import _monitor, _wire
from ._launch import Settings, Watch, attach, maybe_finish

# How long the exit procedure waits for a zygote to exit after its control socket closed.
ZYGOTE_EXIT_WAIT_S = 2.0
# How long a call waits for the zygote to fork a process when it holds no spare.
SPARE_WAIT_S = 60.0
# How many spares found dead (killed from outside) a call replaces before it gives up.
DEAD_SPARES_MAX = 8


def _environ_snapshot() -> Dict[Any, Any]:
    """A cheap copy of the environment, to tell whether it changed since the last task."""
    data = getattr(os.environ, "_data", None)  # the encoded mapping: no decoding needed
    return dict(data) if isinstance(data, dict) else dict(os.environ)


class ZygoteLauncher:
    """Start tasks through this process's zygote, started on first use and again if it dies."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._zygote: Optional[_ZygoteHandle] = None
        self.preload: List[str] = []

    def add_preload(self, names: List[str]) -> None:
        """Modules for the zygote to import: now if it runs, at its start otherwise."""
        with self._lock:
            new = [name for name in names if name not in self.preload]
            self.preload.extend(new)
            zygote = self._zygote
        if new and zygote is not None and zygote.owner == os.getpid():
            zygote.preload(new)

    def start(self, task: Any, settings: Settings, payload: bytes) -> None:
        # A spare that died before it read its call is replaced; a zygote that died, once.
        lost_zygotes = dead_spares = 0
        while True:
            watch = Watch(task)
            zygote = self._get()
            try:
                spare = zygote.activate(watch, settings)
            except ConnectionError:
                zygote.lost()
                lost_zygotes += 1
                if lost_zygotes > 1:
                    raise
                continue
            try:
                packed = pickle.dumps(settings, pickle.HIGHEST_PROTOCOL)
                _wire.send_messages(spare.sock, [(_wire.SETTINGS, packed), (_wire.PAYLOAD, payload)])
            except OSError:
                zygote.deactivate(spare)
                dead_spares += 1
                if dead_spares > DEAD_SPARES_MAX:
                    raise OSError("the zygote's processes die before they get their task") from None
                continue
            break
        task._launcher = self
        task._launcher_data = (zygote, spare.serial)
        task._watch = watch
        task._sock = spare.sock
        task._set_pid(spare.pid)
        attach(watch, spare.sock)

    def signal(self, task: Any, signum: int, escalate_after: Optional[float]) -> None:
        zygote, serial = task._launcher_data
        zygote.send(_wire.Z_SIGNAL, (serial, signum, escalate_after))

    def _get(self) -> _ZygoteHandle:
        with self._lock:
            if self._zygote is None or not self._zygote.alive or self._zygote.owner != os.getpid():
                self._zygote = _ZygoteHandle(self.preload)
            return self._zygote

    def shutdown(self) -> None:
        with self._lock:
            zygote, self._zygote = self._zygote, None
        if zygote is not None and zygote.owner == os.getpid():
            zygote.close()

    def forget_in_child(self) -> None:
        zygote, self._zygote = self._zygote, None
        self._lock = threading.Lock()
        if zygote is not None:
            zygote.close_in_child()


_BOOT = "import sys; sys.path.insert(0, {path!r}); from bgtask._zygote import main; main({fd})"


class _Spare:
    """A process the zygote forked ahead: its pid, and the main program's end of its channel."""

    __slots__ = ("generation", "pid", "serial", "sock")

    def __init__(self, serial: int, pid: int, generation: int, sock: socket.socket) -> None:
        self.serial = serial
        self.pid = pid
        self.generation = generation
        self.sock = sock


class _ZygoteHandle:
    """The main program's end of one zygote process, and the spares it handed over."""

    def __init__(self, preload: List[str]) -> None:
        self.owner = os.getpid()
        self.alive = True
        self.lock = threading.Lock()
        self.changed = threading.Condition(self.lock)  # a spare arrived, a fork failed, or death
        self.spares: Deque[_Spare] = collections.deque()
        self.watches: Dict[int, Watch] = {}  # by spare serial, from activation until reaped
        self.reader = _wire.MessageReader(maxfds=1)
        # Generations: each change of environment or sys.path, and each preload, starts one, in
        # the zygote too. A spare forked in an older generation gets the environment with its
        # task; one older than the last preload lacks modules and is dropped.
        self.generation = 0
        self.preload_generation = 0
        self.last_env = _environ_snapshot()  # what the zygote starts with
        self.last_path = list(sys.path)
        self.failures = 0  # forks the zygote reported failed, and the last reason
        self.failure = ""
        mine, theirs = socket.socketpair()
        package_parent = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        args = [
            sys.executable,
            *subprocess._args_from_interpreter_flags(),  # type: ignore[attr-defined]
            "-c",
            _BOOT.format(path=package_parent, fd=theirs.fileno()),
        ]
        try:
            self.process = subprocess.Popen(
                args,
                pass_fds=[theirs.fileno()],
                stdin=subprocess.DEVNULL,
                start_new_session=True,
                close_fds=True,
            )
        finally:
            theirs.close()
        self.ctl = mine
        config = {"sys_path": self.last_path, "preload": list(preload)}
        self.ctl.sendall(_wire.pack_data(0, config))
        _monitor.get().add_reader(self.ctl, self._on_readable)

    def activate(self, watch: Watch, settings: Settings) -> _Spare:
        """Take a spare for the task (waiting for one if none is held) and tell the zygote.

        Raises ``ConnectionError`` if the zygote is gone, ``OSError`` if it cannot fork.
        """
        with self.changed:
            failures = None
            deadline = None
            while True:
                if not self.alive:
                    raise BrokenPipeError("the zygote is gone")
                if self.spares:
                    spare = self.spares.popleft()
                    if spare.generation < self.preload_generation:
                        spare.sock.close()
                        continue
                    break
                if failures is None:
                    failures = self.failures
                    deadline = time.monotonic() + SPARE_WAIT_S
                    self._send(_wire.Z_WANT, None)
                elif self.failures != failures:
                    raise OSError(self.failure)
                assert deadline is not None
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise OSError(f"the zygote forked no process within {SPARE_WAIT_S:.0f} s")
                self.changed.wait(remaining)
            try:
                self._sync_environment()
                if spare.generation < self.generation:
                    settings["env"] = dict(os.environ)
                    settings["sys_path"] = self.last_path
                self.watches[spare.serial] = watch
                message = (spare.serial, settings["daemon"], settings["graceful"], settings["grace"])
                self._send(_wire.Z_ACTIVATE, message)
            except BaseException:
                self.watches.pop(spare.serial, None)
                spare.sock.close()
                raise
            return spare

    def deactivate(self, spare: _Spare) -> None:
        """The spare died before it got its task: forget it (the zygote reaps it)."""
        with self.lock:
            self.watches.pop(spare.serial, None)
        spare.sock.close()

    def _sync_environment(self) -> None:
        """Under the lock: tell the zygote a changed environment, for the spares it forks next."""
        env = _environ_snapshot()
        path = list(sys.path)
        if env != self.last_env or path != self.last_path:
            self.last_env = env
            self.last_path = path
            self._send(_wire.Z_SETENV, (dict(os.environ), path))
            self.generation += 1

    def preload(self, names: List[str]) -> None:
        with self.lock:
            if not self.alive:
                return
            self._send(_wire.Z_PRELOAD, names)
            self.generation += 1
            self.preload_generation = self.generation
            self._close_spares()

    def send(self, kind: int, data: Any) -> None:
        with self.lock:
            if not self.alive:
                return
            try:
                self._send(kind, data)
            except OSError:
                pass  # the monitor learns of the zygote's death from its socket

    def _send(self, kind: int, data: Any) -> None:
        self.ctl.sendall(_wire.pack_data(kind, data))

    def _on_readable(self) -> None:
        """In the monitor: spares and reports from the zygote."""
        reader = self.reader
        reader.feed_from(self.ctl)
        messages, reader.messages = reader.messages, []
        all_fds, reader.fds = reader.fds, []
        for (kind, body), fds in zip(messages, all_fds):
            data = pickle.loads(body)
            if kind == _wire.Z_SPARE:
                serial, pid, generation = data
                self._add_spare(serial, pid, generation, fds)
                continue
            for fd in fds:
                os.close(fd)
            if kind == _wire.Z_REAPED:
                serial, exitcode = data
                with self.lock:
                    watch = self.watches.pop(serial, None)
                    if watch is None:
                        self._drop_spare(serial)
                if watch is not None:
                    watch.exitcode = exitcode
                    watch.reaped = True
                    maybe_finish(watch)
            elif kind == _wire.Z_NOSPARE:
                with self.lock:
                    self.failures += 1
                    self.failure = data
                    self.changed.notify_all()
        if reader.eof:
            self.lost()

    def _add_spare(self, serial: int, pid: int, generation: int, fds: List[int]) -> None:
        with self.lock:
            if len(fds) != 1:
                # The kernel dropped the descriptor: this process has none free. The spare
                # is of no use; a waiting call fails, and the zygote forks again only when asked.
                for fd in fds:
                    os.close(fd)
                self.failures += 1
                self.failure = "no free file descriptor in this process for the task's channel"
                self.changed.notify_all()
                if self.alive:
                    try:
                        self._send(_wire.Z_DROP, serial)
                    except OSError:
                        pass
                return
            sock = socket.socket(fileno=fds[0])
            sock.set_inheritable(False)  # where MSG_CMSG_CLOEXEC is missing (macOS)
            spare = _Spare(serial, pid, generation, sock)
            if not self.alive or generation < self.preload_generation:
                spare.sock.close()
            else:
                self.spares.append(spare)
                self.changed.notify()

    def _drop_spare(self, serial: int) -> None:
        """Under the lock: a spare died unused (killed from outside)."""
        for spare in self.spares:
            if spare.serial == serial:
                self.spares.remove(spare)
                spare.sock.close()
                return

    def _close_spares(self) -> None:
        while self.spares:
            self.spares.popleft().sock.close()

    def _end(self) -> bool:
        """Mark this handle gone, drop its spares, wake waiting calls; ``False`` if it was."""
        with self.lock:
            if not self.alive:
                return False
            self.alive = False
            self._close_spares()
            self.changed.notify_all()
            return True

    def lost(self) -> None:
        """The zygote died: its tasks can only be followed through their own sockets now."""
        if not self._end():
            return
        _monitor.get().call_soon(lambda: self._release(ZYGOTE_EXIT_WAIT_S))

    def close(self) -> None:
        """Orderly end: the zygote exits on EOF once it has no daemon task left."""
        if not self._end():
            return
        try:
            self.ctl.shutdown(socket.SHUT_WR)
        except OSError:
            pass
        try:
            self.process.wait(timeout=ZYGOTE_EXIT_WAIT_S)
        except subprocess.TimeoutExpired:
            pass  # it still stops its daemon tasks on its own, then exits
        _monitor.get().call_soon(lambda: self._release(0.0))

    def _release(self, wait_s: float) -> None:
        """In the monitor, once the zygote is gone or going: read its last reports, close it.

        The tasks still running are then followed through their own sockets.
        """
        self._on_readable()
        monitor = _monitor.get()
        monitor.remove_reader(self.ctl)
        self.ctl.close()
        try:
            self.process.wait(timeout=wait_s)
        except subprocess.TimeoutExpired:
            pass
        with self.lock:
            watches, self.watches = list(self.watches.values()), {}
        for watch in watches:
            watch.launcher_lost = True
            maybe_finish(watch)

    def close_in_child(self) -> None:
        """In a forked copy: release the descriptors; the copy gets a zygote of its own."""
        for sock in [self.ctl, *(spare.sock for spare in self.spares)]:
            try:
                sock.close()
            except OSError:
                pass
        self.spares.clear()
        self.alive = False
