"""Sweep plots for the parent run: optimization history, parameter importances, val accuracy vs alpha."""

from __future__ import annotations

import os

from uml_ray.search.space import SearchSpace


def sweep_plots(
    rows: list[dict], space: SearchSpace, metric: str, importances: dict[str, float], folder: str
) -> list[str]:
    """Write the sweep's PNG plots into ``folder``; returns their paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    values = [r["metrics"][metric] for r in rows]
    best_so_far = [max(values[: i + 1]) for i in range(len(values))]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(range(1, len(values) + 1), values, "o", label=f"trial {metric}")
    ax.plot(range(1, len(values) + 1), best_so_far, "-", label="best so far")
    ax.set_xlabel("trial")
    ax.set_ylabel(metric)
    ax.set_title("Optimization history")
    ax.legend()
    paths.append(_save(fig, folder, "optimization_history.png"))

    fig, ax = plt.subplots(figsize=(6, 4))
    if importances:
        names = list(importances)
        ax.barh(names, [importances[n] for n in names])
        ax.set_xlabel("importance (fANOVA)")
    else:
        ax.text(0.5, 0.5, "too few trials for importances", ha="center", va="center")
    ax.set_title("Parameter importances")
    paths.append(_save(fig, folder, "param_importances.png"))

    alpha_keys = [p.key for p in space.params if p.key.startswith("train.alpha")]
    fig, ax = plt.subplots(figsize=(6, 4))
    for key in alpha_keys:
        points = [
            (r["config"][key], r["metrics"].get("val_acc", r["metrics"][metric]))
            for r in rows
            if key in r["config"]
        ]
        ax.scatter([p[0] for p in points], [p[1] for p in points], label=key)
    if not alpha_keys:
        ax.text(0.5, 0.5, "alpha not searched", ha="center", va="center")
    else:
        ax.legend()
    ax.set_xlabel("alpha")
    ax.set_ylabel("val accuracy (last validation)")
    ax.set_title("Val accuracy against alpha")
    paths.append(_save(fig, folder, "val_acc_vs_alpha.png"))
    return paths


def _save(fig, folder: str, name: str) -> str:
    import matplotlib.pyplot as plt

    path = os.path.join(folder, name)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
