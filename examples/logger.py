"""A daemon logger beside a main program that does its work and ends.

The logger is a graceful daemon task: it runs as long as the program needs it, flushes and
closes its file when asked to stop, and is stopped only after the non-daemon work is done.

    python examples/logger.py
"""

import tempfile
import time
from pathlib import Path

from bgtask import background, stop_event


@background(daemon=True, graceful=True, grace=2.0)
def logger(path: str) -> int:
    """Write a heartbeat line every 0.1 s until asked to stop; return the number of lines."""
    event = stop_event()
    lines = 0
    with open(path, "a") as log:
        while not event.is_set():
            lines += 1
            log.write(f"heartbeat {lines}\n")
            log.flush()
            event.wait(0.1)
        log.write("logger stopped cleanly\n")
    return lines


@background
def work(n: int) -> int:
    """Some work in its own process: the program waits for it before it ends."""
    time.sleep(0.3)
    return sum(i * i for i in range(n))


if __name__ == "__main__":
    path = Path(tempfile.mkdtemp()) / "app.log"
    task = logger(str(path))
    print(f"logger started: pid={task.pid} daemon={task.is_daemon}")
    result = work(1000).result()
    print(f"work done: {result}")
    task.stop()
    last = path.read_text().splitlines()[-1]
    print(f"logger wrote {task.result()} heartbeats to {path}; last line: {last!r}")
