"""What a task's outcome is, from what it sent, and the exception ``Task.result()`` raises.

The monitor classifies (cheaply, in its thread); the thread that asks for the result decodes
(unpickling user data there, once)::

    messages from the task + stop reason + exit code
        -> classify()  -> (outcome, body)      returned | raised | stopped | crashed | failed
        -> decode()    -> (value, exception)   in the thread that calls result()
        -> describe_failure()                  what the log of a failure nobody retrieved says
"""

from __future__ import annotations

import pickle
from typing import Any, List, Optional, Tuple

from .._shared import wire as _wire
from .._shared.errors import (
    BgTaskError,
    RemoteTraceback,
    SerializationError,
    TaskCrashed,
    TaskStopped,
    describe_exit,
    set_cause,
)

STOP_REASONS = {
    "stop": "by stop()",
    "kill": "by kill()",
    "timeout": "by its timeout",
    "exit": "at the end of the program",
    "shutdown": "by bgtask.shutdown()",
    "cancel": "by cancel()",
    "abandoned": "when the loop over its items was left",
}


# The outcomes that are failures: logged when nothing retrieved them.
FAILURES = ("raised", "crashed", "failed")


def classify(
    messages: List[Tuple[int, Any]], stop_reason: Optional[str], partial: bool, corrupt: Optional[str]
) -> Tuple[str, Any]:
    """Turn what the task sent into (outcome, body); see the module docstring.

    ``corrupt``: the task wrote bytes that are not bgtask's messages to its channel (a stale
    descriptor number, say), which ended the reading.
    """
    if messages:
        kind, body = messages[0]
        if kind == _wire.RESULT:
            return "returned", body
        if kind == _wire.ERROR:
            return "raised", pickle.loads(body)
        if kind == _wire.STOPPED:
            return "stopped", pickle.loads(body)
        if kind == _wire.EXITED:
            return "crashed", pickle.loads(body)
        if kind == _wire.FAILED:
            return "failed", pickle.loads(body)
    if stop_reason is not None:
        return "stopped", None
    if corrupt is not None:
        return "crashed", (
            "it wrote something other than bgtask's messages to its channel with the main "
            f"program (a write to a stale descriptor number?): {corrupt}"
        )
    if partial:
        return "crashed", "it died while sending its outcome"
    return "crashed", None


def decode(
    outcome: str,
    body: Any,
    *,
    name: str,
    pid: Optional[int],
    exitcode: Optional[int],
    stop_reason: Optional[str],
) -> Tuple[Any, Optional[BaseException]]:
    """The task's value, or the exception ``result()`` raises, for an outcome and its body.

    Never raises: whatever goes wrong while decoding becomes the exception to raise.
    """
    try:
        return _decode(outcome, body, name=name, pid=pid, exitcode=exitcode, stop_reason=stop_reason)
    except BaseException as exc:  # noqa: BLE001 (user objects' __setstate__ may raise anything)
        error = BgTaskError(f"the outcome of task {name!r} could not be read: {type(exc).__name__}: {exc}")
        set_cause(error, exc)
        return None, error


def _decode(
    outcome: str,
    body: Any,
    *,
    name: str,
    pid: Optional[int],
    exitcode: Optional[int],
    stop_reason: Optional[str],
) -> Tuple[Any, Optional[BaseException]]:
    from .._shared.serialization import loads, unpack_exception

    error: BaseException
    if outcome == "returned":
        try:
            return loads(body), None
        except Exception as exc:  # noqa: BLE001 (unpickling user data may raise anything)
            error = SerializationError(
                f"the return value of task {name!r} could not be unpickled here: {type(exc).__name__}: {exc}"
            )
            set_cause(error, exc)
            return None, error
    if outcome == "raised":
        return None, unpack_exception(body)
    if outcome == "stopped":
        reason = stop_reason or "stop"
        error = TaskStopped(
            f"task {name!r} (pid {pid}) was stopped {STOP_REASONS.get(reason, '')} "
            f"before it finished (exit code {exitcode})"
            if pid is not None
            else f"task {name!r} was stopped {STOP_REASONS.get(reason, '')} before it started",
            reason=reason,
            exitcode=exitcode,
            pid=pid,
        )
        if body:
            set_cause(error, RemoteTraceback("Where the task was when it stopped:\n" + body))
        return None, error
    if outcome == "failed":
        what, *packet = body
        if what == "load":
            cause = unpack_exception((packet[0], packet[1], packet[2], packet[3]))
            error = BgTaskError(
                f"task {name!r} could not unpickle its function or arguments in the task "
                f"process: {packet[1]}: {packet[2]}"
            )
            set_cause(error, cause)
            return None, error
        value_desc, type_name, message, tb_text = packet
        error = SerializationError(
            f"task {name!r} returned {value_desc}, which cannot be pickled: {type_name}: {message}"
        )
        set_cause(error, RemoteTraceback(tb_text))
        return None, error
    detail = f"; {body}" if body else ""
    return None, TaskCrashed(
        f"task {name!r} (pid {pid}) ended without reporting a result: {describe_exit(exitcode)}{detail}",
        exitcode=exitcode,
        pid=pid,
    )


def describe_failure(
    outcome: Optional[str],
    body: Any,
    decoded: Optional[Tuple[Any, Optional[BaseException]]],
    exitcode: Optional[int],
) -> Tuple[str, str]:
    """What a failed outcome was, in a few words, and its details (a traceback, or ``""``)."""
    if outcome == "raised" and isinstance(body, tuple) and len(body) == 4:
        kind = body[1][len("builtins.") :] if body[1].startswith("builtins.") else body[1]
        return f"raised {kind}: {body[2]}", body[3]
    if outcome == "crashed":
        return f"crashed: {describe_exit(exitcode)}", body if isinstance(body, str) else ""
    if decoded is not None and decoded[1] is not None:
        return "could not run", f"{type(decoded[1]).__name__}: {decoded[1]}"
    if isinstance(body, tuple):
        return "could not run", " ".join(str(part) for part in body[1:] if isinstance(part, str))
    return "could not run", ""
