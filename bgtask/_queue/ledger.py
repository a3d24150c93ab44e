"""The sums over every process, and what a process that is gone left in its slot.

- ``claim``: this process's slot, on first use: a free one, or one of a process that is gone
  (its counts go to the header), or none beyond 1,024 processes.
- ``totals``: put, got and done over every process, once the slots of processes that are gone
  are settled (``qsize()``, ``unfinished_tasks``, ``task_done()``, ``join()``).
- ``retire``: settle the slot of a process that is gone. What it had in flight or unsent was
  lost (off the put count); an item it was receiving was taken (got); for a bounded queue, the
  free places are then set right (``reconcile``). Its parent does it as soon as it saw the task
  end (``release``); anyone else once it finds the process gone.

A slot names its process by pid and start time, and its heir (the main program a task handed
items to) the same way: a process that got one of those pids later is another one.

What no word can tell: whether a process killed inside the system call that sends or receives
an item got it across. It is taken as done (the kernel finishes such a call before the kill
takes effect), which is wrong only if the call found no room, or no item; and a kill in the
few instructions between marking the slot and making the call. The counts can then be one
item off, for good.
"""

from __future__ import annotations

import array
import os
import time
from typing import Dict, Tuple

from .._shared import platform as _platform
from .page import (
    DONE,
    GOT,
    HEIR,
    HEIR_START,
    LOW,
    NO_SLOT,
    PID,
    PUT,
    RETIRED_DONE,
    RETIRED_GOT,
    RETIRED_PUT,
    SHARED,
    SHARED_UNSENT,
    SLOT_WORDS,
    SLOTS,
    START,
    STATE,
    UNIT,
    UNSENT,
    USED,
    Page,
    slot_start,
)

# A process seen running is taken to run for this long, before /proc is read again for it.
ALIVE_FOR_S = 0.02


def claim(page: Page) -> None:
    """Claim this process's slot on first use. Never with the page lock held."""
    if page.slot == NO_SLOT:
        with page.locked():
            page.slot = _claim_locked(page)


def _claim_locked(page: Page) -> int:
    """A free slot, one of a process that is gone, or ``SHARED``."""
    words = page.words
    used = words[USED]
    start = -1
    if used < SLOTS:
        start = slot_start(used)
        words[USED] = used + 1
    else:
        for at in page.starts():
            if _gone(page, at):
                _retire_locked(page, at)  # its counts go to the header's
                words[RETIRED_PUT] += words[at + PUT] >> 20
                words[RETIRED_GOT] += words[at + GOT] >> 20
                words[RETIRED_DONE] += words[at + DONE]
                start = at
                break
    if start < 0:
        return SHARED  # beyond the table: this process counts in the header, locked
    pid, began = own_identity()
    words[start : start + SLOT_WORDS] = array.array("q", (pid, began, 0, 0, 0, 0, 0, 0))
    if used >= SLOTS:
        _reconcile_locked(page)  # the slot taken over may have held places
    return start


# -- processes that are gone ----------------------------------------------------------------


def release(page: Page, pid: int) -> None:
    """Process ``pid`` (a task of this process) ended, and this process read all it handed
    over: settle its slot."""
    words = page.words
    with page.locked():
        for at in page.starts():
            if words[at + PID] == pid and not _platform.process_running(pid, words[at + START]):
                _retire_locked(page, at)
        _reconcile_locked(page)


def retire_gone(page: Page) -> bool:
    """Settle the slots of processes that are gone; whether free places came back."""
    with page.locked():
        _retire_gone_locked(page)
        return _reconcile_locked(page) > 0


def _retire_gone_locked(page: Page) -> bool:
    words = page.words
    settled = False
    for at in page.starts():
        busy = words[at + UNSENT] or (words[at + PUT] | words[at + GOT]) & (UNIT - 1)
        if busy and _gone(page, at):
            settled = _retire_locked(page, at) or settled
    return settled


def _retire_locked(page: Page, at: int) -> bool:
    """Settle the slot of a process that is gone; whether there was anything to settle."""
    words = page.words
    put, got, unsent = words[at + PUT], words[at + GOT], words[at + UNSENT]
    if not unsent and not (put | got) & (UNIT - 1):
        return False
    lost = unsent + (put & LOW)  # never sent
    receiving = got & LOW  # taken from the socket, as it most likely was
    words[at + PUT] = ((put >> 20) - lost) * UNIT
    words[at + GOT] = ((got >> 20) + receiving) * UNIT
    words[at + UNSENT] = 0
    return True


def _reconcile_locked(page: Page) -> int:
    """A bounded queue: set the free places right, if no live process is taking or giving
    one; how many came back.

    The counts and the pipe are read twice around the pipe's count: if nothing changed,
    no process was in the middle of a put or get meanwhile, and the pipe must hold as
    many bytes as the queue has free places.
    """
    places = page.places
    words = page.words
    if places is None or words[USED] >= SLOTS:  # beyond the table, puts leave no trace
        return 0
    end = slot_start(words[USED])
    before = words[:end].tolist()
    for at in page.starts():
        if (before[at + PUT] >> 10 & LOW or before[at + GOT] & (UNIT - 1)) and not _gone(page, at):
            return 0  # a live process takes or gives a place now
    free = places.free()
    if words[:end].tolist() != before:
        return 0
    queued = before[RETIRED_PUT] - before[RETIRED_GOT]
    queued += sum((before[at + PUT] >> 20) - (before[at + GOT] >> 20) for at in page.starts())
    missing = places.maxsize - max(0, queued) - free
    if missing:
        places.adjust(missing)
    return missing


def _gone(page: Page, at: int) -> bool:
    """Whether a slot's process, and the process that took its items on, have both ended."""
    words = page.words
    return not _running(words[at + PID], words[at + START]) and not _running(
        words[at + HEIR], words[at + HEIR_START]
    )


# -- sums ----------------------------------------------------------------------------------


def items_on_their_way_locked(page: Page) -> bool:
    """Whether a live process (or its heir) holds items not yet in the socket."""
    _retire_gone_locked(page)
    words = page.words
    return words[SHARED_UNSENT] > 0 or any(
        words[at + UNSENT] > 0 or words[at + PUT] & LOW for at in page.starts()
    )


def totals(page: Page) -> Tuple[int, int, int, int]:
    """Over every process: put (but not what was lost with a process that died), got,
    done, and the state."""
    words = page.words
    with page.locked():
        if _retire_gone_locked(page):
            _reconcile_locked(page)
        put, got, done = words[RETIRED_PUT], words[RETIRED_GOT], words[RETIRED_DONE]
        for at in page.starts():
            put += words[at + PUT] >> 20
            got += words[at + GOT] >> 20
            done += words[at + DONE]
        state: int = words[STATE]
    return put, got, done, state


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
