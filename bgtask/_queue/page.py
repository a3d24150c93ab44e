"""The shared page: a queue's state, and the counts of every process that used it.

A memory file every process holding the queue maps, read and written as 8-byte words (one
access each: another process never sees half of a write)::

    header  state | slots in use | retired put | retired got | shared unsent | retired done
    slot 0  pid | heir | put | got | unsent | done          one per process that used the queue
    slot 1  ...
    ...     (1,024 slots; a process beyond them counts in the header, under the lock)

- *put*, *got*, *done* (``task_done()`` calls): what the process did; ``qsize()`` and
  ``unfinished_tasks`` are sums over the slots and the header.
- *unsent*: items the process counted as put that are not in the socket yet: in its backlog
  (the main program) or handed to its main program (a task), which then takes them over
  (*heir*: that program's pid). What a process that is gone, heir too, never sent is lost.
- A process writes its own slot's counts alone (its threads under its endpoint's lock); a
  word written by one process and read by another needs no lock. Everything that another
  process writes too (the header, a slot being claimed or taken over) changes under the page
  lock: a thread lock for this process's threads, then ``lockf`` for the other processes (the
  kernel releases it if its holder dies).
"""

from __future__ import annotations

import array
import fcntl
import mmap
import os
import threading
from typing import List, Tuple

from .. import _platform

# The states: open; shut down, waiting for items on their way from backlogs; shut down, writes
# closed; shut down at once.
OPEN, SHUTTING, SHUT, IMMEDIATE = 0, 1, 2, 3
STATE_NAMES = ("open", "shut down", "shut down", "shut down (immediate)")

# The header's words.
_STATE, _USED, _RETIRED_PUT, _RETIRED_GOT, _SHARED_UNSENT, _RETIRED_DONE = range(6)
_HEADER_WORDS = 6
# A slot's words, from its start.
PID, HEIR, PUT, GOT, UNSENT, DONE = range(6)
_SLOT_WORDS = 6
_SLOTS = 1024
SIZE = 8 * (_HEADER_WORDS + _SLOT_WORDS * _SLOTS)
# Where a process beyond the table counts each of its counts, in the header.
_SHARED_FIELD = {PUT: _RETIRED_PUT, GOT: _RETIRED_GOT, UNSENT: _SHARED_UNSENT, DONE: _RETIRED_DONE}

NO_SLOT, SHARED = -1, -2  # no slot claimed yet; beyond the table (counts in the header)

Slot = Tuple[int, int, int, int, int, int]  # pid, heir, put, got, unsent, done


class Page:
    """This process's map of a queue's shared page, and its slot there.

    ``slot`` is the word index of this process's slot once claimed, or ``SHARED``.
    """

    def __init__(self, fd: int) -> None:
        self.fd = fd
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
        index = -1
        if used < _SLOTS:
            index = used
            words[_USED] = used + 1
        else:
            for i in range(_SLOTS):
                pid, heir, put, got, unsent, done = self._slot_locked(i)
                if _gone(pid, heir):
                    # Its counts go to the header's; what it never sent was lost with it.
                    words[_RETIRED_PUT] += put - unsent
                    words[_RETIRED_GOT] += got
                    words[_RETIRED_DONE] += done
                    index = i
                    break
        if index < 0:
            return SHARED  # beyond the table: this process counts in the header, locked
        start = _start(index)
        words[start : start + _SLOT_WORDS] = array.array("q", (os.getpid(), 0, 0, 0, 0, 0))
        return start

    def slots_locked(self) -> List[Slot]:
        return [self._slot_locked(i) for i in range(min(self.words[_USED], _SLOTS))]

    def _slot_locked(self, index: int) -> Slot:
        start = _start(index)
        pid, heir, put, got, unsent, done = self.words[start : start + _SLOT_WORDS].tolist()
        return pid, heir, put, got, unsent, done

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

    def set_heir_locked(self, heir: int) -> None:
        if self.slot >= 0:
            self.words[self.slot + HEIR] = heir

    def hand_over_locked(self, child: int, n: int) -> None:
        """``n`` items that ``child`` (a slot, or ``SHARED``) counted as unsent are this
        process's now."""
        at = _SHARED_UNSENT if child == SHARED else child + UNSENT
        self.words[at] = max(0, self.words[at] - n)
        self.count_locked(UNSENT, n)

    def release_locked(self, pid: int, heir: int) -> None:
        """Process ``pid`` ended, and its heir ``heir`` read all it handed over: what it still
        counted as unsent will not come."""
        for i, (spid, sheir, _put, _got, unsent, _done) in enumerate(self.slots_locked()):
            if spid == pid and sheir == heir and unsent > 0:
                self.words[_start(i) + UNSENT] = 0

    def items_on_their_way_locked(self) -> bool:
        """Whether a live process (or its heir) holds items not yet in the socket."""
        return self.words[_SHARED_UNSENT] > 0 or any(
            unsent > 0 and not _gone(pid, heir) for pid, heir, _p, _g, unsent, _d in self.slots_locked()
        )

    def totals(self) -> Tuple[int, int, int, int]:
        """Over every process: put (minus what was lost with a process that died), got, done,
        and the state."""
        words = self.words
        with self.locked():
            state = words[_STATE]
            slots = self.slots_locked()
            put, got, done = words[_RETIRED_PUT], words[_RETIRED_GOT], words[_RETIRED_DONE]
        for pid, heir, slot_put, slot_got, unsent, slot_done in slots:
            put += slot_put
            got += slot_got
            done += slot_done
            if unsent > 0 and _gone(pid, heir):
                put -= unsent  # lost with its process
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


def _gone(pid: int, heir: int) -> bool:
    """Whether a slot's process, and the process that took its items on, have both ended."""
    return not _platform.process_running(pid) and not _platform.process_running(heir)
