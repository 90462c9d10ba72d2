"""How well each searcher spends compute: the test accuracy of the config it would return vs the
compute it spent, over search seeds, on tabular replays of real grids (``search_table.py``,
``search_replay.py``, ``replayed_searchers.py``).

    python benchmarks/search_efficiency.py [--cases fashion-4shot synthetic sequence] [--seeds 10]
    python benchmarks/search_efficiency.py --check   # one real uml-ray TPE sweep vs its replay

Prints, per case, each searcher's mean test accuracy (95 % bootstrap interval over the seeds) at
10 / 30 / 100 % of the exhaustive grid's compute and the compute it needs to come within 1 point of
the oracle (the grid's best test accuracy); writes a PNG of the anytime curves per case and
``search_efficiency.json`` under benchmarks/results/. Tables are built once (minutes) and reused.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from replayed_searchers import run_grid, run_optuna, run_tune_random, run_umlray  # noqa: E402
from search_replay import Table, final  # noqa: E402
from search_table import CASES, ROOT, WORK, build_case_plan, load_table, sweep_rows  # noqa: E402
from warm_replay import warm_from  # noqa: E402

from uml_ray.selection import SCORE, selection_key  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
FRACTIONS = (0.1, 0.3, 1.0)
WITHIN = 0.01  # "within 1 point of the oracle"
SEARCHERS = (
    "uml-ray default (TPE)",
    "uml-ray random",
    "uml-ray grid",
    "uml-ray warm-started",
    "Optuna TPE + Hyperband",
    "Ray Tune random + ASHA",
)


def run_case(name: str, seeds: int) -> dict:
    """Every searcher × seed on the case's table: their ledgers' events (cached beside the table's
    sweep, reused for the same table and seeds)."""
    case = CASES[name]
    table = Table.from_json(load_table(name))
    cache = WORK / f"events-{name}-{seeds}.json"
    if cache.exists() and (held := json.loads(cache.read_text()))["grid_steps"] == table.grid_steps:
        return {"table": table, "runs": held["runs"], "cold_steps": held["cold_steps"]}
    outcome = _run_searchers(name, case, table, seeds)
    cache.parent.mkdir(parents=True, exist_ok=True)
    cache.write_text(
        json.dumps({"grid_steps": table.grid_steps, **{k: outcome[k] for k in ("runs", "cold_steps")}})
    )
    return outcome


def _run_searchers(name: str, case, table: Table, seeds: int) -> dict:
    """Every searcher × seed on the table (the warm start seeded from the next seed's default)."""
    plan, space = build_case_plan(case, WORK / name, "tpe", 0)
    budget = table.grid_steps
    grid = run_grid(table, plan, space, budget)
    runs: dict[str, list] = {label: [] for label in SEARCHERS}
    defaults = [run_umlray(table, plan, space, "tpe", seed, budget) for seed in range(seeds)]
    for seed, default in enumerate(defaults):
        # the warm start's source: another seed's default sweep
        source = defaults[(seed + 1) % seeds]
        warm = run_umlray(table, plan, space, "tpe", seed, budget, warm=warm_from(source))
        runs["uml-ray default (TPE)"].append(default.events)
        runs["uml-ray random"].append(run_umlray(table, plan, space, "random", seed, budget).events)
        runs["uml-ray grid"].append(grid.events)
        runs["uml-ray warm-started"].append(warm.events)
        runs["Optuna TPE + Hyperband"].append(run_optuna(table, case.grid, seed, budget).events)
        runs["Ray Tune random + ASHA"].append(run_tune_random(table, space, seed, budget).events)
        print(f"  {name}: seed {seed} done", flush=True)
    cold_steps = [default.steps for default in defaults]
    return {"table": table, "runs": runs, "cold_steps": cold_steps}


def value_at(events: list, steps: float) -> float:
    """The returned config's test accuracy once ``steps`` are spent (NaN before any config completed)."""
    value = math.nan
    for spent, _, test, _ in events:
        if spent > steps:
            break
        value = test
    return value


def reach(events: list, target: float) -> tuple[float, float]:
    """(steps, wall seconds) at which the returned config first scores ``target`` or more (inf: never)."""
    for spent, wall, test, _ in events:
        if test >= target - 1e-9:
            return spent, wall
    return math.inf, math.inf


def found_selected(events: list, table: Table) -> float:
    """Steps at which the search first returns the grid's val-selected config, or one the val split
    ranks equal to it (same selection key; inf: never)."""
    target = selection_key(final(table.selected()), SCORE)
    for spent, _, _, returned in events:
        if selection_key(final(table.row(returned)), SCORE) == target:
            return spent
    return math.inf


def interval(values: list[float], resamples: int = 2000) -> tuple[float, float, float]:
    """Mean and 95 % percentile-bootstrap interval of the mean (NaN when a seed has no value yet)."""
    data = np.asarray(values, dtype=float)
    if np.isnan(data).any():
        return math.nan, math.nan, math.nan
    rng = np.random.default_rng(0)
    means = rng.choice(data, size=(resamples, len(data))).mean(axis=1)
    return float(data.mean()), float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))


def summarize(name: str, outcome: dict) -> dict:
    """The case's figures: oracle, the grid's val-selected test accuracy, each searcher's accuracy at
    the compute fractions, its compute to come within 1 point of the oracle, and the warm start's
    compute to reach the cold sweep's final accuracy."""
    table, runs = outcome["table"], outcome["runs"]
    budget = table.grid_steps
    oracle = table.oracle
    figures = {}
    for label, seeds in runs.items():
        at_fraction = {
            f"{f:g}": interval([value_at(events, f * budget) for events in seeds]) for f in FRACTIONS
        }
        reached = [reach(events, oracle - WITHIN) for events in seeds]
        found = [found_selected(events, table) for events in seeds]
        figures[label] = {
            "at_fraction": at_fraction,
            # compute until it returns the exhaustive grid's val-selected config: the best a search
            # that selects on validation can end with
            "finds_selected_fraction_median": float(np.median(found)) / budget,
            "seeds_finding_selected": sum(1 for f in found if math.isfinite(f)),
            "reach_fraction_median": float(np.median([r[0] for r in reached])) / budget,
            "reach_wall_s_median": float(np.median([r[1] for r in reached])),
            "seeds_reaching": sum(1 for r in reached if math.isfinite(r[0])),
        }
    cold, warm = runs["uml-ray default (TPE)"], runs["uml-ray warm-started"]
    warm_fractions = [reach(w, c[-1][2])[0] / steps for c, w, steps in zip(cold, warm, outcome["cold_steps"])]
    return {
        "case": name,
        "configs": len(table.rows),
        "seeds": len(outcome["cold_steps"]),
        "grid_steps": budget,
        "oracle_test_acc": oracle,
        "grid_selected_test_acc": table.selected()["test_acc"],
        "grid_selected_params": table.selected()["params"],
        "seconds_per_step": table.seconds_per_step,
        "trial_overhead_s": table.trial_overhead_s,
        "searchers": figures,
        "warm_to_cold_final_fraction": {
            "median": float(np.median(warm_fractions)),
            "per_seed": warm_fractions,
        },
    }


def plot(name: str, outcome: dict, summary: dict, path: Path) -> None:
    """The anytime curves: mean returned test accuracy (band: 95 % interval) vs fraction of the grid's
    compute, with the oracle and the grid's val-selected config."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    budget = outcome["table"].grid_steps
    xs = np.geomspace(0.01, 1.0, 60)
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for label, seeds in outcome["runs"].items():
        points = [interval([value_at(events, x * budget) for events in seeds], 500) for x in xs]
        mean = np.array([p[0] for p in points])
        ax.plot(xs, mean, label=label, linestyle="--" if "grid" in label else "-")
        ax.fill_between(xs, [p[1] for p in points], [p[2] for p in points], alpha=0.15)
    ax.axhline(summary["oracle_test_acc"], color="k", linewidth=1, label="oracle (grid's best test acc)")
    ax.axhline(
        summary["grid_selected_test_acc"], color="k", linestyle=":", label="grid's val-selected config"
    )
    ax.set_xscale("log")
    ax.set_xlabel(f"compute: fraction of the exhaustive grid's {budget} config-steps")
    ax.set_ylabel("test accuracy of the returned config")
    ax.set_title(f"{name}: {summary['configs']} configs, {len(next(iter(outcome['runs'].values())))} seeds")
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def print_summary(summary: dict) -> None:
    """One case's table on the console."""
    print(
        f"\n{summary['case']}: {summary['configs']} configs, grid {summary['grid_steps']} config-steps "
        f"({summary['seconds_per_step'] * 1e3:.3f} ms/step + {summary['trial_overhead_s']:.2f} s/trial); "
        f"oracle test {summary['oracle_test_acc']:.4f}, "
        f"grid's val-selected {summary['grid_selected_test_acc']:.4f}"
    )
    heads = "".join(f"{f'@{f:.0%}':>22s}" for f in FRACTIONS)
    print(
        f"  {'searcher':26s}{heads}   within 1 pt of oracle: compute (median), wall, seeds"
        "  | returns the grid's val-selected config: compute (median), seeds"
    )
    for label, fig in summary["searchers"].items():
        cells = ""
        for f in FRACTIONS:
            mean, low, high = fig["at_fraction"][f"{f:g}"]
            cells += f"{'—':>22s}" if math.isnan(mean) else f"{mean:10.4f} [{low:.3f},{high:.3f}]"
        share = fig["reach_fraction_median"]
        reached = (
            f"{share:6.1%} {fig['reach_wall_s_median']:8.1f}s" if math.isfinite(share) else "   never        "
        )
        found = fig["finds_selected_fraction_median"]
        found = f"{found:6.1%}" if math.isfinite(found) else " never"
        print(
            f"  {label:26s}{cells}   {reached}  {fig['seeds_reaching']}/{summary['seeds']}"
            f"  | {found} {fig['seeds_finding_selected']}/{summary['seeds']}"
        )
    warm = summary["warm_to_cold_final_fraction"]["median"]
    print(f"  warm-started reaches the cold default's final test acc at {warm:.1%} of its compute (median)")


def check(seed: int = 0) -> int:
    """One real uml-ray TPE sweep of the synthetic case's grid space vs its replay on the table: the
    same returned config and test accuracy, and the configs it trained with the table's test accuracy."""
    name = "synthetic"
    table = Table.from_json(load_table(name))
    workdir = WORK / name / f"check-{int(time.time())}"
    workdir.mkdir(parents=True)
    rows, wall, outcome = sweep_rows(CASES[name], workdir, f"check-{seed}", "tpe", seed)
    plan, space = build_case_plan(CASES[name], workdir, "tpe", seed)
    replay = run_umlray(table, plan, space, "tpe", seed, table.grid_steps)
    real_test = outcome.best_metrics["test_acc"]
    _, replay_wall, replay_test, replay_params = replay.events[-1]
    gaps = [abs(r["test_acc"] - table.row(r["params"])["test_acc"]) for r in rows if r["completed"]]
    same = outcome.best_config == replay_params and abs(real_test - replay_test) < 1e-9
    print(
        f"real sweep:  {len(rows)} configs, {sum(r['steps'] for r in rows)} config-steps, {wall:.1f} s wall"
    )
    print(
        f"replay:      {len(replay.completed)} completed, {replay.steps} config-steps, "
        f"{replay_wall:.1f} s charged"
    )
    print(f"real returns   {outcome.best_config} test {real_test:.4f}")
    print(f"replay returns {replay_params} test {replay_test:.4f}")
    print(f"completed configs: max |test acc real - table| = {max(gaps):.2e} over {len(gaps)}")
    print("fidelity:", "same config and test accuracy" if same else "DIFFERENT")
    return 0 if same else 1


def strict(value):
    """``value`` with every NaN or infinity as None (JSON has neither)."""
    if isinstance(value, dict):
        return {k: strict(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [strict(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    parser.add_argument("--seeds", type=int, default=10)
    parser.add_argument("--check", action="store_true", help="a real sweep vs its replay, then exit")
    parser.add_argument("--build-only", action="store_true", help="build the cases' tables, then exit")
    parser.add_argument("--out", default=str(RESULTS))
    args = parser.parse_args()
    if args.check:
        return check()
    if args.build_only:
        for name in args.cases:
            load_table(name)
        return 0
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    written = out / "search_efficiency.json"
    # cases run before (another --cases) stay in the report
    report = json.loads(written.read_text()) if written.exists() else {"cases": {}}
    report.update(date=time.strftime("%Y-%m-%d"), cpus=os.cpu_count(), seeds=args.seeds)
    for name in args.cases:
        outcome = run_case(name, args.seeds)
        summary = summarize(name, outcome)
        plot(name, outcome, summary, out / f"search_efficiency_{name}.png")
        print_summary(summary)
        report["cases"][name] = summary
        written.write_text(json.dumps(strict(report), indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
