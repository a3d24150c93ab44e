"""The seam between a call and how its process is started: one protocol, a launcher per method.

::

    _main.call.start_call ──> for_options(options).start(settings, payload) ──> process ──> Task
                             │ ZygoteLauncher (zygote_client, the default): take a spare the
                             │   zygote handed over, tell the zygote it is now this task, write
                             │   the settings and the payload to it
                             │ MultiprocessingLauncher (mp: "fork", "spawn",
                             │   "forkserver"): a multiprocessing.Process runs the same runtime

A launcher never touches a ``Task``: it returns the ``TaskProcess`` it made, and reports the
process's end to it (in the monitor thread). Nothing above this seam knows which launcher runs.
"""

from __future__ import annotations

import sys
import threading
from typing import TYPE_CHECKING, Any, Dict, Optional, Protocol

from .._shared import forks

if TYPE_CHECKING:
    from .._monitor.process import TaskProcess
    from .._shared.serialization import Payload
    from .._shared.wire import Settings


class Launcher(Protocol):
    """Starts task processes one way."""

    def start(self, settings: Settings, payload: Payload) -> TaskProcess:
        """Start a process running the pickled call; raise ``OSError`` if it cannot start.

        The payload's descriptors go with it; the caller closes its own copies afterwards.
        """
        ...

    def close(self) -> None:
        """At the program's end, after every task was waited for or stopped."""
        ...

    def forget_in_child(self) -> None:
        """In a forked copy of the program: release what belongs to the original."""
        ...


_launchers: Dict[Optional[str], Launcher] = {}
_launchers_lock = threading.Lock()


def get(method: Optional[str]) -> Launcher:
    """The launcher for a start method (``None``: the zygote)."""
    launcher = _launchers.get(method)
    if launcher is None:
        with _launchers_lock:
            launcher = _launchers.get(method)
            if launcher is None:
                if method is None:
                    from .zygote_client import ZygoteLauncher

                    launcher = ZygoteLauncher()
                else:
                    from .mp import MultiprocessingLauncher

                    launcher = MultiprocessingLauncher(method)
                _launchers[method] = launcher
    return launcher


def for_options(options: Dict[str, Any]) -> Launcher:
    """The launcher a function with these options starts its tasks with (Ray's, or a method's).

    A program that never asked for Ray never imports the backend (nor, through it, the task
    runtime): ``use_ray()`` and a Ray task's runner import it first.
    """
    if uses_ray(options):
        from . import ray as _ray

        return _ray.launcher()  # type: ignore[return-value]
    return get(options["start_method"])


def uses_ray(options: Dict[str, Any]) -> bool:
    """Whether a function with these options runs its tasks on Ray; the Ray backend is not
    imported for that unless something asked for Ray."""
    ray_imported = "bgtask._backends.ray" in sys.modules or "bgtask._backends.ray_worker" in sys.modules
    if options.get("backend") == "ray" or ray_imported:
        from . import ray as _ray

        return _ray.wants_ray(options)
    return False


def close_all() -> None:
    """Close every launcher (the zygote exits once it has no daemon task left; a connection to
    Ray that bgtask made ends)."""
    for launcher in list(_launchers.values()):
        launcher.close()
    if "bgtask._backends.ray" in sys.modules:  # never imported for this
        from . import ray as _ray

        _ray.close()


def forget_in_child() -> None:
    global _launchers_lock
    _launchers_lock = threading.Lock()  # another thread may have held it at the fork
    for launcher in _launchers.values():
        launcher.forget_in_child()


def why_not_started(exc: OSError) -> str:
    """What a user reads when a task could not start: the error, and what to look at."""
    import errno

    from .zygote_client import ZygoteGone

    if isinstance(exc, ZygoteGone):
        return f"{exc}: bgtask's zygote process exited at its start (see its standard error)"
    if exc.errno in (errno.EMFILE, errno.ENFILE):
        return f"{exc} (no file descriptor left: see `ulimit -n`)"
    if exc.errno in (errno.EAGAIN, errno.ENOMEM):
        return f"{exc} (no process left: see `ulimit -u`, or the memory and pids limits)"
    return str(exc)


forks.register(after_in_child=forget_in_child, order=forks.LAUNCHERS)
