"""The task runtime: what runs inside a task process, from its first line to its exit.

::

    prepare    own process group, quiet SIGINT, SIGTERM -> graceful stop, stdin from /dev/null,
               line-buffered stdout/stderr, the caller's environment, cwd and sys.path
    receive    the pickled call from the main program, on the task's own socket
    run        the function (a coroutine function runs under asyncio.run)
    report     exactly one message back: RESULT, ERROR, STOPPED, EXITED or FAILED
    finish     stop or wait for the task's own tasks, run its atexit handlers, flush, os._exit

The process ends when the function returns: threads it left behind end with it. This module is
the child side of bgtask and imports nothing of the parent side (its import cost is start-up
latency): only the wire format, the stop event and pickling.
"""

from __future__ import annotations

import os
import signal
import socket
import sys
import threading
from typing import Any, Callable, Dict, NoReturn, Optional

from . import _stop, _wire
from ._serialization import dumps_value, loads, pack_exception
from ._stop import _StopRequest, _TaskState

Settings = Dict[str, Any]


def _c_signal() -> Callable[[int, Any], Any]:
    """``signal.signal`` without its conversions to and from enums.

    Those touch memory a task would otherwise share with its zygote: about 0.1 ms per task.
    """
    try:
        import _signal  # type: ignore[import-not-found]
    except ImportError:  # not CPython
        return signal.signal
    return _signal.signal  # type: ignore[no-any-return]


set_handler = _c_signal()
SIG_DFL = int(signal.SIG_DFL)  # a plain int: the C function does not take the enum everywhere


def run(sock: socket.socket, settings: Settings, prepared: bool = False) -> NoReturn:
    """Run the task whose call arrives on ``sock``, report its outcome, and exit the process.

    ``prepared`` tells that :func:`prepare_process` already ran (in a zygote's spare, ahead of
    the call).
    """
    global _task_sock
    code = 1
    state = _TaskState(settings["task_id"], settings["graceful"])
    _stop._state = state
    _task_sock = sock
    try:
        try:
            if not prepared:
                prepare_streams()
                prepare_process()
            _apply_settings(sock, settings, state)
            code = _run_and_report(sock, settings, state)
        except _StopRequest as stop:
            _report_stopped(sock, stop)
            code = -signal.SIGTERM
        _finish(settings, state)
    except _StopRequest:  # a second stop during cleanup: the outcome is already reported
        code = -signal.SIGTERM
    except BaseException:  # never let an error in bgtask's own code escape with a traceback
        code = code or 1
    _exit(code)


_task_sock: Optional[socket.socket] = None


def prepare_process() -> None:
    """What does not depend on the task; a zygote's spare does it ahead of the call."""
    if os.getpgrp() != os.getpid():
        try:
            os.setpgid(0, 0)
        except OSError:
            pass
    # Terminal Ctrl-C is for the main program to act on. A Python-level handler, not SIG_IGN,
    # so that programs this task runs with exec get the default disposition back.
    set_handler(signal.SIGINT, _ignore_signal)
    os.register_at_fork(after_in_child=_close_in_fork)


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


def _apply_settings(sock: socket.socket, settings: Settings, state: _TaskState) -> None:
    if settings["graceful"]:
        set_handler(signal.SIGTERM, _on_stop_signal)
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
    if settings.get("watch_parent") and settings["daemon"]:
        threading.Thread(
            target=_watch_parent,
            args=(sock, state, settings["grace"]),
            name="bgtask-parent-watch",
            daemon=True,
        ).start()


def _run_and_report(sock: socket.socket, settings: Settings, state: _TaskState) -> int:
    message = _wire.recv_message(sock)
    if message is None or message[0] != _wire.PAYLOAD:
        return 0  # the main program went away before it sent the call: nothing to do
    body = message[1]
    try:
        fn, args, kwargs = loads(body)
    except BaseException as exc:
        if isinstance(exc, _StopRequest):
            raise
        _send(sock, _wire.FAILED, _data(("load", *pack_exception(exc))))
        return 1
    del body, message
    try:
        value = _call(fn, args, kwargs)
    except _StopRequest:
        raise
    except SystemExit as exc:
        state.running_done()
        code = _system_exit_code(exc)
        _send(sock, _wire.EXITED, _data(f"the task called sys.exit({exc.code!r})"))
        return code
    except KeyboardInterrupt:
        state.running_done()
        _send(sock, _wire.EXITED, _data("the task let a KeyboardInterrupt escape"))
        return 1
    except BaseException as exc:
        state.running_done()
        _send(sock, _wire.ERROR, _data(pack_exception(exc.with_traceback(_user_frames(exc.__traceback__)))))
        return 0
    state.running_done()
    del fn, args, kwargs
    try:
        data = dumps_value(value)
    except BaseException as exc:
        packet = pack_exception(exc)
        what = f"the return value (a {type(value).__module__}.{type(value).__qualname__})"
        _send(sock, _wire.FAILED, _data(("result", what, *packet[1:])))
        return 0
    del value
    _send(sock, _wire.RESULT, data)
    return 0


def _call(fn: Any, args: Any, kwargs: Any) -> Any:
    result = fn(*args, **kwargs)
    if _is_awaitable(result):
        import asyncio

        async def _await() -> Any:
            return await result

        return asyncio.run(_await())
    return result


def _is_awaitable(value: Any) -> bool:
    # What `await` accepts; cheaper than inspect.isawaitable's ABC checks on every task.
    return hasattr(type(value), "__await__")


def _report_stopped(sock: socket.socket, stop: _StopRequest) -> None:
    import traceback

    frames = [f for f in traceback.extract_tb(_user_frames(stop.__traceback__)) if f.filename != __file__]
    _send(sock, _wire.STOPPED, _data("".join(traceback.format_list(frames))))


def _user_frames(tb: Any) -> Any:
    """Skip the runtime's own frames at the top of a traceback: the user's code starts below."""
    while tb is not None and tb.tb_frame.f_code.co_filename == __file__:
        tb = tb.tb_next
    return tb


def _finish(settings: Settings, state: _TaskState) -> None:
    """Do what a normal interpreter exit would, bounded: nested tasks, atexit, streams."""
    lifecycle = sys.modules.get("bgtask._lifecycle")
    if lifecycle is not None:
        lifecycle.shutdown()
    if settings.get("run_atexit", True):
        import atexit

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


def _system_exit_code(exc: SystemExit) -> int:
    """The exit code the interpreter would use for ``exc`` (printing a non-integer code)."""
    code = exc.code
    if code is None:
        return 0
    if isinstance(code, int):
        return code & 0xFF
    try:
        print(code, file=sys.stderr)
    except Exception:
        pass
    return 1


def _send(sock: socket.socket, kind: int, body: bytes) -> None:
    try:
        _wire.send_message(sock, kind, body)
    except OSError:
        pass  # the main program is gone (BrokenPipeError) or closed our channel: nobody to tell


def _data(obj: Any) -> bytes:
    import pickle

    return pickle.dumps(obj, pickle.HIGHEST_PROTOCOL)


def _ignore_signal(signum: int, frame: Any) -> None:
    pass


def _on_stop_signal(signum: int, frame: Any) -> None:
    state = _stop._state
    if state is None:
        return
    first = not state.stopping
    state.stopping = True
    state.event._set()
    if first and state.running and not state.cooperative:
        raise _StopRequest()


def _watch_parent(sock: socket.socket, state: _TaskState, grace: float) -> None:
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
        os.killpg(os.getpgrp(), signal.SIGKILL)
    finally:
        os._exit(1)


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


def _close_in_fork() -> None:
    # A process the task forks must not hold the task's socket: the main program would not see
    # EOF when the task ends.
    if _task_sock is not None:
        try:
            _task_sock.close()
        except OSError:
            pass
