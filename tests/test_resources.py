"""Many tasks: no growth in descriptors, threads or zombies; concurrency without mix-ups."""

from __future__ import annotations

import os
import threading
from typing import Callable, List, Optional

import pytest

from bgtask import Task, TaskCrashed, background

from .helpers import descendants, settled_fd_count, wait_until, zombie_children


def _zombies_among_descendants() -> List[int]:
    zombies = []
    for pid in [os.getpid(), *descendants()]:
        try:
            with open(f"/proc/{pid}/task/{pid}/children") as f:
                children = [int(c) for c in f.read().split()]
        except OSError:
            continue
        for child in children:
            try:
                with open(f"/proc/{child}/stat") as f:
                    state = f.read().rsplit(")", 1)[1].split()[0]
            except OSError:
                continue
            if state == "Z":
                zombies.append(child)
    return zombies


def _make_ident() -> Callable[[int], int]:
    # Defined in a function, so it travels by value: a task then needs no import of this
    # test module (which would import pytest in every task).
    def ident(i: int) -> int:
        return i

    return ident


_ident = _make_ident()
ident = background(_ident)


def test_300_tasks_in_a_row_leak_nothing() -> None:
    """300 tasks, handles kept: open fds, threads and zombies stay at their baseline."""
    ident(0).join(60)  # start the zygote and the monitor before the baseline
    fds, threads = settled_fd_count(), threading.active_count()
    tasks: List[Task[int]] = []
    for i in range(300):
        task = ident(i)
        assert task.result(timeout=60) == i
        task.join(60)
        tasks.append(task)
    assert wait_until(lambda: settled_fd_count() <= fds, timeout=10)
    assert threading.active_count() == threads
    assert zombie_children() == []
    assert _zombies_among_descendants() == []
    assert all(t.exitcode == 0 for t in tasks)


def test_multiprocessing_start_methods_leak_nothing(start_method: Optional[str]) -> None:
    """40 tasks under each start method release their descriptors."""
    run = background(start_method=start_method)(_ident)
    run(0).join(60)
    fds = settled_fd_count()
    tasks = [run(i) for i in range(40)]
    assert [t.result(timeout=60) for t in tasks] == list(range(40))
    for task in tasks:
        task.join(60)
    assert wait_until(lambda: settled_fd_count() <= fds, timeout=10)
    assert zombie_children() == []


def test_burst_of_tasks_all_complete() -> None:
    """500 tasks started at once all return their own result."""
    tasks = [ident(i) for i in range(500)]
    assert [t.result(timeout=120) for t in tasks] == list(range(500))


def test_crashing_tasks_do_not_break_bgtask() -> None:
    """200 tasks that crash each raise TaskCrashed; bgtask then still works, nothing leaks."""

    @background
    def crash() -> None:
        os._exit(9)

    ident(0).join(60)
    fds = settled_fd_count()
    for _ in range(200):
        with pytest.raises(TaskCrashed):
            crash().result(timeout=60)
    assert ident(5).result(timeout=60) == 5
    assert wait_until(lambda: settled_fd_count() <= fds, timeout=10)
