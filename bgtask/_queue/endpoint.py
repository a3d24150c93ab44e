"""A process's side of one queue: its descriptors, and put, get, shutdown and join over them.

- ``maxsize`` is a pipe holding one byte per free place: ``put`` takes one, ``get`` gives one
  back.
- ``shutdown()`` moves the state to SHUTTING; once no live process (or heir) holds items on
  their way, whoever notices closes the socket's writes: from then on every send fails in every
  process, and consumers read what is left, then the end. The kernel, not a lock on the fast
  path, decides whether a put came before the shutdown.
- A task polls its own channel too: when its main program dies, a blocked call raises
  ``ShutDown``.

In each process one endpoint per queue exists, whatever the number of ``Queue`` objects for
it (``endpoints``, by the queue's id).
"""

from __future__ import annotations

import os
import pickle
import threading
import time
import weakref
from queue import Empty, Full
from typing import Any, List, Optional, Tuple

from .._shared import context as _taskctx
from .._shared import forks
from .._shared import platform as _platform
from .._shared import serialization as _serialization
from .._shared.context import NothingYet, atomic
from .._shared.errors import SerializationError, ShutDown
from . import feeder, ledger, page, places
from .feeder import Backlog, wait_for
from .page import DONE, IMMEDIATE, OPEN, SHUT, SHUTTING, STATE_NAMES, Page
from .places import Places
from .transport import EOF, LOST, Message, Transport, WritesClosed, decode, encode, lost_item, socketpair

# How often a consumer looks again while a shut-down queue still has items on their way.
DRAIN_POLL_S = 0.005
# How often join() looks at the counts again.
JOIN_POLL_S = 0.005
# How often a put waiting for a place looks for places that a process that is gone held.
PLACES_CHECK_S = 0.5


class Endpoint:
    """This process's side of one queue.

    Locks, always taken in this order: ``lock`` (this process's threads: its slot's counts,
    its backlog), then the page lock (``page.locked()``).
    """

    def __init__(self, qid: bytes, maxsize: int, fds: List[int]) -> None:
        self.qid = qid
        self.maxsize = maxsize
        self.fds = fds
        send_fd, recv_fd, page_fd, self.wake_r, self.wake_w = fds[:5]
        self.places = Places(maxsize, *fds[5:7]) if maxsize else None
        self.page = Page(page_fd, self.places)
        self.transport = Transport(send_fd, recv_fd, self.page)
        self.lock = threading.Lock()
        self.backlog = Backlog(self, qid, self.page, self.transport)
        self.ending = Ending(self.page, self.transport, self.wake_w)
        # The sockets close their own descriptors. Not at the interpreter's exit: bgtask's
        # exit procedure, which may still need the queue, runs after this would.
        others = [fd for fd in fds if fd not in (send_fd, recv_fd)]
        self._finalizer = weakref.finalize(self, _close, self.page, self.transport, others)
        self._finalizer.atexit = False

    @classmethod
    def create(cls, maxsize: int) -> Endpoint:
        fds: List[int] = []
        try:
            fds += socketpair()
            fds.append(_platform.memory_file("bgtask-queue", page.SIZE))
            fds += os.pipe()
            if maxsize:
                r, w = os.pipe()
                fds += [r, w]
                places.fill(w, maxsize)
        except BaseException:
            _close_fds(fds)
            raise
        end = cls(os.urandom(16), maxsize, fds)
        endpoints[end.qid] = end
        for fd in fds[3:]:
            os.set_blocking(fd, False)
        end.transport.set_nonblocking()
        return end

    @classmethod
    def received(cls, qid: bytes, maxsize: int, fds: List[int]) -> Endpoint:
        """The endpoint of a queue that came with a call, with these descriptors."""
        end = endpoints.get(qid)
        if end is not None:
            for fd in fds:
                # Closing a descriptor of the page drops this process's lockf locks on it.
                _serialization.close_guarded(fd, end.page.lock)
        else:
            end = cls(qid, maxsize, fds)
            endpoints[qid] = end
        end.backlog.from_parent = True
        return end

    def descriptors(self) -> Tuple[int, ...]:
        """While a call is pickled: its descriptors go with it; their indexes in the call."""
        what = "a bgtask.Queue"
        if _serialization.pickling_for() == "ray":
            raise TypeError(
                "a bgtask.Queue made for local tasks cannot be given to a task on Ray: make it "
                "after use_ray(), or with Queue(backend='ray')"
            )
        _serialization.keep_alive(self)  # what the task cannot send comes back through here
        # Closing a duplicate of the page's descriptor drops this process's lockf locks: it is
        # closed holding the page lock, as no thread of this process then holds those locks.
        guards = [self.page.lock if fd == self.page.fd else None for fd in self.fds]
        return tuple(_serialization.send_along(fd, what, guard) for fd, guard in zip(self.fds, guards))

    # -- put ----------------------------------------------------------------------------------

    def put(self, item: Any, block: bool, timeout: Optional[float]) -> None:
        message = encode(item)
        ledger.claim(self.page)
        # Put in one step: a stop (or a Ctrl-C) meanwhile comes once put() returned, as the
        # caller's next line starts (the caller knows the item is in).
        if not self.maxsize:
            with atomic(to_caller=True), self.lock:
                self._put_now(message, placed=False)
            return
        deadline = None if timeout is None else time.monotonic() + timeout
        checked = time.monotonic()
        while True:
            try:
                with atomic(to_caller=True):  # the place taken and the item put in one step
                    if not self._put_in_a_place(message):
                        raise _NoPlace  # a stop meanwhile is raised here: put() ends without the item
                return
            except _NoPlace:
                pass
            if self.page.state != OPEN:
                raise ShutDown("the queue was shut down")
            now = time.monotonic()
            if (not block or now - checked >= PLACES_CHECK_S) and ledger.retire_gone(self.page):
                checked = now
                continue  # places held by a process that is gone came back
            if not block:
                raise Full
            assert self.places is not None  # a stop may end this wait
            _wait(self.places.read_fd, self.wake_r, deadline, Full, step=PLACES_CHECK_S)

    def _put_in_a_place(self, message: Message) -> bool:
        """Take a free place and put the item in it; ``False`` if there is none."""
        page, free = self.page, self.places
        assert free is not None
        with self.lock:
            page.put_reserve(1)  # from here, a place this process may hold
            if not free.take():
                page.put_reserve(-1)
                return False
            try:
                self._put_now(message, placed=True)
            except BaseException:
                free.give()
                page.put_reserve(-1)
                raise
        return True

    def _put_now(self, message: Message, placed: bool) -> None:
        """Under ``lock``: count the item as put, then send it (or keep it, or hand it on).

        ``placed``: it has the place reserved for it (a bounded queue). Until it is in the
        socket (or kept, or handed on), it counts as in flight: if this process dies meanwhile,
        it is not counted as put, and its place comes back.
        """
        page = self.page
        if page.state != OPEN:
            raise ShutDown("the queue was shut down")
        # Counted before it can be got: a consumer's task_done() never comes before it.
        page.put_counted(placed)
        try:
            self.backlog.put(message)
        except BaseException as exc:
            page.put_counted(placed, -1)  # not put after all (the caller gives the place back)
            self.transport.drop([message])
            if isinstance(exc, WritesClosed):
                raise ShutDown("the queue was shut down") from None
            raise

    # -- get ----------------------------------------------------------------------------------

    def get(self, block: bool, timeout: Optional[float]) -> Any:
        deadline = None if timeout is None else time.monotonic() + timeout
        ledger.claim(self.page)
        bounded = bool(self.maxsize)
        while True:
            state = self.page.state
            if state == IMMEDIATE:
                raise ShutDown("the queue was shut down")
            # Taken, counted and unpickled in one step: a stop or a Ctrl-C meanwhile comes once
            # the item is returned, never between the socket and the caller.
            try:
                with atomic(to_caller=True):
                    data = self.transport.receive(bounded)
                    if data is not None:
                        if data is EOF:
                            raise ShutDown("the queue was shut down")
                        return self._got(data)
                    if state == SHUT:
                        # The writes are closed: what was sent is all in the socket, and it is
                        # empty. (Read once more for one that landed between the two reads.)
                        data = self.transport.receive(bounded)
                        if data is None or data is EOF:
                            raise ShutDown("the queue was shut down")
                        return self._got(data)
                    raise _Nothing  # a stop meanwhile is raised here: get() ends, not waits
            except _Nothing:
                pass
            if state == SHUTTING and self.ending.close_writes_if_drained():
                continue
            if not block:
                raise Empty
            if state == SHUTTING:
                # Items are on their way from a backlog: wait for them, and look again now and
                # then in case their process died.
                _wait(self.transport.recv_sock.fileno(), None, deadline, Empty, step=DRAIN_POLL_S)
            else:
                _wait(self.transport.recv_sock.fileno(), self.wake_r, deadline, Empty)

    def _got(self, data: Any) -> Any:
        """An item received (and counted as got): its place back, then the item."""
        if self.places is not None:
            self.places.give()
            self.page.place_returned()
        try:
            if data is LOST:
                raise lost_item()
            return decode(data)
        except (SerializationError, OSError):
            self.page.count(DONE, 1)  # dropped: nobody will mark it done
            raise

    # -- shutdown -----------------------------------------------------------------------------

    def shutdown(self, immediate: bool) -> None:
        self.ending.shutdown(immediate)

    def after_flush(self) -> None:
        """The backlog sent all it held: a shutdown may now close the writes."""
        self.ending.after_flush()

    def release_task(self, pid: int) -> None:
        """A task of this process ended, its messages all read: what it still counted as on its
        way through this process will not come (it died before it sent it). Stop waiting."""
        ledger.release(self.page, pid)
        self.ending.after_flush()

    # -- sizes and join -----------------------------------------------------------------------

    def qsize(self) -> int:
        """Put minus got, over every process; what a process that died never sent is not counted."""
        put, got, _done, state = ledger.totals(self.page)
        return 0 if state == IMMEDIATE else max(0, put - got)

    def unfinished(self) -> int:
        """Items put and not yet marked done (``task_done()``); dropped ones count as done."""
        put, got, done, state = ledger.totals(self.page)
        return max(0, (got if state == IMMEDIATE else put) - done)

    def task_done(self) -> None:
        ledger.claim(self.page)
        with atomic(to_caller=True), self.lock:  # a stop meanwhile comes once it returned
            if self.unfinished() <= 0:
                raise ValueError("task_done() called more times than there were items")
            self.page.count(DONE, 1)

    def join(self) -> None:
        parent = _parent_channel()
        while self.unfinished() > 0:
            ready = wait_for([parent] if parent is not None else [], [], JOIN_POLL_S)
            if ready:
                raise ShutDown("the main program of this task ended")

    @property
    def is_shutdown(self) -> bool:
        return self.page.state != OPEN

    def state_name(self) -> str:
        return STATE_NAMES[self.page.state]

    def forget_in_child(self) -> None:
        """In a forked copy of this process: the backlog and the slot are the original's."""
        self.lock = threading.Lock()
        self.page.forget_in_child()
        self.backlog.forget_in_child()


class Ending:
    """How a queue ends, for every process: ``shutdown()``, then the writes closed once no
    live process holds items on their way (this process notices it as well as any)."""

    def __init__(self, queue_page: Page, transport: Transport, wake_w: int) -> None:
        self.page = queue_page
        self.transport = transport
        self.wake_w = wake_w

    def shutdown(self, immediate: bool) -> None:
        with self.page.locked():
            state = self.page.state
            if immediate:
                if state != IMMEDIATE:
                    self._close_writes_locked(IMMEDIATE)  # qsize() is 0 from now on
            elif state == OPEN:
                self.page.set_state_locked(SHUTTING)
                self._wake_all()  # producers waiting for a place raise now
        if immediate:
            while self.transport.discard():
                pass
        else:
            self.close_writes_if_drained()

    def close_writes_if_drained(self) -> bool:
        """While shutting down: close the writes once no live process holds items on their way.

        Returns whether the writes are closed.
        """
        with self.page.locked():
            state = self.page.state
            if state != SHUTTING:
                return bool(state != OPEN)
            if ledger.items_on_their_way_locked(self.page):
                return False
            self._close_writes_locked(SHUT)
        return True

    def _close_writes_locked(self, state: int) -> None:
        """Under the page lock: no send succeeds from now on, in any process; wake every waiter."""
        self.transport.close_writes()
        self.page.set_state_locked(state)
        self._wake_all()

    def _wake_all(self) -> None:
        try:
            os.write(self.wake_w, b"\0")
        except OSError:
            pass  # the pipe is full of earlier wake-ups: it is readable anyway

    def after_flush(self) -> None:
        if self.page.state == SHUTTING:
            self.close_writes_if_drained()  # this process held the last items on their way


class _NoPlace(NothingYet):
    """No free place for a put: it waits, unless a stop came meanwhile."""


class _Nothing(NothingYet):
    """No item for a get: it waits, unless a stop came meanwhile."""


endpoints: weakref.WeakValueDictionary[bytes, Endpoint] = weakref.WeakValueDictionary()


def adopt(body: Any) -> None:
    """Items a task of this process could not send (a QUEUED message), for queues held here."""
    for qid, slot, items in pickle.loads(body):
        end = endpoints.get(qid)
        if end is not None:
            end.backlog.adopt(end.lock, slot, items)


def _wait(
    fd: int,
    wake_r: Optional[int],
    deadline: Optional[float],
    timed_out: type,
    step: Optional[float] = None,
) -> None:
    """Wait until ``fd`` is readable, the queue is shut down (``wake_r``, if given), this task's
    program died, or ``step`` passed; raise ``timed_out`` once ``deadline`` passed."""
    parent = _parent_channel()
    readers = [fd] if wake_r is None else [fd, wake_r]
    if parent is not None:
        readers.append(parent)
    left = None if deadline is None else deadline - time.monotonic()
    if left is not None and left <= 0:
        raise timed_out
    if step is not None:
        left = step if left is None else min(left, step)
    ready = wait_for(readers, [], left)
    if parent is not None and parent in ready:
        raise ShutDown("the main program of this task ended")


def _parent_channel() -> Optional[int]:
    """In a task, its channel to its main program: readable once that program is gone."""
    context = _taskctx.current
    return None if context is None else context.parent_fd()


def _close(queue_page: Page, transport: Transport, fds: List[int]) -> None:
    for sock in transport.sockets():
        sock.close()
    queue_page.close()
    _close_fds(fds)


def _close_fds(fds: List[int]) -> None:
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass


def _after_fork_in_child() -> None:
    feeder.forget_in_child()
    for end in list(endpoints.values()):
        end.forget_in_child()


forks.register(after_in_child=_after_fork_in_child, order=forks.QUEUES)
forks.activate()  # a queue's process may fork with no task started: its copy lets go too
