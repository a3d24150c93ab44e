"""The logging relay: a task's ``logging`` records reach the main program's handlers.

::

    main program, at each call   snapshot(): its loggers' levels, logging.disable(), whether
                                 warnings are captured, its warnings filters -> the settings
    task, before its function    install(): every logger's own handlers dropped (under "fork"
                                 they are the main program's), the levels applied, every logger
                                 propagating, one handler on the root logger that sends each
                                 record as a LOG message
    main program, monitor        handle(): logging.getLogger(record.name).handle(record), in
                                 the order the task logged, before its outcome is known

A record goes out only if the main program's levels let it through, with its message formatted,
its exception as text, ``processName`` the task's name and ``process`` its pid. It is sent at
once, on the channel the outcome takes later: what a task logged before a crash or ``os._exit``
is handled before ``result()`` or ``join()`` returns. Both sides import this module; it imports
nothing else of bgtask.
"""

from __future__ import annotations

import logging
import os
import pickle
import sys
import warnings
from typing import Any, Callable, Dict, List, Optional, Tuple, Union

# (root level, {logger name: level} for loggers with a level of their own, logging.disable()
# level, whether logging captures warnings, warnings filters)
Snapshot = Tuple[int, Dict[str, int], int, bool, List[Any]]

# A key no level uses, put in the root logger's level cache: setLevel() and logging.disable()
# clear that cache, so while the key is there the levels are those of the last snapshot.
_UNCHANGED = -0xB6
_levels: Optional[Tuple[int, Dict[str, int], int]] = None
_filters: Tuple[Optional[List[Any]], List[Any]] = (None, [])

# The field a relayed record's exception travels in (an exception packet), and the largest
# pickled exception the main program rebuilds for it (in the monitor thread: small ones only).
_EXCEPTION = "_bgtask_exception"
EXCEPTION_UNPICKLE_MAX = 64 * 1024

# Field values a record keeps as they are; any other value travels as its repr().
_PLAIN = (str, int, float, bool, type(None))


# -- the main program -------------------------------------------------------------------------


def snapshot() -> Snapshot:
    """What a task needs to log as this program would: cheap when nothing changed."""
    root_level, levels, disable = _logger_levels()
    captured = getattr(logging, "_warnings_showwarning", None) is not None
    return (root_level, levels, disable, captured, _warnings_filters())


def _logger_levels() -> Tuple[int, Dict[str, int], int]:
    global _levels
    root = logging.root
    cache = getattr(root, "_cache", None)
    if _levels is not None and isinstance(cache, dict) and _UNCHANGED in cache:
        return _levels
    if isinstance(cache, dict):
        cache[_UNCHANGED] = False  # before reading: a change meanwhile is seen next time
    manager = root.manager
    own = {
        name: logger.level
        for name, logger in list(manager.loggerDict.items())
        if isinstance(logger, logging.Logger) and logger.level != logging.NOTSET
    }
    _levels = (root.level, own, manager.disable)
    return _levels


def _warnings_filters() -> List[Any]:
    """The warnings filters, but those about categories a task may not be able to import."""
    global _filters
    current = warnings.filters
    last, kept = _filters
    if last is not None and last == current:
        return kept
    copy = list(current)
    kept = [f for f in copy if getattr(f[2], "__module__", None) == "builtins"]
    _filters = (copy, kept)
    return kept


def handle(body: Union[bytes, bytearray]) -> None:
    """In the monitor: a record a task sent, handed to this program's logger of its name.

    Its exception comes back as ``exc_info`` (its own type where it unpickles, else a
    ``TaskError`` stand-in; the task's traceback chained as its cause), for handlers that look
    at it (Sentry's, structlog's); ``exc_text`` keeps the task's formatted traceback.
    """
    fields = pickle.loads(body)
    packet = fields.pop(_EXCEPTION, None)
    record = logging.makeLogRecord(fields)
    if packet is not None:
        record.exc_info = _exception_info(packet)
    logger = logging.root if record.name == "root" else logging.getLogger(record.name)
    logger.handle(record)


def _exception_info(packet: Any) -> Any:
    from .serialization import unpack_exception

    if packet[0] is not None and len(packet[0]) > EXCEPTION_UNPICKLE_MAX:
        packet = (None, *packet[1:])  # not unpickled in the monitor thread: a stand-in
    try:
        exc = unpack_exception(packet)
    except BaseException:  # noqa: BLE001 (what an exception's unpickling raises: a stand-in)
        exc = unpack_exception((None, *packet[1:]))
    return (type(exc), exc, None)


# -- the task ---------------------------------------------------------------------------------


def prepare() -> None:
    """In the zygote: the relay handler in place ahead, so that a task only points it home."""
    if not any(isinstance(handler, _Relay) for handler in logging.root.handlers):
        logging.root.addHandler(_Relay())
    warnings.showwarning = _show_in_main  # shows locally until a task points it home


def reissue(body: Union[bytes, bytearray]) -> None:
    """In the monitor: a warning a task showed, issued again here with its category, message,
    file and line, so that this program's filters, ``-W``, ``pytest.warns`` and ``recwarn``
    see it as they see a thread's."""
    message, module, qualname, filename, lineno = pickle.loads(body)
    category = _category(module, qualname)
    if category is UserWarning and (module, qualname) != ("builtins", "UserWarning"):
        message = f"{qualname}: {message}"  # a category this program cannot name
    try:
        warnings.warn_explicit(message, category, filename, lineno, module=_module_of(filename))
    except Warning as exc:
        # This program's filters make it an error, the task's did not (a filter about a
        # category the task could not be sent, or one added since the call): there is nothing
        # to raise it in here, so it is said, not lost.
        logging.getLogger("bgtask").error(
            "bgtask: a task's warning is an error under this program's filters, but the task "
            "went on (the filter did not reach it): %s:%s: %s: %s",
            filename,
            lineno,
            type(exc).__name__,
            exc,
        )


def _module_of(filename: str) -> Optional[str]:
    """The name of this program's module in ``filename`` (``__main__`` for its script), which
    filters with a module (``default::DeprecationWarning:__main__``, Python's own) match; if
    none, ``warn_explicit`` names it after the file, as for any file it does not know."""
    main = sys.modules.get("__main__")
    if getattr(main, "__file__", None) == filename:
        return "__main__"
    for name, module in list(sys.modules.items()):
        if getattr(module, "__file__", None) == filename:
            return name
    return None


def _category(module: str, qualname: str) -> Any:
    found: Any = sys.modules.get(module)
    for part in qualname.split("."):
        found = getattr(found, part, None)
    return found if isinstance(found, type) and issubclass(found, Warning) else UserWarning


def install(
    snap: Snapshot, send: Callable[[bytes], None], send_warning: Callable[[bytes], None], task_name: str
) -> None:
    """In the task: log as the main program would, through ``send``; warnings that the
    filters show go to the main program through ``send_warning``.

    Touches only what differs from the snapshot: a task forked by the zygote, whose logging is
    already in place (``prepare()``), writes almost nothing (each write costs a page copy).
    """
    root_level, levels, disable, _captured, filters = snap
    root = logging.root
    relay = next((h for h in root.handlers if isinstance(h, _Relay)), None)
    if relay is None:
        relay = _Relay()
        root.addHandler(relay)
    relay.send = send
    relay.task_name = task_name
    for handler in list(root.handlers):  # a copy: removing shifts the list
        if handler is not relay:
            root.removeHandler(handler)
    for logger in list(root.manager.loggerDict.values()):
        if not isinstance(logger, logging.Logger):
            continue
        if logger.handlers:  # under "fork", the main program's: it handles the records itself
            for handler in list(logger.handlers):
                logger.removeHandler(handler)
        level = levels.get(logger.name, logging.NOTSET)
        if logger.level != level:
            logger.setLevel(level)
        if not logger.propagate:
            # Every record climbs to the relay; the main program's loggers propagate it as
            # they are set there.
            logger.propagate = True
    for name, level in levels.items():
        logger = logging.getLogger(name)
        if logger.level != level:
            logger.setLevel(level)
    if root.level != root_level:
        root.setLevel(root_level)
    if root.manager.disable != disable:
        logging.disable(disable)
    _set_filters(filters)
    # Warnings go to the main program, which issues them again (and captures them as records
    # where it does so itself): the task does not capture them.
    if getattr(logging, "_warnings_showwarning", None) is not None:
        logging.captureWarnings(False)
    global _send
    _send = send_warning
    if warnings.showwarning is not _show_in_main:
        warnings.showwarning = _show_in_main


# Where the task's warnings go: set by install(), with the record relay's channel.
_send: Optional[Callable[[bytes], None]] = None
_show_locally = warnings.showwarning


def _show_in_main(  # noqa: PLR0917 (warnings.showwarning's own signature)
    message: Any, category: Any, filename: str, lineno: int, file: Any = None, line: Any = None
) -> None:
    """The task's ``warnings.showwarning``: the warning goes to the main program."""
    send = _send
    if send is None or file is not None:
        _show_locally(message, category, filename, lineno, file, line)
        return
    body = (str(message), category.__module__, category.__qualname__, filename, lineno)
    send(pickle.dumps(body, pickle.HIGHEST_PROTOCOL))


def borrow(
    snap: Snapshot, send: Callable[[bytes], None], send_warning: Callable[[bytes], None], task_name: str
) -> Callable[[], None]:
    """On a Ray worker, for one task: ``install()`` without taking the process over; returns
    what puts it back as it was.

    The worker runs task after task, and logs for Ray: its own handlers, loggers and
    ``propagate`` flags stay. The relay is added on the root logger (where a record of the task
    would otherwise reach ``logging.lastResort``, which Ray echoes), and the main program's
    levels, ``logging.disable()`` and warnings filters apply while the task runs. Ray's loggers
    (``ray`` and below) keep their levels: they do not propagate to the root logger.
    """
    root_level, levels, disable, _captured, filters = snap
    root = logging.root
    manager = root.manager
    relay = _Relay()
    relay.send = send
    relay.task_name = task_name
    # Every logger at the main program's level (NOTSET where it has none), whatever an earlier
    # task on this worker set; Ray's keep theirs.
    saved_levels = {"": root.level}
    loggers = [logger for logger in list(manager.loggerDict.values()) if isinstance(logger, logging.Logger)]
    loggers.extend(logging.getLogger(name) for name in levels)
    for logger in loggers:
        name = logger.name
        if name == "ray" or name.startswith("ray.") or name in saved_levels:
            continue
        saved_levels[name] = logger.level
        level = levels.get(name, logging.NOTSET)
        if logger.level != level:
            logger.setLevel(level)
    root.setLevel(root_level)
    saved_disable = manager.disable
    logging.disable(disable)
    saved_filters = list(warnings.filters)
    saved_show = warnings.showwarning
    _set_filters(filters)
    global _send
    saved_send, _send = _send, send_warning
    warnings.showwarning = _show_in_main
    root.addHandler(relay)

    def give_back() -> None:
        global _send
        root.removeHandler(relay)
        relay.send = None  # a thread of the task's that logs later sends nothing
        _send = saved_send
        warnings.showwarning = saved_show
        _set_filters(saved_filters)
        logging.disable(saved_disable)
        for name, level in saved_levels.items():
            logger = logging.getLogger(name) if name else root
            if logger.level != level:
                logger.setLevel(level)

    return give_back


def _set_filters(filters: List[Any]) -> None:
    if warnings.filters != filters:
        warnings.filters[:] = filters  # type: ignore[index]  # a list, typed as a Sequence
        mutated = getattr(warnings, "_filters_mutated", None)
        if mutated is not None:
            mutated()  # the C side caches the filters' version


def uninstall() -> None:
    """In a task that logs on its own: no relay (the zygote put one in place ahead)."""
    global _send
    _send = None
    for handler in list(logging.root.handlers):
        if isinstance(handler, _Relay):
            logging.root.removeHandler(handler)


class _Relay(logging.Handler):
    """The task's one handler: each record it gets goes to the main program."""

    def __init__(self) -> None:
        super().__init__()
        self.send: Optional[Callable[[bytes], None]] = None  # set in the task
        self.task_name = ""
        self._formatter = logging.Formatter()

    def emit(self, record: logging.LogRecord) -> None:
        send = self.send
        if send is None:
            return  # the zygote itself: it logs nothing
        try:
            data = self._prepare(record)
        except Exception:  # noqa: BLE001 (as logging's own handlers do: report, go on)
            self.handleError(record)
            return
        send(data)

    def _prepare(self, record: logging.LogRecord) -> bytes:
        fields: Dict[str, Any] = dict(record.__dict__)
        fields["msg"] = record.getMessage()
        fields["args"] = None
        packet = None
        if record.exc_info:
            fields["exc_text"] = record.exc_text or self._formatter.formatException(record.exc_info)
            if record.exc_info[1] is not None:
                from .serialization import pack_exception

                packet = pack_exception(record.exc_info[1])
        fields["exc_info"] = None
        fields.pop(_EXCEPTION, None)
        if record.process == os.getpid():  # not a record this task's own task sent on
            fields["processName"] = self.task_name
        for key, value in fields.items():
            if not isinstance(value, _PLAIN):
                fields[key] = repr(value)
        if packet is not None:
            fields[_EXCEPTION] = packet
        return pickle.dumps(fields, pickle.HIGHEST_PROTOCOL)
