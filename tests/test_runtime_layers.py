"""The runtime package imports downwards only: base knows no backend, nothing in runtime
imports a build step, and the service's path (artifact) never loads the engine builder."""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

RUNTIME = Path(__file__).parents[1] / "engine_build" / "runtime"
ALLOWED_FROM_PARENT = {"errors", "preprocess"}   # leaf modules of engine_build


def _relative_imports(path: Path) -> list[tuple[int, str]]:
    tree = ast.parse(path.read_text())
    return [(node.level, node.module or "") for node in ast.walk(tree)
            if isinstance(node, ast.ImportFrom) and node.level > 0]


def test_runtime_imports_nothing_above_it_but_leaf_modules():
    for path in RUNTIME.glob("*.py"):
        for level, module in _relative_imports(path):
            if level > 1:
                assert module in ALLOWED_FROM_PARENT, f"{path.name} imports ..{module}"


def test_base_imports_no_concrete_backend():
    modules = {module for _, module in _relative_imports(RUNTIME / "base.py")}
    assert not {m for m in modules if m.endswith("_backend") or m == "registry"}, modules


def test_checking_an_engine_does_not_load_the_build_step():
    code = ("import sys, engine_build.artifact, engine_build.runtime.identity; "
            "print('engine_build.tensorrt_build' in sys.modules, 'engine_build.build' in sys.modules)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.split() == ["False", "False"]
