"""Functions of the script's ``__main__`` work in a process pool a task starts (pickled by name)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from .helpers import run_script

POOL_IN_A_TASK = """
import concurrent.futures, multiprocessing as mp, sys, bgtask

def square(x):
    return x * x

class Box:
    def __init__(self, v):
        self.v = v

def unbox(box):
    return box.v

method = None if sys.argv[1] == "zygote" else sys.argv[1]

@bgtask.background(start_method=method)
def fan_out(n):
    context = mp.get_context("fork")
    with context.Pool(2) as pool:
        squares = pool.map(square, range(n))
    with concurrent.futures.ProcessPoolExecutor(2, mp_context=context) as executor:
        values = list(executor.map(unbox, [Box(i) for i in range(n)]))
    return squares, values

if __name__ == "__main__":
    print(fan_out(4).result(timeout=60))
"""


def test_a_pool_in_a_task_takes_the_scripts_functions(start_method: Optional[str], tmp_path: Path) -> None:
    """multiprocessing.Pool and ProcessPoolExecutor inside a task run __main__ functions and classes."""
    result = run_script(tmp_path, POOL_IN_A_TASK, args=[start_method or "zygote"], timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "([0, 1, 4, 9], [0, 1, 2, 3])", result.stderr
