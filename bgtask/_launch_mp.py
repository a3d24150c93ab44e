"""Starting tasks with a ``multiprocessing`` context: start methods "fork", "spawn", "forkserver".

The task process runs the same runtime as under the zygote (``_child.run``); its socket is an
argument of the ``multiprocessing.Process``, and its exit is seen through the process sentinel.
"""

from __future__ import annotations

import os
import signal
import socket
import threading
import time
from typing import Any, Optional

from . import _monitor, _wire
from ._launch import Settings, Watch, attach, maybe_finish

# How soon to look again for the exit status of a process whose sentinel fired.
REAP_RETRY_S = 0.001


def _send_payload(sock: socket.socket, payload: bytes) -> None:
    try:
        _wire.send_message(sock, _wire.PAYLOAD, payload)
    except OSError:
        pass  # the task died before it read its call: its exit code tells the rest


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
            maybe_finish(watch)

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
        attach(watch, mine)

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
        global _mp_lock
        _mp_lock = threading.Lock()  # another thread may have held it at the fork


# multiprocessing's registry of children is not safe against close() in another thread.
_mp_lock = threading.Lock()


def _run_task(sock: socket.socket, settings: Settings) -> None:
    from . import _child

    _child.run(sock, settings)
