"""The lifecycle of a program's tasks: the registry of live tasks and the exit procedure.

This module owns every exit hook of bgtask. They run in this fixed order:

1. **Wait for non-daemon tasks**, like the stdlib does for non-daemon processes, while daemon
   tasks (a logger, say) keep running for them. A Ctrl-C during this wait stops the non-daemon
   tasks (graceful ones get their ``grace``); a second one kills them.
2. **Stop daemon tasks, all at once**: graceful ones get SIGTERM (their stop event is set, or the
   stop exception is raised in them) and ``grace`` seconds, then their process group is killed;
   the others are killed at once. A graceful task killed after its grace is logged with its name.
3. **Close the zygote**, which exits once it has nothing left to stop.

The stdlib does it the other way round (daemons are terminated first, cpython #108645), which
kills a daemon logger while the non-daemon work still writes to it.

The procedure runs from ``atexit`` in the main program, and from the task runtime at the end of a
task that started tasks of its own. When the main program dies without running it (SIGKILL,
SIGTERM, ``os._exit``), the zygote does step 2 from outside.
"""

from __future__ import annotations

import atexit
import os
import sys
import threading
import time
from typing import Any, List, Set

# Margin added to the longest grace when the exit procedure waits for daemon tasks to be gone.
EXIT_WAIT_MARGIN_S = 2.0

_lock = threading.Lock()
_live: Set[Any] = set()  # strong references: a task is watched whether or not its handle is kept
_hook_owner = 0  # pid of the process whose atexit hook is registered
_fork_hook = False  # registered on first use (a process that never starts a task forks faster)
_after_multiprocessing = 0  # pid of the process whose hook was moved after multiprocessing's


def register(task: Any) -> None:
    """Add a starting task to the registry; registers the exit hook on first use."""
    global _hook_owner, _fork_hook
    with _lock:
        _live.add(task)
        if _hook_owner != os.getpid():
            _hook_owner = os.getpid()
            atexit.register(shutdown)
        if not _fork_hook:
            _fork_hook = True
            os.register_at_fork(before=_before_fork, after_in_child=_after_fork_in_child)


def unregister(task: Any) -> None:
    with _lock:
        _live.discard(task)


def run_before_multiprocessing() -> None:
    """Make sure bgtask's exit hook runs before ``multiprocessing``'s, which joins children.

    ``atexit`` runs hooks last-registered first; ``multiprocessing.util`` registers its hook when
    it is first imported, possibly after ours. Called after each start with a multiprocessing
    method; it moves the hook once, after that import.
    """
    global _after_multiprocessing
    if _after_multiprocessing == os.getpid():
        return
    with _lock:
        if _hook_owner == os.getpid() and "multiprocessing.util" in sys.modules:
            atexit.unregister(shutdown)
            atexit.register(shutdown)
            _after_multiprocessing = os.getpid()


def live_tasks() -> List[Any]:
    with _lock:
        return list(_live)


def shutdown() -> None:
    """The exit procedure (see the module docstring). Safe to call more than once."""
    if _hook_owner != os.getpid():
        return  # a forked copy, or no task was ever started here
    from . import _launch

    try:
        _wait_for_non_daemons()
        _stop_daemons()
    except BaseException:  # noqa: BLE001 (an exit hook must not die halfway, leaving tasks running)
        for task in live_tasks():
            task._request_stop("exit", hard=True)
    _launch.close_all()
    _stop_idle_monitor()


def _wait_for_non_daemons() -> None:
    interrupts = 0
    while True:
        pending = [t for t in live_tasks() if not t.is_daemon and not t._exited]
        if not pending:
            return
        try:
            for task in pending:
                task._wait_exit(None)
        except KeyboardInterrupt:
            interrupts += 1
            for task in pending:
                task._request_stop("exit", hard=interrupts > 1)


def _stop_daemons() -> None:
    daemons = [t for t in live_tasks() if t.is_daemon and not t._exited]
    if not daemons:
        return
    for task in daemons:
        task._request_stop("exit")
    longest = max((t._grace for t in daemons if t._graceful), default=0.0)
    deadline = time.monotonic() + longest + EXIT_WAIT_MARGIN_S
    hard = False
    for task in daemons:
        while not task._exited:
            try:
                task._wait_exit(max(0.0, deadline - time.monotonic()))
                break
            except KeyboardInterrupt:
                if not hard:
                    hard = True
                    for other in daemons:
                        other._request_stop("exit", hard=True)
        if time.monotonic() >= deadline:
            break


# The modules whose state a forked copy of the program must let go of, in this order. The fork
# hooks look them up instead of importing them: a module another thread was importing at the
# fork is locked for good in the copy, and one never imported holds nothing to let go of.
_FORK_AWARE = ("bgtask._decorator", "bgtask._process", "bgtask._launch", "bgtask._monitor")


def _before_fork() -> None:
    """No thread of bgtask's should be copied into a fork it has no reason to be in."""
    _stop_idle_monitor()


def _stop_idle_monitor() -> None:
    stop = getattr(sys.modules.get("bgtask._monitor"), "stop_idle_thread", None)
    if stop is not None:
        stop()


def _after_fork_in_child() -> None:
    """A forked copy of the program owns none of the original's tasks, zygote or threads."""
    global _lock
    _lock = threading.Lock()
    for task in _live:
        task._forget_in_child()
    _live.clear()
    for name in _FORK_AWARE:
        forget = getattr(sys.modules.get(name), "forget_in_child", None)
        if forget is not None:
            forget()
