"""A bounded queue's free places: a pipe that holds one byte per free place.

::

    put:  reserve (page) --take a byte--> count the item (page: it holds the place now)
    get:  count the item as got, and the place as owed (page) --give a byte--> owed no more

The pipe is a semaphore every process shares, and a waiting ``put`` polls it. The page's
counts say how many places are free: when a process dies between taking or giving a byte and
writing so in its slot, the bytes are set right again (``reconcile``) at a moment when no live
process is in the middle of either, which a ``put`` waiting for a place finds.
"""

from __future__ import annotations

import os

from .._shared import platform as _platform

# Free places of a bounded queue are bytes in a pipe: it holds this many on every system.
MAXSIZE_LIMIT = 65536


class Places:
    """This process's ends of a bounded queue's pipe of free places."""

    def __init__(self, maxsize: int, read_fd: int, write_fd: int) -> None:
        self.maxsize = maxsize
        self.read_fd = read_fd
        self.write_fd = write_fd

    def take(self) -> bool:
        """Take a free place; ``False`` if there is none now."""
        try:
            return bool(os.read(self.read_fd, 1))
        except BlockingIOError:
            return False

    def give(self) -> None:
        """Give a place back."""
        try:
            os.write(self.write_fd, b"\0")
        except OSError:
            pass  # the pipe is full: every place is free already

    def free(self) -> int:
        """How many places are free: the bytes in the pipe."""
        return _platform.pipe_bytes(self.read_fd)

    def adjust(self, delta: int) -> None:
        """Give back ``delta`` places that the pipe lacks, or take away -``delta`` too many."""
        try:
            if delta > 0:
                os.write(self.write_fd, b"\0" * delta)
            elif delta < 0:
                os.read(self.read_fd, -delta)
        except OSError:
            pass  # full, or empty: another process took or gave one meanwhile, as it may


def fill(fd: int, maxsize: int) -> None:
    """Write one byte per free place into a new pipe; it must hold them all."""
    if maxsize > 4096:
        _platform.grow_pipe(fd, maxsize)
    os.set_blocking(fd, False)
    written = 0
    try:
        while written < maxsize:
            written += os.write(fd, b"\0" * (maxsize - written))
    except BlockingIOError:
        raise ValueError(f"Queue(): maxsize {maxsize} is more than this system allows ({written})") from None
