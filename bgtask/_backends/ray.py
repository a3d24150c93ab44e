"""The Ray backend, main program's side: ``use_ray()`` and its launcher.

::

    call ──> RayLauncher.start(settings, payload) ──run.remote(call, settings, board, key)──> Ray
                 │                                      (max_retries=0: never run twice;
                 │                                       a stream: run_stream, a generator task)
                 └─> RayProcess (``ray_process``): what a Task follows, as a TaskProcess

Ray is imported on first use, never by ``import bgtask``. A connection bgtask made (a private
local cluster by default) is ended by bgtask's exit procedure once daemon tasks were stopped
gracefully and non-daemon ones waited for, before Ray's own exit hook and the interpreter's end;
the next Ray task after a ``bgtask.shutdown()`` connects again.
"""

from __future__ import annotations

import os
import signal
import threading
import uuid
import warnings
from typing import Any, Dict, Optional, Tuple

from .._queue import on_ray as _queue_on_ray
from .._shared import forks
from .._shared import wire as _wire
from .._shared.errors import BgTaskError
from . import ray_worker as _ray_task
from .ray_process import RayProcess
from .ray_reaper import Reaper

BACKENDS = (None, "local", "ray")
# What ``ray_options=`` may set, and the Ray option each becomes.
RAY_OPTIONS = {
    "num_cpus": "num_cpus",
    "num_gpus": "num_gpus",
    "memory": "memory",
    "resources": "resources",
    "runtime_env": "runtime_env",
    "scheduling_strategy": "scheduling_strategy",
    "fresh_worker": "",  # True: a worker that exits after the task (a function with max_calls=1)
}

# A stream's items Ray holds for the program before the task waits to yield more.
STREAM_AHEAD = 16

_lock = threading.Lock()
_default: Optional[str] = None  # "ray" once use_ray() was called
_init: Dict[str, Any] = {}  # use_ray()'s address and ray.init() arguments


def use_ray(address: Optional[str] = None, **ray_init_kwargs: Any) -> None:
    """Run this program's tasks on Ray from now on (functions with ``backend="local"`` or a
    ``start_method`` excepted).

    ``address=None`` starts a private local cluster with the first task, unless ``RAY_ADDRESS``
    names one to join; ``"auto"`` joins the cluster running on this machine, ``"host:port"`` a
    given one. Other keyword arguments go to ``ray.init()``. If the program already called
    ``ray.init()``, that connection is used as it is.

    Raises:
        BgTaskError: Ray is not installed (``pip install 'bgtask[ray]'``).
    """
    global _default
    import_ray()  # a missing Ray is an error here, not at the first task
    with _lock:
        _default = "ray"
        _init.clear()
        _init.update(ray_init_kwargs, address=address)


use_ray.__module__ = "bgtask"


def wants_ray(options: Dict[str, Any]) -> bool:
    """Whether a function with these options runs its tasks on Ray."""
    backend = options.get("backend")
    if backend is not None:
        return bool(backend == "ray")
    if options.get("start_method") is not None:
        return False
    return _default == "ray" or _ray_task.in_task


def import_ray() -> Any:
    """``ray``, imported with its failure signal handler off (it would abort on SIGTERM)."""
    import sys

    if "ray" not in sys.modules:
        os.environ.setdefault("RAY_DISABLE_FAILURE_SIGNAL_HANDLER", "1")
    try:
        import ray
    except ImportError as exc:
        raise BgTaskError(
            "the Ray backend needs Ray, which is not installed: pip install 'bgtask[ray]'"
        ) from exc
    return ray


class RayLauncher:
    """Starts tasks on Ray: connects (or starts a private cluster) with the first one."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._owner: Any = None  # (pid, Ray session) the handles below belong to
        self._forked = False  # a forked copy of a connected program: Ray's worker is not its own
        self._connected_here = False  # this launcher called ray.init(): it ends the connection
        # The remote functions, by (stream, fresh worker): a stream is a Ray generator task; a
        # fresh worker's is made with max_calls=1 (Ray takes it only where the function is made).
        self._functions: Dict[Tuple[bool, bool], Any] = {}
        self._board: Any = None
        self._holder: Any = None  # the actor class of a bgtask.Queue on Ray
        self._reaper: Optional[Reaper] = None  # a private cluster's: it ends with the program

    def _connect(self) -> Tuple[Any, Dict[Tuple[bool, bool], Any], Any]:
        ray = import_ray()
        with self._lock:
            if self._forked:
                raise BgTaskError(
                    "this process is a forked copy of a program connected to Ray, whose "
                    "connection does not survive a fork: start Ray tasks from the original, or "
                    "use backend='local' here"
                )
            if not ray.is_initialized() or self._owner != (os.getpid(), _ray_task.session()):
                if not ray.is_initialized():
                    kwargs = dict(_init)
                    address = kwargs.pop("address", None) or os.environ.get("RAY_ADDRESS") or "local"
                    if address == "local":
                        # A private cluster: every port it opens listens on the loopback
                        # address only (Ray binds every interface otherwise, without
                        # authentication): nobody else can use it.
                        kwargs.setdefault("_node_ip_address", "127.0.0.1")
                    kwargs.setdefault("include_dashboard", False)
                    kwargs.setdefault("logging_level", "WARNING")
                    # ray.init() replaces the program's SIGTERM handler (with sys.exit):
                    # bgtask installs none in the main program, so it puts it back.
                    handlers = _signal_handlers()
                    try:
                        with warnings.catch_warnings():
                            # Ray's advice about accelerator variables concerns its users' GPU
                            # settings, not this program's: not repeated on every start.
                            warnings.filterwarnings("ignore", category=FutureWarning, module="ray")
                            ray.init(address=address, **kwargs)
                        self._connected_here = True
                        if address == "local":
                            self._reap(ray)
                        _preload_log_filter()
                    finally:
                        for signum, handler in handlers.items():
                            signal.signal(signum, handler)
                self._functions = {
                    (False, False): ray.remote(_ray_task.run),
                    (False, True): ray.remote(max_calls=1)(_ray_task.run),
                    (True, False): ray.remote(_ray_task.run_stream),
                    (True, True): ray.remote(max_calls=1)(_ray_task.run_stream),
                }
                self._board = (
                    ray.remote(_ray_task.StopBoard).options(num_cpus=0, max_concurrency=1_000_000).remote()
                )
                self._holder = ray.remote(_queue_on_ray.Holder)
                self._owner = (os.getpid(), _ray_task.session())
            return ray, self._functions, self._board

    def queue_holder(self, maxsize: int) -> Any:
        """A new actor to hold a ``bgtask.Queue``'s items (connecting first)."""
        ray, _functions, _board = self._connect()
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        # On this node, where Ray can: with no resources to ask for, Ray would place the actor
        # on any node, and every put and get of this program's would cross the network.
        here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=True)
        try:
            return self._holder.options(
                num_cpus=0, max_concurrency=1_000_000, scheduling_strategy=here
            ).remote(maxsize)
        except Exception as exc:
            raise BgTaskError(f"Ray did not make the queue's actor: {type(exc).__name__}: {exc}") from exc

    def start(self, settings: Dict[str, Any], payload: Any) -> RayProcess:
        if payload.fds:
            raise BgTaskError(
                "a task on Ray cannot be given sockets or connections: their descriptors do not "
                "cross machines (use backend='local' for this function)"
            )
        ray, functions, board = self._connect()
        stream = bool(settings.get("stream"))
        # A daemon (a logger, a monitor) would hold a CPU slot for the program's whole life;
        # a map's tasks are daemons only in how they end, and take a CPU each.
        lasting = settings["daemon"] and not settings.get("scoped")
        options: Dict[str, Any] = {"num_cpus": 0 if lasting else 1}
        fresh = False
        for key, value in (settings.get("ray_options") or {}).items():
            if key == "fresh_worker":
                fresh = bool(value)
            else:
                options[RAY_OPTIONS[key]] = value
        if stream:
            # Items the task yields ahead of the program's reading wait in Ray's object store,
            # this many at most; then the task waits (see RayProcess for the rest).
            options.update(num_returns="streaming", _generator_backpressure_num_objects=STREAM_AHEAD)
        run = functions[stream, fresh]
        # Never run twice: a task killed from outside must not be run again and report success.
        options.update(max_retries=0, retry_exceptions=False, name=settings["name"])
        body = payload.body
        if isinstance(body, _wire.Pieces):
            body = b"".join(bytes(piece) for piece in body.pieces)
        key = uuid.uuid4().hex
        task_settings = {k: settings.get(k) for k in ("graceful", "name", "logging")}
        try:
            ref = run.options(**options).remote(body, task_settings, board, key, list(payload.views))
        except Exception as exc:
            raise BgTaskError(f"Ray did not take the task: {type(exc).__name__}: {exc}") from exc
        return RayProcess(ray, ref, board, key, stream)

    def cluster_cpus(self) -> int:
        """The CPUs of the cluster (connecting first): a map's default limit on Ray."""
        ray, _functions, _board = self._connect()
        try:
            return int(ray.cluster_resources().get("CPU", 0))
        except Exception:  # noqa: BLE001 (the cluster's state is unavailable: no default from it)
            return 0

    def close(self) -> None:
        """At the end of the exit procedure: disconnect from Ray if bgtask connected, so that
        Ray's threads stop before the interpreter does (and a private cluster ends with it)."""
        import sys

        ray = sys.modules.get("ray")
        with self._lock:
            connected, self._connected_here = self._connected_here, False
            self._owner = None
        if connected and ray is not None and ray.is_initialized() and not _ray_task.in_task:
            try:
                ray.shutdown()
            except Exception:  # noqa: BLE001 (the exit procedure goes on)
                pass
        reaper, self._reaper = self._reaper, None
        if reaper is not None:
            reaper.close()

    def _reap(self, ray: Any) -> None:
        """A private cluster: a reaper ends what is left of it once this program is gone."""
        try:
            session_dir = ray._private.worker._global_node.get_session_dir_path()
        except Exception:  # noqa: BLE001 (another Ray release: Ray's own end only)
            return
        reaper = Reaper()
        try:
            reaper.start(str(session_dir))
        except OSError:
            return
        self._reaper = reaper

    def forget_in_child(self) -> None:
        self._lock = threading.Lock()
        self._forked = self._owner is not None
        self._owner = None
        self._connected_here = False  # the original's connection: not this copy's to end
        reaper, self._reaper = self._reaper, None
        if reaper is not None:
            reaper.forget_in_child()


def _preload_log_filter() -> None:
    """Import now what Ray's log thread imports on the first worker line it relays.

    A line arriving as the interpreter ends (a worker killed by the second Ctrl-C, say) made
    that thread import ``concurrent.futures`` during shutdown and die with a traceback.
    """
    try:
        import ray.autoscaler.v2.utils  # noqa: F401
    except Exception:  # noqa: BLE001 (another Ray release: nothing to preload)
        pass


def _signal_handlers() -> Dict[int, Any]:
    """The main thread's handlers Ray may replace; none elsewhere (only it can set them)."""
    if threading.current_thread() is not threading.main_thread():
        return {}
    return {signum: signal.getsignal(signum) for signum in (signal.SIGTERM, signal.SIGINT)}


_launcher: Optional[RayLauncher] = None


def launcher() -> RayLauncher:
    global _launcher
    with _lock:
        if _launcher is None:
            _launcher = RayLauncher()
        return _launcher


def close() -> None:
    """The exit procedure's last step (``bgtask.shutdown()``'s too): a connection bgtask made
    ends, and a private cluster with it; the next Ray task connects again."""
    if _launcher is not None:
        _launcher.close()


def forget_in_child() -> None:
    global _lock
    _lock = threading.Lock()
    if _launcher is not None:
        _launcher.forget_in_child()


forks.register(after_in_child=forget_in_child, order=forks.LAUNCHERS)

# A bgtask.Queue made from now on goes to Ray where the program's tasks do.
_queue_on_ray.backend.preferred = lambda: _default == "ray" or _ray_task.in_task
_queue_on_ray.backend.holder = lambda maxsize: launcher().queue_holder(maxsize)
