"""The public face of a queue: ``Queue``, ``ShutDown``, iteration, and how a queue travels.

A queue travels only in a call (an argument, or captured by the function): its descriptors go
with the call (``_serialization.send_along``), and ``_rebuild`` takes them on in the task.
Everything else is the endpoint's, this process's side of the queue.
"""

from __future__ import annotations

from typing import Any, Generic, Iterator, Optional, Tuple, TypeVar, Union

from .._shared import serialization as _serialization
from .._shared.errors import ShutDown
from . import on_ray
from .endpoint import Endpoint
from .on_ray import RayEndpoint
from .places import MAXSIZE_LIMIT

__all__ = ["Queue", "ShutDown"]

T = TypeVar("T")


class Queue(Generic[T]):
    """A FIFO queue the main program and its tasks share, to pass items either way.

    Create it in the main program (or in a task) and give it to tasks as an argument, or let
    their function capture it; tasks may pass it on to tasks of their own. Any process may put
    and get. Each item is delivered once; the items one producer puts come out in its order.
    With ``maxsize`` > 0, ``put`` waits while the queue holds that many items (at most 65,536).

    ``shutdown()`` ends the queue: ``put`` raises ``ShutDown`` from then on, ``get`` returns what
    is left and then raises ``ShutDown`` (at once with ``immediate=True``). Iterating a queue
    yields its items until it is shut down and empty. In a task whose main program died, a
    blocked ``put`` or ``get`` raises ``ShutDown``.

    Items are pickled (the stdlib pickler for plain data, cloudpickle otherwise). An item
    cannot hold a descriptor (a socket, a connection, another queue): those travel as task
    arguments only. ``put`` raises ``SerializationError`` for an item that cannot be pickled,
    and ``get`` for one that cannot be unpickled in its process (that item is dropped).

    ``backend``: where the tasks that use the queue run. By default, on Ray once the program
    called ``use_ray()`` (and in a task on Ray), locally otherwise. A queue for tasks on Ray is
    held by a Ray actor, which any node of the cluster reaches; a local queue's items travel
    through the kernel, and a task on Ray cannot be given one (nor a local task a Ray one).
    """

    __module__ = "bgtask"
    __slots__ = ("__weakref__", "_end")

    def __init__(self, maxsize: int = 0, *, backend: Optional[str] = None) -> None:
        if isinstance(maxsize, bool) or not isinstance(maxsize, int):
            raise TypeError(f"Queue(): maxsize must be an int, not {type(maxsize).__name__}")
        if maxsize > MAXSIZE_LIMIT:
            raise ValueError(f"Queue(): maxsize must be at most {MAXSIZE_LIMIT}, not {maxsize}")
        if backend not in (None, "local", "ray"):
            raise ValueError(f"Queue(): backend must be None, 'local' or 'ray', not {backend!r}")
        if on_ray.backend.goes_to_ray(backend):
            self._end: Union[Endpoint, RayEndpoint] = RayEndpoint.create(max(maxsize, 0))
        else:
            self._end = Endpoint.create(max(maxsize, 0))

    @property
    def maxsize(self) -> int:
        """The most items the queue holds; 0 if there is no bound."""
        return self._end.maxsize

    def put(self, item: T, block: bool = True, timeout: Optional[float] = None) -> None:
        """Put ``item`` in the queue; with ``maxsize``, wait for a free place as ``queue.Queue`` does.

        Raises ``queue.Full`` when there is none (``block=False``, or after ``timeout``),
        ``ShutDown`` once the queue is shut down, and ``SerializationError`` (nothing is put)
        for an item that cannot be pickled.
        """
        self._end.put(item, block, _check_timeout(timeout))

    def put_nowait(self, item: T) -> None:
        """``put(item, block=False)``."""
        self._end.put(item, False, None)

    def get(self, block: bool = True, timeout: Optional[float] = None) -> T:
        """Remove and return an item, waiting for one as ``queue.Queue`` does.

        Raises ``queue.Empty`` when there is none (``block=False``, or after ``timeout``),
        ``ShutDown`` once the queue is shut down and empty, and ``SerializationError`` for an
        item that cannot be unpickled here: that item is dropped (and counts as done for
        ``join()``), the next ``get`` returns the next one. Raises ``OSError`` (``EMFILE``) when
        the next item travels in a memory file (it is larger than 32 KiB) and this process has
        no descriptor free for it: the item stays in the queue.
        """
        item: T = self._end.get(block, _check_timeout(timeout))
        return item

    def get_nowait(self) -> T:
        """``get(block=False)``."""
        item: T = self._end.get(False, None)
        return item

    def qsize(self) -> int:
        """The number of items in the queue: put and not yet got, by every process."""
        return self._end.qsize()

    def empty(self) -> bool:
        """Whether ``qsize()`` is 0 (approximate, as for ``queue.Queue``)."""
        return self.qsize() == 0

    def full(self) -> bool:
        """Whether ``qsize()`` reached ``maxsize`` (never, without a bound)."""
        return 0 < self.maxsize <= self.qsize()

    @property
    def is_shutdown(self) -> bool:
        """Whether ``shutdown()`` was called, in any process."""
        return self._end.is_shutdown

    def task_done(self) -> None:
        """Say that an item got from the queue was dealt with (for ``join()``), in any process.

        Raises ``ValueError`` if called more times than there were items put.
        """
        self._end.task_done()

    def join(self) -> None:
        """Wait until every item put, by every process, was got and marked ``task_done()``.

        ``shutdown(immediate=True)`` counts the items it dropped as done. In a task whose main
        program died, raises ``ShutDown``.
        """
        self._end.join()

    @property
    def unfinished_tasks(self) -> int:
        """Items put and not yet marked ``task_done()``, over every process."""
        return self._end.unfinished()

    def shutdown(self, immediate: bool = False) -> None:
        """End the queue for every process: puts raise ``ShutDown``, gets drain then raise it.

        With ``immediate``, the items left are dropped and gets raise at once. Every blocked
        call wakes up.
        """
        self._end.shutdown(immediate)

    def __iter__(self) -> Iterator[T]:
        """The items, as ``get()`` returns them, until the queue is shut down and empty."""
        while True:
            try:
                item: T = self._end.get(True, None)
            except ShutDown:
                return
            yield item

    def __reduce__(self) -> Any:
        end = self._end
        if isinstance(end, RayEndpoint):
            return _rebuild_on_ray, end.reduce()
        return _rebuild, (end.qid, end.maxsize, end.descriptors())

    def __repr__(self) -> str:
        bound = f" maxsize={self.maxsize}" if self.maxsize else ""
        return f"<bgtask.Queue{bound} qsize={self.qsize()} state={self._end.state_name()}>"


def _check_timeout(timeout: Optional[float]) -> Optional[float]:
    if timeout is not None and timeout < 0:
        raise ValueError("'timeout' must be a non-negative number")
    return timeout


def _rebuild(qid: bytes, maxsize: int, indexes: Tuple[int, ...]) -> Queue[Any]:
    """A queue that came with a call, in the process the call runs in."""
    fds = [_serialization.received(i) for i in indexes]
    queue: Queue[Any] = Queue.__new__(Queue)
    queue._end = Endpoint.received(qid, maxsize, fds)
    return queue


def _rebuild_on_ray(actor: Any, maxsize: int) -> Queue[Any]:
    """A queue on Ray that came with a call, on the Ray worker the call runs on."""
    queue: Queue[Any] = Queue.__new__(Queue)
    queue._end = on_ray.rebuild(actor, maxsize)
    return queue


# Pickles name them there, whichever module defines them.
_rebuild.__module__ = _rebuild_on_ray.__module__ = "bgtask._queue"
