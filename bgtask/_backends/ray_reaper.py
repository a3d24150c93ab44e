"""What ends a private Ray cluster with the program that started it, however the program ends.

::

    main program ──ray.init() (a cluster of its own)──> Reaper.start(session directory)
        │                                                  a small process of its own session,
        │ a pipe, held by the main program only            reading the pipe
        └── the program ends (exit, SIGTERM, SIGKILL) ──> EOF ──> every process whose command
                                                                  line names the session's
                                                                  directory: SIGTERM, then
                                                                  SIGKILL 2 s later

Ray ends the cluster's core processes with the program that started them, but its agents and
idle workers notice a killed program only after about a minute. Only the cluster's own
processes name its session directory (a new one per cluster) on their command line.

Run as a script (``python ray_reaper.py SESSION_DIR``) it is the reaper itself: it imports only
the standard library.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from typing import IO, List, Optional

KILL_AFTER_S = 2.0  # from SIGTERM to SIGKILL, for what is still there


class Reaper:
    """The main program's end of the reaper of one private cluster."""

    def __init__(self) -> None:
        self._pipe: Optional[IO[bytes]] = None
        self._process: Optional[subprocess.Popen[bytes]] = None

    def start(self, session_dir: str) -> None:
        self._process = subprocess.Popen(
            [sys.executable, "-I", "-S", os.path.abspath(__file__), session_dir],
            stdin=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,  # a Ctrl-C to the program's group is not its end
            close_fds=True,
        )
        self._pipe = self._process.stdin

    def close(self, wait: bool = True) -> None:
        """The cluster was shut down: what is left of it goes, and the reaper ends."""
        pipe, self._pipe = self._pipe, None
        if pipe is not None:
            try:
                pipe.close()
            except OSError:
                pass
        process, self._process = self._process, None
        if process is not None and wait:
            try:
                process.wait(KILL_AFTER_S + 5)
            except subprocess.TimeoutExpired:
                pass

    def forget_in_child(self) -> None:
        """In a copy of the program made by ``fork()``: the pipe is the original's alone, or
        the cluster would outlive it as long as the copy lives."""
        pipe, self._pipe = self._pipe, None
        self._process = None
        if pipe is not None:
            try:
                os.close(pipe.fileno())
            except OSError:
                pass


def _members(session_dir: str) -> List[int]:
    """The processes whose command line names ``session_dir``, this one excepted."""
    me = os.getpid()
    needle = session_dir.encode()
    found = []
    if os.path.isdir("/proc/self"):
        for name in os.listdir("/proc"):
            if not name.isdigit() or int(name) == me:
                continue
            try:
                with open(f"/proc/{name}/cmdline", "rb") as f:
                    if needle in f.read():
                        found.append(int(name))
            except OSError:
                continue
        return found
    listing = subprocess.run(["ps", "-axww", "-o", "pid=,command="], capture_output=True, check=False)
    for line in listing.stdout.splitlines():
        pid, _, command = line.strip().partition(b" ")
        if pid.isdigit() and int(pid) != me and needle in command:
            found.append(int(pid))
    return found


def _sweep(session_dir: str) -> None:
    for signum, then in ((signal.SIGTERM, KILL_AFTER_S), (signal.SIGKILL, 0.0)):
        for pid in _members(session_dir):
            try:
                os.kill(pid, signum)
            except OSError:
                pass
        deadline = time.monotonic() + then
        while time.monotonic() < deadline and _members(session_dir):
            time.sleep(0.1)


def main() -> None:
    session_dir = sys.argv[1]
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        while sys.stdin.buffer.read(65536):
            pass
    except OSError:
        pass
    if len(session_dir) > 8 and os.path.isabs(session_dir):  # never a short or relative needle
        _sweep(session_dir)


if __name__ == "__main__":
    main()
