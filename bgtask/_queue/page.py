"""The shared page: a queue's state, and the counts of every process that used it.

A memory file every process holding the queue maps, read and written as 8-byte words (one
access each: another process never sees half of a write)::

    header  state | slots in use | retired put | retired got | shared unsent | retired done | files
    slot 0  pid | start | heir | heir start | put | got | unsent | done
    slot 1  ...                                 one per process that used the queue
    ...     (1,024 slots; a process beyond them counts in the header, under the lock)

- A slot names its process by pid and start time: a process that got the pid later is
  another one.
- *put*, *got*, *done* (``task_done()`` calls): what the process did; ``qsize()`` and
  ``unfinished_tasks`` are sums over the slots and the header.
- Below its count, the put word holds the item the process is putting (counted as put, not
  yet in the socket: *in flight*) and the place of a bounded queue it may have taken for a put
  not counted yet; the got word, the item it is receiving (taken from the socket, maybe, and
  not counted yet) and the place it owes back for an item it got. Each change of a put or a
  get is one write of one word, so a process killed at any moment leaves them whole.
- *unsent*: items the process counted as put that wait for room (its backlog), or that it
  handed to its main program (a task), which then takes them over (*heir*: that program).
- *files*: at least as many as the items in the socket that travel in a memory file (see
  ``transport``); more when a process died while it sent one.
- What a process that is gone left in its slot is settled by ``ledger``, which also sums the
  counts over every process.
- A process writes its own slot alone (its threads under ``slot_lock``); a word written by
  one process and read by another needs no lock. Everything another process writes too (the
  header, a slot being claimed, taken over or retired) changes under the page lock: a thread
  lock for this process's threads, then ``lockf`` for the other processes (the kernel releases
  it if its holder dies).
"""

from __future__ import annotations

import fcntl
import mmap
import threading
from typing import Callable, Optional, Protocol, Tuple, TypeVar

# The states: open; shut down, waiting for items on their way from backlogs; shut down, writes
# closed; shut down at once.
OPEN, SHUTTING, SHUT, IMMEDIATE = 0, 1, 2, 3
STATE_NAMES = ("open", "shut down", "shut down", "shut down (immediate)")

# The header's words.
STATE, USED, RETIRED_PUT, RETIRED_GOT, SHARED_UNSENT, RETIRED_DONE, FILES = range(7)
HEADER_WORDS = 7
# A slot's words, from its start.
PID, START, HEIR, HEIR_START, PUT, GOT, UNSENT, DONE = range(8)
SLOT_WORDS = 8
SLOTS = 1024
SIZE = 8 * (HEADER_WORDS + SLOT_WORDS * SLOTS)
# The put and got words: the count, times UNIT, plus two small counts (threads at most):
#   put word = put * UNIT + places taken for a put not yet counted * STEP + items in flight
#   got word = got * UNIT + places owed back * STEP + items being received
STEP, UNIT = 1 << 10, 1 << 20
LOW = STEP - 1
# Where a process beyond the table counts each of its counts, in the header (no more).
SHARED_FIELD = {PUT: RETIRED_PUT, GOT: RETIRED_GOT, UNSENT: SHARED_UNSENT, DONE: RETIRED_DONE}
NO_SLOT, SHARED = -1, -2  # no slot claimed yet; beyond the table (counts in the header)

_R = TypeVar("_R")


class FreePlaces(Protocol):
    """A bounded queue's pipe of free places (``places.Places``)."""

    maxsize: int

    def free(self) -> int: ...

    def adjust(self, delta: int) -> None: ...


class Page:
    """This process's map of a queue's shared page, and its slot there.

    ``slot`` is the word index of this process's slot once claimed, or ``SHARED``.
    ``places``: a bounded queue's pipe of free places, set right after a process died.
    """

    def __init__(self, fd: int, places: Optional[FreePlaces] = None) -> None:
        self.fd = fd
        self.places = places
        self.map = mmap.mmap(fd, SIZE)
        self.words = memoryview(self.map).cast("q")
        self.lock = threading.Lock()  # this process's threads; lockf keeps out the others
        self.slot_lock = threading.Lock()  # this process's threads, writing its slot
        self.slot = NO_SLOT

    def locked(self) -> _PageLock:
        return _PageLock(self)

    def close(self) -> None:
        self.words.release()  # the map closes only once no view of it is left
        try:
            self.map.close()
        except (BufferError, ValueError):
            pass

    def forget_in_child(self) -> None:
        """In a forked copy of this process: the slot is the original's."""
        self.lock = threading.Lock()
        self.slot_lock = threading.Lock()
        self.slot = NO_SLOT

    @property
    def state(self) -> int:
        state: int = self.words[STATE]
        return state

    def set_state_locked(self, state: int) -> None:
        self.words[STATE] = state

    # -- slots ------------------------------------------------------------------------------

    def starts(self) -> range:
        return range(HEADER_WORDS, slot_start(min(self.words[USED], SLOTS)), SLOT_WORDS)

    @staticmethod
    def valid_slot(slot: int) -> bool:
        """Whether ``slot`` (from another process: a task's message) names a slot, or ``SHARED``."""
        return slot == SHARED or (
            HEADER_WORDS <= slot < slot_start(SLOTS) and (slot - HEADER_WORDS) % SLOT_WORDS == 0
        )

    # -- this process's counts: each change one write ---------------------------------------

    def _add(self, field: int, delta: int) -> None:
        """Add to one of this process's words (beyond the table: a header count, locked)."""
        if self.slot >= 0:
            with self.slot_lock:
                self.words[self.slot + field] += delta
        elif field in SHARED_FIELD and delta % UNIT == 0:
            with self.locked():
                self.words[SHARED_FIELD[field]] += delta // UNIT

    def count(self, field: int, delta: int) -> None:
        """Add to this process's unsent or done count."""
        if self.slot >= 0:
            with self.slot_lock:
                self.words[self.slot + field] += delta
        else:
            with self.locked():
                self.words[SHARED_FIELD[field]] += delta

    def put_reserve(self, n: int) -> None:
        """A put may take a place now (``n`` 1), or did not (-1)."""
        if self.slot >= 0:
            self._add(PUT, n * STEP)

    def put_counted(self, placed: bool, n: int = 1) -> None:
        """A put's item counts as put and in flight (with the place reserved for it); -1: not."""
        if self.slot >= 0:
            self._add(PUT, n * (UNIT + 1 - (STEP if placed else 0)))
        else:
            self._add(PUT, n * UNIT)

    def sent(self, send: Callable[..., object], *args: object) -> None:
        """Run ``send(*args)``, the system call that puts this process's item in flight into the
        socket: as it starts, the item stops to count as in flight (a kill during the call
        leaves it counted as sent); again if it raises."""
        if self.slot < 0:
            send(*args)
            return
        at, words = self.slot + PUT, self.words
        with self.slot_lock:
            words[at] -= 1
            try:
                send(*args)
            except BaseException:
                words[at] += 1
                raise

    def received(
        self, receive: Callable[..., _R], is_item: Callable[[_R], bool], bounded: bool, *args: object
    ) -> Optional[_R]:
        """Run ``receive(*args)``, the system call that may take an item from the socket, with
        this process's slot marked (a kill during the call counts the item as got); its result,
        or ``None`` if the socket was empty. An item counts as got, and, ``bounded``, its place
        as owed back."""
        if self.slot < 0:
            try:
                result = receive(*args)
            except BlockingIOError:
                return None
            if is_item(result):
                self._add(GOT, UNIT)
            return result
        at, words = self.slot + GOT, self.words
        with self.slot_lock:
            words[at] += 1
            try:
                result = receive(*args)
            except BaseException as exc:
                words[at] -= 1
                if isinstance(exc, BlockingIOError):
                    return None
                raise
            words[at] += (UNIT - 1 + (STEP if bounded else 0)) if is_item(result) else -1
        return result

    def put_kept_locked(self, n: int) -> None:
        """Under the page lock: ``n`` items in flight wait now (a backlog, the main program);
        -``n``: in flight again."""
        self.count_locked(UNSENT, n)
        if self.slot >= 0:
            with self.slot_lock:
                self.words[self.slot + PUT] -= n

    def place_returned(self) -> None:
        if self.slot >= 0:
            self._add(GOT, -STEP)

    def count_locked(self, field: int, delta: int) -> None:
        """Add to this process's unsent or done count, with the page lock held."""
        if self.slot >= 0:
            with self.slot_lock:
                self.words[self.slot + field] += delta
        else:
            self.words[SHARED_FIELD[field]] += delta

    def set_heir_locked(self, heir: Tuple[int, int]) -> None:
        slot = self.slot
        if slot >= 0 and (self.words[slot + HEIR], self.words[slot + HEIR_START]) != heir:
            self.words[slot + HEIR], self.words[slot + HEIR_START] = heir

    def hand_over_locked(self, child: int, n: int) -> None:
        """``n`` items that ``child`` (a slot, or ``SHARED``) counted as unsent are this
        process's now."""
        at = SHARED_UNSENT if child == SHARED else child + UNSENT
        self.words[at] = max(0, self.words[at] - n)
        self.count_locked(UNSENT, n)

    # -- large items ------------------------------------------------------------------------

    def files_pending(self) -> bool:
        """Whether an item that travels in a memory file may be in the socket."""
        return bool(self.words[FILES] > 0)

    def add_files(self, delta: int) -> None:
        """Count file items going into the socket (before they are sent), or out of it."""
        with self.locked():
            self.words[FILES] = max(0, self.words[FILES] + delta)


class _PageLock:
    """The page lock: ``Page.lock`` for this process's threads, ``lockf`` for the others.

    ``lockf`` locks belong to a process: alone, they would not keep two of its threads apart.
    """

    __slots__ = ("page",)

    def __init__(self, page: Page) -> None:
        self.page = page

    def __enter__(self) -> None:
        page = self.page
        page.lock.acquire()
        try:
            fcntl.lockf(page.fd, fcntl.LOCK_EX)
        except BaseException:
            try:  # interrupted, maybe once it held the lock
                fcntl.lockf(page.fd, fcntl.LOCK_UN)
            finally:
                page.lock.release()
            raise

    def __exit__(self, *exc: object) -> None:
        try:
            fcntl.lockf(self.page.fd, fcntl.LOCK_UN)
        finally:
            self.page.lock.release()


def slot_start(index: int) -> int:
    return HEADER_WORDS + SLOT_WORDS * index
