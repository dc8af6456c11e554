"""Layers that only run down: no import cycle between modules, no package importing one above it.

Every ``import`` of every module of the three packages counts, wherever it stands: at the top,
inside a function (a lazy import is still a dependency) or under ``TYPE_CHECKING`` (a reader
follows a type as far as a call). The packages are ordered ``engine_build < plugins < stream``:
a package imports only itself and those below it. ``benchmarks`` and ``tests`` sit outside.
"""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LAYERS = ("engine_build", "plugins", "stream")      # lowest first


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def project_modules() -> dict[str, Path]:
    return {module_name(p): p for package in LAYERS for p in sorted((ROOT / package).rglob("*.py"))}


def imported(name: str, path: Path, known: set[str]) -> set[str]:
    """The project modules ``name`` imports (``from x import y`` counts ``x.y`` when that is a module)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[:len(package.split(".")) - (node.level - 1)]
                base = ".".join([*anchor, *([base] if base else [])])
            targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base for alias in node.names]
        else:
            continue
        for target in targets:
            while target and target not in known:     # "a.b.C" -> "a.b"; outside modules vanish
                target = target.rpartition(".")[0]
            if target and target != name:
                found.add(target)
    return found


def import_graph() -> dict[str, set[str]]:
    modules = project_modules()
    return {name: imported(name, path, set(modules)) for name, path in modules.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Each strongly connected group of two or more modules (Tarjan), sorted, as one cycle to report."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    groups = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for nxt in sorted(graph[node]):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            group = []
            while True:
                member = stack.pop()
                group.append(member)
                if member == node:
                    break
            if len(group) > 1:
                groups.append(sorted(group))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return sorted(groups)


def upward_imports(graph: dict[str, set[str]]) -> list[str]:
    rank = {package: i for i, package in enumerate(LAYERS)}
    return sorted(f"{source} imports {target}" for source, targets in graph.items() for target in targets
                  if rank[target.split(".")[0]] > rank[source.split(".")[0]])


def test_the_parser_counts_type_only_lazy_relative_and_package_imports(tmp_path):
    source = tmp_path / "a.py"
    source.write_text("from typing import TYPE_CHECKING\nimport os\nif TYPE_CHECKING:\n    from .b import Thing\n"
                      "def f():\n    import pkg.c\nfrom . import d\nfrom .sub.e import g\n")
    known = {"pkg", "pkg.a", "pkg.b", "pkg.c", "pkg.d", "pkg.sub", "pkg.sub.e"}
    assert imported("pkg.a", source, known) == {"pkg.b", "pkg.c", "pkg.d", "pkg.sub.e"}


def test_the_graph_sees_the_project_imports():
    graph = import_graph()
    assert "engine_build.errors" in graph["engine_build.manifest"], "relative from-import"
    assert "engine_build.runtime.identity" in graph["engine_build.artifact"], "import inside a function"
    assert "stream.records" in graph["stream.ports"]


def test_cycle_finder_and_layer_order_on_a_known_graph():
    graph = {"engine_build.a": {"engine_build.b"}, "engine_build.b": {"engine_build.c"},
             "engine_build.c": {"engine_build.a"}, "plugins.p": {"stream.s"}, "stream.s": {"plugins.p"}}
    assert cycles(graph) == [["engine_build.a", "engine_build.b", "engine_build.c"], ["plugins.p", "stream.s"]]
    assert upward_imports(graph) == ["plugins.p imports stream.s"]


def test_no_module_import_cycle():
    assert cycles(import_graph()) == []


def test_no_package_imports_one_above_it():
    assert upward_imports(import_graph()) == []
