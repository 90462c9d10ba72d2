"""The import rules of docs/architecture.md, read off every module's imports (top-level and lazy)."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "uml_ray"


def imports_of(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return names


def modules():
    for path in sorted(PACKAGE.rglob("*.py")):
        yield path.relative_to(PACKAGE.parent).with_suffix("").as_posix().replace("/", "."), imports_of(path)


def importers(prefix: str) -> set[str]:
    return {
        module for module, names in modules() if any(n == prefix or n.startswith(prefix + ".") for n in names)
    }


def test_train_never_imports_the_driver_or_search():
    upward = {
        module: sorted(n for n in names if n.startswith(("uml_ray.driver", "uml_ray.search", "uml_ray.cli")))
        for module, names in modules()
        if module.startswith("uml_ray.train")
    }
    assert {m: n for m, n in upward.items() if n} == {}


def test_models_are_plain_pytorch():
    offending = {
        module: sorted(n for n in names if n.split(".")[0] in ("ray", "mlflow", "optuna"))
        for module, names in modules()
        if module.startswith("uml_ray.models")
    }
    assert {m: n for m, n in offending.items() if n} == {}


def test_each_system_sits_behind_one_module():
    assert importers("mlflow") == {"uml_ray.tracking.mlflow_store"}
    # Optuna: the sampler (searcher) and the params' importances (summary)
    assert importers("optuna") == {"uml_ray.driver.searcher", "uml_ray.driver.summary"}
    assert importers("ray.tune") - {"uml_ray.train.context", "uml_ray.train.runner"} == {
        "uml_ray.driver.searcher",
        "uml_ray.driver.trainable",
        "uml_ray.driver.callback",
        "uml_ray.driver.tune_state",
        "uml_ray.driver.sweep",
    }


def driver_imports(path: Path) -> set[str]:
    """The driver modules ``path`` imports, ``from uml_ray.driver import sweep`` included."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module == "uml_ray.driver":
            names.update(f"uml_ray.driver.{alias.name}" for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("uml_ray.driver."):
            names.add(node.module)
        elif isinstance(node, ast.Import):
            names.update(a.name for a in node.names if a.name.startswith("uml_ray.driver."))
    return names


def test_the_driver_imports_without_a_cycle():
    """The driver's modules import each other (top-level and lazy) without a cycle."""
    graph = {f"uml_ray.driver.{p.stem}": driver_imports(p) for p in (PACKAGE / "driver").glob("*.py")}
    done: set[str] = set()

    def visit(module: str, path: list[str]) -> None:
        assert module not in path, " -> ".join([*path, module])
        if module not in done:
            for imported in graph.get(module, ()):
                visit(imported, [*path, module])
            done.add(module)

    for module in graph:
        visit(module, [])
