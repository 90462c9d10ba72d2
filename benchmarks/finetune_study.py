"""Fine-tuned UML vs fine-tuned image-only vs linear-probe image-only on the real Fashion-MNIST case.

For each shot count and split seed: EfficientNet-Lite0 (packaged ImageNet weights) fine-tuned
under the shared head with the MiniLM text (UML, ``configs/fashion_mnist_finetune.yaml``), the
same after a linear probe of the head (LP-FT, ``model.head_init=probe``), fine-tuned without the
text (``train.alpha_default=0``), and a linear probe of the same backbone's frozen features
at the same input size (``configs/fashion_mnist.yaml``, image-only). Every run goes through
``uml-ray train`` into MLflow; prints test accuracy (at the best-val point) per seed and the means.
No search: the configs' own hyperparameters, the same for every arm.

    python benchmarks/finetune_study.py [--workdir demo_work/finetune-study --shots 4 16 \
        --seeds 0 1 2 --size 64]
"""

from __future__ import annotations

import argparse
import json
import os
import time

import numpy as np

ROOT = os.path.join(os.path.dirname(__file__), "..")
FINETUNE = os.path.join(ROOT, "configs", "fashion_mnist_finetune.yaml")
PROBE = os.path.join(ROOT, "configs", "fashion_mnist.yaml")
ARMS = ("finetune_uml", "lpft_uml", "finetune_image_only", "probe_image_only")


def train(config: str, overrides: list[str], name: str) -> dict:
    """One ``uml-ray train`` run; its printed summary."""
    import contextlib
    import io

    from uml_ray.cli import main as cli

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert cli(["train", config, *overrides, "--name", name]) == 0, name
    return json.loads([line for line in out.getvalue().splitlines() if line.startswith("{")][-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", default="demo_work/finetune-study")
    parser.add_argument("--shots", type=int, nargs="+", default=[4, 16])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument(
        "--size", type=int, default=64, help="input size of both the fine-tuned and the probed backbone"
    )
    parser.add_argument("--cache-dir", default=None, help="feature cache (default: <workdir>/.feature-cache)")
    parser.add_argument("--arms", nargs="+", default=list(ARMS), choices=list(ARMS), help="which arms to run")
    args = parser.parse_args()
    from uml_ray.cluster import start_local_ray
    from uml_ray.encoders.cases import build_fashion_mnist_case

    workdir = os.path.abspath(args.workdir)
    cache = args.cache_dir or os.path.join(workdir, ".feature-cache")
    start_local_ray(2)
    common = [f"tracking.uri=sqlite:///{workdir}/mlflow.db", f"tracking.storage_path={workdir}/runs"]
    arms = {arm: [] for arm in args.arms}
    for shots in args.shots:
        for seed in args.seeds:
            images = build_fashion_mnist_case(
                f"{workdir}/ft-{shots}-{seed}", shots, seed, regime="finetune", cache_dir=cache
            )["manifest"]
            features = build_fashion_mnist_case(
                f"{workdir}/lp-{shots}-{seed}", shots, seed, image_size=args.size, cache_dir=cache
            )["manifest"]
            runs = {
                "finetune_uml": (FINETUNE, [f"data.manifest={images}", f"model.image_size={args.size}"]),
                "lpft_uml": (
                    FINETUNE,
                    [f"data.manifest={images}", f"model.image_size={args.size}", "model.head_init=probe"],
                ),
                "finetune_image_only": (
                    FINETUNE,
                    [f"data.manifest={images}", f"model.image_size={args.size}", "train.alpha_default=0"],
                ),
                "probe_image_only": (PROBE, [f"data.manifest={features}", "train.alpha_default=0"]),
            }
            for arm in args.arms:
                config, overrides = runs[arm]
                started = time.perf_counter()
                result = train(config, common + overrides, f"{arm}-{shots}shot-seed{seed}")
                arms[arm].append(
                    {
                        "shots": shots,
                        "seed": seed,
                        "test_acc": result["test_acc"],
                        "seconds": round(time.perf_counter() - started, 1),
                    }
                )
                print(json.dumps({"arm": arm, **arms[arm][-1]}), flush=True)
    for shots in args.shots:
        summary = {arm: [r["test_acc"] for r in rows if r["shots"] == shots] for arm, rows in arms.items()}
        print(
            json.dumps(
                {
                    "shots": shots,
                    **{
                        arm: {"per_seed": accs, "mean": round(float(np.mean(accs)), 4)}
                        for arm, accs in summary.items()
                    },
                }
            )
        )


if __name__ == "__main__":
    main()
