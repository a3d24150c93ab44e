"""A task's failure that nothing retrieved is logged once (logger ``bgtask.unretrieved``)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import List

import pytest

from .helpers import run_script

PROGRAM = """
import concurrent.futures, gc, logging, os, sys, threading, bgtask

@bgtask.background
def boom():
    raise ValueError("bad input")

@bgtask.background
def crash():
    os._exit(3)

@bgtask.background(graceful=True)
def forever():
    threading.Event().wait()

mode = sys.argv[1]
if mode == "dropped":
    task = boom(); task.join(60); del task; gc.collect()
    print("collected", flush=True)
elif mode == "kept":
    task = boom(); task.join(60)
elif mode == "crashed":
    task = crash(); task.join(60)
elif mode == "result":
    task = boom()
    try:
        task.result(60)
    except ValueError:
        pass
elif mode == "callback":
    task = boom(); task.add_done_callback(lambda t: None); task.join(60)
elif mode == "wait":
    task = boom(); concurrent.futures.wait([task], timeout=60); task.join(60)
elif mode == "wait_result":
    task = boom()
    done, _ = concurrent.futures.wait([task], timeout=60)
    assert all(isinstance(t.exception(), ValueError) for t in done)
elif mode == "stopped":
    task = forever(); task.stop(timeout=60)
elif mode == "off":
    logging.getLogger("bgtask.unretrieved").disabled = True
    task = boom(); task.join(60)
print("end", flush=True)
"""


def _run(tmp_path: Path, mode: str) -> List[str]:
    result = run_script(tmp_path, PROGRAM, args=[mode])
    assert result.returncode == 0, result.stderr
    return [line for line in result.stderr.splitlines() if "nothing retrieved" in line]


def test_a_dropped_handle_of_a_failed_task_is_reported_with_its_traceback(tmp_path: Path) -> None:
    """A task that raised, whose handle is dropped unread, is logged with the task's traceback."""
    result = run_script(tmp_path, PROGRAM, args=["dropped"])
    assert result.returncode == 0, result.stderr
    assert re.search(
        r"bgtask: task 'boom' \(pid \d+\) raised ValueError: bad input, and nothing retrieved its outcome",
        result.stderr,
    ), result.stderr
    assert 'raise ValueError("bad input")' in result.stderr
    assert result.stderr.count("nothing retrieved") == 1
    assert result.stdout.split() == ["collected", "end"]


@pytest.mark.parametrize(
    ("mode", "what"), [("kept", "raised ValueError"), ("crashed", "crashed: exited with code 3")]
)
def test_a_failure_nothing_retrieved_is_reported_at_the_end(tmp_path: Path, mode: str, what: str) -> None:
    """A failed task whose handle lives to the program's end, unread, is logged once then."""
    lines = _run(tmp_path, mode)
    assert len(lines) == 1, lines
    assert what in lines[0]


@pytest.mark.parametrize("mode", ["result", "callback", "wait_result", "stopped", "off"])
def test_nothing_is_reported_for_an_outcome_someone_saw(tmp_path: Path, mode: str) -> None:
    """result(), a done-callback, exception() after concurrent.futures.wait, a stop, or the
    logger turned off: silence."""
    assert _run(tmp_path, mode) == []


def test_concurrent_futures_wait_alone_does_not_count_as_seeing_the_failure(tmp_path: Path) -> None:
    """wait() tells that the task ended, not what it raised: whether it was still waiting when
    the task ended or found it ended already, the failure is reported at the end."""
    lines = _run(tmp_path, "wait")
    assert len(lines) == 1, lines
    assert "raised ValueError" in lines[0]
