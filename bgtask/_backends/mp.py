"""Starting tasks with a ``multiprocessing`` context: start methods "fork", "spawn", "forkserver".

The task process runs the same runtime as under the zygote (``_runtime.child.run``); its channel is an
argument of the ``multiprocessing.Process``. Its exit is seen, in the monitor thread:

- under "fork" and "spawn" (this program is the parent) through a pidfd where the platform has
  them, else the process sentinel; the process is signalled and reaped in that thread only, so
  a signal never reaches a reaped, reused pid;
- under "forkserver" (the fork server is the parent and reaps) through the sentinel, which the
  fork server writes once it has reaped the task; signals go through a pidfd while it runs.
"""

from __future__ import annotations

import os
import signal
import socket
import threading
import time
from typing import TYPE_CHECKING, Any, Optional

from .._monitor import loop as _monitor
from .._monitor import process as _process
from .._monitor.process import TaskProcess
from .._shared import platform as _platform
from .._shared import wire as _wire
from .._shared.wire import Settings

if TYPE_CHECKING:
    from .._shared.serialization import Payload

# How soon to look again for the exit status of a process whose sentinel fired.
REAP_RETRY_S = 0.001


class MultiprocessingLauncher:
    """Start tasks with a ``multiprocessing`` context: "fork", "spawn" or "forkserver".

    The main module is prepared the way ``multiprocessing`` does it for the method (spawn and
    forkserver import it again, so a script needs the ``__main__`` guard there); functions still
    travel by value.
    """

    def __init__(self, method: str) -> None:
        import multiprocessing

        self.method = method
        self.context: Any = multiprocessing.get_context(method)

    def start(self, settings: Settings, payload: Payload) -> TaskProcess:
        settings = dict(settings, watch_parent=True)
        # Under fork the atexit handlers in this process are the main program's, not the task's.
        settings["run_atexit"] = self.method != "fork"
        # The fork server's standard streams are those it started with: send the current ones.
        stdio = (1, 2) if self.method == "forkserver" else ()
        settings["stdio"] = bool(stdio)
        # multiprocessing's registry of children is not safe against close() in another
        # thread, and Process.start() polls (and may reap) every known child: hold the lock
        # wherever this module signals or reaps. Under it too, the channel is made and started
        # as one step, so that no other start forks a copy of this program holding it.
        with _mp_lock, _process.new_channel() as (mine, theirs):
            process = self.context.Process(
                target=_run_task, args=(theirs, settings), name=settings["name"], daemon=False
            )
            process.start()
        pid: int = process.pid
        parent = self.method != "forkserver"
        if self.method == "fork":
            try:
                os.setpgid(pid, pid)  # the child does it too; no exec to race
            except OSError:
                pass
        pidfd = _platform.open_pidfd(pid)
        monitor = _monitor.get()

        def unreaped() -> bool:
            # Under the lock. Read without a system call: polling would reap it here.
            popen = process._popen
            return popen is not None and popen.returncode is None

        def signaller(signum: int, escalate_after: Optional[float]) -> bool:
            if pidfd is not None or not parent:
                return False  # signalled through its pidfd, which no reaping can fool
            with _mp_lock:
                # Reaped here, in the monitor, or by multiprocessing when it polls its children
                # (under this lock for bgtask's own calls): its pid is its own until then.
                if unreaped():
                    _kill(pid, signum)
            return True

        task_process = TaskProcess(pid, mine, signaller, pidfd=pidfd)
        _process.started(mine)

        def reap() -> None:
            with _mp_lock:
                process.join(0)
                exitcode = process.exitcode
                if exitcode is not None:
                    process.close()  # releases its descriptors now, not when collected
            if exitcode is None:
                # The sentinel closes while the process exits, a moment before it can be
                # reaped: look again very soon rather than block the monitor.
                monitor.call_at(time.monotonic() + REAP_RETRY_S, reap)
                return
            task_process.reaped(exitcode)

        def on_exit() -> None:
            monitor.remove_reader(watched)
            if parent:
                # The leader has exited and is not reaped (this process is its parent), so its
                # group id is still its own: end what it left behind in its group.
                with _mp_lock:
                    if unreaped():
                        _kill(pid, signal.SIGKILL)
            reap()

        # Under fork and spawn a pidfd turns readable when the process exits, which the sentinel
        # (a pipe its children may inherit, or close early) does not always tell.
        watched: Any = pidfd if parent and pidfd is not None else process.sentinel
        monitor.add_reader(watched, on_exit)
        try:
            _wire.send_messages(mine, [(_wire.PAYLOAD, payload.body)], fds=stdio + payload.fds)
        except OSError:
            pass  # the task died before it read its call: its exit code tells the rest
        except BaseException:
            task_process.abandon()  # interrupted halfway through the call: the task never runs it
            raise
        return task_process

    def close(self) -> None:
        pass  # multiprocessing's own exit hook joins what is left

    def forget_in_child(self) -> None:
        global _mp_lock
        _mp_lock = threading.Lock()  # another thread may have held it at the fork


def _kill(pid: int, signum: int) -> None:
    """Signal a child that is not reaped yet; SIGKILL goes to its whole group too."""
    try:
        _platform.signal_main_thread(pid, signum)
        if signum == signal.SIGKILL:
            os.killpg(pid, signum)
    except OSError:
        pass


_mp_lock = threading.Lock()


def _run_task(sock: socket.socket, settings: Settings) -> None:
    # First: a graceful stop from now on is kept for the task rather than fatal (one that comes
    # while multiprocessing still starts the process ends it as stopped before it ran).
    from .._shared import context

    context.set_handler(signal.SIGTERM, context.on_stop_signal)
    from .._runtime import child as _child

    _child.run(sock, settings)
