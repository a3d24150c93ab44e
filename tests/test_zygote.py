"""The default start method's zygote: spares handed over ahead, and what a task inherits."""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path
from typing import Any, List, Tuple

import pytest

from bgtask import TaskCrashed, background
from bgtask._backends import launch as _launch
from bgtask._backends import zygote as _zygote

from .helpers import held_spares, pid_alive, run_script, wait_until


def _held_spares() -> List[Any]:
    zygote = _launch.get(None).current()
    assert zygote is not None
    assert wait_until(lambda: held_spares(zygote) == _zygote.SPARES, timeout=30)
    with zygote.lock:
        return list(zygote.pool.spares)


@background
def _draw() -> Tuple[int, int]:
    import random

    return os.getpid(), random.getrandbits(64)


def test_tasks_do_not_share_random_state() -> None:
    """Tasks forked from one zygote draw different random numbers."""
    draws = [task.result(timeout=60) for task in [_draw() for _ in range(6)]]
    assert len({pid for pid, _ in draws}) == 6
    assert len({value for _, value in draws}) == 6


def test_tasks_do_not_share_random_state_when_random_is_preloaded(tmp_path: Path) -> None:
    """With ``random`` imported in the zygote, each task is still seeded afresh."""
    result = run_script(
        tmp_path,
        """
import bgtask, random

@bgtask.background
def draw():
    import random
    return random.getrandbits(64)

bgtask.preload("random")
values = [t.result(60) for t in [draw() for _ in range(6)]]
print(len(set(values)))
""",
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "6"


def test_a_task_uses_threads_locks_and_logging() -> None:
    """Thread machinery works in a task as in any fresh process: pools, locks, logging."""

    @background
    def threaded() -> Any:
        import concurrent.futures
        import io
        import logging
        import threading

        stream = io.StringIO()
        logger = logging.getLogger("bgtask-test-task")
        logger.addHandler(logging.StreamHandler(stream))
        lock = threading.Lock()
        total = []

        def work(i: int) -> int:
            with lock:
                total.append(i)
            logger.warning("item %d", i)
            return i * i

        with concurrent.futures.ThreadPoolExecutor(4) as pool:
            squares = list(pool.map(work, range(20)))
        main_is_current = threading.main_thread() is threading.current_thread()
        logged = stream.getvalue().count("item")
        return sum(squares), len(total), logged, main_is_current, threading.active_count()

    assert threaded().result(timeout=60) == (2470, 20, 20, True, 1)


def test_a_spare_killed_from_outside_is_replaced() -> None:
    """Spares killed before they get a task cost nothing: calls get live processes."""
    assert background(lambda: 1)().result(timeout=60) == 1  # the zygote runs, spares held
    spares = _held_spares()
    for spare in spares:
        os.kill(spare.pid, signal.SIGKILL)
    # Dead, but maybe not yet reported: a call may still take one, find it dead and retry.
    assert wait_until(lambda: not any(pid_alive(spare.pid) for spare in spares))
    tasks = [background(lambda i=i: i * 2)() for i in range(4)]
    assert [task.result(timeout=60) for task in tasks] == [0, 2, 4, 6]
    assert not {task.pid for task in tasks} & {spare.pid for spare in spares}


def test_environment_changes_between_calls_reach_each_task(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each task sees the environment of its own call, however often it changes."""

    @background
    def look() -> Any:
        return os.environ.get("BGTASK_TEST_ROUND")

    assert look().result(timeout=60) is None
    for i in range(8):
        monkeypatch.setenv("BGTASK_TEST_ROUND", str(i))
        tasks = [look() for _ in range(3)]  # some on spares forked before the change
        assert [task.result(timeout=60) for task in tasks] == [str(i)] * 3
    monkeypatch.delenv("BGTASK_TEST_ROUND")
    assert look().result(timeout=60) is None


def test_task_channels_are_not_inherited_by_programs_this_process_runs() -> None:
    """The sockets to spares, which become tasks' channels, are closed on exec."""
    assert background(lambda: 1)().result(timeout=60) == 1
    assert not any(os.get_inheritable(spare.sock.fileno()) for spare in _held_spares())


def test_unused_spares_end_with_the_zygote() -> None:
    """Closing the zygote (program exit) ends the spares it forked for this process."""
    assert background(lambda: 1)().result(timeout=60) == 1
    spares = _held_spares()
    _launch.close_all()
    assert wait_until(lambda: not any(pid_alive(spare.pid) for spare in spares))


def test_a_killed_zygote_is_replaced_and_its_tasks_are_followed_to_their_end(tmp_path: Path) -> None:
    """SIGKILL of the zygote: its spares and daemon tasks end, a worker finishes, calls go on."""
    go = tmp_path / "go"

    @background
    def worker() -> str:
        import time

        deadline = time.monotonic() + 60
        while not go.exists() and time.monotonic() < deadline:
            time.sleep(0.01)
        return "done"

    @background(daemon=True)
    def daemon() -> None:
        import threading

        threading.Event().wait()

    running, doomed = worker(), daemon()
    assert running.pid  # both started
    assert doomed.pid
    spares = _held_spares()
    zygote = _launch.get(None).current()
    assert zygote is not None
    os.kill(zygote.process.pid, signal.SIGKILL)
    assert wait_until(lambda: not any(pid_alive(spare.pid) for spare in spares))
    doomed.join(30)
    assert not doomed.is_alive()
    assert isinstance(doomed.exception(0), TaskCrashed)
    assert running.is_alive()
    go.touch()
    assert running.result(timeout=60) == "done"
    running.join(30)
    assert not running.is_alive()
    assert background(lambda: 7)().result(timeout=60) == 7


def test_a_worker_survives_its_zygote_dying_right_after_the_call() -> None:
    """A non-daemon task outlives a zygote killed before the task could even start running."""

    @background
    def worker() -> str:
        return "ok"

    for _ in range(20):
        task = worker()
        zygote = _launch.get(None).current()
        assert zygote is not None
        os.kill(zygote.process.pid, signal.SIGKILL)
        assert task.result(timeout=60) == "ok"
        task.join(30)


def test_a_task_started_just_before_its_program_is_killed_runs(tmp_path: Path) -> None:
    """A non-daemon task runs to its end when its main program dies, also one started an
    instant before: the zygote, which learns of the death from a write that fails, first reads
    the activations the program sent (else it killed that task as an unused spare). A call
    with a busy queue widens the window; twenty programs, each killed right after its call."""
    for i in range(20):
        ran = tmp_path / f"ran-{i}"
        result = run_script(
            tmp_path,
            f"""
import os, pathlib, signal
import bgtask

@bgtask.background
def work(q):
    pathlib.Path({str(ran)!r}).touch()

q = bgtask.Queue()
for _ in range(20_000):
    q.put(b"x" * 1024)
q.shutdown()
work(q)
os.kill(os.getpid(), signal.SIGKILL)
""",
        )
        assert result.returncode == -signal.SIGKILL, result.stderr[-2000:]
        assert wait_until(ran.exists, timeout=60), f"program {i}: its task never ran"


def test_after_fork_functions_of_preloaded_modules_run_in_each_task(tmp_path: Path) -> None:
    """A preloaded module's ``os.register_at_fork`` function runs in every task it is forked into."""
    (tmp_path / "bgtask_atfork_probe.py").write_text(
        "import os\nFORKED = []\nos.register_at_fork(after_in_child=lambda: FORKED.append(os.getpid()))\n"
    )
    result = run_script(
        tmp_path,
        """
import os, sys
sys.path.insert(0, os.getcwd())
import bgtask

@bgtask.background
def probe():
    import bgtask_atfork_probe
    return bgtask_atfork_probe.FORKED == [os.getpid()]

bgtask.background(abs)(-1).result(60)  # the zygote runs: the preload switches its fork
bgtask.preload("bgtask_atfork_probe")
print([t.result(60) for t in [probe() for _ in range(4)]])
""",
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[True, True, True, True]"


A_THREAD = "import threading; threading.Thread(target=threading.Event().wait, daemon=True).start()"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the C library's fork is used on Linux only")
@pytest.mark.parametrize(
    ("setup", "plain"),
    [("", True), ("import random", False), (A_THREAD, False)],
    ids=["pristine", "random", "thread"],
)
def test_the_zygote_forks_with_the_c_library_only_while_that_is_safe(
    tmp_path: Path, setup: str, plain: bool
) -> None:
    """The C library's fork() is chosen in a pristine single-threaded process, else os.fork()."""
    check = "from bgtask._shared import platform\nprint(platform.plain_fork() is not None)"
    result = run_script(tmp_path, f"{setup}\n{check}")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == str(plain)
