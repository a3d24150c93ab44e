"""A daemon task stops when the main program ends: no orphan is left behind.

python examples/daemon_stops_with_main.py
"""

import threading

from bgtask import background


@background(daemon=True)
def monitor() -> None:
    """Runs forever; as a daemon it is killed when the program ends."""
    threading.Event().wait()


if __name__ == "__main__":
    task = monitor()
    print(f"monitor running as pid {task.pid}; the program now ends and takes it along")
