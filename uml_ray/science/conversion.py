"""``uml-ray study conversion``: what an auxiliary sample is worth in target samples.

Two arms, both validation-selected in every cell with the same space and budget:

- the unimodal curve: alpha 0, ``data.target_per_class`` = each N_x of the grid, per seed;
- UML at a fixed target budget N_0 (one of the N_x): ``data.aux_per_class`` = each N_y, per seed.

Each UML accuracy is read off the seed-averaged, monotone unimodal curve (interpolated in log N_x)
as an equivalent target count; its excess over N_0 is the gain in target samples, and gain / N_y
is what one auxiliary sample is worth in target samples (``uml_ray/science/stats.py:conversion``).
Seeds are resampled whole for the bootstrap interval.
"""

from __future__ import annotations

import json

import numpy as np

from uml_ray.errors import ConfigError
from uml_ray.science.compare import (
    UML,
    UNIMODAL,
    check_uses_auxiliary,
    pinned_width,
    unimodal_arm,
    write_report_files,
)
from uml_ray.science.searches import Arm, Selected
from uml_ray.science.stats import bootstrap_conversion, conversion, paired_summary
from uml_ray.search.space import SearchSpace
from uml_ray.train.plan import RunPlan

TARGET_AXIS, AUX_AXIS = "data.target_per_class", "data.aux_per_class"


def check_grids(plan: RunPlan, target_counts: list[int], budget: int) -> None:
    """The study's grids fit the regime (target counts against the data are checked by ``build_plan``)."""
    cfg = plan.cfg
    if cfg.model.regime != "supervised" or cfg.model.backbone:
        raise ConfigError(
            "study conversion draws target rows per class (data.target_per_class) from feature vectors: "
            "it needs model.regime=supervised and model.backbone=''"
        )
    if len(target_counts) < 2:
        raise ConfigError(
            f"--nx {target_counts}: the unimodal curve needs at least 2 target counts, e.g. --nx 1,2,4,8"
        )
    if budget not in target_counts:
        raise ConfigError(
            f"--target-budget {budget} must be one of --nx {target_counts}: "
            "UML is read off the curve from that point"
        )
    if budget >= max(target_counts):
        raise ConfigError(
            f"--target-budget {budget} is the largest --nx: "
            "the curve has no larger count to convert a gain into; "
            f"add --nx values above {budget}"
        )


def check_aux_counts(plan: RunPlan, aux_counts: list[int], manifests: dict[int, str] | None) -> None:
    """Every class has at least max(N_y) train rows of every auxiliary modality, in every seed's
    manifest (fewer would be taken silently); checked before the sweeps are planned, so the error
    names the study's flag."""
    from uml_ray.data.validate import require_valid_manifest
    from uml_ray.driver.plan import class_counts

    paths = sorted(set(manifests.values())) if manifests else [plan.dataset.manifest.path]
    for manifest in (require_valid_manifest(path, plan.cfg.data.max_abs_feature) for path in paths):
        for modality in plan.dataset.auxiliary:
            counts = class_counts(manifest, modality)
            if counts.min() < max(aux_counts):
                raise ConfigError(
                    f"--ny {max(aux_counts)}: class '{manifest.classes[int(counts.argmin())]}' has only "
                    f"{counts.min()} train row(s) of auxiliary '{modality}' in {manifest.path}; "
                    f"use --ny values <= {counts.min()}"
                )


def conversion_arms(plan: RunPlan, space: SearchSpace, budget: int) -> list[Arm]:
    """UML at ``budget`` target rows per class (the space as given) and the unimodal baseline."""
    check_uses_auxiliary(plan, space)
    pinned = pinned_width(plan)
    return [Arm(UML, {**pinned, TARGET_AXIS: budget}, space), unimodal_arm(plan, space, pinned)]


def conversion_report(
    selected: list[Selected],
    seeds: list[int],
    target_counts: list[int],
    aux_counts: list[int],
    budget: int,
    confidence: float,
) -> dict:
    """Accuracy tables, the conversion with its seed-bootstrap intervals, UML's accuracy gain at budget."""
    score = {
        (s.arm, s.cell["train.seed"], s.cell.get(TARGET_AXIS, s.cell.get(AUX_AXIS))): s for s in selected
    }
    unimodal = np.array([[score[(UNIMODAL, seed, n)].test_acc for n in target_counts] for seed in seeds])
    uml = np.array([[score[(UML, seed, n)].test_acc for n in aux_counts] for seed in seeds])
    found = conversion(target_counts, unimodal, budget, aux_counts, uml)
    intervals = bootstrap_conversion(target_counts, unimodal, budget, aux_counts, uml, confidence)
    at_budget = unimodal[:, target_counts.index(budget)]
    rows = [
        {
            "arm": s.arm,
            "seed": s.cell["train.seed"],
            "target_per_class": s.cell.get(TARGET_AXIS, budget),
            "aux_per_class": s.cell.get(AUX_AXIS, 0),
            "best_val_acc": s.best_val_acc,
            "test_acc": s.test_acc,
            "config": json.dumps(s.config, sort_keys=True, default=str),
        }
        for s in selected
    ]
    return {
        "seeds": seeds,
        "target_counts": target_counts,
        "aux_counts": aux_counts,
        "budget": budget,
        "confidence": confidence,
        "unimodal_test_acc": unimodal.tolist(),
        "uml_test_acc": uml.tolist(),
        "curve": found.curve,
        "uml_mean": found.uml,
        "gains": found.gains,
        "gain_intervals": intervals["gains"],
        "worth": found.ratios,
        "worth_intervals": intervals["ratios"],
        "ratio": found.ratio,
        "ratio_interval": intervals["ratio"],
        "capped": found.capped,
        "accuracy_gain": [
            paired_summary(uml[:, j], at_budget, confidence).to_dict() for j in range(len(aux_counts))
        ],
        "rows": rows,
        "sweeps": sorted({s.sweep for s in selected}),
    }


def format_report(report: dict) -> list[str]:
    """The report as console lines: the unimodal curve, UML per auxiliary count, and the ratio."""
    percent = round(report["confidence"] * 100)
    lines = ["unimodal (alpha 0), test acc over seeds:"]
    for n, column, fitted in zip(
        report["target_counts"], np.array(report["unimodal_test_acc"]).T, report["curve"]
    ):
        lines.append(
            f"  N_x={n:<5d} mean {column.mean():.4f}  monotone fit {fitted:.4f}  "
            f"per seed {np.round(column, 4).tolist()}"
        )
    lines.append(f"UML at N_0={report['budget']} target samples per class:")
    for j, n in enumerate(report["aux_counts"]):
        low, high = report["worth_intervals"][j]
        gain = report["accuracy_gain"][j]
        bound = ">= " if report["capped"][j] else ""
        lines.append(
            f"  N_y={n:<5d} test acc {report['uml_mean'][j]:.4f} ({gain['mean']:+.4f} vs unimodal at N_0, "
            f"{percent}% t CI [{gain['t_low']:+.4f}, {gain['t_high']:+.4f}]); "
            f"worth {bound}{report['gains'][j]:.3g} target samples per class; "
            f"one auxiliary sample = {bound}{report['worth'][j]:.3g} target samples "
            f"[{low:.3g}, {high:.3g}]"
        )
    low, high = report["ratio_interval"]
    lines.append(
        f"conversion ratio (target samples per auxiliary sample, slope over N_y): {report['ratio']:.4g}, "
        f"{percent}% seed-bootstrap [{low:.4g}, {high:.4g}]"
    )
    return lines


def write_artifacts(report: dict, folder: str) -> list[str]:
    """conversion.csv (every selected cell), conversion.json (everything) and conversion.png in ``folder``."""
    from uml_ray.science.plots import conversion_plot

    return write_report_files(report, folder, "conversion", conversion_plot)
