"""Task as a concurrent.futures.Future: cancel, waiters, asyncio, callbacks, unpickling, names."""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import gc
import multiprocessing
import os
import threading
import time
import weakref
from pathlib import Path
from typing import Any, Dict, List, Optional, Set

import pytest

from bgtask import BgTaskError, Task, background

from .helpers import pid_alive, run_script, script_env, wait_until


class CallbackBoom(BaseException):
    """A BaseException that is neither an Exception, SystemExit nor KeyboardInterrupt."""


CALLBACK_ERRORS = {"SystemExit": "SystemExit(3)", "BaseException": "CallbackBoom()"}


def _forever_task(start_method: Optional[str], ready: Path) -> Task[None]:
    """Start a task that says it runs (``ready`` exists), then waits until it is stopped."""

    @background(start_method=start_method)
    def forever() -> None:
        ready.touch()
        threading.Event().wait()

    task = forever()
    assert wait_until(ready.exists)
    return task


def _slow_result_task(tmp_path: Path, *, hold_exit: bool) -> Task[str]:
    """Start a task whose result blocks while it is unpickled here, until ``gate`` exists.

    The unpickling touches ``unpickling`` first. ``hold_exit``: the task's process waits with
    its exit until that unpickling started, so that the process ends while it is under way.
    """
    unpickling, gate = tmp_path / "unpickling", tmp_path / "gate"

    def open_after_gate() -> str:
        unpickling.touch()
        deadline = time.monotonic() + 30  # bounded: a failing test must not hang
        while not gate.exists() and time.monotonic() < deadline:
            time.sleep(0.01)
        return "slow value"

    class SlowToUnpickle:
        def __reduce__(self) -> Any:
            return (open_after_gate, ())

    @background
    def slow() -> SlowToUnpickle:
        if hold_exit:
            import atexit

            def wait_for_unpickling() -> None:
                deadline = time.monotonic() + 30
                while not unpickling.exists() and time.monotonic() < deadline:
                    time.sleep(0.01)

            atexit.register(wait_for_unpickling)
        return SlowToUnpickle()

    return slow()


# A lambda travels by value: its tasks import nothing of this module.
ident = background(lambda x: x)


# -- done-callbacks that raise BaseException ----------------------------------------


@pytest.mark.parametrize("error", [SystemExit(3), CallbackBoom()], ids=["SystemExit", "BaseException"])
def test_raising_done_callback_does_not_stop_later_tasks(tmp_path: Path, error: BaseException) -> None:
    """A done-callback raising SystemExit or a bare BaseException leaves the monitor working."""
    go = tmp_path / "go"

    # Daemons: should the monitor die, the exit of this process must not wait for them forever.
    @background(daemon=True)
    def after_go() -> int:
        while not go.exists():
            time.sleep(0.01)
        return 1

    called, next_called = threading.Event(), threading.Event()

    def explode(_task: Any) -> None:
        called.set()
        raise error

    task = after_go()
    task.add_done_callback(explode)  # added while it runs: called in the callbacks thread
    task.add_done_callback(lambda _task: next_called.set())
    go.touch()
    assert called.wait(30)
    assert task.result(timeout=30) == 1
    later = [background(daemon=True)(lambda x: x)(i) for i in range(3)]
    assert [t.result(timeout=30) for t in later] == [0, 1, 2]
    assert next_called.wait(30), "the callback after the raising one did not run"


def _script_env_for_this_bgtask() -> Dict[str, str]:
    """The scripts' environment, with the bgtask package this process imported first on the path."""
    import bgtask

    env = script_env()
    home = str(Path(bgtask.__file__).parent.parent)
    env["PYTHONPATH"] = os.pathsep.join([home, env["PYTHONPATH"]])
    return env


@pytest.mark.parametrize("raised", list(CALLBACK_ERRORS.values()), ids=list(CALLBACK_ERRORS))
def test_raising_done_callback_does_not_hang_the_exit_of_a_script(tmp_path: Path, raised: str) -> None:
    """A script whose done-callback raised exits normally, after its non-daemon tasks ended."""
    result = run_script(
        tmp_path,
        f"""
import time
from pathlib import Path
from bgtask import background

HERE = Path(__file__).resolve().parent

class CallbackBoom(BaseException):
    pass

@background
def after_go(x):
    while not (HERE / "go").exists():
        time.sleep(0.01)
    (HERE / f"done-{{x}}").touch()
    return x

def explode(task):
    raise {raised}

first = after_go(1)
first.add_done_callback(explode)
(HERE / "go").touch()
print("first", first.result(30), flush=True)
# Not waited for here: the exit procedure waits for them, and one's callback raises meanwhile.
second, third = after_go(2), after_go(3)
second.add_done_callback(explode)
""",
        timeout=30,
        env=_script_env_for_this_bgtask(),
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["first", "1"]
    assert (tmp_path / "done-2").exists()
    assert (tmp_path / "done-3").exists()
    assert "done-callback" in result.stderr


# -- one result's slow unpickling delays no other task --------------------------------


def test_slow_unpickling_in_one_thread_does_not_delay_another_result(tmp_path: Path) -> None:
    """While one thread unpickles a task's result slowly, another task's result() returns."""
    slow = _slow_result_task(tmp_path, hold_exit=True)
    pid = slow.pid
    assert pid is not None
    values: List[str] = []
    reader = threading.Thread(target=lambda: values.append(slow.result(timeout=60)))
    reader.start()
    try:
        assert wait_until((tmp_path / "unpickling").exists)
        # The slow task's process ends while its result is being unpickled.
        assert wait_until(lambda: not pid_alive(pid))
        assert ident(42).result(timeout=10) == 42
        slow.join(10)  # its own exit is not held up by the unpickling either
        assert not slow.is_alive()
        assert slow.done()
    finally:
        (tmp_path / "gate").touch()
        reader.join(60)
    assert values == ["slow value"]


def test_slow_unpickling_does_not_delay_futures_of_other_tasks(tmp_path: Path) -> None:
    """concurrent.futures.wait sees another task done while one task's result is slow to unpickle."""
    slow = _slow_result_task(tmp_path, hold_exit=False)
    quick = ident(42)
    try:
        done, not_done = concurrent.futures.wait([slow.future, quick.future], timeout=10)
        assert not not_done
        assert quick.future in done
        assert quick.result(0) == 42
    finally:
        (tmp_path / "gate").touch()
    assert slow.result(timeout=60) == "slow value"
    slow.join(30)


# -- a finished task's timeout timer does not keep its handle alive --------------------


def test_finished_tasks_with_a_long_timeout_are_garbage_collected() -> None:
    """Dropped handles of finished tasks with timeout=600 are collected, long before the timer."""

    @background(timeout=600)
    def one() -> int:
        return 1

    def finished_ref() -> weakref.ref[Task[int]]:
        task = one()
        assert task.result(timeout=30) == 1
        task.join(30)
        assert not task.is_alive()
        return weakref.ref(task)

    refs = [finished_ref() for _ in range(3)]

    def all_collected() -> bool:
        gc.collect()
        return all(ref() is None for ref in refs)

    assert wait_until(all_collected, timeout=10)


def test_tasks_with_a_long_timeout_dropped_while_running_are_collected_at_their_end(tmp_path: Path) -> None:
    """Handles of timeout=600 tasks dropped while they ran are collected once the tasks ended."""
    go = tmp_path / "go"

    @background(timeout=600)
    def after_go() -> int:
        while not go.exists():
            time.sleep(0.01)
        return 1

    refs = [weakref.ref(after_go()) for _ in range(3)]
    gc.collect()
    assert all(ref() is not None for ref in refs)  # running tasks are kept, handle or not
    go.touch()

    def all_collected() -> bool:
        gc.collect()
        return all(ref() is None for ref in refs)

    assert wait_until(all_collected, timeout=10)


# -- stop() after the result ---------------------------------------------------------


def _done_samples_during_stop(task: Task[Any]) -> Set[bool]:
    """What ``task.done()`` said, sampled in a tight loop in another thread while ``stop()`` ran."""
    seen: Set[bool] = set()
    sampling, finished = threading.Event(), threading.Event()

    def sample() -> None:
        while not finished.is_set():
            seen.add(task.done())
            sampling.set()

    sampler = threading.Thread(target=sample)
    sampler.start()
    try:
        assert sampling.wait(30)
        task.stop(timeout=30)
    finally:
        finished.set()
        sampler.join(30)
    return seen


def test_stop_after_the_result_never_makes_done_false() -> None:
    """stop() after the result arrived leaves done() true throughout; the outcome stays returned."""

    @background(grace=0.5)
    def answer() -> int:
        import atexit

        atexit.register(threading.Event().wait)  # the process stays, exiting, after it reported
        return 42

    for _ in range(3):
        task = answer()
        assert task.result(timeout=30) == 42
        assert task.is_alive()
        seen = _done_samples_during_stop(task)
        assert seen == {True}
        assert not task.is_alive()
        assert task.result(0) == 42
        assert not task.cancelled()
        assert "finished: returned" in repr(task)


# -- an exception class that refuses attribute assignment ----------------------------


def test_frozen_dataclass_exception_comes_back_as_itself(start_method: Optional[str]) -> None:
    """A frozen dataclass exception is re-raised as itself with its traceback; wait() sees it done."""

    @dataclasses.dataclass(frozen=True)
    class Refused(Exception):
        code: int

        def __reduce__(self) -> Any:
            return (type(self), (self.code,))

    @background(start_method=start_method)
    def fail() -> None:
        raise Refused(7)

    task = fail()
    with pytest.raises(Refused) as info:
        task.result(timeout=60)
    assert info.value.code == 7
    cause = info.value.__cause__
    assert type(cause).__name__ == "RemoteTraceback"
    assert "raise Refused(7)" in str(cause)
    assert task.exception(0) is info.value
    done, not_done = concurrent.futures.wait([task], timeout=60)
    assert done == {task}
    assert not not_done


# -- Task is a concurrent.futures.Future ---------------------------------------------


def test_a_task_is_a_concurrent_future() -> None:
    """A Task is an instance of concurrent.futures.Future, and .future is the task itself."""
    task = ident(1)
    assert isinstance(task, concurrent.futures.Future)
    assert task.future is task
    assert task.result(timeout=30) == 1


def test_as_completed_and_wait_take_tasks() -> None:
    """concurrent.futures.as_completed and wait accept tasks as they are."""
    tasks = [ident(i) for i in range(4)]
    finished = sorted(t.result() for t in concurrent.futures.as_completed(tasks, timeout=60))
    assert finished == [0, 1, 2, 3]
    done, not_done = concurrent.futures.wait(tasks, timeout=60)
    assert done == set(tasks)
    assert not not_done


def test_wait_first_completed_leaves_a_running_task_pending(tmp_path: Path) -> None:
    """wait(FIRST_COMPLETED) returns the finished task and leaves the running one not done."""
    running = _forever_task(None, tmp_path / "ready")
    quick = ident(5)
    done, not_done = concurrent.futures.wait(
        [running, quick], timeout=60, return_when=concurrent.futures.FIRST_COMPLETED
    )
    assert done == {quick}
    assert not_done == {running}
    assert running.cancel()
    running.join(30)
    assert not running.is_alive()


def test_cancel_stops_a_running_task(start_method: Optional[str], tmp_path: Path) -> None:
    """cancel() on a running task returns True, result() raises CancelledError, the process ends."""
    task = _forever_task(start_method, tmp_path / "ready")
    pid = task.pid
    assert task.cancel() is True
    assert task.cancelled()
    assert task.done()
    assert not task.running()
    with pytest.raises(concurrent.futures.CancelledError):
        task.result(timeout=30)
    with pytest.raises(concurrent.futures.CancelledError):
        task.exception(timeout=30)
    task.join(30)
    assert not task.is_alive()
    assert task.exitcode is not None
    assert pid is not None
    assert not pid_alive(pid)
    assert task.cancel() is True  # cancelling again changes nothing
    assert "cancelled" in repr(task)


def test_cancel_after_the_result_returns_false(start_method: Optional[str]) -> None:
    """cancel() once the result is known returns False, and the result stays."""

    @background(start_method=start_method)
    def seven() -> int:
        return 7

    task = seven()
    assert task.result(timeout=60) == 7
    assert task.cancel() is False
    assert not task.cancelled()
    assert task.result(0) == 7
    task.join(30)
    assert task.cancel() is False
    assert task.result(0) == 7
    assert task.exitcode == 0


def test_running_is_true_until_the_outcome_is_known(tmp_path: Path) -> None:
    """running() is true from the call while the task runs, and false once it finished."""
    go = tmp_path / "go"

    @background
    def after_go() -> int:
        while not go.exists():
            time.sleep(0.01)
        return 1

    task = after_go()
    assert task.running()
    assert not task.done()
    go.touch()
    assert task.result(timeout=30) == 1
    assert not task.running()
    assert task.done()


def test_setting_a_result_or_exception_is_refused() -> None:
    """set_result and set_exception raise BgTaskError and change nothing."""
    task = ident(3)
    with pytest.raises(BgTaskError):
        task.set_result(4)
    with pytest.raises(BgTaskError):
        task.set_exception(ValueError("no"))
    assert task.result(timeout=30) == 3
    with pytest.raises(BgTaskError):
        task.set_result(4)
    assert task.result(0) == 3


def test_asyncio_wait_for_timeout_cancels_the_task(start_method: Optional[str], tmp_path: Path) -> None:
    """`await asyncio.wait_for(task, 0.1)` on a task that runs forever cancels it; its process ends."""
    task = _forever_task(start_method, tmp_path / "ready")

    async def main() -> None:
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(task, 0.1)

    asyncio.run(main())
    assert task.cancelled()
    with pytest.raises(concurrent.futures.CancelledError):
        task.result(0)
    task.join(30)
    assert not task.is_alive()


def test_cancelling_a_wrapped_future_stops_the_task(start_method: Optional[str], tmp_path: Path) -> None:
    """Cancelling asyncio.wrap_future(task) cancels the task; its process ends."""
    task = _forever_task(start_method, tmp_path / "ready")

    async def main() -> None:
        wrapped = asyncio.wrap_future(task)
        assert wrapped.cancel()
        with pytest.raises(asyncio.CancelledError):
            await wrapped

    asyncio.run(main())
    assert task.cancelled()
    task.join(30)
    assert not task.is_alive()


def test_await_after_cancel_raises_cancelled_error(start_method: Optional[str], tmp_path: Path) -> None:
    """`await task` on a cancelled task raises asyncio.CancelledError."""
    task = _forever_task(start_method, tmp_path / "ready")
    assert task.cancel()

    async def main() -> None:
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(main())
    task.join(30)
    assert not task.is_alive()


def test_cancel_while_awaited_raises_cancelled_error_in_the_awaiter(tmp_path: Path) -> None:
    """A task cancelled while a coroutine awaits it raises asyncio.CancelledError there."""
    task = _forever_task(None, tmp_path / "ready")

    async def wait_for_task() -> None:
        await task

    async def main() -> None:
        awaiting = asyncio.ensure_future(wait_for_task())
        await asyncio.sleep(0)  # one turn of the loop: the coroutine now awaits the task
        assert task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await awaiting

    asyncio.run(main())
    task.join(30)
    assert not task.is_alive()


# -- the task's process name ---------------------------------------------------------


def test_process_name_in_the_task_is_the_task_name(start_method: Optional[str]) -> None:
    """multiprocessing.current_process().name in a task is its name: given, or the qualified name."""

    def current_name() -> str:
        return multiprocessing.current_process().name

    named = background(name="custom-name", start_method=start_method)(current_name)()
    unnamed = background(start_method=start_method)(current_name)()
    assert named.result(timeout=60) == "custom-name"
    assert unnamed.result(timeout=60) == unnamed.name
    assert unnamed.name.endswith("current_name")
