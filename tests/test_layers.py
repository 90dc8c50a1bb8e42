"""The house in layers: no import cycle among the project's modules, and no arrow running back up.

Imports are read from the source (every `import`, also those inside functions, which is where a cycle
hides), except those under `if TYPE_CHECKING:`, which never run.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("optimize", "programs")


def _module_name(path: Path, root: Path = ROOT) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _runtime_nodes(tree: ast.AST):
    """Every node but those under `if TYPE_CHECKING:`."""
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            continue
        yield node
        yield from _runtime_nodes(node)


def imports_of(path: Path, modules: set[str], root: Path = ROOT) -> set[str]:
    """The project modules `path` imports (a `from package import name` of a submodule counts as that module)."""
    found = set()
    name = _module_name(path, root)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in _runtime_nodes(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
            names = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base for alias in node.names]
        else:
            continue
        for name in names:
            while name and name not in modules:
                name = name.rpartition(".")[0]
            if name:
                found.add(name)
    return found


def import_graph(root: Path = ROOT) -> dict[str, set[str]]:
    files = {_module_name(p, root): p for pkg in PACKAGES for p in (root / pkg).rglob("*.py")}
    modules = set(files)
    return {name: imports_of(path, modules, root) - {name} for name, path in files.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for other in sorted(graph.get(node, ())):
            if other not in index:
                visit(other)
                low[node] = min(low[node], low[other])
            elif other in on_stack:
                low[node] = min(low[node], index[other])
        if low[node] == index[node]:
            component = []
            while True:
                top = stack.pop()
                on_stack.discard(top)
                component.append(top)
                if top == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_cycle_finder_finds_a_cycle_through_a_function_level_import(tmp_path):
    # The engine <-> batching loop of old hid its back edge inside a function: the finder must see it.
    for pkg in PACKAGES:
        (tmp_path / pkg).mkdir()
        (tmp_path / pkg / "__init__.py").write_text("")
    (tmp_path / "optimize" / "engine.py").write_text("def backend():\n    from optimize.batching import B\n")
    (tmp_path / "optimize" / "batching.py").write_text("from optimize.engine import Generation\n")
    (tmp_path / "programs" / "intent.py").write_text(
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from optimize.engine import X\n")
    graph = import_graph(tmp_path)
    assert cycles(graph) == [["optimize.batching", "optimize.engine"]]
    assert graph["programs.intent"] == set()  # type-only imports never run


def test_no_import_cycle_among_the_project_modules():
    assert cycles(import_graph()) == []


def test_packages_do_not_import_each_other_both_ways():
    graph = import_graph()
    programs_to_optimize = sorted(f"{m} -> {d}" for m, deps in graph.items() if m.startswith("programs")
                                  for d in deps if d.startswith("optimize"))
    assert programs_to_optimize == [], "programs/ must not import optimize/ (optimize/ imports programs/)"


# Each layer may import only from itself and the layers listed for it (optimize.errors and
# optimize.registry are the base everything may use).
BASE = {"optimize", "optimize.errors", "optimize.registry"}
INFERENCE = "optimize.llm"


@pytest.mark.parametrize("layer, forbidden", [
    (INFERENCE, lambda d: not (d.startswith(INFERENCE) or d in BASE)),
    ("programs", lambda d: d.startswith("optimize")),
])
def test_lower_layers_never_import_upper_ones(layer, forbidden):
    graph = import_graph()
    bad = sorted(f"{m} -> {d}" for m, deps in graph.items() if m.startswith(layer) for d in deps if forbidden(d))
    assert bad == []


FRONT = {"optimize.cli", "optimize.__main__", "optimize.report", "optimize.ui", "optimize.export", "optimize.serving"}


def test_nothing_below_the_front_knows_the_command_line():
    graph = import_graph()
    bad = sorted(f"{m} -> {d}" for m, deps in graph.items() if m not in FRONT
                 for d in deps if d in ("optimize.cli", "optimize.__main__"))
    assert bad == []


def _imports_mlflow(path: Path) -> bool:
    for node in _runtime_nodes(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import) and any(a.name.split(".")[0] == "mlflow" for a in node.names):
            return True
        if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "mlflow":
            return True
    return False


def test_only_tracking_and_the_pyfunc_model_import_mlflow():
    users = sorted(_module_name(p) for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py") if _imports_mlflow(p))
    assert users == ["optimize.serving", "optimize.tracking"]
