"""Every example runs on its own and ends by itself."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from .helpers import ROOT, script_env

# The Ray example needs the ray extra and a cluster: tests/test_ray.py runs it.
EXAMPLES = sorted(p for p in (ROOT / "examples").glob("*.py") if p.name != "ray_cluster.py")


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_example_runs_and_ends(path: Path) -> None:
    """The example exits 0 within its deadline, with nothing on stderr."""
    result = subprocess.run(  # noqa: PLW1510 (the exit code is asserted)
        [sys.executable, str(path)], capture_output=True, text=True, timeout=120, env=script_env()
    )
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
