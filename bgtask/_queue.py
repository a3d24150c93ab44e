"""``bgtask.Queue``: a queue shared by the main program and any number of tasks.

The items travel through the kernel, never through a third process::

    producers --send--> [ datagram socket (SOCK_SEQPACKET on Linux) ] --recv--> consumers
                 |                                                        |
                 +-- what the socket has no room for: in the main program, a backlog that a
                     feeder thread sends on (one per process, only while a backlog exists);
                     in a task, a message to its main program, which sends it on

- One item is one datagram, so any number of processes send and receive on the same socket
  with no lock: the kernel hands each datagram to exactly one reader, and keeps each sender's
  datagrams in order. An item larger than ``INLINE_MAX`` travels in a memory file whose
  descriptor rides on its datagram.
- ``maxsize`` is a pipe holding one byte per free place: ``put`` takes one, ``get`` gives one back.
- A shared page (a memory file every process maps) holds the state and one slot per process
  that used the queue: items it put, items it got, and items it accepted but that are not yet
  in the socket (with the pid of the process that took them on, its *heir*). ``qsize()`` sums
  the slots. Counts change under ``lockf`` where other processes must agree (released by the
  kernel if its holder dies); a process writes its own slot's counts otherwise.
- ``shutdown()`` moves the state to SHUTTING; once no live process (or heir) holds items on
  their way, whoever notices closes the socket's writes with ``shutdown(SHUT_WR)``: from then
  on every send fails in every process, and consumers read what is left, then the end. The
  kernel, not a lock on the fast path, decides whether a put came before the shutdown.
- A task polls its own channel too: when its main program dies, a blocked call raises
  ``ShutDown``.

A queue travels only in a call (an argument, or captured by the function): its descriptors go
with the call (``_serialization.send_along``). In each process one endpoint per queue exists,
whatever the number of ``Queue`` objects for it. Items a task hands to its main program are
safe from the task's crash; the main program's own backlog lives as long as it does.
"""

from __future__ import annotations

import array
import collections
import errno
import fcntl
import mmap
import os
import pickle
import socket
import struct
import sys
import threading
import time
import weakref
from queue import Empty, Full
from typing import Any, Callable, Deque, Dict, Generic, Iterator, List, Optional, Tuple, TypeVar

from . import _green, _platform, _serialization, _taskctx
from ._taskctx import atomic

lockf, LOCK_EX, LOCK_UN = fcntl.lockf, fcntl.LOCK_EX, fcntl.LOCK_UN

if sys.version_info >= (3, 13):
    from queue import ShutDown
else:

    class ShutDown(Exception):
        """Raised by ``put`` and ``get`` on a queue that was shut down (``queue.ShutDown`` on 3.13+)."""

        __module__ = "bgtask"


T = TypeVar("T")

# Items whose pickle is larger than this travel in a memory file rather than in the datagram.
INLINE_MAX = 32 * 1024
# The socket's buffer: as much as the system lets an unprivileged process have, up to this.
SOCKET_BUFFER = 4 * 1024 * 1024
# Free places of a bounded queue are bytes in a pipe: it holds this many on every system.
MAXSIZE_LIMIT = 65536
# How often a consumer looks again while a shut-down queue still has items on their way.
DRAIN_POLL_S = 0.005
# How long a task's put waits for room in the socket before it hands the item to the main
# program instead.
ROOM_WAIT_S = 0.02
# How often the feeder looks again when the system said "no buffer" without telling when.
FEEDER_POLL_S = 0.05

# The states: open; shut down, waiting for items on their way from backlogs; shut down, writes
# closed; shut down at once.
_OPEN, _SHUTTING, _SHUT, _IMMEDIATE = 0, 1, 2, 3
# The shared page: a header, then slots.
# state, slots in use; the counts of processes that are gone or beyond the table: put, got,
# not yet sent
_HEADER = struct.Struct("=qqqqqq")
_RETIRED_PUT, _RETIRED_GOT, _SHARED_UNSENT, _RETIRED_DONE = 16, 24, 32, 40
# pid, heir pid (who took its items on), put, got, not yet sent, task_done() calls
_SLOT = struct.Struct("=qqqqqq")
_SLOTS = 1024
_SLOT_WORDS = _SLOT.size // 8
_PAGE = _HEADER.size + _SLOT.size * _SLOTS
_FILE_ITEM = b"F"  # a datagram that starts so carries a memory file of this length: "F" + 8 bytes
_FILE_HEAD = struct.Struct("=cQ")
_PICKLE_START = 0x80  # every pickle of protocol 2 or later starts with this byte
_PROTOCOL = pickle.HIGHEST_PROTOCOL
_PLAIN = frozenset((bytes, str, int, float))  # pickled by the stdlib, whatever the program imported

_HEIR, _PUT, _GOT, _UNSENT, _DONE = 8, 16, 24, 32, 40  # where a slot's fields are, from its start
_SHARED_FIELD = {_PUT: _RETIRED_PUT, _GOT: _RETIRED_GOT, _UNSENT: _SHARED_UNSENT, _DONE: _RETIRED_DONE}
# How often join() looks at the counts again.
JOIN_POLL_S = 0.005
_NO_SLOT, _SHARED = -1, -2

_RIGHTS_SPACE = socket.CMSG_SPACE(4)
_EOF: Any = object()  # what _receive() returns at the end of the socket (Linux)


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
    arguments only.
    """

    __module__ = "bgtask"
    __slots__ = ("__weakref__", "_end")

    def __init__(self, maxsize: int = 0) -> None:
        if isinstance(maxsize, bool) or not isinstance(maxsize, int):
            raise TypeError(f"Queue(): maxsize must be an int, not {type(maxsize).__name__}")
        if maxsize > MAXSIZE_LIMIT:
            raise ValueError(f"Queue(): maxsize must be at most {MAXSIZE_LIMIT}, not {maxsize}")
        self._end = _Endpoint.create(max(maxsize, 0))

    @property
    def maxsize(self) -> int:
        """The most items the queue holds; 0 if there is no bound."""
        return self._end.maxsize

    def put(self, item: T, block: bool = True, timeout: Optional[float] = None) -> None:
        """Put ``item`` in the queue; with ``maxsize``, wait for a free place as ``queue.Queue`` does.

        Raises ``queue.Full`` when there is none (``block=False``, or after ``timeout``), and
        ``ShutDown`` once the queue is shut down.
        """
        self._end.put(item, block, _check_timeout(timeout))

    def put_nowait(self, item: T) -> None:
        """``put(item, block=False)``."""
        self._end.put(item, False, None)

    def get(self, block: bool = True, timeout: Optional[float] = None) -> T:
        """Remove and return an item, waiting for one as ``queue.Queue`` does.

        Raises ``queue.Empty`` when there is none (``block=False``, or after ``timeout``), and
        ``ShutDown`` once the queue is shut down and empty.
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
        return self._end.reduce()

    def __repr__(self) -> str:
        bound = f" maxsize={self.maxsize}" if self.maxsize else ""
        return f"<bgtask.Queue{bound} qsize={self.qsize()} state={self._end.state_name()}>"


def _check_timeout(timeout: Optional[float]) -> Optional[float]:
    if timeout is not None and timeout < 0:
        raise ValueError("'timeout' must be a non-negative number")
    return timeout


def _rebuild(qid: bytes, maxsize: int, indexes: Tuple[int, ...]) -> Queue[Any]:
    fds = [_serialization.received(i) for i in indexes]
    end = _endpoints.get(qid)
    if end is not None:
        for fd in fds:
            # Closing a descriptor of the page drops this process's lockf locks on it.
            _serialization.close_guarded(fd, end.page_lock)
    else:
        end = _Endpoint(qid, maxsize, fds)
        _endpoints[qid] = end
    end.from_parent = True
    queue: Queue[Any] = Queue.__new__(Queue)
    queue._end = end
    return queue


_rebuild.__module__ = "bgtask._queue"


class _Endpoint:
    """This process's side of one queue: its descriptors, its slot, its backlog.

    Locks, always taken in this order: ``lock`` (this process's threads: its slot's counts,
    its backlog), then the page lock (``_locked()``: ``page_lock`` for this process's threads,
    ``lockf`` for the other processes).
    """

    def __init__(self, qid: bytes, maxsize: int, fds: List[int]) -> None:
        self.qid = qid
        self.maxsize = maxsize
        self.fds = fds
        send_fd, recv_fd, page_fd, self.wake_r, self.wake_w = fds[:5]
        self.tokens_r, self.tokens_w = fds[5:7] if maxsize else (-1, -1)
        self.send_sock = _green.socket_from_fd(send_fd)
        self.recv_sock = _green.socket_from_fd(recv_fd)
        self.page_fd = page_fd
        self.page = mmap.mmap(page_fd, _PAGE)
        # The counts, as 8-byte words: each is read and written in one access, so another
        # process never sees half of a write (struct.pack_into first zeroes what it fills in).
        self.words = memoryview(self.page).cast("q")
        self.lock = threading.Lock()
        self.page_lock = threading.Lock()
        self.slot = _NO_SLOT  # the offset of this process's slot once claimed, or _SHARED
        self.backlog: Deque[bytes] = collections.deque()
        self.from_parent = False  # received with a call: what the socket cannot take goes up
        self.via_parent = False  # ... and from then on, all of it, to keep this process's order
        self.no_buffer = False  # the last send failed with ENOBUFS (macOS), not EAGAIN
        # The sockets close their own descriptors. Not at the interpreter's exit: bgtask's
        # exit procedure, which may still need the queue, runs after this would.
        others = [fd for fd in fds if fd not in (send_fd, recv_fd)]
        sockets = [self.send_sock, self.recv_sock]
        self._finalizer = weakref.finalize(self, _close, self.words, self.page, sockets, others)
        self._finalizer.atexit = False

    @classmethod
    def create(cls, maxsize: int) -> _Endpoint:
        fds: List[int] = []
        try:
            a, b = _platform.datagram_socketpair(SOCKET_BUFFER)
            fds += [a.detach(), b.detach()]
            fds.append(_platform.memory_file("bgtask-queue", _PAGE))
            fds += os.pipe()
            if maxsize:
                r, w = os.pipe()
                fds += [r, w]
                _fill_places(w, maxsize)
        except BaseException:
            _close_fds(None, fds)
            raise
        end = cls(os.urandom(16), maxsize, fds)
        _endpoints[end.qid] = end
        for fd in (end.wake_r, end.wake_w, end.tokens_r, end.tokens_w):
            if fd >= 0:
                os.set_blocking(fd, False)
        end.send_sock.setblocking(False)
        end.recv_sock.setblocking(False)
        return end

    def reduce(self) -> Any:
        what = "a bgtask.Queue"
        _serialization.keep_alive(self)  # what the task cannot send comes back through here
        # Closing a duplicate of the page's descriptor drops this process's lockf locks: it is
        # closed holding the page lock, as no thread of this process then holds those locks.
        guards = [self.page_lock if fd == self.page_fd else None for fd in self.fds]
        indexes = tuple(_serialization.send_along(fd, what, guard) for fd, guard in zip(self.fds, guards))
        return _rebuild, (self.qid, self.maxsize, indexes)

    # -- the shared page --------------------------------------------------------------------

    def _locked(self) -> _PageLock:
        return _PageLock(self)

    def _state(self) -> int:
        state: int = self.words[0]
        return state

    def _ensure_slot(self) -> None:
        """Claim this process's slot on first use. Never with the page lock held."""
        if self.slot == _NO_SLOT:
            with self._locked():
                self.slot = self._claim_slot()

    def _claim_slot(self) -> int:
        """Under the page lock: a free slot, one of a process that is gone, or ``_SHARED``."""
        used = self.words[1]
        index = -1
        if used < _SLOTS:
            index = used
            self.words[1] = used + 1
        else:
            for i in range(_SLOTS):
                pid, heir, put, got, unsent, done = self._slot_locked(i)
                if _gone(pid, heir):
                    # Its counts go to the header's; what it never sent was lost with it.
                    self._add_locked(_RETIRED_PUT, put - unsent)
                    self._add_locked(_RETIRED_GOT, got)
                    self._add_locked(_RETIRED_DONE, done)
                    index = i
                    break
        if index < 0:
            return _SHARED  # beyond the table: this process counts in the header, locked
        start = _offset(index) >> 3
        self.words[start : start + _SLOT_WORDS] = array.array("q", (os.getpid(), 0, 0, 0, 0, 0))
        return _offset(index)

    def _add_locked(self, at: int, delta: int) -> None:
        self.words[at >> 3] += delta

    def _count(self, field: int, delta: int) -> None:
        """Add to one of this process's counts. Under ``lock``: no other process writes them."""
        slot = self.slot
        if slot >= 0:
            self._add_locked(slot + field, delta)
        else:
            with self._locked():
                self._add_locked(_SHARED_FIELD[field], delta)

    # -- put ----------------------------------------------------------------------------------

    def put(self, item: Any, block: bool, timeout: Optional[float]) -> None:
        message = _encode(item)
        self._ensure_slot()
        if not self.maxsize:
            with atomic():  # in a task, a stop meanwhile is raised once the item is in
                self._put_now(message)
            return
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            with atomic():  # the place taken and the item put in one step
                try:
                    taken = bool(os.read(self.tokens_r, 1))
                except BlockingIOError:
                    taken = False
                if taken:
                    try:
                        self._put_now(message)
                    except BaseException:
                        self._give_place()
                        raise
                    return
            if self._state() != _OPEN:
                raise ShutDown("the queue was shut down")
            if not block:
                raise Full
            self._wait(self.tokens_r, deadline, Full)  # a stop may end this wait

    def _put_now(self, message: bytes) -> None:
        with self.lock:
            if self.words[0] != _OPEN:
                raise ShutDown("the queue was shut down")
            # Counted before it can be got: a consumer's task_done() never comes before it.
            self._count(_PUT, 1)
            try:
                if self.backlog or self.via_parent or not (self._send(message) or self._send_soon(message)):
                    self._overflow([message])  # the socket is full
            except BaseException:
                self._count(_PUT, -1)  # not put after all
                raise

    def _send(self, message: bytes) -> bool:
        """Hand one item to the socket; ``False`` if it has no room now.

        Raises ``ShutDown`` once the queue's writes are closed: the kernel decides, for every
        process at once, whether an item went in before the shutdown or not at all.
        """
        try:
            if message[0] == _PICKLE_START:
                self.send_sock.send(message, _platform.SEND_FLAGS)
            else:
                size = _FILE_HEAD.unpack(message[: _FILE_HEAD.size])[1]
                fd = _platform.memory_file("bgtask-item", 0)
                try:
                    _write_all(fd, memoryview(message)[_FILE_HEAD.size :])
                    rights = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, struct.pack("i", fd))]
                    self.send_sock.sendmsg([_FILE_HEAD.pack(_FILE_ITEM, size)], rights, _platform.SEND_FLAGS)
                finally:
                    os.close(fd)
        except OSError as exc:
            if _platform.no_room(exc):
                self.no_buffer = not _platform.room_is_pollable(exc)
                return False
            if exc.errno == errno.EPIPE:
                raise ShutDown("the queue was shut down") from None
            raise
        return True

    def _send_soon(self, message: bytes) -> bool:
        """In a task: wait a little for room, rather than hand the item to the main program.

        Consumers that keep up make room within ``ROOM_WAIT_S``: items then keep going straight
        into the socket, at the consumers' pace. Only a queue nobody reads sends this task's
        items through its main program (and from then on, all of them).
        """
        if not self.from_parent or _forwarder() is None:
            return False
        deadline = time.monotonic() + ROOM_WAIT_S
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            if self.no_buffer:  # macOS: the socket says it has room when its peer has none
                time.sleep(min(left, 0.001))
            else:
                _wait_for([], [self.send_sock.fileno()], left)
            if self._send(message):
                return True

    def _overflow(self, messages: List[bytes], put: bool = True, child: int = -1) -> None:
        """Under ``lock``: items the socket has no room for, counted as on their way.

        In a task, they go to its main program at once, which sends them on (so they survive
        this process's crash), and so does every item this task puts from then on (so its
        items keep their order). Elsewhere they wait in the backlog for the feeder. ``put``:
        they are new, already counted as put (else adopted from a task); ``child``: that task's
        slot, which counted them as on their way until now.
        """
        forward = _forwarder() if self.from_parent else None
        with atomic():  # counted and handed on in one step (adopt() has no other guard)
            with self._locked():
                # Under the page lock: a shutdown closes the writes only once no live process
                # holds items on their way; these are counted before that, or see the shutdown.
                if put and self._state() != _OPEN:
                    raise ShutDown("the queue was shut down")
                if forward is not None:
                    self._set_heir_locked(forward[0])
                self._add_here_locked(_UNSENT, len(messages))
                if child != _NO_SLOT:
                    at = (child + _UNSENT) >> 3
                    self.words[at] = max(0, self.words[at] - len(messages))
            if forward is None:
                self.backlog.extend(messages)
                _feeder.wake(self)
                return
            self.via_parent = True
            try:
                forward[1](pickle.dumps([(self.qid, self.slot, messages)], _PROTOCOL))
            except OSError:
                with self._locked():
                    self._add_here_locked(_UNSENT, -len(messages))
                raise ShutDown("the main program of this task ended") from None

    def _add_here_locked(self, field: int, delta: int) -> None:
        self._add_locked(self.slot + field if self.slot >= 0 else _SHARED_FIELD[field], delta)

    def _set_heir_locked(self, heir: int) -> None:
        if self.slot >= 0:
            self.words[(self.slot + _HEIR) >> 3] = heir

    def release_task(self, pid: int) -> None:
        """A task of this process ended, its messages all read: what it still counted as on its
        way through this process will not come (it died before it sent it). Stop waiting."""
        with self._locked():
            for i, (spid, heir, _put, _got, unsent, _done) in enumerate(self._slots_locked()):
                if spid == pid and heir == os.getpid() and unsent > 0:
                    self.words[(_offset(i) + _UNSENT) >> 3] = 0
        if self._state() == _SHUTTING:
            self._close_writes_if_drained()

    def adopt(self, slot: int, messages: List[bytes]) -> None:
        """What a task of this process could not send (see ``_overflow``): sent on from here."""
        if slot == _SHARED:
            slot = _SHARED_UNSENT - _UNSENT  # that task counted them in the header
        elif not _HEADER.size <= slot < _PAGE or (slot - _HEADER.size) % _SLOT.size:
            return
        self._ensure_slot()
        with self.lock:
            self._overflow(messages, put=False, child=slot)

    def _give_place(self) -> None:
        try:
            os.write(self.tokens_w, b"\0")
        except OSError:
            pass

    def flush(self) -> bool:
        """Send what the backlog holds while the socket has room; ``True`` once it is empty.

        Raises ``OSError`` when the items cannot be sent at all; they are dropped.
        """
        with self.lock:
            try:
                while self.backlog:
                    if not self._send(self.backlog[0]):
                        return False
                    self.backlog.popleft()
                    self._count(_UNSENT, -1)
            except BaseException as exc:
                # Shut down at once (what was left is dropped), or an error nothing can repair.
                self._count(_UNSENT, -len(self.backlog))
                self.backlog.clear()
                if not isinstance(exc, ShutDown):
                    raise
        if self._state() == _SHUTTING:
            self._close_writes_if_drained()  # this process held the last items on their way
        return True

    # -- get ----------------------------------------------------------------------------------

    def get(self, block: bool, timeout: Optional[float]) -> Any:
        deadline = None if timeout is None else time.monotonic() + timeout
        self._ensure_slot()
        while True:
            state = self._state()
            if state == _IMMEDIATE:
                raise ShutDown("the queue was shut down")
            # Taken, counted and unpickled in one step: a stop or a Ctrl-C meanwhile comes once
            # the item is returned, never between the socket and the caller.
            with atomic(to_caller=True):
                data = self._receive()
                if data is not None:
                    if data is _EOF:
                        raise ShutDown("the queue was shut down")
                    return self._got(data)
                if state == _SHUT:
                    # The writes are closed: what was sent is all in the socket, and it is
                    # empty. (Read once more for one that landed between the two reads.)
                    data = self._receive()
                    if data is None or data is _EOF:
                        raise ShutDown("the queue was shut down")
                    return self._got(data)
            if state == _SHUTTING and self._close_writes_if_drained():
                continue
            if not block:
                raise Empty
            if state == _SHUTTING:
                # Items are on their way from a backlog: wait for them, and look again now and
                # then in case their process died.
                self._wait(self.recv_sock.fileno(), deadline, Empty, step=DRAIN_POLL_S)
            else:
                self._wait(self.recv_sock.fileno(), deadline, Empty)

    def _got(self, data: Any) -> Any:
        with self.lock:
            self._count(_GOT, 1)
        if self.maxsize:
            self._give_place()
        return pickle.loads(data)

    def _receive(self) -> Optional[Any]:
        """One datagram's item as bytes; ``None`` if the socket is empty, ``_EOF`` at its end."""
        try:
            data, ancdata, _flags, _addr = self.recv_sock.recvmsg(
                INLINE_MAX + 64, _RIGHTS_SPACE, _platform.RECV_FLAGS
            )
        except BlockingIOError:
            return None
        if not ancdata:
            return data or _EOF  # no item is empty: an empty read is the end (Linux)
        fds = [
            fd
            for level, kind, cdata in ancdata
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS
            for fd in struct.unpack(f"{len(cdata) // 4}i", cdata[: len(cdata) - len(cdata) % 4])
        ]
        if not fds:
            return data  # not an item of bgtask's
        try:
            size = _FILE_HEAD.unpack(data)[1]
            with mmap.mmap(fds[0], size, prot=mmap.PROT_READ) as mapped:
                return bytes(mapped)
        finally:
            for fd in fds:
                os.close(fd)

    def _slots_locked(self) -> List[Tuple[int, int, int, int, int, int]]:
        return [self._slot_locked(i) for i in range(min(self.words[1], _SLOTS))]

    def _slot_locked(self, index: int) -> Tuple[int, int, int, int, int, int]:
        start = _offset(index) >> 3
        pid, heir, put, got, unsent, done = self.words[start : start + _SLOT_WORDS].tolist()
        return pid, heir, put, got, unsent, done

    def _close_writes_if_drained(self) -> bool:
        """While shutting down: close the writes once no live process holds items on their way.

        Returns whether the writes are closed.
        """
        with self._locked():
            state = self._state()
            if state != _SHUTTING:
                return bool(state != _OPEN)
            slots = self._slots_locked()
            if self.words[_SHARED_UNSENT >> 3] > 0 or any(
                unsent > 0 and not _gone(pid, heir) for pid, heir, _p, _g, unsent, _d in slots
            ):
                return False
            self._close_writes_locked(_SHUT)
        return True

    def _close_writes_locked(self, state: int) -> None:
        """Under the page lock: no send succeeds from now on, in any process; wake every waiter."""
        try:
            self.send_sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass  # already closed
        self.words[0] = state
        try:
            os.write(self.wake_w, b"\0")
        except OSError:
            pass  # the pipe is full of earlier wake-ups: it is readable anyway

    # -- waiting ------------------------------------------------------------------------------

    def _wait(
        self, fd: int, deadline: Optional[float], timed_out: type, step: Optional[float] = None
    ) -> None:
        """Wait until ``fd`` is readable, the queue is shut down, or this task's program died."""
        parent = _parent_channel()
        readers = [fd] if step is not None else [fd, self.wake_r]
        if parent is not None:
            readers.append(parent)
        left = None if deadline is None else deadline - time.monotonic()
        if left is not None and left <= 0:
            raise timed_out
        if step is not None:
            left = step if left is None else min(left, step)
        ready = _wait_for(readers, [], left)
        if parent is not None and parent in ready:
            raise ShutDown("the main program of this task ended")

    # -- state --------------------------------------------------------------------------------

    def _totals(self) -> Tuple[int, int, int, int]:
        """Over every process: put (minus what was lost with a process that died), got, done,
        and the state."""
        with self._locked():
            state = self._state()
            slots = self._slots_locked()
            put, got, done = (self.words[field >> 3] for field in (_RETIRED_PUT, _RETIRED_GOT, _RETIRED_DONE))
        for pid, heir, slot_put, slot_got, unsent, slot_done in slots:
            put += slot_put
            got += slot_got
            done += slot_done
            if unsent > 0 and _gone(pid, heir):
                put -= unsent  # lost with its process
        return put, got, done, state

    def qsize(self) -> int:
        """Put minus got, over every process; what a process that died never sent is not counted."""
        put, got, _done, state = self._totals()
        return 0 if state == _IMMEDIATE else max(0, put - got)

    def unfinished(self) -> int:
        """Items put and not yet marked done (``task_done()``); dropped ones count as done."""
        put, got, done, state = self._totals()
        return max(0, (got if state == _IMMEDIATE else put) - done)

    def task_done(self) -> None:
        self._ensure_slot()
        with self.lock:
            if self.unfinished() <= 0:
                raise ValueError("task_done() called more times than there were items")
            self._count(_DONE, 1)

    def join(self) -> None:
        parent = _parent_channel()
        while self.unfinished() > 0:
            ready = _wait_for([parent] if parent is not None else [], [], JOIN_POLL_S)
            if ready:
                raise ShutDown("the main program of this task ended")

    def shutdown(self, immediate: bool) -> None:
        with self._locked():
            state = self._state()
            if immediate:
                if state != _IMMEDIATE:
                    self._close_writes_locked(_IMMEDIATE)  # qsize() is 0 from now on
            elif state == _OPEN:
                self.words[0] = _SHUTTING
                try:
                    os.write(self.wake_w, b"\0")  # producers waiting for a place raise now
                except OSError:
                    pass
        if immediate:
            while True:
                data = self._receive()
                if data is None or data is _EOF:
                    break
        else:
            self._close_writes_if_drained()

    @property
    def is_shutdown(self) -> bool:
        return self._state() != _OPEN

    def state_name(self) -> str:
        return ("open", "shut down", "shut down", "shut down (immediate)")[self._state()]

    def forget_in_child(self) -> None:
        """In a forked copy of this process: the backlog and the slot are the original's."""
        self.lock = threading.Lock()
        self.page_lock = threading.Lock()
        self.backlog = collections.deque()
        self.slot = _NO_SLOT
        self.via_parent = False


class _PageLock:
    """The shared page's lock: ``page_lock`` for this process's threads, ``lockf`` for the others.

    ``lockf`` locks belong to a process: alone, they would not keep two of its threads apart.
    """

    __slots__ = ("end",)

    def __init__(self, end: _Endpoint) -> None:
        self.end = end

    def __enter__(self) -> None:
        self.end.page_lock.acquire()
        try:
            lockf(self.end.page_fd, LOCK_EX)
        except BaseException:
            try:  # interrupted, maybe once it held the lock
                lockf(self.end.page_fd, LOCK_UN)
            finally:
                self.end.page_lock.release()
            raise

    def __exit__(self, *exc: object) -> None:
        try:
            lockf(self.end.page_fd, LOCK_UN)
        finally:
            self.end.page_lock.release()


def _forwarder() -> Optional[Tuple[int, Callable[[bytes], None]]]:
    """In a task: its main program's pid, and how to send it items (a QUEUED message)."""
    context = _taskctx.current
    if context is None or not context.has_channel:
        return None
    return context.parent_pid, context.forward


def _wait_for(readers: List[int], writers: List[int], timeout: Optional[float]) -> List[int]:
    """Wait until one of the descriptors is ready or ``timeout`` passes; the ready ones.

    Under gevent, cooperatively: the other greenlets run meanwhile.
    """
    return _platform.wait_fds(readers, writers, timeout, cooperative=_green.is_gevent_patched())


def _offset(slot: int) -> int:
    return _HEADER.size + _SLOT.size * slot


def _gone(pid: int, heir: int) -> bool:
    """Whether a slot's process, and the process that took its items on, have both ended."""
    return not _platform.process_running(pid) and not _platform.process_running(heir)


def _encode(item: Any) -> bytes:
    data = pickle.dumps(item, _PROTOCOL) if type(item) in _PLAIN else _serialization.dumps_value(item)
    if len(data) <= INLINE_MAX:
        return data
    return _FILE_HEAD.pack(_FILE_ITEM, len(data)) + data


def _write_all(fd: int, data: memoryview) -> None:
    while data:
        data = data[os.write(fd, data) :]


def _fill_places(fd: int, maxsize: int) -> None:
    """Write one byte per free place; the pipe must hold them all."""
    if maxsize > 4096:
        _platform.grow_pipe(fd, maxsize)
    os.set_blocking(fd, False)
    written = 0
    try:
        while written < maxsize:
            written += os.write(fd, b"\0" * (maxsize - written))
    except BlockingIOError:
        raise ValueError(f"Queue(): maxsize {maxsize} is more than this system allows ({written})") from None


def _close(words: memoryview, page: mmap.mmap, sockets: List[socket.socket], fds: List[int]) -> None:
    words.release()  # the page closes only once no view of it is left
    for sock in sockets:
        sock.close()
    _close_fds(page, fds)


def _close_fds(page: Optional[mmap.mmap], fds: List[int]) -> None:
    if page is not None:
        try:
            page.close()
        except (BufferError, ValueError):
            pass
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass


def _parent_channel() -> Optional[int]:
    """In a task, its channel to its main program: readable once that program is gone."""
    context = _taskctx.current
    return None if context is None else context.parent_fd()


class _Feeder:
    """Sends the backlogs on: one thread per process, running only while a backlog exists."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.busy: Dict[bytes, _Endpoint] = {}
        self.thread: Optional[threading.Thread] = None
        self.wake_w = -1

    def wake(self, end: _Endpoint) -> None:
        with self.lock:
            self.busy[end.qid] = end
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
        for end in busy:
            try:
                if end.flush():
                    sent.append(end)
            except Exception as exc:  # noqa: BLE001 (the items are dropped; say so, go on)
                import logging

                logging.getLogger("bgtask").error(
                    "bgtask: a queue's items could not be sent and were dropped: %s", exc
                )
                sent.append(end)
        with self.lock:
            for end in sent:
                if not end.backlog and self.busy.get(end.qid) is end:
                    del self.busy[end.qid]
            if not self.busy:
                self.thread = None
                self.wake_w = -1
                return False
            waiting = list(self.busy.values())
        # A datagram socket on macOS says it has room while its peer's buffer is full (ENOBUFS):
        # there, look again after a while instead.
        writers = [] if any(end.no_buffer for end in waiting) else [end.send_sock.fileno() for end in waiting]
        del waiting, busy, sent
        _wait_for([wake_r], writers, FEEDER_POLL_S)
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
_endpoints: weakref.WeakValueDictionary[bytes, _Endpoint] = weakref.WeakValueDictionary()


def adopt(body: Any) -> None:
    """Items a task of this process could not send (a QUEUED message), for queues held here."""
    for qid, slot, items in pickle.loads(body):
        end = _endpoints.get(qid)
        if end is not None:
            end.adopt(slot, items)


def _after_fork_in_child() -> None:
    _feeder.forget_in_child()
    for end in list(_endpoints.values()):
        end.forget_in_child()


os.register_at_fork(after_in_child=_after_fork_in_child)
