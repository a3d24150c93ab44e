"""Helpers for tests that start real processes: deadlines, process trees, scripts."""

from __future__ import annotations

import logging
import os
import queue
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Set

# Every wait in the tests is a deadline, never a fixed sleep: generous, because the machines
# that run the tests are shared and slow at times; a passing test returns as soon as it can.
DEADLINE_S = 20.0
POLL_S = 0.01

ROOT = Path(__file__).resolve().parent.parent


def wait_until(predicate: Callable[[], object], timeout: float = DEADLINE_S) -> bool:
    """Poll ``predicate`` until it is true or ``timeout`` seconds pass; return the last value."""
    deadline = time.monotonic() + timeout
    while True:
        if predicate():
            return True
        if time.monotonic() >= deadline:
            return bool(predicate())
        time.sleep(POLL_S)


def proc_stat(pid: int) -> Optional[List[str]]:
    """The fields of ``/proc/PID/stat`` after the command name (state first), or ``None``."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            data = f.read()
    except OSError:
        return None
    # The command name may hold spaces and parentheses: split after the last ')'.
    return data[data.rindex(")") + 2 :].split()


def pid_alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie counts as gone)."""
    fields = proc_stat(pid)
    if fields is not None:
        return fields[0] != "Z"
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _helper_pids() -> Set[int]:
    """Long-lived helper processes of multiprocessing itself, which outlive every test."""
    pids: Set[int] = set()
    forkserver = sys.modules.get("multiprocessing.forkserver")
    if forkserver is not None:
        pid = getattr(forkserver._forkserver, "_forkserver_pid", None)
        if pid:
            pids.add(pid)
    tracker = sys.modules.get("multiprocessing.resource_tracker")
    if tracker is not None:
        pid = getattr(tracker._resource_tracker, "_pid", None)
        if pid:
            pids.add(pid)
    return pids


def descendants(root: Optional[int] = None) -> List[int]:
    """Live descendants of ``root`` (this process by default), minus multiprocessing's helpers."""
    root = os.getpid() if root is None else root
    children: Dict[int, List[int]] = {}
    for name in os.listdir("/proc"):
        if name.isdigit():
            fields = proc_stat(int(name))
            if fields is not None and fields[0] != "Z":
                children.setdefault(int(fields[1]), []).append(int(name))
    helpers = _helper_pids()
    found: List[int] = []
    todo = [root]
    while todo:
        for child in children.get(todo.pop(), []):
            todo.append(child)  # a helper's children (forkserver tasks) still count
            if child not in helpers:
                found.append(child)
    return found


def describe_pids(pids: List[int]) -> str:
    out = []
    for pid in pids:
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmd = f.read().replace(b"\0", b" ").decode(errors="replace").strip()
        except OSError:
            cmd = "?"
        out.append(f"{pid}: {cmd[:120]}")
    return "; ".join(out) or "none"


def fd_count() -> int:
    return len(os.listdir("/proc/self/fd"))


def settled_fd_count() -> int:
    """``fd_count()`` once this process holds all the spares its zygote forks ahead.

    Each spare comes with a socket, and the zygote hands spares over at its own pace; counted
    with all of them held, the number is the same whenever nothing leaks.
    """
    from bgtask._backends import launch as _launch
    from bgtask._backends import zygote as _zygote

    zygote = _launch.get(None).current()
    if zygote is not None and zygote.alive:
        assert wait_until(lambda: held_spares(zygote) == _zygote.SPARES, timeout=30)
    return fd_count()


def held_spares(zygote: Any) -> int:
    """How many spares this process holds, once the monitor read what the zygote sent.

    The monitor thread runs only while tasks do: with none running, spares wait in the
    control socket until something wakes it.
    """
    from bgtask._monitor import loop as _monitor

    _monitor.get().call_soon(lambda: None)
    return len(zygote.pool.spares)


def zombie_children() -> List[int]:
    me = str(os.getpid())
    found = []
    for name in os.listdir("/proc"):
        if name.isdigit():
            fields = proc_stat(int(name))
            if fields is not None and fields[1] == me and fields[0] == "Z":
                found.append(int(name))
    return found


# Handshakes through files in a script's directory (its cwd), for the scripts tests write: the
# script defines HERE (its directory) and imports time before this.
# Script source: announce_exit_wait() prints IN-EXIT-WAIT once the script's main thread waits in
# bgtask's exit procedure (needs sys, threading and time imported).
ANNOUNCE_EXIT_WAIT = """
def announce_exit_wait():
    # Print IN-EXIT-WAIT once main waits in bgtask's exit procedure: a handshake for signals.
    main = threading.main_thread().ident

    def watch():
        while True:
            frame = sys._current_frames().get(main)
            while frame is not None:
                if frame.f_code.co_name == "_wait_for_non_daemons":
                    print("IN-EXIT-WAIT", flush=True)
                    return
                frame = frame.f_back
            time.sleep(0.005)

    threading.Thread(target=watch, daemon=True).start()
"""

SCRIPT_HANDSHAKES = """
def ready(name):
    (HERE / name).touch()

def wait_ready(*names):
    deadline = time.monotonic() + 30
    while not all((HERE / n).exists() for n in names):
        if time.monotonic() > deadline:
            raise SystemExit("handshake timed out")
        time.sleep(0.01)
"""


def write_script(tmp_path: Path, source: str, name: str = "script.py") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(source))
    return path


def script_env() -> Dict[str, str]:
    env = dict(os.environ)
    paths = [str(ROOT), str(ROOT / "tests" / "script_site"), env.get("PYTHONPATH", "")]
    env["PYTHONPATH"] = os.pathsep.join(paths).rstrip(os.pathsep)
    env["PYTHONUNBUFFERED"] = "1"
    return env


def run_script(
    tmp_path: Path, source: str, *, timeout: float = 60, args: Optional[List[str]] = None, **kwargs: object
) -> subprocess.CompletedProcess[str]:
    """Run ``source`` as a script in a new Python process and wait for it."""
    path = write_script(tmp_path, source)
    kwargs.setdefault("env", script_env())
    return subprocess.run(  # noqa: PLW1510 (the exit code is asserted)
        [sys.executable, str(path), *(args or [])],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=str(tmp_path),
        **kwargs,  # type: ignore[call-overload]
    )


class Script:
    """A script running in its own session, read line by line, killed at the end if needed."""

    def __init__(self, tmp_path: Path, source: str, **kwargs: object) -> None:
        path = write_script(tmp_path, source)
        kwargs.setdefault("env", script_env())
        self.proc = subprocess.Popen(
            [sys.executable, str(path)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=str(tmp_path),
            start_new_session=True,
            **kwargs,  # type: ignore[call-overload]
        )
        self._lines: queue.Queue[Optional[str]] = queue.Queue()
        self._seen: List[str] = []
        self._backlog: List[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self._lines.put(line)
        self._lines.put(None)

    def readline(self, timeout: float = DEADLINE_S) -> Optional[str]:
        """The next line of stdout (a handshake), or fail after ``timeout``; ``None`` at EOF."""
        try:
            line = self._lines.get(timeout=timeout)
        except queue.Empty:
            state = "running" if self.proc.poll() is None else f"exited {self.proc.returncode}"
            raise AssertionError(
                f"no line from the script within {timeout:.1f} s (script {state}; lines so far: "
                f"{self._seen[-5:]}; stderr: {self.stderr()})"
            ) from None
        if line is None:
            self._lines.put(None)  # EOF stays EOF for the next reader
            return None
        self._seen.append(line.strip())
        return line.strip()

    def expect(self, prefix: str, timeout: float = DEADLINE_S) -> str:
        """The first line not yet expected that starts with ``prefix``; return the rest of it.

        Lines that did not match stay for later calls: a task and the main program write to the
        same pipe, and their lines interleave in any order.
        """
        for i, line in enumerate(self._backlog):
            if line.startswith(prefix):
                del self._backlog[i]
                return line[len(prefix) :].strip()
        deadline = time.monotonic() + timeout
        while True:
            line = self.readline(max(0.1, deadline - time.monotonic()))
            if line is None:
                try:
                    self.proc.wait(max(0.1, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    pass
                raise AssertionError(
                    f"output ended before {prefix!r} (script {self.proc.poll()}); "
                    f"lines: {self._seen[-5:]}; stderr: {self.stderr()}"
                )
            if line.startswith(prefix):
                return line[len(prefix) :].strip()
            self._backlog.append(line)

    def stderr(self) -> str:
        assert self.proc.stderr is not None
        if self.proc.poll() is None:
            return "<still running>"
        return self.proc.stderr.read()

    def wait(self, timeout: float = DEADLINE_S) -> int:
        return self.proc.wait(timeout)

    def signal_group(self, signum: int) -> None:
        os.killpg(self.proc.pid, signum)

    def close(self) -> None:
        """Kill what is left of the script's process group, then release its pipes."""
        try:
            # Also when the script itself has exited: what it forked may still hold the group.
            os.killpg(self.proc.pid, signal.SIGKILL)
        except OSError:
            pass
        self.proc.wait(DEADLINE_S)
        self._reader.join(DEADLINE_S)
        if self._reader.is_alive():
            return  # something outside the group still holds the pipe; never block on it
        for stream in (self.proc.stdout, self.proc.stderr):
            if stream is not None:
                stream.close()


def kill_quietly(pids: List[int]) -> None:
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass


# The logger the logging tests log to: its records reach the ``collected`` fixture.
LOGGER = "bgtask_test.app"


class Collect(logging.Handler):
    """A handler that keeps the records it gets."""

    def __init__(self) -> None:
        super().__init__()
        self.records: List[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)
