"""A daemon whose ``finally`` is skipped, and the same with ``graceful=True``, where it runs.

python examples/graceful_cleanup.py
"""

import tempfile
import threading
from pathlib import Path

from bgtask import background

marker_dir = Path(tempfile.mkdtemp())


def serve(label: str) -> None:
    try:
        (marker_dir / f"{label}.started").touch()
        threading.Event().wait()
    finally:
        (marker_dir / f"{label}.cleaned").touch()


abrupt = background(daemon=True)(serve)
gentle = background(daemon=True, graceful=True, grace=2.0)(serve)


def wait_started(label: str) -> None:
    while not (marker_dir / f"{label}.started").exists():
        threading.Event().wait(0.01)


if __name__ == "__main__":
    for label, fn in (("abrupt", abrupt), ("graceful", gentle)):
        task = fn(label)
        wait_started(label)
        task.stop()
        cleaned = (marker_dir / f"{label}.cleaned").exists()
        print(f"{label:8}: exitcode={task.exitcode}, finally ran: {cleaned}")
