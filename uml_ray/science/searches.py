"""Validation-selected searches over a table of cells: the building block of ``compare`` and ``study``.

A science command asks the same question of several *arms* (UML with alpha free, alpha fixed at 0,
a modality left out, …) in several *cells* (a seed, a target sample count, …): in each (arm, cell)
one search picks its best config on validation alone, and only then is that config's test
accuracy read. Every cell of an arm gets the same space and the same budget.

How the searches are run: a grid space, one manifest for all seeds, becomes ONE sweep per arm,
the cell axes added to the grid as choices. The axes are structural settings (``train.seed``,
``data.*``), so each cell's points still train in their own fused trials, and each cell is
selected from its own points — but the Tune and MLflow start-up is paid once per arm. Any other
space (TPE, random) or per-seed manifests run one sweep per (arm, cell), the sampler seeded by
the cell's ``train.seed``. A space reduced to nothing (an arm whose only searched params were
alpha) trains its config once per cell.

Everything is checked (``build_plan`` for every sweep, names free) before the first sweep starts.
"""

from __future__ import annotations

import dataclasses
import itertools
from dataclasses import dataclass
from pathlib import Path

from uml_ray.config import Config, apply_overrides
from uml_ray.driver.plan import build_plan
from uml_ray.driver.summary import best_row
from uml_ray.errors import ConfigError, UserError
from uml_ray.search.space import Param, SearchSpace
from uml_ray.train.plan import RunPlan

# short names of the cell axes in sweep names and tables
AXIS_LABELS = {"train.seed": "seed", "data.target_per_class": "nx", "data.aux_per_class": "ny"}


@dataclass(frozen=True)
class Arm:
    """One side of a study: its name, dotted overrides of the base config, and its space (None: no search)."""

    name: str
    overrides: dict
    space: SearchSpace | None


@dataclass
class Job:
    """One sweep (or single training) of an arm, serving one or more cells."""

    arm: str
    name: str
    plan: RunPlan
    space: SearchSpace | None
    axes: list[str]
    cells: list[dict]


@dataclass
class Selected:
    """The val-selected config of one (arm, cell) and its scores."""

    arm: str
    cell: dict
    sweep: str
    config: dict
    best_val_acc: float
    test_acc: float
    configs_tried: int


def reduce_space(space: SearchSpace | None, drop) -> SearchSpace | None:
    """``space`` without the params for which ``drop(key)`` is true; None when nothing is left."""
    if space is None:
        return None
    kept = [p for p in space.params if not drop(p.key)]
    return dataclasses.replace(space, params=kept) if kept else None


def check_axes_free(space: SearchSpace | None, axes: list[str]) -> None:
    """The space may not search what the study varies itself (the cell axes, or a grid's own seeds)."""
    if space is None:
        return
    taken = [key for key in space.keys() if key in axes]
    if taken:
        raise ConfigError(
            f"{space.source}: params {taken} are set by the study itself for each cell "
            f"({', '.join(AXIS_LABELS.get(a, a) for a in axes)}); remove them from the space"
        )
    if space.seeds:
        raise ConfigError(
            f"{space.source}: 'seeds' repeats the grid per seed, but the study sets train.seed per cell "
            "(--seeds); remove 'seeds' from the space"
        )


def _label(cell: dict) -> str:
    return "-".join(
        f"{AXIS_LABELS.get(k, k.split('.')[-1])}{v}" for k, v in cell.items() if k != "data.manifest"
    )


def plan_jobs(
    base: Config, arm: Arm, axes: dict[str, list], name: str, manifests: dict[int, str] | None = None
) -> list[Job]:
    """The sweeps of one arm over every cell of ``axes`` (the product of its values).

    Each is checked by ``build_plan``. ``manifests`` maps a seed to the manifest of that seed's split
    (``data.manifest`` per cell).
    """
    keys = list(axes)
    cells = [dict(zip(keys, values)) for values in itertools.product(*axes.values())]
    cfg = apply_overrides(base, arm.overrides)
    if arm.space is not None and arm.space.searcher == "grid" and not manifests:
        extra = [Param(key, "choice", values=list(values)) for key, values in axes.items()]
        space = dataclasses.replace(arm.space, params=list(arm.space.params) + extra)
        return [Job(arm.name, f"{name}-{arm.name}", build_plan(cfg, space), space, keys, cells)]
    jobs = []
    for cell in cells:
        overrides = dict(cell)
        if manifests:
            overrides["data.manifest"] = manifests[cell["train.seed"]]
        plan = build_plan(apply_overrides(cfg, overrides), arm.space)
        jobs.append(Job(arm.name, f"{name}-{arm.name}-{_label(cell)}", plan, arm.space, keys, [cell]))
    return jobs


def check_names_free(jobs: list[Job]) -> None:
    """Every sweep name is new: a study never continues or overwrites an earlier sweep."""
    from uml_ray.driver.tune_state import experiment_path
    from uml_ray.tracking.runs import check_run_name
    from uml_ray.uri import is_remote

    for job in jobs:
        check_run_name(job.name)
        path = experiment_path(job.plan, job.name)
        if not is_remote(path) and Path(path, "tuner.pkl").exists():
            raise UserError(
                f"a sweep named '{job.name}' already exists at {path}; give the study another --name"
            )


def check_fuse(jobs: list[Job], fuse: int) -> None:
    """``--fuse K`` (K > 1) needs sweeps that can fuse (head-only supervised): checked before any sweep."""
    from uml_ray.driver.sweep import can_fuse

    if fuse > 1 and not all(can_fuse(job.plan, job.space) for job in jobs if job.space is not None):
        raise ConfigError(
            "--fuse needs head-only supervised sweeps trained in the trial process with seed_policy fixed "
            "(model.backbone empty, resources.num_workers=1); use --fuse 0 or 1"
        )


def run_jobs(jobs: list[Job], trials: int, fuse: int = 0, verbose: bool = False) -> list[Selected]:
    """Run every job in order; returns one ``Selected`` per (arm, cell). A failed trial stops the study."""
    from uml_ray.driver import sweep

    selected = []
    for job in jobs:
        outcome = sweep.run(
            job.plan,
            job.space,
            trials=trials,
            name=job.name,
            verbose=verbose,
            fuse=fuse if job.space is not None else 0,
        )
        outcome.raise_for_failures()
        metric = job.space.metric if job.space is not None else "best_val_acc"
        scored = [r for r in outcome.results if r["metrics"].get(metric) is not None]
        for cell in job.cells:
            rows = [r for r in scored if all(r["config"].get(k, cell[k]) == cell[k] for k in job.axes)]
            if not rows:
                raise UserError(f"sweep '{job.name}': no config of cell {_label(cell)} reported {metric}")
            best = best_row(rows, metric)
            config = {k: v for k, v in best["config"].items() if k not in job.axes}
            selected.append(
                Selected(
                    job.arm,
                    cell,
                    job.name,
                    config,
                    float(best["metrics"].get("best_val_acc", float("nan"))),
                    float(best["metrics"].get("test_acc", float("nan"))),
                    len(rows),
                )
            )
    return selected
