"""Every operating-system-specific branch of bgtask.

Linux is the primary platform. macOS behaves the same for everything a user can observe, with
these differences, each handled here:

- no parent-death signal: a daemon task there relies on its zygote, which watches the main
  program through a socket;
- no ``os.waitid``: the zygote learns of a child's exit from kqueue before it reaps it (Linux
  without ``waitid`` uses a pidfd per child the same way);
- no child subreaper: a process that leaves its task's process group and session escapes;
- no ``/proc``: thread counts come from ``threading``, and a task's children are not listed;
  a process is told apart from a later one with its pid by the pid alone;
- ``bgtask.Queue``'s socket is a ``SOCK_DGRAM`` one (no ``SOCK_SEQPACKET`` for Unix sockets):
  its end is not seen as an empty read, and a full one says ``ENOBUFS`` while ``poll`` says it
  has room; no ``MSG_NOSIGNAL`` (``SO_NOSIGPIPE`` instead), no ``memfd_create``, no
  ``F_SETPIPE_SZ``.

Windows is refused with a clear error for now.
"""

from __future__ import annotations

import errno
import os
import socket
import struct
import sys
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple

IS_LINUX = sys.platform.startswith("linux")
IS_WINDOWS = sys.platform == "win32"

_PR_SET_PDEATHSIG = 1
_PR_SET_NAME = 15
_PR_SET_CHILD_SUBREAPER = 36
# The name bgtask's zygotes show in ps and top: an adopted zygote is left to end on its own.
ZYGOTE_NAME = "bgtask-zygote"
_libc: Any = None


def check_supported() -> None:
    """Raise ``BgTaskError`` on a platform bgtask does not support yet."""
    if IS_WINDOWS:
        from .errors import BgTaskError

        raise BgTaskError(
            "bgtask does not support Windows yet: it needs fork(), process groups and POSIX "
            "signals; run under Linux or macOS (WSL works)"
        )


def libc() -> Any:
    """The C library, loaded once (``None`` where ctypes cannot load it)."""
    global _libc
    if _libc is None:
        try:
            import ctypes

            _libc = ctypes.CDLL(None, use_errno=True)
        except (ImportError, OSError):
            _libc = False
    return _libc or None


def _prctl(option: int, value: int) -> bool:
    if not IS_LINUX:
        return False
    lib = libc()
    try:
        return lib is not None and lib.prctl(option, value, 0, 0, 0) == 0
    except AttributeError:  # a libc without prctl
        return False


def set_parent_death_signal(signum: int) -> bool:
    """Ask the kernel to send ``signum`` to this process when its parent dies (Linux only).

    ``0`` clears it. Returns whether the platform has the mechanism. The caller must compare
    ``os.getppid()`` with the parent it expects afterwards: the signal is not sent if the parent
    died before the call.
    """
    return _prctl(_PR_SET_PDEATHSIG, signum)


def set_child_subreaper() -> bool:
    """Make this process adopt its orphaned descendants instead of init (Linux only).

    A process that leaves its task's process group and session (a double fork, ``setsid``)
    is then still a descendant of the task, and of the zygote once the task is gone, so it can
    be found and killed. Not where children cannot be listed (no ``/proc``): adopted processes
    could not be found. Returns whether it is on.
    """
    global _can_list_children
    if _can_list_children is None:  # found out once, in the zygote: its forks inherit it
        _can_list_children = children() is not None
    return IS_LINUX and _can_list_children and _prctl(_PR_SET_CHILD_SUBREAPER, 1)


_can_list_children: Optional[bool] = None


def has_children() -> bool:
    """Whether this process has any child, running or exited (one system call where it can)."""
    waitid = getattr(os, "waitid", None)
    if waitid is None:
        return bool(children())
    try:
        waitid(os.P_ALL, 0, os.WEXITED | os.WNOHANG | os.WNOWAIT)
    except ChildProcessError:
        return False
    return True


def set_process_name(name: str) -> None:
    """Set the name ``ps`` and ``top`` show for this process (Linux: 15 bytes at most)."""
    if not IS_LINUX:
        return
    lib = libc()
    if lib is not None:
        try:
            lib.prctl(_PR_SET_NAME, name.encode(errors="replace")[:15], 0, 0, 0)
        except AttributeError:
            pass


def process_running(pid: int, start: int = 0) -> bool:
    """Whether process ``pid`` exists and has not exited (a zombie has; Linux tells, from ``/proc``).

    ``start``: what ``process_start_time`` said of the process meant; one that got its pid
    since (pids are reused) is not it. 0: any process with that pid.
    """
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    if IS_LINUX:
        fields = _stat(pid)
        return fields is not None and fields[0] != b"Z" and (not start or int(fields[19]) == start)
    return True


def process_start_time(pid: int) -> int:
    """When process ``pid`` started, in clock ticks since boot (Linux); 0 if unknown.

    With the pid, it names one process: a later one that gets the same pid starts later.
    """
    fields = _stat(pid) if IS_LINUX else None
    return int(fields[19]) if fields is not None else 0


def _stat(pid: int) -> Optional[List[bytes]]:
    """The fields of ``/proc/PID/stat`` after the command name (the state first), or ``None``."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
        # The command name may hold spaces and parentheses: split after the last ")".
        return stat[stat.rindex(b")") + 2 :].split()
    except (OSError, ValueError):
        return None


def process_name(pid: int) -> Optional[str]:
    """The name ``set_process_name`` gave process ``pid`` (Linux); ``None`` if unknown."""
    try:
        with open(f"/proc/{pid}/comm") as f:
            return f.read().strip()
    except OSError:
        return None


def thread_count() -> int:
    """Threads of this process at the OS level (threads started by C code included)."""
    try:
        return len(os.listdir("/proc/self/task"))
    except OSError:
        import threading

        return threading.active_count()


def children(single_threaded: bool = False) -> Optional[List[int]]:
    """This process's children, from ``/proc`` (Linux); ``None`` where they cannot be listed.

    ``single_threaded``: the caller has one thread, whose children are all there are.
    """
    pids: List[int] = []
    try:
        for tid in [str(os.getpid())] if single_threaded else os.listdir("/proc/self/task"):
            with open(f"/proc/self/task/{tid}/children") as f:
                pids.extend(int(pid) for pid in f.read().split())
    except (OSError, ValueError):
        return None
    return pids


def plain_fork() -> Optional[Callable[[], int]]:
    """The C library's ``fork()``, for a zygote that imported nothing beyond its own modules.

    ``os.fork()`` also runs CPython's after-fork work in the child: it re-creates the locks
    and thread records that other threads may have held, and runs the after-fork functions
    modules registered. In a single-threaded process with only bgtask, cloudpickle and their
    standard modules imported, that work has nothing to repair: those functions belong to
    ``threading`` and ``logging`` and reset thread and lock state. Yet it writes to memory the
    child shares with the zygote, and the copies cost each task about 0.4 ms, a third of what
    it spends starting. So the zygote calls ``fork()`` itself, through ``ctypes``, which lets go
    of the GIL around the call: the child takes it again as the only thread.

    ``None`` (use ``os.fork``) when that reasoning may not hold: not Linux, not CPython with a
    GIL, more than one thread, a module with after-fork work of its own imported (``random``
    reseeds itself in a child), or ``BGTASK_PLAIN_FORK=0`` in the environment. A preload
    switches the zygote to ``os.fork`` for good.
    """
    if os.environ.get("BGTASK_PLAIN_FORK") == "0":
        return None
    if not IS_LINUX or sys.implementation.name != "cpython":
        return None
    if "t" in getattr(sys, "abiflags", "") or thread_count() != 1:  # "t": free-threaded
        return None
    if any(name in sys.modules for name in ("random", "concurrent.futures.thread", "multiprocessing.util")):
        return None
    lib = libc()
    c_fork = getattr(lib, "fork", None)
    if c_fork is None:
        return None
    import ctypes

    c_fork.restype = ctypes.c_int
    c_fork.argtypes = []

    def fork() -> int:
        pid: int = c_fork()
        if pid < 0:
            errno = ctypes.get_errno()
            raise OSError(errno, os.strerror(errno))
        return pid

    return fork


# -- pidfds: signalling a process that is not our child, without racing pid reuse --------------


def open_pidfd(pid: int) -> Optional[int]:
    """A descriptor that names process ``pid`` for as long as it is open (Linux 5.3+)."""
    pidfd_open = getattr(os, "pidfd_open", None)
    if pidfd_open is None:
        return None
    try:
        return pidfd_open(pid)  # type: ignore[no-any-return]
    except OSError:
        return None


def pidfd_exited(pidfd: int) -> bool:
    """Whether the process a pidfd names has exited (it is readable then)."""
    import select

    poller = _real_poll()
    poller.register(pidfd, select.POLLIN)
    return bool(poller.poll(0))


def _real_poll() -> Any:
    """A ``select.poll`` object, gevent's original where gevent patched ``select``."""
    monkey = sys.modules.get("gevent.monkey")
    if monkey is not None and monkey.is_module_patched("select"):
        return monkey.get_original("select", "poll")()
    import select

    return select.poll()


# A signal for a task goes to its main thread, not to whichever of its threads the kernel picks.
# Python runs a signal's handler in the main thread, but only once that thread runs Python code
# again: a main thread blocked in a system call (poll() in Queue.get(), a lock, a sleep) stays
# blocked when the signal woke another thread instead, and a graceful stop would wait out its
# grace. Linux directs it with tgkill() (the main thread's id is the process id), or a pidfd with
# PIDFD_SIGNAL_THREAD (Linux 6.9 and newer); elsewhere the signal goes to the process.
_PIDFD_SIGNAL_THREAD = 1
_pidfd_thread_flag = True  # until the kernel refuses it (EINVAL: older than 6.9)


def signal_main_thread(pid: int, signum: int) -> None:
    """Send ``signum`` to the main thread of process ``pid`` where the platform can, else to
    the process; raises ``OSError`` as ``os.kill`` does. The caller makes sure ``pid`` is still
    the process it means (a child not reaped yet)."""
    lib = libc() if IS_LINUX else None
    tgkill = getattr(lib, "tgkill", None) if lib is not None else None  # glibc 2.30 and newer
    if tgkill is not None and tgkill(pid, pid, signum) == 0:
        return
    os.kill(pid, signum)


def pidfd_signal(pidfd: int, signum: int) -> None:
    """Send ``signum`` to the process a pidfd names (to its main thread where the kernel can);
    nothing if it is gone."""
    global _pidfd_thread_flag
    import signal

    try:
        if _pidfd_thread_flag and signum != signal.SIGKILL:
            try:
                signal.pidfd_send_signal(pidfd, signum, None, _PIDFD_SIGNAL_THREAD)
                return
            except OSError as exc:
                if exc.errno != errno.EINVAL:
                    raise
                _pidfd_thread_flag = False
        signal.pidfd_send_signal(pidfd, signum)
    except (OSError, AttributeError):
        pass


# -- learning of a child's exit before reaping it --------------------------------------------


class ExitWatcher:
    """Tells the zygote which of its children have exited, *before* they are reaped.

    Between its exit and its reaping, a child's pid and process group id cannot be reused, so
    the zygote can kill what the child left in its group without hitting another process. Three
    ways, by what the platform has: ``waitid(WNOWAIT)`` (Linux), kqueue's ``NOTE_EXIT`` (macOS,
    BSD), a pidfd per child (Linux without ``waitid``).
    """

    def watch(self, pid: int) -> None:
        """Start watching child ``pid``, from right after its fork."""

    def forget(self, pid: int) -> None:
        """Stop watching ``pid``: it was reaped."""

    def exited(self) -> Iterator[int]:
        """Children that exited and are not reaped yet; reap each before asking for more."""
        raise NotImplementedError

    def close(self) -> None:
        """Release the watcher's descriptors (in a forked child, say)."""


class _WaitidWatcher(ExitWatcher):
    def exited(self) -> Iterator[int]:
        while True:
            try:
                info = os.waitid(os.P_ALL, 0, os.WEXITED | os.WNOHANG | os.WNOWAIT)
            except ChildProcessError:
                return
            if info is None or info.si_pid == 0:
                return
            yield info.si_pid


class _PidfdWatcher(ExitWatcher):
    def __init__(self) -> None:
        import select

        self._fds: Dict[int, int] = {}
        self._poller = select.poll()
        self._pids: Dict[int, int] = {}  # by pidfd

    def watch(self, pid: int) -> None:
        import select

        if pid in self._fds:
            return
        fd = os.pidfd_open(pid)
        os.set_inheritable(fd, False)
        self._fds[pid] = fd
        self._pids[fd] = pid
        self._poller.register(fd, select.POLLIN)

    def forget(self, pid: int) -> None:
        fd = self._fds.pop(pid, None)
        if fd is not None:
            self._poller.unregister(fd)
            del self._pids[fd]
            os.close(fd)

    def exited(self) -> Iterator[int]:
        for fd, _event in self._poller.poll(0):
            pid = self._pids.get(fd)
            if pid is not None:
                yield pid

    def close(self) -> None:
        for fd in self._fds.values():
            try:
                os.close(fd)
            except OSError:
                pass
        self._fds.clear()
        self._pids.clear()


class _KqueueWatcher(ExitWatcher):
    def __init__(self) -> None:
        import select

        self._kq = select.kqueue()  # type: ignore[attr-defined]
        self._early: List[int] = []

    def watch(self, pid: int) -> None:
        import select

        event = select.kevent(  # type: ignore[attr-defined]
            pid,
            select.KQ_FILTER_PROC,  # type: ignore[attr-defined]
            select.KQ_EV_ADD | select.KQ_EV_ONESHOT,  # type: ignore[attr-defined]
            select.KQ_NOTE_EXIT,  # type: ignore[attr-defined]
        )
        try:
            self._kq.control([event], 0, 0)
        except ProcessLookupError:
            self._early.append(pid)  # it exited already: a zombie until reaped

    def exited(self) -> Iterator[int]:
        early, self._early = self._early, []
        yield from early
        for event in self._kq.control(None, 64, 0):
            yield event.ident

    def close(self) -> None:
        self._kq.close()


def exit_watcher() -> ExitWatcher:
    """The best way this platform has to see a child's exit before reaping it."""
    if hasattr(os, "waitid") and hasattr(os, "WNOWAIT"):
        return _WaitidWatcher()
    import select

    if hasattr(select, "kqueue"):
        return _KqueueWatcher()
    if hasattr(os, "pidfd_open"):
        return _PidfdWatcher()
    raise OSError("bgtask's zygote needs os.waitid, kqueue or pidfds to follow its children")


def reap(pid: int) -> int:
    """Reap child ``pid`` (it has exited) and return its exit code, ``-N`` for signal N."""
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)


# -- descriptors and sockets for bgtask.Queue ------------------------------------------------

# A datagram socket pair (on Linux, one whose end is an empty read), and its calls' flags.
QUEUE_SOCKET_KIND = socket.SOCK_SEQPACKET if IS_LINUX else socket.SOCK_DGRAM
SEND_FLAGS = int(socket.MSG_DONTWAIT) | int(getattr(socket, "MSG_NOSIGNAL", 0))
RECV_FLAGS = int(socket.MSG_DONTWAIT) | int(getattr(socket, "MSG_CMSG_CLOEXEC", 0))
# A send that failed for want of room: EAGAIN (poll says when there is room again); ENOBUFS
# (macOS: poll says "room" while the peer's buffer is full) and ETOOMANYREFS (Linux: more
# descriptors in flight in sockets than the sender may open, counted per user, for a process
# without CAP_SYS_RESOURCE) clear with time, unseen by poll.
_ROOM_POLLABLE = frozenset((errno.EAGAIN, errno.EWOULDBLOCK))
_ROOM_LATER = frozenset(code for code in (errno.ENOBUFS, getattr(errno, "ETOOMANYREFS", 0)) if code)


def datagram_socketpair(buffer: int) -> Tuple[socket.socket, socket.socket]:
    """Two connected Unix datagram sockets that keep each message whole, buffers of ``buffer``.

    The system may cap the buffers lower; a send never raises ``SIGPIPE``.
    """
    a, b = socket.socketpair(socket.AF_UNIX, QUEUE_SOCKET_KIND)
    for sock in (a, b):
        for option in (socket.SO_SNDBUF, socket.SO_RCVBUF):
            try:
                sock.setsockopt(socket.SOL_SOCKET, option, buffer)
            except OSError:
                pass
        if hasattr(socket, "SO_NOSIGPIPE"):  # macOS: no MSG_NOSIGNAL
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_NOSIGPIPE, 1)
    return a, b


def no_room(error: OSError) -> bool:
    """Whether a send failed only because the socket has no room now."""
    return error.errno in _ROOM_POLLABLE or error.errno in _ROOM_LATER


def room_is_pollable(error: OSError) -> bool:
    """For a send with no room: whether ``poll`` tells when there is room again."""
    return error.errno in _ROOM_POLLABLE


def memory_file(name: str, size: int = 0) -> int:
    """A descriptor of an anonymous file in memory (``memfd``; an unlinked temporary file where
    there is none), close-on-exec, ``size`` bytes long."""
    if hasattr(os, "memfd_create"):
        fd = os.memfd_create(name, os.MFD_CLOEXEC)
    else:
        import tempfile

        with tempfile.TemporaryFile() as f:
            fd = os.dup(f.fileno())
    if size:
        try:
            os.ftruncate(fd, size)
        except BaseException:
            os.close(fd)
            raise
    return fd


def map_private(fd: int, size: int) -> Any:
    """A private, writable (copy-on-write) mapping of the first ``size`` bytes of ``fd``, as an
    object that exports it as a buffer; unmapped once nothing uses it. ``fd`` may be closed.

    ``mmap.mmap`` keeps a duplicate of the descriptor for as long as the mapping lives (until
    Python 3.13's ``trackfd=False``): a program holding many received arrays would run out of
    descriptors. So, before 3.13, the C library maps it, seen through a ``ctypes`` array.
    """
    import mmap

    prot = mmap.PROT_READ | mmap.PROT_WRITE
    if sys.version_info >= (3, 13):
        return mmap.mmap(fd, size, flags=mmap.MAP_PRIVATE, prot=prot, trackfd=False)
    lib = libc()
    if lib is None:
        return mmap.mmap(fd, size, flags=mmap.MAP_PRIVATE, prot=prot)
    import ctypes
    import weakref

    mmap_, munmap = _mapping_calls(lib)
    address = mmap_(None, size, prot, mmap.MAP_PRIVATE, fd, 0)
    if address is None or address == _MAP_FAILED:
        code = ctypes.get_errno()
        raise OSError(code, f"mmap: {os.strerror(code)}")
    memory = (ctypes.c_ubyte * size).from_address(address)
    # Not at the interpreter's exit: objects built on the mapping may still be read then.
    weakref.finalize(memory, munmap, address, size).atexit = False
    return memoryview(memory).cast("B")  # ctypes says "<B", which memoryview cannot write


_MAP_FAILED = (1 << (8 * struct.calcsize("P"))) - 1  # (void *) -1
_map_calls: Optional[Tuple[Any, Any]] = None


def _mapping_calls(lib: Any) -> Tuple[Any, Any]:
    global _map_calls
    if _map_calls is None:
        import ctypes

        mmap_ = lib.mmap
        mmap_.restype = ctypes.c_void_p
        mmap_.argtypes = [
            ctypes.c_void_p,
            ctypes.c_size_t,
            ctypes.c_int,
            ctypes.c_int,
            ctypes.c_int,
            ctypes.c_long,
        ]
        munmap = lib.munmap
        munmap.restype = ctypes.c_int
        munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
        _map_calls = (mmap_, munmap)
    return _map_calls


def pipe_bytes(fd: int) -> int:
    """How many bytes wait in a pipe (``FIONREAD``)."""
    import array
    import fcntl
    import termios

    count = array.array("i", [0])
    fcntl.ioctl(fd, termios.FIONREAD, count, True)
    return count[0]


def grow_pipe(fd: int, size: int) -> None:
    """Ask for a pipe buffer of ``size`` bytes (Linux); the system may give less, or nothing."""
    import fcntl

    setpipe = getattr(fcntl, "F_SETPIPE_SZ", None)
    if setpipe is not None:
        try:
            fcntl.fcntl(fd, setpipe, size)
        except OSError:
            pass


def wait_fds(
    readers: List[int], writers: List[int], timeout: Optional[float], cooperative: bool = False
) -> List[int]:
    """Wait until one of the descriptors is ready or ``timeout`` passes; return the ready ones.

    ``poll``, which takes any descriptor number; ``select`` where there is no ``poll``, and where
    ``cooperative`` (a gevent-patched program: its ``select`` lets other greenlets run).
    """
    import select

    if cooperative or not hasattr(select, "poll"):
        ready_r, ready_w, _ = select.select(readers, writers, [], timeout)
        return [*ready_r, *ready_w]
    poller = select.poll()
    for fd in readers:
        poller.register(fd, select.POLLIN)
    for fd in writers:
        poller.register(fd, select.POLLOUT)
    return [fd for fd, _ in poller.poll(None if timeout is None else max(1, int(timeout * 1000 + 0.999)))]
