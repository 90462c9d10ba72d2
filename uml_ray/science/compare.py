"""``uml-ray compare``: UML (alpha searched) against the unimodal baseline (alpha 0), paired over seeds.

Per seed, each arm runs its own search with the same space (less what has no effect without the
auxiliary modalities) and the same budget; each selects its config on validation only, and the
test accuracy at that config is the arm's score for the seed. The per-seed pairs give the mean
paired difference with a t and a bootstrap interval, a sign test and a Wilcoxon signed-rank test.
``--drop-modality M`` adds an arm that trains on every auxiliary modality but M (an ablation row).
"""

from __future__ import annotations

import csv
import json
import os

from uml_ray.errors import ConfigError
from uml_ray.science.searches import Arm, Selected, reduce_space
from uml_ray.science.stats import paired_summary
from uml_ray.search.space import SearchSpace
from uml_ray.train.plan import RunPlan

UML, UNIMODAL = "uml", "unimodal"
# settings that only act through an auxiliary modality: at alpha 0 they change nothing, so the
# baseline does not spend its budget on them
AUXILIARY_ONLY = (
    "train.alpha_default",
    "data.aux_per_class",
    "data.aux_class_mean",
    "data.aux_batch_ratio",
    "model.head_init",
    "model.project_auxiliary",
)


def auxiliary_only(key: str, regime: str) -> bool:
    """Whether a searched key has no effect when every alpha is 0 (``train.step_k`` must then be -1)."""
    return (
        key.startswith("train.alpha.")
        or key in AUXILIARY_ONLY
        or (regime == "sequence" and key == "train.step_k")
    )


def pinned_width(plan: RunPlan) -> dict:
    """Both arms at one architecture: with ``model.shared_dim=0`` the shared width would follow alpha
    (an alpha-0 config projects into the target's own width), so it is pinned to the UML arm's width."""
    cfg = plan.cfg
    if cfg.model.regime != "supervised" or cfg.model.shared_dim:
        return {}
    dims, auxiliary = plan.dataset.dims, plan.dataset.auxiliary
    width = dims[auxiliary[0]] if cfg.model.project_target and auxiliary else dims[plan.dataset.target]
    return {"model.shared_dim": width}


def unimodal_arm(plan: RunPlan, space: SearchSpace, pinned: dict) -> Arm:
    """Alpha fixed at 0 for every auxiliary modality; the space without the auxiliary-only params."""
    regime = plan.cfg.model.regime
    # text class means need an auxiliary modality; a probe (fine-tuning) is fair to both arms
    head_init = "random" if plan.cfg.model.head_init == "text" else plan.cfg.model.head_init
    overrides = {**pinned, "train.alpha_default": 0.0, "train.alpha": {}, "model.head_init": head_init}
    if regime == "sequence":
        overrides["train.step_k"] = -1  # a warm-up on auxiliary modalities that all weigh 0 is refused
    return Arm(UNIMODAL, overrides, reduce_space(space, lambda key: auxiliary_only(key, regime)))


def check_uses_auxiliary(plan: RunPlan, space: SearchSpace) -> None:
    """The UML arm must be able to weigh an auxiliary modality above 0, or both arms are the baseline."""
    searched = any(key.startswith("train.alpha.") or key == "train.alpha_default" for key in space.keys())
    if not searched and not any(a > 0 for a in plan.alpha().values()):
        raise ConfigError(
            f"every alpha is 0 in the config and {space.source} searches none: the UML arm would be the "
            "unimodal baseline; search train.alpha.<modality> or set train.alpha_default > 0"
        )


def compare_arms(plan: RunPlan, space: SearchSpace, drop: list[str]) -> list[Arm]:
    """The arms of a comparison: UML (the space as given), one per dropped modality, the unimodal baseline."""
    check_uses_auxiliary(plan, space)
    auxiliary = list(plan.dataset.auxiliary)
    pinned = pinned_width(plan)
    arms = [Arm(UML, pinned, space)]
    if len(set(drop)) != len(drop):
        raise ConfigError(f"--drop-modality names a modality twice: {drop}")
    for modality in drop:
        if modality not in auxiliary:
            raise ConfigError(
                f"--drop-modality {modality}: not an auxiliary modality of this run; choose from {auxiliary}"
            )
        rest = [m for m in auxiliary if m != modality]
        if not rest:
            raise ConfigError(
                f"--drop-modality {modality}: it is the only auxiliary modality of this run, "
                "and leaving it out is the unimodal arm, which compare always runs; drop the flag"
            )
        alpha = {m: a for m, a in plan.cfg.train.alpha.items() if m != modality}
        arms.append(
            Arm(
                f"without-{modality}",
                {**pinned, "data.auxiliary": rest, "train.alpha": alpha},
                reduce_space(space, lambda key, m=modality: key == f"train.alpha.{m}"),
            )
        )
    arms.append(unimodal_arm(plan, space, pinned))
    return arms


def compare_report(selected: list[Selected], arms: list[Arm], seeds: list[int], confidence: float) -> dict:
    """Per-seed table and paired statistics: UML − unimodal, and per dropped modality UML − without
    and without − unimodal."""
    score = {(s.arm, s.cell["train.seed"]): s for s in selected}
    names = [arm.name for arm in arms]
    rows = []
    for seed in seeds:
        row = {"seed": seed}
        for name in names:
            chosen = score[(name, seed)]
            row.update(
                {
                    f"{name}_test_acc": chosen.test_acc,
                    f"{name}_val_acc": chosen.best_val_acc,
                    f"{name}_config": json.dumps(chosen.config, sort_keys=True, default=str),
                }
            )
        row["delta_test_acc"] = row[f"{UML}_test_acc"] - row[f"{UNIMODAL}_test_acc"]
        rows.append(row)

    def column(name: str) -> list[float]:
        return [row[f"{name}_test_acc"] for row in rows]

    pairs = [(UML, UNIMODAL)]
    for name in names[1:-1]:
        pairs += [(UML, name), (name, UNIMODAL)]
    comparisons = {f"{a} - {b}": paired_summary(column(a), column(b), confidence).to_dict() for a, b in pairs}
    sweeps = sorted({s.sweep for s in selected})
    return {
        "seeds": seeds,
        "arms": names,
        "rows": rows,
        "comparisons": comparisons,
        "mean_test_acc": {name: sum(column(name)) / len(seeds) for name in names},
        "configs_per_search": {
            name: sorted({s.configs_tried for s in selected if s.arm == name}) for name in names
        },
        "sweeps": sweeps,
    }


def format_report(report: dict) -> list[str]:
    """The report as console lines: the per-seed table, then one line per comparison."""
    names = report["arms"]
    lines = ["seed  " + "  ".join(f"{n:>14s}" for n in names) + f"  {'uml-unimodal':>13s}"]
    for row in report["rows"]:
        lines.append(
            f"{row['seed']:<4d}  "
            + "  ".join(f"{row[n + '_test_acc']:14.4f}" for n in names)
            + f"  {row['delta_test_acc']:+13.4f}"
        )
    for label, c in report["comparisons"].items():
        percent = round(c["confidence"] * 100)
        lines.append(
            f"{label}: mean {c['mean']:+.4f} (test acc), "
            f"{percent}% t CI [{c['t_low']:+.4f}, {c['t_high']:+.4f}], "
            f"bootstrap [{c['boot_low']:+.4f}, {c['boot_high']:+.4f}], "
            f"sign {c['wins']}/{c['losses']} p={c['sign_p']:.3g}, "
            f"Wilcoxon p={c['wilcoxon_p']:.3g}, n={c['n']}"
        )
    return lines


def write_report_files(report: dict, folder: str, stem: str, plot) -> list[str]:
    """Write STEM.csv (the report's rows), STEM.json (everything) and STEM.png in ``folder``.

    The figure is ``plot(report, path)``.
    """
    table = os.path.join(folder, f"{stem}.csv")
    with open(table, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(report["rows"][0]))
        writer.writeheader()
        writer.writerows(report["rows"])
    summary = os.path.join(folder, f"{stem}.json")
    with open(summary, "w") as handle:
        json.dump(report, handle, indent=2, default=str)
    return [table, summary, plot(report, os.path.join(folder, f"{stem}.png"))]


def write_artifacts(report: dict, folder: str) -> list[str]:
    """compare.csv (per-seed table), compare.json (everything) and compare.png (paired plot) in ``folder``."""
    from uml_ray.science.plots import paired_plot

    return write_report_files(report, folder, "compare", paired_plot)
