"""A queue for tasks on Ray: its items are held by one Ray actor, wherever its users run.

::

    main program, tasks on any node ──put/get/task_done/join/shutdown──> Holder (an async actor)
                                                                          items, counts, state

A queue made while the program's tasks go to Ray (after ``use_ray()``, or in a Ray task, or with
``Queue(backend="ray")``) is one of these; the kernel-based queue cannot cross machines. The Ray
backend fills in ``backend`` (this layer cannot import it): whether a new queue goes to Ray, and
how to make its actor on the program's connection.

- **Each item once.** A step that changes the queue (``put``, ``take``) is one call to the actor
  that never waits, made inside ``atomic()``: a stop or a Ctrl-C meanwhile comes once the call
  returned, never between the actor and the caller. A blocked ``put`` or ``get`` waits between
  steps, with a call that changes nothing (``wait_for_place``, ``wait_for_item``: ``SLICE_S`` at
  most each), after which a stop or a Ctrl-C is raised. Ray does not cancel a call whose
  caller died: such a wait then ends by itself, and takes nothing.
- **Nothing lost to a crash.** An item is the actor's once ``put`` returned; a producer that dies
  afterwards takes nothing with it. A consumer whose worker dies while a ``take``'s answer is on
  its way to it (about a millisecond) loses that item: it is not counted as done, and
  ``join()`` waits for it.
- **Large items** go as ``PickleBuffer``s beside their pickle, as a task's call does: Ray's
  object store carries them, and the receiver copies each once, so it gets a writable array.
- **Where, and how long.** The actor runs on the node of the process that made the queue (where
  Ray can), and is that process's: it ends when no ``Queue`` for it is left there, or with the
  connection. While a task that was given the queue runs, the process that started it keeps
  its ``Queue`` (a handle pickled into a call is not counted by Ray). A queue used once its
  connection to Ray ended raises ``ShutDown``.
"""

from __future__ import annotations

import collections
import importlib
import pickle
import sys
import time
from queue import Empty, Full
from typing import Any, Callable, Deque, List, Optional, Tuple

from .._shared import serialization as _serialization
from .._shared.buffers import Mapped
from .._shared.context import NothingYet, atomic
from .._shared.errors import BgTaskError, SerializationError, ShutDown
from .page import IMMEDIATE, OPEN, SHUT, STATE_NAMES

# The longest a blocked put or get waits beside the actor's queue per call before it looks
# again; a stop or a Ctrl-C waits for the end of the call, at most this long.
SLICE_S = 0.25
# The longest join() waits in the actor per call.
JOIN_WAIT_S = 1.0

# A put's or get's answer.
OK, FULL, EMPTY, CLOSED = range(4)

# An item as the actor holds it: its pickle, its large buffers, its type's name (for errors).
Item = Tuple[bytes, List[Any], str]


class Backend:
    """What the Ray backend tells this module: it fills in these fields as it is imported.

    This layer cannot import it (it is above), so ``load()`` imports it by name, as
    ``use_ray()`` or a task's ``backend="ray"`` would, when a queue asks for Ray first.
    """

    RAY_MODULES = ("bgtask._backends.ray", "bgtask._backends.ray_worker")

    def __init__(self) -> None:
        self.preferred: Callable[[], bool] = lambda: False  # a new queue goes to Ray
        self.holder: Optional[Callable[[int], Any]] = None  # maxsize -> a new Holder actor's handle
        self.session: Callable[[], Any] = lambda: None  # the Ray session this process is on

    def goes_to_ray(self, asked: Optional[str]) -> bool:
        """Whether a queue made with ``backend=asked`` goes to Ray. A program that never asked
        for Ray (``use_ray()``, a task on Ray) does not import the backend for that."""
        if asked is not None:
            return asked == "ray"
        if not any(name in sys.modules for name in self.RAY_MODULES):
            return False
        self.load()
        return self.preferred()

    def new_holder(self, maxsize: int) -> Any:
        self.load()
        assert self.holder is not None
        return self.holder(maxsize)

    def load(self) -> None:
        if self.holder is None:
            importlib.import_module(self.RAY_MODULES[0])


backend = Backend()


class Holder:
    """A queue's items, counts and state, in one async Ray actor.

    Its methods run one at a time on the actor's event loop and never wait once they changed
    something, so the state needs no lock. ``put`` and ``take`` never wait: a call that finds
    no place (no item) returns at once, and its caller waits with ``wait_for_place``
    (``wait_for_item``), which changes nothing. Ray does not cancel a call whose caller died:
    a waiting call that took an item would hand it to nobody.
    """

    def __init__(self, maxsize: int) -> None:
        self.maxsize = maxsize
        self.items: Deque[Item] = collections.deque()
        self.unfinished = 0  # put and not yet done
        self.state = OPEN
        self._items = _Waiters()  # calls waiting for an item (or the end)
        self._places = _Waiters()  # ... for a place (or the end)
        self._done = _Waiters()  # ... for every item to be done

    async def put(self, body: bytes, views: List[Any], name: str) -> int:
        if self.state != OPEN:
            return CLOSED
        if not self._has_place():
            return FULL
        # Ray hands them over as its own buffer type, which it cannot send on: as PickleBuffers,
        # it sends them out of band again.
        self.items.append((body, [pickle.PickleBuffer(view) for view in views], name))
        self.unfinished += 1
        self._items.wake_one()
        return OK

    async def take(self) -> Tuple[int, Optional[Item]]:
        if self.state == IMMEDIATE:
            return CLOSED, None
        if not self.items:
            return (CLOSED if self.state == SHUT else EMPTY), None
        item = self.items.popleft()
        self._places.wake_one()
        if self.items:
            self._items.wake_one()  # the next waiting caller: one it woke may have gone
        return OK, item

    async def wait_for_item(self, wait: float) -> None:
        await self._items.until(lambda: bool(self.items) or self.state != OPEN, wait)

    async def wait_for_place(self, wait: float) -> None:
        await self._places.until(lambda: self._has_place() or self.state != OPEN, wait)

    async def task_done(self) -> bool:
        """``False`` if every item was done already."""
        if self.unfinished <= 0:
            return False
        self.unfinished -= 1
        if not self.unfinished:
            self._done.wake_all()
        return True

    async def join(self, wait: float) -> bool:
        return await self._done.until(lambda: self.unfinished <= 0, wait)

    async def shutdown(self, immediate: bool) -> None:
        if immediate:
            self.unfinished = max(0, self.unfinished - len(self.items))  # dropped: done
            self.items.clear()
            self.state = IMMEDIATE
        elif self.state == OPEN:
            self.state = SHUT
        for waiters in (self._items, self._places, self._done):
            waiters.wake_all()

    async def sizes(self) -> Tuple[int, int, int]:
        """The items held, the items not yet done, the state."""
        return len(self.items), self.unfinished, self.state

    def _has_place(self) -> bool:
        return not self.maxsize or len(self.items) < self.maxsize


class _Waiters:
    """Calls of the actor's waiting for one thing; woken without waiting for a lock."""

    def __init__(self) -> None:
        self._futures: Deque[Any] = collections.deque()

    async def until(self, ready: Callable[[], bool], wait: float) -> bool:
        """Whether ``ready()``, waiting for it up to ``wait`` seconds."""
        import asyncio

        loop = asyncio.get_running_loop()
        deadline = loop.time() + wait
        while not ready():
            left = deadline - loop.time()
            if left <= 0:
                return False
            future = loop.create_future()
            self._futures.append(future)
            try:
                await asyncio.wait_for(future, left)
            except asyncio.TimeoutError:
                pass
            finally:
                if not future.done():
                    future.cancel()
                try:
                    self._futures.remove(future)  # a waiter that timed out leaves no trace
                except ValueError:
                    pass
        return True

    def wake_one(self) -> None:
        futures = self._futures
        while futures:
            future = futures.popleft()
            if not future.done():  # not one that timed out
                future.set_result(None)
                return

    def wake_all(self) -> None:
        futures, self._futures = self._futures, collections.deque()
        for future in futures:
            if not future.done():
                future.set_result(None)


class RayEndpoint:
    """This process's side of a queue on Ray: a handle to its actor, on the connection to Ray
    (the session) it was made or received on."""

    __slots__ = ("actor", "maxsize", "session")

    def __init__(self, actor: Any, maxsize: int) -> None:
        self.actor = actor
        self.maxsize = maxsize
        self.session = backend.session()

    @classmethod
    def create(cls, maxsize: int) -> RayEndpoint:
        return cls(backend.new_holder(maxsize), maxsize)

    def reduce(self) -> Tuple[Any, ...]:
        """While a call for a task on Ray is pickled: this queue's handle, kept alive here
        while the task runs. Anywhere else, ``TypeError``."""
        target = _serialization.pickling_for()
        if target != "ray":
            raise TypeError(
                "a bgtask.Queue made for tasks on Ray (after use_ray(), or with backend='ray') "
                + (
                    "cannot be given to a local task: make one with Queue(backend='local') for it"
                    if target == "local"
                    else "can be an argument of a task (or captured by its function), not a "
                    "result, a queue item or pickled otherwise"
                )
            )
        _serialization.keep_alive(self)
        return self.actor, self.maxsize

    # -- put and get ----------------------------------------------------------------------------
    #
    # Each step that changes the queue is one call made inside atomic(): a stop or a Ctrl-C
    # meanwhile comes once it returned, as the caller's next line starts. The waits between
    # steps change nothing: a stop or a Ctrl-C is raised as one ends.

    def put(self, item: Any, block: bool, timeout: Optional[float]) -> None:
        body, views, name = _encode(item)

        def step() -> None:
            code = self._call("put", body, views, name)
            if code == CLOSED:
                raise ShutDown("the queue was shut down")
            if code != OK:
                raise _Again  # a stop meanwhile is raised here: put() ends without the item

        self._until_done(step, "wait_for_place", block, timeout, Full)

    def get(self, block: bool, timeout: Optional[float]) -> Any:
        def step() -> Any:
            code, item = self._call("take")
            if code == CLOSED:
                raise ShutDown("the queue was shut down")
            if code != OK:
                raise _Again  # a stop meanwhile is raised here: get() ends, not waits
            return self._decode(item)  # taken and unpickled in one step: never lost between

        return self._until_done(step, "wait_for_item", block, timeout, Empty)

    def _until_done(
        self, step: Callable[[], Any], wait_for: str, block: bool, timeout: Optional[float], none: type
    ) -> Any:
        """``step()`` inside ``atomic()``, again after each wait while it finds nothing to do
        (``_Again``); ``none`` (``Full``, ``Empty``) once there is no time left."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            try:
                with atomic(to_caller=True):
                    return step()
            except _Again:
                pass
            if not block or _expired(deadline):
                raise none
            self._wait(wait_for, deadline)

    def _wait(self, method: str, deadline: Optional[float]) -> None:
        """Wait beside the actor's queue, ``SLICE_S`` at most. A stop or a Ctrl-C meanwhile is
        raised as the wait ends, here rather than inside Ray's own code."""
        with atomic():
            self._call(method, _slice(deadline))

    def _decode(self, item: Item) -> Any:
        body, views, name = item
        try:
            return _serialization.loads(Mapped(body, views) if views else body)
        except Exception as exc:  # unpickling runs the item's own code: any error may come out
            self._call("task_done")  # dropped: nobody will mark it done
            raise SerializationError(
                f"cannot get an item of type {name} from a bgtask.Queue in this process (the "
                f"item is dropped): unpickling it raised {type(exc).__name__}: {exc}"
            ) from exc

    # -- the rest -------------------------------------------------------------------------------

    def task_done(self) -> None:
        with atomic(to_caller=True):  # a stop meanwhile comes once it returned
            if not self._call("task_done"):
                raise ValueError("task_done() called more times than there were items")

    def join(self) -> None:
        while not self._call("join", JOIN_WAIT_S):
            pass

    def shutdown(self, immediate: bool) -> None:
        self._call("shutdown", immediate)

    def qsize(self) -> int:
        size, _unfinished, state = self._call("sizes")
        return 0 if state == IMMEDIATE else int(size)

    def unfinished(self) -> int:
        return int(self._call("sizes")[1])

    @property
    def is_shutdown(self) -> bool:
        return bool(self._call("sizes")[2] != OPEN)

    def state_name(self) -> str:
        return STATE_NAMES[self._call("sizes")[2]]

    def _call(self, method: str, *args: Any) -> Any:
        """One call to the actor, its answer, or ``ShutDown`` when the actor (or the connection
        to Ray it was reached on) is gone; any other failure of Ray's is a ``BgTaskError``."""
        ray: Any = sys.modules.get("ray")
        if ray is None or not ray.is_initialized() or backend.session() != self.session:
            # Not Ray's call: with no connection, Ray would start a cluster of its own.
            raise ShutDown("the queue is gone: the connection to Ray it was made on ended")
        try:
            ref = getattr(self.actor, method).remote(*args)
        except Exception as exc:
            raise BgTaskError(f"Ray did not take the queue's {method}(): {_first_line(exc)}") from exc
        try:
            return ray.get(ref)
        except ray.exceptions.RayActorError as exc:
            if _unavailable(ray, exc):
                raise BgTaskError(
                    "the queue's Ray actor cannot be reached for now (its node may be restarting); "
                    f"this {method}() may or may not have taken effect: {_first_line(exc)}"
                ) from exc
            raise ShutDown(f"the queue is gone: its Ray actor ended ({_first_line(exc)})") from exc
        except ray.exceptions.RayError as exc:
            raise BgTaskError(f"Ray failed the queue's {method}(): {_first_line(exc)}") from exc


def _unavailable(ray: Any, exc: BaseException) -> bool:
    """Whether Ray could not reach the actor for now (it may still be alive)."""
    unavailable = getattr(ray.exceptions, "ActorUnavailableError", None)
    return unavailable is not None and isinstance(exc, unavailable)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"


class _Again(NothingYet):
    """No item (or no place) in this call: look again, or give up."""


def _slice(deadline: Optional[float]) -> float:
    if deadline is None:
        return SLICE_S
    return max(0.0, min(SLICE_S, deadline - time.monotonic()))


def _expired(deadline: Optional[float]) -> bool:
    return deadline is not None and time.monotonic() >= deadline


def _encode(item: Any) -> Item:
    views: List[Any] = []
    try:
        body = _serialization.dumps_result(item, False, views)
    except Exception as exc:  # pickling raises TypeError, PicklingError, AttributeError...
        raise SerializationError(
            f"cannot put an item of type {_serialization.type_name(item)} in a bgtask.Queue: "
            f"{type(exc).__name__}: {exc}"
        ) from exc
    assert isinstance(body, bytes)
    return body, views, _serialization.type_name(item)


def rebuild(actor: Any, maxsize: int) -> RayEndpoint:
    """The endpoint of a queue on Ray that came with a call."""
    return RayEndpoint(actor, maxsize)


__all__ = ["Holder", "RayEndpoint", "backend", "rebuild", "SLICE_S"]
