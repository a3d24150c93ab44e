"""Large buffers reach a task by reference: a memory file mapped copy-on-write, not a copy."""

from __future__ import annotations

import hashlib
import pickle
import threading
from typing import Any, Dict, List, Optional, Tuple

import pytest

from bgtask import background
from bgtask._shared import buffers

MiB = 1024 * 1024


class Blob:
    """Bytes that pickle with protocol 5 as an out-of-band buffer, as a NumPy array does."""

    def __init__(self, data: Any) -> None:
        self.data = data

    def __reduce_ex__(self, protocol: Any) -> Any:
        return Blob, (pickle.PickleBuffer(self.data),)


def _pattern(size: int, seed: int = 0) -> bytearray:
    block = hashlib.sha256(str(seed).encode()).digest()
    return bytearray(block * (size // len(block)))


def _is_mapping(obj: Any) -> bool:
    """Whether ``obj`` is memory mapped from a file (how bgtask receives a buffer by reference)."""
    import ctypes
    import mmap

    if isinstance(obj, memoryview):
        obj = obj.obj
    return isinstance(obj, (mmap.mmap, ctypes.Array))


def _inspect(blob: Blob) -> Tuple[str, str, bool]:
    """In the task: what holds the buffer's memory, its digest, and whether writing works."""
    data = blob.data
    holder = (
        "mapping" if _is_mapping(data.obj if isinstance(data, memoryview) else data) else type(data).__name__
    )
    digest = hashlib.sha256(data).hexdigest()
    view = memoryview(data)
    writable = not view.readonly
    if writable:
        view[0] = (view[0] + 1) % 256  # a private copy of the page: the caller's stays
    view.release()
    return holder, digest, writable


def test_a_large_buffer_arrives_by_reference_whole_and_private(
    start_method: Optional[str], kind: Dict[str, bool]
) -> None:
    """A 4 MiB buffer: mapped from a memory file, equal, writable, and the caller's unchanged."""
    data = _pattern(4 * MiB)
    before = hashlib.sha256(data).hexdigest()
    holder, digest, writable = background(_inspect, start_method=start_method, **kind)(Blob(data)).result(
        timeout=60
    )
    assert holder == "mapping"  # by reference
    assert digest == before
    assert writable
    assert hashlib.sha256(data).hexdigest() == before


def test_a_small_buffer_stays_in_the_pickle(start_method: Optional[str]) -> None:
    """Below the threshold the buffer travels inside the call, as a copy."""
    data = _pattern(64 * 1024)
    holder, digest, _ = background(_inspect, start_method=start_method)(Blob(data)).result(timeout=60)
    assert holder != "mapping"
    assert digest == hashlib.sha256(data).hexdigest()


def test_a_read_only_buffer_arrives_read_only(start_method: Optional[str]) -> None:
    """A buffer the caller could not write (bytes) is read-only in the task too."""
    data = bytes(_pattern(2 * MiB))
    holder, digest, writable = background(_inspect, start_method=start_method)(Blob(data)).result(timeout=60)
    assert (holder, writable) == ("mapping", False)
    assert digest == hashlib.sha256(data).hexdigest()


def _digests(blobs: List[Blob], sock: Any) -> List[str]:
    sock.sendall(b"ok")
    return [hashlib.sha256(b.data).hexdigest() for b in blobs]


def test_more_buffers_than_descriptors_fit_go_partly_in_the_pickle(monkeypatch: pytest.MonkeyPatch) -> None:
    """300 buffers and a socket in one call: the descriptors stay within what one message
    carries; the buffers beyond go in the pickle; every one arrives."""
    import socket

    monkeypatch.setattr(buffers, "BY_REFERENCE", 1024)
    blobs = [Blob(_pattern(2048, seed)) for seed in range(300)]
    mine, theirs = socket.socketpair()
    with mine, theirs:
        task = background(_digests)(blobs, theirs)
        assert task.result(timeout=60) == [hashlib.sha256(b.data).hexdigest() for b in blobs]
        assert mine.recv(2) == b"ok"


def _array_facts(a: Any) -> Tuple[float, bool, bool, str]:
    facts = (
        float(a.sum()),
        bool(a.flags.writeable),
        _mapped(a),
        str(a.dtype),
    )
    a[:] = 0  # private: the caller's array keeps its values
    return facts


def _mapped(a: Any) -> bool:
    base = a.base
    while base is not None and not _is_mapping(base):
        base = getattr(base, "base", None)
    return base is not None


def test_a_numpy_array_arrives_by_reference(start_method: Optional[str]) -> None:
    """A NumPy array of 8 MiB: built on the mapping, writable, the caller's unchanged."""
    np = pytest.importorskip("numpy")
    a = np.arange(MiB, dtype=np.float64)
    total = float(a.sum())
    assert background(_array_facts, start_method=start_method)(a).result(timeout=60) == (
        total,
        True,
        True,
        "float64",
    )
    assert float(a.sum()) == total


def test_by_reference_leaves_no_descriptor_in_the_caller() -> None:
    """Each memory file is closed in the caller once its call is sent (and on a refused call)."""
    from .helpers import settled_fd_count

    data = _pattern(2 * MiB)
    background(_inspect)(Blob(data)).join(60)  # warm: the zygote and its spares
    before = settled_fd_count()
    for _ in range(5):
        task = background(_inspect)(Blob(data))
        assert task.result(timeout=60)[0] == "mapping"
        task.join(60)  # its channel is closed once it exited
    with pytest.raises(Exception, match="cannot send"):
        background(_inspect)(Blob(data), threading.Lock())
    assert settled_fd_count() <= before


def _make_blob(size: int, seed: int) -> Blob:
    return Blob(_pattern(size, seed))


def test_a_large_returned_buffer_comes_back_by_reference(
    start_method: Optional[str], kind: Dict[str, bool]
) -> None:
    """A task returns a 4 MiB buffer: the caller gets it mapped from a memory file, equal and writable."""
    blob = background(_make_blob, start_method=start_method, **kind)(4 * MiB, 3).result(timeout=60)
    assert _is_mapping(blob.data)
    assert hashlib.sha256(blob.data).hexdigest() == hashlib.sha256(_pattern(4 * MiB, 3)).hexdigest()
    blob.data[0] = 0  # writable: the copy is the caller's


def _make_array(n: int) -> Any:
    import numpy as np

    return np.arange(n, dtype=np.float64)


def test_a_returned_numpy_array_comes_back_by_reference(start_method: Optional[str]) -> None:
    """A NumPy array of 8 MiB returned by a task is built on the mapping, writable."""
    np = pytest.importorskip("numpy")
    a = background(_make_array, start_method=start_method)(MiB).result(timeout=60)
    assert _mapped(a)
    assert a.flags.writeable
    assert float(a.sum()) == float(np.arange(MiB, dtype=np.float64).sum())
    a[:] = 1.0


def test_an_unread_result_with_buffers_leaves_no_descriptor() -> None:
    """Results by reference that nobody reads: the caller holds no descriptor for them."""
    from .helpers import settled_fd_count

    background(_make_blob)(2 * MiB, 0).join(60)  # warm: the zygote and its spares
    before = settled_fd_count()
    tasks = [background(_make_blob)(2 * MiB, seed) for seed in range(5)]
    for task in tasks:
        task.join(60)
    assert settled_fd_count() <= before
    assert all(_is_mapping(t.result(0).data) for t in tasks)


def test_many_pending_calls_with_large_buffers_do_not_use_up_descriptors(tmp_path: Any) -> None:
    """600 calls of 2 MiB each behind limit=2, under a limit of 256 descriptors: every one runs
    (only the first calls in line hold a memory file; the others keep their buffer in the pickle)."""
    from .helpers import run_script

    result = run_script(
        tmp_path,
        """
import hashlib, os, pickle, resource, time
import bgtask

resource.setrlimit(resource.RLIMIT_NOFILE, (256, 256))

class Blob:
    def __init__(self, data):
        self.data = data
    def __reduce_ex__(self, protocol):
        return Blob, (pickle.PickleBuffer(self.data),)

@bgtask.background(limit=2)
def digest(blob, gate):
    while not os.path.exists(gate):  # held until every call is made: 598 of them wait
        time.sleep(0.01)
    return hashlib.sha256(blob.data).hexdigest()

if __name__ == "__main__":
    data = bytearray(b"0123456789abcdef" * (128 * 1024))
    gate = os.path.abspath("gate")
    tasks = [digest(Blob(data), gate) for _ in range(600)]
    open(gate, "w").close()
    want = hashlib.sha256(data).hexdigest()
    print("OK", sum(t.result(timeout=300) == want for t in tasks))
""",
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "OK 600" in result.stdout, result.stdout + result.stderr[-3000:]
