"""The stop side of a task: ``StopEvent`` and the private stop exception (``stop_event()``, which
finds the running task's event, is in ``_shared.context``).

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

__all__ = ["StopEvent"]


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
