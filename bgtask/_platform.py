"""Every operating-system-specific branch of bgtask.

Linux is the primary platform; macOS behaves the same for everything a user can observe, except
that it has no parent-death signal (a daemon task there relies on its zygote, which watches the
main program through a socket). Windows is refused with a clear error for now.
"""

from __future__ import annotations

import sys
from typing import Optional

IS_LINUX = sys.platform.startswith("linux")
IS_WINDOWS = sys.platform == "win32"

_PR_SET_PDEATHSIG = 1
_libc: Optional[object] = None


def check_supported() -> None:
    """Raise ``BgTaskError`` on a platform bgtask does not support yet."""
    if IS_WINDOWS:
        from ._errors import BgTaskError

        raise BgTaskError(
            "bgtask does not support Windows yet: it needs fork(), process groups and POSIX "
            "signals; run under Linux or macOS (WSL works)"
        )


def set_parent_death_signal(signum: int) -> bool:
    """Ask the kernel to send ``signum`` to this process when its parent dies (Linux only).

    ``0`` clears it. Returns whether the platform has the mechanism. The caller must compare
    ``os.getppid()`` with the parent it expects afterwards: the signal is not sent if the parent
    died before the call.
    """
    global _libc
    if not IS_LINUX:
        return False
    if _libc is None:
        import ctypes

        try:
            _libc = ctypes.CDLL(None, use_errno=True)
        except OSError:
            return False
    try:
        return _libc.prctl(_PR_SET_PDEATHSIG, signum, 0, 0, 0) == 0  # type: ignore[attr-defined,no-any-return]
    except AttributeError:  # a libc without prctl
        return False
