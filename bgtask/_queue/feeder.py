"""Where the items go that a queue's socket has no room for.

::

    put --> socket full? --no--> [ socket ]
                 | yes                ^
                 |   in the main program: the backlog -- feeder thread --+  (as room frees)
                 +-> in a task: its main program's backlog (a QUEUED message; adopt())

- In the main program (and in any process that made the queue itself), they wait in the
  queue's backlog; one feeder thread per process sends every backlog on as room frees, and
  runs only while a backlog exists.
- In a task that got the queue with its call, a put first waits a little for room
  (``ROOM_WAIT_S``). Failing that, the item goes to the task's main program at once, so that it
  survives the task's crash, and so does every item the task puts from then on, so that its
  items keep their order.
- Until they are in the socket, such items count as *unsent* in the process that holds them
  (see ``page``): a shutdown waits for them, and they are lost (no longer counted) with the
  process that holds them.
"""

from __future__ import annotations

import collections
import os
import pickle
import threading
import time
import weakref
from typing import Callable, Deque, Dict, List, Optional, Protocol, Tuple

from .._shared import context as _taskctx
from .._shared import green as _green
from .._shared import platform as _platform
from .._shared.context import atomic
from .._shared.errors import ShutDown
from . import ledger
from .page import NO_SLOT, OPEN, UNSENT, Page
from .transport import PROTOCOL, Message, Transport, WritesClosed, from_wire, wire

# How long a task's put waits for room in the socket before it hands the item to the main
# program instead.
ROOM_WAIT_S = 0.02
# How often the feeder looks again when the system said "no room" without telling when.
FEEDER_POLL_S = 0.05


class Owner(Protocol):
    """The endpoint a backlog belongs to."""

    lock: threading.Lock

    def after_flush(self) -> None:
        """The backlog sent all it held: a shutdown may now close the writes."""


class Backlog:
    """One queue's items in this process that the socket had no room for, and where they go.

    Its methods run under the endpoint's lock, which also guards this process's counts.
    While it holds items, the backlog keeps its endpoint alive (the feeder keeps the backlog).
    """

    def __init__(self, owner: Owner, qid: bytes, page: Page, transport: Transport) -> None:
        self.owner = weakref.ref(owner)
        self.keep: Optional[Owner] = None  # the owner, while items wait here
        self.qid = qid
        self.page = page
        self.transport = transport
        self.items: Deque[Message] = collections.deque()
        self.from_parent = False  # received with a call: what the socket cannot take goes up
        self.via_parent = False  # ... and from then on, all of it, to keep this process's order
        self.heir = (0, 0)  # the main program items were handed to

    def put(self, message: Message) -> None:
        """Under the owner's lock: a new item, counted as put and in flight, into the socket or
        after the others (then it counts as unsent)."""
        transport = self.transport
        if self.items or self.via_parent or not (transport.send(message, True) or self._send_soon(message)):
            self.overflow([message])  # the socket is full

    def _send_soon(self, message: Message) -> bool:
        """In a task: wait a little for room, rather than hand the item to the main program.

        Consumers that keep up make room within ``ROOM_WAIT_S``: items then keep going straight
        into the socket, at the consumers' pace. Only a queue nobody reads sends this task's
        items through its main program (and from then on, all of them).
        """
        if not self.from_parent or _forwarder() is None:
            return False
        transport = self.transport
        deadline = time.monotonic() + ROOM_WAIT_S
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            if transport.no_buffer:  # the socket says it has room when it has none (macOS)
                time.sleep(min(left, 0.001))
            else:
                wait_for([], [transport.send_sock.fileno()], left)
            if transport.send(message, True):
                return True

    def overflow(self, messages: List[Message], child: int = NO_SLOT) -> None:
        """Under the owner's lock: items the socket has no room for, counted as on their way.

        ``child``: a task's slot, which counted them as on their way until now (``adopt``);
        else they are new, already counted as put and in flight.
        """
        forward = _forwarder() if self.from_parent else None
        page = self.page
        n = len(messages)
        with atomic():  # counted and handed on in one step (adopt() has no other guard)
            with page.locked():
                # Under the page lock: a shutdown closes the writes only once no live process
                # holds items on their way; these are counted before that, or see the shutdown.
                if child == NO_SLOT and page.state != OPEN:
                    raise ShutDown("the queue was shut down")
                if forward is not None:
                    page.set_heir_locked(self._heir(forward[0]))
                if child == NO_SLOT:
                    page.put_kept_locked(n)  # no longer in flight: kept, or handed on
                else:
                    page.hand_over_locked(child, n)
            if forward is None:
                self.items.extend(messages)
                self.keep = self.owner()
                _feeder.wake(self)
                return
            self.via_parent = True
            try:
                forward[1](pickle.dumps([(self.qid, page.slot, wire(messages))], PROTOCOL))
            except OSError:
                with page.locked():
                    page.put_kept_locked(-n)  # in flight again, for the caller to take back
                raise ShutDown("the main program of this task ended") from None
            finally:
                self.transport.drop(messages)

    def _heir(self, pid: int) -> Tuple[int, int]:
        """The main program items are handed to: its pid and start time (read once)."""
        if self.heir[0] != pid:
            self.heir = (pid, _platform.process_start_time(pid))
        return self.heir

    def adopt(self, lock: threading.Lock, slot: int, messages: List[bytes]) -> None:
        """What a task of this process could not send (see ``overflow``): sent on from here."""
        if not Page.valid_slot(slot):
            return
        ledger.claim(self.page)
        with lock:
            self.overflow([from_wire(message) for message in messages], child=slot)

    def flush(self) -> bool:
        """Send what the backlog holds while the socket has room; ``True`` once it is empty.

        Raises ``OSError`` when the items cannot be sent at all; they are dropped.
        """
        owner = self.keep
        if owner is None:
            return True
        items = self.items
        with owner.lock:
            try:
                while items:
                    if not self.transport.send(items[0], False):
                        return False
                    items.popleft()
                    self.page.count(UNSENT, -1)
            except BaseException as exc:
                # Shut down at once (what was left is dropped), or an error nothing can repair.
                self.page.count(UNSENT, -len(items))
                self.transport.drop(items)
                items.clear()
                if not isinstance(exc, WritesClosed):
                    raise
            finally:
                if not items:
                    self.keep = None
        owner.after_flush()  # this process may have held the last items on their way
        return True

    def forget_in_child(self) -> None:
        """In a forked copy of this process: the backlog is the original's."""
        for message in self.items:  # this copy's descriptors of the original's memory files
            if type(message) is not bytes:
                message.release()  # type: ignore[union-attr]
        self.items = collections.deque()
        self.keep = None
        self.via_parent = False


class _Feeder:
    """Sends the backlogs on: one thread per process, running only while a backlog exists."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.busy: Dict[bytes, Backlog] = {}
        self.thread: Optional[threading.Thread] = None
        self.wake_w = -1

    def wake(self, backlog: Backlog) -> None:
        with self.lock:
            self.busy[backlog.qid] = backlog
            if self.thread is None:
                wake_r, self.wake_w = os.pipe()
                os.set_blocking(wake_r, False)
                os.set_blocking(self.wake_w, False)
                self.thread = threading.Thread(
                    target=self._run, args=(wake_r, self.wake_w), name="bgtask-queue-feeder", daemon=True
                )
                self.thread.start()
                return
            try:
                os.write(self.wake_w, b"\0")
            except OSError:
                pass

    def _run(self, wake_r: int, wake_w: int) -> None:
        try:
            while self._round(wake_r):
                pass
        finally:
            with self.lock:
                if self.thread is threading.current_thread():  # ended by an error: let go
                    self.thread = None
                    self.wake_w = -1
                    self.busy.clear()
            os.close(wake_r)
            os.close(wake_w)

    def _round(self, wake_r: int) -> bool:
        """Send what the sockets take; wait until one has room. ``False`` once all is sent."""
        with self.lock:
            busy = list(self.busy.values())
        sent = []
        for backlog in busy:
            try:
                if backlog.flush():
                    sent.append(backlog)
            except Exception as exc:  # noqa: BLE001 (the items are dropped; say so, go on)
                import logging

                logging.getLogger("bgtask").error(
                    "bgtask: a queue's items could not be sent and were dropped: %s", exc
                )
                sent.append(backlog)
        with self.lock:
            for backlog in sent:
                if not backlog.items and self.busy.get(backlog.qid) is backlog:
                    del self.busy[backlog.qid]
            if not self.busy:
                self.thread = None
                self.wake_w = -1
                return False
            waiting = list(self.busy.values())
        # A socket whose last send lacked room that poll does not announce (macOS ENOBUFS):
        # look again after a while instead.
        if any(backlog.transport.no_buffer for backlog in waiting):
            writers = []
        else:
            writers = [backlog.transport.send_sock.fileno() for backlog in waiting]
        del waiting, busy, sent
        wait_for([wake_r], writers, FEEDER_POLL_S)
        try:
            os.read(wake_r, 4096)
        except BlockingIOError:
            pass
        return True

    def forget_in_child(self) -> None:
        self.lock = threading.Lock()
        self.busy = {}
        self.thread = None
        self.wake_w = -1  # the original's: its copy here closes with the process


_feeder = _Feeder()


def forget_in_child() -> None:
    _feeder.forget_in_child()


def wait_for(readers: List[int], writers: List[int], timeout: Optional[float]) -> List[int]:
    """Wait until one of the descriptors is ready or ``timeout`` passes; the ready ones.

    Under gevent, cooperatively: the other greenlets run meanwhile.
    """
    return _platform.wait_fds(readers, writers, timeout, cooperative=_green.is_gevent_patched())


def _forwarder() -> Optional[Tuple[int, Callable[[bytes], None]]]:
    """In a task: its main program's pid, and how to send it items (a QUEUED message)."""
    context = _taskctx.current
    if context is None or not context.has_channel:
        return None
    return context.parent_pid, context.forward
