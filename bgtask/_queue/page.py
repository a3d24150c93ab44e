"""The shared page: a queue's state, and the counts of every process that used it.

A memory file every process holding the queue maps, read and written as 8-byte words (one
access each: another process never sees half of a write)::

    header  state | slots in use | retired put | retired got | shared unsent | retired done | files
    slot 0  pid | start | heir | heir start | put | got | unsent | done | in flight | places
    slot 1  ...                                 one per process that used the queue
    ...     (1,024 slots; a process beyond them counts in the header, under the lock)

- A slot names its process by pid and start time: a process that got the pid later is
  another one.
- *put*, *got*, *done* (``task_done()`` calls): what the process did; ``qsize()`` and
  ``unfinished_tasks`` are sums over the slots and the header.
- *in flight*: items the process counted as put and is sending now. *unsent*: items it
  counted as put that wait for room (its backlog), or that it handed to its main program
  (a task), which then takes them over (*heir*: that program).
- *places* (a bounded queue): places the process may have taken from the pipe of free places
  and not yet handed to an item it put, or owes back for an item it got.
- *files*: at least as many as the items in the socket that travel in a memory file (see
  ``transport``); more when a process died while it sent one.
- When a process is gone (and its heir too, for what it handed over), what it had in flight
  or unsent is lost: ``retire`` takes those items off its put count and gives their places
  back, with the places it held. Its parent does it as soon as it saw the task end
  (``release``); anyone else once it finds the process gone.
- A process writes its own slot's counts alone (its threads under its endpoint's lock); a
  word written by one process and read by another needs no lock. Everything another process
  writes too (the header, a slot being claimed, taken over or retired) changes under the page
  lock: a thread lock for this process's threads, then ``lockf`` for the other processes (the
  kernel releases it if its holder dies).
"""

from __future__ import annotations

import array
import fcntl
import mmap
import os
import threading
import time
from typing import Dict, Tuple

from .._shared import platform as _platform

# The states: open; shut down, waiting for items on their way from backlogs; shut down, writes
# closed; shut down at once.
OPEN, SHUTTING, SHUT, IMMEDIATE = 0, 1, 2, 3
STATE_NAMES = ("open", "shut down", "shut down", "shut down (immediate)")

# The header's words.
_STATE, _USED, _RETIRED_PUT, _RETIRED_GOT, _SHARED_UNSENT, _RETIRED_DONE, _FILES = range(7)
_HEADER_WORDS = 7
# A slot's words, from its start.
PID, START, HEIR, HEIR_START, PUT, GOT, UNSENT, DONE, INFLIGHT, PLACES = range(10)
_SLOT_WORDS = 10
_SLOTS = 1024
SIZE = 8 * (_HEADER_WORDS + _SLOT_WORDS * _SLOTS)
# Where a process beyond the table counts each of its counts, in the header.
_SHARED_FIELD = {PUT: _RETIRED_PUT, GOT: _RETIRED_GOT, UNSENT: _SHARED_UNSENT, DONE: _RETIRED_DONE}
# A process seen running is taken to run for this long, before /proc is read again for it.
ALIVE_FOR_S = 0.02

NO_SLOT, SHARED = -1, -2  # no slot claimed yet; beyond the table (counts in the header)


class Page:
    """This process's map of a queue's shared page, and its slot there.

    ``slot`` is the word index of this process's slot once claimed, or ``SHARED``.
    ``places_w``: a bounded queue's pipe of free places, where retired places go back.
    """

    def __init__(self, fd: int, places_w: int = -1) -> None:
        self.fd = fd
        self.places_w = places_w
        self.map = mmap.mmap(fd, SIZE)
        self.words = memoryview(self.map).cast("q")
        self.lock = threading.Lock()  # this process's threads; lockf keeps out the others
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
        self.slot = NO_SLOT

    # -- state ------------------------------------------------------------------------------

    @property
    def state(self) -> int:
        state: int = self.words[_STATE]
        return state

    def set_state_locked(self, state: int) -> None:
        self.words[_STATE] = state

    # -- slots ------------------------------------------------------------------------------

    def ensure_slot(self) -> None:
        """Claim this process's slot on first use. Never with the page lock held."""
        if self.slot == NO_SLOT:
            with self.locked():
                self.slot = self._claim_locked()

    def _claim_locked(self) -> int:
        """A free slot, one of a process that is gone, or ``SHARED``."""
        words = self.words
        used = words[_USED]
        start = -1
        if used < _SLOTS:
            start = _start(used)
            words[_USED] = used + 1
        else:
            for index in range(_SLOTS):
                at = _start(index)
                if self._gone(at):
                    self._retire_locked(at)
                    # Its counts go to the header's.
                    words[_RETIRED_PUT] += words[at + PUT]
                    words[_RETIRED_GOT] += words[at + GOT]
                    words[_RETIRED_DONE] += words[at + DONE]
                    start = at
                    break
        if start < 0:
            return SHARED  # beyond the table: this process counts in the header, locked
        pid, began = own_identity()
        words[start : start + _SLOT_WORDS] = array.array("q", (pid, began, 0, 0, 0, 0, 0, 0, 0, 0))
        return start

    def _starts(self) -> range:
        return range(_HEADER_WORDS, _start(min(self.words[_USED], _SLOTS)), _SLOT_WORDS)

    @staticmethod
    def valid_slot(slot: int) -> bool:
        """Whether ``slot`` (from another process: a task's message) names a slot, or ``SHARED``."""
        return slot == SHARED or (
            _HEADER_WORDS <= slot < _start(_SLOTS) and (slot - _HEADER_WORDS) % _SLOT_WORDS == 0
        )

    # -- counts -----------------------------------------------------------------------------

    def count(self, field: int, delta: int) -> None:
        """Add to one of this process's counts. Under the endpoint's lock: no other process
        writes them (beyond the table, in the header, under the page lock)."""
        slot = self.slot
        if slot >= 0:
            self.words[slot + field] += delta
        else:
            with self.locked():
                self.words[_SHARED_FIELD[field]] += delta

    def count_locked(self, field: int, delta: int) -> None:
        """``count``, with the page lock held."""
        slot = self.slot
        self.words[slot + field if slot >= 0 else _SHARED_FIELD[field]] += delta

    def mark(self, field: int, delta: int) -> None:
        """Add to this process's items in flight or places held, under the endpoint's lock.

        Beyond the table, nothing: what such a process holds is not given back if it dies.
        """
        slot = self.slot
        if slot >= 0:
            self.words[slot + field] += delta

    def set_heir_locked(self, heir: Tuple[int, int]) -> None:
        slot = self.slot
        if slot >= 0 and (self.words[slot + HEIR], self.words[slot + HEIR_START]) != heir:
            self.words[slot + HEIR], self.words[slot + HEIR_START] = heir

    def hand_over_locked(self, child: int, n: int) -> None:
        """``n`` items that ``child`` (a slot, or ``SHARED``) counted as unsent are this
        process's now."""
        at = _SHARED_UNSENT if child == SHARED else child + UNSENT
        self.words[at] = max(0, self.words[at] - n)
        self.count_locked(UNSENT, n)

    # -- large items ------------------------------------------------------------------------

    def files_pending(self) -> bool:
        """Whether an item that travels in a memory file may be in the socket."""
        return bool(self.words[_FILES] > 0)

    def add_files(self, delta: int) -> None:
        """Count file items going into the socket (before they are sent), or out of it."""
        with self.locked():
            self.words[_FILES] = max(0, self.words[_FILES] + delta)

    # -- processes that are gone ------------------------------------------------------------

    def release(self, pid: int) -> None:
        """Process ``pid`` (a task of this process) ended, and this process read all it handed
        over: what it still had in flight or unsent will not come."""
        words = self.words
        with self.locked():
            for at in self._starts():
                if words[at + PID] == pid and not _platform.process_running(pid, words[at + START]):
                    self._retire_locked(at)

    def _retire_locked(self, at: int) -> int:
        """The slot's process is gone: take what it did not send off its put count, and give
        back the places of those items and the places it held. Returns how many places."""
        words = self.words
        lost = words[at + UNSENT] + words[at + INFLIGHT]
        places = lost + words[at + PLACES]
        if not lost and not words[at + PLACES]:
            return 0
        words[at + PUT] -= lost
        words[at + UNSENT] = words[at + INFLIGHT] = words[at + PLACES] = 0
        if self.places_w < 0 or places <= 0:
            return 0
        try:
            os.write(self.places_w, b"\0" * places)
        except OSError:
            pass  # the pipe is full: every place is free already
        return places

    def retire_gone(self) -> bool:
        """Retire the slots of processes that are gone; whether places came back."""
        with self.locked():
            return self._retire_gone_locked() > 0

    def _retire_gone_locked(self) -> int:
        """Retire the slots of processes that are gone and held items or places; the places
        that came back."""
        words = self.words
        places = 0
        for at in self._starts():
            if (words[at + UNSENT] > 0 or words[at + INFLIGHT] > 0 or words[at + PLACES] > 0) and self._gone(
                at
            ):
                places += self._retire_locked(at)
        return places

    def _gone(self, at: int) -> bool:
        """Whether a slot's process, and the process that took its items on, have both ended."""
        words = self.words
        return not _running(words[at + PID], words[at + START]) and not _running(
            words[at + HEIR], words[at + HEIR_START]
        )

    # -- sums -------------------------------------------------------------------------------

    def items_on_their_way_locked(self) -> bool:
        """Whether a live process (or its heir) holds items not yet in the socket."""
        self._retire_gone_locked()
        words = self.words
        return words[_SHARED_UNSENT] > 0 or any(
            words[at + UNSENT] > 0 or words[at + INFLIGHT] > 0 for at in self._starts()
        )

    def totals(self) -> Tuple[int, int, int, int]:
        """Over every process: put (but not what was lost with a process that died), got,
        done, and the state."""
        words = self.words
        with self.locked():
            self._retire_gone_locked()
            put, got, done = words[_RETIRED_PUT], words[_RETIRED_GOT], words[_RETIRED_DONE]
            for at in self._starts():
                put += words[at + PUT]
                got += words[at + GOT]
                done += words[at + DONE]
            state: int = words[_STATE]
        return put, got, done, state


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


def _start(index: int) -> int:
    return _HEADER_WORDS + _SLOT_WORDS * index


_identity: Tuple[int, int] = (0, 0)


def own_identity() -> Tuple[int, int]:
    """This process's pid and start time (read once per process)."""
    global _identity
    pid = os.getpid()
    if _identity[0] != pid:
        _identity = (pid, _platform.process_start_time(pid))
    return _identity


_alive_until: Dict[Tuple[int, int], float] = {}


def _running(pid: int, start: int) -> bool:
    """``process_running``, taken as true for ``ALIVE_FOR_S`` once seen: the sums that need it
    run often (``task_done()``, a consumer draining a shut-down queue)."""
    if pid <= 0:
        return False
    now = time.monotonic()
    if _alive_until.get((pid, start), 0.0) > now:
        return True
    if not _platform.process_running(pid, start):
        _alive_until.pop((pid, start), None)
        return False
    if len(_alive_until) > 1024:
        _alive_until.clear()
    _alive_until[(pid, start)] = now + ALIVE_FOR_S
    return True
