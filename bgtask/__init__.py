"""bgtask: background processes that stop when they should, clean up, and report back.

``@background`` turns a function into one that starts a new OS process at each call and returns
a ``Task`` handle: a process (pid, exitcode, join, stop, kill), a future (result, exception,
done, callbacks) and an awaitable at once.

Who does what, and where it runs: a folder per role. Imports run one way, top to bottom
(import-linter's contracts in pyproject.toml); the task side imports nothing of the main side,
so a task starts without paying for it. ARCHITECTURE.md draws a call's path::

    pytest_plugin        fixtures and the leak check (public)
    _main/               the main program, caller's thread
      decorator, call    @background; a call pickles (serialization), asks a launcher, returns a Task
      task, state        Task: a Future and a process handle; under it, its state
      stopping, waits    what a stop asks of a task; how its methods wait
      stream             a stream task's items on their way, and their backpressure
      outcome            what a task's messages mean; the errors result() raises
      lifecycle          the live tasks, active(); the exit procedure (atexit, shutdown())
      limits, map        Limiter and pending tasks; Background.map and amap
    _backends/           how a task process is had: one module per backend
      launch             the seam: for_options(options).start(settings, payload) -> a process
      zygote_client      the zygote's client: spares, activation, reports (the default method)
      zygote             the zygote process: forks spares, reaps tasks, stops daemons at the end
      mp                 multiprocessing's "fork", "spawn", "forkserver"
      ray, ray_worker    the Ray driver (main side) and what runs on a Ray worker (task side)
    _monitor/            the main program's monitor thread, which owns every task's end
      loop               the I/O thread: channels, zygote reports, sentinels, timers
      process            TaskProcess: one started process; the only place its end is decided
      offload            the threads for what must not run in the monitor: callbacks, starts
    _queue/              Queue: items through a datagram socket every process holds (the API, a
                         process's endpoint, the feeder, the transport, the shared page); on
                         Ray, through an actor that holds them (on_ray)
    _runtime/            the task side: what runs in a task process around the function
      child              from a spare's first line to os._exit
      runner             runs a call and classifies its end (both runtimes)
      ready              ready(): the task tells its program it is ready
    _shared/             both sides
      context            the task-side context; atomic(): no stop or Ctrl-C inside a message
      wire               every message between processes, defined once; framing
      serialization      the only cloudpickle import
      buffers            large buffers by reference: memory files, mapped copy-on-write
      errors, stop       the exceptions; StopEvent
      logs               the logging relay: snapshot and handler (main), relay (task)
      forks              the one after-fork reset every part registers with
      platform, green    every operating-system branch; what a gevent-patched program needs
"""

from typing import TYPE_CHECKING, Any, List, Optional

from ._main.call import set_initializer
from ._main.decorator import Background, background, preload
from ._main.lifecycle import shutdown
from ._main.limits import Limiter
from ._runtime.ready import ready
from ._shared.context import stop_event
from ._shared.errors import BgTaskError, SerializationError, TaskCrashed, TaskError, TaskStopped
from ._shared.stop import StopEvent

if TYPE_CHECKING:
    from ._main.task import StreamTask, Task
    from ._queue import Queue, ShutDown

__version__ = "0.1.0"

__all__ = [
    "Background",
    "BgTaskError",
    "Limiter",
    "Queue",
    "SerializationError",
    "ShutDown",
    "StopEvent",
    "StreamTask",
    "Task",
    "TaskCrashed",
    "TaskError",
    "TaskStopped",
    "active",
    "background",
    "preload",
    "ready",
    "set_initializer",
    "shutdown",
    "stop_event",
    "use_ray",
]


def use_ray(address: "Optional[str]" = None, **ray_init_kwargs: Any) -> None:
    """Run this program's tasks on Ray from now on; see ``bgtask._ray.use_ray``.

    ``address=None`` starts a private local cluster with the first task (or joins the one
    ``RAY_ADDRESS`` names); ``"auto"`` or ``"host:port"`` join a running cluster. Other keyword
    arguments go to ``ray.init()``. Functions with ``backend="local"`` or a ``start_method``
    still run locally.

    Raises:
        BgTaskError: Ray is not installed (``pip install 'bgtask[ray]'``).
    """
    from ._backends.ray import use_ray

    use_ray(address, **ray_init_kwargs)


def active() -> "List[Task[Any]]":
    """The tasks this program started that have not ended yet, oldest first.

    That is the running ones; the pending ones, waiting for a place in a ``Limiter`` (their
    ``pid`` is ``None``); and those whose outcome is known but whose process is still exiting
    (running its cleanup). Each is a ``Task`` handle: ``name``, ``pid``, ``is_daemon``, ``age``
    tell what it is. For diagnostics and leak checks: a task is listed until its process is
    gone (or, pending, until it is stopped or started and gone), whether or not its handle is
    kept.
    """
    from ._main.lifecycle import active

    return active()


def __getattr__(name: str) -> Any:
    # Task is a concurrent.futures.Future, whose import (logging, threading) the first call pays
    # rather than `import bgtask`.
    if name in ("Task", "StreamTask"):
        from ._main import task as _task

        return getattr(_task, name)
    if name in ("Queue", "ShutDown"):
        from . import _queue

        return getattr(_queue, name)
    raise AttributeError(f"module 'bgtask' has no attribute {name!r}")


def __dir__() -> List[str]:
    return sorted({*globals(), "Queue", "ShutDown", "StreamTask", "Task"})
