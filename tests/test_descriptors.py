"""What stands for a descriptor reaches the task, and multiprocessing's proxies work in tasks."""

from __future__ import annotations

import multiprocessing
import os
import socket
from typing import Any, Iterator, Optional, Tuple

import pytest

from bgtask import SerializationError, background

RESULT_S = 120.0


@pytest.fixture
def manager() -> Iterator[Any]:
    """A multiprocessing manager, shut down before the test's check for leftover processes."""
    m = multiprocessing.Manager()
    try:
        yield m
    finally:
        m.shutdown()
        m._process.close()  # type: ignore[attr-defined]  # its sentinel pipe now, not when collected


def test_a_socket_argument_reaches_the_task(start_method: Optional[str], daemon: bool) -> None:
    """The task gets the socket itself (its descriptor sent along), not a number."""
    ours, theirs = socket.socketpair()

    @background(start_method=start_method, daemon=daemon)
    def talk(sock: socket.socket) -> str:
        sock.sendall(b"ping from the task")
        return sock.recv(100).decode()

    with ours:
        task = talk(theirs)
        theirs.close()  # the task holds its own copy
        assert ours.recv(100) == b"ping from the task"
        ours.sendall(b"pong")
        assert task.result(RESULT_S) == "pong"


def test_a_pipe_end_reaches_the_task(start_method: Optional[str]) -> None:
    """A multiprocessing.Pipe() end works in the task, also captured by a closure."""
    ours, theirs = multiprocessing.Pipe()

    @background(start_method=start_method)
    def answer() -> None:
        theirs.send(theirs.recv() * 2)

    task = answer()
    theirs.close()
    ours.send(21)
    assert ours.recv() == 42
    task.result(RESULT_S)
    ours.close()


def test_descriptors_go_to_nested_tasks(start_method: Optional[str]) -> None:
    """A task passes a socket it received on to a task of its own."""
    ours, theirs = socket.socketpair()

    @background(start_method=start_method)
    def outer(sock: socket.socket) -> None:
        @background(start_method=start_method)
        def inner(sock: socket.socket) -> None:
            sock.sendall(f"from {os.getpid()}".encode())

        inner(sock).result(RESULT_S)

    with ours:
        outer(theirs).result(RESULT_S)
        theirs.close()
        assert ours.recv(100).startswith(b"from ")


def test_a_closed_socket_fails_at_the_call() -> None:
    """Nothing to send along: SerializationError naming the argument."""
    sock = socket.socket()
    sock.close()

    @background
    def use(sock: socket.socket) -> None:
        return None

    with pytest.raises(SerializationError, match=r"positional argument 0 \(a socket\.socket\)"):
        use(sock)


def test_a_socket_cannot_be_a_result(start_method: Optional[str]) -> None:
    """Descriptors travel with calls only: a socket returned fails, naming it."""

    @background(start_method=start_method)
    def make() -> socket.socket:
        return socket.socket()

    with pytest.raises(SerializationError, match=r"socket\.socket stands for a descriptor"):
        make().result(RESULT_S)


def test_manager_proxies_work_as_arguments(start_method: Optional[str], daemon: bool, manager: Any) -> None:
    """Manager().Queue(), .dict(), .list(), .Value() and .Array() reach the task's manager calls.

    A task does not share this program's authkey: the proxies carry their manager's.
    """
    shared = manager.dict()
    items = manager.list()
    jobs = manager.Queue()
    counter = manager.Value("i", 0)
    numbers = manager.Array("i", [0, 0, 0])

    @background(start_method=start_method, daemon=daemon)
    def work(shared: Any, items: Any, jobs: Any, counter: Any) -> int:
        shared["from"] = "task"
        items.append(os.getpid())
        counter.value += 1
        numbers[1] = 7  # captured by the closure
        return int(jobs.get(timeout=60))

    task = work(shared, items, jobs, counter)
    jobs.put(5)
    assert task.result(RESULT_S) == 5
    assert dict(shared) == {"from": "task"}
    assert list(items) == [task.pid]
    assert counter.value == 1
    assert list(numbers) == [0, 7, 0]


def test_descriptors_go_with_a_large_call(start_method: Optional[str]) -> None:
    """A socket and 5 MB of arguments in one call: the descriptor rides on the call's first byte."""
    ours, theirs = socket.socketpair()
    blob = b"b" * 5_000_000

    @background(start_method=start_method)
    def echo_size(sock: socket.socket, blob: bytes) -> None:
        sock.sendall(str(len(blob)).encode())

    with ours:
        task = echo_size(theirs, blob)
        theirs.close()
        assert ours.recv(100) == b"5000000"
        task.result(RESULT_S)


def test_a_socket_keeps_its_timeout(start_method: Optional[str]) -> None:
    """A socket with a timeout here has the same timeout in the task."""
    ours, theirs = socket.socketpair()
    theirs.settimeout(30.0)

    @background(start_method=start_method)
    def wait_for_data(sock: socket.socket) -> Tuple[Optional[float], bytes]:
        return sock.gettimeout(), sock.recv(10)

    with ours:
        task = wait_for_data(theirs)
        theirs.close()
        ours.sendall(b"late")
        assert task.result(RESULT_S) == (30.0, b"late")
