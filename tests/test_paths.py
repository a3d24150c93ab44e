"""Regression tests for paths that broke before: each row of the review, with real processes."""

from __future__ import annotations

import os
import resource
import signal
import subprocess
import sys
import threading
from pathlib import Path
from typing import List, Optional

import pytest

from bgtask import TaskCrashed, TaskStopped, background

from .helpers import (
    SCRIPT_HANDSHAKES,
    Script,
    descendants,
    kill_quietly,
    pid_alive,
    run_script,
    script_env,
    wait_until,
)

# What the scripts share: handshakes through files in the script's directory (its cwd).
PRELUDE = (
    """
import os, sys, time, threading, signal
from pathlib import Path
from bgtask import background, stop_event

HERE = Path(__file__).resolve().parent
METHOD = None if len(sys.argv) < 2 or sys.argv[1] == "zygote" else sys.argv[1]
"""
    + SCRIPT_HANDSHAKES
)


def _method_arg(start_method: Optional[str]) -> List[str]:
    return [start_method or "zygote"]


def _kill_if_alive(pids: List[int]) -> None:
    """For a failed test: end what escaped bgtask (outside every group the fixtures kill)."""
    kill_quietly([pid for pid in pids if pid_alive(pid)])


def _end_script(script: Script, pids: List[int]) -> None:
    """Kill what a script started by pid, survivors first (they hold its pipes), then the script.

    Its tasks run in process groups of their own, which ``Script.close()`` does not reach.
    """
    _kill_if_alive([*pids, *descendants(script.proc.pid)])
    script.close()


def _is_my_zygote(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        command = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False
    parent = int(stat[stat.rindex(")") + 2 :].split()[1])
    return parent == os.getpid() and b"bgtask._backends.zygote" in command


def _zygote_pid() -> int:
    """The pid of this process's running zygote: its child with the zygote's command line."""
    found: List[int] = []

    def one_zygote() -> bool:
        found[:] = [pid for pid in descendants() if _is_my_zygote(pid)]
        return len(found) == 1

    assert wait_until(one_zygote), f"zygotes running: {found}"
    return found[0]


# -- rows 1 and 21: daemon tasks ------------------------------------------------------------


@pytest.mark.parametrize("graceful", [False, True], ids=["plain", "graceful"])
def test_row01_daemon_tasks_called_in_a_row_all_return(start_method: Optional[str], graceful: bool) -> None:
    """Twenty daemon tasks called one after another each return their own result."""
    square = background(daemon=True, graceful=graceful, start_method=start_method)(lambda i: i * i)
    tasks = [square(i) for i in range(20)]
    assert [task.result(timeout=60) for task in tasks] == [i * i for i in range(20)]
    for task in tasks:
        task.join(30)
        assert not task.is_alive()


@pytest.mark.parametrize("graceful", [False, True], ids=["plain", "graceful"])
def test_row21_fork_daemon_ends_when_main_is_sigkilled(tmp_path: Path, graceful: bool) -> None:
    """Under start_method="fork", a daemon task is gone soon after its main program is SIGKILLed."""
    script = Script(
        tmp_path,
        PRELUDE
        + f"""
@background(daemon=True, graceful={graceful}, grace=2, start_method="fork")
def forever():
    (HERE / "forever.tmp").write_text(str(os.getpid()))
    os.rename(HERE / "forever.tmp", HERE / "forever")
    threading.Event().wait()

task = forever()
wait_ready("forever")
print("PID", task.pid, flush=True)
threading.Event().wait()
""",
    )
    record = tmp_path / "forever"
    try:
        pid = int(script.expect("PID"))
        os.kill(script.proc.pid, signal.SIGKILL)
        script.wait()
        assert wait_until(lambda: not pid_alive(pid), timeout=10), "the daemon task outlived main"
    finally:
        _end_script(script, [int(record.read_text())] if record.exists() else [])


# -- row 2: a zygote without os.waitid and without /proc -------------------------------------

# First on the scripts' PYTHONPATH, in place of tests/script_site/sitecustomize.py (whose work
# it repeats for the script itself). In a zygote, and so in the tasks it forks, os.waitid is
# gone and /proc cannot be read: the exit watcher and the listing of children must do without.
HIDING_SITE = """
import builtins, os, sys

with open("/proc/self/cmdline", "rb") as _f:  # the -c command is not in sys.argv
    _command = _f.read()
if b"bgtask._backends.zygote" in _command:
    for _name in ("waitid", "WNOWAIT"):
        if hasattr(os, _name):
            delattr(os, _name)
    _open, _listdir = builtins.open, os.listdir

    def _hidden(path):
        try:
            path = os.fsdecode(path)
        except TypeError:
            return False  # a descriptor
        return path == "/proc" or path.startswith("/proc/")

    def open(file, *args, **kwargs):
        if _hidden(file):
            raise PermissionError(13, "hidden by the test", file)
        return _open(file, *args, **kwargs)

    def listdir(path="."):
        if _hidden(path):
            raise PermissionError(13, "hidden by the test", path)
        return _listdir(path)

    builtins.open = open
    os.listdir = listdir
elif sys.argv and sys.argv[0].endswith(".py"):
    for _stream in (sys.stdout, sys.stderr):
        if _stream is not None and hasattr(_stream, "reconfigure"):
            _stream.reconfigure(line_buffering=True, write_through=False)
"""

HIDING_PRELUDE = (
    PRELUDE
    + """
@background
def hidden():
    try:
        open("/proc/self/stat").close()
        proc = "readable"
    except OSError:
        proc = "hidden"
    return hasattr(os, "waitid"), proc

print("SEES", *hidden().result(60), flush=True)
"""
)


def _hiding_env(tmp_path: Path) -> dict:
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(HIDING_SITE)
    env = script_env()
    env["PYTHONPATH"] = os.pathsep.join([str(site), env["PYTHONPATH"]])
    return env


def test_row02_zygote_without_waitid_or_proc_returns_results(tmp_path: Path) -> None:
    """With os.waitid and /proc hidden from the zygote, tasks still return their results."""
    result = run_script(
        tmp_path,
        HIDING_PRELUDE
        + """
square = background(lambda i: i * i)
print("R", *[t.result(60) for t in [square(i) for i in range(6)]], flush=True)
""",
        env=_hiding_env(tmp_path),
    )
    assert "SEES False hidden" in result.stdout, result.stderr  # the hiding took effect
    assert result.returncode == 0, result.stderr
    assert "R 0 1 4 9 16 25" in result.stdout


def test_row02_zygote_without_waitid_or_proc_kills_a_leftover_child(tmp_path: Path) -> None:
    """With os.waitid and /proc hidden, a child a task left in its own group is killed at its end."""
    script = Script(
        tmp_path,
        HIDING_PRELUDE
        + """
@background
def leave_a_child():
    import subprocess
    return subprocess.Popen(["sleep", "600"]).pid  # in the task's process group

task = leave_a_child()
print("CHILD", task.result(60), flush=True)
task.join(60)
print("JOINED", flush=True)
threading.Event().wait()
""",
        env=_hiding_env(tmp_path),
    )
    pids: List[int] = []
    try:
        assert script.expect("SEES") == "False hidden"
        pids.append(int(script.expect("CHILD")))
        script.expect("JOINED")
        assert wait_until(lambda: not pid_alive(pids[0]), timeout=10), "the task's child outlived it"
    finally:
        _end_script(script, pids)


def test_row02_zygote_without_waitid_or_proc_stops_a_task(tmp_path: Path) -> None:
    """With os.waitid and /proc hidden, stop() ends a task that would run forever."""
    script = Script(
        tmp_path,
        HIDING_PRELUDE
        + """
from bgtask import TaskStopped

@background
def forever():
    ready("forever")
    threading.Event().wait()

task = forever()
wait_ready("forever")
print("PID", task.pid, flush=True)
task.stop(timeout=15)
print("STOPPED", task.is_alive(), isinstance(task.exception(0), TaskStopped), flush=True)
""",
        env=_hiding_env(tmp_path),
    )
    pids: List[int] = []
    try:
        assert script.expect("SEES") == "False hidden"
        pids.append(int(script.expect("PID")))
        assert script.expect("STOPPED", timeout=30) == "False True"
        assert not pid_alive(pids[0])
    finally:
        _end_script(script, pids)


# -- row 3: thousands of descriptors in the main program ---------------------------------------

MANY_FDS = (
    PRELUDE
    + """
import resource
soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
held = [os.open(os.devnull, os.O_RDONLY) for _ in range(2000)]
assert max(held) > 2000
"""
)


def _need_fd_room() -> None:
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    if hard != resource.RLIM_INFINITY and hard < 4096:
        pytest.skip(f"RLIMIT_NOFILE's hard limit is {hard}, below 4096")


def test_row03_tasks_run_from_a_program_with_2000_descriptors(tmp_path: Path) -> None:
    """A main program holding 2000 descriptors (numbers over FD_SETSIZE) gets its tasks' results."""
    _need_fd_room()
    result = run_script(
        tmp_path,
        MANY_FDS
        + """
square = background(lambda i: i * i)
print("R", *[t.result(60) for t in [square(i) for i in range(6)]], flush=True)
""",
    )
    assert result.returncode == 0, result.stderr
    assert "R 0 1 4 9 16 25" in result.stdout


def test_row03_stop_event_wait_with_2000_inherited_descriptors(tmp_path: Path) -> None:
    """Under "fork", StopEvent.wait() in a task holding 2000 inherited descriptors wakes at stop()."""
    _need_fd_room()
    result = run_script(
        tmp_path,
        MANY_FDS
        + """
@background(graceful=True, start_method="fork")
def waiter():
    event = stop_event()
    ready("waiter")
    return event.wait(), os.fstat(2000) is not None

task = waiter()
wait_ready("waiter")
task.stop(timeout=15)
print("R", *task.result(0), flush=True)
""",
    )
    assert result.returncode == 0, result.stderr
    assert "R True True" in result.stdout


# -- rows 5 and 6: the zygote is SIGKILLed ---------------------------------------------------


@pytest.mark.parametrize("how", ["stop", "kill"])
def test_row05_task_of_a_killed_zygote_can_be_stopped(tmp_path: Path, how: str) -> None:
    """After its zygote is SIGKILLed, a running non-daemon task still ends at stop() or kill()."""
    started = tmp_path / "started"

    @background
    def forever() -> None:
        started.touch()
        threading.Event().wait()

    task = forever()
    try:
        assert wait_until(started.exists)
        zygote = _zygote_pid()
        os.kill(zygote, signal.SIGKILL)
        assert wait_until(lambda: not pid_alive(zygote))
        if how == "stop":
            task.stop(timeout=15)
        else:
            task.kill()
            task.join(15)
        assert wait_until(lambda: not pid_alive(task.pid), timeout=10), "the task outlived stop"
        with pytest.raises(TaskStopped):
            task.result(timeout=15)
    finally:
        _kill_if_alive([task.pid])


def test_row06_calls_right_after_the_zygote_is_killed_return() -> None:
    """Ten calls made right after each of ten SIGKILLs of the zygote all return their results."""
    plus_one = background(lambda i: i + 1)
    assert plus_one(0).result(timeout=60) == 1
    for _ in range(10):
        os.kill(_zygote_pid(), signal.SIGKILL)
        tasks = [plus_one(i) for i in range(10)]
        assert [task.result(timeout=30) for task in tasks] == list(range(1, 11))
        for task in tasks:
            task.join(30)


# -- row 9: atexit hooks of preloaded modules -------------------------------------------------


def test_row09_atexit_hook_of_a_preloaded_module_does_not_run_in_tasks(tmp_path: Path) -> None:
    """An atexit hook a preloaded module registers in the zygote never runs in the tasks."""
    (tmp_path / "bgtask_atexit_probe.py").write_text(
        "import atexit, os\n"
        "LOG = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'atexit.log')\n"
        "def _hook():\n"
        "    with open(LOG, 'a') as f:\n"
        "        f.write(f'{os.getpid()}\\n')\n"
        "atexit.register(_hook)\n"
    )
    result = run_script(
        tmp_path,
        """
import os, sys
sys.path.insert(0, os.getcwd())
import bgtask

bgtask.preload("bgtask_atexit_probe")

@bgtask.background
def probe():
    import sys
    return os.getpid(), "bgtask_atexit_probe" in sys.modules

outcomes = [t.result(60) for t in [probe() for _ in range(3)]]
print("PRELOADED", all(loaded for _, loaded in outcomes))
print("PIDS", *[pid for pid, _ in outcomes])
""",
    )
    assert result.returncode == 0, result.stderr
    assert "PRELOADED True" in result.stdout  # the hook was registered before every fork
    task_pids = next(line.split()[1:] for line in result.stdout.splitlines() if line.startswith("PIDS"))
    log = tmp_path / "atexit.log"
    written = log.read_text().split() if log.exists() else []
    assert len(written) <= 1, f"the hook ran {len(written)} times: {written}"
    assert not set(written) & set(task_pids), "the hook ran in a task"


# -- row 11: processes that leave their task's process group -----------------------------------


def test_row11_escapee_of_a_returned_task_is_killed(start_method: Optional[str]) -> None:
    """A process a task started in a new session is gone soon after the task returned."""

    @background(graceful=start_method is not None, start_method=start_method)
    def escape() -> int:
        import subprocess

        return subprocess.Popen(["sleep", "600"], start_new_session=True).pid

    pids: List[int] = []
    try:
        task = escape()
        pids.append(task.result(timeout=60))
        task.join(30)
        assert wait_until(lambda: not pid_alive(pids[0]), timeout=10), "the escapee outlived its task"
    finally:
        _kill_if_alive(pids)


def test_row11_escapee_of_a_stopped_task_is_killed(start_method: Optional[str], tmp_path: Path) -> None:
    """A process a task started in a new session is gone soon after stop() ended the task."""
    record = tmp_path / "escapee"

    @background(graceful=start_method is not None, grace=5, start_method=start_method)
    def escape_and_wait() -> None:
        import subprocess

        pid = subprocess.Popen(["sleep", "600"], start_new_session=True).pid
        (tmp_path / "escapee.tmp").write_text(str(pid))
        os.rename(tmp_path / "escapee.tmp", record)
        threading.Event().wait()

    pids: List[int] = []
    task = escape_and_wait()
    try:
        assert wait_until(record.exists)
        pids.append(int(record.read_text()))
        task.stop(timeout=15)
        assert not task.is_alive()
        assert wait_until(lambda: not pid_alive(pids[0]), timeout=10), "the escapee outlived its task"
    finally:
        _kill_if_alive([*pids, task.pid])


def test_row11_double_forked_escapee_of_a_returned_task_is_killed() -> None:
    """A grandchild a task double-forked into a new session is gone soon after the task returned."""

    @background
    def double_fork() -> int:
        r, w = os.pipe()
        child = os.fork()
        if child == 0:
            try:
                os.close(r)
                os.setsid()
                grandchild = os.fork()
                if grandchild == 0:
                    os.execvp("sleep", ["sleep", "600"])
                os.write(w, str(grandchild).encode())
            finally:
                os._exit(0)
        os.close(w)
        with os.fdopen(r) as pipe:
            grandchild = int(pipe.read())
        os.waitpid(child, 0)
        return grandchild

    pids: List[int] = []
    try:
        task = double_fork()
        pids.append(task.result(timeout=60))
        task.join(30)
        assert wait_until(lambda: not pid_alive(pids[0]), timeout=10), "the grandchild outlived its task"
    finally:
        _kill_if_alive(pids)


def test_row11_escapee_of_a_daemon_ends_when_main_is_sigkilled(tmp_path: Path) -> None:
    """A process a daemon task started in a new session is gone soon after main is SIGKILLed."""
    script = Script(
        tmp_path,
        PRELUDE
        + """
import subprocess

@background(daemon=True)
def escape_and_wait():
    pid = subprocess.Popen(["sleep", "600"], start_new_session=True).pid
    print("ESCAPEE", pid, flush=True)
    threading.Event().wait()

task = escape_and_wait()
print("PID", task.pid, flush=True)
threading.Event().wait()
""",
    )
    pids: List[int] = []
    try:
        pids.append(int(script.expect("ESCAPEE")))
        pids.append(int(script.expect("PID")))
        os.kill(script.proc.pid, signal.SIGKILL)
        script.wait()
        assert wait_until(lambda: not pid_alive(pids[1]), timeout=10), "the daemon task outlived main"
        assert wait_until(lambda: not pid_alive(pids[0]), timeout=10), "the escapee outlived main"
    finally:
        _end_script(script, pids)


# -- row 17: standard output redirected after the first call ---------------------------------


def test_row17_stdout_redirected_later_reaches_tasks(start_method: Optional[str], tmp_path: Path) -> None:
    """A task started after main moved fd 1 to a file (os.dup2) prints into that file."""
    result = run_script(
        tmp_path,
        PRELUDE
        + """
def say(text):
    print(text, flush=True)
    return text

if __name__ == "__main__":
    run = background(start_method=METHOD)(say)
    run("first call").result(60)
    fd = os.open(HERE / "out.txt", os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    sys.stdout.flush()
    os.dup2(fd, 1)
    os.close(fd)
    run("MARKER-17").result(60)
""",
        args=_method_arg(start_method),
    )
    assert result.returncode == 0, result.stderr
    assert "MARKER-17" not in result.stdout
    assert "MARKER-17" in (tmp_path / "out.txt").read_text()


# -- row 18: a task writes garbage into its channel ------------------------------------------


def test_row18_garbage_on_the_channel_is_a_crash() -> None:
    """A task that writes garbage to its sockets and returns is a TaskCrashed; calls go on."""

    @background
    def scribble() -> str:
        import stat

        for fd in range(64):
            try:
                if stat.S_ISSOCK(os.fstat(fd).st_mode):
                    os.write(fd, b"\xde\xad\xbe\xef garbage \x00\xff" * 64)
            except OSError:
                pass
        return "returned"

    task = scribble()
    with pytest.raises(TaskCrashed):
        task.result(timeout=30)
    task.join(30)
    assert not task.is_alive()
    assert background(lambda: "next")().result(timeout=30) == "next"


# -- row 19: no thread left to warn about at a fork ---------------------------------------------


@pytest.mark.skipif(sys.version_info < (3, 12), reason="fork() warns about threads from Python 3.12")
def test_row19_fork_after_tasks_ended_raises_no_warning(tmp_path: Path) -> None:
    """Once its tasks ended, the main program forks without the fork-with-threads warning."""
    path = tmp_path / "script.py"
    path.write_text(
        """
import os, warnings
from bgtask import background

task = background(lambda: 42)()
assert task.result(60) == 42
task.join(60)
# Recorded, not raised: Python drops the error that -W error would make of this warning.
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    pid = os.fork()  # bgtask's idle monitor thread is stopped at the fork
    if pid == 0:
        os._exit(0)
os.waitpid(pid, 0)
print("FORKED", [str(w.message) for w in caught], flush=True)
"""
    )
    result = subprocess.run(
        [sys.executable, "-W", "error::DeprecationWarning", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=str(tmp_path),
        env=script_env(),
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert "FORKED []" in result.stdout
    assert "Warning" not in result.stderr


# -- row 20: long lines through a pipe ---------------------------------------------------------


def test_row20_long_lines_of_concurrent_tasks_arrive_whole(
    start_method: Optional[str], tmp_path: Path
) -> None:
    """Four tasks printing 4000-character lines at once into one pipe: every line arrives whole."""
    result = run_script(
        tmp_path,
        PRELUDE
        + """
def shout(char):
    ready("ready-" + char)
    wait_ready(*["ready-" + c for c in "abcd"])  # all four print at the same time
    line = char * 4000
    for _ in range(200):
        print(line)

if __name__ == "__main__":
    run = background(start_method=METHOD)(shout)
    for task in [run(c) for c in "abcd"]:
        task.result(120)
""",
        args=_method_arg(start_method),
        timeout=180,
    )
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    torn = [
        f"{len(line)}:{line[:1]}..{line[-1:]}" for line in lines if len(line) != 4000 or len(set(line)) != 1
    ]
    assert not torn, f"{len(torn)} torn lines, e.g. {torn[:5]}"
    assert sorted(line[0] for line in lines) == sorted("abcd" * 200)
