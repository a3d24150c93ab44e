"""Results and errors coming back from task processes.

python examples/results_and_errors.py
"""

import os
import threading

from bgtask import SerializationError, TaskCrashed, background


@background
def divide(a: float, b: float) -> float:
    return a / b


@background
def crash() -> None:
    os._exit(3)


if __name__ == "__main__":
    print("10 / 4 =", divide(10, 4).result())

    try:
        divide(1, 0).result()
    except ZeroDivisionError as exc:
        print(f"the task's own exception comes back: {exc!r}")
        print(f"with the task's traceback as its cause:{exc.__cause__}")

    try:
        crash().result()
    except TaskCrashed as exc:
        print(f"a crash says how the process ended: {exc}")

    try:
        divide(threading.Lock(), 1)
    except SerializationError as exc:
        print(f"a bad argument fails at the call: {exc}")
