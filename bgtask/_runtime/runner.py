"""Run one call and classify its end: the one copy both task runtimes use.

::

    body (the pickled call) ──load──> fn(*args, **kwargs) ──> its end, as one message:
        could not load the call        FAILED   ("load", packet)                code 1
        returned                       RESULT   (the pickled value)             code 0
        sys.exit(0) / sys.exit()       RESULT   (None)                          code 0
        sys.exit(n), n != 0            EXITED   (what the task called)          code n
        KeyboardInterrupt escaped      EXITED                                   code 1
        raised                         ERROR    (the exception's packet)        code 0
        result cannot be pickled       FAILED   ("result", what, packet)        code 0
        stopped                        the stop exception goes on to the runtime, which
                                       reports STOPPED with where() and exits by SIGTERM

``_runtime.child`` (a task process) sends the message on the task's channel and exits with the code;
``_backends.ray_worker`` (a Ray worker) returns both. The task side only: the wire format, pickling and
the stop state.
"""

from __future__ import annotations

import sys
from typing import Any, Callable, Generator, List, Optional, Sequence, Tuple, Union, cast

from .._shared import context, forks, is_bgtask_file
from .._shared import wire as _wire
from .._shared.context import TaskState
from .._shared.serialization import dumps_result, dumps_value, loads_call, pack_exception, type_name
from .._shared.stop import _StopRequest

Send = Callable[[int, bytes], None]
Outcome = Tuple[int, Union[bytes, _wire.WithFiles], int]  # the message's kind, its body, the exit code


def run_call(
    body: Any,
    fds: List[int],
    state: TaskState,
    stream: Optional[Send] = None,
    by_reference: bool = True,
    *,
    views: Optional[Tuple[Sequence[Any], List[Any]]] = None,
) -> Outcome:
    """Load the call in ``body``, run it, and return its end as a message and an exit code.

    ``stream`` sends a generator's items as they come (a stream task). ``by_reference``: a
    return value's large buffers go in memory files (the body is then ``WithFiles``); false
    where no descriptor can follow the message (Ray). ``views`` (Ray): the call's large
    buffers, and the list the return value's go to (see ``_shared.buffers``). While ``state.running``
    is false a stop raises nothing: a Ray worker loads the call so (an import a stop tore would
    stay broken for its later tasks). A stop while the function runs raises ``_StopRequest``
    out of here.
    """
    steps = run_steps(body, fds, state, stream is not None, by_reference, views=views)
    send = cast(Send, stream)  # only a stream yields
    try:
        item = next(steps)
        while True:
            try:
                send(_wire.ITEM, item)
            except BaseException as exc:  # into the stream: it closes the generator first
                item = steps.throw(exc)
            else:
                item = next(steps)
    except StopIteration as end:
        outcome: Outcome = end.value
        return outcome
    finally:
        steps.close()  # a stop between two items: the generator's own cleanup runs first


def run_steps(
    body: Any,
    fds: List[int],
    state: TaskState,
    streaming: bool,
    by_reference: bool,
    *,
    views: Optional[Tuple[Sequence[Any], List[Any]]] = None,
) -> Generator[bytes, None, Outcome]:
    """``run_call`` as a generator: a stream's items (pickled) are yielded as they come, and
    the end is its return value. The Ray backend yields the items from a Ray generator task;
    an exception thrown in at an item (a stop) closes the stream's generator first."""
    try:
        fn, args, kwargs = loads_call(body, fds, views[0] if views is not None else ())
    except _StopRequest:
        raise
    except BaseException as exc:
        return _wire.FAILED, data(("load", *pack_exception(exc))), 1
    del body
    state.call = fn  # its __main__ functions go into __main__ if the task forks (_before_fork)
    state.running = True
    if state.stopping and not state.cooperative:  # asked to stop while the call was loaded
        raise _StopRequest()
    try:
        value = fn(*args, **kwargs)
        value = (yield from _stream(value)) if streaming else settle(value)
    except _StopRequest:
        raise
    except SystemExit as exc:
        state.running_done()
        if hasattr(exc, "ray_terminate_msg"):
            raise  # Ray ends this worker (a node drained, the job ended): not the task's exit
        code = system_exit_code(exc)
        if code == 0:
            return _wire.RESULT, dumps_value(None), 0  # sys.exit(0) and sys.exit(): a normal end
        return _wire.EXITED, data(f"the task called sys.exit({exc.code!r})"), code
    except KeyboardInterrupt:
        state.running_done()
        return _wire.EXITED, data("the task let a KeyboardInterrupt escape"), 1
    except GeneratorExit:
        raise  # the stream is closed (a stop between two items): no end to report
    except BaseException as exc:
        state.running_done()
        return _wire.ERROR, data(pack_exception(exc.with_traceback(user_frames(exc.__traceback__)))), 0
    state.running_done()
    del fn, args, kwargs
    try:
        return _wire.RESULT, dumps_result(value, by_reference, views[1] if views is not None else None), 0
    except BaseException as exc:
        packet = pack_exception(exc)
        what = f"the return value (a {type_name(value)})"
        if type(value).__name__ in ("generator", "async_generator"):
            what += " (decorate the generator function itself to stream its values)"
        return _wire.FAILED, data(("result", what, *packet[1:])), 0


class WithInitializers:
    """A task's function with the initializers that run before it, in the task (see
    ``bgtask.set_initializer`` and ``@background(initializer=...)``)."""

    __slots__ = ("fn", "initializers")

    def __init__(self, fn: Any, initializers: List[Tuple[Any, Tuple[Any, ...]]]) -> None:
        self.fn = fn
        self.initializers = initializers

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        for initializer, initargs in self.initializers:
            initializer(*initargs)
        return self.fn(*args, **kwargs)

    def __reduce__(self) -> Any:
        return WithInitializers, (self.fn, self.initializers)


def _before_fork() -> None:
    """The task forks (a pool's workers, say): first, the call's ``__main__`` functions go
    into ``__main__`` (done then, not at every task's start: each name written, and each object
    touched, costs a task a copied page of its zygote's memory)."""
    current = context.current
    if current is not None and current.state.call is not None:
        call, current.state.call = current.state.call, None
        _into_main(call)


def _into_main(fn: Any) -> None:
    """Put the functions and classes of the main script that the call brought (by value) into
    this process's ``__main__``, under their names.

    A pool the task starts (``multiprocessing``, ``concurrent.futures``) pickles a ``__main__``
    function by name, as in the script itself: the name must lead to this very object. A name
    of ``__main__`` that holds another object of the same kind and name (the script's own,
    under "fork") is replaced by the one the call brought; any other is left alone.
    """
    main = sys.modules.get("__main__")
    if main is None:
        return
    namespace = vars(main)
    functions = [fn.fn, *(init for init, _ in fn.initializers)] if isinstance(fn, WithInitializers) else [fn]
    for function in functions:
        if getattr(function, "__module__", None) != "__main__":
            continue
        found = {getattr(function, "__name__", ""): function}
        found.update(getattr(function, "__globals__", {}))  # the names its code uses
        for name, value in found.items():
            if getattr(value, "__module__", None) != "__main__" or not isinstance(value, (type, _FUNCTION)):
                continue
            if getattr(value, "__qualname__", None) != name:
                continue  # nested, or bound to another name: pickled by reference under its own
            present = namespace.get(name)
            if present is None or (type(present) is type(value) and present is not value):
                namespace[name] = value


_FUNCTION = type(_into_main)
forks.register(before=_before_fork, order=forks.TASKS)


def settle(value: Any) -> Any:
    """A function's return value; a coroutine (an ``async def``'s) runs under ``asyncio.run``."""
    if _is_awaitable(value):
        import asyncio

        async def _await() -> Any:
            return await value

        return asyncio.run(_await())
    return value


def _stream(values: Any) -> Generator[bytes, None, Any]:
    """Yield what a generator yields, each pickled as it comes; return what it returns.

    Whatever ends it early (a stop, an item that cannot be pickled) closes the generator first,
    so that its ``finally`` and ``with`` blocks run. An async generator runs on an event loop of
    its own, one item at a time.
    """
    count = 0

    def item_data(item: Any) -> bytes:
        try:
            return dumps_value(item)
        except Exception as exc:
            raise TypeError(
                f"item {count} the task yielded (a {type_name(item)}) cannot be pickled: {exc}"
            ) from exc

    if hasattr(values, "__anext__"):
        return (yield from _async_stream(values, item_data))
    if not hasattr(values, "__next__"):
        # A wrapper of a generator function that returned something else: a plain result.
        return settle(values)
    try:
        while True:
            try:
                item = next(values)
            except StopIteration as stop:
                return stop.value
            yield item_data(item)
            count += 1
    finally:
        close = getattr(values, "close", None)  # a generator's: nothing if it returned or raised
        if close is not None:
            close()


def _async_stream(values: Any, item_data: Callable[[Any], bytes]) -> Generator[bytes, None, None]:
    """An async generator's items, as ``asyncio.run`` would run it: one task iterates it from
    start to end (its context variables, timeouts and task groups span its ``yield``s), on a
    loop that is the thread's while it runs; each item is handed out while that task waits,
    and what is left is cancelled at the end (a stop: the generator is closed first)."""
    import asyncio

    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    hand = _Hand(loop)

    async def iterate() -> None:
        try:
            async for item in values:
                await hand.out(item)
        finally:
            close = getattr(values, "aclose", None)  # an async generator's; not every iterator's
            if close is not None:
                await close()

    try:
        hand.task = loop.create_task(hand.run(iterate()))  # held: a loop keeps weak references
        while True:
            item = loop.run_until_complete(hand.next)
            if item is _END:
                return None
            yield item_data(item)
            hand.go_on()
    finally:
        try:
            _cancel_tasks(loop)  # the iterating task, waiting for its item to be taken: closed
            loop.run_until_complete(loop.shutdown_asyncgens())
            loop.run_until_complete(loop.shutdown_default_executor())
        finally:
            asyncio.set_event_loop(None)
            loop.close()


_END: Any = object()  # no more items


class _Hand:
    """Between the task that iterates an async generator and the thread that sends its items:
    ``next`` resolves to the next item (``_END`` at the end, the generator's exception if it
    raised), and the task waits until ``go_on()``."""

    def __init__(self, loop: Any) -> None:
        self._loop = loop
        self.task: Any = None  # the iterating task
        self.next = loop.create_future()
        self._taken = loop.create_future()

    async def out(self, item: Any) -> None:
        self._taken = self._loop.create_future()
        self.next.set_result(item)
        await self._taken

    def go_on(self) -> None:
        self.next = self._loop.create_future()
        self._taken.set_result(None)

    async def run(self, iterate: Any) -> None:
        import asyncio

        try:
            await iterate
        except asyncio.CancelledError:
            raise
        except BaseException as exc:  # the generator's: raised where the item is waited for
            if not self.next.done():
                self.next.set_exception(exc)
            return
        if not self.next.done():
            self.next.set_result(_END)


def _cancel_tasks(loop: Any) -> None:
    import asyncio

    tasks = [task for task in asyncio.all_tasks(loop) if not task.done()]
    for task in tasks:
        task.cancel()
    if tasks:
        loop.run_until_complete(asyncio.gather(*tasks, return_exceptions=True))


def _is_awaitable(value: Any) -> bool:
    # What `await` accepts; cheaper than inspect.isawaitable's ABC checks on every task.
    return hasattr(type(value), "__await__")


def stopped(stop: BaseException) -> bytes:
    """The body of a STOPPED message: where the user's code was (bgtask's frames left out)."""
    import traceback

    frames = [f for f in traceback.extract_tb(stop.__traceback__) if not is_bgtask_file(f.filename)]
    return data("".join(traceback.format_list(frames)))


def user_frames(tb: Any) -> Any:
    """Skip the runner's own frames at the top of a traceback: the user's code starts below."""
    while tb is not None and tb.tb_frame.f_code.co_filename == __file__:
        tb = tb.tb_next
    return tb


def system_exit_code(exc: SystemExit) -> int:
    """The exit code the interpreter would use for ``exc`` (printing a non-integer code)."""
    code = exc.code
    if code is None:
        return 0
    if isinstance(code, int):
        return code & 0xFF
    try:
        print(code, file=sys.stderr)
    except Exception:
        pass
    return 1


def data(obj: Any) -> bytes:
    """A message body of bgtask's own (strings, packets): the stdlib pickler."""
    import pickle

    return pickle.dumps(obj, pickle.HIGHEST_PROTOCOL)
