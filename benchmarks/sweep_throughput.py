"""Configs per minute of a head-only sweep, one run: uml-ray one config per trial, uml-ray fused
(K = 16, 64), and a plain Optuna study in one Python process over in-memory data (the peer a
user would otherwise pick). Same space, same config count, same TPE seed; prints the best val
accuracy each found.

    python benchmarks/sweep_throughput.py [--manifest demo_work/fashion-mnist/manifest.yaml] [--configs 64]

Without --manifest it builds the Fashion-MNIST 4-shot case (about 90 s, cached afterwards).
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def plain_optuna(plan, space, configs: int) -> tuple[float, float]:
    """An Optuna TPE study in this process, each trial our Ray-free loop on in-memory tables."""
    import optuna

    from uml_ray.train.context import LocalContext
    from uml_ray.train.loop import train_supervised

    optuna.logging.set_verbosity(optuna.logging.WARNING)

    def objective(trial):
        params = {}
        for p in space.params:
            if p.type == "choice":
                params[p.key] = trial.suggest_categorical(p.key, p.values)
            else:
                params[p.key] = trial.suggest_float(p.key, p.low, p.high, log=p.log)
        trial_plan = plan.with_params(params)
        return train_supervised(trial_plan, LocalContext(trial_plan))["best_val_acc"]

    study = optuna.create_study(direction="maximize", sampler=optuna.samplers.TPESampler(seed=0))
    start = time.perf_counter()
    study.optimize(objective, n_trials=configs)
    return time.perf_counter() - start, study.best_value


def uml_sweep(plan, space, configs: int, fuse: int, name: str) -> tuple[float, float]:
    from uml_ray.driver import sweep

    start = time.perf_counter()
    outcome = sweep.run(plan, space, trials=configs, name=name, fuse=fuse)
    return time.perf_counter() - start, outcome.best_metrics["best_val_acc"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--manifest", default="")
    parser.add_argument("--configs", type=int, default=64)
    args = parser.parse_args()
    import ray

    from uml_ray.config import load_config
    from uml_ray.driver.plan import build_plan
    from uml_ray.search.space import load_space

    with tempfile.TemporaryDirectory() as workdir:
        manifest = args.manifest
        if not manifest:
            from uml_ray.cli import main as cli

            assert (
                cli(
                    [
                        "case",
                        "fashion-mnist",
                        "--out",
                        str(ROOT / "demo_work" / "fashion-mnist"),
                        "--shots",
                        "4",
                        "--split-seed",
                        "0",
                    ]
                )
                == 0
            )
            manifest = str(ROOT / "demo_work" / "fashion-mnist" / "manifest.yaml")
        cfg = load_config(
            ROOT / "configs" / "fashion_mnist.yaml",
            [
                f"data.manifest={manifest}",
                f"tracking.uri=sqlite:///{workdir}/mlflow.db",
                f"tracking.storage_path={workdir}/runs",
            ],
        )
        space = load_space(str(ROOT / "search_spaces" / "supervised_linear_probe.yaml"))
        plan = build_plan(cfg, space)
        figures = {"plain Optuna, one process": plain_optuna(plan, space, args.configs)}
        for fuse in (1, 16, 64):
            label = "uml-ray, one config per trial" if fuse == 1 else f"uml-ray, fused K={fuse}"
            figures[label] = uml_sweep(plan, space, args.configs, fuse, f"throughput-{fuse}")
        ray.shutdown()
    per_trial = args.configs / figures["uml-ray, one config per trial"][0]
    optuna_rate = args.configs / figures["plain Optuna, one process"][0]
    print(f"{args.configs} head-only configs, {os.cpu_count()} CPUs, {manifest}")
    print(
        f"  {'how':32s} {'wall':>8s} {'configs/min':>12s} {'vs per-trial':>13s} {'vs Optuna':>10s} "
        f"{'best val':>9s}"
    )
    for label, (seconds, best) in figures.items():
        rate = args.configs / seconds
        print(
            f"  {label:32s} {seconds:7.1f}s {rate * 60:12.1f} {rate / per_trial:12.2f}x "
            f"{rate / optuna_rate:9.2f}x {best:9.4f}"
        )


if __name__ == "__main__":
    main()
