"""The packages' import graph has no circles, counting imports inside function bodies too (a lazy
import still ties two modules together); imports under `if TYPE_CHECKING:` never run and do not count."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("fedmpi", "preprocess")


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _imports(path: Path, modules: set[str]) -> set[str]:
    """Package modules that `path` imports anywhere but under TYPE_CHECKING."""
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, *([base] if base else [])])
            found.add(base)
            found.update(f"{base}.{a.name}" for a in node.names)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(ast.parse(path.read_text()))
    return {m for m in found if m in modules and m != name}


def import_graph() -> dict[str, set[str]]:
    files = [p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py")]
    modules = {_module_name(p) for p in files}
    return {_module_name(p): _imports(p, modules) for p in files}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import circle as a list of modules (first == last), or None."""
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done
    path: list[str] = []

    def walk(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return [*path[path.index(nxt) :], nxt]
            if nxt not in state and (cycle := walk(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := walk(node)):
            return cycle
    return None


def test_find_cycle_finds_a_planted_circle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) is None


def test_the_graph_sees_lazy_imports():
    graph = import_graph()
    assert "fedmpi.launch" in graph["fedmpi.cli"]  # imported inside a function
    assert "fedmpi.config" not in graph["fedmpi.server"]  # only under TYPE_CHECKING


def test_no_import_circles():
    assert find_cycle(import_graph()) is None


def test_errors_module_imports_nothing_from_the_package():
    """So every module can raise its errors without an import circle (errors.py's docstring)."""
    assert import_graph()["fedmpi.errors"] == set()


# What training a given split may not need: the neuroimaging stack (preprocessing's) and the report's plots. A GPU
# image or a site's training environment may lack them (the GPU machine here has neither nibabel nor nilearn).
PREPROCESSING_ONLY = ("nibabel", "nilearn", "scipy", "matplotlib")
TRAINER = f"""
import sys
for name in {PREPROCESSING_ONLY!r}:
    sys.modules[name] = None  # an import of it fails
import fedmpi.centralized, fedmpi.cli, fedmpi.launch, fedmpi.learner, fedmpi.server
from fedmpi.config import load_config
from fedmpi.launch import prepare_data
print(prepare_data(load_config(overrides=["data.dir=/data/split"]), None))
"""


def test_the_trainer_on_a_given_split_imports_no_preprocessing_stack():
    import subprocess
    import sys

    run = subprocess.run([sys.executable, "-c", TRAINER], capture_output=True, text=True, cwd=ROOT)
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == "/data/split"
