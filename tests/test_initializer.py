"""Initializers: code that runs in the task before its function (per function, per program)."""

from __future__ import annotations

import os
from typing import Iterator, List, Optional

import pytest

import bgtask
from bgtask import background

STEPS: List[str] = []


def _step(name: str) -> None:
    STEPS.append(name)
    os.environ["BGTASK_TEST_STEPS"] = ",".join(STEPS)


def _steps_seen() -> str:
    return os.environ.get("BGTASK_TEST_STEPS", "")


def _count_up(n: int) -> Iterator[str]:
    for _ in range(n):
        yield _steps_seen()


def _fails_to_set_up() -> None:
    raise RuntimeError("no database")


@pytest.fixture
def program_initializer() -> Iterator[None]:
    bgtask.set_initializer(_step, ("program",))
    yield
    bgtask.set_initializer(None)


def test_an_initializer_runs_in_the_task_before_the_function(
    start_method: Optional[str], daemon: bool
) -> None:
    """@background(initializer=, initargs=) runs in the task, before the function, every call."""
    fn = background(
        _steps_seen, daemon=daemon, start_method=start_method, initializer=_step, initargs=("one",)
    )
    assert fn().result(timeout=60) == "one"
    assert fn().result(timeout=60) == "one"  # a fresh process each time
    assert "BGTASK_TEST_STEPS" not in os.environ  # never in the main program


def test_the_programs_initializer_runs_first(start_method: Optional[str], program_initializer: None) -> None:
    """set_initializer() runs in every task, before the function's own initializer."""
    plain = background(_steps_seen, start_method=start_method)
    own = background(_steps_seen, start_method=start_method, initializer=_step, initargs=("own",))
    assert plain().result(timeout=60) == "program"
    assert own().result(timeout=60) == "program,own"


def test_set_initializer_none_removes_it(program_initializer: None) -> None:
    """After set_initializer(None), tasks start without it."""
    bgtask.set_initializer(None)
    assert background(_steps_seen)().result(timeout=60) == ""


def test_an_initializers_error_is_the_tasks_outcome(start_method: Optional[str]) -> None:
    """What an initializer raises comes back as the task's exception, with its traceback."""
    task = background(_steps_seen, start_method=start_method, initializer=_fails_to_set_up)()
    with pytest.raises(RuntimeError, match="no database") as info:
        task.result(timeout=60)
    assert "_fails_to_set_up" in str(info.value.__cause__)


def test_a_stream_task_runs_its_initializer_first() -> None:
    """A generator task's initializer runs before its first item."""
    stream = background(_count_up, initializer=_step, initargs=("s",))(2)
    assert list(stream) == ["s", "s"]


def test_an_initializer_must_be_callable() -> None:
    """A non-callable initializer or initargs that are not a sequence fail at decoration."""
    with pytest.raises(TypeError, match="initializer"):
        background(initializer=42)(_steps_seen)  # type: ignore[call-overload]
    with pytest.raises(TypeError, match="initargs"):
        background(initializer=_step, initargs="abc")(_steps_seen)
    with pytest.raises(TypeError, match="initializer"):
        bgtask.set_initializer("nope")  # type: ignore[arg-type]


def test_initargs_that_cannot_be_pickled_are_named_at_the_call() -> None:
    """Initargs that cannot be pickled fail at the call, naming the initializers."""
    import threading

    fn = background(_steps_seen, initializer=_step, initargs=(threading.Lock(),))
    with pytest.raises(bgtask.SerializationError, match="initializers of '_steps_seen'"):
        fn()
