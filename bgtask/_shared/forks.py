"""One after-fork reset: every part of bgtask that holds what a forked copy must let go of
(threads, locks, tasks, descriptors) registers its hook here, at its import.

::

    os.fork() ──before──> each registered ``before`` (stop an idle monitor thread: no thread
                          of bgtask's is copied into a fork it has no reason to be in)
              ──in the child──> each ``after_in_child``, in ``order`` (the task registry
                          first, the monitor last)

A part registers only once it is imported: a module never imported holds nothing to let go of,
and the hooks never import anything (a module another thread was importing at the fork is
locked for good in the copy). The hooks are installed with the first task (``activate()``): a
program that never starts one forks as if bgtask were not there.
"""

from __future__ import annotations

import os
from typing import Callable, List, Optional, Tuple

Hook = Callable[[], None]

# Where a part's after-fork hook runs among the others: lower first.
TASKS, MAIN, OFFLOAD, PROCESSES, LAUNCHERS, QUEUES, MONITOR = 0, 10, 20, 30, 40, 50, 90

_before: List[Hook] = []
_after: List[Tuple[int, int, Hook]] = []
_active = False


def register(
    *, after_in_child: Optional[Hook] = None, before: Optional[Hook] = None, order: int = MAIN
) -> None:
    """Run ``before`` before each fork, ``after_in_child`` in each forked child."""
    if before is not None:
        _before.append(before)
    if after_in_child is not None:
        _after.append((order, len(_after), after_in_child))
        _after.sort()


def activate() -> None:
    """Install the hooks (once per process tree: a forked copy inherits them)."""
    global _active
    if not _active:
        _active = True
        os.register_at_fork(before=_run_before, after_in_child=_run_after_in_child)


def _run_before() -> None:
    for hook in list(_before):
        hook()


def _run_after_in_child() -> None:
    for _order, _index, hook in list(_after):
        hook()
