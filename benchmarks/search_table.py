"""The tabular benchmark's tables: every config of a case's discrete grid trained once for real by a
uml-ray grid sweep, its validation curve and test accuracy read back from MLflow, cached as JSON.

A table row is one config: its params, the step of every validation with the best-so-far val
accuracy, val loss and selection score there (what the loop reports, what ASHA and halving compare),
the steps it trained, and its test accuracy (scored at its best-val point, as every completed run
is). Beside the rows: the case's seconds per config-step and per-trial overhead, measured on the same
sweep (``measure_costs``).

    python benchmarks/search_efficiency.py --build-only   # builds the tables the benchmark needs
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TABLES = ROOT / "benchmarks" / "results" / "tables"
WORK = ROOT / "demo_work" / "search_efficiency"


@dataclass
class Case:
    """One benchmark case: its recipe config, data, the grid's values per searched key, and the base
    config's overrides (the data and where the table's sweep is tracked are added here)."""

    name: str
    config: str
    manifest: str
    grid: dict[str, list]
    build: list[str]  # the command that builds its data (uml-ray CLI arguments), run when the data is missing
    overrides: list[str] = field(default_factory=list)


SUPERVISED_GRID = {
    "train.alpha.text": [0.0, 0.5, 1.0, 1.5],
    "train.lr": [1.0e-4, 3.0e-4, 1.0e-3, 3.0e-3, 1.0e-2],
    "train.weight_decay": [0.0, 0.001, 0.01],
    "model.head_init": ["random", "text"],
}

CASES = {
    "fashion-4shot": Case(
        "fashion-4shot",
        "configs/fashion_mnist.yaml",
        "demo_work/fashion-mnist/manifest.yaml",
        SUPERVISED_GRID,
        ["case", "fashion-mnist", "--out", "demo_work/fashion-mnist", "--shots", "4", "--split-seed", "0"],
    ),
    "synthetic": Case(
        "synthetic",
        "configs/synthetic.yaml",
        "demo_work/synthetic/manifest.yaml",
        SUPERVISED_GRID,
        ["data", "synth", "demo_work/synthetic"],
    ),
    "sequence": Case(
        "sequence",
        "configs/sequence_fashion.yaml",
        "demo_work/fashion-seq/manifest.yaml",
        {"model.zdim": [20, 40], "train.step_k": [-1, 1, 4], "train.lr": [1.0e-4, 3.0e-4, 1.0e-3]},
        ["case", "fashion-mnist-rows", "--out", "demo_work/fashion-seq"]
        + ["--train-per-class", "100", "--val-per-class", "50", "--test-per-class", "100"],
        # a transformer config took over a minute on the shared 2-core machine: 200 steps (4 validations)
        ["train.max_steps=200"],
    ),
}


def build_case_plan(case: Case, workdir: Path, searcher: str = "grid", seed: int = 0):
    """The case's run plan and its grid as a SearchSpace of choices (``searcher``: grid, tpe or
    random), tracked under ``workdir``."""
    from uml_ray.config import load_config
    from uml_ray.driver.plan import build_plan
    from uml_ray.search.space import Param, SearchSpace

    if not (ROOT / case.manifest).exists():
        from uml_ray.cli import main as cli

        if cli(case.build) != 0:
            raise SystemExit(f"building {case.manifest} failed")
    space = SearchSpace(
        [Param(key, "choice", values=list(values)) for key, values in case.grid.items()],
        recipe="sequence" if "sequence" in case.config else "supervised",
        source=f"{case.name} grid",
        searcher=searcher,
    )
    cfg = load_config(
        ROOT / case.config,
        [
            f"data.manifest={ROOT / case.manifest}",
            f"tracking.uri=sqlite:///{workdir}/mlflow.db",
            f"tracking.storage_path={workdir}/runs",
            f"train.seed={seed}",
            *case.overrides,
        ],
    )
    return build_plan(cfg, space), space


def _curve(mlflow_client, run_id: str, key: str) -> dict[int, float]:
    return {m.step: m.value for m in mlflow_client.get_metric_history(run_id, key)}


def read_rows(uri: str, experiment: str, sweep: str) -> list[dict]:
    """Every trial run of ``sweep``: params, validation curve, steps, test accuracy, and which Tune
    trial trained it with the trial's start and end (ms)."""
    from uml_ray.tracking.store import client
    from uml_ray.tracking.tags import FUSED_TRIAL_TAG, KIND_TAG, SAMPLED_TAG, SWEEP_TAG, TRIAL_TAG

    mlflow_client = client(uri)
    exp = mlflow_client.get_experiment_by_name(experiment)
    runs = mlflow_client.search_runs(
        [exp.experiment_id],
        filter_string=f"tags.`{SWEEP_TAG}` = '{sweep}' and tags.`{KIND_TAG}` = 'trial'",
        max_results=10000,
    )
    rows = []
    for run in runs:
        acc = _curve(mlflow_client, run.info.run_id, "best_val_acc")
        loss = _curve(mlflow_client, run.info.run_id, "best_val_loss")
        score = _curve(mlflow_client, run.info.run_id, "selection_score")
        steps = sorted(acc)
        rows.append(
            {
                "params": json.loads(run.data.tags[SAMPLED_TAG]),
                "val_steps": steps,
                "best_val_acc": [acc[s] for s in steps],
                "best_val_loss": [loss[s] for s in steps],
                "selection_score": [score[s] for s in steps],
                "steps": steps[-1],
                "completed": int(run.data.metrics.get("completed", 0)),
                "test_acc": run.data.metrics.get("test_acc"),  # none for a pruned run
                "val_rows": int(run.data.metrics.get("val_rows", 0)),
                "tune_trial": run.data.tags.get(FUSED_TRIAL_TAG) or run.data.tags[TRIAL_TAG],
                "start_ms": run.info.start_time,
                "end_ms": run.info.end_time,
            }
        )
    return rows


def measure_costs(rows: list[dict], wall_s: float) -> dict:
    """Seconds per config-step (the Tune trials' own time over the config-steps they trained; a fused
    trial's members share its time) and the per-trial overhead (the rest of the sweep's wall time,
    Ray and MLflow and Tune's bookkeeping, over its Tune trials)."""
    trials: dict[str, list[int]] = {}
    for row in rows:
        span = trials.setdefault(row["tune_trial"], [row["start_ms"], row["end_ms"]])
        span[0], span[1] = min(span[0], row["start_ms"]), max(span[1], row["end_ms"])
    train_s = sum(end - start for start, end in trials.values()) / 1000.0
    config_steps = sum(row["steps"] for row in rows)
    return {
        "sweep_wall_s": wall_s,
        "tune_trials": len(trials),
        "seconds_per_step": train_s / config_steps,
        "trial_overhead_s": max(wall_s - train_s, 0.0) / len(trials),
    }


def sweep_rows(case: Case, workdir: Path, name: str, searcher: str, seed: int, trials: int = 0):
    """Run a real uml-ray sweep of the case's grid space (``searcher`` grid, tpe or random) one trial
    at a time; returns (rows read back from MLflow, its wall seconds, the sweep's outcome)."""
    import ray

    from uml_ray.driver import sweep

    plan, space = build_case_plan(case, workdir, searcher, seed)
    sweep.init_ray(plan)  # Ray's start is not the sweep's cost
    start = time.perf_counter()
    outcome = sweep.run(plan, space, trials=trials or (space.size() or 1), concurrency=1, name=name)
    wall = time.perf_counter() - start
    rows = read_rows(plan.cfg.tracking.uri, plan.cfg.tracking.experiment, name)
    ray.shutdown()
    return rows, wall, outcome


def load_table(name: str) -> dict:
    """The case's table, built (a real grid sweep, minutes) when it is not cached."""
    path = TABLES / f"{name}.json"
    if path.exists():
        return json.loads(path.read_text())
    case = CASES[name]
    workdir = WORK / name
    workdir.mkdir(parents=True, exist_ok=True)
    rows, wall, _ = sweep_rows(case, workdir, f"table-{name}-{int(time.time())}", "grid", 0)
    table = {
        "case": name,
        "config": case.config,
        "manifest": case.manifest,
        "grid": case.grid,
        "built": time.strftime("%Y-%m-%d"),
        "costs": measure_costs(rows, wall),
        "rows": [{k: v for k, v in row.items() if k not in ("start_ms", "end_ms")} for row in rows],
    }
    TABLES.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(table))
    return table


if __name__ == "__main__":
    import sys

    for case_name in sys.argv[1:] or list(CASES):
        built = load_table(case_name)
        print(case_name, len(built["rows"]), "configs", built["costs"], flush=True)
