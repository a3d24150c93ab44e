"""Results and errors coming back: values, exceptions, crashes, pickling failures, big data."""

from __future__ import annotations

import asyncio
import concurrent.futures
import os
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

import pytest

from bgtask import (
    BgTaskError,
    SerializationError,
    TaskCrashed,
    TaskError,
    background,
)


def test_every_kind_of_function_runs(start_method: Optional[str], kind: Dict[str, bool]) -> None:
    """Plain, nested, closure and lambda functions all run, for every start method and kind."""
    factor = 3

    def nested(x: int) -> int:
        return x * factor

    run = background(start_method=start_method, **kind)
    tasks = [run(nested)(2), run(lambda: factor + 1)(), run(divmod)(7, 2)]
    assert [t.result(timeout=60) for t in tasks] == [6, 4, (3, 1)]


def test_exception_comes_back_as_itself_with_the_remote_traceback(
    start_method: Optional[str], kind: Dict[str, bool]
) -> None:
    """The task's own exception type is re-raised, the child traceback chained as cause."""

    @background(start_method=start_method, **kind)
    def fail(value: int) -> None:
        raise KeyError(value)

    task = fail(42)
    with pytest.raises(KeyError) as info:
        task.result(timeout=60)
    assert info.value.args == (42,)
    cause = info.value.__cause__
    assert type(cause).__name__ == "RemoteTraceback"
    assert "in fail" in str(cause)
    assert "raise KeyError(value)" in str(cause)
    assert "bgtask/_runtime/" not in str(cause)
    assert isinstance(task.exception(0), KeyError)


def test_os_exit_is_a_crash_with_its_exit_code(start_method: Optional[str], kind: Dict[str, bool]) -> None:
    """os._exit(3) gives exitcode 3 and TaskCrashed saying so."""

    @background(start_method=start_method, **kind)
    def leave() -> None:
        os._exit(3)

    task = leave()
    with pytest.raises(TaskCrashed, match="exited with code 3") as info:
        task.result(timeout=60)
    assert info.value.exitcode == 3
    assert info.value.signal is None
    task.join(30)
    assert task.exitcode == 3


def test_self_sigkill_is_a_crash_naming_the_signal(
    start_method: Optional[str], kind: Dict[str, bool]
) -> None:
    """A task killed by SIGKILL has exitcode -9; the error names SIGKILL and the OOM killer."""

    @background(start_method=start_method, **kind)
    def die() -> None:
        os.kill(os.getpid(), signal.SIGKILL)

    task = die()
    with pytest.raises(TaskCrashed, match=r"SIGKILL.*out-of-memory") as info:
        task.result(timeout=60)
    assert info.value.exitcode == -signal.SIGKILL
    assert info.value.signal == signal.SIGKILL
    assert task.exitcode == -signal.SIGKILL


def test_sys_exit_is_a_crash_saying_so(start_method: Optional[str], kind: Dict[str, bool]) -> None:
    """sys.exit(7) in a task gives exitcode 7 and TaskCrashed naming sys.exit."""

    @background(start_method=start_method, **kind)
    def leave() -> None:
        sys.exit(7)

    task = leave()
    with pytest.raises(TaskCrashed, match=r"sys\.exit\(7\)"):
        task.result(timeout=60)
    assert task.exitcode == 7


@pytest.mark.parametrize("code", [0, None])
def test_sys_exit_0_is_a_normal_end(start_method: Optional[str], kind: Dict[str, bool], code: Any) -> None:
    """sys.exit(0) and sys.exit() in a task end it normally: result() is None, exitcode 0."""

    @background(start_method=start_method, **kind)
    def leave() -> None:
        sys.exit(code)

    task = leave()
    assert task.result(timeout=60) is None
    assert task.join(timeout=60) is None
    assert task.exitcode == 0


def test_keyboard_interrupt_in_a_task_does_not_reach_the_caller(
    start_method: Optional[str], kind: Dict[str, bool]
) -> None:
    """An escaping KeyboardInterrupt becomes TaskCrashed, never a KeyboardInterrupt here."""

    @background(start_method=start_method, **kind)
    def interrupt() -> None:
        raise KeyboardInterrupt

    task = interrupt()
    with pytest.raises(TaskCrashed, match="KeyboardInterrupt"):
        task.result(timeout=60)
    assert task.exitcode == 1


def test_unpicklable_argument_fails_at_the_call_naming_it() -> None:
    """A lock as argument fails at the call, before any process starts, naming it."""

    @background
    def use(a: Any, *, lock: Any = None) -> None:
        pass

    with pytest.raises(SerializationError, match=r"keyword argument 'lock' \(a _thread\.lock\)"):
        use(1, lock=threading.Lock())
    with pytest.raises(SerializationError, match="positional argument 0"):
        use(threading.Lock())


def test_unpicklable_captured_variable_is_named() -> None:
    """A closure capturing a lock fails at the call, naming the captured variable."""
    guard = threading.Lock()

    @background
    def use() -> None:
        with guard:
            pass

    with pytest.raises(SerializationError, match="variable 'guard' captured by"):
        use()


def test_unpicklable_result_is_a_clear_error(start_method: Optional[str], kind: Dict[str, bool]) -> None:
    """A returned lock raises SerializationError naming its type; the process exits normally."""

    @background(start_method=start_method, **kind)
    def give_lock() -> Any:
        return threading.Lock()

    task = give_lock()
    with pytest.raises(SerializationError, match=r"_thread\.lock"):
        task.result(timeout=60)
    task.join(30)
    assert task.exitcode == 0


class NeedsArgs(Exception):
    def __init__(self, a: int, b: int) -> None:
        super().__init__(f"{a}-{b}")


def test_exception_that_cannot_be_unpickled_becomes_a_task_error() -> None:
    """An exception whose __init__ needs arguments comes back as TaskError with its text."""

    @background
    def fail() -> None:
        raise NeedsArgs(1, 2)

    with pytest.raises(TaskError) as info:
        fail().result(timeout=60)
    assert info.value.type_name.endswith("NeedsArgs")
    assert info.value.message == "1-2"
    assert "raise NeedsArgs(1, 2)" in info.value.remote_traceback


def test_exception_that_cannot_be_pickled_becomes_a_task_error() -> None:
    """An exception holding a lock comes back as TaskError, without hanging."""

    @background
    def fail() -> None:
        error = RuntimeError("holds a lock")
        error.lock = threading.Lock()  # type: ignore[attr-defined]
        raise error

    with pytest.raises(TaskError, match="RuntimeError: holds a lock"):
        fail().result(timeout=60)


def test_missing_module_in_the_task_is_reported() -> None:
    """A function that cannot be unpickled in the task raises BgTaskError with the ImportError."""
    import types

    module = types.ModuleType("bgtask_test_ghost_module")
    exec("def ghost():\n    return 1\n", module.__dict__)
    sys.modules["bgtask_test_ghost_module"] = module  # pickled by reference, absent in the task
    try:
        task = background(module.ghost)()
        with pytest.raises(BgTaskError, match="could not unpickle its function") as info:
            task.result(timeout=60)
        assert isinstance(info.value.__cause__, ImportError)
    finally:
        del sys.modules["bgtask_test_ghost_module"]


def test_64_mib_result_does_not_deadlock(start_method: Optional[str]) -> None:
    """A 64 MiB result comes back whole, and join() before result() does not deadlock."""

    @background(start_method=start_method)
    def big() -> bytes:
        return b"x" * (64 * 1024 * 1024)

    task = big()
    task.join(timeout=120)
    assert not task.is_alive()
    value = task.result(0)
    assert len(value) == 64 * 1024 * 1024
    assert value[:1] == b"x"


def test_large_argument_arrives_whole() -> None:
    """A 32 MiB argument reaches the task intact."""

    @background
    def size(data: bytes) -> int:
        return len(data)

    assert size(b"y" * (32 * 1024 * 1024)).result(timeout=120) == 32 * 1024 * 1024


def test_large_pieces_of_a_call_arrive_in_order(start_method: Optional[str]) -> None:
    """Large bytes travel uncopied beside the rest of the pickle: every piece, in its place.

    A bytearray is copied at the call, so changing it afterwards does not reach the task.
    """
    import hashlib

    first = bytes(range(256)) * 4096  # 1 MiB
    second = b"z" * (3 * 1024 * 1024 + 7)
    mutable = bytearray(b"m" * (2 * 1024 * 1024))
    small = "between"

    @background(start_method=start_method)
    def digest(a: bytes, b: str, c: bytearray, *, d: bytes) -> str:
        return hashlib.sha256(a + b.encode() + bytes(c) + d + a).hexdigest()

    task = digest(first, small, mutable, d=second)
    expected = hashlib.sha256(first + small.encode() + bytes(mutable) + second + first).hexdigest()
    mutable[:] = b"changed"
    assert task.result(timeout=120) == expected


def test_a_pending_call_keeps_its_large_arguments_as_they_were_at_the_call() -> None:
    """A call waiting for a place holds its pickle: a bytearray changed meanwhile is not seen."""
    import bgtask

    places = bgtask.Limiter(1)

    @background(limit=places)
    def hold() -> None:
        bgtask.stop_event().wait(60)

    @background(limit=places)
    def echo(data: bytearray) -> bytes:
        return bytes(data)

    holder = hold()
    data = bytearray(b"a" * (1024 * 1024))
    task = echo(data)
    assert task.pid is None  # pending: its pickle waits in this process
    data[:] = b"b" * (1024 * 1024)
    holder.stop()
    assert task.result(timeout=60) == b"a" * (1024 * 1024)


def test_result_timeout_is_the_builtin_timeout_error() -> None:
    """result(timeout) raises TimeoutError while the task runs."""

    @background
    def wait_forever() -> None:
        threading.Event().wait()

    task = wait_forever()
    with pytest.raises(TimeoutError):
        task.result(timeout=0.05)
    task.kill()
    task.join(30)


def test_coroutine_functions_run_under_asyncio() -> None:
    """An async function's result is its awaited value."""

    @background
    async def compute() -> int:
        await asyncio.sleep(0)
        return 7

    assert compute().result(timeout=60) == 7


def test_await_a_task() -> None:
    """`await task` gives the result inside asyncio."""

    @background
    def square(x: int) -> int:
        return x * x

    async def main() -> int:
        return await square(9)

    assert asyncio.run(main()) == 81


def test_cancelling_the_awaiting_coroutine_stops_the_task() -> None:
    """asyncio cancellation (wait_for timeout) stops the task's process."""

    @background
    def wait_forever() -> None:
        threading.Event().wait()

    task = wait_forever()

    async def main() -> None:
        await asyncio.wait_for(task, timeout=0.2)

    with pytest.raises(asyncio.TimeoutError):
        asyncio.run(main())
    task.join(timeout=30)
    assert task.exitcode == -signal.SIGKILL


def test_future_view_works_with_concurrent_futures() -> None:
    """`task.future` works with concurrent.futures.wait and as_completed."""

    @background
    def ident(x: int) -> int:
        return x

    tasks = [ident(i) for i in range(5)]
    done, _ = concurrent.futures.wait([t.future for t in tasks], timeout=60)
    assert len(done) == 5
    results = sorted(f.result() for f in concurrent.futures.as_completed([t.future for t in tasks]))
    assert results == list(range(5))


def test_done_callbacks_get_the_task() -> None:
    """add_done_callback calls back with the task, also when added after it finished."""
    seen = []
    finished = threading.Event()

    @background
    def one() -> int:
        return 1

    task = one()
    task.add_done_callback(lambda t: (seen.append(t.result(0)), finished.set()))
    assert finished.wait(60)
    task.add_done_callback(seen.append)
    assert seen == [1, task]


def test_task_sees_environment_and_cwd_of_its_call(tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each task sees os.environ and the working directory as they were at its call."""

    @background
    def look() -> Any:
        return os.environ.get("BGTASK_TEST_VALUE"), os.getcwd()

    monkeypatch.setenv("BGTASK_TEST_VALUE", "first")
    assert look().result(timeout=60) == ("first", os.getcwd())
    monkeypatch.setenv("BGTASK_TEST_VALUE", "second")
    monkeypatch.chdir(tmp_path)
    assert look().result(timeout=60) == ("second", str(tmp_path))
    monkeypatch.delenv("BGTASK_TEST_VALUE")
    assert look().result(timeout=60) == (None, str(tmp_path))


def test_preloaded_module_is_imported_before_the_task(tmp_path: Any) -> None:
    """bgtask.preload() imports a module in the zygote: a task finds it already imported."""
    import bgtask

    module = tmp_path / "bgtask_preload_probe.py"
    module.write_text("import time\nLOADED_AT = time.time()\n")
    sys.path.insert(0, str(tmp_path))
    try:

        @background
        def probe() -> Any:
            import time

            before = "bgtask_preload_probe" in sys.modules
            import bgtask_preload_probe  # type: ignore[import-not-found]

            return before, time.time() > bgtask_preload_probe.LOADED_AT

        assert probe().result(timeout=60)[0] is False
        bgtask.preload("bgtask_preload_probe")
        assert probe().result(timeout=60) == (True, True)
    finally:
        sys.path.remove(str(tmp_path))
        from bgtask._backends import launch as _launch

        _launch.get(None).preload.remove("bgtask_preload_probe")  # later zygotes: as before


def test_preload_reports_a_failed_import(tmp_path: Any) -> None:
    """A module that cannot be preloaded is reported on stderr; tasks still run."""
    from .helpers import run_script

    result = run_script(
        tmp_path,
        """
import bgtask
bgtask.preload("no_such_module_for_bgtask")
print(bgtask.background(lambda: 3)().result(30))
""",
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "3"
    assert "could not preload 'no_such_module_for_bgtask'" in result.stderr


def test_sys_path_changed_after_the_zygote_started(tmp_path: Any) -> None:
    """A directory added to sys.path after the first task is on the next task's sys.path."""

    @background
    def use_module() -> int:
        import bgtask_late_module  # type: ignore[import-not-found]

        return int(bgtask_late_module.VALUE)

    assert background(lambda: 1)().result(timeout=60) == 1  # the zygote is running now
    (tmp_path / "bgtask_late_module.py").write_text("VALUE = 42\n")
    sys.path.append(str(tmp_path))
    try:
        assert use_module().result(timeout=60) == 42
    finally:
        sys.path.remove(str(tmp_path))


def test_a_done_callback_may_wait_for_another_task(tmp_path: Any) -> None:
    """A done-callback runs outside the monitor thread: it may wait for another task's end."""
    seen: List[Any] = []
    called = threading.Event()

    @background
    def after(path: Path) -> int:
        while not path.exists():
            time.sleep(0.01)
        return 2

    go_first, go_other = tmp_path / "first", tmp_path / "other"
    other = after(go_other)

    def wait_for_other(_task: Any) -> None:
        go_other.touch()
        seen.append(other.result(timeout=30))  # bounded: a failure of this test must not hang
        called.set()

    task = after(go_first)
    task.add_done_callback(wait_for_other)
    go_first.touch()
    assert called.wait(60)
    assert seen == [2]


def _leaves_a_thread(path: str) -> int:
    import threading as _threading

    def work() -> None:
        _threading.Event().wait(120)
        Path(path).touch()  # never: the task's process ends before

    _threading.Thread(target=work, daemon=False).start()
    return 7


def test_a_task_ends_with_its_function_whatever_threads_it_left(
    start_method: Optional[str], daemon: bool, tmp_path: Path
) -> None:
    """A non-daemon thread the function left behind ends with the task, on every start method."""
    never = tmp_path / "never"
    task = background(_leaves_a_thread, daemon=daemon, start_method=start_method)(str(never))
    assert task.result(timeout=60) == 7
    assert task.join(timeout=60) is None
    assert task.exitcode == 0
    assert not never.exists()
