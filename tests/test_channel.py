"""What a task writes on its channel cannot make the main program allocate what it announces."""

from __future__ import annotations

import os
import resource
from typing import Optional

import pytest

from bgtask import TaskCrashed, background
from bgtask._shared import wire


def _announce(size: int) -> None:
    from bgtask._shared import context

    channel = context.current.channel  # type: ignore[union-attr]
    channel.sendall(wire.HEADER.pack(wire.MAGIC, 3, size))  # a RESULT of `size` bytes, never sent
    os._exit(0)


def _peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="ru_maxrss in KiB: Linux")
def test_a_huge_announced_frame_costs_nothing_until_it_comes(start_method: Optional[str]) -> None:
    """11 bytes announcing 2 GiB: the main program's peak memory does not grow by it."""
    before = _peak_rss_mib()
    task = background(_announce, start_method=start_method)(2 * 2**30)
    with pytest.raises(TaskCrashed):
        task.result(timeout=60)
    assert _peak_rss_mib() - before < 256


def test_a_frame_over_the_bound_is_a_corrupt_channel(start_method: Optional[str]) -> None:
    """A header announcing more than MAX_MESSAGE bytes ends the task as having corrupted it."""
    task = background(_announce, start_method=start_method)(wire.MAX_MESSAGE + 1)
    with pytest.raises(TaskCrashed, match="bound"):
        task.result(timeout=60)
