"""bgtask: background processes that stop when they should, clean up, and report back.

``@background`` turns a function into one that starts a new OS process at each call and returns
a ``Task`` handle: a process (pid, exitcode, join, stop, kill), a future (result, exception,
done, callbacks) and an awaitable at once.

Who does what, and where it runs (imports run one way, top to bottom; the task side imports
nothing of the main side, so a task starts without paying for it)::

    main program, caller's thread
      _decorator     @background; a call pickles (_serialization), asks a launcher, returns a Task
      _task          Task: a Future and a process handle; decodes the outcome in the caller
      _task_core     what is under a Task: its state, the waits, the transitions of its end
      _lifecycle     the live tasks, active(); the exit procedure (atexit, shutdown())
      _limits        Limiter: bounded concurrency; pending tasks and the thread that starts them
      _map           Background.map and amap: a window of calls over a lazy input
      _launch        the launcher seam: get(method).start(settings, payload) -> TaskProcess
      _launch_zygote the zygote's client: spares, activation, reports (the default method)
      _launch_mp     multiprocessing's "fork", "spawn", "forkserver"
    main program, monitor thread (owns every task's end)
      _process       TaskProcess: one started process; the only place its end is decided
      _monitor       the I/O thread: channels, zygote reports, sentinels, timers
    task side: the zygote process and the task processes
      _zygote        forks spares, reaps tasks, stops daemon tasks when the main program dies
      _child         the task runtime, from a spare's first line to os._exit
      _stop          StopEvent, stop_event()
      _ready         ready(): the task tells its program it is ready
      _logs          the logging relay: records of tasks go to the main program's handlers
    shared
      _queue/        Queue: items through a datagram socket every process holds (a package:
                     the API, a process's endpoint, the feeder, the transport, the shared page)
      _green         what a gevent-patched program needs (real sockets for channels and queues)
      _wire          every message between processes, defined once; framing
      _outcome       what a task's messages mean; the errors result() raises
      _serialization the only cloudpickle import
      _errors        the exceptions
      _platform      every operating-system branch
"""

from typing import TYPE_CHECKING, Any, List, Optional

from ._decorator import Background, background, preload
from ._errors import BgTaskError, SerializationError, TaskCrashed, TaskError, TaskStopped
from ._lifecycle import shutdown
from ._limits import Limiter
from ._ready import ready
from ._stop import StopEvent
from ._taskctx import stop_event

if TYPE_CHECKING:
    from ._queue import Queue, ShutDown
    from ._task import StreamTask, Task

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
    from ._ray import use_ray

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
    from ._lifecycle import active

    return active()


def __getattr__(name: str) -> Any:
    # Task is a concurrent.futures.Future, whose import (logging, threading) the first call pays
    # rather than `import bgtask`.
    if name in ("Task", "StreamTask"):
        from . import _task

        return getattr(_task, name)
    if name in ("Queue", "ShutDown"):
        from . import _queue

        return getattr(_queue, name)
    raise AttributeError(f"module 'bgtask' has no attribute {name!r}")


def __dir__() -> List[str]:
    return sorted({*globals(), "Queue", "ShutDown", "StreamTask", "Task"})
