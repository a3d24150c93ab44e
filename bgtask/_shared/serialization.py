"""Pickling of functions, arguments, results and exceptions: the only cloudpickle import.

cloudpickle pickles what the stdlib pickles by reference (module-level functions of importable
modules) the same way, and everything else by value: lambdas, closures, nested functions and
functions defined in ``__main__``, a REPL or a notebook. The task process therefore never imports
the main module, and a script needs no ``if __name__ == "__main__":`` guard.

Arguments are pickled eagerly, in the caller, so a bad argument fails at the call site with its
name; an exception that cannot make the round trip is replaced, in the task, by a plain packet
(type name, message, traceback) that always can.

Objects that stand for a descriptor (a socket, a ``multiprocessing`` connection, a
``bgtask.Queue``) travel in a call only: their descriptors are duplicated while the call is
pickled (:func:`send_along`) and go with it as ``SCM_RIGHTS``; the task takes them back while it
unpickles (:func:`received`). Anywhere else (a result, a queue item) they are refused by name,
never sent as a bare number. ``multiprocessing`` manager proxies carry their manager's authkey,
as ``multiprocessing`` itself does for the children it starts.

Large buffers go by reference (``_shared.buffers``): a call is pickled with protocol 5, and its
large out-of-band buffers travel as memory files, with the descriptors. The body ends with a
2-byte count of those files (always present, 0 on Ray).
"""

from __future__ import annotations

import collections
import io
import marshal
import os
import pickle
import sys
import threading
import traceback
import types
from typing import Any, Callable, ClassVar, Dict, List, Optional, Sequence, Tuple, Union

import cloudpickle

from . import buffers as _buffers
from . import wire as _wire
from .errors import RemoteTraceback, SerializationError, TaskError, set_cause
from .wire import Body, Pieces, WithFiles

PROTOCOL = pickle.HIGHEST_PROTOCOL

ExceptionPacket = Tuple[Optional[bytes], str, str, str]


class _Pickler(cloudpickle.CloudPickler):  # type: ignore[misc]
    """cloudpickle, keeping the file name of code pickled by value.

    cloudpickle 3 replaces it with ``<dynamic-code>`` to make payloads deterministic; a task's
    traceback would then show neither the file nor the source line of the user's code. Code
    objects travel with ``marshal`` instead, which keeps every field (the task runs the same
    interpreter, so the format matches).
    """

    dispatch_table: ClassVar[Any] = collections.ChainMap(
        {types.CodeType: lambda code: (marshal.loads, (marshal.dumps(code),))},
        cloudpickle.CloudPickler.dispatch_table,
    )


# At most this many descriptors travel with one call (Linux takes 253 in one SCM_RIGHTS message;
# two more may carry the standard streams), memory files of large buffers included.
MAX_DESCRIPTORS = 250


class _Descriptors(threading.local):
    outgoing: Optional[List[int]] = None  # while a call is pickled: duplicates to send with it
    guards: Optional[Dict[int, Any]] = None  # ... the lock to hold while closing one of them
    keep: Optional[List[Any]] = None  # while a call is pickled: what must live as long as its task
    incoming: Optional[List[int]] = None  # while a call is unpickled: what arrived with it
    files: Optional[List[int]] = None  # while a call is pickled: memory files of its buffers
    target: Optional[str] = None  # while a call is pickled: "local", or "ray" for a task on Ray


_descriptors = _Descriptors()


def _room() -> bool:
    """While a call is pickled: whether one more descriptor fits in its message."""
    taken = len(_descriptors.outgoing or ()) + len(_descriptors.files or ())
    return taken < MAX_DESCRIPTORS


def send_along(fd: int, what: str, guard: Any = None) -> int:
    """While a call is pickled: send a duplicate of ``fd`` with it; its index for :func:`received`.

    Elsewhere (a result, a queue item, ``pickle.dumps`` by hand) raise ``TypeError`` naming
    ``what``: a descriptor number means nothing in another process. ``guard``: a lock to hold
    while the duplicate is closed (closing any descriptor of a file drops this process's
    ``lockf`` locks on it).
    """
    outgoing = _descriptors.outgoing
    if outgoing is None:
        raise TypeError(
            f"{what} stands for a descriptor of this process: it can be an argument of a task "
            "(or captured by its function), not a result, a queue item or pickled otherwise"
        )
    if len(outgoing) + len(_descriptors.files or ()) >= MAX_DESCRIPTORS:
        raise TypeError(f"more than {MAX_DESCRIPTORS} descriptors in one call")
    outgoing.append(os.dup(fd))
    if guard is not None and _descriptors.guards is not None:
        _descriptors.guards[outgoing[-1]] = guard
    return len(outgoing) - 1


def keep_alive(obj: Any) -> None:
    """While a call is pickled: keep ``obj`` alive in this process as long as the task runs."""
    keep = _descriptors.keep
    if keep is not None:
        keep.append(obj)


def pickling_for() -> Optional[str]:
    """While a call is pickled: where its task runs, ``"local"`` or ``"ray"``; else ``None``."""
    return _descriptors.target


def received(index: int) -> int:
    """While a call is unpickled: the descriptor sent at ``index``, now the caller's to close."""
    incoming = _descriptors.incoming
    if incoming is None or not 0 <= index < len(incoming) or incoming[index] < 0:
        raise pickle.UnpicklingError("a descriptor that did not arrive with the call")
    fd, incoming[index] = incoming[index], -1
    return fd


def type_name(obj: Any) -> str:
    """``module.QualName`` of ``obj``'s type, as error messages name it."""
    return f"{type(obj).__module__}.{type(obj).__qualname__}"


def _describe_type(obj: Any) -> str:
    return f"a {type_name(obj)}"


def _reduce_socket(sock: Any) -> Any:
    index = send_along(sock.fileno(), _describe_type(sock))
    return _rebuild_socket, (index, int(sock.family), int(sock.type), sock.proto, sock.gettimeout())


def _rebuild_socket(index: int, family: int, kind: int, proto: int, timeout: Optional[float]) -> Any:
    import socket

    sock = socket.socket(family, kind, proto, fileno=received(index))
    sock.settimeout(timeout)  # as the caller's: blocking or not is the descriptor's, shared anyway
    return sock


def _reduce_connection(conn: Any) -> Any:
    index = send_along(conn.fileno(), _describe_type(conn))
    return _rebuild_connection, (index, conn.readable, conn.writable)


def _rebuild_connection(index: int, readable: bool, writable: bool) -> Any:
    from multiprocessing.connection import Connection

    return Connection(received(index), readable, writable)


def _reduce_proxy(proxy: Any) -> Any:
    """A manager proxy, with its authkey: a task does not share this program's own."""
    rebuild, (func, token, serializer, kwds) = proxy.__reduce__()
    kwds = dict(kwds, authkey=bytes(proxy._authkey))
    return rebuild, (func, token, serializer, kwds)


class _StrictPickler(_Pickler):
    """Also sends what stands for a descriptor along, and proxies with their authkey.

    A ``multiprocessing`` connection would pickle as its descriptor's number, and a manager
    proxy without the authkey its manager checks. They are made (and used) once
    ``multiprocessing.connection`` is imported; a program without it pays nothing.
    """

    dispatch_table: ClassVar[Any] = collections.ChainMap({}, _Pickler.dispatch_table)

    def reducer_override(self, obj: Any) -> Any:
        if _proxy_class is not None and isinstance(obj, _proxy_class):
            return _reduce_proxy(obj)
        return super().reducer_override(obj)


def _socket_class() -> Any:
    import socket

    return socket.socket


_Pickler.dispatch_table.maps[0][_socket_class()] = _reduce_socket
_pickler: Any = _Pickler
_proxy_class: Any = None


def _pickler_class() -> Any:
    global _pickler, _proxy_class
    if _pickler is _Pickler:
        # Another thread may be importing the module: until it has defined the class, no
        # connection exists that could be pickled.
        connection = getattr(sys.modules.get("multiprocessing.connection"), "Connection", None)
        if connection is not None:
            _StrictPickler.dispatch_table.maps[0][connection] = _reduce_connection
            _pickler = _StrictPickler
    if _proxy_class is None and _pickler is _StrictPickler:
        _proxy_class = getattr(sys.modules.get("multiprocessing.managers"), "BaseProxy", None)
    return _pickler


def dumps(obj: Any, buffer_callback: Any = None) -> bytes:
    """Pickle ``obj`` with cloudpickle."""
    buffer = io.BytesIO()
    _pickler_class()(buffer, protocol=PROTOCOL, buffer_callback=buffer_callback).dump(obj)
    return buffer.getvalue()


class _PieceWriter:
    """The file a call is pickled into: the pickler hands large ``bytes`` (an argument's own
    object) straight to ``write``, and they are kept, not copied."""

    __slots__ = ("pieces", "size", "small")

    def __init__(self) -> None:
        self.pieces: List[Any] = []
        self.small = bytearray()
        self.size = 0

    def write(self, data: Any) -> int:
        size = len(data) if type(data) is bytes else memoryview(data).nbytes
        if size >= _wire.BIG_PIECE and type(data) is bytes:  # immutable: safe to keep, not copy
            if self.small:
                self.pieces.append(bytes(self.small))
                self.small = bytearray()
            self.pieces.append(data)
        else:
            self.small += data  # a bytearray or a buffer may change later: copied
        self.size += size
        return size

    def body(self) -> Body:
        if not self.pieces:
            return bytes(self.small)
        if self.small:
            self.pieces.append(bytes(self.small))
        return Pieces(self.pieces, self.size)


def _dumps_pieces(obj: Any, files: Optional[List[int]] = None, views: Optional[List[Any]] = None) -> Body:
    """Pickle ``obj`` with cloudpickle into bytes, or ``Pieces`` when it holds large bytes.

    ``files``: large buffers go out of band, each into a memory file appended there; ``views``:
    each as a ``PickleBuffer`` appended there (Ray).
    """
    writer = _PieceWriter()
    callback = _callback(files, views)
    _pickler_class()(writer, protocol=PROTOCOL, buffer_callback=callback).dump(obj)
    return writer.body()


def dumps_value(obj: Any) -> bytes:
    """Pickle a value (a stream's item, a queue's item): the stdlib pickler first (faster),
    cloudpickle if needed.

    What the stdlib pickles, it pickles by reference to importable modules, which the main
    program can import too; anything else (lambdas, classes defined in the task) goes by value.
    """
    data = _dumps_value(obj, None)
    assert not isinstance(data, WithFiles)
    return data


def dumps_result(obj: Any, by_reference: bool, views: Optional[List[Any]] = None) -> Union[bytes, WithFiles]:
    """Pickle a task's return value as :func:`dumps_value` does; ``by_reference``: its large
    buffers go in memory files, which go with the bytes (``WithFiles``); ``views``: they are
    appended there (Ray)."""
    return _dumps_value(obj, [] if by_reference else None, views)


def _callback(files: Optional[List[int]], views: Optional[List[Any]]) -> Any:
    if files is not None:
        return _buffers.BufferFiles(files, _room)
    if views is not None:
        return _buffers.BufferViews(views)
    return None


def _dumps_value(
    obj: Any, files: Optional[List[int]], views: Optional[List[Any]] = None
) -> Union[bytes, WithFiles]:
    if type(obj) in _PLAIN:
        return pickle.dumps(obj, PROTOCOL)
    callback = _callback(files, views)
    files = [] if files is None else files
    try:
        if _pickler_class() is _StrictPickler:
            data = dumps(obj, callback)  # a multiprocessing connection must not pass as a bare number
        else:
            try:
                data = pickle.dumps(obj, PROTOCOL, buffer_callback=callback)
            except Exception:
                _buffers.close_all(files)
                if views is not None:
                    views.clear()  # the attempt's: cloudpickle's gives them again
                data = dumps(obj, callback)
    except BaseException:
        _buffers.close_all(files)
        raise
    return WithFiles(data, files) if files else data


# Types the stdlib pickler handles alone, whatever the program imported.
_PLAIN = frozenset((bytes, bytearray, str, int, float, bool, type(None), complex))


def loads(data: Any) -> Any:
    """Unpickle bytes made by :func:`dumps` or :func:`dumps_value` (``Mapped`` if they came
    with buffers by reference)."""
    if type(data) is _buffers.Mapped:
        return pickle.loads(data.data, buffers=[_buffers.writable(b) for b in data.buffers])
    return pickle.loads(data)


class Payload:
    """A pickled call, the descriptors that go with it (this process's duplicates), and what
    must stay alive here while its task runs."""

    __slots__ = ("body", "fds", "guards", "keep", "views")

    def __init__(
        self,
        body: Body,
        fds: Tuple[int, ...] = (),
        keep: Tuple[Any, ...] = (),
        guards: Optional[Dict[int, Any]] = None,
        views: Tuple[Any, ...] = (),
    ) -> None:
        self.body = body
        self.fds = fds
        self.keep = keep
        self.guards = guards or {}
        self.views = views  # on Ray: the large buffers, out of band (PickleBuffers)

    def close(self) -> None:
        """Close the duplicates, once: after they were sent, or when the call never starts."""
        fds, self.fds = self.fds, ()
        for fd in fds:
            close_guarded(fd, self.guards.get(fd))


def close_guarded(fd: int, guard: Any = None) -> None:
    """Close ``fd``, holding ``guard`` (a lock) if given."""
    try:
        if guard is None:
            os.close(fd)
        else:
            with guard:
                os.close(fd)
    except OSError:
        pass


def dumps_call(
    fn: Callable[..., Any],
    args: Tuple[Any, ...],
    kwargs: Dict[str, Any],
    by_reference: bool = True,
    on_ray: bool = False,
) -> Payload:
    """Pickle a call, or raise ``SerializationError`` naming the part that cannot be pickled.

    ``by_reference``: large buffers go in memory files (see the module docstring); ``on_ray``:
    they go beside the pickle (``Payload.views``), for Ray's object store to carry.
    """
    try:
        return _dumps_with_descriptors((fn, args, kwargs), by_reference, on_ray)
    except Exception as exc:  # pickling raises TypeError, PicklingError, AttributeError...
        culprit = _find_culprit(fn, args, kwargs, on_ray)
        raise SerializationError(
            f"cannot send {culprit} to the task process: {type(exc).__name__}: {exc}"
        ) from exc


def _dumps_with_descriptors(obj: Any, by_reference: bool = False, on_ray: bool = False) -> Payload:
    fds: List[int] = []
    keep: List[Any] = []
    guards: Dict[int, Any] = {}
    files: List[int] = []
    views: List[Any] = []
    _descriptors.outgoing = fds
    _descriptors.keep = keep
    _descriptors.guards = guards
    _descriptors.files = files
    _descriptors.target = "ray" if on_ray else "local"
    try:
        body = _dumps_pieces(obj, files if by_reference else None, views if on_ray else None)
        return Payload(
            _buffers.add_count(body, len(files)), (*fds, *files), tuple(keep), guards, tuple(views)
        )
    except BaseException:
        Payload(b"", (*fds, *files), (), guards).close()
        raise
    finally:
        _descriptors.outgoing = None
        _descriptors.keep = None
        _descriptors.guards = None
        _descriptors.files = None
        _descriptors.target = None


def loads_call(body: Any, fds: List[int], views: Sequence[Any] = ()) -> Any:
    """Unpickle a call made by :func:`dumps_call` (``views``: its large buffers, on Ray);
    descriptors nothing claimed are closed."""
    count = int.from_bytes(body[-2:], "big")
    data = memoryview(body)[:-2]
    _descriptors.incoming = fds
    try:
        buffers = [_buffers.map_buffer(received(index)) for index in range(len(fds) - count, len(fds))]
        buffers.extend(_buffers.writable(view) for view in views)
        return pickle.loads(data, buffers=buffers)
    finally:
        _descriptors.incoming = None
        data.release()
        Payload(b"", tuple(fd for fd in fds if fd >= 0)).close()


def _picklable(obj: Any, on_ray: bool) -> bool:
    try:
        _dumps_with_descriptors(obj, False, on_ray).close()
    except Exception:
        return False
    return True


def _describe(obj: Any) -> str:
    return f"({_describe_type(obj)})"


def _find_culprit(
    fn: Callable[..., Any], args: Tuple[Any, ...], kwargs: Dict[str, Any], on_ray: bool = False
) -> str:
    for i, arg in enumerate(args):
        if not _picklable(arg, on_ray):
            return f"positional argument {i} {_describe(arg)}"
    for key, value in kwargs.items():
        if not _picklable(value, on_ray):
            return f"keyword argument {key!r} {_describe(value)}"
    target = getattr(fn, "__func__", fn)
    owner = getattr(fn, "__self__", None)
    if owner is not None and not isinstance(owner, types.ModuleType) and not _picklable(owner, on_ray):
        return f"the object {getattr(target, '__qualname__', target)!r} is bound to {_describe(owner)}"
    code = getattr(target, "__code__", None)
    if code is not None:
        name = getattr(target, "__qualname__", "the function")
        for var, cell in zip(code.co_freevars, getattr(target, "__closure__", None) or ()):
            try:
                value = cell.cell_contents
            except ValueError:  # an empty cell
                continue
            if not _picklable(value, on_ray):
                return f"variable {var!r} captured by {name} {_describe(value)}"
        module_globals = getattr(target, "__globals__", {})
        for var in code.co_names:
            if var in module_globals and not _picklable(module_globals[var], on_ray):
                return f"global variable {var!r} used by {name} {_describe(module_globals[var])}"
    return f"the function {getattr(fn, '__qualname__', fn)!r}"


def pack_exception(exc: BaseException) -> ExceptionPacket:
    """Turn an exception raised in a task into a packet that always pickles.

    The exception itself travels when it survives a pickle round trip here; its type name,
    message and formatted traceback travel always.
    """
    # BaseException: an exception's __reduce__ or __str__ may raise anything, SystemExit
    # included, and the packet must still go out (a stand-in takes the exception's place).
    try:
        tb_text = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    except BaseException:
        tb_text = f"{type_name(exc)} (its traceback could not be formatted)\n"
    exc_type = type_name(exc)
    try:
        message = str(exc)
    except BaseException:
        message = "<str() of the exception failed>"
    data: Optional[bytes]
    try:
        data = dumps(exc)
        loads(data)
    except BaseException:
        data = None
    return data, exc_type, message, tb_text


def unpack_exception(packet: ExceptionPacket) -> BaseException:
    """Rebuild a task's exception with its traceback chained; a ``TaskError`` if it cannot be."""
    data, type_name, message, tb_text = packet
    exc: Optional[BaseException] = None
    if data is not None:
        try:
            exc = loads(data)
        except Exception:
            exc = None
    if not isinstance(exc, BaseException):
        exc = TaskError(type_name, message, tb_text)
    set_cause(exc, RemoteTraceback(tb_text))
    return exc
