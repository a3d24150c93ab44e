"""One log file for a whole application: workers log, a daemon log sink writes.

The main program and its worker tasks log with the standard ``logging`` module, as usual. Their
records reach the main program's handlers (bgtask relays a task's records there), and one
handler puts them in a ``bgtask.Queue``. A graceful daemon task, the sink, is the only process
that writes the log file: it takes records from the queue until the program ends, then writes
what is left and closes the file.

One worker crashes halfway (``os._exit``, as a segfault would end it): the records it logged
before are in the file all the same. At the end the example checks that every record sent is
in the file, once.

    python examples/logger.py
"""

import logging
import logging.handlers
import os
import queue
import tempfile
from pathlib import Path

import bgtask
from bgtask import background, stop_event

RECORDS_PER_WORKER = 200
CRASH_AFTER = 120


@background(daemon=True, graceful=True, grace=5.0, relay_logging=False)
def sink(records: "bgtask.Queue[logging.LogRecord]", path: str) -> int:
    """Write every record to ``path`` until stopped, then what is left; return the count."""
    handler = logging.FileHandler(path)
    handler.setFormatter(logging.Formatter("%(asctime)s %(processName)s[%(process)d] %(message)s"))
    stop = stop_event()
    bgtask.ready()  # from here on, a stop sets `stop` and the loop below drains the queue
    written = 0
    try:
        while True:
            try:
                record = records.get(timeout=0.1)
            except queue.Empty:
                if stop.is_set():
                    break  # asked to stop, and nothing is left
                continue
            except bgtask.ShutDown:
                break  # the queue was shut down and everything in it was written
            handler.handle(record)
            written += 1
    finally:
        handler.close()  # flushes
    return written


@background
def worker(n: int, crash_after: int = -1) -> int:
    """Log ``n`` records; with ``crash_after``, die abruptly after that many."""
    log = logging.getLogger("app.worker")
    for i in range(n):
        if i == crash_after:
            os._exit(1)  # no cleanup, no flush: the records already logged still arrive
        log.info("worker %d record %d", os.getpid(), i)
    return n


def main() -> None:
    path = Path(tempfile.mkdtemp()) / "app.log"
    records: bgtask.Queue[logging.LogRecord] = bgtask.Queue()
    # The main program's logging goes to the sink; so does what its tasks log (relayed here).
    to_sink = logging.handlers.QueueHandler(records)  # type: ignore[arg-type]
    root = logging.getLogger()
    root.setLevel(logging.INFO)
    root.addHandler(to_sink)

    writer = sink(records, str(path))
    writer.wait_ready()
    print(f"log sink started: pid={writer.pid} daemon={writer.is_daemon}")
    logging.getLogger("app").info("main program starting its workers")
    workers = [worker(RECORDS_PER_WORKER) for _ in range(3)]
    crasher = worker(RECORDS_PER_WORKER, crash_after=CRASH_AFTER)
    logging.getLogger("app").info("main program waiting")
    done = [w.result() for w in workers]
    try:
        crasher.result()
    except bgtask.TaskCrashed as exc:
        logging.getLogger("app").warning("a worker crashed: %s", exc)
    logging.getLogger("app").info("main program done: %d records from the workers", sum(done))

    # The end of the program would stop the daemon sink, which then writes what the queue still
    # holds. Done here, to check the file afterwards: no more records, the sink drains the queue
    # and returns.
    root.removeHandler(to_sink)
    records.shutdown()
    written = writer.result()

    lines = path.read_text().splitlines()
    expected = 3 * RECORDS_PER_WORKER + CRASH_AFTER + 4  # and the main program's four
    worker_lines = [line for line in lines if " record " in line]
    assert len(lines) == written == expected, (len(lines), written, expected)
    assert len(set(worker_lines)) == len(worker_lines), "a record was written twice"
    print(f"sink wrote {written} records to {path}, every one sent (a worker crashed midway)")
    print(f"last line: {lines[-1].split(' ', 2)[2]!r}")


if __name__ == "__main__":
    main()
