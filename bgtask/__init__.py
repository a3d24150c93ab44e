"""bgtask: background processes that stop when they should, clean up, and report back.

``@background`` turns a function into one that starts a new OS process at each call and returns
a ``Task`` handle: a process (pid, exitcode, join, stop, kill), a future (result, exception,
done, callbacks) and an awaitable at once.

The package's modules, imports running one way (task side first)::

    _wire, _stop, _errors, _platform     leaf modules shared by both sides
    _serialization                       the only cloudpickle import
    _child                               the task runtime (task side only)
    _zygote                              the process that forks tasks (task side only)
    _monitor                             the main program's I/O thread
    _launch                              the seam between a task and how it is started
    _launch_zygote, _launch_mp           the two launchers: bgtask's zygote, multiprocessing
    _outcome                             classifying what a task sent; the errors result() raises
    _task                                the Task handle and its state machine
    _lifecycle                           registry of live tasks, exit procedure
    _decorator                           @background

The task side never imports the parent side, so a task starts without paying for it.
"""

from ._decorator import Background, background, preload
from ._errors import BgTaskError, SerializationError, TaskCrashed, TaskError, TaskStopped
from ._stop import StopEvent, stop_event
from ._task import Task

__version__ = "0.1.0"

__all__ = [
    "Background",
    "BgTaskError",
    "SerializationError",
    "StopEvent",
    "Task",
    "TaskCrashed",
    "TaskError",
    "TaskStopped",
    "background",
    "preload",
    "stop_event",
]
