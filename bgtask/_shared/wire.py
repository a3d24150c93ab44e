"""The messages that cross process boundaries: framing, and every message defined once.

Two kinds of channel exist::

    main program  <== task channel (one socketpair per task) ==>  task process
        |                settings and payload one way, one outcome message back
        |
        +--- control socket (one per zygote) ---> zygote: Activate / Signal / SetEnv / ...
                                             <--- Spare (its task channel attached), Reaped

Every message is a fixed header (magic: 2 bytes, kind: 1 byte, length: 8 bytes) and a body. The
magic and the known kinds let a reader tell bgtask's messages from bytes a task wrote to the
wrong descriptor: those end the channel instead of being taken for a message. Control messages
are the small named tuples below, sent as plain tuples pickled with the stdlib ``pickle``; user
objects travel as cloudpickle bytes inside task messages. Both ends import this module, and the
task runtime does, so it imports nothing else of bgtask.
"""

from __future__ import annotations

import pickle
import struct
from typing import (
    TYPE_CHECKING,
    Any,
    Callable,
    Dict,
    List,
    NamedTuple,
    Optional,
    Sequence,
    Tuple,
    Type,
    Union,
)

if TYPE_CHECKING:
    import socket

# The SETTINGS message: what the task runtime needs besides its call (``_runtime.child`` lists the keys).
Settings = Dict[str, Any]

MAGIC = b"\xb6\x67"
HEADER = struct.Struct("!2sBQ")

# Main program -> task.
SETTINGS = 1  # pickle of the task's settings dict (zygote only); stdio descriptors may ride on it
PAYLOAD = 2  # cloudpickle bytes of (function, args, kwargs)
# Task -> main program: exactly one of these, then EOF (ASIDES may come before it).
RESULT = 3  # cloudpickle bytes of the return value
ERROR = 4  # pickle of (exception cloudpickle bytes or None, type name, message, traceback)
STOPPED = 5  # pickle of the traceback text at the point the stop exception unwound
EXITED = 6  # pickle of a sentence saying how the function ended the process (sys.exit...)
FAILED = 7  # pickle of (what, exception bytes or None, type name, message, traceback)

OUTCOMES = frozenset((RESULT, ERROR, STOPPED, EXITED, FAILED))
# Outcomes that need no exit code: result() may return them before the process is reaped.
EARLY = frozenset((RESULT, ERROR, FAILED))
# Task -> main program, before its outcome: bgtask.ready() was called (cloudpickle of its value).
READY = 8
# Task -> main program, before its outcome: a logging record (pickle of its fields, see _logs).
LOG = 9
# Task -> main program, before its outcome: items its queues had no room for (see _queue).
QUEUED = 10
# Task -> main program, before its outcome: a value a generator task yielded (cloudpickle).
ITEM = 11
# Task -> main program, before its outcome: a warning the task's filters showed, issued again
# in the main program (pickle of message, category's module and name, filename, line).
WARNING = 12
# Task -> main program, before its outcome: the task started a zygote of its own (pickle of its
# pid and start time), which the outer zygote spares when the task is gone (see Helper).
HELPER = 13
# What a task may send besides its outcome, handled as it arrives.
ASIDES = frozenset((READY, LOG, QUEUED, ITEM, WARNING, HELPER))


# -- control messages, main program <-> zygote ------------------------------------------------
# Spares are named by a serial number the zygote gives them, never reused, so no message can
# reach a process that merely got a recycled pid.


class Boot(NamedTuple):
    """Main program -> zygote, first: where to import from, and what to import ahead."""

    sys_path: List[str]
    preload: List[str]


class Activate(NamedTuple):
    """Main program -> zygote: the spare ``serial`` now runs a task of this kind."""

    serial: int
    daemon: bool
    graceful: bool
    grace: float


class Signal(NamedTuple):
    """Main program -> zygote: signal a task; SIGKILL its group ``escalate_after`` s later."""

    serial: int
    signum: int
    escalate_after: Optional[float]


class Preload(NamedTuple):
    """Main program -> zygote: import these modules; starts a new generation."""

    modules: List[str]


class SetEnv(NamedTuple):
    """Main program -> zygote: environment and ``sys.path`` for later spares; a new generation."""

    environ: Dict[str, str]
    sys_path: List[str]


class Want(NamedTuple):
    """Main program -> zygote: a call waits for a spare; say so if none can be forked."""


class Drop(NamedTuple):
    """Main program -> zygote: a spare it could not take (no free descriptor here)."""

    serial: int


class Helper(NamedTuple):
    """Main program -> zygote: the task ``serial`` started a zygote of its own, this process:
    when the task is gone and the process comes to this zygote, it is spared (it stops that
    task's daemon tasks). Named by what a process cannot set itself: pid and start time."""

    serial: int
    pid: int
    start: int


class Spare(NamedTuple):
    """Zygote -> main program: a process forked ahead; its task channel is attached."""

    serial: int
    pid: int
    generation: int


class Reaped(NamedTuple):
    """Zygote -> main program: a spare or task ended with this exit code (``-N``: signal N)."""

    serial: int
    exitcode: int


class NoSpare(NamedTuple):
    """Zygote -> main program: no process could be forked, and why."""

    reason: str


_CONTROL: Tuple[Type[Any], ...] = (
    Boot,
    Activate,
    Signal,
    Preload,
    SetEnv,
    Want,
    Drop,
    Helper,
    Spare,
    Reaped,
    NoSpare,
)
_KIND_OF: Dict[Type[Any], int] = {cls: 20 + i for i, cls in enumerate(_CONTROL)}
_CLASS_OF: Dict[int, Type[Any]] = {kind: cls for cls, kind in _KIND_OF.items()}
KNOWN_KINDS = frozenset({SETTINGS, PAYLOAD, *OUTCOMES, *ASIDES, *_CLASS_OF})


def encode(message: Any) -> bytes:
    """Frame a control message."""
    return pack(_KIND_OF[type(message)], pickle.dumps(tuple(message), pickle.HIGHEST_PROTOCOL))


def decode(kind: int, body: Union[bytes, bytearray]) -> Any:
    """The control message a frame of ``kind`` holds."""
    return _CLASS_OF[kind](*pickle.loads(body))


# -- framing -----------------------------------------------------------------------------------


# The largest message a channel takes: a header announcing more is a corrupt channel. Bodies over
# LAZY_BODY are received into anonymous memory the kernel provides page by page as the bytes
# arrive, not allocated and zero-filled at the header: 11 bytes that announce gigabytes cost
# nothing until the gigabytes come.
MAX_MESSAGE = 64 * 2**30
LAZY_BODY = 2**20


def _body_buffer(size: int) -> Any:
    if size > MAX_MESSAGE:
        raise ProtocolError(f"a message of {size} bytes was announced, over the bound of {MAX_MESSAGE}")
    if size <= LAZY_BODY:
        return bytearray(size)
    import mmap

    try:
        return mmap.mmap(-1, size)
    except OSError as exc:  # the system would not reserve that much address space
        raise MemoryError(str(exc)) from exc


class ProtocolError(Exception):
    """Bytes on a channel that are not bgtask's messages (a task wrote to the wrong descriptor)."""


def pack(kind: int, body: bytes) -> bytes:
    """Frame ``body`` as one message of ``kind``."""
    return HEADER.pack(MAGIC, kind, len(body)) + body


def pack_data(kind: int, data: Any) -> bytes:
    """Frame plain ``data`` (pickled with the stdlib) as one message of ``kind``."""
    return pack(kind, pickle.dumps(data, pickle.HIGHEST_PROTOCOL))


def _unpack_header(head: Union[bytes, bytearray]) -> Tuple[int, int]:
    magic, kind, size = HEADER.unpack(head)
    if magic != MAGIC or kind not in KNOWN_KINDS:
        raise ProtocolError(f"not a bgtask message header: {bytes(head)!r}")
    return kind, size


# Bodies up to this size are sent in one system call with their header.
_SMALL = 64 * 1024


class Pieces:
    """A large message body in pieces, sent one after the other, never joined into one buffer.

    Joining copies, and a copy holds the GIL: a 50 MB argument joined in a thread kept an
    event loop waiting 40 ms. ``len()`` is the size in bytes.
    """

    __slots__ = ("pieces", "size")

    def __init__(self, pieces: List[Any], size: int) -> None:
        self.pieces = pieces
        self.size = size

    def __len__(self) -> int:
        return self.size


Body = Union[bytes, Pieces]
# Pieces of a body at least this large are kept as they are, never copied into a joined buffer.
BIG_PIECE = 64 * 1024


class WithFiles(NamedTuple):
    """A message body and the descriptors that go with it (``SCM_RIGHTS``), closed once sent:
    the memory files of a value's large buffers (see ``_shared.serialization``)."""

    body: bytes
    fds: List[int]


def send_message(sock: socket.socket, kind: int, body: Body) -> None:
    """Send one message; large bodies go without being copied into one buffer."""
    if len(body) <= _SMALL and not isinstance(body, Pieces):
        sock.sendall(pack(kind, body))
        return
    sock.sendall(HEADER.pack(MAGIC, kind, len(body)))
    _send_body(sock, body)


def _send_body(sock: socket.socket, body: Body) -> None:
    if isinstance(body, Pieces):
        for piece in body.pieces:
            sock.sendall(piece)  # the kernel copies, without the GIL
    else:
        sock.sendall(body)


def send_messages(sock: socket.socket, messages: Sequence[Tuple[int, Body]], fds: Sequence[int] = ()) -> None:
    """Send several messages, small ones together in one system call.

    ``fds`` ride on the first byte of the first message (``SCM_RIGHTS``); the receiver takes
    them with :func:`recv_message` and ``maxfds``.
    """
    if fds:
        import socket as _socket

        kind, body = messages[0]
        head = HEADER.pack(MAGIC, kind, len(body))
        rights = struct.pack(f"{len(fds)}i", *fds)
        sent = sock.sendmsg([head], [(_socket.SOL_SOCKET, _socket.SCM_RIGHTS, rights)])
        sock.sendall(head[sent:])
        _send_body(sock, body)
        messages = messages[1:]
        if not messages:
            return
    if all(len(body) <= _SMALL and not isinstance(body, Pieces) for _kind, body in messages):
        sock.sendall(b"".join(pack(kind, body) for kind, body in messages))  # type: ignore[arg-type]
        return
    for kind, body in messages:
        send_message(sock, kind, body)


def recv_exact(
    sock: socket.socket, size: int, fds: Optional[List[int]] = None, maxfds: int = 8
) -> Optional[bytearray]:
    """Read exactly ``size`` bytes, or return ``None`` on EOF before that.

    With ``fds``, the first byte is read with the descriptors attached to it, into ``fds``.
    """
    buf = bytearray(size)
    view = memoryview(buf)
    got = 0
    if fds is not None and size:
        chunk = _recv_with_fds(sock, size, 0, fds, maxfds)
        if not chunk:
            return None
        got = len(chunk)
        view[:got] = chunk
    while got < size:
        n = sock.recv_into(view[got:])
        if n == 0:
            return None
        got += n
    return buf


def recv_message(sock: socket.socket, maxfds: int = 0) -> Optional[Tuple[int, bytearray, List[int]]]:
    """Read one whole message (blocking): (kind, body, descriptors); ``None`` on EOF.

    Raises ``ProtocolError`` for bytes that are not a message.
    """
    fds: List[int] = []
    head = recv_exact(sock, HEADER.size, fds if maxfds else None, maxfds)
    if head is None:
        close_all(fds)
        return None
    kind, size = _unpack_header(head)
    body = recv_exact(sock, size)
    if body is None:
        close_all(fds)
        return None
    return kind, body, fds


def _recv_with_fds(sock: socket.socket, size: int, flags: int, fds: List[int], maxfds: int) -> bytes:
    import socket as _socket

    # Received descriptors are closed on exec from the start (Linux), so that no program
    # this process runs in another thread meanwhile inherits them.
    flags |= _CMSG_CLOEXEC
    data, ancdata, _flags, _addr = sock.recvmsg(size, _socket.CMSG_SPACE(maxfds * 4), flags)
    for level, ctype, cdata in ancdata:
        if level == _SOL_SOCKET and ctype == _SCM_RIGHTS:
            usable = len(cdata) - len(cdata) % 4
            fds.extend(struct.unpack(f"{usable // 4}i", cdata[:usable]))
    return data


def _socket_constants() -> Tuple[int, int, int, int]:
    import socket as _socket

    # Plain ints: enum arithmetic on every read costs more than the read.
    return (
        int(getattr(_socket, "MSG_CMSG_CLOEXEC", 0)),
        int(_socket.MSG_DONTWAIT),
        int(_socket.SOL_SOCKET),
        int(_socket.SCM_RIGHTS),
    )


_CMSG_CLOEXEC, _DONTWAIT, _SOL_SOCKET, _SCM_RIGHTS = _socket_constants()


class MessageReader:
    """Incremental reader of one stream of messages; it never blocks (``MSG_DONTWAIT``).

    The socket itself may stay blocking, for a sender in another thread.

    The body of a message is read straight into a buffer of its final size, so a result of
    several GiB costs one copy of its bytes here, not two.

    With ``maxfds``, headers are read with ``recvmsg``: descriptors the sender attached to a
    message's first byte arrive with its header and are kept in ``fds``, one list per message.

    Bytes that are not bgtask's messages (or a body too large to hold) end the stream: ``eof``
    and ``corrupt`` are set, and the reader reads no more.
    """

    __slots__ = (
        "_attach",
        "_body",
        "_fds",
        "_got",
        "_head",
        "_kind",
        "_maxfds",
        "_view",
        "corrupt",
        "eof",
        "fds",
        "messages",
    )

    def __init__(
        self, maxfds: int = 0, attach: Optional[Callable[[int, bytearray, List[int]], Any]] = None
    ) -> None:
        """``maxfds``: take descriptors with messages, at most this many with one; they go to
        ``fds`` (a list per message), or, given ``attach``, to ``attach(kind, body, fds)``,
        whose return is the message's body (the descriptors are then its to close)."""
        self._maxfds = maxfds
        self._attach = attach
        self._fds: List[int] = []
        self.fds: List[List[int]] = []
        self._head = bytearray()
        self._kind = 0
        self._body: Optional[bytearray] = None
        self._view: Optional[memoryview] = None
        self._got = 0
        self.messages: List[Tuple[int, bytearray]] = []
        self.eof = False
        self.corrupt: Optional[str] = None

    def feed_from(self, sock: socket.socket) -> None:
        """Read what is available now; set ``eof`` when the other end is closed."""
        MSG_DONTWAIT = _DONTWAIT
        while not self.eof:
            try:
                if self._view is None:
                    if self._maxfds:
                        chunk = _recv_with_fds(
                            sock, HEADER.size - len(self._head), MSG_DONTWAIT, self._fds, self._maxfds
                        )
                    else:
                        chunk = sock.recv(HEADER.size - len(self._head), MSG_DONTWAIT)
                    if not chunk:
                        self._set_eof()
                        return
                    self._head += chunk
                    if len(self._head) == HEADER.size:
                        self._kind, size = _unpack_header(self._head)
                        self._head = bytearray()
                        self._body = _body_buffer(size)
                        self._view = memoryview(self._body)
                        self._got = 0
                        if size == 0:
                            self._finish()
                else:
                    n = sock.recv_into(self._view[self._got :], 0, MSG_DONTWAIT)
                    if n == 0:
                        self._set_eof()
                        return
                    self._got += n
                    if self._got == len(self._view):
                        self._finish()
            except (BlockingIOError, InterruptedError):
                return
            except (ProtocolError, MemoryError, OverflowError) as exc:
                self.corrupt = str(exc) if isinstance(exc, ProtocolError) else "a message too large to hold"
                self._drop_partial()
                self._set_eof()
                return
            except OSError:  # ECONNRESET and the like: the peer is gone
                self._set_eof()
                return

    def _drop_partial(self) -> None:
        if self._view is not None:
            self._view.release()
        self._view = None
        self._body = None
        self._head = bytearray()

    def _set_eof(self) -> None:
        self.eof = True
        close_all(self._fds)  # attached to a message that never arrived whole
        self._fds = []

    def _finish(self) -> None:
        assert self._body is not None
        assert self._view is not None
        self._view.release()
        body: Any = self._body
        if self._maxfds:
            fds, self._fds = self._fds, []
            if self._attach is None:
                self.fds.append(fds)
            elif fds:
                body = self._attach(self._kind, body, fds)
        self.messages.append((self._kind, body))
        self._body = None
        self._view = None

    @property
    def partial(self) -> bool:
        """Whether a message was begun but not finished."""
        return self._view is not None or bool(self._head)


def close_all(fds: List[int]) -> None:
    """Close descriptors that nothing took, ignoring those already closed."""
    import os

    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass
