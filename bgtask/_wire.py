"""Framing of the messages that cross process boundaries.

Two kinds of channel exist::

    main program  <== task channel (one socketpair per task) ==>  task process
        |                settings and payload one way, one outcome message back
        |
        +--- control socket (one per zygote) ---> zygote: activate / signal / environment
                                             <--- spare(pid, its task channel attached),
                                                  reaped(exit code)

Every message is a fixed header (kind: 1 byte, length: 8 bytes) and a body. Bodies of control
messages and of bgtask's own task messages are pickled with the stdlib ``pickle`` and hold only
plain data; user objects travel as cloudpickle bytes inside them. This module is imported by the
task runtime, so it imports nothing else of bgtask.
"""

from __future__ import annotations

import pickle
import struct
from typing import TYPE_CHECKING, Any, List, Optional, Tuple

if TYPE_CHECKING:
    import socket

HEADER = struct.Struct("!BQ")

# Main program -> task.
PAYLOAD = 1  # body: cloudpickle bytes of (function, args, kwargs)
SETTINGS = 7  # body: pickle of the task's settings dict; before PAYLOAD, zygote's tasks only
# Task -> main program: exactly one of these, then EOF.
RESULT = 2  # body: cloudpickle bytes of the return value
ERROR = 3  # body: pickle of (exception cloudpickle bytes or None, type name, message, traceback)
STOPPED = 4  # body: pickle of the traceback text at the point the stop exception unwound
EXITED = 5  # body: pickle of a sentence saying how the function ended the process (sys.exit...)
FAILED = 6  # body: pickle of (what, exception bytes or None, type name, message, traceback)

# Main program -> zygote. Spares are named by a serial number the zygote gives them, never
# reused, so no message can reach a process that merely got a recycled pid.
Z_ACTIVATE = 10  # body: pickle of (serial, daemon, graceful, grace): the spare now runs a task
Z_SIGNAL = 11  # body: pickle of (serial, signal number, seconds before SIGKILL or None)
Z_PRELOAD = 12  # body: pickle of a list of module names to import; starts a new generation
Z_SETENV = 13  # body: pickle of (environment, sys.path) for later spares; a new generation
Z_WANT = 14  # body: pickle of None: a call waits for a spare; say if none can be forked
Z_DROP = 15  # body: pickle of a serial: a spare the main program could not take (no free fd)
# Zygote -> main program.
Z_SPARE = 20  # body: pickle of (serial, pid, generation); the spare's task channel attached
Z_REAPED = 21  # body: pickle of (serial, exit code)
Z_NOSPARE = 22  # body: pickle of the reason no process could be forked


def pack(kind: int, body: bytes) -> bytes:
    """Frame ``body`` as one message of ``kind``."""
    return HEADER.pack(kind, len(body)) + body


def pack_data(kind: int, data: Any) -> bytes:
    """Frame plain ``data`` (pickled with the stdlib) as one message of ``kind``."""
    return pack(kind, pickle.dumps(data, pickle.HIGHEST_PROTOCOL))


# Bodies up to this size are sent in one system call with their header.
_SMALL = 64 * 1024


def send_message(sock: socket.socket, kind: int, body: bytes) -> None:
    """Send one message; large bodies go without being copied into one buffer."""
    if len(body) <= _SMALL:
        sock.sendall(HEADER.pack(kind, len(body)) + body)
        return
    sock.sendall(HEADER.pack(kind, len(body)))
    sock.sendall(body)


def send_messages(sock: socket.socket, messages: List[Tuple[int, bytes]]) -> None:
    """Send several messages, small ones together in one system call."""
    if all(len(body) <= _SMALL for _kind, body in messages):
        sock.sendall(b"".join(pack(kind, body) for kind, body in messages))
        return
    for kind, body in messages:
        send_message(sock, kind, body)


def recv_exact(sock: socket.socket, size: int) -> Optional[bytearray]:
    """Read exactly ``size`` bytes, or return ``None`` on EOF before that."""
    buf = bytearray(size)
    view = memoryview(buf)
    got = 0
    while got < size:
        n = sock.recv_into(view[got:])
        if n == 0:
            return None
        got += n
    return buf


def recv_message(sock: socket.socket) -> Optional[Tuple[int, bytearray]]:
    """Read one whole message (blocking); ``None`` on EOF."""
    head = recv_exact(sock, HEADER.size)
    if head is None:
        return None
    kind, size = HEADER.unpack(head)
    body = recv_exact(sock, size)
    if body is None:
        return None
    return kind, body


class MessageReader:
    """Incremental reader of one stream of messages; it never blocks (``MSG_DONTWAIT``).

    The socket itself may stay blocking, for a sender in another thread.

    The body of a message is read straight into a buffer of its final size, so a result of
    several GiB costs one copy of its bytes here, not two.

    With ``maxfds``, headers are read with ``recvmsg``: descriptors the sender attached to a
    message's first byte arrive with its header and are kept in ``fds``, one list per message.
    """

    __slots__ = ("_body", "_fds", "_got", "_head", "_kind", "_maxfds", "_view", "eof", "fds", "messages")

    def __init__(self, maxfds: int = 0) -> None:
        self._maxfds = maxfds
        self._fds: List[int] = []
        self.fds: List[List[int]] = []
        self._head = bytearray()
        self._kind = 0
        self._body: Optional[bytearray] = None
        self._view: Optional[memoryview] = None
        self._got = 0
        self.messages: List[Tuple[int, bytearray]] = []
        self.eof = False

    def feed_from(self, sock: socket.socket) -> None:
        """Read what is available now; set ``eof`` when the other end is closed."""
        from socket import MSG_DONTWAIT

        while True:
            try:
                if self._view is None:
                    if self._maxfds:
                        chunk = self._recv_head_with_fds(sock)
                    else:
                        chunk = sock.recv(HEADER.size - len(self._head), MSG_DONTWAIT)
                    if not chunk:
                        self._set_eof()
                        return
                    self._head += chunk
                    if len(self._head) == HEADER.size:
                        self._kind, size = HEADER.unpack(self._head)
                        self._head = bytearray()
                        self._body = bytearray(size)
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
            except OSError:  # ECONNRESET and the like: the peer is gone
                self._set_eof()
                return

    def _set_eof(self) -> None:
        self.eof = True
        for fd in self._fds:  # attached to a message that never arrived whole
            _close_quietly(fd)
        self._fds = []

    def _recv_head_with_fds(self, sock: socket.socket) -> bytes:
        import socket

        # Received descriptors are closed on exec from the start (Linux), so that no program
        # this process runs in another thread meanwhile inherits them.
        flags = socket.MSG_DONTWAIT | getattr(socket, "MSG_CMSG_CLOEXEC", 0)
        data, ancdata, _flags, _addr = sock.recvmsg(
            HEADER.size - len(self._head), socket.CMSG_SPACE(self._maxfds * 4), flags
        )
        for level, ctype, cdata in ancdata:
            if level == socket.SOL_SOCKET and ctype == socket.SCM_RIGHTS:
                usable = len(cdata) - len(cdata) % 4
                self._fds.extend(struct.unpack(f"{usable // 4}i", cdata[:usable]))
        return data

    def _finish(self) -> None:
        assert self._body is not None
        assert self._view is not None
        self._view.release()
        self.messages.append((self._kind, self._body))
        if self._maxfds:
            self.fds.append(self._fds)
            self._fds = []
        self._body = None
        self._view = None

    @property
    def partial(self) -> bool:
        """Whether a message was begun but not finished."""
        return self._view is not None or bool(self._head)


def _close_quietly(fd: int) -> None:
    import os

    try:
        os.close(fd)
    except OSError:
        pass
