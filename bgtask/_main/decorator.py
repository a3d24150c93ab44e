"""``@background``: turn a function into one that runs in a new process at every call.

The decorated object keeps the function's signature for type checkers (``ParamSpec``) and its
metadata at run time (``functools.update_wrapper``); calling it pickles the call eagerly (so a bad
argument fails here, naming it), registers a ``Task`` with the lifecycle, and hands it to the
launcher of its start method.
"""

from __future__ import annotations

import functools
import math
import sys
import threading
import types
import weakref
from typing import (
    TYPE_CHECKING,
    Any,
    AsyncGenerator,
    AsyncIterator,
    Callable,
    Dict,
    Generator,
    Generic,
    Iterable,
    Iterator,
    Literal,
    Optional,
    TypeVar,
    Union,
    overload,
)

from .._shared import forks
from .._shared.platform import check_supported
from .call import checked_initializer, load_call_path, start_call
from .limits import Limiter

if TYPE_CHECKING:
    from .task import StreamTask, Task

if sys.version_info >= (3, 10):
    from typing import ParamSpec
else:  # pragma: no cover (3.9)
    from typing_extensions import ParamSpec

P = ParamSpec("P")
R = TypeVar("R")
Y = TypeVar("Y")
S = TypeVar("S")

START_METHODS = (None, "fork", "spawn", "forkserver")


# Guards every Background's set of started tasks: a WeakSet cannot be iterated while another
# thread adds to it.
_started_lock = threading.RLock()  # reentrant: a signal handler may start a task meanwhile


def forget_in_child() -> None:
    """After a fork: another thread may have held the lock."""
    global _started_lock
    _started_lock = threading.RLock()


class Background(Generic[P, R]):
    """A function decorated with ``@background``: each call starts a task process.

    Calling it returns a ``Task`` at once. ``is_daemon`` tells how its tasks end with the program;
    ``join()`` waits for every task it started that is still running.
    """

    __module__ = "bgtask"

    def __init__(
        self,
        fn: Callable[P, R],
        options: Dict[str, Any],
        started: Optional[weakref.WeakSet[Task[Any]]] = None,
    ) -> None:
        functools.update_wrapper(self, fn)
        self._fn = fn
        self._options = options
        load_call_path()
        # Weak: the lifecycle keeps running tasks alive; a finished, dropped handle goes away.
        self._started: weakref.WeakSet[Task[Any]] = weakref.WeakSet() if started is None else started

    @property
    def is_daemon(self) -> bool:
        """Whether this function's tasks are daemons (stopped, not waited for, at exit)."""
        return bool(self._options["daemon"])

    # A generator function's call returns a StreamTask of what it yields.
    @overload
    def __call__(  # type: ignore[overload-overlap]
        self: Background[P, Generator[Y, Any, S]], *args: P.args, **kwargs: P.kwargs
    ) -> StreamTask[Y, S]: ...
    @overload
    def __call__(
        self: Background[P, Iterator[Y]], *args: P.args, **kwargs: P.kwargs
    ) -> StreamTask[Y, None]: ...
    @overload
    def __call__(
        self: Background[P, AsyncGenerator[Y, Any]], *args: P.args, **kwargs: P.kwargs
    ) -> StreamTask[Y, None]: ...
    @overload
    def __call__(
        self: Background[P, AsyncIterator[Y]], *args: P.args, **kwargs: P.kwargs
    ) -> StreamTask[Y, None]: ...
    @overload
    def __call__(self, *args: P.args, **kwargs: P.kwargs) -> Task[R]: ...

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        task: Task[Any] = start_call(self._fn, args, kwargs, self._options)
        with _started_lock:
            self._started.add(task)
        return task

    def map(
        self,
        *iterables: Iterable[Any],
        limit: Optional[int] = None,
        ordered: bool = True,
        timeout: Optional[float] = None,
    ) -> Iterator[R]:
        """Call the function on each item of ``iterables`` (zipped), a task per call; yield results.

        At most ``limit`` tasks run at once (default: the number of CPUs; a function with a
        ``limit`` of its own counts them there) and about twice that many calls are made ahead:
        the input is read lazily, as results are taken. With ``ordered=False`` results come
        as their tasks finish. The first error is raised when its item is reached; leaving the
        loop (``break``, an exception, closing the iterator) and the end of the program stop
        the tasks still running. ``timeout`` counts from this call: ``TimeoutError`` when a
        result is not there by then.
        """
        from .map import map_calls

        if not iterables:
            raise TypeError("map() must have at least one iterable")
        calls = zip(*iterables)
        return map_calls(
            start_call, self._fn, self._options, calls, limit=limit, ordered=ordered, timeout=timeout
        )

    def amap(
        self,
        *iterables: Iterable[Any],
        limit: Optional[int] = None,
        ordered: bool = True,
        timeout: Optional[float] = None,
    ) -> AsyncIterator[R]:
        """``map()`` for asyncio: ``async for result in fn.amap(items)``.

        Tasks are started off the event loop (see ``astart``); waiting for results does not
        block it. Cancelling the loop stops the tasks still running.
        """
        from .map import amap_calls

        if not iterables:
            raise TypeError("amap() must have at least one iterable")
        calls = zip(*iterables)
        return amap_calls(
            start_call, self._fn, self._options, calls, limit=limit, ordered=ordered, timeout=timeout
        )

    async def astart(self, *args: P.args, **kwargs: P.kwargs) -> Task[R]:
        """Start a task from a coroutine: pickling and the hand-over run in a thread, not in the
        event loop. ``task = await fn.astart(x)`` is ``task = fn(x)`` without blocking the loop.
        Cancelled meanwhile, the task it started is stopped."""
        from .map import start_off_loop

        task: Task[R] = await start_off_loop(functools.partial(self.__call__, *args, **kwargs))
        return task

    def join(self, timeout: Optional[float] = None) -> None:
        """Wait until every task this function started has finished, or ``timeout`` passes."""
        import time

        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            with _started_lock:
                started = list(self._started)
            pending = [t for t in started if not t._exited]  # pending ones too
            if not pending:
                return
            for task in pending:
                left = None if deadline is None else max(0.0, deadline - time.monotonic())
                task.join(left)
                if deadline is not None and time.monotonic() >= deadline:
                    return

    def __get__(self, instance: Any, owner: Optional[type] = None) -> Any:
        if instance is None:
            return self
        return Background(types.MethodType(self._fn, instance), self._options, self._started)

    def __reduce__(self) -> Any:
        # A task may call background functions too: it gets the function and its options, not
        # the handles of the tasks started here.
        return (Background, (self._fn, self._options))

    def __repr__(self) -> str:
        kind = "daemon" if self.is_daemon else "non-daemon"
        return f"<bgtask.Background {getattr(self._fn, '__qualname__', self._fn)!r} {kind}>"


def preload(*modules: str) -> None:
    """Import ``modules`` once in bgtask's zygote, so that tasks start with them imported.

    A task imports what its function needs when it runs; a module that is slow to import (a
    large library, an application package) then costs every task that time again. Preloaded,
    it is imported once, before the zygote forks the tasks. Takes effect at once, for the tasks
    started after the call, under the default start method.

    Preload only modules whose import has no side effects beyond defining things: a module that
    starts threads at import (some numerical libraries do) would make every later fork unsafe;
    bgtask says so on standard error if that happens. An import that fails is reported there
    too, and tasks import the module themselves as usual.
    """
    from .._backends import launch as _launch

    for module in modules:
        if not isinstance(module, str):
            raise TypeError(f"preload() takes module names, not {type(module).__name__}")
    from .._backends.zygote_client import ZygoteLauncher

    launcher = _launch.get(None)
    assert isinstance(launcher, ZygoteLauncher)
    launcher.add_preload(list(modules))


WHERE = "background()"


def _check_options(options: Dict[str, Any]) -> None:
    """Wrong types raise ``TypeError``, wrong values ``ValueError``, as the stdlib does."""
    graceful = options["graceful"]
    if not (isinstance(graceful, bool) or graceful == "event"):
        raise TypeError(f"background(): graceful must be a bool or 'event', not {graceful!r}")
    for flag in ("daemon", "relay_logging"):
        if not isinstance(options[flag], bool):
            raise TypeError(f"background(): {flag} must be a bool, not {type(options[flag]).__name__}")
    for key, zero_ok in (("grace", True), ("timeout", False)):
        value = options[key]
        if value is None and key == "timeout":
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise TypeError(f"background(): {key} must be a number of seconds, not {type(value).__name__}")
        if not (value >= 0 if zero_ok else value > 0) or not math.isfinite(value):
            bound = ">= 0" if zero_ok else "> 0"
            raise ValueError(f"background(): {key} must be a finite number of seconds {bound}, not {value!r}")
        options[key] = float(value)
    limit = options["limit"]
    if limit is not None and not isinstance(limit, Limiter):
        if isinstance(limit, bool) or not isinstance(limit, int):
            raise TypeError(
                f"background(): limit must be an int or a bgtask.Limiter, not {type(limit).__name__}"
            )
        if limit < 1:
            raise ValueError(f"background(): limit must be at least 1, not {limit!r}")
        options["limit"] = Limiter(limit)  # this function's own places
    if options["name"] is not None and not isinstance(options["name"], str):
        raise TypeError(f"background(): name must be a str or None, not {type(options['name']).__name__}")
    if options["start_method"] not in START_METHODS:
        raise ValueError(
            f"background(): start_method must be None (bgtask's zygote), 'fork', 'spawn' or "
            f"'forkserver', not {options['start_method']!r}"
        )
    _check_backend(options)
    if options["start_method"] is not None:
        import multiprocessing

        if options["start_method"] not in multiprocessing.get_all_start_methods():
            raise ValueError(f"background(): start_method {options['start_method']!r} is not available here")


# What ``ray_options=`` may hold (see _ray.RAY_OPTIONS, which maps them to Ray's options).
RAY_OPTION_NAMES = (
    "num_cpus",
    "num_gpus",
    "memory",
    "resources",
    "runtime_env",
    "scheduling_strategy",
    "fresh_worker",
)


def _check_backend(options: Dict[str, Any]) -> None:
    backend = options["backend"]
    if backend not in (None, "local", "ray"):
        raise ValueError(f"background(): backend must be None, 'local' or 'ray', not {backend!r}")
    if backend == "ray" and options["start_method"] is not None:
        raise ValueError("background(): a start_method is for the local backend; Ray starts its own workers")
    ray_options = options["ray_options"]
    if ray_options is None:
        return
    if not isinstance(ray_options, dict):
        raise TypeError(f"background(): ray_options must be a dict, not {type(ray_options).__name__}")
    unknown = sorted(set(ray_options) - set(RAY_OPTION_NAMES))
    if unknown:
        raise TypeError(
            f"background(): ray_options does not take {', '.join(map(repr, unknown))}; it takes "
            f"{', '.join(RAY_OPTION_NAMES)}"
        )
    options["ray_options"] = dict(ray_options)


@overload
def background(fn: Callable[P, R], /) -> Background[P, R]: ...


@overload
def background(
    *,
    daemon: bool = False,
    graceful: Union[bool, Literal["event"]] = False,
    grace: float = 5.0,
    name: Optional[str] = None,
    start_method: Optional[str] = None,
    timeout: Optional[float] = None,
    relay_logging: bool = True,
    limit: Union[int, Limiter, None] = None,
    backend: Optional[str] = None,
    ray_options: Optional[Dict[str, Any]] = None,
    initializer: Optional[Callable[..., Any]] = None,
    initargs: Iterable[Any] = (),
) -> Callable[[Callable[P, R]], Background[P, R]]: ...


def background(
    fn: Optional[Callable[P, R]] = None,
    /,
    *,
    daemon: bool = False,
    graceful: Union[bool, Literal["event"]] = False,
    grace: float = 5.0,
    name: Optional[str] = None,
    start_method: Optional[str] = None,
    timeout: Optional[float] = None,
    relay_logging: bool = True,
    limit: Union[int, Limiter, None] = None,
    backend: Optional[str] = None,
    ray_options: Optional[Dict[str, Any]] = None,
    initializer: Optional[Callable[..., Any]] = None,
    initargs: Iterable[Any] = (),
) -> Union[Background[P, R], Callable[[Callable[P, R]], Background[P, R]]]:
    """Make a function start a new process each time it is called.

    Usable bare (``@background``, a non-daemon task as in the stdlib) or with options. Calling the
    decorated function pickles the call (with cloudpickle: closures, lambdas and functions from
    ``__main__`` or a REPL work), starts a process and returns its ``Task`` at once.

    Args:
        daemon: a daemon task is stopped when the program ends (after the non-daemon tasks were
            waited for) or dies, even by SIGKILL; a non-daemon task keeps the program waiting
            until it finishes.
        graceful: stopping the task lets it clean up: its ``stop_event()`` is set, or an
            exception is raised inside it so that its ``finally`` and ``with`` blocks run.
            ``"event"``: the task watches its stop event from its first line; a stop only
            sets it and never raises, however early it comes (a service that calls ``ready()``
            before ``stop_event()`` cannot be interrupted between the two).
        grace: seconds a graceful task gets to finish once asked to stop, before its process
            group is killed.
        name: the task's name (default: the function's qualified name).
        start_method: ``None`` (bgtask's zygote: fast, safe with threads, no ``__main__``
            guard needed), or ``"fork"``, ``"spawn"``, ``"forkserver"`` (``multiprocessing``).
        timeout: stop the task after this many seconds; its ``result()`` then raises
            ``TaskStopped``.
        relay_logging: the task's ``logging`` records go to this program's handlers, at this
            program's levels, and its warnings follow this program's filters. ``False`` for a
            task that configures logging itself.
        limit: at most this many of the function's tasks run at once (an int), or of every
            function given the same ``bgtask.Limiter``. A call beyond it returns its task at
            once, pending (``pid`` is ``None``) until a place frees; calls never wait.
        backend: ``"ray"`` runs the tasks on Ray, ``"local"`` on this machine; ``None``
            (default) follows the program (``bgtask.use_ray()``).
        ray_options: for Ray: ``num_cpus`` (default 1, 0 for a daemon task), ``num_gpus``,
            ``memory``, ``resources``, ``runtime_env``, ``scheduling_strategy``, and
            ``fresh_worker`` (``True``: a worker process of its own, which exits after it).
        initializer: called as ``initializer(*initargs)`` in the task before the function
            (after the program's own, ``bgtask.set_initializer``), as
            ``ProcessPoolExecutor`` names it: configure logging, a client, a pool. Whatever it
            raises is the task's outcome, with its traceback.
        initargs: the initializer's arguments.

    Raises:
        BgTaskError: on Windows, which bgtask does not support yet.
    """
    options: Dict[str, Any] = {
        "daemon": daemon,
        "graceful": graceful,
        "grace": grace,
        "name": name,
        "start_method": start_method,
        "timeout": timeout,
        "relay_logging": relay_logging,
        "limit": limit,
        "backend": backend,
        "ray_options": ray_options,
        "initializers": [] if initializer is None else [checked_initializer(initializer, initargs, WHERE)],
    }
    _check_options(options)
    check_supported()

    def decorate(func: Callable[P, R]) -> Background[P, R]:
        if not callable(func):
            raise TypeError(f"@background needs a callable, not {type(func).__name__}")
        return Background(func, options)

    if fn is not None:
        return decorate(fn)
    return decorate


background.__module__ = "bgtask"
preload.__module__ = "bgtask"


forks.register(after_in_child=forget_in_child, order=forks.MAIN)
