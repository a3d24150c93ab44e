"""A call of a background function: pickle it, start its process, return its ``Task``.

::

    fn(*args) ── start_call: pickle the call now (a bad argument fails here, naming it)
              └─ start_with: a Task, registered with the lifecycle; started at once through
                 the backend of its options, or pending in its Limiter (or handed over to the
                 offload thread where a start must not run now: see limits.must_hand_over)
"""

from __future__ import annotations

import functools
import os
import sys
import types
from typing import TYPE_CHECKING, Any, Callable, Dict, Iterable, List, Optional, Tuple

from .._shared import green as _green
from .._shared import is_bgtask_file
from .._shared.errors import BgTaskError, SerializationError
from . import lifecycle as _lifecycle
from . import limits as _limits

if TYPE_CHECKING:
    from .task import Task


def load_call_path() -> None:
    """Import what a call needs, once, when a function is decorated (not at ``import bgtask``).

    A call's first imports must not be under way when a signal handler starts a task: the
    handler would find the modules half made.
    """
    global _call_path_loaded
    if not _call_path_loaded:
        from .._backends import launch  # noqa: F401
        from .._runtime import runner  # noqa: F401
        from .._shared import serialization  # noqa: F401
        from . import task  # noqa: F401

        _call_path_loaded = True


_call_path_loaded = False


def start_call(fn: Callable[..., Any], args: Any, kwargs: Any, options: Dict[str, Any]) -> Task[Any]:
    # Imported on first use: `import bgtask` stays cheap, and so does the zygote.
    from .._runtime.runner import WithInitializers
    from .._shared.serialization import dumps_call

    _refuse_during_bootstrap()
    _green.check(options["start_method"])
    initializers = [*_program_initializers, *options.get("initializers", ())]
    shipped = WithInitializers(fn, initializers) if initializers else fn
    from .._backends import launch as _launch

    # Large buffers go in memory files, as descriptors; no descriptor reaches a Ray worker.
    # Behind many pending calls, a call keeps them in its pickle: a descriptor held by each of
    # thousands of calls waiting for a place would use up the process's.
    limiter = options.get("limit")
    crowded = limiter is not None and limiter.pending >= PENDING_BY_REFERENCE
    on_ray = _launch.uses_ray(options)  # there, Ray's object store carries them
    by_reference = not crowded and not on_ray
    try:
        payload = dumps_call(
            shipped, args, kwargs, by_reference, on_ray
        )  # fails here, before any process starts
    except SerializationError as exc:
        if shipped is fn:
            raise
        dumps_call(fn, args, kwargs, False, on_ray).close()  # the call's own error, if it has one, first
        cause = exc.__cause__ or exc
        raise SerializationError(
            f"cannot send the initializers of {getattr(fn, '__qualname__', fn)!r} (set_initializer(), "
            f"initializer=, initargs=) to the task process: {type(cause).__name__}: {cause}"
        ) from exc
    try:
        return start_with(fn, payload, options)
    except BaseException:
        payload.close()
        raise


# At most this many calls wait in a Limiter with their large buffers in memory files (each
# holds a descriptor until it starts); the calls behind them keep their buffers in the pickle.
PENDING_BY_REFERENCE = 32


# What set_initializer() gave: run in every task this program starts, before its function.
_program_initializers: List[Tuple[Callable[..., Any], Tuple[Any, ...]]] = []


def set_initializer(initializer: Optional[Callable[..., Any]], initargs: Iterable[Any] = ()) -> None:
    """Run ``initializer(*initargs)`` in every task this program starts from now on, first.

    For what every task needs before its function runs: logging that does not go through the
    standard library (structlog, loguru), an error reporter's client (Sentry), a database pool.
    It runs before a function's own ``initializer``; ``None`` removes it. Like the function,
    it travels pickled with each call (cloudpickle: a closure or a lambda will do). Whatever it
    raises is the task's outcome, with its traceback. It is this process's setting: tasks that
    a task starts run the one that task has (none under the default start method unless the
    task sets one; under "fork" the task's copy of this one).

    Raises:
        TypeError: ``initializer`` is neither callable nor ``None``.
    """
    _program_initializers[:] = [] if initializer is None else [checked_initializer(initializer, initargs)]


set_initializer.__module__ = "bgtask"


def checked_initializer(
    initializer: Any, initargs: Iterable[Any], where: str = "set_initializer()"
) -> Tuple[Callable[..., Any], Tuple[Any, ...]]:
    if not callable(initializer):
        raise TypeError(f"{where}: initializer must be callable, not {type(initializer).__name__}")
    if isinstance(initargs, (str, bytes)) or not isinstance(initargs, Iterable):
        raise TypeError(f"{where}: initargs must be a tuple of arguments, not {type(initargs).__name__}")
    return initializer, tuple(initargs)


def start_with(fn: Callable[..., Any], payload: Any, options: Dict[str, Any]) -> Task[Any]:
    from .._backends import launch as _launch
    from .task import StreamTask, Task

    name = options["name"] or getattr(fn, "__qualname__", None) or repr(fn)
    stream = _is_generator_function(fn)
    kind = StreamTask if stream else Task
    limiter = options["limit"]
    if limiter is None and _limits.must_hand_over():
        limiter = _limits.handed_over()  # it starts in the offload thread, a moment later
    task: Task[Any] = kind(
        name, daemon=options["daemon"], graceful=options["graceful"], grace=options["grace"], limiter=limiter
    )
    task._scoped = options.get("scoped", False)
    if _lifecycle.track_origins:
        task._origin = _call_site()
    try:
        cwd: Optional[str] = os.getcwd()
    except OSError:
        cwd = None
    settings = {
        "name": name,
        "daemon": options["daemon"],
        "graceful": options["graceful"],
        "grace": options["grace"],
        "cwd": cwd,
        "argv": list(sys.argv),
        "parent": os.getpid(),
    }
    if stream:
        settings["stream"] = True
    if options["ray_options"]:
        settings["ray_options"] = options["ray_options"]
    if task._scoped:
        settings["scoped"] = True
    if options["relay_logging"]:
        from .._shared import logs as _logs

        settings["logging"] = _logs.snapshot()
    _lifecycle.register(task)

    def start() -> None:
        with _limits.starting():  # a signal handler that starts a task meanwhile hands it over
            launch()

    def launch() -> None:
        process = None
        try:
            process = _launch.for_options(options).start(settings, payload)
            process.keep = payload.keep
            task._attach(process)
        except BaseException as exc:
            if limiter is None:
                _lifecycle.unregister(task)
            if process is not None and task._process is None:
                process.abandon()  # interrupted between the start and the hand-over
            if isinstance(exc, OSError):
                raise BgTaskError(f"could not start task {name!r}: {_launch.why_not_started(exc)}") from exc
            raise
        finally:
            payload.close()  # the duplicates of what went with the call, sent or not
        if options["start_method"] is not None:
            _lifecycle.run_before_multiprocessing()
        elif "ray" in sys.modules:
            _lifecycle.run_before_ray()
        if options["timeout"] is not None:
            task._arm_timeout(options["timeout"])

    if limiter is None:
        start()
    else:
        from .limits import Call

        try:
            limiter._submit(task, Call(start, payload.close))  # at once if there is a place, else pending
        except BaseException:
            if task._process is None:  # it never started (else the monitor follows it as usual)
                _lifecycle.unregister(task)
            raise
    return task


# Code flags of generator and asynchronous generator functions (inspect.CO_*, without inspect).
_GENERATOR_FLAGS = 0x20 | 0x200


def _is_generator_function(fn: Any) -> bool:
    """Whether calling ``fn`` makes a generator: its task streams what it yields."""
    while True:
        if isinstance(fn, functools.partial):
            fn = fn.func
        elif hasattr(fn, "__func__"):
            fn = fn.__func__
        elif hasattr(fn, "__wrapped__"):  # functools.wraps: the function it wraps
            fn = fn.__wrapped__
        else:
            break
    code = getattr(fn, "__code__", None)
    return code is not None and bool(code.co_flags & _GENERATOR_FLAGS)


def _call_site() -> str:
    """Where the user's code called the background function: ``file:line in function``.

    Frames of bgtask and of ``contextlib`` (a ``with`` helper that starts the task) are skipped.
    """
    import contextlib

    skipped = {os.path.abspath(contextlib.__file__)}
    frame: Optional[types.FrameType] = sys._getframe(1)
    while frame is not None:
        path = os.path.abspath(frame.f_code.co_filename)
        if not is_bgtask_file(path) and path not in skipped:
            break
        frame = frame.f_back
    if frame is None:
        return "an unknown place"
    return f"{frame.f_code.co_filename}:{frame.f_lineno} in {frame.f_code.co_name}"


def _refuse_during_bootstrap() -> None:
    # Under spawn and forkserver, multiprocessing imports the main module again in the child;
    # a script without a __main__ guard would start its tasks again from there.
    mp_process = sys.modules.get("multiprocessing.process")
    if mp_process is not None and getattr(mp_process.current_process(), "_inheriting", False):
        raise BgTaskError(
            "a task was started while multiprocessing imported the main module in a child "
            "process (start_method 'spawn' or 'forkserver'); protect the script's entry point "
            "with `if __name__ == '__main__':`, or use the default start method, which needs no "
            "guard"
        )
