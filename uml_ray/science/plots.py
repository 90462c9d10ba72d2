"""PNG figures of the science commands: ``compare``'s paired plot and ``study``'s conversion plot."""

from __future__ import annotations

import numpy as np


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def paired_plot(report: dict, path: str) -> str:
    """Left: each seed's test accuracy in every arm, joined by a line (the pairing). Right: the
    per-seed UML − unimodal differences with their mean, t interval and bootstrap interval."""
    plt = _pyplot()
    names = report["arms"]
    order = [names[-1]] + names[1:-1] + [names[0]]  # unimodal, ablations, UML: left to right
    fig, (left, right) = plt.subplots(
        1, 2, figsize=(10, 4), gridspec_kw={"width_ratios": [max(2, len(order)), 2]}
    )
    for row in report["rows"]:
        left.plot(
            range(len(order)),
            [row[f"{n}_test_acc"] for n in order],
            "o-",
            alpha=0.7,
            label=f"seed {row['seed']}",
        )
    left.set_xticks(range(len(order)), order)
    left.set_ylabel("test accuracy at the best-val config")
    left.set_title("Per seed, each arm val-selected")
    left.legend(fontsize=8)
    main = report["comparisons"]["uml - unimodal"]
    deltas = [row["delta_test_acc"] for row in report["rows"]]
    right.axhline(0, color="grey", lw=1)
    right.plot(np.zeros(len(deltas)), deltas, "o", alpha=0.6, label="seeds")
    right.errorbar(
        [0.3],
        [main["mean"]],
        yerr=[[main["mean"] - main["t_low"]], [main["t_high"] - main["mean"]]],
        fmt="s",
        capsize=5,
        label=f"mean, {round(main['confidence'] * 100)}% t CI",
    )
    right.errorbar(
        [0.6],
        [main["mean"]],
        yerr=[[max(0.0, main["mean"] - main["boot_low"])], [max(0.0, main["boot_high"] - main["mean"])]],
        fmt="D",
        capsize=5,
        label="bootstrap CI",
    )
    right.set_xlim(-0.4, 1.0)
    right.set_xticks([])
    right.set_ylabel("UML − unimodal test accuracy")
    right.set_title(f"Δ over {main['n']} seeds (Wilcoxon p={main['wilcoxon_p']:.2g})")
    right.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def conversion_plot(report: dict, path: str) -> str:
    """Left: the unimodal curve (per seed and its monotone mean) with UML at the target budget read
    off it. Right: the gain in target samples against auxiliary samples, with the fitted slope."""
    plt = _pyplot()
    counts = np.array(report["target_counts"], dtype=float)
    aux = np.array(report["aux_counts"], dtype=float)
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    for accuracies in report["unimodal_test_acc"]:
        left.plot(counts, accuracies, "-", color="grey", alpha=0.4, lw=1)
    left.plot(counts, report["curve"], "o-", color="C0", label="unimodal (monotone mean)")
    budget = report["budget"]
    for j, accuracy in enumerate(report["uml_mean"]):
        equivalent = budget + report["gains"][j]
        left.plot([budget, equivalent], [accuracy, accuracy], ":", color=f"C{1 + j % 8}")
        left.plot(
            [budget],
            [accuracy],
            "s",
            color=f"C{1 + j % 8}",
            label=f"UML, N_y={int(aux[j])} ≈ {equivalent:.3g} target",
        )
    left.set_xscale("log", base=2)
    left.set_xlabel("target samples per class (N_x)")
    left.set_ylabel("test accuracy (val-selected)")
    left.set_title(f"UML at N_0={budget} against the unimodal curve")
    left.legend(fontsize=8)
    gains = np.array(report["gains"])
    intervals = np.array(report["gain_intervals"])
    right.errorbar(
        aux,
        gains,
        yerr=[np.maximum(0, gains - intervals[:, 0]), np.maximum(0, intervals[:, 1] - gains)],
        fmt="o",
        capsize=4,
        label="gain (seed-bootstrap CI)",
    )
    line = np.linspace(0, aux.max(), 50)
    right.plot(line, report["ratio"] * line, "--", label=f"slope {report['ratio']:.3g} target / auxiliary")
    right.set_xlabel("auxiliary samples per class (N_y)")
    right.set_ylabel("equivalent extra target samples per class")
    right.set_title("What the auxiliary samples are worth")
    right.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
