"""What both sides use: the task-side context and ``atomic()``, the wire format, pickling,
the errors, the stop event, the logging relay's two halves, every OS branch, gevent support."""

import os

# bgtask's own directory: frames of files under it are left out of what users are shown.
PACKAGE_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def is_bgtask_file(filename: str) -> bool:
    """Whether ``filename`` (a code object's) is one of bgtask's own modules."""
    return os.path.abspath(filename).startswith(PACKAGE_DIR + os.sep)
