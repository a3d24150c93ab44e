"""The promises the stdlib breaks, each checked on a real main program run as a script."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Dict, List, Optional

import pytest

from .helpers import (
    ANNOUNCE_EXIT_WAIT,
    ROOT,
    SCRIPT_HANDSHAKES,
    Script,
    kill_quietly,
    pid_alive,
    run_script,
    script_env,
    wait_until,
)

PRELUDE = (
    """
import os, sys, time, threading, signal
from pathlib import Path
from bgtask import background, stop_event

HERE = Path(__file__).resolve().parent
METHOD = os.environ.get("BGTASK_TEST_START_METHOD") or None  # the start method under test

"""
    + SCRIPT_HANDSHAKES
    + """

@background(daemon=True, start_method=METHOD)
def plain_daemon():
    ready("plain")
    threading.Event().wait()

@background(daemon=True, graceful=True, grace=5, start_method=METHOD)
def graceful_daemon():
    try:
        ready("graceful")
        threading.Event().wait()
    finally:
        (HERE / "cleanup-ran").write_text("yes")

@background(daemon=True, graceful=True, grace=5, start_method=METHOD)
def cooperative_daemon():
    event = stop_event()
    ready("cooperative")
    while not event.is_set():
        event.wait(0.05)
    (HERE / "cooperative-saw-stop").write_text("yes")

"""
    + ANNOUNCE_EXIT_WAIT
    + """
@background(start_method=METHOD)
def worker(seconds):
    ready("worker")
    time.sleep(seconds)
    (HERE / "worker-done").write_text("yes")
"""
)


def _guarded(body: str) -> str:
    """A script body under the ``__main__`` guard that spawn and forkserver need."""
    return 'if __name__ == "__main__":\n' + textwrap.indent(textwrap.dedent(body).strip(), "    ") + "\n"


def _method_env(start_method: Optional[str]) -> Dict[str, str]:
    env = script_env()
    env["BGTASK_TEST_START_METHOD"] = start_method or ""
    return env


def _pids(script: Script, count: int) -> List[int]:
    return [int(script.expect("PID")) for _ in range(count)]


def test_normal_exit_waits_for_workers_then_stops_daemons(
    tmp_path: Path, start_method: Optional[str]
) -> None:
    """At a normal end, the non-daemon task finishes, then daemons stop (graceful ones clean up)."""
    result = run_script(
        tmp_path,
        PRELUDE
        + _guarded(
            """
            d1, d2, d3 = plain_daemon(), graceful_daemon(), cooperative_daemon()
            w = worker(0.3)
            wait_ready("plain", "graceful", "cooperative")
            print("PIDS", d1.pid, d2.pid, d3.pid, flush=True)
            """
        ),
        env=_method_env(start_method),
    )
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    assert (tmp_path / "worker-done").exists()
    assert (tmp_path / "cleanup-ran").exists()
    assert (tmp_path / "cooperative-saw-stop").exists()
    pids = [int(p) for p in result.stdout.split()[1:]]
    assert not any(pid_alive(pid) for pid in pids)


def test_daemon_logger_outlives_the_workers(tmp_path: Path) -> None:
    """Daemons are stopped after the non-daemon tasks ended, not before (the stdlib's order)."""
    result = run_script(
        tmp_path,
        PRELUDE
        + """
log = HERE / "log"

@background(daemon=True, graceful=True)
def logger():
    event = stop_event()
    ready("logger")
    event.wait()
    with open(log, "a") as f:
        f.write("logger stopped\\n")

@background
def job():
    time.sleep(0.3)
    with open(log, "a") as f:
        f.write("job done\\n")

logger()
wait_ready("logger")
job()
""",
    )
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "log").read_text().splitlines() == ["job done", "logger stopped"]


@pytest.mark.parametrize(
    ("ending", "code"),
    [
        ("raise RuntimeError('main failed')", 1),
        ("sys.exit(3)", 3),
    ],
)
def test_main_error_and_exit_code_unchanged(
    tmp_path: Path, ending: str, code: int, start_method: Optional[str]
) -> None:
    """An unhandled exception or sys.exit keeps main's traceback and exit code; daemons stop."""
    result = run_script(
        tmp_path,
        PRELUDE
        + _guarded(
            f"""
            d = graceful_daemon()
            wait_ready("graceful")
            print("PID", d.pid, flush=True)
            {ending}
            """
        ),
        env=_method_env(start_method),
    )
    assert result.returncode == code
    assert (tmp_path / "cleanup-ran").exists()
    if code == 1:
        assert result.stderr.count("Traceback") == 1
        assert "main failed" in result.stderr
    else:
        assert result.stderr == ""
    assert not pid_alive(int(result.stdout.split()[1]))


KILL_SCRIPT = (
    PRELUDE
    + """
if __name__ == "__main__":  # spawn and forkserver import this module again in each task
    d1, d2, d3 = plain_daemon(), graceful_daemon(), cooperative_daemon()
    w = worker(1.0)
    wait_ready("plain", "graceful", "cooperative", "worker")
    for t in (d1, d2, d3, w):
        print("PID", t.pid, flush=True)
    from bgtask._backends import launch as _launch
    zygote = _launch.get(None).current() if METHOD is None else None
    print("ZYGOTE", zygote.process.pid if zygote else 0, flush=True)
    print("READY", flush=True)
    HOW = sys.argv[1] if len(sys.argv) > 1 else os.environ["BGTASK_TEST_HOW"]
    if HOW == "exit":
        os._exit(0)
    threading.Event().wait()
"""
)


@pytest.mark.parametrize("how", ["SIGKILL", "SIGTERM", "exit"])
def test_daemons_stop_when_main_is_killed(tmp_path: Path, how: str, start_method: Optional[str]) -> None:
    """Main killed (SIGKILL, SIGTERM, os._exit): daemons gone within a second, cleanup ran."""
    env = script_env()
    env["BGTASK_TEST_HOW"] = how
    env["BGTASK_TEST_START_METHOD"] = start_method or ""
    script = Script(tmp_path, KILL_SCRIPT, env=env)
    try:
        daemons = _pids(script, 3)
        worker_pid = int(script.expect("PID"))
        zygote = int(script.expect("ZYGOTE"))
        script.expect("READY")
        if how != "exit":
            os.kill(script.proc.pid, getattr(signal, how))
        script.wait()
        started = time.monotonic()
        assert wait_until(lambda: not pid_alive(daemons[0]), timeout=10), "plain daemon survived"
        plain_gone = time.monotonic() - started
        assert wait_until(lambda: not any(pid_alive(p) for p in daemons), timeout=15)
        assert (tmp_path / "cleanup-ran").exists()
        assert (tmp_path / "cooperative-saw-stop").exists()
        # Non-daemon tasks run to their end, as in the stdlib.
        assert wait_until((tmp_path / "worker-done").exists, timeout=15)
        assert wait_until(lambda: not pid_alive(worker_pid), timeout=10)
        assert not zygote or wait_until(lambda: not pid_alive(zygote), timeout=10)  # no helper left
        assert plain_gone < 5.0  # typically a few milliseconds; generous on a loaded machine
    finally:
        script.close()
        kill_quietly(daemons if "daemons" in locals() else [])


def test_ctrl_c_gives_only_mains_traceback(tmp_path: Path, start_method: Optional[str]) -> None:
    """SIGINT to the foreground group: only main's KeyboardInterrupt; tasks end, cleanup runs."""
    script = Script(
        tmp_path,
        PRELUDE
        + _guarded(
            """
            d1, d2 = plain_daemon(), graceful_daemon()
            w = worker(0.5)
            wait_ready("plain", "graceful", "worker")
            print("PID", d1.pid, flush=True)
            print("PID", d2.pid, flush=True)
            print("READY", flush=True)
            threading.Event().wait()
            """
        ),
        env=_method_env(start_method),
    )
    try:
        daemons = _pids(script, 2)
        script.expect("READY")
        script.signal_group(signal.SIGINT)
        code = script.wait(30)
        stderr = script.stderr()
        assert code != 0
        assert stderr.count("Traceback") == 1, stderr
        assert "KeyboardInterrupt" in stderr
        assert (tmp_path / "worker-done").exists()  # the exit still waited for the worker
        assert (tmp_path / "cleanup-ran").exists()
        assert not any(pid_alive(p) for p in daemons)
    finally:
        script.close()


def test_second_ctrl_c_stops_a_worker_that_never_ends(tmp_path: Path) -> None:
    """A Ctrl-C during the exit wait for a non-daemon task stops that task."""
    script = Script(
        tmp_path,
        PRELUDE
        + """
@background(graceful=True)
def endless():
    try:
        ready("endless")
        threading.Event().wait(120)  # bounded: a non-daemon task must not outlive a failed test
    finally:
        (HERE / "endless-cleanup").write_text("yes")

t = endless()
wait_ready("endless")
print("PID", t.pid, flush=True)
announce_exit_wait()
""",
    )
    try:
        pid = int(script.expect("PID"))
        script.expect("IN-EXIT-WAIT")
        # The script's main has returned and its exit procedure waits for `endless`.
        assert pid_alive(pid)
        script.signal_group(signal.SIGINT)
        script.wait(30)
        assert (tmp_path / "endless-cleanup").exists()
        assert not pid_alive(pid)
        assert "Traceback" not in script.stderr()
    finally:
        script.close()


def test_program_started_with_sigint_ignored_still_stops_cleanly(tmp_path: Path) -> None:
    """A main program that starts with SIGINT ignored (nohup, `cmd &`) ends its tasks the same."""
    result = run_script(
        tmp_path,
        PRELUDE
        + """
d = graceful_daemon()
wait_ready("graceful")
print("PID", d.pid, flush=True)
""",
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN),
    )
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "cleanup-ran").exists()
    assert not pid_alive(int(result.stdout.split()[1]))


NESTED = (
    PRELUDE
    + """
@background(daemon=True, graceful=True, grace=5)
def inner():
    try:
        print("PID", os.getpid(), flush=True)
        ready("inner")
        threading.Event().wait()
    finally:
        (HERE / "inner-cleanup").write_text("yes")

@background(daemon=True, graceful=True, grace=5)
def outer():
    inner()
    wait_ready("inner")
    ready("outer")
    threading.Event().wait()

o = outer()
wait_ready("outer")
print("PID", o.pid, flush=True)
print("READY", flush=True)
MODE = os.environ["BGTASK_TEST_MODE"]
if MODE == "stop":
    o.stop()
    print("STOPPED", flush=True)
elif MODE == "kill-outer":
    os.kill(o.pid, signal.SIGKILL)   # the outer task gets no cleanup; its own zygote goes on
    print("STOPPED", flush=True)
threading.Event().wait()
"""
)


@pytest.mark.parametrize("mode", ["stop", "kill-main", "kill-outer"])
def test_nested_daemon_tasks_stop_with_their_parent(tmp_path: Path, mode: str) -> None:
    """A daemon task may start daemon tasks; stopping it, killing it (its own zygote, which the
    outer one spares, stops them) or killing main stops them, cleanly."""
    env = script_env()
    env["BGTASK_TEST_MODE"] = mode
    script = Script(tmp_path, NESTED, env=env)
    pids: List[int] = []
    try:
        pids.append(int(script.expect("PID")))  # inner, printed from inside the task
        pids.append(int(script.expect("PID")))  # outer
        script.expect("READY")
        if mode in ("stop", "kill-outer"):
            script.expect("STOPPED")
        else:
            os.kill(script.proc.pid, signal.SIGKILL)
        assert wait_until(lambda: not any(pid_alive(p) for p in pids), timeout=15)
        assert (tmp_path / "inner-cleanup").exists()
    finally:
        script.close()
        kill_quietly(pids)


def test_forked_copy_cannot_use_the_originals_handles(tmp_path: Path) -> None:
    """In a forked copy of main, the original's handles raise BgTaskError; daemons still stop."""
    result = run_script(
        tmp_path,
        PRELUDE
        + """
import warnings
warnings.simplefilter("ignore", DeprecationWarning)
from bgtask import BgTaskError
d = plain_daemon()
wait_ready("plain")
pid = os.fork()
if pid == 0:
    try:
        d.join()
    except BgTaskError as exc:
        print("CHILD", "refused" if "forked copy" in str(exc) else exc, flush=True)
    t = background(lambda: os.getpid())()
    print("CHILD-TASK", t.result(30) != os.getpid(), flush=True)
    os._exit(0)
os.waitpid(pid, 0)
print("DAEMON", d.pid, flush=True)
""",
    )
    assert result.returncode == 0, result.stderr
    assert "CHILD refused" in result.stdout
    assert "CHILD-TASK True" in result.stdout
    daemon_pid = int(result.stdout.split("DAEMON")[1].split()[0])
    assert wait_until(lambda: not pid_alive(daemon_pid), timeout=10)


def test_task_started_from_a_short_lived_thread_survives_the_thread(tmp_path: Path) -> None:
    """A task started from a thread that then exits keeps running (no thread-bound death signal)."""
    result = run_script(
        tmp_path,
        PRELUDE
        + """
box = []
t = threading.Thread(target=lambda: box.append(plain_daemon()))
t.start(); t.join()
wait_ready("plain")
time.sleep(0.2)
print("ALIVE", box[0].is_alive(), flush=True)
""",
    )
    assert result.returncode == 0, result.stderr
    assert "ALIVE True" in result.stdout


def test_script_without_main_guard_works(tmp_path: Path) -> None:
    """A script with no __main__ guard runs its tasks once, under the default start method."""
    result = run_script(
        tmp_path,
        """
from bgtask import background
print("TOP", flush=True)

@background
def square(x):
    return x * x

print("RESULT", square(7).result(30), flush=True)
""",
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["TOP", "RESULT", "49"]


@pytest.mark.parametrize("where", ["-c", "stdin"])
def test_functions_from_dash_c_and_stdin(where: str) -> None:
    """Functions defined in `python -c` or read from stdin run in tasks."""
    source = "from bgtask import background\nk = 5\nprint(background(lambda: k * 2)().result(30))\n"
    args = [sys.executable, "-c", source] if where == "-c" else [sys.executable, "-"]
    result = subprocess.run(  # noqa: PLW1510 (the exit code is asserted)
        args,
        input=None if where == "-c" else source,
        capture_output=True,
        text=True,
        timeout=60,
        env=script_env(),
        cwd=str(ROOT),
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "10"


def test_interactive_session_functions(tmp_path: Path) -> None:
    """A function typed at an interactive prompt runs in a task."""
    result = subprocess.run(  # noqa: PLW1510 (the exit code is asserted)
        [sys.executable, "-i", "-q"],
        input="from bgtask import background\ndef triple(x):\n    return 3 * x\n\n"
        "print('OUT', background(triple)(4).result(30))\n",
        capture_output=True,
        text=True,
        timeout=60,
        env=script_env(),
        cwd=str(tmp_path),
    )
    assert "OUT 12" in result.stdout, result.stderr


def test_output_is_line_by_line_through_a_pipe(tmp_path: Path) -> None:
    """A task's prints reach a piped stdout at once, in order, and survive a stop."""
    script = Script(
        tmp_path,
        PRELUDE
        + """
@background(graceful=True)
def talker():
    try:
        for i in range(3):
            print("LINE", i)
        print("WAITING", os.getpid())
        threading.Event().wait(120)  # bounded: a non-daemon task must not outlive a failed test
    finally:
        print("FINALLY")

t = talker()
print("STARTED", flush=True)
announce_exit_wait()
""",
    )
    talker = 0
    try:
        script.expect("STARTED")
        assert script.expect("LINE") == "0"
        assert script.expect("LINE") == "1"
        assert script.expect("LINE") == "2"
        talker = int(script.expect("WAITING"))  # not buffered: arrives while the task runs
        script.expect("IN-EXIT-WAIT")
        script.signal_group(signal.SIGINT)  # a Ctrl-C during the exit wait stops the task
        script.expect("FINALLY")
        script.wait(30)
    finally:
        script.close()
        kill_quietly([talker] if talker else [])  # a non-daemon task outlives a killed script


def test_default_start_method_with_logging_threads(tmp_path: Path) -> None:
    """60 tasks that log, while four threads of main log in a loop: no deadlock, all results."""
    result = run_script(
        tmp_path,
        """
import logging, threading
from bgtask import background
logging.basicConfig(level=logging.INFO, format="%(threadName)s %(message)s",
                    filename="log.txt")
stop = threading.Event()

def chatter():
    while not stop.is_set():
        logging.info("main thread chatter")

threads = [threading.Thread(target=chatter) for _ in range(4)]
for t in threads:
    t.start()

@background
def work(i):
    logging.info("task %d", i)
    return i

tasks = [work(i) for i in range(60)]
print("SUM", sum(t.result(60) for t in tasks), flush=True)
stop.set()
for t in threads:
    t.join()
""",
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"SUM {sum(range(60))}"


EXIT_SAYS_WHAT_IT_WAITS_FOR = """
import logging, sys, time, bgtask
logging.basicConfig(level=logging.INFO, stream=sys.stdout, format="%(levelname)s %(message)s")

@bgtask.background
def slow():
    time.sleep(1.5)

@bgtask.background
def stuck():
    time.sleep(600)

if sys.argv[1] == "exit":
    slow()
else:
    stuck()
    bgtask.shutdown(timeout=0.5)
    print("shutdown returned", flush=True)
"""


def test_the_exit_procedure_says_which_tasks_it_waits_for(tmp_path: Path) -> None:
    """At the end of the program, the tasks waited for are named at INFO, with the Ctrl-C hint."""
    result = run_script(tmp_path, EXIT_SAYS_WHAT_IT_WAITS_FOR, args=["exit"])
    assert result.returncode == 0, result.stderr
    assert re.search(
        r"INFO bgtask: the end of the program waits for 1 task to finish: 'slow' \(pid \d+, running "
        r"for [\d.]+ s\) \(Ctrl-C stops them",
        result.stdout,
    ), result.stdout


def test_shutdown_says_which_tasks_its_timeout_stops(tmp_path: Path) -> None:
    """shutdown(timeout=...) names, at WARNING, the tasks still running that it stops."""
    result = run_script(tmp_path, EXIT_SAYS_WHAT_IT_WAITS_FOR, args=["shutdown"])
    assert result.returncode == 0, result.stderr
    assert "INFO bgtask: bgtask.shutdown() waits for 1 task to finish: 'stuck'" in result.stdout
    assert re.search(r"WARNING bgtask: stopping 1 task still running: 'stuck' \(pid \d+", result.stdout)
    assert result.stdout.rstrip().endswith("shutdown returned"), result.stdout
