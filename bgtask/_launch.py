"""The parent side of starting a task process: one seam, two kinds of launcher.

::

    Task start ──> launcher.start(task, settings, payload)
                      │ ZygoteLauncher (default): socketpair; the task's end goes to the zygote
                      │   with SCM_RIGHTS, the zygote hands it to its spare child; the payload
                      │   goes straight to the task over the socket
                      │ MultiprocessingLauncher ("fork", "spawn", "forkserver"): the task's end
                      │   is an argument of a multiprocessing.Process running the same runtime
                      v
               the monitor watches the socket (outcome) and the exit (zygote report or sentinel);
               once reaped, Task._finish() gets the exit code and the messages

Every launcher signals only what it started and has not seen reaped: the zygote kills a group
while its leader is still unreaped; the multiprocessing path is the parent (fork, spawn) and
stops signalling once the sentinel fires.
"""

from __future__ import annotations

import os
import pickle
import signal
import socket
import subprocess
import sys
import threading
import time
from typing import Any, Dict, List, Optional

from . import _monitor, _wire

Settings = Dict[str, Any]

# How long the exit procedure waits for a zygote to exit after its control socket closed.
ZYGOTE_EXIT_WAIT_S = 2.0
# How soon to look again for the exit status of a process whose sentinel fired.
REAP_RETRY_S = 0.001


class Watch:
    """What the monitor tracks for one task process until it is reaped."""

    __slots__ = ("exitcode", "launcher_lost", "process", "reader", "reaped", "sock", "task")

    def __init__(self, task: Any) -> None:
        self.task = task
        self.sock: Optional[socket.socket] = None
        self.reader = _wire.MessageReader()
        self.exitcode: Optional[int] = None
        self.reaped = False
        self.launcher_lost = False  # the zygote died: only the socket can tell the end now
        self.process: Any = None  # the multiprocessing.Process, for those start methods


# Outcomes that the task sends before it exits and that need no exit code: result() may
# return them at once, while join() still waits for the process to be reaped.
_EARLY = (_wire.RESULT, _wire.ERROR, _wire.FAILED)
_watch_lock = threading.Lock()


def _attach(watch: Watch, sock: socket.socket) -> None:
    """Start reading the task's socket, eagerly; from any thread, once the payload is sent."""
    monitor = _monitor.get()

    def on_readable() -> None:
        reader = watch.reader
        reader.feed_from(sock)
        if reader.messages and reader.messages[0][0] in _EARLY:
            watch.task._set_outcome(reader.messages[0])
        if reader.eof:
            monitor.remove_reader(sock)
            _maybe_finish(watch)

    with _watch_lock:
        watch.sock = sock
        if not (watch.reaped or watch.launcher_lost):
            monitor.add_reader(sock, on_readable)
            return
    monitor.call_soon(lambda: _maybe_finish(watch))


def _maybe_finish(watch: Watch) -> None:
    """In the monitor: finish the task once its process is reaped and its socket drained."""
    with _watch_lock:
        sock = watch.sock
        if sock is None:
            return  # the payload is still being sent; _attach calls again
        if not (watch.reaped or (watch.launcher_lost and watch.reader.eof)):
            return
        watch.sock = None
    if not watch.reader.eof:
        watch.reader.feed_from(sock)  # what the task wrote before it exited is all there
    _monitor.get().remove_reader(sock)
    sock.close()
    watch.task._finish(watch.exitcode, watch.reader.messages, watch.reader.partial)


def _send_payload(sock: socket.socket, payload: bytes) -> None:
    try:
        _wire.send_message(sock, _wire.PAYLOAD, payload)
    except OSError:
        pass  # the task died before it read its call: its exit code tells the rest


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
            zygote.send(_wire.Z_PRELOAD, new)

    def start(self, task: Any, settings: Settings, payload: bytes) -> None:
        watch = Watch(task)
        mine, theirs = socket.socketpair()
        try:
            for attempt in range(2):
                zygote = self._get()
                try:
                    spare_ready = zygote.spawn(watch, settings, theirs)
                    break
                except OSError:
                    if attempt:
                        raise
                    zygote.lost()
        except BaseException:
            mine.close()
            raise
        finally:
            theirs.close()
        task._launcher = self
        task._watch = watch
        task._sock = mine
        _send_payload(mine, payload)
        _attach(watch, mine)
        # With a spare ready the task has started; otherwise the zygote must fork, which may fail
        # (out of processes or memory): wait for its answer, so that the call fails, not later.
        if not spare_ready and task.pid is None:
            raise OSError(task._start_error or "the zygote died before it started the task")

    def signal(self, task: Any, signum: int, escalate_after: Optional[float]) -> None:
        zygote = task._launcher_data
        zygote.send(_wire.Z_SIGNAL, (task.id, signum, escalate_after))

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


class _ZygoteHandle:
    """The main program's end of one zygote process."""

    def __init__(self, preload: List[str]) -> None:
        self.owner = os.getpid()
        self.alive = True
        self.lock = threading.Lock()
        self.watches: Dict[int, Watch] = {}
        self.reader = _wire.MessageReader()
        self.last_env: Optional[Dict[Any, Any]] = None
        self.last_path: Optional[List[str]] = None
        # What the zygote last said: spawn requests served, spares ready. With the requests
        # sent since, it tells whether a spare surely waits for the next call.
        self.sent = 0
        self.served = 0
        self.spares = 0
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
        config = {"sys_path": list(sys.path), "preload": list(preload)}
        self.ctl.sendall(_wire.pack_data(0, config))
        _monitor.get().add_reader(self.ctl, self._on_readable)

    def spawn(self, watch: Watch, settings: Settings, theirs: socket.socket) -> bool:
        """Ask the zygote to start the task; return whether a spare was surely ready for it."""
        task = watch.task
        with self.lock:
            if not self.alive:
                raise BrokenPipeError("the zygote is gone")
            env = _environ_snapshot()
            if env != self.last_env:
                self.last_env = env
                settings["env"] = dict(os.environ)
            path = list(sys.path)
            if path != self.last_path:
                settings["sys_path"] = self.last_path = path
            self.watches[task.id] = watch
            task._launcher_data = self
            try:
                _wire.send_message_with_fds(
                    self.ctl,
                    _wire.Z_SPAWN,
                    pickle.dumps(settings, pickle.HIGHEST_PROTOCOL),
                    [theirs.fileno()],
                )
            except OSError:
                del self.watches[task.id]
                self.last_env = self.last_path = None
                raise
            ready = self.spares - (self.sent - self.served) > 0
            self.sent += 1
            return ready

    def send(self, kind: int, data: Any) -> None:
        with self.lock:
            if not self.alive:
                return
            try:
                self.ctl.sendall(_wire.pack_data(kind, data))
            except OSError:
                pass  # the monitor learns of the zygote's death from its socket

    def _on_readable(self) -> None:
        """In the monitor: reports from the zygote."""
        self.reader.feed_from(self.ctl)
        messages, self.reader.messages = self.reader.messages, []
        for kind, body in messages:
            task_id, value = pickle.loads(body)
            if kind == _wire.Z_SPARES:
                with self.lock:
                    self.served, self.spares = task_id, value
                continue
            with self.lock:
                if kind == _wire.Z_STARTED:
                    value, self.served, self.spares = value
                    watch = self.watches.get(task_id)
                else:
                    watch = self.watches.pop(task_id, None)
            if watch is None:
                continue
            if kind == _wire.Z_STARTED:
                if isinstance(value, int):
                    watch.task._set_pid(value)
                else:  # the zygote could not fork: the call raises it
                    watch.task._start_error = value
                    watch.task._set_pid(None)
                    watch.launcher_lost = True
                    watch.reaped = True
                    _maybe_finish(watch)
            elif kind == _wire.Z_REAPED:
                watch.exitcode = value
                watch.reaped = True
                _maybe_finish(watch)
        if self.reader.eof:
            self.lost()

    def lost(self) -> None:
        """The zygote died: its tasks can only be followed through their own sockets now."""
        with self.lock:
            if not self.alive:
                return
            self.alive = False
            watches, self.watches = list(self.watches.values()), {}

        def finish_all() -> None:
            _monitor.get().remove_reader(self.ctl)
            self.ctl.close()
            try:
                self.process.wait(timeout=ZYGOTE_EXIT_WAIT_S)
            except subprocess.TimeoutExpired:
                pass
            for watch in watches:
                watch.launcher_lost = True
                _maybe_finish(watch)

        _monitor.get().call_soon(finish_all)

    def close(self) -> None:
        """Orderly end: the zygote exits on EOF once it has no daemon task left."""
        with self.lock:
            if not self.alive:
                return
            self.alive = False
        try:
            self.ctl.shutdown(socket.SHUT_WR)
        except OSError:
            pass
        try:
            self.process.wait(timeout=ZYGOTE_EXIT_WAIT_S)
        except subprocess.TimeoutExpired:
            pass  # it still stops its daemon tasks on its own, then exits
        _monitor.get().remove_reader(self.ctl)
        self.ctl.close()

    def close_in_child(self) -> None:
        try:
            self.ctl.close()
        except OSError:
            pass
        self.alive = False


class MultiprocessingLauncher:
    """Start tasks with a ``multiprocessing`` context: "fork", "spawn" or "forkserver".

    The task process runs the same runtime. The main module is prepared the way
    ``multiprocessing`` does it for the method (spawn and forkserver import it again, so a
    script needs the ``__main__`` guard there); functions still travel by value.
    """

    def __init__(self, method: str) -> None:
        import multiprocessing

        self.method = method
        self.context: Any = multiprocessing.get_context(method)

    def start(self, task: Any, settings: Settings, payload: bytes) -> None:
        settings["watch_parent"] = True
        # Under fork the atexit handlers in this process are the main program's, not the task's.
        settings["run_atexit"] = self.method != "fork"
        watch = Watch(task)
        mine, theirs = socket.socketpair()
        try:
            process = self.context.Process(
                target=_run_task, args=(theirs, settings), name=f"bgtask:{task.name}", daemon=False
            )
            # Process.start() polls every known child; close() in the monitor must not run then.
            with _mp_lock:
                process.start()
        except BaseException:
            mine.close()
            raise
        finally:
            theirs.close()
        if self.method == "fork":
            try:
                os.setpgid(process.pid, process.pid)  # the child does it too; no exec to race
            except OSError:
                pass
        watch.process = process
        task._launcher = self
        task._watch = watch
        task._sock = mine
        task._set_pid(process.pid)
        _send_payload(mine, payload)
        monitor = _monitor.get()

        def reap() -> None:
            with _mp_lock:
                process.join(0)
                if process.exitcode is None:
                    # The sentinel closes while the process exits, a moment before it can be
                    # reaped: look again very soon rather than block the monitor.
                    monitor.call_at(time.monotonic() + REAP_RETRY_S, reap)
                    return
                watch.exitcode = process.exitcode
                watch.reaped = True
                process.close()  # releases its descriptors now, not when the handle is collected
            _maybe_finish(watch)

        def on_exit() -> None:
            monitor.remove_reader(process.sentinel)
            # The leader is exiting and not yet reaped (this process is its parent, except
            # under forkserver), so its group id is still its own: end what it left behind.
            try:
                os.killpg(process.pid, signal.SIGKILL)
            except OSError:
                pass
            reap()

        monitor.add_reader(process.sentinel, on_exit)
        _attach(watch, mine)

    def signal(self, task: Any, signum: int, escalate_after: Optional[float]) -> None:
        watch = task._watch
        pid = task._pid
        if watch.reaped or pid is None:
            return
        try:
            os.kill(pid, signum)
            if signum == signal.SIGKILL:
                os.killpg(pid, signum)
        except OSError:
            pass
        if escalate_after is not None:
            _monitor.get().call_at(
                time.monotonic() + escalate_after, lambda: self.signal(task, signal.SIGKILL, None)
            )

    def shutdown(self) -> None:
        pass

    def forget_in_child(self) -> None:
        pass


# multiprocessing's registry of children is not safe against close() in another thread.
_mp_lock = threading.Lock()


def _run_task(sock: socket.socket, settings: Settings) -> None:
    from . import _child

    _child.run(sock, settings)


_launchers: Dict[Optional[str], Any] = {}
_launchers_lock = threading.Lock()


def get(method: Optional[str]) -> Any:
    """The launcher for a start method (``None``: the zygote)."""
    launcher = _launchers.get(method)
    if launcher is None:
        with _launchers_lock:
            launcher = _launchers.get(method)
            if launcher is None:
                launcher = ZygoteLauncher() if method is None else MultiprocessingLauncher(method)
                _launchers[method] = launcher
    return launcher


def shutdown_all() -> None:
    for launcher in list(_launchers.values()):
        launcher.shutdown()


def forget_in_child() -> None:
    global _launchers_lock, _watch_lock, _mp_lock
    _launchers_lock = threading.Lock()  # another thread may have held them at the fork
    _watch_lock = threading.Lock()
    _mp_lock = threading.Lock()
    for launcher in _launchers.values():
        launcher.forget_in_child()
