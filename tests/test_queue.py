"""bgtask.Queue with real processes: every start method, producers and consumers on both sides."""

from __future__ import annotations

import errno
import gc
import os
import pickle
import queue
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, List, Optional, Tuple

import pytest

import bgtask
from bgtask import Queue, ShutDown, background

from .helpers import Script, pid_alive, run_script, script_env, wait_until, write_script

RESULT_S = 120.0  # generous: the machines are shared
JOIN_S = 30.0  # join() returns within this when nothing is wrong, however slow the machine


def test_items_go_both_ways_in_order(start_method: Optional[str], daemon: bool) -> None:
    """Main program to task and back; one producer's items come out in its order."""
    to_task: Queue[int] = Queue()
    back: Queue[Tuple[str, int]] = Queue()

    @background(start_method=start_method, daemon=daemon)
    def echo(inbox: Queue[int], outbox: Queue[Tuple[str, int]]) -> int:
        n = 0
        for item in inbox:
            outbox.put(("echo", item))
            n += 1
        return n

    task = echo(to_task, back)
    for i in range(500):
        to_task.put(i)
    to_task.shutdown()
    assert [back.get(timeout=RESULT_S)[1] for _ in range(500)] == list(range(500))
    assert task.result(RESULT_S) == 500
    assert back.qsize() == 0
    assert back.empty()


def test_four_producers_four_consumers_pass_100000_items_exactly_once(start_method: Optional[str]) -> None:
    """Every item once, none twice; each consumer sees each producer's items in its order."""
    jobs: Queue[Tuple[int, int]] = Queue(maxsize=1000)
    per_producer = 25_000

    @background(start_method=start_method)
    def produce(q: Queue[Tuple[int, int]], who: int, n: int) -> int:
        for i in range(n):
            q.put((who, i))
        return n

    @background(start_method=start_method)
    def consume(q: Queue[Tuple[int, int]]) -> List[Tuple[int, int]]:
        return list(q)

    consumers = [consume(jobs) for _ in range(4)]
    producers = [produce(jobs, who, per_producer) for who in range(4)]
    assert [p.result(RESULT_S) for p in producers] == [per_producer] * 4
    jobs.shutdown()
    received = [c.result(RESULT_S) for c in consumers]
    everything = sorted(item for got in received for item in got)
    assert everything == sorted((who, i) for who in range(4) for i in range(per_producer))
    for got in received:
        for who in range(4):
            mine = [i for w, i in got if w == who]
            assert mine == sorted(mine), "a consumer saw a producer's items out of order"


def test_a_queue_reaches_nested_tasks_and_closures(start_method: Optional[str], daemon: bool) -> None:
    """Captured by a closure, passed on by a task to its own task: the same queue everywhere."""
    results: Queue[str] = Queue()

    @background(start_method=start_method, daemon=daemon)
    def outer() -> str:
        results.put("outer")

        @background(start_method=start_method)
        def inner(q: Queue[str]) -> None:
            q.put("inner")

        inner(results).result(RESULT_S)
        return "done"

    assert outer().result(RESULT_S) == "done"
    assert sorted([results.get(timeout=RESULT_S), results.get(timeout=RESULT_S)]) == ["inner", "outer"]


def test_items_a_task_left_unsent_arrive_after_it_returned(start_method: Optional[str]) -> None:
    """More than the kernel holds, put by a task that returns before anyone reads: all arrive."""
    q: Queue[bytes] = Queue()
    n = 20_000  # 1 KiB each: 20 MiB, more than the socket's buffer

    @background(start_method=start_method)
    def flood(q: Queue[bytes]) -> int:
        for i in range(n):
            q.put(i.to_bytes(4, "big") * 256)
        return n

    assert flood(q).result(RESULT_S) == n
    assert q.qsize() == n
    got = [int.from_bytes(q.get(timeout=RESULT_S)[:4], "big") for _ in range(n)]
    assert got == list(range(n))
    with pytest.raises(queue.Empty):
        q.get_nowait()


def test_maxsize_holds_back_a_producer(start_method: Optional[str]) -> None:
    """A task putting into a full queue waits; it never holds more than maxsize."""
    q: Queue[int] = Queue(maxsize=3)
    seen: Queue[int] = Queue()

    @background(start_method=start_method)
    def produce(q: Queue[int], progress: Queue[int]) -> str:
        for i in range(10):
            q.put(i)
            progress.put(i)
        try:
            q.put(99, timeout=0.05)
        except queue.Full:
            return "full"
        return "not full"

    task = produce(q, seen)
    assert [seen.get(timeout=RESULT_S) for _ in range(3)] == [0, 1, 2]
    with pytest.raises(queue.Empty):
        seen.get(timeout=0.3)  # the fourth put waits for a free place
    assert q.qsize() == 3
    assert q.full()
    assert [q.get(timeout=RESULT_S) for _ in range(7)] == list(range(7))
    assert task.result(RESULT_S) == "full"
    assert [q.get(timeout=RESULT_S) for _ in range(3)] == [7, 8, 9]
    for _ in range(3):
        q.put_nowait(0)
    with pytest.raises(queue.Full):
        q.put_nowait(0)


def test_shutdown_drains_then_raises(start_method: Optional[str]) -> None:
    """After shutdown(): puts raise, gets return what is left, then raise; a blocked get wakes."""
    q: Queue[int] = Queue()

    @background(start_method=start_method)
    def consume(q: Queue[int]) -> Tuple[List[int], str]:
        got = [q.get()]
        bgtask.ready()
        try:
            while True:
                got.append(q.get())
        except ShutDown:
            return got, "shut down"

    task = consume(q)
    q.put(1)
    task.wait_ready(RESULT_S)
    q.put(2)
    q.put(3)
    q.shutdown()
    with pytest.raises(ShutDown):
        q.put(4)
    assert task.result(RESULT_S) == ([1, 2, 3], "shut down")
    with pytest.raises(ShutDown):
        q.get(timeout=1)


def test_immediate_shutdown_drops_what_is_left(start_method: Optional[str]) -> None:
    """shutdown(immediate=True): gets raise at once, qsize() is 0, a blocked put wakes and raises."""
    q: Queue[int] = Queue(maxsize=2)

    @background(start_method=start_method)
    def produce(q: Queue[int]) -> str:
        q.put(1)
        q.put(2)
        bgtask.ready()
        try:
            q.put(3)  # full: waits
        except ShutDown:
            return "woken"
        return "put"

    task = produce(q)
    task.wait_ready(RESULT_S)
    q.shutdown(immediate=True)
    assert task.result(RESULT_S) == "woken"
    assert q.qsize() == 0
    with pytest.raises(ShutDown):
        q.get_nowait()


def test_large_items_and_plain_objects(start_method: Optional[str]) -> None:
    """Items larger than a datagram travel in a memory file; lambdas go with cloudpickle."""
    q: Queue[Any] = Queue()

    @background(start_method=start_method)
    def produce(q: Queue[Any]) -> None:
        q.put(b"x" * 5_000_000)
        q.put({"nested": [1, 2, 3]})
        q.put(lambda x: x + 1)

    produce(q).result(RESULT_S)
    assert len(q.get(timeout=RESULT_S)) == 5_000_000
    assert q.get(timeout=RESULT_S) == {"nested": [1, 2, 3]}
    assert q.get(timeout=RESULT_S)(1) == 2


def test_threads_of_the_main_program_share_a_queue_with_tasks() -> None:
    """Eight threads put, two tasks consume: nothing lost, nothing twice."""
    q: Queue[int] = Queue(maxsize=100)

    @background
    def consume(q: Queue[int]) -> List[int]:
        return list(q)

    consumers = [consume(q) for _ in range(2)]

    def produce(base: int) -> None:
        for i in range(1000):
            q.put(base + i)

    threads = [threading.Thread(target=produce, args=(k * 1000,)) for k in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(RESULT_S)
    q.shutdown()
    got = sorted(i for c in consumers for i in c.result(RESULT_S))
    assert got == list(range(8000))


def test_a_queue_is_refused_where_it_cannot_go() -> None:
    """Not a result, not an item, not pickled by hand: TypeError naming it."""
    q: Queue[Any] = Queue()
    with pytest.raises(TypeError, match=r"bgtask\.Queue stands for a descriptor"):
        pickle.dumps(q)
    other: Queue[Any] = Queue()
    with pytest.raises(TypeError, match=r"bgtask\.Queue stands for a descriptor"):
        q.put(other)

    @background
    def make() -> Queue[int]:
        return Queue()

    with pytest.raises(bgtask.SerializationError, match=r"bgtask\.Queue"):
        make().result(RESULT_S)
    with pytest.raises(ValueError, match="maxsize"):
        Queue(maxsize=10**7)
    with pytest.raises(TypeError):
        Queue(maxsize="3")  # type: ignore[arg-type]
    del q, other
    gc.collect()  # the tracebacks above hold the queues in reference cycles


@pytest.mark.parametrize("graceful", [False, True])
def test_a_consumer_blocked_when_its_main_program_is_killed_ends(
    tmp_path: Path, start_method: Optional[str], graceful: bool
) -> None:
    """SIGKILL the main program while a non-daemon task waits in get(): it gets ShutDown, ends."""
    script = Script(
        tmp_path,
        f"""
import os, sys, pathlib
import bgtask

HERE = pathlib.Path(__file__).parent

@bgtask.background(start_method={start_method!r}, graceful={graceful})
def consume(q):
    bgtask.ready(os.getpid())
    try:
        q.get()
        outcome = "got"
    except bgtask.ShutDown as exc:
        outcome = "ShutDown: " + str(exc)
    (HERE / "outcome").write_text(outcome)

if __name__ == "__main__":
    q = bgtask.Queue()
    task = consume(q)
    print("PID", task.wait_ready(60), flush=True)
    import time
    time.sleep(600)
""",
    )
    try:
        pid = int(script.expect("PID"))
        os.kill(script.proc.pid, signal.SIGKILL)  # the main program only
        outcome = tmp_path / "outcome"
        assert wait_until(outcome.exists, timeout=30), "the consumer never left get()"
        assert wait_until(lambda: outcome.read_text() != "", timeout=10)
        assert outcome.read_text() == "ShutDown: the main program of this task ended"
        assert wait_until(lambda: not pid_alive(pid), timeout=30)
    finally:
        script.close()


def test_qsize_counts_across_processes() -> None:
    """qsize() sums what every process put and got."""
    q: Queue[int] = Queue()

    @background
    def put_some(q: Queue[int], n: int) -> None:
        for i in range(n):
            q.put(i)

    put_some(q, 7).result(RESULT_S)
    q.put(1)
    assert q.qsize() == 8
    q.get()
    q.get()
    assert q.qsize() == 6
    assert "qsize=6" in repr(q)


def test_a_task_reads_the_size(start_method: Optional[str]) -> None:
    """A task reads the size too (its slot and the others' are on one shared page)."""
    q: Queue[int] = Queue()
    for i in range(5):
        q.put(i)

    @background(start_method=start_method)
    def size(q: Queue[int]) -> int:
        q.get()
        return q.qsize()

    assert size(q).result(RESULT_S) == 4


def test_a_blocked_get_waits_without_spinning() -> None:
    """A get() that waits sleeps in poll(): it burns no CPU while the queue is empty."""
    q: Queue[int] = Queue()
    cpu = time.process_time()
    with pytest.raises(queue.Empty):
        q.get(timeout=0.5)
    assert time.process_time() - cpu < 0.25


def test_a_gevent_program_waits_cooperatively(tmp_path: Path) -> None:
    """Under gevent, a get() that waits lets the other greenlets run."""
    pytest.importorskip("gevent")
    result = run_script(
        tmp_path,
        """
from gevent import monkey

monkey.patch_all()
import gevent
import bgtask

ticks = []

def ticker():
    while True:
        ticks.append(1)
        gevent.sleep(0.01)

@bgtask.background
def produce(q, back):
    q.get()  # the go-ahead
    for i in range(1000):
        back.put(i)

if __name__ == "__main__":
    gevent.spawn(ticker)
    to_task, back = bgtask.Queue(), bgtask.Queue()
    task = produce(to_task, back)
    gevent.sleep(0.05)
    before = len(ticks)
    gevent.spawn_later(0.3, to_task.put, "go")
    # The main program waits here (the task waits for the go-ahead) while the ticker ticks.
    first = back.get(timeout=60)
    print("TICKED", len(ticks) - before >= 10)
    print("ITEMS", [first] + [back.get(timeout=60) for _ in range(999)] == list(range(1000)))
    task.result(60)
""",
    )
    assert result.returncode == 0, result.stderr
    assert "TICKED True" in result.stdout, result.stdout
    assert "ITEMS True" in result.stdout, result.stdout


def test_shutdown_lets_items_still_on_their_way_arrive(start_method: Optional[str]) -> None:
    """shutdown() right after more puts than the socket holds: the consumer still gets them all."""
    q: Queue[bytes] = Queue()
    n = 20_000
    for i in range(n):
        q.put(i.to_bytes(4, "big") * 256)  # 20 MiB: most of it waits in this process
    q.shutdown()
    with pytest.raises(ShutDown):
        q.put(b"late")

    @background(start_method=start_method)
    def consume(q: Queue[bytes]) -> List[int]:
        return [int.from_bytes(item[:4], "big") for item in q]

    assert consume(q).result(RESULT_S) == list(range(n))


def test_a_killed_producer_with_items_on_their_way_holds_no_consumer(
    start_method: Optional[str],
) -> None:
    """Its items that never reached the socket are lost; the consumers' loops still end."""
    q: Queue[bytes] = Queue()

    @background(start_method=start_method)
    def produce(q: Queue[bytes]) -> None:
        for _ in range(20_000):
            q.put(b"x" * 1024)  # more than the socket holds: the rest waits in this process
        bgtask.ready()
        bgtask.stop_event().wait()

    task = produce(q)
    task.wait_ready(RESULT_S)
    q.shutdown()
    task.kill()
    task.join(RESULT_S)
    got = sum(1 for _ in q)  # ends: the only process with items on their way is gone
    assert 0 < got <= 20_000


def test_items_a_crashed_producer_put_still_arrive(start_method: Optional[str], daemon: bool) -> None:
    """A task puts more than the socket holds, then dies by os._exit: every item it put arrives.

    What the socket had no room for went to the main program as it was put.
    """
    q: Queue[int] = Queue()
    n = 30_000

    @background(start_method=start_method, daemon=daemon)
    def produce_then_crash(q: Queue[int]) -> None:
        for i in range(n):
            q.put(i)
        os._exit(1)

    with pytest.raises(bgtask.TaskCrashed):
        produce_then_crash(q).result(RESULT_S)
    assert q.qsize() == n
    q.shutdown()
    assert list(q) == list(range(n))
    del q
    gc.collect()  # the task's error holds this frame, and the queue, in a reference cycle


def test_the_end_of_the_program_delivers_what_the_main_program_holds(tmp_path: Path) -> None:
    """A queue made after the first task, a backlog, shutdown(), then the script ends: no hang,
    every item reaches the non-daemon consumer, nothing on standard error."""
    result = run_script(
        tmp_path,
        """
import pathlib
import bgtask

HERE = pathlib.Path(__file__).parent

@bgtask.background
def noop():
    return None

@bgtask.background
def consume(q):
    import time
    n = 0
    for _ in q:
        n += 1
        if n % 1000 == 0:
            time.sleep(0.01)  # slower than the producer: a backlog builds up
    (HERE / "count").write_text(str(n))

if __name__ == "__main__":
    noop().result()  # bgtask's exit hook is registered before the queue exists
    q = bgtask.Queue()
    consume(q)
    for i in range(30000):
        q.put(b"x" * 1000)
    q.shutdown()
""",
        timeout=RESULT_S,
    )
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    assert (tmp_path / "count").read_text() == "30000"


def test_a_program_that_exits_with_items_unread_is_quiet(tmp_path: Path) -> None:
    """Items nobody read, some still waiting for room in the socket: the program exits at once,
    with nothing on standard error."""
    result = run_script(
        tmp_path,
        """
import bgtask
q = bgtask.Queue()
for i in range(30000):
    q.put(i)
print("DONE")
""",
        timeout=RESULT_S,
    )
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    assert result.stdout.strip() == "DONE"


def test_graceful_stops_during_puts_keep_the_places_right() -> None:
    """Stopped while putting into a full bounded queue, ten times: the bound still holds after."""
    q: Queue[int] = Queue(maxsize=5)

    @background(graceful=True)
    def produce(q: Queue[int]) -> None:
        bgtask.ready()
        i = 0
        while True:
            q.put(i)
            i += 1

    for _ in range(10):
        task = produce(q)
        task.wait_ready(RESULT_S)
        for _ in range(20):  # it is held back by the bound, and moves when it gets places
            q.get(timeout=RESULT_S)
        task.stop(RESULT_S)
    while True:
        try:
            q.get_nowait()
        except queue.Empty:
            break
    for i in range(5):
        q.put_nowait(i)
    with pytest.raises(queue.Full):
        q.put_nowait(5)
    assert q.qsize() == 5


def test_a_task_putting_while_it_ends_does_not_hold_the_shutdown(start_method: Optional[str]) -> None:
    """A thread of the task still puts (through the main program) as the task returns: whatever
    it was sending when the process ended, the consumers' loops end after shutdown()."""
    q: Queue[int] = Queue()

    @background(start_method=start_method)
    def produce(q: Queue[int]) -> None:
        def flood() -> None:
            for i in range(10**7):
                q.put(i)

        threading.Thread(target=flood, daemon=True).start()
        time.sleep(0.5)  # the socket fills, later items go through the main program

    produce(q).join(RESULT_S)
    q.shutdown()
    got = sum(1 for _ in q)  # must end: nothing is on its way from a process that is gone
    assert got > 0


def test_a_forwarding_task_gets_shutdown_when_its_main_program_dies(tmp_path: Path) -> None:
    """Items a task can only hand to its main program: once that program is gone, put() raises
    ShutDown instead of succeeding into nowhere."""
    script = Script(
        tmp_path,
        """
import pathlib, time
import bgtask

HERE = pathlib.Path(__file__).parent

@bgtask.background
def produce(q):
    n = 0
    try:
        while True:
            q.put(n)
            n += 1
            if n == 50000:
                bgtask.ready()
    except bgtask.ShutDown as exc:
        (HERE / "outcome").write_text("ShutDown: " + str(exc))

if __name__ == "__main__":
    q = bgtask.Queue()
    task = produce(q)
    task.wait_ready(60)
    print("READY", flush=True)
    time.sleep(600)
""",
    )
    try:
        script.expect("READY")
        os.kill(script.proc.pid, signal.SIGKILL)
        outcome = tmp_path / "outcome"
        assert wait_until(lambda: outcome.exists() and outcome.read_text() != "", timeout=30)
        assert outcome.read_text() == "ShutDown: the main program of this task ended"
    finally:
        script.close()


def test_join_waits_for_task_done_in_every_process(start_method: Optional[str]) -> None:
    """task_done() in the tasks, join() in the main program: it returns once all are done."""
    jobs: Queue[int] = Queue()
    done: Queue[int] = Queue()

    @background(start_method=start_method)
    def work(jobs: Queue[int], done: Queue[int]) -> None:
        for job in jobs:
            time.sleep(0.001)
            done.put(job)
            jobs.task_done()

    workers = [work(jobs, done) for _ in range(3)]
    for i in range(300):
        jobs.put(i)
    jobs.join()
    assert jobs.unfinished_tasks == 0
    assert done.qsize() == 300  # every job was dealt with before join() returned
    jobs.shutdown()
    for worker in workers:
        worker.result(RESULT_S)
    with pytest.raises(ValueError, match="task_done"):
        jobs.task_done()


def test_cpython_join_test_with_the_producer_in_a_task(start_method: Optional[str], daemon: bool) -> None:
    """CPython's join test, the producer a task: two threads get() and task_done() exactly."""
    q: Queue[int] = Queue()
    rounds: Queue[int] = Queue()
    total = [0]
    lock = threading.Lock()
    errors: List[BaseException] = []

    @background(start_method=start_method, daemon=daemon)
    def produce(q: Queue[int], rounds: Queue[int]) -> None:
        for _ in rounds:
            for i in range(100):
                q.put(i)
            rounds.task_done()  # the round's items are all put

    def worker() -> None:
        try:
            while True:
                x = q.get()
                if x >= 0:
                    with lock:
                        total[0] += x
                q.task_done()
                if x < 0:
                    return
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=worker) for _ in range(2)]
    for thread in threads:
        thread.start()
    task = produce(q, rounds)
    try:
        for r in range(40):
            rounds.put(r)
            rounds.join()
            joined = threading.Event()
            threading.Thread(target=_join_then_set, args=(q, joined), daemon=True).start()
            assert joined.wait(JOIN_S), f"join() still waits in round {r}: {errors}"
            assert errors == []
            assert total[0] == (r + 1) * sum(range(100))
        rounds.shutdown()
        task.result(RESULT_S)
    finally:
        task.kill()
        for _ in threads:
            q.put(-1)
        for thread in threads:
            thread.join(RESULT_S)
    assert errors == []
    assert q.unfinished_tasks == 0


def _join_then_set(q: Queue[Any], joined: threading.Event) -> None:
    q.join()
    joined.set()


def test_counts_read_while_a_task_writes_them_are_whole(start_method: Optional[str], daemon: bool) -> None:
    """qsize() and unfinished_tasks, read in a loop while a task puts and gets: never half a write."""
    q: Queue[int] = Queue()

    @background(start_method=start_method, daemon=daemon)
    def put_and_get(q: Queue[int], n: int) -> None:
        for i in range(n):
            q.put(i)
            q.get()

    task = put_and_get(q, 60_000)
    last, reads, wrong = 0, 0, []
    while not task.done():
        size, unfinished = q.qsize(), q.unfinished_tasks
        reads += 1
        if size > 1 or unfinished < last:  # one item at most; the put count only grows
            wrong.append((size, last, unfinished))
        last = unfinished
    task.result(RESULT_S)
    assert (q.qsize(), q.unfinished_tasks) == (0, 60_000)
    assert wrong == [], f"{len(wrong)} of {reads} reads were wrong, e.g. {wrong[:5]}"


class _Unreadable:
    """Pickles, but its unpickling fails (as a class the reader cannot import would)."""

    def __reduce__(self) -> Any:
        return (int, ("not a number",))


@pytest.mark.parametrize("maxsize", [0, 2])
def test_an_item_that_cannot_be_pickled_is_refused_and_adds_nothing(maxsize: int) -> None:
    """put() of a lock, a socket or a queue: SerializationError naming its type; nothing is counted."""
    q: Queue[Any] = Queue(maxsize=maxsize)
    other: Queue[Any] = Queue()
    sock = socket.socket()
    try:
        bad_items = [(threading.Lock(), "_thread.lock"), (sock, "socket.socket"), (other, "bgtask.Queue")]
        for bad, name in bad_items:
            with pytest.raises(bgtask.SerializationError, match=re.escape(name)) as caught:
                q.put(bad, timeout=1)
            assert isinstance(caught.value, TypeError)
        assert (q.qsize(), q.unfinished_tasks) == (0, 0)
        for i in range(maxsize or 3):  # every place is still free
            q.put_nowait(i)
        assert q.qsize() == (maxsize or 3)
    finally:
        sock.close()
    del q, other, bad, bad_items, caught
    gc.collect()  # the tracebacks above hold the queues in reference cycles


def test_a_task_putting_an_item_that_cannot_be_pickled_gets_serialization_error(
    start_method: Optional[str], daemon: bool
) -> None:
    """In a task too: the put raises SerializationError naming the type, and adds nothing."""
    q: Queue[Any] = Queue(maxsize=1)

    @background(start_method=start_method, daemon=daemon)
    def put_a_lock(q: Queue[Any]) -> str:
        try:
            q.put(threading.Lock())
        except bgtask.SerializationError as exc:
            q.put("next")  # the one place is still free
            return str(exc)
        return "accepted"

    assert "_thread.lock" in put_a_lock(q).result(RESULT_S)
    assert q.get(timeout=RESULT_S) == "next"
    assert (q.qsize(), q.unfinished_tasks) == (0, 1)


def test_an_item_that_cannot_be_unpickled_is_dropped_alone(start_method: Optional[str], daemon: bool) -> None:
    """get() in a task: SerializationError naming the type; the items after it still come."""
    q: Queue[Any] = Queue(maxsize=3)
    q.put("before")
    q.put(_Unreadable())
    q.put("after")

    @background(start_method=start_method, daemon=daemon)
    def consume(q: Queue[Any]) -> List[str]:
        seen = [q.get(timeout=60)]
        try:
            q.get(timeout=60)
        except bgtask.SerializationError as exc:
            seen.append(f"{type(exc).__name__}: {exc}")
        seen.append(q.get(timeout=60))
        return seen

    before, error, after = consume(q).result(RESULT_S)
    assert (before, after) == ("before", "after")
    assert "SerializationError" in error
    assert "_Unreadable" in error
    assert "ValueError" in error
    assert (q.qsize(), q.unfinished_tasks) == (0, 2)  # the dropped item counts as done
    for i in range(3):  # its place came back
        q.put_nowait(i)


def test_the_main_program_getting_an_item_that_cannot_be_unpickled() -> None:
    """The same in the main program: SerializationError, also a TypeError; only that item goes."""
    q: Queue[Any] = Queue()
    q.put(_Unreadable())
    q.put(1)
    with pytest.raises(bgtask.SerializationError, match="_Unreadable") as caught:
        q.get(timeout=RESULT_S)
    assert isinstance(caught.value, TypeError)
    assert isinstance(caught.value.__cause__, ValueError)
    assert q.get(timeout=RESULT_S) == 1
    assert (q.qsize(), q.unfinished_tasks) == (0, 1)
    del q, caught
    gc.collect()


def _cpu_time(thread: threading.Thread) -> float:
    """The CPU time ``thread`` has used (Linux); elsewhere, the whole process's."""
    try:
        with open(f"/proc/self/task/{thread.native_id}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return time.process_time()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


def _a_large_item_waits_for_room() -> Tuple[float, bool]:
    """A queue nobody reads, a large item at the head of this process's backlog: the CPU this
    process spends in the next two seconds, and whether every item then arrives in order, whole."""
    q: Queue[bytes] = Queue()
    n = 0  # 1 KiB items until the socket is full: this process's feeder thread then runs
    while not any(thread.name == "bgtask-queue-feeder" for thread in threading.enumerate()):
        q.put(n.to_bytes(4, "big") * 256)
        n += 1
    big = bytes(range(256)) * (100 * 4096)  # 100 MiB, behind the small item in the backlog
    q.put(big)
    first = q.get(timeout=60)  # room for one: the small item goes in, the large one heads
    feeder = next(t for t in threading.enumerate() if t.name == "bgtask-queue-feeder")
    cpu = _cpu_time(feeder)
    time.sleep(2.0)  # the window measured: nobody reads
    spent = _cpu_time(feeder) - cpu
    rest = [q.get(timeout=60) for _ in range(n)]
    in_order = [int.from_bytes(item[:4], "big") for item in [first, *rest[:-1]]] == list(range(n))
    return spent, in_order and rest[-1] == big and q.qsize() == 0


def test_a_large_item_waiting_for_room_in_the_main_program_is_written_once() -> None:
    """No CPU burns while a large item waits for room in the main program's backlog."""
    spent, arrived = _a_large_item_waits_for_room()
    assert arrived
    assert spent < 0.25, f"{spent:.2f} s of CPU in 2 s while nobody read"


def test_a_large_item_waiting_for_room_in_a_task_is_written_once(
    start_method: Optional[str], daemon: bool
) -> None:
    """The same in a task, for a queue it made (its own backlog and feeder thread)."""
    spent, arrived = background(start_method=start_method, daemon=daemon)(
        _a_large_item_waits_for_room
    )().result(RESULT_S)
    assert arrived
    assert spent < 0.25, f"{spent:.2f} s of CPU in 2 s while nobody read"


@pytest.mark.parametrize("maxsize", [0, 1])
def test_a_producer_killed_inside_put_leaves_nothing_behind(
    start_method: Optional[str], daemon: bool, maxsize: int
) -> None:
    """Killed while its put writes a large item: once it is gone, the item either arrived or
    was never counted; its place is free again and join() returns."""
    q: Queue[bytes] = Queue(maxsize=maxsize)

    @background(start_method=start_method, daemon=daemon)
    def produce(q: Queue[bytes]) -> None:
        q.put(b"x" * 300_000_000)  # counted, then written into its memory file: a long while

    task = produce(q)
    assert wait_until(lambda: q.qsize() == 1, timeout=RESULT_S)  # counted: on its way
    task.kill()
    task.join(RESULT_S)
    try:
        arrived = len(q.get_nowait()) == 300_000_000  # sent before it was killed after all
        q.task_done()
    except queue.Empty:
        arrived = False
    assert (q.qsize(), q.unfinished_tasks) == (0, 0), f"arrived: {arrived}"
    q.join()
    for i in range(maxsize or 3):  # its place is free again
        q.put_nowait(i.to_bytes(1, "big"))
    assert q.qsize() == (maxsize or 3)


def test_a_consumer_at_its_descriptor_limit_leaves_a_large_item_in_the_queue(
    start_method: Optional[str], daemon: bool
) -> None:
    """No descriptor free for a large item's memory file: get() raises OSError(EMFILE) saying
    so, and the item stays in the queue; once descriptors are free, it comes."""
    q: Queue[bytes] = Queue()
    q.put(b"A" * 100_000)  # larger than a datagram: it travels in a memory file

    @background(start_method=start_method, daemon=daemon)
    def consume_at_the_limit(q: Queue[bytes]) -> Tuple[Any, int]:
        import resource

        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        held: List[int] = []
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (len(os.listdir("/proc/self/fd")) + 8, hard))
            try:
                while True:  # every descriptor the limit allows is taken
                    held.append(os.open(os.devnull, os.O_RDONLY))
            except OSError as exc:
                if exc.errno != errno.EMFILE:
                    raise
            try:
                outcome: Any = ("got", len(q.get(timeout=60)))
            except OSError as exc:
                outcome = (exc.errno, str(exc))
        finally:
            for fd in held:
                os.close(fd)
            resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
        return outcome, len(q.get(timeout=60))

    (code, message), size = consume_at_the_limit(q).result(RESULT_S)
    assert code == errno.EMFILE, message
    assert "descriptor" in message
    assert "stays in the queue" in message
    assert size == 100_000
    assert (q.qsize(), q.unfinished_tasks) == (0, 1)


def _can_choose_pids() -> bool:
    try:
        with open("/proc/sys/kernel/ns_last_pid", "r+"):
            return True
    except OSError:
        return False


def _process_with_pid(pid: int) -> Optional[subprocess.Popen[bytes]]:
    """A new process that gets ``pid`` (free again): the kernel's next pid is set for it.
    ``None`` where a process or thread of another program took it first (a busy machine): the
    pid is reused either way."""
    for _ in range(100):
        if os.path.exists(f"/proc/{pid}"):
            return None
        with open("/proc/sys/kernel/ns_last_pid", "w") as f:
            f.write(str(pid - 1))
        proc = subprocess.Popen(["sleep", "600"])
        if proc.pid == pid:
            return proc
        proc.kill()  # another process took the pid first (a shared machine): again
        proc.wait()
    raise AssertionError(f"no new process got pid {pid}")


@pytest.mark.skipif(not _can_choose_pids(), reason="needs to set /proc/sys/kernel/ns_last_pid (root)")
def test_a_dead_process_whose_pid_was_reused_holds_no_shutdown(
    tmp_path: Path, start_method: Optional[str]
) -> None:
    """The main program dies holding items on their way after shutdown(), and a new process
    gets its pid: a task draining the queue still sees its end (a slot names its process by
    pid and start time)."""
    script = Script(
        tmp_path,
        f"""
import os, pathlib, queue, time
import bgtask

HERE = pathlib.Path(__file__).parent

@bgtask.background(start_method={start_method!r})  # not a daemon: it outlives its program
def drain(q):
    (HERE / "running").touch()
    while not (HERE / "go").exists():
        time.sleep(0.01)
    n, deadline = 0, time.monotonic() + 30
    try:
        while time.monotonic() < deadline:
            try:
                q.get_nowait()
                n += 1
            except queue.Empty:
                time.sleep(0.01)
            except bgtask.ShutDown:
                (HERE / "outcome").write_text(f"ShutDown after {{n}}")
                return
    except BaseException as exc:  # said, not lost: the test shows what ended the drain
        (HERE / "outcome").write_text(f"raised {{exc!r}} after {{n}}")
        raise
    (HERE / "outcome").write_text(f"still waiting after {{n}}")

if __name__ == "__main__":
    # The main program is a child of the session's leader, not a group's leader: once it is
    # dead and reaped, its pid is free for another process.
    child = os.fork()
    if child:
        os.waitpid(child, 0)
        print("REAPED", flush=True)
        time.sleep(600)
    q = bgtask.Queue()
    for i in range(20_000):
        q.put(b"x" * 1024)  # more than the socket holds: the rest waits in this program
    q.shutdown()  # the items on their way hold it open
    task = drain(q)
    print("PIDS", os.getpid(), task.pid, flush=True)
    time.sleep(600)
""",
    )
    holder = None
    # One at a time across the test run's workers: each sets the kernel's next pid.
    import fcntl
    import tempfile

    lock = open(os.path.join(tempfile.gettempdir(), "bgtask-tests-ns_last_pid.lock"), "w")  # noqa: SIM115
    fcntl.flock(lock, fcntl.LOCK_EX)
    try:
        main_pid, task_pid = (int(pid) for pid in script.expect("PIDS", timeout=RESULT_S).split())
        # Killed once the task runs its function: this test is about the queue's end, not about
        # a program that dies while its task is still starting (its pid is known before).
        assert wait_until((tmp_path / "running").exists, timeout=RESULT_S)
        os.kill(main_pid, signal.SIGKILL)
        script.expect("REAPED", timeout=RESULT_S)
        holder = _process_with_pid(main_pid)
        (tmp_path / "go").touch()
        outcome = tmp_path / "outcome"
        assert wait_until(lambda: outcome.exists() and outcome.read_text() != "", timeout=RESULT_S), (
            f"no outcome; the task is {'alive' if pid_alive(task_pid) else 'gone'}; "
            f"the pid's holder: {holder and holder.pid}; stderr: {script.stderr()}"
        )
        assert outcome.read_text().startswith("ShutDown after "), outcome.read_text()
        assert wait_until(lambda: not pid_alive(task_pid), timeout=RESULT_S)
    finally:
        if holder is not None:
            holder.kill()
            holder.wait()
        script.close()
        lock.close()  # the lock goes with it


def _without_privileges() -> List[str]:
    """A command prefix that runs a program without the capabilities that lift per-user limits
    (root has them); nothing where they are not held."""
    if os.geteuid() != 0:
        return []
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        pytest.skip("running as root without setpriv: cannot drop CAP_SYS_RESOURCE")
    drop = "-sys_resource,-sys_admin"
    return [setpriv, f"--bounding-set={drop}", f"--inh-caps={drop}"]


def test_more_large_items_in_flight_than_descriptors_allowed_wait_for_room(
    tmp_path: Path, start_method: Optional[str], daemon: bool
) -> None:
    """Items in memory files beyond the descriptors a user may have in flight (ETOOMANYREFS):
    puts wait in the backlogs as for a full socket, and every item arrives in order."""
    write_script(
        tmp_path,
        f"""
import resource
import bgtask

@bgtask.background(start_method={start_method!r}, daemon={daemon})
def produce(q, n):
    for i in range(n):
        q.put(i.to_bytes(4, "big") * 10_000)  # 40 kB: each travels in a memory file

if __name__ == "__main__":
    resource.setrlimit(resource.RLIMIT_NOFILE, (200, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))
    q = bgtask.Queue()
    produce(q, 300).result(120)
    for i in range(300, 600):
        q.put(i.to_bytes(4, "big") * 10_000)
    got = sorted(int.from_bytes(q.get(timeout=60)[:4], "big") for _ in range(600))
    print("ARRIVED", got == list(range(600)), q.qsize())
""",
    )
    result = subprocess.run(
        [*_without_privileges(), sys.executable, str(tmp_path / "script.py")],
        capture_output=True,
        text=True,
        timeout=RESULT_S,
        cwd=str(tmp_path),
        env=script_env(),
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ARRIVED True 0", result.stderr
