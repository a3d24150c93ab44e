"""The task runtime: what runs inside a task process, from its first line to its exit.

::

    prepare    own process group, child subreaper, quiet SIGINT, SIGTERM -> graceful stop,
               stdin from /dev/null, line-buffered stdout/stderr (a zygote's spare does this
               ahead of its call, in become_spare())
    settings   the caller's environment, cwd, sys.path, argv, standard output and error, name
    receive    the pickled call from the main program, on the task's own channel
    run        the function (a coroutine function runs under asyncio.run)
    report     exactly one message back: RESULT, ERROR, STOPPED, EXITED or FAILED
    finish     stop or wait for the task's own tasks, run its atexit handlers, kill what it
               left running, flush, os._exit

The settings dict (``Settings``) holds: ``name``, ``daemon``, ``graceful``, ``grace``, ``cwd``,
``argv``; optionally ``env`` and ``sys_path`` (when they changed since the zygote forked the
spare), ``stdio`` (standard output and error arrive as descriptors with the call),
``parent`` (the main program's pid), ``watch_parent`` (watch the channel for the main program's
death: no zygote does it),
``run_atexit`` and ``logging`` (the main program's logging levels and warnings filters, for the
relay of ``_shared.logs``; absent when the task logs on its own).

The process ends when the function returns: threads it left behind end with it. This module is
the child side of bgtask and imports nothing of the parent side (its import cost is start-up
latency): only the wire format, the stop event and pickling.
"""

from __future__ import annotations

import atexit
import os
import signal
import socket
import sys
import threading
from typing import Any, List, NoReturn, Set

from .._shared import context as _taskctx
from .._shared import forks
from .._shared import logs as _logs
from .._shared import platform as _platform
from .._shared import wire as _wire
from .._shared.context import Context, TaskState, set_handler
from .._shared.serialization import MAX_DESCRIPTORS
from .._shared.stop import _StopRequest
from .._shared.wire import Settings
from .runner import run_call, stopped

SIG_DFL = int(signal.SIG_DFL)  # a plain int: the C function does not take the enum everywhere


def run(sock: socket.socket, settings: Settings, prepared: bool = False) -> NoReturn:
    """Run the task whose call arrives on ``sock``, report its outcome, and exit the process.

    ``prepared`` tells that :func:`prepare_process` already ran (in a zygote's spare, ahead of
    the call).
    """
    code = 1
    if not prepared:
        # Under spawn it arrives inheritable: the task's children must not hold it open, or
        # the main program would not see the task's end on it.
        sock.set_inheritable(False)
    state = TaskState(settings["graceful"])  # "event": a cooperative task from its first line
    context = Context(state, sock, settings.get("parent", 0))
    _taskctx.install(context)
    try:
        try:
            if not prepared:
                prepare_streams()
                prepare_process()
            _apply_settings(settings, context)
            code = _run_and_report(context, settings, stdio_on_payload=not prepared)
        except _StopRequest as stop:
            _report_stopped(context, stop)
            code = -signal.SIGTERM
        _finish(settings)
    except _StopRequest:  # a second stop during cleanup: the outcome is already reported
        code = -signal.SIGTERM
    except BaseException:  # never let an error in bgtask's own code escape with a traceback
        code = code or 1
    try:
        end_descendants()
    except BaseException:
        pass
    _exit(code)


def become_spare(sock: socket.socket, zygote_pid: int) -> NoReturn:
    """In a process the zygote just forked: wait for a task from the main program, run it.

    A spare ends when its channel does: the main program holds the other end, and closes it
    when the zygote dies; the kernel closes it when the main program does.
    """
    try:
        try:
            os.setpgid(0, 0)
        except OSError:
            pass
        prepare_process()
        message = _wire.recv_message(sock, maxfds=2)
        if message is None or message[0] != _wire.SETTINGS:
            os._exit(0)  # dropped unused: the main program ended, or preloaded modules
        import pickle

        settings = pickle.loads(message[1])
        _adopt_stdio(message[2])
        if settings["daemon"]:
            # A daemon task dies with its zygote (which outlives the main program only to
            # stop daemon tasks gracefully). Set here, not at the fork: a non-daemon task
            # must outlive the zygote, and clearing the signal later would race its exit.
            _platform.set_parent_death_signal(signal.SIGKILL)
            if os.getppid() != zygote_pid:
                os._exit(1)  # the zygote is already gone
    except BaseException:
        os._exit(1)
    run(sock, settings, prepared=True)


def prepare_process() -> None:
    """What does not depend on the task; a zygote's spare does it ahead of the call."""
    global _subreaper
    if os.getpgrp() != os.getpid():
        try:
            os.setpgid(0, 0)
        except OSError:
            pass
    # What leaves this task's group (a double fork, setsid) stays its descendant: killed at
    # its end by end_descendants(), or by the zygote, which adopts it when the task is gone.
    _subreaper = _platform.set_child_subreaper()
    # Terminal Ctrl-C is for the main program to act on. A Python-level handler, not SIG_IGN,
    # so that programs this task runs with exec get the default disposition back.
    set_handler(signal.SIGINT, _ignore_signal)
    # A graceful stop that comes before the call is kept for the task, not fatal (a task that
    # watches its stop event from its first line still runs, with the event set).
    set_handler(signal.SIGTERM, _taskctx.on_stop_signal)
    forks.activate()  # the context lets go of the channel in what the task forks


def prepare_streams() -> None:
    """Standard input from /dev/null, output line-buffered; a zygote does it once for all.

    Each line goes out in one write, also under ``python -u`` (which would write piece by
    piece): tasks share the main program's output, and their lines must not interleave.
    """
    _redirect_stdin()
    for stream in (sys.stdout, sys.stderr):
        reconfigure = getattr(stream, "reconfigure", None)
        if reconfigure is not None:
            try:
                reconfigure(line_buffering=True, write_through=False)
            except Exception:
                pass


_subreaper = False


def _apply_settings(settings: Settings, context: Context) -> None:
    if settings["graceful"]:
        set_handler(signal.SIGTERM, _taskctx.on_stop_signal)
    else:
        set_handler(signal.SIGTERM, SIG_DFL)
    env = settings.get("env")
    if env is not None:
        os.environ.clear()
        os.environ.update(env)
    path = settings.get("sys_path")
    if path is not None:
        sys.path[:] = path
    argv = settings.get("argv")
    if argv is not None:
        sys.argv[:] = argv
    cwd = settings.get("cwd")
    if cwd is not None:
        try:
            os.chdir(cwd)
        except OSError:
            pass
    # Its name in ps and top (Linux), and in multiprocessing, whatever the start method. Never
    # the zygote's own name, which spares and tasks inherit at the fork: the zygote spares a
    # process of that name when it adopts it.
    name = settings["name"]
    _platform.set_process_name(name if name != _platform.ZYGOTE_NAME else f"task:{name}")
    logs = settings.get("logging")
    if logs is not None:
        _logs.install(
            logs,
            lambda data: context.send(_wire.LOG, data),
            lambda data: context.send(_wire.WARNING, data),
            name,
        )
    else:
        _logs.uninstall()
    mp_process = sys.modules.get("multiprocessing.process")
    if mp_process is not None:
        mp_process.current_process().name = settings["name"]


def _adopt_stdio(fds: List[int]) -> None:
    """Standard output and error sent with the call: the main program's current ones."""
    if len(fds) == 2:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except Exception:
                pass
        os.dup2(fds[0], 1)
        os.dup2(fds[1], 2)
    for fd in fds:
        os.close(fd)


def _run_and_report(context: Context, settings: Settings, stdio_on_payload: bool) -> int:
    sock, state = context.channel, context.state
    assert sock is not None
    stdio = 2 if settings.get("stdio") and stdio_on_payload else 0
    try:
        message = _wire.recv_message(sock, maxfds=stdio + MAX_DESCRIPTORS)
    except _wire.ProtocolError:
        message = None
    if message is None or message[0] != _wire.PAYLOAD:
        return 0  # the main program went away before it sent the call: nothing to do
    fds = message[2]
    _adopt_stdio(fds[:stdio])
    del fds[:stdio]
    if settings.get("watch_parent") and settings["daemon"]:
        # Started only now: the main program sends nothing more on the channel, so this
        # thread's reads cannot take the call from the runtime.
        threading.Thread(
            target=_watch_parent,
            args=(sock, state, settings["grace"]),
            name="bgtask-parent-watch",
            daemon=True,
        ).start()
    body = message[1]
    del message
    kind, data, code = run_call(body, fds, state, context.send if settings.get("stream") else None)
    del body
    context.send(kind, data)
    return code


def _report_stopped(context: Context, stop: _StopRequest) -> None:
    context.send(_wire.STOPPED, stopped(stop))


def _finish(settings: Settings) -> None:
    """Do what a normal interpreter exit would, bounded: nested tasks, atexit, streams."""
    context = _taskctx.current
    if context is not None:
        context.run_at_end()
    if settings.get("run_atexit", True):
        atexit._run_exitfuncs()


def _exit(code: int) -> NoReturn:
    for stream in (sys.stdout, sys.stderr):
        try:
            if stream is not None:
                stream.flush()
        except Exception:
            pass
    if code < 0:
        # Die by the signal itself, so that the exit status tells the truth (-15 for a stop).
        signal.signal(-code, signal.SIG_DFL)
        os.kill(os.getpid(), -code)
    os._exit(code if code >= 0 else 1)


def _ignore_signal(signum: int, frame: Any) -> None:
    pass


def _watch_parent(sock: socket.socket, state: TaskState, grace: float) -> None:
    """Stop this daemon task when the main program dies (start methods other than the zygote).

    Under the default start method the zygote does this from outside; here the task's own
    socket tells: the main program holds the only other end, so EOF means it is gone.
    """
    try:
        while sock.recv(4096):
            pass
    except OSError:
        pass
    if state.graceful:
        try:
            signal.pthread_kill(threading.main_thread().ident or 0, signal.SIGTERM)
        except (OSError, ValueError):
            pass
        threading.Event().wait(grace)
    try:
        end_descendants()
        os.killpg(os.getpgrp(), signal.SIGKILL)
    finally:
        os._exit(1)


# How long end_descendants() waits for what it killed to be gone.
END_DESCENDANTS_S = 1.0


def end_descendants() -> None:
    """Kill this task's children, and what they leave behind, at the task's end.

    Only where this process is a child subreaper (Linux): orphaned descendants are then its
    children, listed by the kernel, and none can escape by leaving the process group. Each is
    killed while unreaped (its pid and group id are still its own), then reaped, so that what
    it orphaned comes here too and goes the same way.
    """
    if not _subreaper or not _platform.has_children():
        return
    import time

    deadline = time.monotonic() + END_DESCENDANTS_S
    killed: Set[int] = set()
    while time.monotonic() < deadline:
        pids = [pid for pid in _platform.children() or () if pid not in killed]
        # The task's own zygote (its pid, as this process started it: a child's pid is its own
        # until reaped, whatever name a process gives itself) ends on its own.
        helpers = _taskctx.current.helpers if _taskctx.current is not None else set()
        pids = [pid for pid in pids if pid not in helpers]
        if not pids:
            return
        for pid in pids:
            for kill in (os.killpg, os.kill):
                try:
                    kill(pid, signal.SIGKILL)
                except OSError:
                    pass
        killed.update(pids)
        for pid in pids:
            while time.monotonic() < deadline:
                try:
                    if os.waitpid(pid, os.WNOHANG)[0]:
                        break
                except ChildProcessError:
                    break
                time.sleep(0.001)


def _redirect_stdin() -> None:
    try:
        fd = os.open(os.devnull, os.O_RDONLY)
    except OSError:
        return
    if fd != 0:
        os.dup2(fd, 0)
        os.close(fd)
    try:
        sys.stdin = open(0, closefd=False)  # noqa: SIM115 (lives as long as the process)
    except OSError:
        pass
