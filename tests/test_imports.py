"""Imports only go down: the package's import graph has no cycle and no upward edge.

The graph is read from the source with ``ast``: every ``import`` and ``from ... import``
anywhere in a module counts, including those inside functions and ``if TYPE_CHECKING:``
blocks, so a cycle cannot hide behind a lazy import. ``from pkg import name`` is an edge to the
submodule ``pkg.name`` when there is one, else to the package ``pkg`` (its ``__init__``);
importing a submodule adds no edge to its parent packages.

The floors, from the bottom (ARCHITECTURE.md, "Floors — imports only go down"); a module may
import its own area and any lower floor, never a higher floor or another area of its own floor:

- ``models``, ``data``: leaves; each imports only itself.
- ``distributed``: communicators and the generic worker executor; knows no optimizer.
- ``optim``: the optimizers. They may import ``distributed``: they receive a communicator
  object, and K-FAC's curvature workers run on ``distributed``'s executor.
- ``trainer``: the loop.
- ``config``: the typed schema of every config group.
- ``build``: config -> objects.
- ``train``: the Hydra entry point.
- ``scaling`` (``secondorder/scaling/``, the parallel-efficiency tool): an application on top.
- the root package ``secondorder``: its public face; nothing inside imports it.

Areas that do not exist yet are simply absent from the graph.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

PACKAGE_DIR = Path(__file__).resolve().parents[1] / "secondorder"

FLOORS = {
    "models": 0,
    "data": 0,
    "distributed": 1,
    "optim": 2,
    "trainer": 3,
    "config": 4,
    "build": 5,
    "train": 6,
    "scaling": 7,
    "": 8,  # the root package
}
# Top-level modules that belong to another top-level module's area.
AREA_OF = {"config_values": "config", "config_trainer": "config"}


def module_names(package_dir: Path) -> dict[str, Path]:
    """Dotted module name -> file, for every ``.py`` file under ``package_dir``."""
    names = {}
    for path in sorted(package_dir.rglob("*.py")):
        parts = path.relative_to(package_dir.parent).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        names[".".join(parts)] = path
    return names


def _imported(node: ast.AST, module: str, is_package: bool) -> Iterator[str]:
    """The dotted names an import statement brings in (``pkg.name`` for ``from pkg import
    name``; the caller keeps the longest prefix that is a module)."""
    if isinstance(node, ast.Import):
        yield from (alias.name for alias in node.names)
    elif isinstance(node, ast.ImportFrom):
        if node.level:
            base = module.split(".") if is_package else module.split(".")[:-1]
            base = base[: len(base) - (node.level - 1)]
            prefix = ".".join([*base, *([node.module] if node.module else [])])
        else:
            prefix = node.module or ""
        for alias in node.names:
            yield f"{prefix}.{alias.name}"


def import_graph(package_dir: Path) -> dict[str, set[str]]:
    """Module -> the package's modules it imports (anywhere in its source)."""
    modules = module_names(package_dir)
    graph: dict[str, set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        tree = ast.parse(path.read_text(), filename=str(path))
        is_package = path.name == "__init__.py"
        for node in ast.walk(tree):
            for dotted in _imported(node, name, is_package):
                parts = dotted.split(".")
                while parts and ".".join(parts) not in modules:
                    parts.pop()
                target = ".".join(parts)
                if target and target != name:
                    graph[name].add(target)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan's algorithm)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for successor in sorted(graph[node]):
            if successor not in index:
                visit(successor)
                low[node] = min(low[node], low[successor])
            elif successor in on_stack:
                low[node] = min(low[node], index[successor])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def area(module: str) -> str:
    """``secondorder.optim.kfac.optimizer`` -> ``optim``; the root package -> ``""``."""
    parts = module.split(".")
    name = parts[1] if len(parts) > 1 else ""
    return AREA_OF.get(name, name)


GRAPH = import_graph(PACKAGE_DIR)


def test_the_graph_sees_lazy_relative_and_type_checking_imports(tmp_path: Path) -> None:
    package = tmp_path / "pkg"
    (package / "sub").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "sub" / "__init__.py").write_text("from pkg.sub.b import B\n")
    (package / "a.py").write_text("def f():\n    from pkg.sub import b\n")
    (package / "sub" / "b.py").write_text(
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from .. import a\nB = 1\n"
    )
    (package / "c.py").write_text("import pkg.sub\nfrom pkg.sub import B\n")
    graph = import_graph(package)
    assert graph["pkg.a"] == {"pkg.sub.b"}
    assert graph["pkg.sub.b"] == {"pkg.a"}
    assert graph["pkg.c"] == {"pkg.sub"}
    assert cycles(graph) == [["pkg.a", "pkg.sub.b"]]


def test_every_module_has_a_floor() -> None:
    unknown = sorted({area(m) for m in GRAPH} - set(FLOORS))
    assert not unknown, f"place these parts of the package on a floor in FLOORS: {unknown}"


def test_no_import_cycles() -> None:
    found = cycles(GRAPH)
    assert not found, "import cycles:\n" + "\n".join(" <-> ".join(c) for c in found)


@pytest.mark.parametrize("layer", sorted(k for k in FLOORS if k))
def test_imports_only_go_down(layer: str) -> None:
    upward = [
        f"{module} -> {target}"
        for module, targets in sorted(GRAPH.items())
        if area(module) == layer
        for target in sorted(targets)
        if area(target) != layer and FLOORS.get(area(target), 99) >= FLOORS[layer]
    ]
    assert not upward, f"{layer} imports its own floor or above:\n" + "\n".join(upward)
