"""The parent side of starting a task process: one seam, two kinds of launcher.

::

    Task start ──> launcher.start(task, settings, payload)
                      │ ZygoteLauncher (_launch_zygote, the default): take a spare the zygote
                      │   handed over (its pid and a socket to it), tell the zygote it is now
                      │   this task, write the settings and the payload to it
                      │ MultiprocessingLauncher (_launch_mp: "fork", "spawn", "forkserver"): the
                      │   task's end is an argument of a multiprocessing.Process running the
                      │   same runtime
                      v
               attach(): the monitor watches the socket (outcome) and the exit (zygote report
               or sentinel); once reaped, maybe_finish() hands Task._finish() the exit code and
               the messages

Every launcher signals only what it started and has not seen reaped: the zygote kills a group
while its leader is still unreaped; the multiprocessing path is the parent (fork, spawn) and
stops signalling once the sentinel fires.
"""

from __future__ import annotations

import socket
import threading
from typing import Any, Dict, Optional

from . import _monitor, _wire

Settings = Dict[str, Any]


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


def attach(watch: Watch, sock: socket.socket) -> None:
    """Start reading the task's socket, eagerly; from any thread, once the payload is sent."""
    monitor = _monitor.get()

    def on_readable() -> None:
        reader = watch.reader
        reader.feed_from(sock)
        if reader.messages and reader.messages[0][0] in _EARLY:
            watch.task._set_outcome(reader.messages[0])
        if reader.eof:
            monitor.remove_reader(sock)
            maybe_finish(watch)

    with _watch_lock:
        watch.sock = sock
        if not (watch.reaped or watch.launcher_lost):
            monitor.add_reader(sock, on_readable)
            return
    monitor.call_soon(lambda: maybe_finish(watch))


def maybe_finish(watch: Watch) -> None:
    """In the monitor: finish the task once its process is reaped and its socket drained."""
    with _watch_lock:
        sock = watch.sock
        if sock is None:
            return  # the payload is still being sent; attach() calls again
        if not (watch.reaped or (watch.launcher_lost and watch.reader.eof)):
            return
        watch.sock = None
    if not watch.reader.eof:
        watch.reader.feed_from(sock)  # what the task wrote before it exited is all there
    _monitor.get().remove_reader(sock)
    sock.close()
    watch.task._finish(watch.exitcode, watch.reader.messages, watch.reader.partial)


_launchers: Dict[Optional[str], Any] = {}
_launchers_lock = threading.Lock()


def get(method: Optional[str]) -> Any:
    """The launcher for a start method (``None``: the zygote)."""
    launcher = _launchers.get(method)
    if launcher is None:
        with _launchers_lock:
            launcher = _launchers.get(method)
            if launcher is None:
                if method is None:
                    from ._launch_zygote import ZygoteLauncher

                    launcher = ZygoteLauncher()
                else:
                    from ._launch_mp import MultiprocessingLauncher

                    launcher = MultiprocessingLauncher(method)
                _launchers[method] = launcher
    return launcher


def shutdown_all() -> None:
    for launcher in list(_launchers.values()):
        launcher.shutdown()


def forget_in_child() -> None:
    global _launchers_lock, _watch_lock
    _launchers_lock = threading.Lock()  # another thread may have held them at the fork
    _watch_lock = threading.Lock()
    for launcher in _launchers.values():
        launcher.forget_in_child()
