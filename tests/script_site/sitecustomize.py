"""Imported at start-up by the scripts the tests run (``script_env()`` puts it on the path).

The scripts run unbuffered (``PYTHONUNBUFFERED=1``) so that their lines arrive at once, but an
unbuffered ``print("READY")`` writes ``READY`` and the newline separately, and a task's line can
land between the two in the shared pipe. Written a whole line at a time, as bgtask writes a
task's output, every line of the main program arrives whole too.

Only a script's own process: bgtask's zygote (``python -c``) and multiprocessing's children keep
the plain unbuffered streams, so the tests still show that bgtask makes a task's lines whole.
"""

import sys

if sys.argv and sys.argv[0].endswith(".py"):
    for _stream in (sys.stdout, sys.stderr):
        if _stream is not None and hasattr(_stream, "reconfigure"):
            _stream.reconfigure(line_buffering=True, write_through=False)
