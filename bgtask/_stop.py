"""The stop side of a task: ``StopEvent``, ``stop_event()`` and the private stop exception.

A graceful task is stopped in one of two ways, chosen by the task itself::

    stop request (Task.stop(), timeout, program exit, main program died)
        |  delivered to the task process as SIGTERM
        v
    task called stop_event()?  --yes-->  the event is set; the task finishes on its own
        | no
        v
    _StopRequest is raised in the task's main thread; its finally/with blocks run

Either way, the process tree is killed from outside once ``grace`` seconds have passed. This module
is imported by the task runtime, so it imports nothing else of bgtask.
"""

from __future__ import annotations

import os
from typing import Optional

__all__ = ["StopEvent", "stop_event"]


class _StopRequest(BaseException):
    """Raised inside a graceful task that is being stopped and did not ask for its stop event.

    It derives from ``BaseException`` so that the task's ``except Exception:`` blocks cannot
    swallow it: the stop must unwind the whole function, running every ``finally`` and ``with``
    on the way. It never leaves the task process; the main program sees ``TaskStopped``.
    """


class StopEvent:
    """The flag a graceful task watches to learn that it should finish.

    Get it with ``stop_event()`` inside a task. It is set when the task is asked to stop: by
    ``Task.stop()``, its timeout, or the end or death of the main program (daemon tasks). It is
    safe to use from any thread of the task.
    """

    __module__ = "bgtask"
    # Set from a signal handler, in the thread it may interrupt: a threading.Event would take the
    # Condition lock that thread can be holding inside Event.wait(), and deadlock. A flag and a
    # pipe take no lock: set() writes a byte, wait() waits for the pipe to be readable.
    __slots__ = ("_flag", "_r", "_w")

    def __init__(self) -> None:
        self._flag = False
        # Made by stop_event(), when the task first asks for the event: a task that never does
        # holds no descriptor for it.
        self._r = self._w = -1

    def _open(self) -> None:
        if self._w < 0:
            self._r, self._w = os.pipe()

    def is_set(self) -> bool:
        """Return whether the task has been asked to stop."""
        return self._flag

    def wait(self, timeout: Optional[float] = None) -> bool:
        """Block until the task is asked to stop or ``timeout`` seconds pass.

        Returns:
            ``True`` if the task was asked to stop, ``False`` on timeout.
        """
        if not self._flag:
            import selectors

            self._open()
            # selectors, not select(): under start_method="fork" the task inherits the main
            # program's descriptors, and this pipe's number may be over FD_SETSIZE.
            with selectors.DefaultSelector() as selector:
                selector.register(self._r, selectors.EVENT_READ)
                selector.select(timeout)
        return self._flag

    def _set(self) -> None:
        """Set the flag; safe in a signal handler."""
        if not self._flag:
            self._flag = True
            if self._w >= 0:
                os.write(self._w, b"\0")

    def __repr__(self) -> str:
        return f"<bgtask.StopEvent {'set' if self.is_set() else 'unset'}>"


class _TaskState:
    """What the running task process knows about itself; one per task process."""

    __slots__ = ("atomic", "cooperative", "event", "graceful", "pending", "running", "stopping")

    def __init__(self, graceful: bool) -> None:
        self.event = StopEvent()
        self.cooperative = False  # the task asked for its stop event
        self.stopping = False  # a stop was requested
        self.running = True  # the function has not returned yet: a stop may still be raised
        self.graceful = graceful
        self.atomic = False  # the main thread sends a message: a stop must wait until it is out
        self.pending = False  # a stop came meanwhile: raised once the message is out

    def running_done(self) -> None:
        """Mark the function as returned: from now on a stop request raises nothing."""
        self.running = False


_state: Optional[_TaskState] = None


def stop_event() -> StopEvent:
    """Return the stop event of the task this code runs in.

    Calling it tells bgtask that the task stops cooperatively: when it is asked to stop, the event
    is set and no exception is raised into it. A task that never calls it gets an exception raised
    inside it instead, so its ``finally`` and ``with`` blocks run.

    Raises:
        BgTaskError: when called outside a task started by bgtask.
    """
    if _state is None:
        from ._errors import BgTaskError

        raise BgTaskError(
            "stop_event() was called outside a bgtask task; it is only available in the process "
            "of a function decorated with @background"
        )
    _state.event._open()  # before the task counts as cooperative: a stop then always wakes it
    _state.cooperative = True
    return _state.event


stop_event.__module__ = "bgtask"
