"""A stream task's items on their way to the program that reads them, and their backpressure.

::

    task ──ITEM──> monitor: _item_sent() appends; over STREAM_HIGH bytes unread (while a loop
                   reads), the channel is no longer read: the task waits to send more
    program loop ──_take_item()──> the oldest item; down to STREAM_LOW, the channel is read again
    result(), join() ──_unthrottled()──> while the program waits for the end, all is read

A part of ``TaskCore`` (a mixin): it uses the task's condition, its process and its asyncio
waiters; the fields are set in ``TaskCore.__init__``.
"""

from __future__ import annotations

import contextlib
import threading
from typing import TYPE_CHECKING, Any, Callable, Deque, Iterator, List, Optional, Tuple

if TYPE_CHECKING:
    from .._monitor.process import TaskProcess

# A stream's items the program has not read yet: past this many bytes the task waits to send
# more (its channel is no longer read) until the program has read down to STREAM_LOW.
STREAM_HIGH = 8 * 1024 * 1024
STREAM_LOW = 2 * 1024 * 1024
# What _take_item() returns when no item is there.
NO_ITEM: Any = object()


class StreamState:
    """The items of a stream task not read yet, and whether its channel is read."""

    _condition: threading.Condition
    _process: Optional[TaskProcess]
    _watchers: List[Callable[[], None]]
    _items: Optional[Deque[Any]]  # None for a task that is not a stream
    _items_size: int
    _readers: int  # loops over the stream in progress: only they hold the task back
    _throttled: bool  # the channel is not read until the program reads items
    _end_waiters: int  # threads waiting for the end (result(), join()...): no throttle

    @contextlib.contextmanager
    def _unthrottled(self) -> Iterator[None]:
        """While the program waits for the end: what the stream sends is read, however much."""
        if self._items is None:
            yield
            return
        with self._condition:
            self._end_waiters += 1
            throttled, self._throttled = self._throttled, False
        if throttled and self._process is not None:
            self._process.resume()
        try:
            yield
        finally:
            with self._condition:
                self._end_waiters -= 1

    def _take_item(self) -> Tuple[Any, bool]:
        """Under the condition: the stream's next item as it came (``NO_ITEM`` if none), and
        whether its channel must be read again (call ``_monitor.process.resume()`` outside the lock)."""
        items = self._items
        if not items:
            return NO_ITEM, False
        body = items.popleft()
        self._items_size -= len(body)
        resume = self._throttled and self._items_size <= STREAM_LOW
        if resume:
            self._throttled = False
        return body, resume

    def _reading(self, delta: int) -> bool:
        """A loop over the stream starts (1) or ends (-1); whether its channel must be read again."""
        with self._condition:
            self._readers += delta
            resume = self._readers == 0 and self._throttled
            if resume:
                self._throttled = False
        return resume

    def _item_sent(self, body: Any) -> bool:
        """In the monitor: a stream's item arrived; ``True`` when the program should read first."""
        with self._condition:
            items = self._items
            if items is None:
                return False
            items.append(body)
            self._items_size += len(body)
            full = self._readers > 0 and not self._end_waiters and self._items_size >= STREAM_HIGH
            if full:
                self._throttled = True
            self._condition.notify_all()
            watchers, self._watchers = self._watchers, []
        for wake in watchers:
            wake()
        return full
