"""Every exception bgtask raises for its own reasons, and how exits are described.

The hierarchy::

    Exception
     ├── BgTaskError                  anything bgtask itself reports
     │    ├── TaskCrashed             the task process ended without reporting an outcome
     │    ├── TaskStopped             stop(), kill(), a timeout or the program's exit ended it first
     │    ├── TaskError               the task raised an exception that could not come back as itself
     │    └── SerializationError      (also a TypeError) an argument, result or queue item could not
     │                                be pickled or unpickled
     └── ShutDown                     a bgtask.Queue was shut down (queue.ShutDown on Python 3.13+)

A task's own exception is re-raised by ``Task.result()`` as itself, not wrapped, with the child's
traceback chained as its ``__cause__`` (a ``RemoteTraceback``), as ``concurrent.futures`` does.
Timeouts of *waiting* are the builtin ``TimeoutError``.
"""

from __future__ import annotations

import signal
import sys
from typing import Optional

__all__ = [
    "BgTaskError",
    "RemoteTraceback",
    "SerializationError",
    "ShutDown",
    "TaskCrashed",
    "TaskError",
    "TaskStopped",
    "describe_exit",
    "set_cause",
]


class BgTaskError(Exception):
    """Base class of every error bgtask raises for its own reasons.

    Raised directly when a handle is misused: a task's handle used in a forked copy of the program
    that started it, ``result()`` called from inside the task itself, ``stop_event()`` or
    ``ready()`` called outside a task; and by ``Task.wait_ready()`` for a task that returned
    without calling ``ready()``.
    """

    __module__ = "bgtask"


class TaskCrashed(BgTaskError):
    """Raised by ``Task.result()`` when the task's process ended without reporting an outcome.

    That happens when the process was killed by a signal (a segfault, the out-of-memory killer, an
    explicit ``kill``), called ``os._exit()`` or ``sys.exit()``, or let a ``KeyboardInterrupt``
    escape. The message names the likely cause.

    Attributes:
        exitcode: the process's exit code, negative for a signal, as in ``multiprocessing``.
        pid: the process id the task had.
        signal: the ``signal.Signals`` that ended it, or ``None`` for an exit code.
    """

    __module__ = "bgtask"

    def __init__(self, message: str, *, exitcode: Optional[int], pid: Optional[int]) -> None:
        super().__init__(message)
        self.exitcode = exitcode
        self.pid = pid
        self.signal: Optional[signal.Signals] = _signal_of(exitcode)

    def __reduce__(self):  # type: ignore[no-untyped-def]
        return (_rebuild_crashed, (str(self), self.exitcode, self.pid))


class TaskStopped(BgTaskError):
    """Raised by ``Task.result()`` when the task was stopped before it finished.

    A task is stopped by ``Task.stop()``, ``Task.kill()``, its ``timeout``, or the program's exit
    (daemon tasks). A task that returns normally after it was asked to stop (it watched its
    ``stop_event()``) is not stopped: its return value counts.

    Attributes:
        reason: what stopped it: ``"stop"``, ``"kill"``, ``"timeout"``, ``"cancel"``, ``"exit"``
            (the end of the program) or ``"shutdown"`` (``bgtask.shutdown()``).
        exitcode: the process's exit code, negative for a signal.
        pid: the process id the task had.
    """

    __module__ = "bgtask"

    def __init__(self, message: str, *, reason: str, exitcode: Optional[int], pid: Optional[int]) -> None:
        super().__init__(message)
        self.reason = reason
        self.exitcode = exitcode
        self.pid = pid

    def __reduce__(self):  # type: ignore[no-untyped-def]
        return (_rebuild_stopped, (str(self), self.reason, self.exitcode, self.pid))


class TaskError(BgTaskError):
    """Raised by ``Task.result()`` in place of a task's exception that could not come back.

    The task raised an exception that cannot be pickled (it holds a lock, say) or cannot be
    unpickled in this process (its ``__init__`` needs arguments that are not in its ``args``).
    This stand-in keeps what can be kept.

    Attributes:
        type_name: the qualified name of the original exception's type.
        message: ``str()`` of the original exception.
        remote_traceback: the task's formatted traceback.
    """

    __module__ = "bgtask"

    def __init__(self, type_name: str, message: str, remote_traceback: str) -> None:
        super().__init__(f"{type_name}: {message}" if message else type_name)
        self.type_name = type_name
        self.message = message
        self.remote_traceback = remote_traceback

    def __reduce__(self):  # type: ignore[no-untyped-def]
        return (TaskError, (self.type_name, self.message, self.remote_traceback))


class SerializationError(BgTaskError, TypeError):
    """Raised when bgtask cannot pickle what it has to send between processes.

    Raised by a call of a background function, before any process starts, when the function, one
    of its arguments or a variable it captures cannot be pickled; the message names the culprit.
    Raised by ``Task.result()`` when the task's return value could not be pickled in the task or
    unpickled here; by ``ready()`` in a task for a value that cannot be pickled, and by
    ``Task.wait_ready()`` for one that cannot be unpickled here. Raised by ``Queue.put()`` for an
    item that cannot be pickled (nothing is put), and by ``Queue.get()`` for one that cannot be
    unpickled in its process (that item is dropped, and counts as done for ``Queue.join()``).
    """

    __module__ = "bgtask"


if sys.version_info >= (3, 13):
    from queue import ShutDown
else:

    class ShutDown(Exception):
        """Raised by ``put`` and ``get`` on a queue that was shut down (``queue.ShutDown`` on 3.13+)."""

        __module__ = "bgtask"


class RemoteTraceback(Exception):
    """The formatted traceback of an exception raised in a task process.

    Chained as ``__cause__`` of the exception that ``Task.result()`` re-raises, so that the
    traceback the user sees shows where the error happened in the task.
    """

    __module__ = "bgtask"

    def __init__(self, tb: str) -> None:
        super().__init__(tb)
        self.tb = tb

    def __str__(self) -> str:
        return f'\n"""\n{self.tb.rstrip()}\n"""'


def _rebuild_crashed(message: str, exitcode: Optional[int], pid: Optional[int]) -> TaskCrashed:
    return TaskCrashed(message, exitcode=exitcode, pid=pid)


def _rebuild_stopped(message: str, reason: str, exitcode: Optional[int], pid: Optional[int]) -> TaskStopped:
    return TaskStopped(message, reason=reason, exitcode=exitcode, pid=pid)


def _signal_of(exitcode: Optional[int]) -> Optional[signal.Signals]:
    if exitcode is None or exitcode >= 0:
        return None
    try:
        return signal.Signals(-exitcode)
    except ValueError:
        return None


# Likely causes, by signal: what a user should look at first.
_CAUSES = {
    signal.SIGKILL: "killed by SIGKILL: likely the out-of-memory killer, or an explicit kill -9",
    signal.SIGSEGV: "killed by SIGSEGV: a segmentation fault, likely a crash in native code",
    signal.SIGABRT: "killed by SIGABRT: the process aborted, likely a failed assertion in native code",
    signal.SIGBUS: "killed by SIGBUS: a bus error, likely a crash in native code or a truncated mmap",
    signal.SIGFPE: "killed by SIGFPE: an arithmetic fault in native code",
    signal.SIGILL: "killed by SIGILL: an illegal instruction in native code",
    signal.SIGTERM: "killed by SIGTERM: an explicit kill, from outside bgtask",
}


def set_cause(exc: BaseException, cause: Optional[BaseException]) -> None:
    """``exc.__cause__ = cause``, also for exceptions that refuse new attributes.

    A frozen dataclass exception's ``__setattr__`` refuses every assignment, ``__cause__``
    included; the slot itself takes it.
    """
    _CAUSE.__set__(exc, cause)


_CAUSE = BaseException.__dict__["__cause__"]


def describe_exit(exitcode: Optional[int]) -> str:
    """Say in words how a process with this exit code ended, naming the likely cause."""
    if exitcode is None:
        return "exit status unknown"
    sig = _signal_of(exitcode)
    if sig is not None:
        return _CAUSES.get(sig, f"killed by {sig.name}")
    if exitcode < 0:
        return f"killed by signal {-exitcode}"
    return f"exited with code {exitcode}"
