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
relay of ``_logs``; absent when the task logs on its own).

The process ends when the function returns: threads it left behind end with it. This module is
the child side of bgtask and imports nothing of the parent side (its import cost is start-up
latency): only the wire format, the stop event and pickling.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import signal
import socket
import sys
import threading
from typing import Any, Callable, Iterator, List, NoReturn, Optional, Set

from . import _logs, _platform, _ready, _stop, _wire
from ._serialization import MAX_DESCRIPTORS, dumps_value, loads_call, pack_exception, type_name
from ._stop import _StopRequest, _TaskState
from ._wire import Settings


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
    if not prepared:
        # Under spawn it arrives inheritable: the task's children must not hold it open, or
        # the main program would not see the task's end on it.
        sock.set_inheritable(False)
    state = _TaskState(settings["graceful"])
    _stop._state = state
    _task_sock = sock
    global _parent_pid, _send_queued
    _parent_pid = settings.get("parent", 0)
    send = _atomic_sender(sock, state)  # ready() and log records
    _send_queued = _queued_sender(sock)
    _ready._install(send)
    try:
        try:
            if not prepared:
                prepare_streams()
                prepare_process()
            _apply_settings(settings, send)
            code = _run_and_report(sock, settings, state, send, stdio_on_payload=not prepared)
        except _StopRequest as stop:
            _report_stopped(sock, stop)
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


_task_sock: Optional[socket.socket] = None


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


_subreaper = False


def _apply_settings(settings: Settings, send: Callable[[int, bytes], None]) -> None:
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
    # Its name in ps and top (Linux), and in multiprocessing, whatever the start method. Never
    # the zygote's own name, which spares and tasks inherit at the fork: the zygote spares a
    # process of that name when it adopts it.
    name = settings["name"]
    _platform.set_process_name(name if name != _platform.ZYGOTE_NAME else f"task:{name}")
    logs = settings.get("logging")
    if logs is not None:
        _logs.install(logs, lambda data: send(_wire.LOG, data), name)
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


def _run_and_report(
    sock: socket.socket,
    settings: Settings,
    state: _TaskState,
    send: Callable[[int, bytes], None],
    stdio_on_payload: bool,
) -> int:
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
    try:
        fn, args, kwargs = loads_call(body, fds)
    except BaseException as exc:
        if isinstance(exc, _StopRequest):
            raise
        _send(sock, _wire.FAILED, _data(("load", *pack_exception(exc))))
        return 1
    del body, message
    try:
        value = _call(fn, args, kwargs, send if settings.get("stream") else None)
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
        what = f"the return value (a {type_name(value)})"
        if type(value).__name__ in ("generator", "async_generator"):
            what += " (decorate the generator function itself to stream its values)"
        _send(sock, _wire.FAILED, _data(("result", what, *packet[1:])))
        return 0
    del value
    _send(sock, _wire.RESULT, data)
    return 0


def _call(fn: Any, args: Any, kwargs: Any, stream: Optional[Callable[[int, bytes], None]]) -> Any:
    result = fn(*args, **kwargs)
    if stream is not None:
        return _stream(result, stream)
    if _is_awaitable(result):
        import asyncio

        async def _await() -> Any:
            return await result

        return asyncio.run(_await())
    return result


def _stream(values: Any, send: Callable[[int, bytes], None]) -> Any:
    """Send what a generator yields, each as it comes; return what it returns.

    Whatever ends it early (a stop, an item that cannot be pickled) closes the generator first,
    so that its ``finally`` and ``with`` blocks run.
    """
    count = 0

    def data(item: Any) -> bytes:
        try:
            return dumps_value(item)
        except Exception as exc:
            raise TypeError(
                f"item {count} the task yielded (a {type_name(item)}) cannot be pickled: {exc}"
            ) from exc

    if not hasattr(values, "__next__") and not hasattr(values, "__anext__"):
        # A wrapper of a generator function that returned something else: a plain result.
        return _call(lambda: values, (), {}, None)
    if hasattr(values, "__anext__"):
        import asyncio

        async def pump() -> None:
            nonlocal count
            try:
                async for item in values:
                    send(_wire.ITEM, data(item))
                    count += 1
            finally:
                close = getattr(values, "aclose", None)  # an async generator's; not every iterator's
                if close is not None:
                    await close()

        asyncio.run(pump())
        return None
    try:
        while True:
            try:
                item = next(values)
            except StopIteration as stop:
                return stop.value
            send(_wire.ITEM, data(item))
            count += 1
    finally:
        close = getattr(values, "close", None)  # a generator's: nothing if it returned or raised
        if close is not None:
            close()


def _is_awaitable(value: Any) -> bool:
    # What `await` accepts; cheaper than inspect.isawaitable's ABC checks on every task.
    return hasattr(type(value), "__await__")


def _report_stopped(sock: socket.socket, stop: _StopRequest) -> None:
    import traceback

    # Where the user's code was: bgtask's own frames (ready(), the runtime) are left out.
    here = os.path.dirname(__file__)
    stack = traceback.extract_tb(_user_frames(stop.__traceback__))
    frames = [f for f in stack if os.path.dirname(f.filename) != here]
    _send(sock, _wire.STOPPED, _data("".join(traceback.format_list(frames))))


def _user_frames(tb: Any) -> Any:
    """Skip the runtime's own frames at the top of a traceback: the user's code starts below."""
    while tb is not None and tb.tb_frame.f_code.co_filename == __file__:
        tb = tb.tb_next
    return tb


def _finish(settings: Settings) -> None:
    """Do what a normal interpreter exit would, bounded: nested tasks, atexit, streams."""
    lifecycle = sys.modules.get("bgtask._lifecycle")
    if lifecycle is not None:
        lifecycle._at_exit()
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
        with _send_lock:  # ready() may send from another thread
            _wire.send_message(sock, kind, body)
    except OSError:
        pass  # the main program is gone (BrokenPipeError) or closed our channel: nobody to tell


_send_lock = threading.Lock()
_parent_pid = 0


# How a bgtask.Queue in this task hands items it cannot send to the main program (_queue).
_send_queued: Optional[Callable[[bytes], None]] = None


def _queued_sender(sock: socket.socket) -> Callable[[bytes], None]:
    """Send a QUEUED message whole; ``OSError`` when the main program is gone (the queue says
    ``ShutDown``). The queue defers stops around it."""

    def send(body: bytes) -> None:
        with _send_lock:
            _wire.send_message(sock, _wire.QUEUED, body)

    return send


def _atomic_sender(sock: socket.socket, state: _TaskState) -> Callable[[int, bytes], None]:
    """How ``ready()``, log records and queue items go out: whole, never torn by a stop."""

    def send(kind: int, body: bytes) -> None:
        with deferred_stop():
            _send(sock, kind, body)

    return send


@contextlib.contextmanager
def deferred_stop() -> Iterator[None]:
    """A stop raised in the main thread meanwhile is raised at the end of the block instead."""
    state = _stop._state
    if state is None or threading.current_thread() is not threading.main_thread() or state.atomic:
        yield  # another thread (a stop is raised in the main thread only), or nested
        return
    state.atomic = True
    try:
        yield
    finally:
        state.atomic = False
    if state.pending:
        state.pending = False
        raise _StopRequest()


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
        if state.atomic:
            state.pending = True  # raised once the message being sent is out
        else:
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
        # The task's own zygote, still stopping its daemon tasks, ends on its own.
        pids = [pid for pid in pids if _platform.process_name(pid) != _platform.ZYGOTE_NAME]
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


def _close_in_fork() -> None:
    # A process the task forks must not hold the task's socket: the main program would not see
    # EOF when the task ends. It is not the task: ready() there is an error.
    global _send_lock, _send_queued
    _ready._install(None)
    _send_queued = None
    _send_lock = threading.Lock()  # another thread may have held it at the fork
    if _task_sock is not None:
        try:
            _task_sock.close()
        except OSError:
            pass
