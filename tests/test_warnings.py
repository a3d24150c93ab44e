"""A warning a task shows is issued again in the main program, as a thread's would be."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Optional

import pytest

from bgtask import background

from .helpers import run_script, script_env


class TaskWarning(UserWarning):
    """A category of the tests' own, found again by name in the main program."""


def _warns() -> int:
    warnings.warn("careful", TaskWarning, stacklevel=1)
    warnings.warn("old", DeprecationWarning, stacklevel=1)
    return 1


def test_pytest_warns_sees_a_tasks_warning(start_method: Optional[str], daemon: bool) -> None:
    """pytest.warns catches a task's warnings: category, message, the task's file and line."""
    with pytest.warns(TaskWarning, match="careful") as record, pytest.warns(DeprecationWarning, match="old"):
        assert background(_warns, daemon=daemon, start_method=start_method)().result(timeout=60) == 1
    caught = next(w for w in record if issubclass(w.category, TaskWarning))
    assert caught.filename == __file__
    assert caught.lineno == _warns.__code__.co_firstlineno + 1


def test_recwarn_sees_a_tasks_warning(recwarn: pytest.WarningsRecorder) -> None:
    """The recwarn fixture records a task's warnings too."""
    warnings.simplefilter("always")
    background(_warns)().result(timeout=60)
    assert [str(w.message) for w in recwarn] == ["careful", "old"]


ERROR_FILTER = """
import warnings, bgtask

@bgtask.background
def warns():
    warnings.warn("careful", stacklevel=1)
    return "went on"

if __name__ == "__main__":
    try:
        print(warns().result(timeout=60))
    except UserWarning as exc:
        print("raised in the task:", exc)
"""


def test_w_error_makes_a_tasks_warning_its_error(tmp_path: Path) -> None:
    """Under -W error, the warning is an exception in the task, as the main program's filters say."""
    env = {**script_env(), "PYTHONWARNINGS": "error"}
    result = run_script(tmp_path, ERROR_FILTER, env=env)
    assert result.stdout.strip() == "raised in the task: careful", result.stderr


CUSTOM_ERROR_FILTER = """
import logging, sys, warnings, bgtask
logging.basicConfig(stream=sys.stdout, format="%(levelname)s %(message)s")

class MyWarning(UserWarning):
    pass

warnings.filterwarnings("error", category=MyWarning)   # a category the task is not sent

@bgtask.background
def warns():
    warnings.warn("careful", MyWarning, stacklevel=1)
    return "went on"

if __name__ == "__main__":
    print(warns().result(timeout=60))
"""


def test_a_warning_that_is_an_error_only_here_is_said_not_lost(tmp_path: Path) -> None:
    """A warning this program's filters make an error, but the task's did not, is logged."""
    result = run_script(tmp_path, CUSTOM_ERROR_FILTER)
    assert result.returncode == 0, result.stderr
    assert "ERROR bgtask: a task's warning is an error under this program's filters" in result.stdout
    assert "MyWarning: careful" in result.stdout
    assert result.stdout.strip().endswith("went on")


MAIN_DEPRECATION = """
import threading, warnings, bgtask

def old_api():
    warnings.warn("deprecated here", DeprecationWarning, stacklevel=1)

@bgtask.background
def task():
    old_api()

if __name__ == "__main__":
    thread = threading.Thread(target=old_api)
    thread.start()
    thread.join()
    task().result(timeout=60)
"""


def test_a_deprecation_in_the_main_script_shows_as_a_threads_does(
    tmp_path: Path, start_method: Optional[str]
) -> None:
    """Python's default filters show a DeprecationWarning from ``__main__``: a task's from the
    same code shows too (the filter names the module, which the main program finds again)."""
    source = MAIN_DEPRECATION.replace(
        "@bgtask.background", f"@bgtask.background(start_method={start_method!r})"
    )
    env = {key: value for key, value in script_env().items() if key != "PYTHONWARNINGS"}
    result = run_script(tmp_path, source, env=env)
    assert result.returncode == 0, result.stderr
    assert result.stderr.count("DeprecationWarning: deprecated here") == 2, result.stderr
