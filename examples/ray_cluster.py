"""The logger example's shape, on a Ray cluster: a graceful daemon beside workers, one of which dies.

    pip install 'bgtask[ray]'
    python examples/ray_cluster.py                    # a private local cluster
    python examples/ray_cluster.py --address auto     # the cluster running on this machine

A daemon task keeps a heartbeat file and, when it is stopped at the end of the program, writes
its last line in a ``finally`` block. Worker tasks checksum chunks of data with ``map``; one of
them dies with ``os._exit`` halfway, and comes back as ``TaskCrashed`` naming its item, while
the others' results arrive in order. Each worker reports its chunk on a ``bgtask.Queue``, which
a tally task reads wherever it runs. The script checks all of it and prints what it saw.
(The file is on this machine's disk: on a cluster of several machines, give it a shared path.)
"""

from __future__ import annotations

import argparse
import hashlib
import os
import pathlib
import sys
import tempfile
import time
from typing import List, Optional

import bgtask


@bgtask.background(daemon=True, graceful=True, grace=10)
def heartbeat(path: str) -> None:
    """Append a line a second until stopped; the last line is written on the way out."""
    stop = bgtask.stop_event()
    beats = 0
    with open(path, "a") as log:
        try:
            log.write(f"heartbeat started in pid {os.getpid()}\n")
            log.flush()
            while not stop.wait(1.0):
                beats += 1
                log.write(f"beat {beats}\n")
                log.flush()
        finally:
            log.write(f"heartbeat stopped cleanly after {beats} beats\n")


@bgtask.background
def checksum(chunk: int, done: bgtask.Queue[int]) -> str:
    if chunk == 5:
        os._exit(1)  # a worker dies halfway: one item fails, the others do not
    data = (f"chunk {chunk} " * 10_000).encode()
    done.put(chunk)
    return hashlib.sha256(data).hexdigest()[:12]


@bgtask.background
def tally(done: bgtask.Queue[int]) -> List[int]:
    """The chunks the workers reported, until the queue is shut down."""
    return sorted(done)


def main(address: Optional[str]) -> int:
    bgtask.use_ray(address)
    with tempfile.TemporaryDirectory(prefix="bgtask-ray-") as tmp:
        return run(pathlib.Path(tmp) / "heartbeat.log")


def run(log: pathlib.Path) -> int:
    beat = heartbeat(str(log))
    done: bgtask.Queue[int] = bgtask.Queue()  # on Ray, as the tasks are: any node reaches it
    reported = tally(done)

    sums = []
    for chunk in range(10):
        task = checksum(chunk, done)
        try:
            sums.append(task.result(timeout=120))
        except bgtask.TaskCrashed as exc:
            sums.append(None)
            print(f"chunk {chunk}: {exc}")
    print("checksums:", sums)
    assert sums.count(None) == 1, sums
    assert sums[5] is None, sums
    assert list(checksum.map([1, 2, 3], [done] * 3)) == sums[1:4]  # map: the same, in order
    done.shutdown()  # the tally's loop ends once it took what is left
    chunks = reported.result(timeout=120)
    print("reported on the queue:", chunks)
    assert chunks == sorted([0, 1, 2, 3, 4, 6, 7, 8, 9, 1, 2, 3]), chunks

    while beat.is_alive() and "beat 1\n" not in (log.read_text() if log.exists() else ""):
        time.sleep(0.1)
    beat.stop()  # what the end of the program would do to a daemon; here, to check it
    try:
        beat.result(timeout=60)
    except bgtask.TaskStopped:
        pass
    lines = log.read_text().splitlines()
    print(f"{log}: {lines[0]!r} ... {lines[-1]!r}")
    assert lines[-1].startswith("heartbeat stopped cleanly"), lines
    print("ok: results in order, one crash reported, every report queued, the daemon's cleanup ran")
    return 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--address", default=None, help="a Ray cluster to join ('auto', 'host:port')")
    sys.exit(main(parser.parse_args().address))
