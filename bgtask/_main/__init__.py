"""The main program's side: the decorator, ``Task`` and its state, the lifecycle, limits, map.

Runs in the program that starts tasks; imports the backends, the monitor and what is shared,
never the task runtime.
"""
