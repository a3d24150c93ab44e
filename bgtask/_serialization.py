"""Pickling of functions, arguments, results and exceptions: the only cloudpickle import.

cloudpickle pickles what the stdlib pickles by reference (module-level functions of importable
modules) the same way, and everything else by value: lambdas, closures, nested functions and
functions defined in ``__main__``, a REPL or a notebook. The task process therefore never imports
the main module, and a script needs no ``if __name__ == "__main__":`` guard.

Arguments are pickled eagerly, in the caller, so a bad argument fails at the call site with its
name; an exception that cannot make the round trip is replaced, in the task, by a plain packet
(type name, message, traceback) that always can.
"""

from __future__ import annotations

import collections
import io
import marshal
import pickle
import sys
import traceback
import types
from typing import Any, Callable, ClassVar, Dict, Optional, Tuple

import cloudpickle

from ._errors import RemoteTraceback, SerializationError, TaskError, set_cause

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


def _refuse_descriptor(obj: Any) -> Any:
    raise TypeError(
        f"a {type(obj).__module__}.{type(obj).__qualname__} stands for a descriptor of this "
        "process: the task would get its number only, naming nothing or another file there"
    )


class _StrictPickler(_Pickler):
    """Also refuses objects that stand for a descriptor and would pickle as its bare number.

    A ``multiprocessing`` connection pickles as its descriptor's number outside
    ``multiprocessing``'s own pickler. It is made (and used) once ``multiprocessing.connection``
    is imported; a program without it pays nothing.
    """

    dispatch_table: ClassVar[Any] = collections.ChainMap({}, _Pickler.dispatch_table)


_pickler: Any = _Pickler


def _pickler_class() -> Any:
    global _pickler
    if _pickler is _Pickler:
        # Another thread may be importing the module: until it has defined the class, no
        # connection exists that could be pickled.
        connection = getattr(sys.modules.get("multiprocessing.connection"), "Connection", None)
        if connection is not None:
            _StrictPickler.dispatch_table.maps[0][connection] = _refuse_descriptor
            _pickler = _StrictPickler
    return _pickler


def dumps(obj: Any) -> bytes:
    """Pickle ``obj`` with cloudpickle."""
    buffer = io.BytesIO()
    _pickler_class()(buffer, protocol=PROTOCOL).dump(obj)
    return buffer.getvalue()


def dumps_value(obj: Any) -> bytes:
    """Pickle a task's return value: the stdlib pickler first (faster), cloudpickle if needed.

    What the stdlib pickles, it pickles by reference to importable modules, which the main
    program can import too; anything else (lambdas, classes defined in the task) goes by value.
    """
    if _pickler_class() is _StrictPickler:
        return dumps(obj)  # a multiprocessing connection must not pass as a bare number
    try:
        return pickle.dumps(obj, PROTOCOL)
    except Exception:
        return dumps(obj)


def loads(data: Any) -> Any:
    """Unpickle bytes made by :func:`dumps`."""
    return pickle.loads(data)


def dumps_call(fn: Callable[..., Any], args: Tuple[Any, ...], kwargs: Dict[str, Any]) -> bytes:
    """Pickle a call, or raise ``SerializationError`` naming the part that cannot be pickled."""
    try:
        return dumps((fn, args, kwargs))
    except Exception as exc:  # pickling raises TypeError, PicklingError, AttributeError...
        culprit = _find_culprit(fn, args, kwargs)
        raise SerializationError(
            f"cannot send {culprit} to the task process: {type(exc).__name__}: {exc}"
        ) from exc


def _picklable(obj: Any) -> bool:
    try:
        dumps(obj)
    except Exception:
        return False
    return True


def _describe(obj: Any) -> str:
    return f"(a {type(obj).__module__}.{type(obj).__qualname__})"


def _find_culprit(fn: Callable[..., Any], args: Tuple[Any, ...], kwargs: Dict[str, Any]) -> str:
    for i, arg in enumerate(args):
        if not _picklable(arg):
            return f"positional argument {i} {_describe(arg)}"
    for key, value in kwargs.items():
        if not _picklable(value):
            return f"keyword argument {key!r} {_describe(value)}"
    target = getattr(fn, "__func__", fn)
    owner = getattr(fn, "__self__", None)
    if owner is not None and not isinstance(owner, types.ModuleType) and not _picklable(owner):
        return f"the object {getattr(target, '__qualname__', target)!r} is bound to {_describe(owner)}"
    code = getattr(target, "__code__", None)
    if code is not None:
        name = getattr(target, "__qualname__", "the function")
        for var, cell in zip(code.co_freevars, getattr(target, "__closure__", None) or ()):
            try:
                value = cell.cell_contents
            except ValueError:  # an empty cell
                continue
            if not _picklable(value):
                return f"variable {var!r} captured by {name} {_describe(value)}"
        module_globals = getattr(target, "__globals__", {})
        for var in code.co_names:
            if var in module_globals and not _picklable(module_globals[var]):
                return f"global variable {var!r} used by {name} {_describe(module_globals[var])}"
    return f"the function {getattr(fn, '__qualname__', fn)!r}"


def pack_exception(exc: BaseException) -> ExceptionPacket:
    """Turn an exception raised in a task into a packet that always pickles.

    The exception itself travels when it survives a pickle round trip here; its type name,
    message and formatted traceback travel always.
    """
    tb_text = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    type_name = f"{type(exc).__module__}.{type(exc).__qualname__}"
    try:
        message = str(exc)
    except Exception:
        message = "<str() of the exception failed>"
    data: Optional[bytes]
    try:
        data = dumps(exc)
        loads(data)
    except Exception:
        data = None
    return data, type_name, message, tb_text


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
