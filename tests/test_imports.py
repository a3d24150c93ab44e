"""The package's import graph: one way, in call order, with the task side apart."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path
from typing import Dict, List, Set

import bgtask

PACKAGE = Path(bgtask.__file__).resolve().parent

# The task side runs in the zygote and in every task: it must not pull in the main side.
TASK_SIDE = {
    "_child",
    "_zygote",
    "_stop",
    "_taskctx",  # shared: the task side's context, and atomic() for both sides
    "_runner",
    "_ready",
    "_logs",
    "_wire",
    "_platform",
    "_serialization",
    "_errors",
    "_queue",  # shared: a task creates queues, and takes them from its call
    "_ray_task",  # runs on Ray workers
    "_green",  # shared: the queue's sockets are real ones in a gevent program too
}
MAIN_SIDE = {
    "_decorator",
    "_task",
    "_task_core",
    "_lifecycle",
    "_launch",
    "_launch_zygote",
    "_launch_mp",
    "_process",
    "_monitor",
    "_limits",
    "_offload",
    "_map",
    "_ray",
    "pytest_plugin",  # public, but of the main side: a pytest process starts tasks
}


def _imports(module: str) -> Set[str]:
    """Modules of the package that ``module`` imports anywhere: at the top, lazily or typed."""
    tree = ast.parse((PACKAGE / f"{module}.py").read_text())
    found: Set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level == 1:
            if node.module:
                found.add(node.module.split(".")[0])
            else:
                found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("bgtask."):
            found.add(node.module.split(".")[1])
        elif isinstance(node, ast.Import):
            found.update(a.name.split(".")[1] for a in node.names if a.name.startswith("bgtask."))
    return found - {module}


def _graph() -> Dict[str, Set[str]]:
    return {path.stem: _imports(path.stem) for path in PACKAGE.glob("*.py") if path.stem != "__init__"}


def test_the_import_graph_has_no_cycle() -> None:
    """No module imports one that imports it back, directly or through others, lazily or not."""
    graph = _graph()
    cycles: List[List[str]] = []

    def visit(module: str, path: List[str]) -> None:
        for imported in sorted(graph.get(module, ())):
            if imported in path:
                cycles.append([*path[path.index(imported) :], imported])
            else:
                visit(imported, [*path, imported])

    for module in sorted(graph):
        visit(module, [module])
    assert cycles == []


def test_the_task_side_imports_nothing_of_the_main_side() -> None:
    """The zygote and the task runtime reach no module of the main program's side."""
    graph = _graph()
    assert set(graph) == TASK_SIDE | MAIN_SIDE | {"_outcome"}, "classify the new module"
    for module in TASK_SIDE:
        assert graph[module] <= TASK_SIDE, (module, graph[module] - TASK_SIDE)


def test_import_bgtask_imports_no_launcher_and_no_future() -> None:
    """`import bgtask` stays cheap: no launcher, no monitor, no concurrent.futures."""
    code = (
        "import sys, bgtask\n"
        "heavy = [m for m in ('bgtask._launch_zygote', 'bgtask._launch_mp', 'bgtask._monitor',"
        " 'bgtask._task', 'concurrent.futures', 'cloudpickle') if m in sys.modules]\n"
        "print(heavy)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
