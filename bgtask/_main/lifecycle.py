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
SIGTERM, ``os._exit``), the zygote does step 2 from outside. Where a framework ends the program
its own way (a server's signal handler, a notebook kernel shut down from outside), the program
calls it as ``bgtask.shutdown()`` from the framework's hook.

The registry also answers ``bgtask.active()``, and remembers where each task was started while
``track_origins`` is on (the pytest plugin's leak check turns it on).
"""

from __future__ import annotations

import atexit
import os
import sys
import threading
import time
import weakref
from typing import Any, List, Optional, Set

from .._monitor import offload as _offload
from .._shared import context, forks

# How often the exit procedure looks for pending tasks that only it can start (see _offload).
STRANDED_POLL_S = 0.05
# Margin added to the longest grace when the exit procedure waits for daemon tasks to be gone.
EXIT_WAIT_MARGIN_S = 2.0

_lock = threading.RLock()  # reentrant: a signal handler may start a task during register()
_live: Set[Any] = set()  # strong references: a task is watched whether or not its handle is kept
_hook_owner = 0  # pid of the process whose atexit hook is registered
_after_multiprocessing = 0  # pid of the process whose hook was moved after multiprocessing's
# Whether each call records where it was made (Task._origin): a frame walk, off by default.
track_origins = False


def register(task: Any) -> None:
    """Add a starting task to the registry; registers the exit hook on first use."""
    global _hook_owner
    with _lock:
        _live.add(task)
        if _hook_owner != os.getpid():
            _hook_owner = os.getpid()
            atexit.register(_at_exit)
        forks.activate()
        task_context = context.current
        if task_context is not None and _at_exit not in task_context.at_end:
            # In a task: the tasks it started end with it (waited for, or stopped).
            task_context.at_end.append(_at_exit)


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
            atexit.unregister(_at_exit)
            atexit.register(_at_exit)
            _after_multiprocessing = os.getpid()


def run_before_ray() -> None:
    """Make sure bgtask's exit hook runs before Ray's, which ends its cluster and every task on
    it at once: daemon tasks are stopped gracefully and non-daemon ones waited for first.

    Called after each start on Ray; moves the hook once Ray is connected (``ray.init()``
    registers Ray's hook), and again if the program connects anew.
    """
    global _after_ray
    ray = sys.modules.get("ray")
    if ray is None or not ray.is_initialized():
        return
    from .._backends.ray_worker import session

    connection = (os.getpid(), session())
    if _after_ray == connection:
        return
    with _lock:
        if _hook_owner == os.getpid():
            atexit.unregister(_at_exit)
            atexit.register(_at_exit)
            _after_ray = connection


_after_ray: Any = None

# Tasks that failed with nothing looking (no waiter, no callback): reported at the program's
# end if still nothing retrieved their outcome; the garbage collector reports those dropped.
unretrieved: weakref.WeakSet[Any] = weakref.WeakSet()


def _report_unretrieved() -> None:
    for task in list(unretrieved):
        task._report_unretrieved()


def live_tasks() -> List[Any]:
    with _lock:
        return list(_live)


def active() -> List[Any]:
    """The tasks not ended yet (running, pending, or exiting), oldest first (``bgtask.active()``)."""
    tasks = [task for task in live_tasks() if not task._exited]
    tasks.sort(key=lambda task: task._started)
    return tasks


def shutdown(wait: bool = True, timeout: Optional[float] = None) -> None:
    """Run bgtask's exit procedure now: end this program's tasks and its zygote.

    For programs whose end bypasses ``atexit`` (a server's signal handler, a notebook kernel
    shut down from outside) and for frameworks' shutdown hooks. With ``wait``, non-daemon tasks
    are waited for (up to ``timeout`` seconds; those still running then are stopped), then
    daemon tasks are stopped (graceful ones get their ``grace``). Without ``wait``, every task
    is stopped at once. Returns once every task's process is gone (at the latest a moment after
    the longest ``grace``, when the stragglers were killed). Safe to call more than once; tasks
    started afterwards work as usual (a new zygote starts with the first).

    A Ctrl-C meanwhile stops the non-daemon tasks it waits for (a second one kills every task);
    the procedure then finishes and the ``KeyboardInterrupt`` is raised here.

    Raises:
        BgTaskError: called in bgtask's monitor thread (a log handler of a task's records),
            the thread that ends tasks.
        KeyboardInterrupt: a Ctrl-C came meanwhile; every task is gone all the same.
    """
    from .._monitor import loop as _monitor

    if _monitor.in_monitor_thread():
        from .._shared.errors import BgTaskError

        raise BgTaskError(
            "bgtask.shutdown() cannot run in bgtask's monitor thread (where the main program's "
            "log handlers run for records of tasks), which ends tasks; call it elsewhere"
        )
    if _procedure("shutdown", wait, timeout):
        raise KeyboardInterrupt


shutdown.__module__ = "bgtask"


def _at_exit() -> None:
    """The exit procedure at the interpreter's exit (see the module docstring)."""
    try:
        _procedure("exit", True, None)
    except BaseException:  # noqa: BLE001 (an exit hook: the tasks were killed, nothing is left)
        pass
    _report_unretrieved()


def _procedure(reason: str, wait: bool, timeout: Optional[float]) -> bool:
    """The exit procedure; returns whether a Ctrl-C came meanwhile."""
    from .._backends import launch as _launch
    from .._monitor import loop as _monitor

    if _hook_owner != os.getpid():
        if not _hook_owner:  # no task was ever started here; a queue may have connected to Ray
            _launch.close_all()
        return False  # or a forked copy, whose launchers are the original's

    interrupted = False
    error: Optional[BaseException] = None
    try:
        _stop_what_is_not_waited_for(reason, wait)
        if wait:
            deadline = None if timeout is None else time.monotonic() + timeout
            interrupted = _wait_for_non_daemons(reason, deadline)
        interrupted = _stop_all(reason) or interrupted
    except BaseException as exc:  # noqa: BLE001 (a third Ctrl-C, say: end everything, fast)
        for task in live_tasks():
            task._request_stop(reason, hard=True)
        if isinstance(exc, KeyboardInterrupt):
            interrupted = True
        else:
            error = exc
    _launch.close_all()
    _monitor.stop_idle_thread()
    if error is not None:
        raise error
    return interrupted


def _stop_what_is_not_waited_for(reason: str, wait: bool) -> None:
    """Before the wait: tasks waiting for a place (in a ``Limiter``) that the end of the program
    stops anyway never start; ``map()``'s tasks, which nobody will read, stop now; and daemon
    tasks that hold every place a waited-for task waits for stop too, or the wait never ends."""
    tasks = live_tasks()
    for task in tasks:
        if task._scoped or (task._process is None and (not wait or task.is_daemon)):
            task._request_stop(reason)
    if not wait:
        return
    starved = {t._limiter for t in tasks if t._process is None and t._limiter is not None and not t._exited}
    for limiter in starved:
        holders = [t for t in tasks if t._limiter is limiter and t._process is not None and not t._exited]
        if all(t.is_daemon or t._scoped for t in holders):
            for holder in holders:
                holder._request_stop(reason)


def _wait_for_non_daemons(reason: str, deadline: Optional[float]) -> bool:
    """Wait for non-daemon tasks; a Ctrl-C (or the deadline) stops them, a second one kills.

    Returns whether a Ctrl-C came.
    """
    interrupts = 0
    report = _WaitReport(reason)
    while True:
        pending = [t for t in live_tasks() if not t.is_daemon and not t._scoped and not t._exited]
        if not pending:
            return interrupts > 0
        try:
            for task in pending:
                while True:
                    report.waiting(pending)
                    remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
                    # Where no thread can be started for a pending task's start (CPython 3.12.0
                    # and 3.12.1 at exit), this thread starts it: it looks now and then.
                    _offload.run_stranded()
                    slice_s = STRANDED_POLL_S if remaining is None else min(remaining, STRANDED_POLL_S)
                    if task._wait_exit(slice_s):
                        break
                    if deadline is not None and time.monotonic() >= deadline:
                        report.timed_out()
                        return interrupts > 0  # the deadline passed: _stop_all() stops the rest
        except KeyboardInterrupt:
            interrupts += 1
            left = [t for t in pending if not t._exited]
            report.interrupted(left, kill=interrupts > 1)
            for task in pending:
                task._request_stop(reason, hard=interrupts > 1)


# How often the exit procedure says again which tasks it waits for.
REPORT_EVERY_S = 5.0


class _WaitReport:
    """What the exit procedure says while it waits for non-daemon tasks (logger ``bgtask``)."""

    def __init__(self, reason: str) -> None:
        self.reason = reason
        self.next_at = 0.0

    def waiting(self, tasks: List[Any]) -> None:
        """INFO when the wait starts, and again every ``REPORT_EVERY_S`` while it lasts."""
        now = time.monotonic()
        if now < self.next_at:
            return
        # Those still running their function: one whose outcome is known is only exiting.
        left = [t for t in tasks if not t._exited and not t.done()]
        if left:
            self.next_at = now + REPORT_EVERY_S
            where = "bgtask.shutdown()" if self.reason == "shutdown" else "the end of the program"
            _log().info(
                "bgtask: %s waits for %s to finish: %s (Ctrl-C stops them, a second Ctrl-C kills them)",
                where,
                _count(left),
                _describe(left),
            )

    def timed_out(self) -> None:
        self.next_at = float("inf")  # _stop_all() says which tasks it stops

    def interrupted(self, tasks: List[Any], kill: bool) -> None:
        if tasks:
            what = "killing" if kill else "Ctrl-C: stopping"
            _log().warning("bgtask: %s %s: %s", what, _count(tasks), _describe(tasks))


def _log() -> Any:
    import logging

    return logging.getLogger("bgtask")


def _count(tasks: List[Any], noun: str = "task") -> str:
    return f"{len(tasks)} {noun}{'s' if len(tasks) != 1 else ''}"


def _describe(tasks: List[Any]) -> str:
    """``'name' (pid 42, running for 3.2 s)``, for each task."""
    now = time.monotonic()
    parts = []
    for task in tasks:
        pid = f"pid {task._pid}" if task._pid is not None else "pending"
        parts.append(f"{task._name!r} ({pid}, running for {now - task._started:.1f} s)")
    return ", ".join(parts)


def _stop_all(reason: str) -> bool:
    """Stop every task still running, all at once, and wait until they are gone.

    A Ctrl-C meanwhile kills them; returns whether one came.
    """
    tasks = [t for t in live_tasks() if not t._exited]
    if not tasks:
        return False
    waited = [t for t in tasks if not t.is_daemon and not t._scoped]
    if waited:  # the wait's timeout passed, or there was none (shutdown(wait=False))
        _log().warning("bgtask: stopping %s still running: %s", _count(waited), _describe(waited))
    daemons = [t for t in tasks if t not in waited]
    if daemons:
        _log().info("bgtask: stopping %s: %s", _count(daemons, "daemon task"), _describe(daemons))
    for task in tasks:
        task._request_stop(reason)
    longest = max((t._grace for t in tasks if t._graceful), default=0.0)
    deadline = time.monotonic() + longest + EXIT_WAIT_MARGIN_S
    interrupted = False
    for task in tasks:
        while not task._exited:
            try:
                task._wait_exit(max(0.0, deadline - time.monotonic()))
                break
            except KeyboardInterrupt:
                if not interrupted:
                    interrupted = True
                    for other in tasks:
                        other._request_stop(reason, hard=True)
        if time.monotonic() >= deadline:
            break
    return interrupted


def _after_fork_in_child() -> None:
    """A forked copy of the program owns none of the original's tasks, zygote or threads."""
    global _lock
    _lock = threading.RLock()
    for task in _live:
        task._forget_in_child()
    _live.clear()


forks.register(after_in_child=_after_fork_in_child, order=forks.TASKS)
