"""The import rules, written once: the architecture test checks every module against this map and the
tables in docs/architecture.md are rendered from it (``python -m uml_ray.architecture --write``).

Data flows one way (data → plan → loop → driver → tracking); a package may import only the packages
of ours named beside it, and each outside system only from the modules named for it, so an API
change in Ray, MLflow or Optuna touches the rooms listed here and nowhere else.
"""

from __future__ import annotations

import argparse
import fnmatch
from pathlib import Path

# (package, what lives there, the packages of ours it may import): bottom to top
PACKAGES: tuple[tuple[str, str, tuple[str, ...]], ...] = (
    ("uml_ray", "the package root (its version)", ()),
    (
        "uml_ray.errors",
        "`UserError` (exit 2), `TrialCrash` (exit 1), the error classes",
        (),
    ),
    (
        "uml_ray.uri",
        'the one answer to "is this URI remote?" and the filesystem of a URI',
        ("uml_ray.errors",),
    ),
    ("uml_ray.architecture", "this map of import rules", ()),
    (
        "uml_ray.selection",
        "the selection statistic (val accuracy, ties to lower val loss), what the val split tells apart",
        (),
    ),
    (
        "uml_ray.config",
        "typed dataclass configs (schema, bounds, cross-field rules), bounded YAML I/O, dotted overrides",
        ("uml_ray.errors", "uml_ray.uri"),
    ),
    (
        "uml_ray.cluster",
        "attaching to or starting Ray, the cluster's storage checks",
        ("uml_ray.errors", "uml_ray.uri"),
    ),
    (
        "uml_ray.data",
        "the manifest (`manifest`), the shard payload and its layouts (`format`), validation, synthetic "
        "generator, sources, few-shot splits, streams",
        ("uml_ray.config", "uml_ray.errors", "uml_ray.uri"),
    ),
    (
        "uml_ray.encoders",
        "frozen encoders, feature extraction, the real cases",
        ("uml_ray.cluster", "uml_ray.config", "uml_ray.data", "uml_ray.errors", "uml_ray.uri"),
    ),
    (
        "uml_ray.models",
        "plain PyTorch modules; the backbone loads its weights through `encoders.vision`",
        ("uml_ray.encoders", "uml_ray.errors"),
    ),
    (
        "uml_ray.train",
        "the run plan, one loop skeleton with a step and an evaluation per regime, checkpoints, placement",
        (
            "uml_ray.config",
            "uml_ray.data",
            "uml_ray.errors",
            "uml_ray.models",
            "uml_ray.selection",
            "uml_ray.uri",
        ),
    ),
    ("uml_ray.search", "search-space files, sweep plots", ("uml_ray.config", "uml_ray.errors")),
    (
        "uml_ray.tracking",
        "MLflow: the connection (`store`), tag names (`tags`), writes held through an outage (`outbox`), "
        "run queries, the ranking and products `uml-ray best` reads (`runs`), "
        "the sweep logger (`loggers`) and the study's (`study`)",
        ("uml_ray.config", "uml_ray.errors", "uml_ray.selection", "uml_ray.uri"),
    ),
    (
        "uml_ray.driver",
        "one run or sweep end to end: checks, the searcher and its warm start, Tune, the MLflow bridge, "
        "summaries; `uml-ray best` and its prediction ensemble",
        (
            "uml_ray.cluster",
            "uml_ray.config",
            "uml_ray.data",
            "uml_ray.errors",
            "uml_ray.models",
            "uml_ray.search",
            "uml_ray.selection",
            "uml_ray.tracking",
            "uml_ray.train",
            "uml_ray.uri",
        ),
    ),
    (
        "uml_ray.science",
        "`uml-ray compare` and `study conversion`: arms of sweeps through the driver, paired statistics",
        (
            "uml_ray.config",
            "uml_ray.data",
            "uml_ray.driver",
            "uml_ray.errors",
            "uml_ray.search",
            "uml_ray.tracking",
            "uml_ray.train",
            "uml_ray.uri",
        ),
    ),
    ("uml_ray.cli", "`main(argv)`: the command tree; `UserError` → exit 2, `TrialCrash` → exit 1", ("*",)),
)

# (import prefix, system, the modules that may import it (fnmatch patterns), why there)
SYSTEMS: tuple[tuple[str, str, tuple[str, ...], str], ...] = (
    (
        "optuna",
        "Optuna",
        ("uml_ray.driver.searcher", "uml_ray.driver.summary", "uml_ray.driver.warm_start"),
        "the sampler (searcher), the parameters' importances (summary), earlier trials told or enqueued "
        "(warm_start)",
    ),
    (
        "ray.tune",
        "Ray Tune",
        (
            "uml_ray.driver.searcher",
            "uml_ray.driver.trainable",
            "uml_ray.driver.callback",
            "uml_ray.driver.tune_state",
            "uml_ray.driver.sweep",
            "uml_ray.train.context",
            "uml_ray.train.runner",
        ),
        "the driver's searcher, trainable, callback, saved state and Tuner; an inline trial reports "
        "through `tune.report` (context) and a TorchTrainer trial through Tune's report callback (runner)",
    ),
    (
        "ray.train",
        "Ray Train",
        ("uml_ray.driver.tune_state", "uml_ray.train.context", "uml_ray.train.runner"),
        "the `TorchTrainer` (runner), the worker's view (context), a trial's checkpoint (tune_state)",
    ),
    (
        "ray.data",
        "Ray Data",
        (
            "uml_ray.data.ray_streams",
            "uml_ray.data.image_pipeline",
            "uml_ray.encoders.extract",
            "uml_ray.driver.sweep",
        ),
        "streams split across workers, image decode tasks, extraction; the driver turns its progress "
        "bars on or off",
    ),
    (
        "mlflow",
        "MLflow",
        ("uml_ray.tracking.store",),
        "every MLflow call (the connection, its bounded HTTP settings, the record builders)",
    ),
)


def allowed_packages(package: str) -> tuple[str, ...]:
    """The packages of ours ``package`` may import (besides itself); ``("*",)`` for the CLI."""
    for name, _, imports in PACKAGES:
        if name == package:
            return imports
    raise KeyError(f"{package} is not in uml_ray.architecture.PACKAGES: add it with what it may import")


def package_of(module: str) -> str:
    """The entry of PACKAGES a module belongs to (``uml_ray.data.streams`` → ``uml_ray.data``)."""
    return ".".join(module.split(".")[:2])


def may_import_system(module: str, prefix: str) -> bool:
    """Whether ``module`` may import the outside system named by ``prefix`` (``ray.tune``, ``mlflow``…)."""
    for name, _, modules, _ in SYSTEMS:
        if name == prefix:
            return any(fnmatch.fnmatchcase(module, pattern) for pattern in modules)
    raise KeyError(prefix)


def _code(names) -> str:
    return ", ".join(f"`{name}`" for name in names) or "—"


def render() -> str:
    """The two tables of docs/architecture.md: outside systems, then packages bottom to top."""
    lines = ["| system | the modules that import it | why there |", "|---|---|---|"]
    lines += [f"| {system} | {_code(modules)} | {why} |" for _, system, modules, why in SYSTEMS]
    lines += ["", "| package | what lives there | may import of ours |", "|---|---|---|"]
    for name, job, imports in PACKAGES:
        shown = "everything" if imports == ("*",) else _code(i.removeprefix("uml_ray.") for i in imports)
        lines.append(f"| `{name}` | {job} | {shown} |")
    return "\n".join(lines) + "\n"


BEGIN = "<!-- import-map: rendered from uml_ray/architecture.py; do not edit by hand -->\n"
END = "<!-- import-map end -->\n"


def rewrite(text: str) -> str:
    """``text`` (docs/architecture.md) with the part between the markers replaced by ``render()``."""
    head, found, rest = text.partition(BEGIN)
    _, found_end, tail = rest.partition(END)
    if not (found and found_end):
        raise ValueError("docs/architecture.md lacks the import-map markers")
    return head + BEGIN + render() + END + tail


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--write", metavar="DOC", help="rewrite the tables in DOC (docs/architecture.md)")
    args = parser.parse_args(argv)
    if args.write:
        path = Path(args.write)
        path.write_text(rewrite(path.read_text()))
    else:
        print(render(), end="")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
