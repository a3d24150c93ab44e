"""The failure matrix: each row a real process, a real signal, a real kill (rows from the docs)."""

from __future__ import annotations

import ctypes
import gc
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

import pytest

from bgtask import BgTaskError, SerializationError, Task, TaskCrashed, TaskStopped, background

from .helpers import ROOT, Script, kill_quietly, pid_alive, run_script, script_env, wait_until
from .test_lifecycle import PRELUDE

# -- the main program ends or dies ------------------------------------------------------------


def test_row01_main_returns_with_a_plain_daemon(tmp_path: Path) -> None:
    """Main returns: a non-graceful daemon is gone before exit, exitcode negative, nothing printed."""
    result = run_script(
        tmp_path,
        PRELUDE
        + """
import atexit
box = []
# Registered before bgtask's own hook (at the first task), so it runs after it: atexit is
# last-in, first-out.
atexit.register(lambda: print("EXITCODE", box[0].exitcode, "ALIVE", box[0].is_alive(), box[0].pid))
box.append(plain_daemon())
wait_ready("plain")
""",
    )
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    fields = result.stdout.split()
    assert fields[:4] == ["EXITCODE", str(-signal.SIGKILL), "ALIVE", "False"]
    assert not pid_alive(int(fields[4]))


def _kill_script_with(tmp_path: Path, ending: str) -> Script:
    return Script(
        tmp_path,
        PRELUDE
        + """
d1, d2 = plain_daemon(), graceful_daemon()
w = worker(1.0)
wait_ready("plain", "graceful", "worker")
for t in (d1, d2, w):
    print("PID", t.pid, flush=True)
"""
        + ending,
    )


@pytest.mark.parametrize(
    "ending",
    [
        "import ctypes; ctypes.string_at(0)",  # a segfault in native code
        "import signal; os.kill(os.getpid(), signal.SIGABRT)",  # abort()
        "os.execv(sys.executable, [sys.executable, '-c', 'import time; time.sleep(0.5)'])",
    ],
    ids=["segfault", "abort", "execv"],
)
def test_row03_main_crashes_or_execs(tmp_path: Path, ending: str) -> None:
    """Main segfaults, aborts or execs: daemons gone within a second, graceful cleanup ran."""
    script = _kill_script_with(tmp_path, ending)
    pids: List[int] = []
    try:
        pids = [int(script.expect("PID")) for _ in range(3)]
        started = time.monotonic()
        assert wait_until(lambda: not pid_alive(pids[0]), timeout=10), "plain daemon survived"
        assert time.monotonic() - started < 5.0
        assert wait_until(lambda: not pid_alive(pids[1]), timeout=15), "graceful daemon survived"
        assert (tmp_path / "cleanup-ran").exists()
        # The non-daemon task runs to its end, with no traceback (row 6).
        assert wait_until((tmp_path / "worker-done").exists, timeout=15)
        assert wait_until(lambda: not pid_alive(pids[2]), timeout=10)
        script.wait(30)
        assert "Traceback" not in script.stderr()
    finally:
        script.close()
        kill_quietly(pids)


def test_row04_fork_copy_outlives_the_original(tmp_path: Path) -> None:
    """The original dies while a forked copy lives: the original's daemons stop all the same."""
    script = Script(
        tmp_path,
        PRELUDE
        + """
import warnings
warnings.simplefilter("ignore", DeprecationWarning)
d = plain_daemon()
wait_ready("plain")
print("PID", d.pid, flush=True)
if os.fork() == 0:
    print("COPY", os.getpid(), flush=True)
    threading.Event().wait()
time.sleep(0.1)
os._exit(0)
""",
    )
    pids: List[int] = []
    try:
        pids.append(int(script.expect("PID")))
        pids.append(int(script.expect("COPY")))
        assert wait_until(lambda: not pid_alive(pids[0]), timeout=10)
        assert pid_alive(pids[1])  # the copy still lives: it held nothing that kept the daemon
    finally:
        script.close()
        kill_quietly(pids)


# -- signals, the terminal, stopping ----------------------------------------------------------


GIL_STUCK = """
import ctypes, signal
def stuck():
    # SIGTERM blocked and a C call that holds the GIL: nothing in the task can react, so only a
    # kill from outside can end it.
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
    ready("stuck")
    ctypes.PyDLL(None).sleep(3600)
"""


def test_row09_gil_stuck_task_is_killed_from_outside_on_stop(tmp_path: Path) -> None:
    """A graceful task stuck in a GIL-holding C call is gone within grace + 1 s of stop()."""
    import ctypes

    ready = tmp_path / "stuck"

    @background(graceful=True, grace=0.5)
    def stuck() -> None:
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
        ready.touch()
        ctypes.PyDLL(None).sleep(3600)

    task = stuck()
    assert wait_until(ready.exists)
    started = time.monotonic()
    task.stop(timeout=60)
    assert time.monotonic() - started < 0.5 + 1.0 + 3.0
    assert task.exitcode == -signal.SIGKILL


def test_row09_gil_stuck_task_is_killed_when_main_is_sigkilled(tmp_path: Path) -> None:
    """Main SIGKILLed with a GIL-stuck graceful daemon: the zygote kills it after grace."""
    script = Script(
        tmp_path,
        PRELUDE
        + GIL_STUCK
        + """
t = background(daemon=True, graceful=True, grace=0.5)(stuck)()
wait_ready("stuck")
print("PID", t.pid, flush=True)
threading.Event().wait()
""",
    )
    pid = 0
    try:
        pid = int(script.expect("PID"))
        os.kill(script.proc.pid, signal.SIGKILL)
        script.wait()
        started = time.monotonic()
        assert wait_until(lambda: not pid_alive(pid), timeout=15)
        assert time.monotonic() - started < 0.5 + 1.0 + 3.0
    finally:
        script.close()
        kill_quietly([pid])


def test_row10_stop_kills_a_raw_multiprocessing_grandchild(tmp_path: Path) -> None:
    """stop() on a task with a multiprocessing child ends that child too."""
    pid_file = tmp_path / "mp-child"

    @background(graceful=True, grace=1.0)
    def parent() -> None:
        import multiprocessing

        child = multiprocessing.get_context("spawn").Process(target=time.sleep, args=(3600,))
        child.start()
        pid_file.write_text(str(child.pid))
        threading.Event().wait()

    task = parent()
    assert wait_until(lambda: pid_file.exists() and pid_file.read_text())
    grandchild = int(pid_file.read_text())
    task.stop(timeout=60)
    assert wait_until(lambda: not pid_alive(grandchild), timeout=5)


def test_row11_stop_timeout_raises_instead_of_hanging(tmp_path: Path) -> None:
    """stop(timeout=) on a process that is not gone in time raises TimeoutError."""
    ready = tmp_path / "ready"

    @background(graceful=True, grace=30.0)
    def deaf() -> None:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        ready.touch()
        threading.Event().wait()

    task = deaf()
    assert wait_until(ready.exists)
    with pytest.raises(TimeoutError):
        task.stop(timeout=0.2)
    task.kill()
    task.join(60)


def test_row11_no_signal_after_the_end(tmp_path: Path) -> None:
    """stop() and kill() after the process was reaped signal nothing (no recycled pid is hit)."""
    victim = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        task = background(lambda: 1)()
        task.join(60)
        # Whatever pid the task had, bgtask no longer signals it (nor its group).
        task.stop()
        task.kill()
        assert victim.poll() is None
        assert task.exitcode == 0
    finally:
        victim.kill()
        victim.wait()


# -- task failures ----------------------------------------------------------------------------


def test_row12_task_error_prints_nothing(tmp_path: Path) -> None:
    """A task that raises puts nothing on stderr; result() re-raises it in main."""
    result = run_script(
        tmp_path,
        """
from bgtask import background

@background
def fail():
    raise ValueError("from the task")

try:
    fail().result(30)
except ValueError as exc:
    print("CAUGHT", exc)
""",
    )
    assert result.returncode == 0
    assert result.stdout.strip() == "CAUGHT from the task"
    assert result.stderr == ""


def _generator() -> Any:
    yield 1


@pytest.mark.parametrize(
    "make",
    [threading.Lock, lambda: _generator(), lambda: socket.socket()],  # noqa: PLW0108
    ids=["lock", "generator", "socket"],
)
def test_row14_unpicklable_results_are_named(
    make: Callable[[], Any], start_method: Optional[str], daemon: bool
) -> None:
    """An unpicklable return value raises SerializationError naming its type; exit is normal."""

    @background(daemon=daemon, start_method=start_method)
    def give() -> Any:
        return make()

    task = give()
    with pytest.raises(SerializationError, match="returned the return value"):
        task.result(timeout=60)
    task.join(60)
    assert task.exitcode == 0


@pytest.mark.parametrize(
    ("body", "code", "says"),
    [
        (lambda: os._exit(7), 7, "exited with code 7"),
        (lambda: sys.exit(7), 7, r"sys\.exit\(7\)"),
    ],
    ids=["os._exit", "sys.exit"],
)
def test_row15_exits_are_crashes(
    body: Callable[[], None], code: int, says: str, start_method: Optional[str], kind: Dict[str, bool]
) -> None:
    """os._exit(7) and sys.exit(7): exitcode 7, TaskCrashed saying so."""
    task = background(start_method=start_method, **kind)(body)()
    with pytest.raises(TaskCrashed, match=says):
        task.result(timeout=60)
    assert task.exitcode == code


def test_row16_segfault_is_named_and_siblings_are_unaffected(tmp_path: Path) -> None:
    """A segfault gives exitcode -11 and TaskCrashed naming SIGSEGV; a sibling finishes."""
    ready = tmp_path / "sibling"

    @background
    def sibling() -> str:
        ready.touch()
        time.sleep(0.3)
        return "fine"

    @background
    def segfault() -> None:
        import ctypes
        import faulthandler

        faulthandler.disable()
        ctypes.string_at(0)

    other = sibling()
    assert wait_until(ready.exists)
    task = segfault()
    with pytest.raises(TaskCrashed, match="SIGSEGV") as info:
        task.result(timeout=60)
    assert info.value.exitcode == -signal.SIGSEGV
    assert other.result(timeout=60) == "fine"


def test_row17_killed_while_sending_a_large_result() -> None:
    """A task killed halfway through sending its result: TaskCrashed, not an unpickling error."""

    @background
    def big() -> bytes:
        return b"z" * (512 * 1024 * 1024)

    task = big()
    assert wait_until(lambda: task._process is not None and task._process._reader.partial, timeout=60)
    # Held halfway: the rest of its result cannot arrive before the kill does (the monitor could
    # otherwise read it all, a busy machine delaying the kill, and the task would have returned).
    os.kill(task.pid, signal.SIGSTOP)
    task.kill()
    task.join(60)
    error = task.exception(0)
    assert isinstance(error, TaskStopped)
    assert error.reason == "kill"


def test_row17_crash_while_sending_a_large_result(tmp_path: Path) -> None:
    """A task that dies while its result is half sent: TaskCrashed saying so."""

    @background
    def big() -> bytes:
        return b"z" * (512 * 1024 * 1024)

    task = big()
    assert wait_until(lambda: task._process is not None and task._process._reader.partial, timeout=60)
    os.kill(task.pid or 0, signal.SIGKILL)  # from outside bgtask: a crash, not a stop
    with pytest.raises(TaskCrashed, match="while sending its outcome"):
        task.result(timeout=60)


def test_row18_leftover_non_daemon_thread_does_not_hold_the_task() -> None:
    """A task that leaves a non-daemon thread: the result comes at once; the process exits."""

    @background
    def leave_thread() -> int:
        threading.Thread(target=threading.Event().wait, daemon=False).start()
        return 5

    task = leave_thread()
    assert task.result(timeout=60) == 5
    task.join(timeout=30)
    assert task.exitcode == 0


NESTED3 = (
    PRELUDE
    + """
@background(daemon=True, graceful=True, grace=1)
def level(n):
    try:
        print("PID", n, os.getpid(), flush=True)
        if n < 3:
            level(n + 1)
        ready(f"level{n}")
        threading.Event().wait()
    finally:
        (HERE / f"cleanup{n}").write_text("yes")

top = level(1)
wait_ready("level1", "level2", "level3")
print("READY", flush=True)
MODE = os.environ["BGTASK_TEST_MODE"]
if MODE == "stop-top":
    top.stop()
threading.Event().wait()
"""
)


@pytest.mark.parametrize("optimize", [False, True], ids=["", "-O"])
@pytest.mark.parametrize("mode", ["stop-top", "kill-middle", "crash-middle", "kill-main"])
def test_row19_three_levels_of_daemons(tmp_path: Path, mode: str, optimize: bool) -> None:
    """Stopping, crashing or orphaning any level stops all levels below (also under -O)."""
    env = script_env()
    env["BGTASK_TEST_MODE"] = mode
    if optimize:
        env["PYTHONOPTIMIZE"] = "1"
    script = Script(tmp_path, NESTED3, env=env)
    pids = {}
    try:
        for _ in range(3):
            n, pid = script.expect("PID").split()
            pids[int(n)] = int(pid)
        script.expect("READY")
        if mode == "kill-middle":
            os.kill(pids[2], signal.SIGKILL)
            below = [3]
        elif mode == "crash-middle":
            os.kill(pids[2], signal.SIGSEGV)
            below = [3]
        elif mode == "kill-main":
            os.kill(script.proc.pid, signal.SIGKILL)
            below = [1, 2, 3]
        else:
            below = [1, 2, 3]
        assert wait_until(lambda: not any(pid_alive(pids[n]) for n in below), timeout=15)
        for n in below:
            if n != 2 or mode in {"stop-top", "kill-main"}:
                assert (tmp_path / f"cleanup{n}").exists(), n
        if mode in ("kill-middle", "crash-middle"):
            assert pid_alive(pids[1])  # the level above is not affected
    finally:
        script.close()
        kill_quietly(list(pids.values()))


def test_row20_closed_stdout_and_reading_stdin() -> None:
    """A task reading stdin gets EOF; one that closes its stdout still reports its result."""

    @background
    def read_stdin() -> str:
        return sys.stdin.read()

    @background
    def close_stdout() -> int:
        sys.stdout.close()
        os.close(1)
        return 3

    assert read_stdin().result(timeout=60) == ""
    assert close_stdout().result(timeout=60) == 3


# -- bad input and call-time conditions ------------------------------------------------------


def test_row22_import_error_arrives_fast(tmp_path: Path) -> None:
    """A task that cannot import its function's module fails within about a second."""
    module = tmp_path / "vanishing_module.py"
    module.write_text("def work():\n    return 1\n")
    sys.path.insert(0, str(tmp_path))
    try:
        import vanishing_module  # type: ignore[import-not-found]

        # Still imported here, so pickled by reference; gone from disk, so the task cannot.
        module.unlink()
        started = time.monotonic()
        task = background(vanishing_module.work)()
        with pytest.raises(BgTaskError, match="No module named 'vanishing_module'"):
            task.result(timeout=60)
        assert time.monotonic() - started < 5.0
    finally:
        sys.path.remove(str(tmp_path))
        sys.modules.pop("vanishing_module", None)


@pytest.mark.slow
def test_row23_big_arguments_and_results(tmp_path: Path) -> None:
    """500 MiB argument, results from 64 KiB to over 2 GiB; peak memory about 2-3x the payload."""
    result = run_script(
        tmp_path,
        """
import resource
from bgtask import background

@background
def size(data):
    return len(data)

@background
def make(n):
    return b"r" * n

arg = b"a" * (500 * 2**20)
assert size(arg).result(120) == len(arg)
del arg
for n in (64 * 2**10, 64 * 2**20):
    assert len(make(n).result(120)) == n
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
big = 2**31 + 2**20
value = make(big).result(300)
assert len(value) == big
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print("PEAK_RATIO", (peak - base) * 1024 / big)
""",
        timeout=600,
    )
    assert result.returncode == 0, result.stderr
    ratio = float(result.stdout.split()[-1])
    assert ratio < 3.5, ratio


def test_row23_result_never_read_does_not_hold_the_task(start_method: Optional[str], daemon: bool) -> None:
    """A task with a 64 MiB result exits even if result() is never called."""
    task = background(daemon=daemon, start_method=start_method)(lambda: b"x" * (64 * 2**20))()
    task.join(timeout=60)
    assert task.exitcode == 0


def test_row25_user_set_start_method(tmp_path: Path) -> None:
    """A program that called multiprocessing.set_start_method() gets the same behaviour."""
    result = run_script(
        tmp_path,
        """
import multiprocessing
from bgtask import background
if __name__ == "__main__":
    multiprocessing.set_start_method("spawn")
    k = 4
    print("R", background(lambda: k * 2)().result(30), multiprocessing.get_start_method())
""",
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["R", "8", "spawn"]


# -- load and resources -----------------------------------------------------------------------


def test_row27_fd_limit_fails_cleanly_at_the_call(tmp_path: Path) -> None:
    """At the descriptor limit a call raises BgTaskError; the tasks already started complete."""
    result = run_script(
        tmp_path,
        """
import os, resource
from bgtask import background, BgTaskError
resource.setrlimit(resource.RLIMIT_NOFILE, (64, 64))
reserve = os.open(os.devnull, os.O_RDONLY)  # to create "go" with, once at the limit

@background
def wait(event_path):
    import os, time
    deadline = time.monotonic() + 120  # never outlive a test that failed
    while not os.path.exists(event_path) and time.monotonic() < deadline:
        time.sleep(0.01)
    return 1

tasks, error = [], None
while error is None and len(tasks) < 500:
    try:
        tasks.append(wait("go"))
    except BgTaskError as exc:
        error = exc
os.close(reserve)
open("go", "w").close()
print("STARTED", len(tasks), "ERROR", type(error).__name__, "SUM", sum(t.result(60) for t in tasks))
""",
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    fields = result.stdout.split()
    assert fields[2:4] == ["ERROR", "BgTaskError"]
    assert int(fields[1]) > 0
    assert fields[5] == fields[1]


ROW29 = """
import os, time
from bgtask import background, BgTaskError

@background
def wait_for_go():
    deadline = time.monotonic() + 120  # never outlive a test that failed
    while not os.path.exists("go") and time.monotonic() < deadline:
        time.sleep(0.01)
    return 1

tasks, error = [], None
while error is None and len(tasks) < 100:
    try:
        tasks.append(wait_for_go())
    except BgTaskError as exc:
        error = exc
open("go", "w").close()
print("STARTED", len(tasks), "ERROR", type(error).__name__, "SUM", sum(t.result(60) for t in tasks))
"""


def test_row29_process_limit_fails_at_the_call(tmp_path: Path) -> None:
    """With a process limit, calls that cannot fork fail at the call; started ones complete.

    RLIMIT_NPROC does not bind root, so as root the limit is a pids cgroup (the same EAGAIN
    from fork); otherwise it is RLIMIT_NPROC itself.
    """
    path = tmp_path / "nproc.py"
    path.write_text(ROW29)
    cgroup = Path(f"/sys/fs/cgroup/pids/bgtask-test-{os.getpid()}")
    if os.geteuid() == 0:
        try:
            cgroup.mkdir()
            (cgroup / "pids.max").write_text("16")
        except OSError as exc:
            pytest.skip(f"no pids cgroup to limit processes as root: {exc}")
        command = [
            "sh",
            "-c",
            f'echo $$ > {cgroup}/cgroup.procs && exec "$0" "$1"',
            sys.executable,
            str(path),
        ]
    else:
        limit = "import resource; resource.setrlimit(resource.RLIMIT_NPROC, (16, 16))\n"
        path.write_text(limit + ROW29)
        command = [sys.executable, str(path)]
    try:
        result = subprocess.run(  # noqa: PLW1510 (the exit code is asserted)
            command, capture_output=True, text=True, timeout=120, env=script_env(), cwd=str(tmp_path)
        )
    finally:
        if os.geteuid() == 0:
            wait_until(lambda: not (cgroup / "cgroup.procs").read_text().strip(), timeout=20)
            cgroup.rmdir()
    assert result.returncode == 0, result.stderr
    fields = result.stdout.split()
    assert fields[2:4] == ["ERROR", "BgTaskError"], result.stdout
    assert int(fields[1]) > 0
    assert fields[5] == fields[1]


@pytest.mark.slow
def test_row28_ten_thousand_tasks_with_handles_kept() -> None:
    """10,000 tasks with 1 MiB results, handles kept: fds, threads, zombies at their baseline."""

    def make() -> bytes:
        return b"m" * 2**20

    run = background(make)
    run().result(60)
    from .helpers import settled_fd_count, zombie_children

    fds, threads, rss = settled_fd_count(), threading.active_count(), _rss()
    handles = []
    for _ in range(10_000):
        task = run()
        assert len(task.result(timeout=60)) == 2**20
        handles.append(task)
    for task in handles:
        task.join(60)
    assert wait_until(lambda: settled_fd_count() <= fds, timeout=10)
    assert threading.active_count() <= threads  # bgtask's monitor thread ends when idle
    assert zombie_children() == []
    assert _rss() > rss + 5 * 2**30  # each handle keeps its result, as a future does
    del handles, task
    gc.collect()
    assert not [o for o in gc.get_objects() if isinstance(o, Task)]
    # glibc keeps freed blocks for reuse; hand them back to the system before measuring.
    ctypes.CDLL(None).malloc_trim(0)
    assert _rss() < rss + 200 * 2**20  # dropped handles give their memory back


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def test_row30_many_threads_many_tasks() -> None:
    """32 threads each starting 50 tasks at once: no deadlock, no mixed-up results."""

    def ident(i: int) -> int:
        return i

    run = background(ident)
    errors: List[BaseException] = []

    def worker(offset: int) -> None:
        try:
            tasks = [run(offset + i) for i in range(50)]
            got = [t.result(timeout=300) for t in tasks]
            if got != [offset + i for i in range(50)]:
                errors.append(AssertionError(f"mixed up: {got}"))
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(1000 * n,)) for n in range(32)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    assert not any(t.is_alive() for t in threads)
    assert errors == []


def test_row31_exit_with_300_running_daemons(tmp_path: Path) -> None:
    """Main exits with 300 daemons (half graceful, grace=2): all gone within grace + 2 s."""
    result = run_script(
        tmp_path,
        PRELUDE
        + """
import json
@background(daemon=True, graceful=True, grace=2)
def gentle(i):
    try:
        ready(f"g{i}")
        threading.Event().wait()
    finally:
        (HERE / f"c{i}").touch()

@background(daemon=True)
def rough(i):
    ready(f"r{i}")
    threading.Event().wait()

tasks = [gentle(i) for i in range(150)] + [rough(i) for i in range(150)]
wait_ready(*[f"g{i}" for i in range(150)], *[f"r{i}" for i in range(150)])
(HERE / "pids.json").write_text(json.dumps([t.pid for t in tasks]))
print("EXITING", time.time(), flush=True)
""",
        timeout=300,
    )
    ended = time.time()
    assert result.returncode == 0, result.stderr
    exiting = float(result.stdout.split()[1])
    pids = __import__("json").loads((tmp_path / "pids.json").read_text())
    assert not any(pid_alive(p) for p in pids)
    assert ended - exiting < 2.0 + 2.0 + 2.0  # grace + 2 s, plus slack for a loaded machine
    assert all((tmp_path / f"c{i}").exists() for i in range(150))


def test_row32_a_thousand_crashes() -> None:
    """1,000 crashing tasks each raise TaskCrashed; bgtask keeps working; nothing leaks."""
    from .helpers import settled_fd_count

    run = background(lambda: os._exit(9))
    run().join(60)
    fds = settled_fd_count()
    for _ in range(1000):
        with pytest.raises(TaskCrashed):
            run().result(timeout=60)
    assert background(lambda: 5)().result(timeout=60) == 5
    assert wait_until(lambda: settled_fd_count() <= fds, timeout=10)


# -- quiet, security ----------------------------------------------------------------------------


def test_quiet_under_dev_mode_and_warnings_as_errors(tmp_path: Path) -> None:
    """Under -W error -X dev: no warning, no signal handler installed, no start method set."""
    path = tmp_path / "quiet.py"
    path.write_text(
        """
import multiprocessing, signal, subprocess, sys
from bgtask import background, stop_event
before = {s: signal.getsignal(s) for s in signal.valid_signals() if s not in (signal.SIGKILL, signal.SIGSTOP)}
popen = subprocess.Popen([sys.executable, "-c", "raise SystemExit(5)"])

@background(daemon=True, graceful=True)
def daemon():
    stop_event().wait()

d = daemon()
print(sum(background(lambda i=i: i)().result(30) for i in range(20)))
assert popen.wait(30) == 5, "bgtask took another library's exit status"
after = {s: signal.getsignal(s) for s in before}
assert before == after, "a signal handler was installed"
assert multiprocessing.get_start_method(allow_none=True) is None
"""
    )
    result = subprocess.run(  # noqa: PLW1510 (the exit code is asserted)
        [sys.executable, "-W", "error", "-X", "dev", str(path)],
        capture_output=True,
        text=True,
        timeout=120,
        env=script_env(),
        cwd=str(tmp_path),
    )
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    assert result.stdout.strip() == "190"


def test_row33_no_listening_socket_and_clean_command_lines(tmp_path: Path) -> None:
    """No process of bgtask listens on a socket; no command line holds a function or argument."""
    secret = "s3cr3t-argument-value"

    @background
    def show(value: str) -> List[str]:
        with open(f"/proc/{os.getpid()}/cmdline", "rb") as f:
            return f.read().decode().split("\0")

    task = show(secret)
    cmdline = task.result(timeout=60)
    assert secret not in " ".join(cmdline)
    assert "show" not in " ".join(cmdline)
    listening = set()
    with open("/proc/net/unix") as f:
        for line in f.readlines()[1:]:
            fields = line.split()
            if int(fields[3], 16) & 0x10000:  # __SO_ACCEPTCON: a listening socket
                listening.add(fields[6])
    from .helpers import descendants

    for pid in [os.getpid(), *descendants()]:
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
        except FileNotFoundError:
            continue  # a spare or task that ended since the listing
        for fd in fds:
            try:
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue
            if target.startswith("socket:["):
                assert target[8:-1] not in listening, f"pid {pid} listens on fd {fd}"


def test_row34_task_holds_no_descriptor_of_main(tmp_path: Path) -> None:
    """A task holds only stdio and its own socket; main can rebind a port it closed."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen()
    port = server.getsockname()[1]

    @background
    def fds() -> List[str]:
        return sorted(os.listdir(f"/proc/{os.getpid()}/fd"), key=int)

    held = fds().result(timeout=60)
    server.close()
    again = socket.socket()
    try:
        again.bind(("127.0.0.1", port))  # fails with EADDRINUSE if a task still held it
    finally:
        again.close()
    # stdin, stdout, stderr, the task's socket, and the descriptor listdir itself opened
    assert len(held) <= 5, held
    assert ROOT.exists()
