"""Starting tasks through bgtask's zygote: the main program's side of it (see ``_backends.zygote``).

::

    zygote ──Spare(serial, pid, generation) + its channel──> SparePool (usually two held)
    call: take a spare (wait for one if none is held) ──Activate(serial, daemon...)──> zygote
          write settings + payload to the spare's channel: it is the task now
    zygote ──Reaped(serial, exit code)──> the task's TaskProcess (in the monitor)

Spares are named by serial numbers the zygote never reuses, so a message cannot reach a process
that only got a recycled pid. The environment and ``sys.path`` travel to the zygote when they
change (a new generation); a spare forked in an older generation gets them with its task. When
the zygote dies, its tasks are followed through their channels and signalled through pidfds.
"""

from __future__ import annotations

import collections
import os
import pickle
import signal
import socket
import subprocess
import sys
import threading
import time
from typing import TYPE_CHECKING, Any, Deque, Dict, List, Optional, Set, Tuple

from .._monitor import loop as _monitor
from .._monitor import process as _process
from .._monitor.process import TaskProcess
from .._shared import PACKAGE_DIR, context
from .._shared import green as _green
from .._shared import platform as _platform
from .._shared import wire as _wire
from .._shared.context import atomic
from .._shared.wire import Settings

if TYPE_CHECKING:
    from .._shared.serialization import Payload

# How long the exit procedure waits for a zygote to exit after its control socket closed.
ZYGOTE_EXIT_WAIT_S = 2.0
# How long a call waits for the zygote to fork a process when it holds no spare.
SPARE_WAIT_S = 60.0
# How many spares found dead (killed from outside) a call replaces before it gives up.
DEAD_SPARES_MAX = 8


class ZygoteGone(ConnectionError):
    """The zygote exited or died; a new one is started for the next call."""


class ZygoteLauncher:
    """Start tasks through this process's zygote, started on first use and again if it dies."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._client: Optional[ZygoteClient] = None
        self.preload: List[str] = []

    def add_preload(self, names: List[str]) -> None:
        """Modules for the zygote to import: now if it runs, at its start otherwise."""
        with self._lock:
            new = [name for name in names if name not in self.preload]
            self.preload.extend(new)
            client = self._client
        if new and client is not None and client.owner == os.getpid():
            client.preload(new)

    def start(self, settings: Settings, payload: Payload) -> TaskProcess:
        # A spare that died before it read its call is replaced; a zygote that died, once.
        lost_zygotes = dead_spares = 0
        monitor = _monitor.get()
        monitor.hold()  # spares arrive through the monitor while this call waits for one
        try:
            while True:
                client = self.client()
                try:
                    spare = client.pool.take(client)
                    process, messages, fds = client.activate(spare, settings, payload.body)
                except ZygoteGone:
                    client.lost()
                    lost_zygotes += 1
                    if lost_zygotes > 1:
                        raise
                    continue
                try:
                    if payload.fds:  # on the payload's own first byte
                        _wire.send_messages(spare.sock, messages[:-1], fds)
                        _wire.send_messages(spare.sock, messages[-1:], payload.fds)
                    else:
                        _wire.send_messages(spare.sock, messages, fds)
                except BaseException as exc:
                    # The spare died (OSError), or the call was interrupted mid-write: either
                    # way it never runs this call; closing its channel ends it.
                    client.deactivate(spare.serial)
                    process.discard()
                    if not isinstance(exc, OSError):
                        raise
                    dead_spares += 1
                    if dead_spares > DEAD_SPARES_MAX:
                        raise OSError("the zygote's processes die before they get their task") from None
                    continue
                return process
        finally:
            monitor.release()

    def client(self) -> ZygoteClient:
        """The running zygote's client, started if there is none."""
        with self._lock:
            client = self._client
            if client is None or not client.alive or client.owner != os.getpid():
                client = self._client = ZygoteClient(self.preload)
                _process.started(client.ctl)  # from now on forget_in_child() closes it
            return client

    def current(self) -> Optional[ZygoteClient]:
        """The zygote's client if one runs (for tests and diagnostics)."""
        return self._client

    def close(self) -> None:
        with self._lock:
            client, self._client = self._client, None
        if client is not None and client.owner == os.getpid():
            client.close()

    def forget_in_child(self) -> None:
        client, self._client = self._client, None
        self._lock = threading.Lock()
        if client is not None:
            client.close_in_child()


class Spare:
    """A process the zygote forked ahead: its pid, and the main program's end of its channel."""

    __slots__ = ("generation", "pid", "serial", "sock")

    def __init__(self, serial: int, pid: int, generation: int, sock: socket.socket) -> None:
        self.serial = serial
        self.pid = pid
        self.generation = generation
        self.sock = sock


class SparePool:
    """The spares this program holds, and what a call waiting for one needs to know."""

    def __init__(self, lock: threading.Lock) -> None:
        self.changed = threading.Condition(lock)  # a spare arrived, a fork failed, or death
        self.spares: Deque[Spare] = collections.deque()
        self.failures = 0  # forks the zygote reported failed, and the last reason
        self.failure = ""
        # A spare forked before the last preload lacks the preloaded modules: it is dropped.
        self.preload_generation = 0
        self.closed = False

    def take(self, client: ZygoteClient) -> Spare:
        """A spare, waiting for the zygote to fork one if none is held.

        Raises ``ZygoteGone`` if the zygote is gone, ``OSError`` if it cannot fork.
        """
        with self.changed:
            failures: Optional[int] = None
            deadline = 0.0
            while True:
                if self.closed:
                    raise ZygoteGone("the zygote is gone")
                while self.spares:
                    spare = self.spares.popleft()
                    if spare.generation >= self.preload_generation:
                        return spare
                    spare.sock.close()
                if failures is None:
                    failures = self.failures
                    deadline = time.monotonic() + SPARE_WAIT_S
                    try:
                        client.send_locked(_wire.Want())
                    except OSError as exc:
                        raise ZygoteGone(f"the zygote is gone: {exc}") from exc
                elif self.failures != failures:
                    raise OSError(self.failure)
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise OSError(f"the zygote forked no process within {SPARE_WAIT_S:.0f} s")
                self.changed.wait(remaining)

    def put(self, spare: Spare) -> None:
        """Under the lock: a spare arrived."""
        if self.closed or spare.generation < self.preload_generation:
            spare.sock.close()
        else:
            self.spares.append(spare)
            self.changed.notify()

    def fail(self, reason: str) -> None:
        """Under the lock: no spare is coming for a waiting call."""
        self.failures += 1
        self.failure = reason
        self.changed.notify_all()

    def drop(self, serial: int) -> None:
        """Under the lock: a spare died unused (killed from outside)."""
        for spare in self.spares:
            if spare.serial == serial:
                self.spares.remove(spare)
                spare.sock.close()
                return

    def clear(self) -> None:
        """Under the lock: close every spare held."""
        while self.spares:
            self.spares.popleft().sock.close()

    def close(self) -> None:
        """Under the lock: the zygote is gone; wake every waiting call."""
        self.closed = True
        self.clear()
        self.changed.notify_all()


_BOOT = "import sys; sys.path.insert(0, {path!r}); from bgtask._backends.zygote import main; main({fd})"


def _environ_snapshot() -> Dict[Any, Any]:
    """A cheap copy of the environment, to tell whether it changed since the last task."""
    data = getattr(os.environ, "_data", None)  # the encoded mapping: no decoding needed
    return dict(data) if isinstance(data, dict) else dict(os.environ)


def _stdio_identity() -> Tuple[Any, ...]:
    """What standard output and error are now: a task gets them when they changed."""
    ids: List[Any] = []
    for fd in (1, 2):
        try:
            st = os.fstat(fd)
            ids.append((st.st_dev, st.st_ino))
        except OSError:
            ids.append(None)
    return tuple(ids)


class ZygoteClient:
    """The main program's end of one zygote process: its control socket and its spares."""

    def __init__(self, preload: List[str]) -> None:
        self.owner = os.getpid()
        self.alive = True
        self.lock = threading.Lock()
        self.pool = SparePool(self.lock)
        self.processes: Dict[int, TaskProcess] = {}  # by spare serial, from activation to end
        self.daemons: Set[int] = set()  # the serials of those that are daemon tasks
        self.reader = _wire.MessageReader(maxfds=1)
        # Generations: each change of environment or sys.path, and each preload, starts one, in
        # the zygote too. A spare forked in an older generation gets the environment with its
        # task.
        self.generation = 0
        self.last_env = _environ_snapshot()  # what the zygote starts with
        self.last_path = list(sys.path)
        self.stdio = _stdio_identity()
        package_parent = os.path.dirname(PACKAGE_DIR)
        # A copy of this program forked meanwhile must not hold the control socket: the zygote
        # would not see the main program's end.
        with _process.new_channel() as (mine, theirs):
            args = [
                sys.executable,
                *subprocess._args_from_interpreter_flags(),  # type: ignore[attr-defined]
                "-c",
                _BOOT.format(path=package_parent, fd=theirs.fileno()),
            ]
            self.process = subprocess.Popen(
                args,
                pass_fds=[theirs.fileno()],
                stdin=subprocess.DEVNULL,
                start_new_session=True,
                close_fds=True,
            )
            task = context.current
            if task is not None:
                # In a task: its own zygote, which it spares at its end, and which the outer
                # zygote spares when this task is gone (told through the main program).
                pid = self.process.pid
                task.helpers.add(pid)
                start = _platform.process_start_time(pid)
                task.send(_wire.HELPER, pickle.dumps((pid, start), pickle.HIGHEST_PROTOCOL))
        self.ctl = mine
        try:
            self.ctl.sendall(_wire.encode(_wire.Boot(self.last_path, list(preload))))
            _monitor.get().add_reader(self.ctl, self._on_readable)
        except BaseException:
            _process.started(mine)
            mine.close()  # the zygote exits on EOF before its boot message
            self.process.wait()
            raise

    # -- calls ------------------------------------------------------------------------------

    def activate(
        self, spare: Spare, settings: Settings, payload: _wire.Body
    ) -> Tuple[TaskProcess, List[Tuple[int, _wire.Body]], Tuple[int, ...]]:
        """Make the spare this call's task: the zygote is told, and its process is followed.

        Returns the process and what to write to the spare's channel (with the descriptors to
        attach). Raises ``ZygoteGone`` if the zygote is gone.
        """
        serial = spare.serial

        def signaller(signum: int, escalate_after: Optional[float]) -> bool:
            return self.send(_wire.Signal(serial, signum, escalate_after))

        def forget() -> None:
            with self.lock:
                self.processes.pop(serial, None)
                self.daemons.discard(serial)

        def helper(pid: int, start: int) -> None:
            self.send(_wire.Helper(serial, pid, start))

        process = TaskProcess(spare.pid, spare.sock, signaller, on_end=forget, on_helper=helper)
        try:
            with self.lock:
                if not self.alive:
                    raise ZygoteGone("the zygote is gone")
                self._sync_environment()
                if spare.generation < self.generation:
                    settings = dict(settings, env=dict(os.environ), sys_path=self.last_path)
                fds: Tuple[int, ...] = ()
                if _stdio_identity() != self.stdio:
                    settings = dict(settings, stdio=True)
                    fds = (1, 2)
                self.processes[serial] = process
                if settings["daemon"]:
                    self.daemons.add(serial)
                self.send_locked(
                    _wire.Activate(serial, settings["daemon"], settings["graceful"], settings["grace"])
                )
        except BaseException as exc:
            process.discard()
            if isinstance(exc, OSError) and not isinstance(exc, ZygoteGone):
                raise ZygoteGone(f"the zygote is gone: {exc}") from exc
            raise
        packed = pickle.dumps(settings, pickle.HIGHEST_PROTOCOL)
        return process, [(_wire.SETTINGS, packed), (_wire.PAYLOAD, payload)], fds

    def deactivate(self, serial: int) -> None:
        """The spare died before it got its task: forget it (the zygote reaps it)."""
        with self.lock:
            self.processes.pop(serial, None)

    def _sync_environment(self) -> None:
        """Under the lock: tell the zygote a changed environment, for the spares it forks next."""
        env = _environ_snapshot()
        path = list(sys.path)
        if env != self.last_env or path != self.last_path:
            self.last_env = env
            self.last_path = path
            self.send_locked(_wire.SetEnv(dict(os.environ), path))
            self.generation += 1

    def preload(self, names: List[str]) -> None:
        with self.lock:
            if not self.alive:
                return
            self.send_locked(_wire.Preload(names))
            self.generation += 1
            self.pool.preload_generation = self.generation
            self.pool.clear()

    def send(self, message: Any) -> bool:
        """Send a control message; ``False`` if the zygote is gone."""
        with self.lock:
            if not self.alive:
                return False
            try:
                self.send_locked(message)
            except OSError:
                return False  # the monitor learns of the zygote's death from its socket
            return True

    def send_locked(self, message: Any) -> None:
        """Under the lock: send a control message whole.

        A ``KeyboardInterrupt`` between two partial writes would tear the frame, and the zygote
        would read garbage: SIGINT waits meanwhile (in the main thread, where it is handled).
        """
        data = _wire.encode(message)
        with atomic():  # a Ctrl-C meanwhile comes once the message is whole
            self.ctl.sendall(data)

    # -- in the monitor ---------------------------------------------------------------------

    def _on_readable(self) -> None:
        """Spares and reports from the zygote."""
        reader = self.reader
        reader.feed_from(self.ctl)
        messages, reader.messages = reader.messages, []
        all_fds, reader.fds = reader.fds, []
        for (kind, body), fds in zip(messages, all_fds):
            message = _wire.decode(kind, body)
            if isinstance(message, _wire.Spare):
                self._add_spare(message, fds)
                continue
            for fd in fds:
                os.close(fd)
            if isinstance(message, _wire.Reaped):
                with self.lock:
                    process = self.processes.get(message.serial)
                    if process is None:
                        self.pool.drop(message.serial)
                if process is not None:
                    process.reaped(message.exitcode)
            elif isinstance(message, _wire.NoSpare):
                with self.lock:
                    self.pool.fail(message.reason)
        if reader.eof:
            self.lost()

    def _add_spare(self, message: _wire.Spare, fds: List[int]) -> None:
        with self.lock:
            if len(fds) != 1:
                # The kernel dropped the descriptor: this process has none free. The spare
                # is of no use; a waiting call fails, and the zygote forks again only when asked.
                for fd in fds:
                    os.close(fd)
                self.pool.fail("no free file descriptor in this process for the task's channel")
                if self.alive:
                    try:
                        self.send_locked(_wire.Drop(message.serial))
                    except OSError:
                        pass
                return
            sock = _green.socket_from_fd(fds[0])
            sock.set_inheritable(False)  # where MSG_CMSG_CLOEXEC is missing (macOS)
            self.pool.put(Spare(message.serial, message.pid, message.generation, sock))

    # -- the end ----------------------------------------------------------------------------

    def _end(self) -> bool:
        """Mark this client gone, drop its spares, wake waiting calls; ``False`` if it was."""
        with self.lock:
            if not self.alive:
                return False
            self.alive = False
            self.pool.close()
            return True

    def lost(self) -> None:
        """The zygote died: its tasks can only be followed through their own channels now."""
        if self._end():
            _monitor.get().call_soon(lambda: self._release(died=True))

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
        _monitor.get().call_soon(lambda: self._release(died=False))

    def _release(self, died: bool) -> None:
        """In the monitor, once the zygote is gone or going: read its last reports, close it.

        The tasks still running are then followed through their own channels. ``died``: it did
        not close in order (which stops daemon tasks gracefully) but died.
        """
        self._on_readable()
        _monitor.get().remove_reader(self.ctl)
        self.ctl.close()
        if self.process.poll() is None:
            # Reaped later, without blocking the monitor; a zygote that closed its socket
            # exits once its daemon tasks are stopped.
            threading.Thread(target=self._reap_later, name="bgtask-zygote-reaper", daemon=True).start()
        with self.lock:
            processes, self.processes = dict(self.processes), {}
            daemons, self.daemons = self.daemons, set()
        for serial, process in processes.items():
            if died and serial in daemons:
                # A daemon task dies with its zygote (its parent-death signal), and no zygote is
                # left to kill what it left in its group: do it here. A group's id is not reused
                # while the group has members.
                try:
                    os.killpg(process.pid, signal.SIGKILL)
                except OSError:
                    pass
            process.lost()

    def _reap_later(self) -> None:
        self.process.wait()

    def close_in_child(self) -> None:
        """In a forked copy: release the descriptors; the copy gets a zygote of its own."""
        # The zygote is the original's child, not this copy's: no "still running" warning when
        # this Popen is collected here.
        self.process._child_created = False  # type: ignore[attr-defined]
        for sock in [self.ctl, *(spare.sock for spare in self.pool.spares)]:
            try:
                sock.close()
            except OSError:
                pass
