"""The package's import structure, read from the source (every import: at module level, inside functions, and the
type-only ones): no two modules of rlft import each other, directly or around a circle; no two parts (a package
such as ``rlft/rollout/``, or a top-level module such as ``rlft/config.py``) do either, so the parts stack in
floors with every import pointing down; and the lowest floors import nothing above them."""

from __future__ import annotations

import ast
from pathlib import Path

RLFT = Path(__file__).resolve().parents[1] / "rlft"

# Packages (or modules) and what they may import of rlft: each floor only what lies below it.
FLOORS = {
    "rlft.algorithms": {"rlft.algorithms", "rlft.data", "rlft.errors", "rlft.names"},
    "rlft.data": {"rlft.data", "rlft.errors", "rlft.names", "rlft.tiny"},
    "rlft.timing": {"rlft.errors", "rlft.names"},
    "rlft.names": set(),
    "rlft.errors": set(),
}


def module_name(path: Path, package_dir: Path) -> str:
    parts = path.relative_to(package_dir.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(package_dir: Path = RLFT) -> dict[str, set[str]]:
    """Each module of the package and the package's modules it imports (a name imported from a package counts as
    its module when it is one)."""
    modules = {module_name(p, package_dir): p for p in package_dir.rglob("*.py")}
    graph = {}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        found = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(anchor + ([base] if base else []))
                targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base
                           for alias in node.names]
            else:
                continue
            for target in targets:
                while target not in modules and "." in target:
                    target = target.rpartition(".")[0]
                if target in modules and target != name:
                    found.add(target)
        graph[name] = found
    return graph


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for other in graph[node]:
            if other not in index:
                visit(other)
                low[node] = min(low[node], low[other])
            elif other in on_stack:
                low[node] = min(low[node], index[other])
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


def test_no_module_imports_itself_around_a_circle():
    assert circles(imports()) == []


def parts(graph: dict[str, set[str]]) -> dict[str, set[str]]:
    """The same imports between parts: ``rlft.rollout.group`` belongs to ``rlft.rollout``, ``rlft.config`` is its own."""

    def part(module: str) -> str:
        return ".".join(module.split(".")[:2])

    joined: dict[str, set[str]] = {}
    for name, targets in graph.items():
        joined.setdefault(part(name), set()).update(part(t) for t in targets if part(t) != part(name))
    return joined


def test_no_part_imports_another_that_imports_it_back():
    """Parts import each other in one direction only: an arrow back up between floors would show as a circle."""
    assert circles(parts(imports())) == []


def test_lower_floors_import_nothing_above_them():
    graph = imports()
    upward = []
    for name, targets in sorted(graph.items()):
        room = next((r for r in FLOORS if name == r or name.startswith(r + ".")), None)
        if room is None:
            continue
        for target in sorted(targets):
            if target == "rlft":  # the package's face, which imports none of rlft (checked below)
                continue
            if not any(target == ok or target.startswith(ok + ".") for ok in FLOORS[room] | {room}):
                upward.append(f"{name} -> {target}")
    assert upward == []
    assert graph["rlft"] == set()


def test_the_reader_finds_circles_hidden_in_functions_and_type_only_imports(tmp_path):
    package = tmp_path / "pkg"
    (package / "sub").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "sub" / "__init__.py").write_text("from pkg.sub.b import B\n")
    (package / "a.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from pkg.sub import b\n")
    (package / "sub" / "b.py").write_text("class B:\n    def f(self):\n        from .c import C\n")
    (package / "sub" / "c.py").write_text("from .. import a\nimport os\n")
    graph = imports(package)
    assert graph["pkg.a"] == {"pkg.sub.b"} and graph["pkg.sub.b"] == {"pkg.sub.c"} and graph["pkg.sub.c"] == {"pkg.a"}
    assert circles(graph) == [["pkg.a", "pkg.sub.b", "pkg.sub.c"]]
    assert circles(parts(graph)) == [["pkg.a", "pkg.sub"]]
