"""The shape of the code: no import cycles, commands apart from the CLI, no test tooling in production."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from tests.conftest import REPO_ROOT

PACKAGES = ("app", "callbacks", "datamodules")


def module_name(path: Path) -> str:
    parts = path.relative_to(REPO_ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def production_modules() -> dict[str, Path]:
    return {module_name(p): p for package in PACKAGES for p in sorted((REPO_ROOT / package).rglob("*.py"))}


def _under_type_checking(node: ast.AST, parents: dict[ast.AST, ast.AST]) -> bool:
    while node in parents:
        node = parents[node]
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            return True
    return False


def imported_modules(path: Path, known: set[str]) -> set[str]:
    """Every module of ``known`` that ``path`` imports, at any depth (lazy imports in functions
    count: they are cycles that merely wait), except under ``if TYPE_CHECKING:``."""
    tree = ast.parse(path.read_text())
    parents = {child: node for node in ast.walk(tree) for child in ast.iter_child_nodes(node)}
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Import, ast.ImportFrom)) and _under_type_checking(node, parents):
            continue
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            # ``from package import module`` imports the submodule; ``from module import name`` the module.
            found |= {f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in known else node.module
                      for a in node.names}
    return found & known


def import_graph() -> dict[str, set[str]]:
    modules = production_modules()
    return {name: imported_modules(path, set(modules)) - {name} for name, path in modules.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle of ``graph`` as a path ``[a, b, ..., a]``, or None."""
    state: dict[str, str] = {}  # "open" while on the DFS stack, "done" after
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = "open"
        stack.append(node)
        for target in sorted(graph[node]):
            if state.get(target) == "open":
                return stack[stack.index(target):] + [target]
            if target not in state and (cycle := visit(target)):
                return cycle
        stack.pop()
        state[node] = "done"
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_the_cycle_finder_finds_a_cycle_and_ignores_type_checking_imports(tmp_path):
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) is None
    source = tmp_path / "m.py"
    source.write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import x.y\n"
                      "def f():\n    from x import z\nfrom x import y\n")
    assert imported_modules(source, {"x", "x.y", "x.z"}) == {"x.y", "x.z"}


def test_there_is_no_import_cycle():
    graph = import_graph()
    assert len(graph) > 40  # the parser sees the whole code base
    assert find_cycle(graph) is None, f"import cycle: {' -> '.join(find_cycle(graph))}"


def test_only_the_console_script_imports_the_cli():
    importers = sorted(name for name, targets in import_graph().items() if "app.cli" in targets)
    assert importers == []


@pytest.mark.parametrize("name", sorted(production_modules()))
def test_no_production_module_imports_unittest(name):
    tree = ast.parse(production_modules()[name].read_text())
    imported = {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
    imported |= {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.module}
    assert not any(module == "unittest" or module.startswith("unittest.") for module in imported)


@pytest.mark.parametrize("package", sorted({module_name(p) for pkg in PACKAGES
                                            for p in (REPO_ROOT / pkg).rglob("__init__.py")}))
def test_every_package_says_what_lives_there(package):
    init = REPO_ROOT / package.replace(".", "/") / "__init__.py"
    docstring = ast.get_docstring(ast.parse(init.read_text()))
    assert docstring and len(docstring) > 40
    # It names its modules, so a newcomer knows where a new one goes.
    modules = [p.stem for p in init.parent.glob("*.py") if p.stem != "__init__"]
    modules += [p.name for p in init.parent.iterdir() if (p / "__init__.py").is_file()]
    assert all(f"``{m}``" in docstring for m in modules), [m for m in modules if f"``{m}``" not in docstring]
