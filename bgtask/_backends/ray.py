"""The Ray backend, main program's side: ``use_ray()``, its launcher, and ``RayProcess``.

::

    call ──> RayLauncher.start(settings, payload) ──run.remote(call, settings, board, key)──> Ray
                 │                                      (max_retries=0: never run twice)
                 └─> RayProcess: what a Task follows, in the monitor thread, as a TaskProcess
                       ref.future() done ──> outcome (kind, body, pid, code) ──> task._ended()
                       board.pid(key) done ──> task._pid_known(pid)
                       signal(SIGTERM, grace) ──> board.request(key) (the task stops itself)
                       signal(SIGKILL) or grace over ──> ray.cancel(force=True, recursive=True)

Ray is imported on first use, never by ``import bgtask``. A connection bgtask made (a private
local cluster by default) is ended by bgtask's exit procedure once daemon tasks were stopped
gracefully and non-daemon ones waited for, before Ray's own exit hook and the interpreter's end;
the next Ray task after a ``bgtask.shutdown()`` connects again.
"""

from __future__ import annotations

import os
import pickle
import signal
import threading
import time
import uuid
import warnings
from typing import Any, Dict, List, Optional, Tuple

from .._monitor import loop as _monitor
from .._monitor.process import _NOBODY, Consumer
from .._shared import forks
from .._shared import wire as _wire
from .._shared.errors import BgTaskError
from . import ray_worker as _ray_task

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
        self._run: Any = None
        self._run_fresh: Any = None  # max_calls=1 (Ray takes it only where the function is made)
        self._board: Any = None

    def _connect(self) -> Tuple[Any, Any, Any]:
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
                        _preload_log_filter()
                    finally:
                        for signum, handler in handlers.items():
                            signal.signal(signum, handler)
                self._run = ray.remote(_ray_task.run)
                self._run_fresh = ray.remote(max_calls=1)(_ray_task.run)
                self._board = (
                    ray.remote(_ray_task.StopBoard).options(num_cpus=0, max_concurrency=1_000_000).remote()
                )
                self._owner = (os.getpid(), _ray_task.session())
            return ray, self._run, self._board

    def start(self, settings: Dict[str, Any], payload: Any) -> RayProcess:
        if payload.fds:
            raise BgTaskError(
                "a task on Ray cannot be given sockets, connections or bgtask queues: their "
                "descriptors do not cross machines (use backend='local' for this function)"
            )
        if settings.get("stream"):
            raise BgTaskError(
                "a generator function's items stream to the program only on the local backend "
                "(use backend='local' for this function)"
            )
        ray, run, board = self._connect()
        # A daemon (a logger, a monitor) would hold a CPU slot for the program's whole life;
        # a map's tasks are daemons only in how they end, and take a CPU each.
        lasting = settings["daemon"] and not settings.get("scoped")
        options: Dict[str, Any] = {"num_cpus": 0 if lasting else 1}
        for key, value in (settings.get("ray_options") or {}).items():
            if key == "fresh_worker":
                if value:
                    run = self._run_fresh
            else:
                options[RAY_OPTIONS[key]] = value
        # Never run twice: a task killed from outside must not be run again and report success.
        options.update(max_retries=0, retry_exceptions=False, name=settings["name"])
        body = payload.body
        if isinstance(body, _wire.Pieces):
            body = b"".join(bytes(piece) for piece in body.pieces)
        key = uuid.uuid4().hex
        task_settings = {"graceful": settings["graceful"], "name": settings["name"]}
        try:
            ref = run.options(**options).remote(body, task_settings, board, key)
        except Exception as exc:
            raise BgTaskError(f"Ray did not take the task: {type(exc).__name__}: {exc}") from exc
        return RayProcess(ray, ref, board, key)

    def cluster_cpus(self) -> int:
        """The CPUs of the cluster (connecting first): a map's default limit on Ray."""
        ray, _run, _board = self._connect()
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

    def forget_in_child(self) -> None:
        self._lock = threading.Lock()
        self._forked = self._owner is not None
        self._owner = None


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


def forget_in_child() -> None:
    global _lock
    _lock = threading.Lock()
    if _launcher is not None:
        _launcher.forget_in_child()


class RayProcess:
    """A task submitted to Ray, followed as a ``TaskProcess`` is (see ``_monitor.process``).

    Every field is the monitor thread's once ``watch()`` handed the record over; Ray's own
    callback thread only schedules work there.
    """

    def __init__(self, ray: Any, ref: Any, board: Any, key: str) -> None:
        self.pid: Optional[int] = None  # the worker's, once it runs (a Ray worker may be elsewhere)
        self.keep: Any = ()
        self.done = False
        self._ray = ray
        self._ref = ref
        self._board = board
        self._key = key
        self._consumer: Optional[Consumer] = None
        self._requested = 0
        self._escalation: Optional[_monitor.Timer] = None
        self._asked_ready = False
        self._monitor = _monitor.get()
        self._monitor.hold()

    def watch(self, consumer: Consumer) -> None:
        monitor = self._monitor

        def hand_over() -> None:
            self._consumer = consumer
            if self._ref is None:
                return  # discarded meanwhile
            self._ref.future().add_done_callback(lambda f: monitor.call_soon(lambda: self._finished(f)))
            self._board.pid.remote(self._key).future().add_done_callback(
                lambda f: monitor.call_soon(lambda: self._pid_known(f))
            )
            if getattr(consumer, "_ready_wanted", False):  # waited for while it was pending
                self._want_ready()

        monitor.call_soon(hand_over)

    def signal(self, signum: int, escalate_after: Optional[float] = None) -> None:
        self._monitor.call_soon(lambda: self._signal(signum, escalate_after))

    def discard(self) -> None:
        self.done = True
        self._end()

    def resume(self) -> None:
        pass  # no stream on Ray

    def want_ready(self) -> None:
        """Someone waits for the task's ``bgtask.ready()``: ask the board, once."""
        self._monitor.call_soon(self._want_ready)

    def block(self, timeout: Optional[float]) -> None:
        """Wait for the task's end inside a Ray task: ``ray.wait`` lends this task's CPU out."""
        ref = self._ref
        if ref is not None and _ray_task.in_task:
            self._ray.wait([ref], timeout=timeout)

    def abandon(self) -> None:
        self.watch(_NOBODY)
        self.signal(signal.SIGKILL)

    # -- in the monitor thread ----------------------------------------------------------------

    def _want_ready(self) -> None:
        if self._asked_ready or self.done or self._consumer is None:
            return
        self._asked_ready = True
        monitor = self._monitor
        try:
            future = self._board.ready.remote(self._key).future()
        except Exception:  # noqa: BLE001 (the cluster is gone: the end will tell)
            return
        future.add_done_callback(lambda f: monitor.call_soon(lambda: self._ready_known(f)))

    def _ready_known(self, future: Any) -> None:
        try:
            body = future.result()
        except Exception:  # noqa: BLE001 (the board is gone with the cluster)
            return
        if body is not None and self._consumer is not None and not self.done:
            self._consumer._ready_sent(body)

    def _pid_known(self, future: Any) -> None:
        try:
            pid = int(future.result())
        except Exception:  # noqa: BLE001 (the board is gone with the cluster)
            return
        if pid > 0 and self.pid is None:
            self.pid = pid
            if self._consumer is not None and not self.done:
                self._consumer._pid_known(pid)

    def _signal(self, signum: int, escalate_after: Optional[float]) -> None:
        if self.done:
            return
        try:
            if signum == signal.SIGKILL:
                self._requested = signal.SIGKILL
                self._ray.cancel(self._ref, force=True, recursive=True)
            elif signum:
                self._requested = self._requested or signum
                self._board.request.remote(self._key)
        except Exception:  # noqa: BLE001 (the task already ended, or the cluster is gone)
            pass
        if escalate_after is not None and self._escalation is None:
            self._escalation = self._monitor.call_at(
                time.monotonic() + escalate_after, lambda: self._signal(signal.SIGKILL, None)
            )

    def _finished(self, future: Any) -> None:
        if self.done or self._consumer is None:
            return
        messages: List[Tuple[int, Any]] = []
        exitcode: Optional[int] = None
        try:
            kind, body, pid, exitcode, ready = future.result()
            messages.append((kind, body))
            if self.pid is None:
                self.pid = pid
                self._consumer._pid_known(pid)
            if ready is not None:
                self._consumer._ready_sent(ready)  # before the outcome, as on a task's channel
        except BaseException as exc:  # noqa: BLE001 (whatever Ray raises is this task's end)
            exitcode, message = self._describe(exc)
            if message is not None:
                messages.append((_wire.EXITED, pickle.dumps(message, pickle.HIGHEST_PROTOCOL)))
        consumer = self._consumer
        self.done = True
        self._end()
        if messages and messages[0][0] in _wire.EARLY:
            consumer._outcome_sent(*messages[0])
        consumer._ended(exitcode, messages, False, None)
        self._consumer = None

    def _describe(self, exc: BaseException) -> Tuple[Optional[int], Optional[str]]:
        """(exit code, what to tell) for a task that ended without an outcome of its own."""
        exceptions = self._ray.exceptions
        killed = (exceptions.TaskCancelledError, exceptions.WorkerCrashedError)
        if isinstance(exc, killed) and self._requested == signal.SIGKILL:
            return -signal.SIGKILL, None  # killed by stop(), kill() or a timeout: "stopped"
        if isinstance(exc, exceptions.WorkerCrashedError):
            return None, "the Ray worker running it died (WorkerCrashedError: no exit code on Ray)"
        if isinstance(exc, exceptions.TaskCancelledError):
            return None, "it was cancelled from outside bgtask (ray.cancel)"
        if isinstance(exc, exceptions.RayTaskError):
            cause = getattr(exc, "cause", exc)
            return None, f"bgtask's runner failed on the Ray worker: {type(cause).__name__}: {cause}"
        return None, f"Ray reported {type(exc).__name__}: {exc}"

    def _end(self) -> None:
        self._ref = None  # the result stays in Ray's object store while a reference lives
        if self._escalation is not None:
            self._escalation.cancel()
            self._escalation = None
        try:
            self._board.release.remote(self._key)  # a pid() still waiting (never ran) returns
        except Exception:  # noqa: BLE001 (the cluster is gone)
            pass
        self._monitor.release()


forks.register(after_in_child=forget_in_child, order=forks.LAUNCHERS)
