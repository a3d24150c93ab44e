"""The package's import graph: no cycle, no lookups through sys.modules, a cheap import.

Which way imports run (layers in call order, the task side apart from the main side) is
import-linter's contracts in pyproject.toml, checked by ``lint-imports`` in CI.
"""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path
from typing import Dict, List, Set

import bgtask

PACKAGE = Path(bgtask.__file__).resolve().parent


def _module_name(path: Path) -> str:
    parts = ["bgtask", *path.relative_to(PACKAGE).with_suffix("").parts]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> Dict[str, Path]:
    return {_module_name(path): path for path in PACKAGE.rglob("*.py")}


def _imports(name: str, path: Path, modules: Dict[str, Path]) -> Set[str]:
    """Modules of the package that ``name`` imports anywhere: at the top, lazily or typed."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: Set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                target = f"{base}.{node.module}" if node.module else base
            else:
                target = node.module or ""
            named = {f"{target}.{alias.name}" for alias in node.names} & set(modules)
            found |= named  # "from package import module" names a module
            if target in modules and not named:
                found.add(target)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name in modules)
    return found - {name, "bgtask"}


def test_the_import_graph_has_no_cycle() -> None:
    """No module imports one that imports it back, directly or through others, lazily or not."""
    modules = _modules()
    graph = {name: _imports(name, path, modules) for name, path in modules.items()}
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


def test_no_module_reads_another_through_sys_modules() -> None:
    """No module of bgtask looks another of bgtask's modules up in sys.modules to use it."""
    offenders = [
        f"{path.relative_to(PACKAGE)}: {line.strip()}"
        for path in PACKAGE.rglob("*.py")
        for line in path.read_text().splitlines()
        if re.search(r"sys\.modules(\.get\(|\[)[\"']bgtask", line)
    ]
    assert offenders == []


def test_import_bgtask_imports_no_launcher_and_no_future() -> None:
    """`import bgtask` stays cheap: no launcher, no monitor, no concurrent.futures."""
    code = (
        "import sys, bgtask\n"
        "heavy = [m for m in ('bgtask._backends.zygote_client', 'bgtask._backends.mp',"
        " 'bgtask._monitor.loop', 'bgtask._main.task', 'concurrent.futures', 'cloudpickle')"
        " if m in sys.modules]\n"
        "print(heavy)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
