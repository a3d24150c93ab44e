"""The threads bgtask starts: none is ever the thread a signal for the program lands in.

A signal sent to a process (``kill(pid, SIGTERM)``, a Ctrl-C) goes to one of its threads that
does not block it. Python runs its handler in the main thread, but only once that thread runs
Python code again: a main thread blocked in a system call (``poll()`` in ``Queue.get()``,
``time.sleep()``, a lock) stays blocked when the signal woke another thread instead. A task
would miss its stop until its grace ran out; a program would miss its Ctrl-C.

So bgtask's own threads (the monitor, the queue feeder, a task's parent watch...) block the
signals a program handles: the kernel hands those to the main thread, or to a thread of the
program's own. Signals a thread raises against itself (a fault, ``abort()``) are left alone.
"""

from __future__ import annotations

import signal
import threading
from typing import FrozenSet

BLOCKED: FrozenSet[int] = frozenset(
    getattr(signal, name)
    for name in ("SIGHUP", "SIGINT", "SIGQUIT", "SIGTERM", "SIGUSR1", "SIGUSR2", "SIGALRM", "SIGCHLD")
    if hasattr(signal, name)
)


def start(thread: threading.Thread) -> None:
    """Start ``thread`` blocking ``BLOCKED`` from its first instruction on.

    The mask is set in this thread around ``start()`` and the new thread inherits it: set in
    the new thread itself, a signal could land there before it ran. Raises what ``start()``
    raises (``RuntimeError`` at interpreter shutdown).
    """
    if not hasattr(signal, "pthread_sigmask"):
        thread.start()
        return
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, BLOCKED)
    try:
        thread.start()
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)
