"""Every Python block of README.md and docs/ runs as pasted, and the server recipes run under real servers.

Conventions for a fenced ``python`` block in ``README.md`` or ``docs/**/*.md``:

- It is a whole program: it runs as a script in a fresh interpreter (``subprocess``, its working
  directory a fresh temporary one, a deadline), and must exit with 0 and leave no process
  behind. A script ends its own tasks at its exit, so the check is that nothing carrying the
  run's marker (an environment variable every process of the run inherits) is still alive.
- ``<!-- fragment -->`` on the line just before the opening fence marks a part of a program (it
  needs a cluster, a project's other files): it is not run, and its first line says what it is a
  part of.
- A block whose first line is ``# NAME.py`` is written to a file of that name; when NAME starts
  with ``test_``, the block is a test module and runs under pytest instead.

The collector is our own (a few lines over the Markdown) rather than pytest-examples: that one
runs a block inside the pytest process, where the block's tasks would be the test process's and
its program's end (bgtask's exit procedure) would never run, and what we need beyond it (a
fresh interpreter per block, a deadline, a leftover-process check) is ``helpers.run_script``.

The FastAPI and gunicorn programs of the README (the same blocks as in docs/services.md) also run
under a real uvicorn and a real gunicorn on 127.0.0.1 (port 0): a real request, SIGTERM to the
server, then the heartbeat's cleanup line, the request's job finished first, and no process left.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Iterator, List, Optional

import pytest

import bgtask

from .helpers import DEADLINE_S, ROOT, run_script, script_env, wait_until

DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
FRAGMENT = "<!-- fragment -->"
MARKER = "BGTASK_DOCS_RUN"
BLOCK_TIMEOUT_S = 120  # a block runs in well under a few seconds; this is a guard, not a wait
SERVER_START_S = 60  # a server imports its framework first: seconds on a loaded machine


@dataclass
class Block:
    path: Path
    line: int  # of the opening fence, 1-based
    source: str
    fragment: bool

    @property
    def id(self) -> str:
        return f"{self.path.relative_to(ROOT)}:{self.line}"

    @property
    def file_name(self) -> Optional[str]:
        """The file name the block's first line gives (``# main.py``), if any."""
        match = re.match(r"#\s*([\w.]+\.py)\b", self.source)
        return match.group(1) if match else None


def python_blocks(path: Path) -> List[Block]:
    """The fenced ``python`` blocks of a Markdown file, in order."""
    blocks: List[Block] = []
    lines = path.read_text(encoding="utf-8").splitlines()
    i = 0
    while i < len(lines):
        fence = re.match(r"^(\s*)(```+|~~~+)\s*python\s*$", lines[i])
        if fence is None:
            i += 1
            continue
        indent, marks = fence.groups()
        start = i
        i += 1
        body = []
        while i < len(lines) and lines[i].strip() != marks:
            body.append(lines[i][len(indent) :])
            i += 1
        assert i < len(lines), f"{path}:{start + 1}: a python block is never closed"
        previous = next((lines[j].strip() for j in range(start - 1, -1, -1) if lines[j].strip()), "")
        blocks.append(Block(path, start + 1, "\n".join(body) + "\n", previous == FRAGMENT))
        i += 1
    return blocks


BLOCKS = [block for path in DOCS for block in python_blocks(path)]


def marked_pids(run: str) -> List[int]:
    """The live processes whose environment carries this run's marker."""
    needle = f"{MARKER}={run}".encode()
    found = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/environ", "rb") as f:
                environ = f.read().split(b"\0")
            with open(f"/proc/{name}/stat") as f:
                state = f.read().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if needle in environ and state != "Z":
            found.append(int(name))
    return found


def assert_nothing_left(run: str) -> None:
    """Fail if a process of the run is still alive once a deadline passes; kill what is left."""
    gone = wait_until(lambda: not marked_pids(run), timeout=DEADLINE_S)
    left = marked_pids(run)
    for pid in left:
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass
    assert gone, f"processes left behind: {left}"


def marked_env(run: str) -> Dict[str, str]:
    env = script_env()
    env[MARKER] = run
    env.pop("PYTEST_ADDOPTS", None)
    env.pop("PYTEST_XDIST_WORKER", None)
    return env


@pytest.mark.parametrize("block", BLOCKS, ids=lambda b: b.id)
def test_block_runs_as_pasted(block: Block, tmp_path: Path) -> None:
    """The block runs as a whole program (a test module: under pytest), exits 0 and leaves nothing."""
    if block.fragment:
        assert block.source.startswith("#"), f"{block.id}: a fragment's first line says what it is from"
        pytest.skip("a fragment: a part of a program, marked so in the page")
    run = uuid.uuid4().hex
    env = marked_env(run)
    name = block.file_name
    try:
        if name is not None and name.startswith("test_"):
            (tmp_path / name).write_text(block.source)
            result = subprocess.run(  # noqa: PLW1510 (the exit code is asserted)
                [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "no:xdist", name],
                capture_output=True,
                text=True,
                timeout=BLOCK_TIMEOUT_S,
                cwd=str(tmp_path),
                env=env,
            )
        elif name is not None:
            (tmp_path / name).write_text(block.source)
            result = subprocess.run(  # noqa: PLW1510 (the exit code is asserted)
                [sys.executable, name],
                capture_output=True,
                text=True,
                timeout=BLOCK_TIMEOUT_S,
                cwd=str(tmp_path),
                env=env,
            )
        else:
            result = run_script(tmp_path, block.source, timeout=BLOCK_TIMEOUT_S, env=env)
    finally:
        assert_nothing_left(run)
    assert result.returncode == 0, f"{block.id} exited {result.returncode}:\n{result.stdout}\n{result.stderr}"


def test_every_public_name_is_in_the_api_reference() -> None:
    """docs/api.md renders each name of ``bgtask.__all__`` from its docstring."""
    page = (ROOT / "docs" / "api.md").read_text()
    documented = set(re.findall(r"^::: bgtask\.(\w+)\s*$", page, re.MULTILINE))
    assert documented >= set(bgtask.__all__), sorted(set(bgtask.__all__) - documented)


def test_the_readme_server_recipes_are_the_guide_ones() -> None:
    """The README's framework programs are the same text as docs/services.md's, so one test covers both."""
    guide = {b.file_name: b.source for b in python_blocks(ROOT / "docs" / "services.md")}
    for name in ("main.py", "app.py", "gunicorn.conf.py"):
        assert readme_block(name) == guide[name], name


def readme_block(name: str) -> str:
    """The README block whose first line is ``# NAME``."""
    found = [b.source for b in python_blocks(ROOT / "README.md") if b.file_name == name]
    assert len(found) == 1, f"README.md has {len(found)} blocks named {name}"
    return found[0]


class Server:
    """A server process in a session of its own, its output (stdout and stderr) read line by line."""

    def __init__(self, argv: List[str], cwd: Path, run: str) -> None:
        self.proc = subprocess.Popen(
            argv,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            text=True,
            cwd=str(cwd),
            env={**marked_env(run), "XDG_RUNTIME_DIR": str(cwd)},  # gunicorn's control socket
            start_new_session=True,
        )
        self.lines: List[str] = []
        self._changed = threading.Condition()
        self._eof = False
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            with self._changed:
                self.lines.append(line.rstrip("\n"))
                self._changed.notify_all()
        with self._changed:
            self._eof = True
            self._changed.notify_all()

    def expect(self, pattern: str, count: int = 1, timeout: float = DEADLINE_S) -> List[re.Match[str]]:
        """Wait until ``count`` lines match ``pattern`` (a handshake); return the matches."""

        def matches() -> List[re.Match[str]]:
            return [m for m in (re.search(pattern, line) for line in self.lines) if m]

        with self._changed:
            self._changed.wait_for(lambda: len(matches()) >= count or self._eof, timeout)
            found = matches()
        assert len(found) >= count, f"no {count} line(s) like {pattern!r}; output:\n" + self.output()
        return found

    def output(self) -> str:
        with self._changed:
            return "\n".join(self.lines)

    def stop(self, timeout: float = DEADLINE_S) -> Optional[int]:
        """SIGTERM to the server's own pid, then its exit code and the end of its output."""
        self.proc.send_signal(signal.SIGTERM)
        try:
            code = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            return None
        with self._changed:
            self._changed.wait_for(lambda: self._eof, timeout)
        return code

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(DEADLINE_S)
        self._reader.join(DEADLINE_S)
        if not self._reader.is_alive() and self.proc.stdout is not None:
            self.proc.stdout.close()


@pytest.fixture
def server_run() -> Iterator[str]:
    """A marker for one server's processes; whatever carries it is checked and killed at the end."""
    run = uuid.uuid4().hex
    yield run
    assert_nothing_left(run)


def post(url: str) -> object:
    httpx = pytest.importorskip("httpx")
    reply = httpx.post(url, timeout=DEADLINE_S)
    reply.raise_for_status()
    return reply.json()


def console_script(name: str) -> str:
    path = Path(sys.executable).parent / name
    if not path.exists():
        pytest.skip(f"{name} is not installed (the test extra has it)")
    return str(path)


def assert_cleaned_up(out: str, workers: int) -> None:
    """The request's job finished and each worker's heartbeat ran its cleanup, without a traceback."""
    assert out.count("report for ada sent") == 1, out
    assert out.count("heartbeat stopped") == workers, out
    assert "Traceback" not in out, out


def test_fastapi_lifespan_under_uvicorn(tmp_path: Path, server_run: str) -> None:
    """The README's FastAPI app under uvicorn: a request, SIGTERM, the lifespan's shutdown() cleans up."""
    pytest.importorskip("fastapi")
    (tmp_path / "main.py").write_text(readme_block("main.py"))
    argv = [console_script("uvicorn"), "main:app", "--host", "127.0.0.1", "--port", "0"]
    server = Server(argv, tmp_path, server_run)
    try:
        [running] = server.expect(r"Uvicorn running on (http://127\.0\.0\.1:\d+)", timeout=SERVER_START_S)
        server.expect("heartbeat started", timeout=SERVER_START_S)
        assert post(f"{running.group(1)}/reports/ada") == {"queued": "ada"}
        code = server.stop()
        assert code in (0, -signal.SIGTERM), f"uvicorn ended with {code}:\n{server.output()}"
        out = server.output()
        assert_cleaned_up(out, workers=1)
        # shutdown() waits for the non-daemon tasks before it stops the daemon ones.
        assert out.index("report for ada sent") < out.index("heartbeat stopped"), out
    finally:
        server.close()


def test_gunicorn_hooks_with_flask(tmp_path: Path, server_run: str) -> None:
    """The README's Flask app under gunicorn with two workers: post_fork starts, worker_exit cleans up."""
    pytest.importorskip("flask")
    (tmp_path / "app.py").write_text(readme_block("app.py"))
    (tmp_path / "gunicorn.conf.py").write_text(readme_block("gunicorn.conf.py"))
    argv = [console_script("gunicorn"), "-c", "gunicorn.conf.py", "-b", "127.0.0.1:0", "-w", "2", "app:app"]
    server = Server(argv, tmp_path, server_run)
    try:
        [listening] = server.expect(r"Listening at: (http://127\.0\.0\.1:\d+)", timeout=SERVER_START_S)
        server.expect("heartbeat started", count=2, timeout=SERVER_START_S)
        assert post(f"{listening.group(1)}/reports/ada") == {"queued": "ada"}
        code = server.stop()
        assert code == 0, f"gunicorn ended with {code}:\n{server.output()}"
        out = server.output()
        assert_cleaned_up(out, workers=2)
        # Each worker's worker_exit hook ran its shutdown() before the master ended.
        assert out.rindex("heartbeat stopped") < out.index("Shutting down: Master"), out
        assert out.index("report for ada sent") < out.index("Shutting down: Master"), out
    finally:
        server.close()
