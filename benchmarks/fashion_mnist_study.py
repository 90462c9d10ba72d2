"""UML vs image-only on the real offline Fashion-MNIST + WordNet case, at 1, 4 and 16 shots.

For each shot count: a small UML sweep (Optuna TPE + ASHA) on split seed 0 picks the best config;
then, on split seeds 0, 1, 2, that config is trained with the text (UML) and without it
(``train.alpha_default=0``, image-only, same other hyperparameters). Prints test accuracy per
seed, the means and the UML - image-only difference, measured in one run.

    python benchmarks/fashion_mnist_study.py [--workdir demo_work/study] [--trials 8]
"""

from __future__ import annotations

import argparse
import os

import numpy as np

CONFIG = os.path.join(os.path.dirname(__file__), "..", "configs", "fashion_mnist.yaml")
SPACE = os.path.join(os.path.dirname(__file__), "..", "search_spaces", "supervised_linear_probe.yaml")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", default="demo_work/study")
    parser.add_argument("--trials", type=int, default=8)
    parser.add_argument("--shots", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    args = parser.parse_args()
    import ray

    from uml_ray.cluster import start_local_ray
    from uml_ray.config import apply_overrides, load_config
    from uml_ray.encoders.cases import build_fashion_mnist_case
    from uml_ray.driver import tune
    from uml_ray.driver.plan import build_plan
    from uml_ray.search.space import load_space

    workdir = os.path.abspath(args.workdir)
    start_local_ray(2)
    space = load_space(SPACE)
    tracking = [f"tracking.uri=sqlite:///{workdir}/mlflow.db", f"tracking.storage_path={workdir}/runs",
                "tracking.experiment=fashion-mnist-study"]
    table = []
    for shots in args.shots:
        manifests = {seed: build_fashion_mnist_case(os.path.join(workdir, f"case-{shots}shot-seed{seed}"), shots, seed)["manifest"]
                     for seed in args.seeds}
        base = load_config(CONFIG, [f"data.manifest={manifests[args.seeds[0]]}", *tracking])
        sweep = tune.run(build_plan(base, space), space, trials=args.trials, name=f"study-{shots}shot-sweep")
        best = sweep.best_config
        uml, image_only = [], []
        for seed in args.seeds:
            cfg = apply_overrides(base, {**best, "data.manifest": manifests[seed]})
            for alpha, scores in ((None, uml), (0.0, image_only)):
                run_cfg = cfg if alpha is None else apply_overrides(cfg, {"train.alpha_default": 0.0, "train.alpha": {}})
                name = f"study-{shots}shot-seed{seed}-{'uml' if alpha is None else 'image-only'}"
                scores.append(tune.run(build_plan(run_cfg), name=name).best_metrics["test_acc"])
        table.append((shots, best, uml, image_only))
        print(f"[{shots}-shot] best config {best}\n  UML {uml}\n  image-only {image_only}", flush=True)
    ray.shutdown()
    print("\nFashion-MNIST (EfficientNet-Lite0 features) + WordNet/template text (MiniLM), test accuracy")
    print(f"{'shots':>5}  {'UML (per seed)':32s} {'image-only (per seed)':32s} {'UML mean':>9} {'img mean':>9} {'diff':>7}")
    for shots, best, uml, image_only in table:
        print(f"{shots:5d}  {str([round(u, 3) for u in uml]):32s} {str([round(b, 3) for b in image_only]):32s} "
              f"{np.mean(uml):9.3f} {np.mean(image_only):9.3f} {np.mean(uml) - np.mean(image_only):+7.3f}")
    for shots, best, _, _ in table:
        print(f"best config at {shots} shots: {best}")


if __name__ == "__main__":
    main()
