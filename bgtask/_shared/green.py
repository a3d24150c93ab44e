"""What bgtask needs to work in a program that gevent monkey-patched.

``gunicorn -k gevent`` and ``gevent.monkey.patch_all()`` turn threads into greenlets and make
locks, sockets and selectors cooperative. bgtask's main side then runs green as well: its
monitor is a greenlet and a caller waiting for a result lets the other greenlets run. Two
things of bgtask's must stay real:

- the channels to tasks and to the zygote. A green socket turns a read that must not wait
  (``MSG_DONTWAIT``) into a wait for data, and the monitor would stop at a quiet channel. The
  channels are the standard library's sockets, whatever ``socket.socket`` is now;
- nothing else: the zygote and its tasks are fresh interpreters with nothing patched. That
  holds for the default start method only; the others are refused in a patched program.

eventlet patches differently and is refused with a clear error.
"""

from __future__ import annotations

import socket
import sys
from typing import Any, Optional, Tuple, Type


def check(start_method: Optional[str]) -> None:
    """Raise ``BgTaskError`` where a green program cannot start this task.

    In a gevent-patched program only the default start method: the others run the task in a
    copy of the patched program (fork) or one that patches itself again (spawn and forkserver
    import the main module), where bgtask's task runtime would share its one thread with the
    hub. eventlet: never.
    """
    patcher = sys.modules.get("eventlet.patcher")
    if patcher is not None and patcher.is_monkey_patched("thread"):
        from .errors import BgTaskError

        raise BgTaskError(
            "bgtask does not support programs that eventlet monkey-patched (its threads and "
            "sockets cannot wait on bgtask's); gevent is supported"
        )
    partial = _partly_patched()
    if partial:
        from .errors import BgTaskError

        raise BgTaskError(
            "bgtask supports programs that gevent patched as patch_all() does (threads, sockets "
            f"and select together); this one patched {partial}"
        )
    if start_method is not None and is_gevent_patched():
        from .errors import BgTaskError

        raise BgTaskError(
            f"start_method={start_method!r} is not supported in a program that gevent "
            "monkey-patched: use the default start method, whose tasks are fresh interpreters "
            "with nothing patched"
        )


_TOGETHER = ("threading", "socket", "select")


def _partly_patched() -> str:
    """What gevent patched, when it patched some of what must be patched together, else ""."""
    monkey = sys.modules.get("gevent.monkey")
    if monkey is None:
        return ""
    patched = [name for name in _TOGETHER if monkey.is_module_patched(name)]
    if not patched or len(patched) == len(_TOGETHER):
        return ""
    return " and ".join(patched) + " only"


def is_gevent_patched() -> bool:
    """Whether gevent patched this program's threads or sockets."""
    monkey = sys.modules.get("gevent.monkey")
    if monkey is None:
        return False
    return bool(monkey.is_module_patched("threading") or monkey.is_module_patched("socket"))


def _socket_class() -> Type[socket.socket]:
    """The standard library's socket class, also where gevent replaced ``socket.socket``."""
    monkey = sys.modules.get("gevent.monkey")
    if monkey is not None and monkey.is_module_patched("socket"):
        return monkey.get_original("socket", "socket")  # type: ignore[no-any-return]
    return socket.socket


def socketpair() -> Tuple[socket.socket, socket.socket]:
    """A connected pair of standard-library sockets (``socket.socketpair()`` when unpatched)."""
    cls = _socket_class()
    if cls is socket.socket:
        return socket.socketpair()
    import _socket

    a, b = _socket.socketpair()
    return cls(fileno=a.detach()), cls(fileno=b.detach())


def socket_from_fd(fd: int) -> socket.socket:
    """A standard-library socket that takes over descriptor ``fd``."""
    cls: Any = _socket_class()
    return cls(fileno=fd)  # type: ignore[no-any-return]
