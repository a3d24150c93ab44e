"""bgtask.Queue against a model: random sequences of puts, gets and shutdowns, here and in tasks.

A hypothesis ``RuleBasedStateMachine`` drives one queue (bounded or not) from the main program
and from tasks that put or get a few items each, one step at a time, and checks every answer
against a plain deque with the stdlib's rules: FIFO, ``Full`` and ``Empty`` where
``queue.Queue`` raises them, ``ShutDown`` after ``shutdown()``, the drain after a shutdown, and
``qsize()`` after every step.
"""

from __future__ import annotations

import collections
import gc
import os
import queue
from typing import Any, Deque, List, Tuple

import pytest

pytest.importorskip("hypothesis")

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

from bgtask import Queue, ShutDown, background

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
