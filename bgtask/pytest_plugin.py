"""bgtask's pytest plugin: services for integration tests, and a check for leaked tasks.

Registered through the ``pytest11`` entry point, so pytest loads it wherever bgtask is
installed; it does nothing until a test asks for it.

Services. A fixture starts a task, waits until it called ``bgtask.ready(value)`` and returns
``value``; the task is stopped (gracefully, where it is graceful) when the fixture's scope ends::

    @pytest.fixture(scope="session")
    def base_url(bgtask_session_service):
        port = bgtask_session_service(serve, "127.0.0.1")   # serve() calls bgtask.ready(port)
        return f"http://127.0.0.1:{port}"

``bgtask_service`` does the same for one test; ``service()`` is the context manager both use,
for fixtures of any other scope. A plain function is started as a daemon, graceful task; a
function decorated with ``@background`` keeps its own options.

Leaks. A test fails (an error at its teardown) when a task it started still runs after its
teardown, naming each task and where it was started; the task is then stopped, so that it
cannot disturb the next test. Tasks started by fixtures of a wider scope (a session's server)
belong to those and are not counted. Turned on per test with the ``bgtask_leaks`` marker or the
``bgtask_leak_check`` fixture, or for the whole run with ``--bgtask-leaks`` or the ini setting
``bgtask_leaks = true``.
"""

from __future__ import annotations

import contextlib
import weakref
from typing import Any, Callable, Dict, Generator, Iterator, List, Set

import pytest

from ._main import lifecycle as _lifecycle
from ._main.decorator import Background, background

__all__ = ["service"]

# How long a task whose outcome is known may take to exit after its test before it is a leak.
EXIT_GRACE_S = 5.0
# How long the check waits for a leaked task to be gone once it stopped it.
STOP_WAIT_S = 30.0

# The tasks running when a checked test's setup began, by test id (no pytest.StashKey: the
# plugin loads wherever bgtask is installed, whatever the pytest).
_snapshots: Dict[str, Set[Any]] = {}
_WIDER: weakref.WeakSet[Any] = weakref.WeakSet()  # started by fixtures wider than a test: theirs
_tracking = False  # whether the leak check is on for the test being run


@contextlib.contextmanager
def service(
    fn: Callable[..., Any], /, *args: Any, ready_timeout: float = 60.0, **kwargs: Any
) -> Iterator[Any]:
    """Start ``fn(*args, **kwargs)`` as a task, wait for its ``ready()``, yield the value.

    The task is stopped, and its process gone, when the block is left. A plain function is
    started as a daemon, graceful task; a background function keeps its options. It yields
    the value, not the task: use ``with fn(...) as task:`` where the handle is needed.
    ``ready_timeout`` is this helper's own keyword (a server taking one of that name gets it
    through ``functools.partial``).

    Raises:
        TimeoutError: the task did not call ``ready()`` within ``ready_timeout`` seconds.
        Exception: the task's own error, ``TaskCrashed``..., if it ended before it was ready.
    """
    start = fn if isinstance(fn, Background) else background(daemon=True, graceful=True)(fn)
    with start(*args, **kwargs) as task:
        yield task.wait_ready(ready_timeout)


def _service_starter(wider: bool) -> Generator[Callable[..., Any], None, None]:
    with contextlib.ExitStack() as stack:

        def start(fn: Callable[..., Any], /, *args: Any, ready_timeout: float = 60.0, **kwargs: Any) -> Any:
            with _owned_by_a_wider_scope() if wider else contextlib.nullcontext():
                return stack.enter_context(service(fn, *args, ready_timeout=ready_timeout, **kwargs))

        yield start


@pytest.fixture
def bgtask_service() -> Generator[Callable[..., Any], None, None]:
    """Start a service task for this test: ``value = bgtask_service(fn, *args, **kwargs)``.

    Returns the value the task passed to ``bgtask.ready()``; the task is stopped at the test's
    teardown. Keyword ``ready_timeout`` (seconds, default 60) bounds the wait.
    """
    yield from _service_starter(wider=False)


@pytest.fixture(scope="session")
def bgtask_session_service() -> Generator[Callable[..., Any], None, None]:
    """Start a service task for the whole session, as ``bgtask_service`` does for one test."""
    yield from _service_starter(wider=True)


@pytest.fixture
def bgtask_leak_check() -> None:
    """Fail this test if a task it started still runs after its teardown."""


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("bgtask")
    group.addoption(
        "--bgtask-leaks",
        action="store_true",
        default=False,
        help="fail every test that leaves a bgtask task running",
    )
    parser.addini(
        "bgtask_leaks", "fail every test that leaves a bgtask task running", type="bool", default=False
    )


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "bgtask_leaks: fail the test if it leaves a bgtask task running")


def _checked(item: pytest.Item) -> bool:
    config = item.config
    return bool(
        config.getoption("bgtask_leaks")
        or config.getini("bgtask_leaks")
        or item.get_closest_marker("bgtask_leaks") is not None
        or "bgtask_leak_check" in getattr(item, "fixturenames", ())
    )


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item: pytest.Item) -> None:
    global _tracking
    _tracking = _checked(item)
    if _tracking:
        _lifecycle.track_origins = True
        _snapshots[item.nodeid] = set(_lifecycle.active())


@pytest.hookimpl(hookwrapper=True)
def pytest_fixture_setup(fixturedef: Any, request: Any) -> Generator[None, Any, None]:
    if not _tracking or fixturedef.scope == "function":
        yield
        return
    with _owned_by_a_wider_scope():
        yield


@contextlib.contextmanager
def _owned_by_a_wider_scope() -> Iterator[None]:
    """The tasks started in the block belong to a fixture wider than a test: not leaks."""
    before = set(_lifecycle.active())
    yield
    _WIDER.update(set(_lifecycle.active()) - before)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Generator[None, Any, None]:
    outcome = yield
    if call.when != "teardown" or item.nodeid not in _snapshots:
        return
    before = _snapshots.pop(item.nodeid)
    leaked = _leaked(before)
    if not leaked:
        return
    message = _describe(leaked)
    _stop(leaked)
    report = outcome.get_result()
    if report.passed:
        report.outcome = "failed"
        report.longrepr = message
    else:
        report.sections.append(("bgtask leaks", message))


def _leaked(before: Set[Any]) -> List[Any]:
    """The tasks started since ``before``, not a wider fixture's, that still run."""
    import time

    candidates = [task for task in _lifecycle.active() if task not in before and task not in _WIDER]
    # A task whose outcome is known is on its way out (running its cleanup): it gets a moment.
    deadline = time.monotonic() + EXIT_GRACE_S
    for task in candidates:
        if task.done():
            task._wait_exit(max(0.0, deadline - time.monotonic()))
    return [task for task in candidates if not task._exited]  # running or pending


def _describe(leaked: List[Any]) -> str:
    lines = [f"the test left {len(leaked)} bgtask task(s) running; stopped now:"]
    for task in leaked:
        kind = "daemon" if task.is_daemon else "non-daemon"
        where = task._origin or "an unknown place (started before the check was on)"
        lines.append(f"  {task.name!r} (pid {task.pid}, {kind}), started at {where}")
    lines.append(
        "Stop each task before the test ends: task.stop(), a `with` block, or the bgtask_service fixture."
    )
    return "\n".join(lines)


def _stop(leaked: List[Any]) -> None:
    for task in leaked:
        task._request_stop("stop")
    for task in leaked:
        if not task._wait_exit(STOP_WAIT_S):
            task.kill()
