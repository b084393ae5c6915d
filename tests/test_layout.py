"""The package's layers import downwards only: base modules -> data -> models -> training -> reporting -> the
commands (experiments, export, serve, launch, study, tune, cli), and no module imports one that imports it back,
at any depth."""

from __future__ import annotations

import ast
from pathlib import Path

import lightning_cnn

PACKAGE = Path(lightning_cnn.__file__).parent
BASE = ("errors", "files", "checkpoints", "cores")
LAYERS = {"data": 1, "models": 2, "training": 3, "reporting": 4}
TOP = (
    "experiments",
    "export",
    "serve",
    "launch",
    "study",
    "tune",
    "cli",
    "__main__",
)  # the commands sit on every layer


def _module(path: Path) -> str:
    parts = path.relative_to(PACKAGE).with_suffix("").parts
    return ".".join(("lightning_cnn", *parts[:-1])) if parts[-1] == "__init__" else ".".join(("lightning_cnn", *parts))


def _imports() -> dict[str, set[str]]:
    """Every module's imports of the package, at module level or inside functions, as module names."""
    modules = {_module(p): p for p in PACKAGE.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        targets = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("lightning_cnn"):
                submodules = {f"{node.module}.{a.name}" for a in node.names} & modules.keys()
                targets |= submodules or {node.module}
            elif isinstance(node, ast.Import):
                targets |= {a.name for a in node.names if a.name.startswith("lightning_cnn")}
        graph[name] = {t for t in targets if t in modules and t != name}
    return graph


def _rank(module: str) -> int:
    part = module.split(".")[1] if "." in module else ""
    if part in BASE or module == "lightning_cnn":
        return 0
    return LAYERS.get(part, 5 + TOP.index(part) if part in TOP else 0)


def test_no_module_imports_a_layer_above_it() -> None:
    upward = [f"{m} imports {t}" for m, targets in _imports().items() for t in targets if _rank(t) > _rank(m)]
    assert not upward


def test_no_import_cycle_anywhere_in_the_package() -> None:
    graph, cycles = _imports(), []

    def visit(module: str, path: list[str]) -> None:
        for target in graph[module]:
            if target in path:
                cycles.append(" -> ".join([*path[path.index(target) :], target]))
            elif target not in done:
                visit(target, [*path, target])
        done.add(module)

    done: set[str] = set()
    for module in sorted(graph):
        if module not in done:
            visit(module, [module])
    assert not cycles
