"""The task's side of readiness: ``ready(value)`` tells the program that started it.

::

    task:  server binds port 0, ready(port)  --READY message on the task's channel-->
    main:  task.wait_ready() returns port    (the monitor hands the message to the Task)

The message goes out on the task's channel, the one its outcome takes later, so it always
arrives before the outcome. It goes through the task's context (``_shared.context``), whole; this
module is imported by ``import bgtask``, so it imports nothing else of bgtask at the top. On a
Ray worker the context takes it to the stop board, and the task's result carries it too
(``_backends.ray_worker``).
"""

from __future__ import annotations

import threading
from typing import Any

_lock = threading.Lock()


def ready(value: Any = None) -> None:
    """Tell the program that started this task that the task is ready, with ``value``.

    Call it once the task can serve: a server after it has bound its socket, with the port it
    got (``ready(port)`` after binding port 0). ``Task.wait_ready()`` in the main program then
    returns ``value``. Any picklable value will do; ``None`` by default. A value that cannot
    be pickled raises here and does not count as the one call.

    In a graceful task, a stop that arrives while the message goes out is raised when it is
    out, from this call: call it inside the ``try`` whose ``finally`` cleans up.

    Raises:
        BgTaskError: called outside a task started by bgtask, or a second time.
        SerializationError: ``value`` cannot be pickled.
    """
    from .._shared import context as _taskctx
    from .._shared.errors import BgTaskError
    from .._shared.wire import READY

    context = _taskctx.current
    if context is None or not context.can_send(READY):
        raise BgTaskError(
            "ready() was called outside a bgtask task; it is only available in the process of a "
            "function decorated with @background"
        )
    from .._shared.serialization import dumps_value, type_name

    try:
        data = dumps_value(value)
    except Exception as exc:
        from .._shared.errors import SerializationError

        raise SerializationError(
            f"ready(): the value (a {type_name(value)}) cannot be pickled: {exc}"
        ) from exc
    with _lock:
        if context.ready_sent:
            raise BgTaskError("ready() was already called in this task; it tells readiness once")
        context.ready_sent = True
    context.send(READY, data)


ready.__module__ = "bgtask"
