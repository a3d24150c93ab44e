"""Reading ``.is_daemon`` on the decorated function and on its tasks.

python examples/is_daemon.py
"""

from bgtask import background


@background
def regular() -> str:
    return "regular"


@background(daemon=True)
def side_job() -> str:
    return "side job"


if __name__ == "__main__":
    print(f"regular.is_daemon = {regular.is_daemon}")
    print(f"side_job.is_daemon = {side_job.is_daemon}")
    task = side_job()
    print(f"task.is_daemon = {task.is_daemon}, result = {task.result()!r}")
