"""The import rules of uml_ray/architecture.py, read off every module's imports (top-level and lazy),
and docs/architecture.md's tables kept as the map renders them."""

from __future__ import annotations

import ast
import fnmatch
from pathlib import Path

import pytest

from uml_ray import architecture

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "uml_ray"
SYSTEM_PREFIXES = [prefix for prefix, *_ in architecture.SYSTEMS]


def parsed():
    for path in sorted(PACKAGE.rglob("*.py")):
        module = path.relative_to(ROOT).with_suffix("").as_posix().replace("/", ".").removesuffix(".__init__")
        yield module, path, ast.parse(path.read_text())


def _type_checking_only(tree: ast.AST) -> set[int]:
    """The ids of the nodes under ``if TYPE_CHECKING:``: annotations only, never imported at run time."""
    return {
        id(inner)
        for node in ast.walk(tree)
        if isinstance(node, ast.If)
        and getattr(node.test, "id", getattr(node.test, "attr", "")) == "TYPE_CHECKING"
        for child in node.body
        for inner in ast.walk(child)
    }


def imports_of(tree: ast.AST, module: str) -> set[str]:
    names = set()
    skipped = _type_checking_only(tree)
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module)
            # `from uml_ray.driver import sweep` imports the module uml_ray.driver.sweep
            if node.module.split(".")[0] == "uml_ray":
                names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


MODULES = {module: imports_of(tree, module) for module, _, tree in parsed()}


def test_every_module_has_a_place_in_the_map():
    placed = {name for name, *_ in architecture.PACKAGES}
    assert {m for m in MODULES if architecture.package_of(m) not in placed} == set()


@pytest.mark.parametrize("module", sorted(MODULES))
def test_imports_of_ours_follow_the_map(module):
    own = architecture.package_of(module)
    allowed = architecture.allowed_packages(own)
    if allowed == ("*",):
        return
    ours = {architecture.package_of(n) for n in MODULES[module] if n.startswith("uml_ray.")}
    assert ours - {own} - set(allowed) == set(), f"{module} imports packages the map does not allow"


def test_each_outside_system_is_imported_exactly_where_the_map_says():
    for prefix in SYSTEM_PREFIXES:
        importers = {
            m for m, names in MODULES.items() if any(n == prefix or n.startswith(prefix + ".") for n in names)
        }
        outside = {m for m in importers if not architecture.may_import_system(m, prefix)}
        assert outside == set(), f"{prefix} imported outside the map"
        _, _, patterns, _ = next(s for s in architecture.SYSTEMS if s[0] == prefix)
        stale = [p for p in patterns if not any(fnmatch.fnmatchcase(m, p) for m in importers)]
        assert stale == [], f"the map names modules that no longer import {prefix}"


def test_models_are_plain_pytorch():
    offending = {
        m: sorted(n for n in names if n.split(".")[0] in ("ray", "mlflow", "optuna"))
        for m, names in MODULES.items()
        if m.startswith("uml_ray.models")
    }
    assert {m: n for m, n in offending.items() if n} == {}


def test_the_module_import_graph_has_no_cycle():
    graph = {m: {n for n in names if n in MODULES and n != m} for m, names in MODULES.items()}
    state: dict[str, int] = {}

    def visit(module, path):
        state[module] = 1
        for nxt in sorted(graph[module]):
            if state.get(nxt) == 1:
                raise AssertionError("import cycle: " + " → ".join([*path, module, nxt]))
            if nxt not in state:
                visit(nxt, [*path, module])
        state[module] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module, [])


def test_no_class_is_defined_inside_a_function_without_a_reason():
    """Tune pickles a class defined in a function by value, with what it closes over: a resumed sweep
    would run the old code. A nested class must say why on the line above (``# nested: ...``)."""
    found = []
    for module, path, tree in parsed():
        lines = path.read_text().splitlines()
        for func in ast.walk(tree):
            if not isinstance(func, ast.FunctionDef | ast.AsyncFunctionDef):
                continue
            for node in ast.walk(func):
                if isinstance(node, ast.ClassDef) and "# nested:" not in lines[node.lineno - 2]:
                    found.append(f"{module}:{node.lineno} {node.name}")
    assert found == []


def test_docs_tables_are_rendered_from_the_map():
    doc = ROOT / "docs" / "architecture.md"
    text = doc.read_text()
    assert architecture.rewrite(text) == text, (
        "run: python -m uml_ray.architecture --write docs/architecture.md"
    )
