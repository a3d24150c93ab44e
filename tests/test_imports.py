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
    # shared: a task creates queues, and takes them from its call
    "_queue",
    "_queue.api",
    "_queue.endpoint",
    "_queue.feeder",
    "_queue.transport",
    "_queue.page",
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


def _modules() -> Dict[str, Path]:
    """The package's modules by dotted name below ``bgtask`` (a subpackage: its ``__init__``)."""
    found = {path.stem: path for path in PACKAGE.glob("*.py") if path.stem != "__init__"}
    for init in PACKAGE.glob("*/__init__.py"):
        package = init.parent.name
        found[package] = init
        found.update({f"{package}.{path.stem}": path for path in init.parent.glob("*.py") if path != init})
    return found


def _imports(module: str, path: Path) -> Set[str]:
    """Modules of the package that ``module`` imports anywhere: at the top, lazily or typed."""
    known = _modules()
    # What a relative import is relative to: the module's package, as a dotted name.
    here = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: Set[str] = set()

    def add(name: str) -> None:
        while name and name not in known:  # an attribute of a module, or a name in a package
            name = name.rpartition(".")[0]
        if name:
            found.add(name)

    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level >= 1:
            base = here.split(".") if here else []
            base = base[: len(base) - (node.level - 1)]
            prefix = ".".join([*base, node.module] if node.module else base)
            for alias in node.names:
                add(f"{prefix}.{alias.name}" if prefix else alias.name)
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("bgtask."):
            for alias in node.names:
                add(f"{node.module[len('bgtask.') :]}.{alias.name}")
        elif isinstance(node, ast.Import):
            for a in node.names:
                if a.name.startswith("bgtask."):
                    add(a.name[len("bgtask.") :])
    return found - {module}


def _graph() -> Dict[str, Set[str]]:
    return {name: _imports(name, path) for name, path in _modules().items()}


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
