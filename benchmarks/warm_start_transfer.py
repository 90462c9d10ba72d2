"""Warm start across tasks, one run per seed: a cold TPE sweep on the target split against one warm-started
from a sweep on another split (``--warm-start``, transfer), on the same target, same config count.

For each sweep the configs are taken in the order they were handed out (trial, then fused member) and,
after each, the config the sweep would return so far (the best completed one by ``selection_key``, as the
sweep summary picks) and its test accuracy. Compute is trained optimizer steps (a config stopped at a
halving rung counts the steps it trained). Prints, per seed, the cold sweep's final test accuracy and
compute, and the configs and compute the warm sweep needed to return a config at least as good on test
(the issue's target: at most 25 % of the cold sweep's compute), with the ratio.

    python benchmarks/warm_start_transfer.py --source demo_work/fashion-mnist/manifest.yaml \\
        --target demo_work/fashion-mnist-s1/manifest.yaml [--configs 64] [--top 8] [--seeds 0,1,2]

Both manifests from ``uml-ray case fashion-mnist --out DIR --shots 4 --split-seed S`` (S = 0 and 1).
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from uml_ray.selection import selection_key

ROOT = Path(__file__).resolve().parents[1]
EXPERIMENT = "warm-bench"


def sweep(workdir: Path, manifest: str, name: str, configs: int, seed: int, *flags: str) -> None:
    from uml_ray.cli import main

    if (workdir / "runs" / name / "tuner.pkl").exists():  # kept from an earlier run in --workdir
        return
    overrides = [
        f"data.manifest={Path(manifest).resolve()}",
        f"tracking.uri=sqlite:///{workdir / 'mlflow.db'}",
        f"tracking.storage_path={workdir / 'runs'}",
        f"tracking.experiment={EXPERIMENT}",
        f"train.seed={seed}",
    ]
    space = str(ROOT / "search_spaces" / "supervised_linear_probe.yaml")
    args = ["tune", str(ROOT / "configs" / "fashion_mnist.yaml"), *overrides, "--space", space]
    assert main([*args, "--trials", str(configs), "--name", name, *flags]) == 0


def handed_order(workdir: Path, name: str) -> list[dict]:
    """The sweep's configs in the order handed out: metrics, outcome and sampled params of each."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{workdir / 'mlflow.db'}")
    experiment = client.get_experiment_by_name(EXPERIMENT).experiment_id
    runs = client.search_runs(
        [experiment], f"tags.`uml_ray.sweep` = '{name}' and tags.`uml_ray.kind` = 'trial'", max_results=5000
    )

    # Tune's trial ids are random: a trial's place is when it started (its first run), then the member
    started: dict[str, int] = {}
    for run in runs:
        trial = run.data.tags.get("uml_ray.fused_trial") or run.data.tags["uml_ray.trial_id"]
        started[trial] = min(started.get(trial, run.info.start_time), run.info.start_time)

    def order(run):
        trial = run.data.tags.get("uml_ray.fused_trial") or run.data.tags["uml_ray.trial_id"]
        member = run.data.tags["uml_ray.trial_id"].rpartition("-m")[2]
        return started[trial], int(member) if member.isdigit() else 0

    return [
        {
            "metrics": dict(r.data.metrics),
            "completed": r.data.tags.get("uml_ray.outcome") in ("finished", "stopped_early"),
            "params": json.loads(r.data.tags["uml_ray.sampled"]),
        }
        for r in sorted(runs, key=order)
    ]


def anytime(rows: list[dict]) -> list[tuple[int, float]]:
    """After each config: (cumulative trained steps, test accuracy of the config the sweep returns)."""
    curve, steps, best = [], 0, None
    for row in rows:
        steps += int(row["metrics"].get("step", 0))
        if row["completed"] and (
            best is None
            or selection_key(row["metrics"], "selection_score") > selection_key(best, "selection_score")
        ):
            best = row["metrics"]
        curve.append((steps, best.get("test_acc", float("nan")) if best else float("nan")))
    return curve


def reach(curve: list[tuple[int, float]], goal: float) -> tuple[int, int] | None:
    """(configs, steps) at which the returned config's test accuracy first reaches ``goal``."""
    for n, (steps, test) in enumerate(curve, 1):
        if test >= goal - 1e-9:
            return n, steps
    return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", required=True, help="manifest of the split the history comes from")
    parser.add_argument("--target", required=True, help="manifest of the split both compared sweeps train")
    parser.add_argument("--configs", type=int, default=64)
    parser.add_argument("--top", type=int, default=8, help="--warm-start-top")
    parser.add_argument(
        "--seeds", default="0", help="train.seed (and TPE seed) of each repeat, comma-separated"
    )
    parser.add_argument(
        "--workdir", default="", help="keep the MLflow store and runs here (sweeps already there are reused)"
    )
    args = parser.parse_args()
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="warm-bench-"))
    workdir.mkdir(parents=True, exist_ok=True)
    ratios = []
    for seed in [int(s) for s in args.seeds.split(",")]:
        sweep(workdir, args.source, f"source-{seed}", args.configs, seed)
        sweep(workdir, args.target, f"cold-{seed}", args.configs, seed)
        warm_flags = ("--warm-start", f"{EXPERIMENT}:source-{seed}", "--warm-start-top", str(args.top))
        sweep(workdir, args.target, f"warm-{seed}", args.configs, seed, *warm_flags)
        cold, warm = (
            anytime(handed_order(workdir, f"cold-{seed}")),
            anytime(handed_order(workdir, f"warm-{seed}")),
        )
        goal, total = cold[-1][1], cold[-1][0]
        cold_first, warm_first = reach(cold, goal), reach(warm, goal)
        print(
            f"seed {seed}: cold final test {goal:.4f} after {len(cold)} configs / {total} steps "
            f"(first reached at {cold_first[0]} configs / {cold_first[1]} steps); "
            f"warm final test {warm[-1][1]:.4f}",
            flush=True,
        )
        marks = [n for n in (1, 4, 8, 16, 32, 64, len(cold)) if n <= min(len(cold), len(warm))]
        for label, curve in (("cold", cold), ("warm", warm)):
            shown = ", ".join(
                f"{n}: {curve[n - 1][1]:.4f} ({curve[n - 1][0]} steps)" for n in dict.fromkeys(marks)
            )
            print(f"seed {seed}: {label} test of the returned config after n configs: {shown}", flush=True)
        if warm_first is None:
            print(f"seed {seed}: warm never reached {goal:.4f} in {len(warm)} configs", flush=True)
            ratios.append(float("inf"))
            continue
        ratio = warm_first[1] / total
        ratios.append(ratio)
        print(
            f"seed {seed}: warm reached {goal:.4f} after {warm_first[0]} configs / {warm_first[1]} steps = "
            f"{ratio:.1%} of the cold sweep's compute (target <= 25%)",
            flush=True,
        )
    print(f"compute ratios warm/cold: {', '.join(f'{r:.1%}' for r in ratios)}; workdir {workdir}")


if __name__ == "__main__":
    main()
