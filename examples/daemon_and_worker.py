"""A daemon and a non-daemon task side by side.

The program waits for the non-daemon task (like a multiprocessing process), and only then stops
the daemon task, which keeps serving until the end.

    python examples/daemon_and_worker.py
"""

import time

from bgtask import background, stop_event


@background(daemon=True, graceful=True)
def ticker() -> None:
    event = stop_event()
    ticks = 0
    while not event.wait(0.1):
        ticks += 1
    print(f"ticker: stopped after {ticks} ticks, once the worker was done")


@background
def worker() -> None:
    time.sleep(0.5)
    print("worker: done; the program may end now")


if __name__ == "__main__":
    ticker()
    worker()
    print("main: returning; the exit waits for the worker, then stops the ticker")
