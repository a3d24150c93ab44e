"""Large buffers by reference: written once into memory files, mapped on the other side.

A value is pickled with protocol 5, and each out-of-band buffer (``pickle.PickleBuffer``: NumPy
arrays, and whatever else exports one) of at least ``BY_REFERENCE`` bytes is written once into
a memory file of its own, which travels with the message as a descriptor. The receiver maps it
copy-on-write and the object is built on the mapping: no further copy, pages read only where
they are read, writable without touching the sender's memory::

    sender:    pickle(..., buffer_callback=BufferFiles)    each large buffer -> a memory file,
                                                           written once, sent as a descriptor
    receiver:  map_buffer(fd) -> a private mapping  ->  pickle.loads(data, buffers=[...])

A call's files are its last descriptors, counted by the body's last 2 bytes (``add_count``;
always there, 0 on Ray); a return value's come with its RESULT message, and the monitor maps
them as it reads it (``receive_buffers``, giving a ``Mapped`` body).

On Ray no descriptor travels: the large buffers go out of band as ``PickleBuffer``s beside the
pickle (``BufferViews``), which Ray's object store carries as they are; the receiver copies
each once out of the store's read-only memory (``writable``) as it unpickles.
"""

from __future__ import annotations

import os
import pickle
from typing import Any, Callable, List, Optional, Union

from . import platform, wire
from .wire import Body, Pieces

# A buffer of at least this many bytes goes in a memory file rather than in the pickle: below
# it, creating, filling and mapping a file costs more than copying through the socket does.
BY_REFERENCE = 1024 * 1024
# At most this many of a message's buffers go by reference (the rest in the pickle): the other
# descriptors a call may carry keep their room.
MAX_BUFFER_FILES = 64


class BufferFiles:
    """The pickler's ``buffer_callback``: a large buffer goes into a memory file of its own
    (``False``: out of band); any other stays in the pickle (``True``)."""

    __slots__ = ("files", "room")

    def __init__(self, files: List[int], room: Callable[[], bool] = lambda: True) -> None:
        self.files = files
        self.room = room  # whether one more descriptor fits in the message

    def __call__(self, buffer: pickle.PickleBuffer) -> bool:
        view = _large(buffer)
        if view is None or len(self.files) >= MAX_BUFFER_FILES or not self.room():
            return True
        try:
            fd = platform.memory_file("bgtask-buffer")
        except OSError:  # no descriptor left: in band, slower but sent
            return True
        try:
            write_all(fd, view)
        except OSError:  # no memory for the file (ENOSPC, ENOMEM): in band
            os.close(fd)
            return True
        except BaseException:
            os.close(fd)
            raise
        self.files.append(fd)
        return False


class BufferViews:
    """The pickler's ``buffer_callback`` on Ray: a large buffer goes out of band as a
    ``PickleBuffer`` appended to ``views``, which Ray's object store carries without a copy in
    the pickle (see ``writable``); any other stays in the pickle."""

    __slots__ = ("views",)

    def __init__(self, views: List[Any]) -> None:
        self.views = views

    def __call__(self, buffer: pickle.PickleBuffer) -> bool:
        if _large(buffer) is None:
            return True
        self.views.append(buffer)
        return False


def _large(buffer: pickle.PickleBuffer) -> Optional[memoryview]:
    """The buffer's memory if it goes out of band: contiguous, and ``BY_REFERENCE`` or more."""
    try:
        view = buffer.raw()
    except BufferError:  # not contiguous: pickled in band, as a copy
        return None
    return view if view.nbytes >= BY_REFERENCE else None


def writable(buffer: Any) -> Any:
    """A buffer to build a received object on: Ray's object store hands out read-only memory,
    copied here once into memory of the receiver's own (an array it gets is writable, and
    writing to it changes nobody else's); a private mapping is used as it is."""
    view = memoryview(buffer)
    return bytearray(view) if view.readonly else buffer


def write_all(fd: int, view: memoryview) -> None:
    """Write all of ``view`` at the start of ``fd`` (Linux writes at most about 2 GiB at once)."""
    done = 0
    size = view.nbytes
    while done < size:
        done += os.pwrite(fd, view[done:], done)


def map_buffer(fd: int) -> Any:
    """A private, writable mapping of a buffer's memory file (which is closed)."""
    try:
        return platform.map_private(fd, os.fstat(fd).st_size)
    finally:
        os.close(fd)


def add_count(body: Body, count: int) -> Body:
    """``body`` followed by the 2-byte count of buffer files, without copying a large body."""
    trailer = count.to_bytes(2, "big")
    if isinstance(body, Pieces):
        body.pieces.append(trailer)
        body.size += 2
        return body
    if len(body) < wire.BIG_PIECE:
        return body + trailer
    return Pieces([body, trailer], len(body) + 2)


def close_all(fds: List[int]) -> None:
    """Close the memory files of a message that will not be sent, and forget them."""
    wire.close_all(fds)
    fds.clear()


class Mapped:
    """A pickled value received with the memory files of its large buffers, mapped."""

    __slots__ = ("buffers", "data")

    def __init__(self, data: Union[bytes, bytearray], buffers: List[Any]) -> None:
        self.data = data
        self.buffers = buffers

    def __len__(self) -> int:
        return len(self.data) + sum(len(b) for b in self.buffers)


def receive_buffers(kind: int, body: bytearray, fds: List[int]) -> Any:
    """A message received with descriptors: a value's buffers (mapped, ``Mapped``); any other
    message's descriptors are closed."""
    if kind not in BY_REFERENCE_KINDS:
        close_all(fds)
        return body
    buffers = []
    try:
        for fd in fds:
            buffers.append(map_buffer(fd))
    except OSError:
        close_all(fds[len(buffers) + 1 :])
        raise
    return Mapped(body, buffers)


# The messages whose large buffers travel by reference: a task's return value.
BY_REFERENCE_KINDS = frozenset((wire.RESULT,))
