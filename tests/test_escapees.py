"""A process a task leaves behind is ended with the task, whatever name it gives itself."""

from __future__ import annotations

import os
import signal
from pathlib import Path
from typing import Optional

import pytest

from bgtask import TaskCrashed, background

from .helpers import pid_alive, wait_until

ESCAPEE = r"""
import ctypes, sys, time
if sys.argv[1] == "disguised":
    ctypes.CDLL(None).prctl(15, b"bgtask-zygote", 0, 0, 0)   # PR_SET_NAME, as bgtask's zygote
time.sleep(120)
"""


def _spawn(kind: str, mark: str) -> int:
    import subprocess
    import sys

    child = subprocess.Popen([sys.executable, "-c", ESCAPEE, kind], start_new_session=True)
    Path(mark).write_text(str(child.pid))
    return child.pid


@pytest.mark.skipif(not os.path.exists("/proc/self/comm"), reason="process names: Linux")
@pytest.mark.parametrize("kind", ["plain", "disguised"])
def test_a_process_named_like_the_zygote_ends_with_its_task(
    start_method: Optional[str], kind: str, tmp_path: Path
) -> None:
    """A process a task starts in a new session, named bgtask-zygote or not, ends at the task's end."""
    mark = tmp_path / "pid"
    pid = background(_spawn, start_method=start_method)(kind, str(mark)).result(timeout=60)
    try:
        assert wait_until(lambda: not pid_alive(pid), timeout=20)
    finally:
        if pid_alive(pid):
            os.kill(pid, signal.SIGKILL)


def _spawn_then_die(mark: str) -> None:
    _spawn("disguised", mark)
    os.kill(os.getpid(), signal.SIGKILL)  # no cleanup of its own: the zygote sweeps


def test_the_zygote_sweeps_a_disguised_escapee_of_a_killed_task(tmp_path: Path) -> None:
    """A task SIGKILLed after leaving a process named bgtask-zygote: the zygote kills that one."""
    mark = tmp_path / "pid"
    task = background(_spawn_then_die)(str(mark))
    task.join(timeout=60)
    assert wait_until(mark.exists)
    pid = int(mark.read_text())
    try:
        assert wait_until(lambda: not pid_alive(pid), timeout=20)
    finally:
        if pid_alive(pid):
            os.kill(pid, signal.SIGKILL)


@pytest.mark.skipif(not os.path.exists("/proc/self/task"), reason="child subreaper: Linux")
def test_an_escapee_is_gone_once_its_tasks_end_is_known_even_if_the_zygote_dies_then(
    tmp_path: Path,
) -> None:
    """A task SIGKILLed after leaving a process in a new session, its zygote SIGKILLed the moment
    the task's end is known: that process is gone (the zygote killed it before reporting)."""
    from bgtask._backends import launch as _launch

    for round_ in range(3):
        mark = tmp_path / f"pid{round_}"
        task = background(_spawn_then_die)(str(mark))
        task.join(timeout=60)
        assert not task.is_alive()
        zygote = _launch.get(None).current()
        assert zygote is not None
        os.kill(zygote.process.pid, signal.SIGKILL)
        # The next round's call must not race the zygote's death (it would crash, as documented).
        assert wait_until(lambda z=zygote: not z.alive, timeout=30)
        assert task.exitcode == -signal.SIGKILL  # reported by the zygote before it died
        assert isinstance(task.exception(0), TaskCrashed)
        assert mark.exists()  # written before the task killed itself
        pid = int(mark.read_text())
        try:
            assert wait_until(lambda p=pid: not pid_alive(p), timeout=20), (
                f"round {round_}: escapee {pid} survived"
            )
        finally:
            if pid_alive(pid):
                os.kill(pid, signal.SIGKILL)
