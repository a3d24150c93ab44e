"""The logging relay: a task's records reach the main program's handlers, once, in order."""

from __future__ import annotations

import logging
import os
import threading
import warnings
from pathlib import Path
from typing import Any, Dict, List, Optional

import pytest

from bgtask import TaskCrashed, TaskError, TaskStopped, background, stop_event

from .helpers import LOGGER, Collect, wait_until


def test_records_reach_the_main_programs_handlers(
    start_method: Optional[str], kind: Dict[str, bool], collected: List[logging.LogRecord]
) -> None:
    """Formatted message, level, logger name, the task's name and pid, exception text."""

    @background(start_method=start_method, name="reporter", **kind)
    def report() -> int:
        log = logging.getLogger(LOGGER)
        log.debug("below the level: not sent")
        log.info("hello %s", "main")
        try:
            raise KeyError("broken")
        except KeyError:
            log.exception("it failed")
        return os.getpid()

    task = report()
    pid = task.result(60)
    assert [(r.levelname, r.getMessage()) for r in collected] == [
        ("INFO", "hello main"),
        ("ERROR", "it failed"),
    ]
    assert all(r.name == LOGGER and r.processName == "reporter" and r.process == pid for r in collected)
    assert "KeyError: 'broken'" in (collected[1].exc_text or "")
    exc_info = collected[1].exc_info
    assert exc_info is not None
    assert exc_info[0] is KeyError
    assert isinstance(exc_info[1], KeyError)
    assert "it failed" not in str(exc_info[1])
    assert "raise KeyError" in str(exc_info[1].__cause__)  # the task's traceback
    formatted = logging.Formatter("%(message)s").format(collected[1])
    assert "Traceback" in formatted
    assert "KeyError" in formatted


def test_levels_are_the_main_programs_at_the_call(
    start_method: Optional[str], collected: List[logging.LogRecord]
) -> None:
    """A logger set to WARNING in the main program is at WARNING in the task too."""
    logging.getLogger(LOGGER).setLevel(logging.WARNING)

    @background(start_method=start_method)
    def check() -> bool:
        log = logging.getLogger(LOGGER)
        log.info("dropped in the task")
        log.warning("sent")
        return log.isEnabledFor(logging.INFO)

    assert check().result(60) is False
    assert [r.getMessage() for r in collected] == ["sent"]


def test_twenty_tasks_log_a_thousand_records_each(
    start_method: Optional[str], collected: List[logging.LogRecord]
) -> None:
    """20 concurrent tasks, 1,000 records each: none lost, none repeated, in order per task."""

    @background(start_method=start_method)
    def chatty(n: int) -> None:
        log = logging.getLogger(LOGGER)
        for i in range(1000):
            log.info("%d %d", n, i)

    tasks = [chatty(n) for n in range(20)]
    for task in tasks:
        task.result(120)
    by_task: dict = {}
    for record in collected:
        n, i = map(int, record.getMessage().split())
        by_task.setdefault(n, []).append(i)
    assert sorted(by_task) == list(range(20))
    assert all(seen == list(range(1000)) for seen in by_task.values())


def test_a_record_logged_just_before_os_exit_arrives(
    start_method: Optional[str], collected: List[logging.LogRecord]
) -> None:
    """The record is handled before result() raises TaskCrashed."""

    @background(start_method=start_method)
    def last_words() -> None:
        logging.getLogger(LOGGER).error("about to exit")
        os._exit(1)

    with pytest.raises(TaskCrashed):
        last_words().result(60)
    assert [r.getMessage() for r in collected] == ["about to exit"]


def test_records_logged_while_stopping_arrive(
    start_method: Optional[str], collected: List[logging.LogRecord], tmp_path: Path
) -> None:
    """A graceful task's cleanup logs; the record is handled before stop() returns."""
    started = tmp_path / "started"

    @background(graceful=True, start_method=start_method)
    def service() -> None:
        log = logging.getLogger(LOGGER)
        try:
            log.info("serving")
            started.touch()
            threading.Event().wait()
        finally:
            log.info("cleaned up")

    task = service()
    assert wait_until(started.exists)
    task.stop(timeout=60)
    assert isinstance(task.exception(0), TaskStopped)
    assert [r.getMessage() for r in collected] == ["serving", "cleaned up"]


def test_a_stop_during_a_burst_of_records_never_tears_the_channel(
    start_method: Optional[str], collected: List[logging.LogRecord]
) -> None:
    """A graceful task stopped while it logs ends stopped, never crashed."""

    @background(graceful=True, start_method=start_method)
    def flood() -> None:
        log = logging.getLogger(LOGGER)
        while True:
            log.info("x" * 2000)

    task = flood()
    assert wait_until(lambda: len(collected) > 100, timeout=60)
    task.stop(timeout=60)
    assert isinstance(task.exception(0), TaskStopped), task.exception(0)


def test_no_record_is_handled_twice_under_fork(tmp_path: Path) -> None:
    """A handler the task inherits by fork is not used there: each record is written once."""
    log_file = tmp_path / "app.log"
    handler = logging.FileHandler(log_file)
    logger = logging.getLogger("bgtask_test.file")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False
    try:

        @background(start_method="fork")
        def writes() -> None:
            for i in range(10):
                logging.getLogger("bgtask_test.file").info("line %d", i)

        writes().result(60)
    finally:
        logger.removeHandler(handler)
        handler.close()
        logger.setLevel(logging.NOTSET)
        logger.propagate = True
    assert log_file.read_text().splitlines() == [f"line {i}" for i in range(10)]


def test_a_task_may_configure_logging_itself(
    start_method: Optional[str], collected: List[logging.LogRecord], tmp_path: Path
) -> None:
    """relay_logging=False: the task's own configuration holds; nothing reaches the main program.

    (Under "fork" the task starts with the logging it inherited, levels and handlers:
    ``force`` replaces the root's handlers; the main program's logger keeps its level there.)
    """
    own = tmp_path / "own.log"

    @background(relay_logging=False, start_method=start_method)
    def configures() -> None:
        logging.basicConfig(filename=str(own), level=logging.DEBUG, format="%(message)s", force=True)
        logging.getLogger("bgtask_test_own").debug("in my own file")
        logging.getLogger(LOGGER).warning("not relayed")

    configures().result(60)
    assert own.read_text().splitlines()[0] == "in my own file"
    assert collected == []


def test_fields_that_cannot_be_pickled_travel_as_text(collected: List[logging.LogRecord]) -> None:
    """An ``extra`` value that cannot be pickled arrives as its repr."""

    @background
    def extra() -> None:
        logging.getLogger(LOGGER).info("with extra", extra={"lock": threading.Lock(), "count": 3})

    extra().result(60)
    assert collected[0].count == 3  # type: ignore[attr-defined]
    assert "lock" in collected[0].lock  # type: ignore[attr-defined]


def test_a_handler_that_raises_loses_nothing_else(
    collected: List[logging.LogRecord], capfd: pytest.CaptureFixture[str]
) -> None:
    """A main-program handler that raises is reported; the task and later records go on."""

    class Broken(logging.Filter):
        def filter(self, record: logging.LogRecord) -> bool:
            if "bad" in record.getMessage():
                raise RuntimeError("broken filter")
            return True

    broken = Broken()
    logging.getLogger(LOGGER).addFilter(broken)
    try:

        @background
        def logs() -> str:
            log = logging.getLogger(LOGGER)
            log.info("bad one")
            log.info("good one")
            return "done"

        assert logs().result(60) == "done"
    finally:
        logging.getLogger(LOGGER).removeFilter(broken)
    assert [r.getMessage() for r in collected] == ["good one"]
    assert "broken filter" in capfd.readouterr().err


def test_warnings_follow_the_main_programs_filters(start_method: Optional[str]) -> None:
    """A filter that turns warnings into errors in the main program does so in the task."""

    @background(start_method=start_method)
    def warns() -> str:
        warnings.warn("deprecated thing", DeprecationWarning, stacklevel=1)
        return "no error"

    with warnings.catch_warnings():
        warnings.simplefilter("error", DeprecationWarning)
        task = warns()
    with pytest.raises(DeprecationWarning, match="deprecated thing"):
        task.result(60)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        assert warns().result(60) == "no error"


def test_captured_warnings_arrive_as_records(collected: List[logging.LogRecord]) -> None:
    """With logging.captureWarnings(True) in the main program, a task's warning is a record."""
    handler = Collect()
    py_warnings = logging.getLogger("py.warnings")
    py_warnings.addHandler(handler)
    py_warnings.propagate = False
    logging.captureWarnings(True)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("always")

            @background
            def warns() -> None:
                warnings.warn("heads up", UserWarning, stacklevel=1)

            warns().result(60)
    finally:
        logging.captureWarnings(False)
        py_warnings.removeHandler(handler)
        py_warnings.propagate = True
    assert len(handler.records) == 1
    assert "UserWarning: heads up" in handler.records[0].getMessage()


def test_nested_tasks_relay_through_their_parent(collected: List[logging.LogRecord]) -> None:
    """A task's own task logs; the record reaches the main program's handlers."""

    @background(name="inner")
    def inner() -> None:
        logging.getLogger(LOGGER).info("from the inner task")

    @background(name="outer")
    def outer() -> None:
        inner().result(60)

    outer().result(60)
    assert [(r.getMessage(), r.processName) for r in collected] == [("from the inner task", "inner")]


def test_a_stopped_event_task_logs_as_usual(collected: List[logging.LogRecord]) -> None:
    """stop_event() tasks: records logged after the event is set arrive too."""

    @background(graceful=True)
    def waits() -> None:
        event = stop_event()
        logging.getLogger(LOGGER).info("waiting")
        event.wait()
        logging.getLogger(LOGGER).info("stopping")

    task = waits()
    assert wait_until(lambda: len(collected) == 1, timeout=60)
    task.stop(timeout=60)
    assert [r.getMessage() for r in collected] == ["waiting", "stopping"]


def test_several_inherited_root_handlers_are_all_left_out_under_fork(tmp_path: Path) -> None:
    """Two handlers on the main program's root, inherited by fork: each line written once."""
    files = [tmp_path / "one.log", tmp_path / "two.log"]
    handlers = [logging.FileHandler(path) for path in files]
    root = logging.getLogger()
    for handler in handlers:
        root.addHandler(handler)
    try:

        @background(start_method="fork")
        def writes() -> None:
            logging.getLogger().warning("once")

        writes().result(60)
    finally:
        for handler in handlers:
            root.removeHandler(handler)
            handler.close()
    assert [path.read_text().splitlines() for path in files] == [["once"], ["once"]]


def test_an_exception_that_cannot_come_back_is_a_stand_in_in_exc_info(
    collected: List[logging.LogRecord],
) -> None:
    """A logged exception that cannot be pickled arrives as a TaskError naming its type."""

    @background
    def report() -> None:
        class Local(Exception):
            def __reduce__(self) -> Any:
                raise TypeError("no")

        try:
            raise Local("kept message")
        except Local:
            logging.getLogger(LOGGER).exception("it failed")

    report().result(60)
    assert wait_until(lambda: len(collected) == 1)
    exc_info = collected[0].exc_info
    assert exc_info is not None
    assert isinstance(exc_info[1], TaskError)
    assert "Local" in str(exc_info[1])
    assert "kept message" in str(exc_info[1])


def _logs_from_forked_processes() -> int:
    import multiprocessing

    log = logging.getLogger(LOGGER)
    pid = os.fork()
    if pid == 0:
        log.warning("from os.fork()")
        os._exit(0)
    os.waitpid(pid, 0)
    with multiprocessing.get_context("fork").Pool(2) as pool:
        pool.map(log.warning, ["from a pool worker"] * 4)
    log.warning("from the task")
    return os.getpid()


def test_records_of_processes_a_task_forks_reach_the_main_program(
    start_method: Optional[str], daemon: bool, collected: List[logging.LogRecord]
) -> None:
    """os.fork() and a multiprocessing pool inside a task: their records arrive, each whole."""
    task_pid = background(_logs_from_forked_processes, daemon=daemon, start_method=start_method)().result(60)
    assert wait_until(lambda: len(collected) == 6)
    messages = sorted(r.getMessage() for r in collected)
    assert messages == ["from a pool worker"] * 4 + ["from os.fork()", "from the task"]
    assert {r.process for r in collected if r.getMessage() != "from the task"}.isdisjoint({task_pid})
