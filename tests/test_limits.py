"""Bounded concurrency (``limit=``, ``Limiter``), pending tasks, ``map`` and ``amap``."""

from __future__ import annotations

import asyncio
import concurrent.futures
import itertools
import os
import signal
import threading
import time
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Tuple

import pytest

import bgtask
from bgtask import Limiter, Queue, TaskStopped, background

from .helpers import run_script, wait_until

RESULT_S = 120.0


def _max_overlap(events: List[Tuple[str, int]]) -> int:
    running = peak = 0
    for kind, _pid in events:
        running += 1 if kind == "start" else -1
        peak = max(peak, running)
    return peak


def test_limit_2_never_runs_more_than_2_processes(start_method: Optional[str], kind: Dict[str, bool]) -> None:
    """Ten calls, at most two processes at any time (their own start and end events say so)."""
    events: Queue[Tuple[str, int]] = Queue()
    gate: Queue[int] = Queue()

    @background(start_method=start_method, limit=2, **kind)
    def work(events: Queue[Tuple[str, int]], gate: Queue[int]) -> int:
        events.put(("start", os.getpid()))
        gate.get()  # none ends before the ten calls are made: the handshake, not a sleep
        time.sleep(0.05)
        events.put(("end", os.getpid()))
        return os.getpid()

    tasks = [work(events, gate) for _ in range(10)]
    assert sum(t.pid is None for t in tasks) >= 8  # pending: no process yet
    for _ in range(10):
        gate.put(1)
    seen_alive = 0
    while not all(t.done() for t in tasks):
        seen_alive = max(seen_alive, sum(t.is_alive() for t in tasks))
        time.sleep(0.005)
    pids = [t.result(RESULT_S) for t in tasks]
    assert len(set(pids)) == 10  # a fresh process per call
    log = [events.get(timeout=RESULT_S) for _ in range(20)]
    assert _max_overlap(log) <= 2
    assert seen_alive <= 2


def test_a_limiter_shared_by_two_functions() -> None:
    """Limiter(1) given to two functions: their tasks never overlap."""
    shared = Limiter(1)
    events: Queue[Tuple[str, int]] = Queue()
    gate: Queue[str] = Queue()

    @background(limit=shared)
    def first(events: Queue[Tuple[str, int]], gate: Queue[str]) -> None:
        events.put(("start", os.getpid()))
        gate.get()
        events.put(("end", os.getpid()))

    @background(limit=shared)
    def second(events: Queue[Tuple[str, int]], gate: Queue[str]) -> None:
        events.put(("start", os.getpid()))
        gate.get()
        events.put(("end", os.getpid()))

    tasks = [f(events, gate) for f in (first, second) * 3]
    assert shared.running == 1
    assert shared.pending == 5
    for _ in tasks:
        gate.put("go")
    for task in tasks:
        task.result(RESULT_S)
        task.join(RESULT_S)  # its place is free once its process is gone
    assert _max_overlap([events.get(timeout=RESULT_S) for _ in range(12)]) == 1
    assert (shared.running, shared.pending) == (0, 0)


def test_stopping_a_pending_task_starts_no_process(start_method: Optional[str]) -> None:
    """stop() on a pending task: TaskStopped at once, pid None, and it never runs."""

    @background(start_method=start_method, limit=1)
    def hold(marker: Optional[str]) -> None:
        if marker is not None:
            Path(marker).write_text("ran")
        else:
            bgtask.stop_event().wait(60)

    first = hold(None)
    marker = Path(os.environ.get("TMPDIR", "/tmp")) / f"bgtask-pending-{os.getpid()}-{id(first)}"
    second = hold(str(marker))
    assert second.pid is None
    assert not second.is_alive()
    assert "pending" in repr(second)
    second.stop()
    with pytest.raises(TaskStopped, match="before it started"):
        second.result(0)
    assert second.pid is None
    first.stop()
    first.join(RESULT_S)
    assert not marker.exists()


def test_a_pending_task_is_a_pending_future() -> None:
    """Not running, not done; callbacks, await, result(timeout) and cancel() work as usual."""
    gate: Queue[str] = Queue()

    @background(limit=1)
    def step(gate: Queue[str], value: int) -> int:
        gate.get()
        return value

    first, second, third = step(gate, 1), step(gate, 2), step(gate, 3)
    assert not second.running()
    assert not second.done()
    called: List[int] = []
    second.add_done_callback(lambda t: called.append(t.result()))
    with pytest.raises(TimeoutError):
        second.result(0.1)
    assert third.cancel()
    with pytest.raises(concurrent.futures.CancelledError):
        third.result(0)
    gate.put("go")
    gate.put("go")

    async def wait() -> int:
        return await second

    assert asyncio.run(wait()) == 2
    assert first.result(RESULT_S) == 1
    assert wait_until(lambda: called == [2])  # callbacks run in their own thread


def test_pending_non_daemon_tasks_run_before_the_program_ends(tmp_path: Path) -> None:
    """The script ends right after its calls: every pending non-daemon task still runs."""
    result = run_script(
        tmp_path,
        """
import pathlib, time
import bgtask

HERE = pathlib.Path(__file__).parent

@bgtask.background(limit=1)
def work(i):
    time.sleep(0.05)
    (HERE / f"done-{i}").write_text("done")

if __name__ == "__main__":
    for i in range(4):
        work(i)
""",
        timeout=RESULT_S,
    )
    assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in tmp_path.glob("done-*")) == [f"done-{i}" for i in range(4)]


def test_pending_daemons_are_dropped_at_exit(tmp_path: Path) -> None:
    """A daemon that waits for a place at the end of the program never starts."""
    result = run_script(
        tmp_path,
        """
import pathlib
import bgtask

HERE = pathlib.Path(__file__).parent

@bgtask.background(daemon=True, limit=1)
def daemon(i):
    (HERE / f"started-{i}").write_text("started")
    bgtask.stop_event().wait(60)

if __name__ == "__main__":
    first = daemon(0)
    daemon(1)
    daemon(2)
    while not (HERE / "started-0").exists():
        pass
""",
        timeout=RESULT_S,
    )
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    assert sorted(p.name for p in tmp_path.glob("started-*")) == ["started-0"]


def _square(x: int) -> int:
    return x * x


def test_map_keeps_the_order(start_method: Optional[str], kind: Dict[str, bool]) -> None:
    """Results in input order; several iterables are zipped, as for the builtin map()."""

    @background(start_method=start_method, **kind)
    def add(a: int, b: int) -> int:
        return a + b

    assert list(add.map(range(20), range(100, 120), limit=3)) == [
        a + b for a, b in zip(range(20), range(100, 120))
    ]


def test_map_unordered_yields_every_result() -> None:
    """ordered=False: every result, as tasks finish (a slow first item does not hold the rest)."""

    @background
    def wait_then_return(x: int) -> int:
        time.sleep(0.5 if x == 0 else 0)
        return x

    results = list(wait_then_return.map(range(8), limit=4, ordered=False))
    assert sorted(results) == list(range(8))
    assert results[-1] == 0


def test_map_reads_its_input_lazily() -> None:
    """A huge lazy input: at most about twice the limit drawn ahead of the results read."""
    drawn = itertools.count()

    def numbers() -> Iterator[int]:
        for i in itertools.count():
            next(drawn)
            yield i

    square = background(_square)
    results = square.map(numbers(), limit=2)
    assert [next(results) for _ in range(10)] == [i * i for i in range(10)]
    assert next(drawn) <= 10 + 2 * 2 + 1
    results.close()  # type: ignore[attr-defined]


def test_map_raises_the_first_error_and_stops_the_rest() -> None:
    """The error of item 3 is raised when item 3 is reached; the tasks after it are stopped."""

    @background
    def fail_at_3(x: int) -> int:
        if x == 3:
            raise ValueError("item 3")
        if x > 3:
            time.sleep(60)
        return x

    got: List[int] = []
    with pytest.raises(ValueError, match="item 3"):
        got.extend(fail_at_3.map(range(8), limit=4))
    assert got == [0, 1, 2]  # the results before the error
    assert _all_end(timeout=20)  # well before their 60 s: stopped


def _all_end(timeout: float = RESULT_S) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not bgtask.active():
            return True
        time.sleep(0.01)
    return False


def test_leaving_a_map_loop_stops_its_tasks(start_method: Optional[str], daemon: bool) -> None:
    """``break`` after a few results: the tasks still running are stopped at once."""

    @background(start_method=start_method, daemon=daemon)
    def slow(x: int) -> int:
        if x >= 2:
            time.sleep(60)
        return x

    for x in slow.map(range(100), limit=2):
        if x == 1:
            break
    assert _all_end(timeout=20)


def test_map_timeout() -> None:
    """TimeoutError when a result is not there in time; the tasks are stopped."""

    @background
    def sleepy(x: int) -> int:
        time.sleep(60)
        return x

    with pytest.raises(TimeoutError):
        list(sleepy.map(range(3), timeout=0.3))
    assert _all_end(timeout=20)


def test_amap_and_astart() -> None:
    """The asyncio variants: ``async for`` over ``amap``, ``await fn.astart(x)``."""
    square = background(_square)

    async def main() -> Tuple[List[int], int]:
        results = [x async for x in square.amap(range(12), limit=3)]
        task = await square.astart(7)
        return results, await task

    results, single = asyncio.run(main())
    assert results == [x * x for x in range(12)]
    assert single == 49


def test_limit_options_are_checked() -> None:
    with pytest.raises(ValueError, match="limit"):
        background(limit=0)
    with pytest.raises(TypeError, match="limit"):
        background(limit="2")  # type: ignore[call-overload]
    with pytest.raises(ValueError):
        Limiter(0)
    assert repr(Limiter(3)) == "<bgtask.Limiter limit=3 running=0 pending=0>"


def test_the_end_of_the_program_frees_places_held_by_daemons(tmp_path: Path) -> None:
    """A non-daemon task pending behind a daemon that holds the only place still runs at exit,
    and a map left open does not hold the exit."""
    result = run_script(
        tmp_path,
        """
import pathlib, time
import bgtask

HERE = pathlib.Path(__file__).parent
shared = bgtask.Limiter(1)

@bgtask.background(daemon=True, limit=shared)
def logger():
    bgtask.ready()
    bgtask.stop_event().wait(600)

@bgtask.background(limit=shared)
def work():
    (HERE / "worked").write_text("worked")

@bgtask.background
def slow(x):
    if x:
        time.sleep(600)
    return x

if __name__ == "__main__":
    logger().wait_ready(60)
    work()
    results = slow.map([0, 1, 2], limit=2)
    assert next(results) == 0  # the tasks of 1 and 2 run, and nothing will read them
""",
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "worked").read_text() == "worked"


def test_join_of_a_function_waits_for_its_pending_tasks() -> None:
    """fn.join() returns once every task it started ended, the pending ones included."""

    @background(limit=1)
    def nap() -> None:
        time.sleep(0.05)

    tasks = [nap() for _ in range(3)]
    nap.join(RESULT_S)
    assert all(t.done() for t in tasks)


def test_a_cancelled_astart_stops_the_task_it_started() -> None:
    """Cancelling the coroutine awaiting astart(): the task that was being started is stopped."""

    @background
    def forever() -> None:
        time.sleep(600)

    async def main() -> None:
        starting = asyncio.ensure_future(forever.astart())
        await asyncio.sleep(0)
        starting.cancel()
        with pytest.raises(asyncio.CancelledError):
            await starting
        await asyncio.sleep(0.5)  # the thread finishes the start; the task is then stopped

    asyncio.run(main())
    assert _all_end(timeout=20)


def test_a_map_limit_below_the_functions_own_holds() -> None:
    """limit=4 on the function, map(limit=2): never more than two of the map's tasks at once."""
    events: Queue[Tuple[str, int]] = Queue()

    @background(limit=4)
    def work(events: Queue[Tuple[str, int]], i: int) -> int:
        events.put(("start", os.getpid()))
        time.sleep(0.05)
        events.put(("end", os.getpid()))
        return i

    assert list(work.map(itertools.repeat(events, 10), range(10), limit=2)) == list(range(10))
    log = [events.get(timeout=RESULT_S) for _ in range(20)]
    assert _max_overlap(log) <= 2


def _held_first(gate: str, i: int) -> int:
    """Item 0 waits for the gate file; the others return at once."""
    while i == 0 and not os.path.exists(gate):
        time.sleep(0.01)
    return i


@pytest.mark.parametrize("how", ["map", "amap"])
def test_a_map_waiting_for_its_oldest_item_does_not_spin(how: str, tmp_path: Path) -> None:
    """Ordered, with a limit below the function's own, while later items are done and the oldest
    runs: the main program sleeps in its wait (amap used to spin, a CPU at full load)."""
    gate = tmp_path / "gate"
    work = background(_held_first, limit=4)
    window_s = 1.5
    spent: List[float] = []

    def open_gate_later() -> None:
        started = time.process_time()
        time.sleep(window_s)  # the window measured, not an ordering: the map waits on the gate
        spent.append(time.process_time() - started)
        gate.touch()

    import threading

    opener = threading.Thread(target=open_gate_later)
    args = (itertools.repeat(str(gate), 3), range(3))
    opener.start()
    try:
        if how == "map":
            got = list(work.map(*args, limit=2))
        else:

            async def collect() -> List[int]:
                return [i async for i in work.amap(*args, limit=2)]

            got = asyncio.run(collect())
    finally:
        gate.touch()
        opener.join()
    assert got == [0, 1, 2]
    # CPU time of the whole main program over the window: a spinning wait takes most of it.
    assert spent[0] < window_s / 3, f"{spent[0]:.2f} s of CPU in {window_s} s of waiting"


@pytest.mark.parametrize("ordered", [True, False])
def test_an_error_reading_the_input_comes_after_the_results_before_it(ordered: bool) -> None:
    """As the builtin map: the items read before the input failed give their results first."""

    def items() -> Iterator[int]:
        yield 1
        yield 2
        raise OSError("the input broke")

    got: List[int] = []
    results = background(_square).map(items(), ordered=ordered)
    got.append(next(results))
    got.append(next(results))
    with pytest.raises(OSError, match="the input broke"):
        next(results)
    assert sorted(got) == [1, 4]

    async def amap_all() -> List[int]:
        results = background(_square).amap(items(), ordered=ordered)
        seen = [await results.__anext__(), await results.__anext__()]
        with pytest.raises(OSError, match="the input broke"):
            await results.__anext__()
        return seen

    assert sorted(asyncio.run(amap_all())) == [1, 4]


@pytest.mark.parametrize("ordered", [True, False])
def test_an_item_that_cannot_be_pickled_comes_in_its_turn(ordered: bool) -> None:
    """map and amap over an item that cannot be pickled: the results before it, then the
    SerializationError naming the item's index."""
    import threading

    items = [0, 1, 2, threading.Lock(), 4]
    results = background(_square).map(items, limit=4, ordered=ordered)
    got = [next(results) for _ in range(3)]
    with pytest.raises(bgtask.SerializationError, match="item 3"):
        next(results)
    assert sorted(got) == [0, 1, 4]

    async def amap_all() -> List[int]:
        results = background(_square).amap(items, limit=4, ordered=ordered)
        seen = [await results.__anext__() for _ in range(3)]
        with pytest.raises(bgtask.SerializationError, match="item 3"):
            await results.__anext__()
        return seen

    assert sorted(asyncio.run(amap_all())) == [0, 1, 4]


def test_map_needs_an_iterable() -> None:
    with pytest.raises(TypeError, match="at least one iterable"):
        background(_square).map()
    with pytest.raises(TypeError, match="at least one iterable"):
        background(_square).amap()


@pytest.mark.parametrize("signum", [9, 15])
def test_map_tasks_end_with_a_killed_main_program(
    tmp_path: Path, signum: int, start_method: Optional[str]
) -> None:
    """A map's tasks are not kept when the main program is killed (a daemon's end, not a
    non-daemon's): the running ones are stopped, as at a normal end."""
    from .helpers import Script, kill_quietly, pid_alive, script_env, wait_until

    script = Script(
        tmp_path,
        """
import os, time
import bgtask

@bgtask.background(start_method=os.environ.get("BGTASK_TEST_START_METHOD") or None)
def slow(i):
    print(f"task {os.getpid()}", flush=True)
    time.sleep(120)

if __name__ == "__main__":
    for _ in slow.map(range(4), limit=2):
        pass
""",
        env=dict(script_env(), BGTASK_TEST_START_METHOD=start_method or ""),
    )
    pids: List[int] = []
    try:
        pids = [int(script.expect("task ")) for _ in range(2)]
        os.kill(script.proc.pid, signum)
        script.wait(RESULT_S)
        assert wait_until(lambda: not any(pid_alive(pid) for pid in pids), timeout=30), (
            f"map tasks {pids} still running after their main program was killed"
        )
    finally:
        kill_quietly(pids)
        script.close()


def _square(x: int) -> int:
    return x * x


def test_a_maps_starts_share_one_thread(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each task's end frees a place for the next start, which the starts thread makes: it
    lingers between them (a thread per start cost a map about a tenth of its rate), and a fork
    or the program's end dismisses it at once."""
    from bgtask._monitor import loop, offload

    monkeypatch.setattr(offload, "LINGER_S", 30.0)  # longer than any wait below: only asking ends it
    seen: List[threading.Thread] = []  # kept: a thread's ident may be reused once it ended

    def note() -> None:
        seen.append(threading.current_thread())

    square = background(_square)
    results = []
    for value in square.map(range(60), limit=2):
        results.append(value)
        offload.starts.post(note)  # runs in the starts thread, after the start before it
    assert results == [x * x for x in range(60)]
    assert wait_until(lambda: len(seen) == 60, timeout=60), (
        len(seen),
        offload.starts.queue,
        offload.starts.thread,
    )
    assert len({id(thread) for thread in seen}) <= 3, len(
        {id(thread) for thread in seen}
    )  # one thread, unless the machine stalled 0.5 s
    # It lingers, and goes when a fork or the end of the program asks.
    assert offload.starts.thread is not None
    loop.stop_idle_thread()
    assert wait_until(lambda: offload.starts.thread is None, timeout=10)


def test_a_task_a_limiter_started_stops_gracefully(start_method: Optional[str], daemon: bool) -> None:
    """A pending task is started from bgtask's starts thread when a place frees: it is as any
    other (no signal mask or state of that thread's reaches it), and its graceful stop is
    honoured at once, not by the kill after its grace."""

    def wait_forever() -> None:
        bgtask.ready()
        threading.Event().wait()

    run = background(
        wait_forever, graceful=True, grace=60, daemon=daemon, limit=Limiter(1), start_method=start_method
    )
    first, second = run(), run()
    first.wait_ready(60)
    first.stop(timeout=60)
    second.wait_ready(60)  # started by the starts thread, once the first one's place freed
    second.stop(timeout=30)
    assert (first.exitcode, second.exitcode) == (-signal.SIGTERM, -signal.SIGTERM)
