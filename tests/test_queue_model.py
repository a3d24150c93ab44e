"""bgtask.Queue against a model: random sequences of puts, gets and shutdowns, here and in tasks.

Two hypothesis ``RuleBasedStateMachine``s:

- ``QueueModel`` drives one queue (bounded or not) from the main program and from tasks that
  put or get a few items each, one step at a time, and checks every answer against a plain
  deque with the stdlib's rules: FIFO, ``Full`` and ``Empty`` where ``queue.Queue`` raises
  them, ``ShutDown`` after ``shutdown()``, the drain after a shutdown, and ``qsize()`` after
  every step.
- ``QueueWithProcesses`` runs producer and consumer tasks side by side with the main program,
  and stops them gracefully or kills them at any moment. Each task logs what it does to a file
  (write by write: what a killed task wrote is there). After each step: no item was got twice,
  none that was never put. At the end of each example, once every task is gone: each item a
  put() returned for was got once (or is held by a consumer stopped or killed between its
  get() and the line that logs it), ``qsize()`` is the number of items left, every free place
  of a bounded queue can be taken, and ``unfinished_tasks`` counts the items got and not
  marked done. A kill that lands while the kernel hands an item over (inside the system call)
  may leave the counts one item off: at most one per kill, counted and printed.

Size and seed come from the environment::

    BGTASK_QUEUE_MODEL_EXAMPLES=N      QueueModel's examples (default 40)
    BGTASK_QUEUE_PROCESS_EXAMPLES=N    QueueWithProcesses' examples per start method in the slow
                                       test (default 100; the quick one runs 3)
    BGTASK_QUEUE_PROCESS_SEED=S        an integer: that seed; unset: derandomized (CI)

A long run: ``BGTASK_QUEUE_PROCESS_EXAMPLES=2000 pytest tests/test_queue_model.py -m slow -s
-p no:xdist -o faulthandler_timeout=0`` (the test's own timeout grows with N).
"""

from __future__ import annotations

import collections
import gc
import os
import queue
import shutil
import tempfile
import time
from typing import Any, Callable, Deque, List, Optional, Set, Tuple

import pytest

pytest.importorskip("hypothesis")

from hypothesis import HealthCheck, seed, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    Bundle,
    RuleBasedStateMachine,
    initialize,
    invariant,
    multiple,
    precondition,
    rule,
    run_state_machine_as_test,
)

from bgtask import Queue, ShutDown, background, ready

RESULT_S = 120.0
EXAMPLES = int(os.environ.get("BGTASK_QUEUE_MODEL_EXAMPLES", "40"))

# Small items, and some larger than a datagram (they travel in a memory file).
items = st.one_of(
    st.integers(), st.binary(max_size=64), st.builds(lambda n: b"L" * n, st.integers(40_000, 80_000))
)


@background
def put_in_task(q: Queue[Any], values: List[Any]) -> str:
    try:
        for value in values:
            q.put_nowait(value)
    except queue.Full:
        return "full"
    except ShutDown:
        return "shut down"
    return "ok"


@background
def get_in_task(q: Queue[Any], n: int) -> Tuple[List[Any], str]:
    got: List[Any] = []
    try:
        for _ in range(n):
            got.append(q.get_nowait())
    except queue.Empty:
        return got, "empty"
    except ShutDown:
        return got, "shut down"
    return got, "ok"


class QueueModel(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.model: Deque[Any] = collections.deque()
        self.state = "open"  # "open", "shut down", "immediate"
        self.maxsize = 0
        self.q: Queue[Any] = Queue()

    @initialize(maxsize=st.sampled_from([0, 0, 1, 3, 8]))
    def make(self, maxsize: int) -> None:
        self.maxsize = maxsize
        self.q = Queue(maxsize=maxsize)

    def _room(self) -> int:
        return 10**9 if not self.maxsize else self.maxsize - len(self.model)

    def _expected_put(self, n: int) -> Tuple[int, str]:
        """How many of ``n`` puts succeed, and how the rest end."""
        if n == 0:
            return 0, "ok"
        if self.state != "open":
            return 0, "shut down"
        if n > self._room():
            return self._room(), "full"
        return n, "ok"

    @rule(value=items)
    def put_here(self, value: Any) -> None:
        _accepted, outcome = self._expected_put(1)
        if outcome == "ok":
            self.q.put_nowait(value)
            self.model.append(value)
        else:
            with pytest.raises(queue.Full if outcome == "full" else ShutDown):
                self.q.put_nowait(value)

    @rule()
    def get_here(self) -> None:
        if self.model and self.state != "immediate":
            assert self.q.get_nowait() == self.model.popleft()
        elif self.state == "open":
            with pytest.raises(queue.Empty):
                self.q.get_nowait()
        else:
            with pytest.raises(ShutDown):
                self.q.get_nowait()

    @rule(values=st.lists(items, max_size=5))
    def put_from_a_task(self, values: List[Any]) -> None:
        accepted, outcome = self._expected_put(len(values))
        assert put_in_task(self.q, values).result(RESULT_S) == outcome
        self.model.extend(values[:accepted])

    @rule(n=st.integers(0, 5))
    def get_from_a_task(self, n: int) -> None:
        got, outcome = get_in_task(self.q, n).result(RESULT_S)
        if self.state == "immediate":
            assert (got, outcome) == ([], "shut down" if n else "ok")
            return
        expected = [self.model.popleft() for _ in range(min(n, len(self.model)))]
        assert got == expected
        if len(expected) == n:
            assert outcome == "ok"
        else:
            assert outcome == ("empty" if self.state == "open" else "shut down")

    @precondition(lambda self: self.state != "immediate")
    @rule(immediate=st.booleans())
    def shutdown(self, immediate: bool) -> None:
        self.q.shutdown(immediate=immediate)
        if immediate:
            self.state = "immediate"
            self.model.clear()
        else:
            self.state = "shut down"

    def teardown(self) -> None:
        del self.q  # its descriptors close now, not when hypothesis drops the machine

    @invariant()
    def sizes_agree(self) -> None:
        assert self.q.qsize() == len(self.model)
        assert self.q.empty() == (not self.model)
        assert self.q.full() == (bool(self.maxsize) and len(self.model) >= self.maxsize)


def test_queue_against_its_model() -> None:
    """Random sequences, checked step by step against a deque with the stdlib's rules."""
    run_state_machine_as_test(
        QueueModel,
        settings=settings(
            max_examples=EXAMPLES,
            stateful_step_count=20,
            deadline=None,
            derandomize=True,
            suppress_health_check=list(HealthCheck),
        ),
    )
    gc.collect()  # machines hypothesis kept for its report


# -- the queue with real processes: producers and consumers stopped and killed at any moment ----

PROCESS_EXAMPLES = int(os.environ.get("BGTASK_QUEUE_PROCESS_EXAMPLES", "100"))
PROCESS_SEED = os.environ.get("BGTASK_QUEUE_PROCESS_SEED") or None
GRACE_S = 30.0  # a graceful stop is honoured well within this: an escalation is a failure
END_S = 60.0  # generous (shared machines); a passing example returns as soon as it can
SENTINEL = 10**8  # ids of the items the end of an example puts to fill the free places


def _make_bodies() -> Tuple[Callable[..., None], Callable[..., None]]:
    """The tasks' bodies: closures, so that they travel by value (a task never imports this
    module). Each logs what it does, one write per line: ``P i`` before it puts item i, ``p i``
    once put() returned; ``G i`` once get() returned item i, ``D i`` once task_done() did."""

    def produce(q: Queue[bytes], first: int, n: int, big: bool, path: str) -> None:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        ready()
        try:
            for i in range(first, first + n):
                os.write(fd, b"P %d\n" % i)
                q.put(i.to_bytes(4, "big") * (10_000 if big and i % 2 else 4))  # 40 kB: a file
                os.write(fd, b"p %d\n" % i)
        finally:
            os.close(fd)

    def consume(q: Queue[bytes], n: int, path: str) -> None:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        ready()
        try:
            for _ in range(n):
                i = int.from_bytes(q.get()[:4], "big")
                os.write(fd, b"G %d\n" % i)
                q.task_done()
                os.write(fd, b"D %d\n" % i)
        finally:
            os.close(fd)

    return produce, consume


PRODUCE, CONSUME = _make_bodies()


class Proc:
    """A producer or consumer task, what the test asked of it, and its log."""

    def __init__(self, idx: int, kind: str, task: Any, path: str, ids: range) -> None:
        self.idx = idx
        self.kind = kind
        self.task = task
        self.path = path
        self.ids = ids  # a producer's items
        self.requests: Set[str] = set()

    def log(self) -> List[Tuple[str, int]]:
        try:
            with open(self.path, "rb") as f:
                lines = f.read().split(b"\n")[:-1]  # whole lines: the task may be writing one
        except FileNotFoundError:
            return []
        return [(op.decode(), int(i)) for op, i in (line.split() for line in lines)]

    @property
    def killed(self) -> bool:
        return "kill" in self.requests

    def __repr__(self) -> str:
        ids = f" ids={self.ids.start}..{self.ids.stop - 1}" if self.ids else ""
        return (
            f"<{self.kind}#{self.idx}{ids} requests={sorted(self.requests)} "
            f"exitcode={self.task.exitcode} log={self.log()[-4:]}>"
        )


class QueueWithProcesses(RuleBasedStateMachine):
    method: Optional[str] = None
    procs = Bundle("procs")

    def __init__(self) -> None:
        super().__init__()
        self.dir = tempfile.mkdtemp(prefix="bgtask-queue-model-")
        self.maxsize = 0
        self.q: Queue[bytes] = Queue()
        self.all: List[Proc] = []
        self.next_id = 0
        self.put_here: Set[int] = set()  # items the main program put
        self.got_here: List[int] = []  # items the main program got (and marked done)

    @initialize(
        target=procs,
        maxsize=st.sampled_from([0, 0, 1, 3]),
        produce=st.tuples(st.integers(1, 400), st.booleans(), st.booleans()),
        consume=st.tuples(st.integers(1, 400), st.booleans()),
    )
    def make(self, maxsize: int, produce: Tuple[int, bool, bool], consume: Tuple[int, bool]) -> Any:
        """The queue, a producer (items, large ones?, daemon?), a consumer (items, daemon?)."""
        self.maxsize = maxsize
        self.q = Queue(maxsize=maxsize)
        return multiple(self.start_producer(*produce), self.start_consumer(*consume))

    def _start(
        self, kind: str, body: Callable[..., None], args: Tuple[Any, ...], daemon: bool, ids: range
    ) -> Proc:
        idx = len(self.all)
        path = os.path.join(self.dir, f"{idx}.log")
        run = background(
            body, start_method=self.method, daemon=daemon, graceful=True, grace=GRACE_S, name=f"{kind}{idx}"
        )
        proc = Proc(idx, kind, run(self.q, *args, path), path, ids)
        self.all.append(proc)
        proc.task.wait_ready(END_S)  # running: what comes next meets it at work
        return proc

    @rule(target=procs, n=st.integers(1, 400), big=st.booleans(), daemon=st.booleans())
    def start_producer(self, n: int, big: bool, daemon: bool) -> Proc:
        ids = range(self.next_id, self.next_id + n)
        self.next_id += n
        return self._start("producer", PRODUCE, (ids.start, n, big), daemon, ids)

    @rule(target=procs, n=st.integers(1, 400), daemon=st.booleans())
    def start_consumer(self, n: int, daemon: bool) -> Proc:
        return self._start("consumer", CONSUME, (n,), daemon, range(0))

    @rule(proc=procs)
    def stop(self, proc: Proc) -> None:
        proc.requests.add("stop")
        try:
            proc.task.stop(timeout=0)  # asked; the end of the example waits for it
        except TimeoutError:
            pass

    @rule(proc=procs)
    def kill(self, proc: Proc) -> None:
        if proc.task.is_alive():
            proc.requests.add("kill")
        proc.task.kill()

    @rule(n=st.integers(1, 4))
    def put_here_nowait(self, n: int) -> None:
        for _ in range(n):
            i = self.next_id
            try:
                self.q.put_nowait(i.to_bytes(4, "big") * 4)
            except queue.Full:
                return
            self.next_id += 1
            self.put_here.add(i)

    @rule(n=st.integers(1, 4))
    def get_here_nowait(self, n: int) -> None:
        for _ in range(n):
            try:
                item = self.q.get_nowait()
            except queue.Empty:
                return
            self.got_here.append(int.from_bytes(item[:4], "big"))
            self.q.task_done()

    @rule(seconds=st.sampled_from([0.001, 0.01, 0.05]))
    def let_them_run(self, seconds: float) -> None:
        time.sleep(seconds)  # not for ordering: the tasks run on meanwhile, as they would

    # -- checks -----------------------------------------------------------------------------

    def _seen(self) -> List[int]:
        """Every item got so far, by anyone (once each, if all is well)."""
        seen = list(self.got_here)
        for proc in self.all:
            if proc.kind == "consumer":
                seen.extend(i for op, i in proc.log() if op == "G")
        return seen

    @invariant()
    def no_item_twice_and_none_never_put(self) -> None:
        seen = self._seen()
        twice = sorted(i for i, n in collections.Counter(seen).items() if n > 1)
        assert not twice, f"items got twice: {twice}: {self.all}"
        started = set(self.put_here)
        for proc in self.all:
            if proc.kind == "producer":
                started.update(i for op, i in proc.log() if op == "P")
        assert set(seen) <= started, f"items got that were never put: {set(seen) - started}"
        size = self.q.qsize()
        assert size >= 0
        assert not self.maxsize or size <= self.maxsize, f"qsize {size} > maxsize {self.maxsize}"

    def teardown(self) -> None:
        try:
            self._end_tasks()
            self._check_the_end()
        finally:
            for proc in self.all:
                if proc.task.is_alive():
                    proc.task.kill()
                    proc.task.join(END_S)
            del self.q
            shutil.rmtree(self.dir, ignore_errors=True)

    def _end_tasks(self) -> None:
        for proc in self.all:
            if proc.task.is_alive():
                proc.requests.add("stop")
                try:
                    proc.task.stop(timeout=0)
                except TimeoutError:
                    pass
        deadline = time.monotonic() + END_S
        for proc in self.all:
            proc.task.join(max(0.0, deadline - time.monotonic()))
            assert not proc.task.is_alive(), f"still running {END_S} s after stop(): {proc}"
            if not proc.killed:
                # Graceful stops are honoured at once: never the kill after the grace.
                assert proc.task.exitcode != -9, f"killed after its grace: {proc}"

    def _check_the_end(self) -> None:
        q, maxsize = self.q, self.maxsize
        size = q.qsize()
        # Every free place of a bounded queue can be taken, and no more.
        free = 0
        while maxsize:
            try:
                q.put_nowait((SENTINEL + free).to_bytes(4, "big") * 4)
            except queue.Full:
                break
            free += 1
        assert free == (maxsize - size if maxsize else 0), f"{free} free places, qsize() {size}: {self.all}"
        # What is left: got to the end, with shutdown() telling when all has arrived.
        q.shutdown()
        drained: List[int] = []
        while True:
            try:
                item = q.get(timeout=END_S)
            except ShutDown:
                break
            except queue.Empty:
                raise AssertionError(f"no end {END_S} s after shutdown(): {self.all}") from None
            drained.append(int.from_bytes(item[:4], "big"))
            q.task_done()
        left = [i for i in drained if i < SENTINEL]
        # A process killed while the kernel handed an item over (in the system call that sends
        # or receives it) may leave the counts one item off: that much, no more, per kill.
        slack = sum(proc.killed for proc in self.all)
        off = abs(len(left) - size)
        assert off <= slack, f"qsize() said {size}, {len(left)} were left: {self.all}"
        # Each item a put() returned for was got once, but for one that a consumer stopped or
        # killed held (got, and not yet logged).
        seen = self._seen() + left
        twice = sorted(i for i, n in collections.Counter(seen).items() if n > 1)
        assert not twice, f"items got twice: {twice}: {self.all}"
        completed = set(self.put_here)
        for proc in self.all:
            if proc.kind == "producer":
                completed.update(i for op, i in proc.log() if op == "p")
        missing = sorted(completed - set(seen))
        consumers = [proc for proc in self.all if proc.kind == "consumer"]
        may_hold = [p for p in consumers if p.requests and (not p.log() or p.log()[-1][0] != "G")]
        assert len(missing) <= len(may_hold), f"lost: {missing}; consumers that may hold one: {may_hold}"
        # Unfinished: the items held or got and not yet marked done (a consumer stopped between
        # its task_done() and the line that logs it counts either way).
        ends_with_got = [p for p in consumers if p.log() and p.log()[-1][0] == "G"]
        unfinished = q.unfinished_tasks
        low, high = len(missing) - slack, len(missing) + len(ends_with_got) + slack
        assert low <= unfinished <= high, f"unfinished_tasks {unfinished}, not in [{low}, {high}]: {self.all}"
        low, high = len(missing), len(missing) + len(ends_with_got)
        if off or not low <= unfinished <= high:
            SLACK_USED.append(f"qsize {size}, left {len(left)}; unfinished {unfinished} for [{low}, {high}]")


SLACK_USED: List[str] = []  # the examples whose counts a kill left one item off


def _run_processes(start_method: Optional[str], examples: int) -> None:
    machine: Any = type(
        f"QueueWithProcesses_{start_method or 'zygote'}", (QueueWithProcesses,), {"method": start_method}
    )
    if PROCESS_SEED is not None:
        machine = seed(int(PROCESS_SEED))(machine)
    started = time.monotonic()
    SLACK_USED.clear()
    run_state_machine_as_test(
        machine,
        settings=settings(
            max_examples=examples,
            stateful_step_count=12,
            deadline=None,
            derandomize=PROCESS_SEED is None,
            database=None,
            print_blob=True,
            suppress_health_check=list(HealthCheck),
        ),
    )
    gc.collect()  # machines hypothesis kept for its report
    print(
        f"\n{start_method or 'zygote'}: {examples} examples in {time.monotonic() - started:.0f} s; "
        f"counts one item off after a kill: {len(SLACK_USED)}"
    )


def test_queue_with_producers_and_consumers_stopped_and_killed(start_method: Optional[str]) -> None:
    """A few random sequences with real processes: nothing lost, nothing twice, counts right."""
    _run_processes(start_method, 3)


@pytest.mark.slow
@pytest.mark.timeout(300 + 10 * PROCESS_EXAMPLES)
def test_queue_with_producers_and_consumers_stopped_and_killed_long(start_method: Optional[str]) -> None:
    """The same, many more examples (``BGTASK_QUEUE_PROCESS_EXAMPLES``)."""
    _run_processes(start_method, PROCESS_EXAMPLES)
