"""How items travel: pickled, one datagram each, large ones in a memory file.

::

    put: item --encode--> pickle (<= INLINE_MAX) -------------------> [ datagram ]
                          pickle (larger) --> memory file --fd------> [ "F" + size, SCM_RIGHTS ]
    get: [ datagram ] --receive--> pickle bytes --decode--> item

One item is one datagram, so any number of processes send and receive on the same socket
with no lock: the kernel hands each datagram to exactly one reader, and keeps each sender's
datagrams in order. Once the queue's writes are shut down (``shutdown(SHUT_WR)``), every send
fails in every process, and a reader sees the end (Linux) after what is left. A large item's
memory file is written once, however many sends it takes to find room.

A reader needs a free descriptor for a memory file: without one, the kernel would drop the
file and still hand over the datagram (``MSG_CTRUNC``), and the item would be lost. While the
shared page counts file items in the socket, a reader first peeks at the next datagram: if
its file cannot be taken, ``get`` raises ``OSError(EMFILE)`` and the item stays.
"""

from __future__ import annotations

import errno
import mmap
import os
import pickle
import socket
import struct
from typing import Any, Iterable, List, Optional, Tuple, Union

from .._shared import green as _green
from .._shared import platform as _platform
from .._shared import serialization as _serialization
from .._shared.errors import SerializationError
from .page import Page

# Items whose pickle is larger than this travel in a memory file rather than in the datagram.
INLINE_MAX = 32 * 1024
# The socket's buffer: as much as the system lets an unprivileged process have, up to this.
SOCKET_BUFFER = 4 * 1024 * 1024

PROTOCOL = pickle.HIGHEST_PROTOCOL
_PLAIN = frozenset((bytes, str, int, float))  # pickled by the stdlib, whatever the program imported
_FILE_ITEM = b"F"  # a datagram that starts so carries a memory file of this length: "F" + 8 bytes
_FILE_HEAD = struct.Struct("=cQ")
_TYPE_TAIL = struct.Struct("=H2s")  # after a pickle: the length of the type name before it, a mark
_TAIL_MARK = b"\xbbT"
_NAME_MAX = 1024
_RIGHTS_SPACE = socket.CMSG_SPACE(4)
_RECV_SIZE = INLINE_MAX + 64
_SEND_FLAGS, _RECV_FLAGS = _platform.SEND_FLAGS, _platform.RECV_FLAGS

EOF: Any = object()  # what receive() returns at the end of the socket (Linux)
LOST: Any = object()  # ... for an item whose memory file this process had no descriptor for
_PEEK_FLAGS = _platform.RECV_FLAGS | int(socket.MSG_PEEK)
_NO_DESCRIPTOR = (
    "no descriptor is free in this process (EMFILE: its RLIMIT_NOFILE is reached) for the next "
    "item of the bgtask.Queue, which travels in a memory file (it is larger than 32 KiB)"
)


class WritesClosed(Exception):
    """The queue's writes are shut down: no send succeeds any more, in any process."""


def socketpair() -> List[int]:
    """The descriptors of a new queue's socket pair: one end to send on, one to receive on."""
    a, b = _platform.datagram_socketpair(SOCKET_BUFFER)
    return [a.detach(), b.detach()]


class FileItem:
    """An item too large for a datagram: its pickle, then the memory file it travels in.

    The file is written at the item's first send and kept for the next ones, while the socket
    has no room (its descriptor rides on each attempt's datagram; the reader's copy is the
    same file). ``release()`` closes it once the item is sent or dropped.
    """

    __slots__ = ("counted", "data", "fd", "size")

    def __init__(self, data: Union[bytes, memoryview]) -> None:
        self.data: Optional[Union[bytes, memoryview]] = data  # None once the file holds it
        self.fd = -1
        self.size = len(data)
        self.counted = False  # counted in the page's file items, and not sent (yet)

    def file(self) -> int:
        """The memory file holding the pickle, written on the first call."""
        if self.fd < 0:
            assert self.data is not None
            fd = _platform.memory_file("bgtask-item", 0)
            try:
                _write_all(fd, memoryview(self.data))
            except BaseException:
                os.close(fd)
                raise
            self.fd, self.data = fd, None
        return self.fd

    def wire(self) -> bytes:
        """The item as bytes, to hand to another process in a message."""
        head = _FILE_HEAD.pack(_FILE_ITEM, self.size)
        if self.data is not None:
            return head + self.data
        with mmap.mmap(self.fd, self.size, prot=mmap.PROT_READ) as mapped:
            return head + mapped[:]

    def release(self) -> None:
        fd, self.fd = self.fd, -1
        if fd >= 0:
            os.close(fd)


Message = Union[bytes, FileItem]  # what encode() makes of an item: a datagram's bytes, or a file


def wire(messages: List[Message]) -> List[bytes]:
    """Messages as bytes, for another process (a task hands them to its main program)."""
    return [message if type(message) is bytes else message.wire() for message in messages]  # type: ignore[union-attr]


def from_wire(data: bytes) -> Message:
    """A message from ``wire()``."""
    if data[:1] != _FILE_ITEM:
        return data
    return FileItem(memoryview(data)[_FILE_HEAD.size :])


def encode(item: Any) -> Message:
    """The message for ``item``: its pickle, or a ``FileItem`` for a large one.

    An item of another type than the plain ones carries its type's name after its pickle (which
    unpickling ignores), for the error of a reader that cannot unpickle it.

    Raises:
        SerializationError: the item cannot be pickled.
    """
    try:
        if type(item) in _PLAIN:
            data = pickle.dumps(item, PROTOCOL)
        else:
            name = _serialization.type_name(item).encode(errors="replace")[:_NAME_MAX]
            data = b"".join((_serialization.dumps_value(item), name, _TYPE_TAIL.pack(len(name), _TAIL_MARK)))
    except Exception as exc:  # pickling raises TypeError, PicklingError, AttributeError...
        raise SerializationError(
            f"cannot put an item of type {_serialization.type_name(item)} in a bgtask.Queue: "
            f"{type(exc).__name__}: {exc}"
        ) from exc
    return data if len(data) <= INLINE_MAX else FileItem(data)


def decode(data: Any) -> Any:
    """The item a message's pickle holds.

    Raises:
        SerializationError: it cannot be unpickled in this process (naming its type).
    """
    try:
        return pickle.loads(data)
    except Exception as exc:  # unpickling runs the item's own code: any error may come out
        name = _type_named(data)
        raise SerializationError(
            f"cannot get an item{f' of type {name}' if name else ''} from a bgtask.Queue in this "
            f"process (the item is dropped): unpickling it raised {type(exc).__name__}: {exc}"
        ) from exc


def _type_named(data: Any) -> str:
    """The type name an item carries after its pickle; "" if none."""
    view = memoryview(data)
    if len(view) < _TYPE_TAIL.size or bytes(view[-len(_TAIL_MARK) :]) != _TAIL_MARK:
        return ""  # a pickle ends with its STOP opcode, never with the mark
    size = _TYPE_TAIL.unpack(view[-_TYPE_TAIL.size :])[0]
    end = len(view) - _TYPE_TAIL.size
    return bytes(view[max(0, end - size) : end]).decode(errors="replace")


class Transport:
    """This process's ends of a queue's socket pair (``page``: the count of file items)."""

    def __init__(self, send_fd: int, recv_fd: int, page: Page) -> None:
        self.send_sock = _green.socket_from_fd(send_fd)
        self.recv_sock = _green.socket_from_fd(recv_fd)
        self.page = page
        # The system calls, looked up once: the page marks this process's slot right before.
        self._send, self._sendmsg = self.send_sock.send, self.send_sock.sendmsg
        self._recvmsg = self.recv_sock.recvmsg
        self.no_buffer = False  # the last send lacked room that poll does not announce (macOS)

    def set_nonblocking(self) -> None:
        self.send_sock.setblocking(False)
        self.recv_sock.setblocking(False)

    def sockets(self) -> List[socket.socket]:
        return [self.send_sock, self.recv_sock]

    def send(self, message: Message, in_flight: bool) -> bool:
        """Hand one item to the socket; ``False`` if it has no room now.

        ``in_flight``: the item counts as in flight in this process's slot; it stops to as the
        system call that sends it starts (a kill during the call leaves it counted as sent,
        which it is unless the socket had no room), and again if it was not sent.

        Raises ``WritesClosed`` once the queue's writes are closed: the kernel decides, for
        every process at once, whether an item went in before the shutdown or not at all.
        """
        page = self.page
        try:
            if type(message) is bytes:
                if in_flight:
                    page.sent(self._send, message, _SEND_FLAGS)
                else:
                    self._send(message, _SEND_FLAGS)
            else:
                item: FileItem = message  # type: ignore[assignment]
                rights = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, struct.pack("i", item.file()))]
                head = [_FILE_HEAD.pack(_FILE_ITEM, item.size)]
                if not item.counted:  # counted before it can be in the socket
                    page.add_files(1)
                    item.counted = True
                if in_flight:
                    page.sent(self._sendmsg, head, rights, _SEND_FLAGS)
                else:
                    self._sendmsg(head, rights, _SEND_FLAGS)
                item.counted = False  # the reader counts it out
                item.release()  # the reader has the file now
        except OSError as exc:
            if _platform.no_room(exc):
                self.no_buffer = not _platform.room_is_pollable(exc)
                return False
            if exc.errno == errno.EPIPE:
                raise WritesClosed from None
            raise
        return True

    def drop(self, messages: Iterable[Message]) -> None:
        """Messages that will not be sent from here: their memory files close."""
        for message in messages:
            if type(message) is not bytes:
                item: FileItem = message  # type: ignore[assignment]
                if item.counted:
                    item.counted = False
                    self.page.add_files(-1)
                item.release()

    def receive(self, bounded: bool) -> Optional[Any]:
        """One datagram's item as bytes, counted as got (``bounded``: and its place as owed
        back); ``None`` if the socket is empty, ``EOF`` at its end, ``LOST`` for a file item
        whose file this process could not take (counted as got).

        Raises ``OSError(EMFILE)`` when the next item travels in a memory file that this
        process has no descriptor for: the item stays in the socket.
        """
        page = self.page
        if page.files_pending() and not self._can_take_next():
            raise OSError(errno.EMFILE, f"{_NO_DESCRIPTOR}; the item stays in the queue")
        received = page.received(self._recvmsg, _is_item, bounded, _RECV_SIZE, _RIGHTS_SPACE, _RECV_FLAGS)
        if received is None:
            return None
        data, ancdata, flags, _addr = received
        if not data and not ancdata:
            return EOF  # no item is empty: an empty read is the end (Linux)
        fds = _descriptors(ancdata)
        if data[:1] == _FILE_ITEM:
            self.page.add_files(-1)
            if not fds or flags & socket.MSG_CTRUNC:
                _close_all(fds)
                return LOST  # the kernel dropped its file: it came between the peek and here
        if not fds:
            return data
        try:
            size = _FILE_HEAD.unpack(data)[1]
            with mmap.mmap(fds[0], size, prot=mmap.PROT_READ) as mapped:
                return bytes(mapped)
        finally:
            _close_all(fds)

    def _can_take_next(self) -> bool:
        """Whether this process can take the next datagram's memory file, if it has one.

        A peek hands over copies of the datagram's descriptors, and leaves it in the socket.
        """
        try:
            _data, ancdata, flags, _addr = self.recv_sock.recvmsg(1, _RIGHTS_SPACE, _PEEK_FLAGS)
        except BlockingIOError:
            return True  # empty
        _close_all(_descriptors(ancdata))
        return not flags & socket.MSG_CTRUNC

    def discard(self) -> bool:
        """Drop the next datagram, and its memory file if it has one; whether there was one."""
        try:
            data, _ancdata, flags, _addr = self.recv_sock.recvmsg(16, 0, _platform.RECV_FLAGS)
        except BlockingIOError:
            return False
        if data[:1] == _FILE_ITEM and flags & socket.MSG_CTRUNC:
            self.page.add_files(-1)
        return bool(data)

    def close_writes(self) -> None:
        """No send succeeds from now on, in any process."""
        try:
            self.send_sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass  # already closed


def _is_item(received: Tuple[bytes, List[Any], int, Any]) -> bool:
    return bool(received[0] or received[1])  # an empty read is the end


def lost_item() -> OSError:
    """The error of a get whose item's memory file the kernel dropped."""
    return OSError(errno.EMFILE, f"{_NO_DESCRIPTOR}; the item was lost")


def _descriptors(ancdata: List[Tuple[int, int, bytes]]) -> List[int]:
    return [
        fd
        for level, kind, cdata in ancdata
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS
        for fd in struct.unpack(f"{len(cdata) // 4}i", cdata[: len(cdata) - len(cdata) % 4])
    ]


def _close_all(fds: List[int]) -> None:
    for fd in fds:
        os.close(fd)


def _write_all(fd: int, data: memoryview) -> None:
    while data:
        data = data[os.write(fd, data) :]
