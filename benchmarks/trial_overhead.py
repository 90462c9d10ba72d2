"""Per-trial overhead of a uml-ray sweep vs a bare Ray Tune function trial, measured in one run.

A one-worker uml-ray trial trains inside the Tune trial process (no TorchTrainer); this prints
what that saves against the TorchTrainer path, as ratios to a bare function trial that only
reports once. Training is cut to a handful of steps so the figures are start-up costs.

    python benchmarks/trial_overhead.py [--trials 3]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time


def bare_trial(config):
    from ray import tune

    tune.report({"best_val_acc": 1.0})


def time_bare(trials: int, storage: str) -> float:
    from ray import tune

    tuner = tune.Tuner(
        tune.with_resources(bare_trial, {"CPU": 1}),
        param_space={"i": tune.grid_search(list(range(trials)))},
        tune_config=tune.TuneConfig(max_concurrent_trials=1),
        run_config=tune.RunConfig(name="bare", storage_path=storage, verbose=0),
    )
    start = time.perf_counter()
    tuner.fit()
    return (time.perf_counter() - start) / trials


def time_uml(trials: int, workdir: str, manifest: str, trainer: str) -> float:
    from uml_ray.config import load_config
    from uml_ray.driver import sweep
    from uml_ray.driver.plan import build_plan
    from uml_ray.search.space import load_space

    space_file = os.path.join(workdir, f"space-{trainer}.yaml")
    with open(space_file, "w") as handle:
        handle.write("params:\n  train.lr: {type: loguniform, low: 1.0e-3, high: 1.0e-2}\n")
    cfg = load_config(
        None,
        [
            f"data.manifest={manifest}",
            "train.max_steps=4",
            "train.warmup_steps=1",
            "train.val_every=4",
            f"tracking.uri=sqlite:///{workdir}/mlflow.db",
            f"tracking.storage_path={workdir}/runs",
            f"resources.trainer={trainer}",
            "resources.num_workers=1",
            "resources.cpus_per_worker=1",
        ],
    )
    space = load_space(space_file)
    plan = build_plan(cfg, space)
    start = time.perf_counter()
    sweep.run(plan, space, trials=trials, concurrency=1, name=f"overhead-{trainer}", fuse=1)
    return (time.perf_counter() - start) / trials


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=3)
    parser.add_argument(
        "--no-torchtrainer",
        action="store_true",
        help="leave out the TorchTrainer path (it hangs when another local Ray runs on this host)",
    )
    args = parser.parse_args()
    import ray

    from uml_ray.cluster import start_local_ray
    from uml_ray.data.synth import write_synthetic

    with tempfile.TemporaryDirectory() as workdir:
        manifest = write_synthetic(os.path.join(workdir, "data"), seed=0)
        start_local_ray(2)
        bare = time_bare(args.trials, os.path.join(workdir, "runs"))
        inline = time_uml(args.trials, workdir, manifest, "inline")
        train = None if args.no_torchtrainer else time_uml(args.trials, workdir, manifest, "ray_train")
        ray.shutdown()
    print(f"per-trial wall time over {args.trials} sequential trials (2 CPUs):")
    print(f"  bare Tune function trial        {bare:7.2f} s   1.00x")
    print(f"  uml-ray trial, inline (1 worker) {inline:7.2f} s   {inline / bare:5.2f}x")
    if train is not None:
        print(f"  uml-ray trial, TorchTrainer(1)  {train:7.2f} s   {train / bare:5.2f}x")
        print(
            f"  inline saves {train - inline:.1f} s per trial ({train / inline:.1f}x faster start-up than "
            "TorchTrainer)"
        )


if __name__ == "__main__":
    main()
