"""Rows/s of a linear head fed by uml-ray's BatchStream vs naive Ray Data and an in-memory loop.

All in one run, as ratios to the in-memory loop (the ceiling):
- in-memory: numpy arrays already in RAM, random batches;
- naive Ray Data: ``read_parquet → iter_torch_batches`` each epoch;
- BatchStream cached: the table read once by the driver and put in the object store (timed
  apart), every epoch of the trial from memory (uml-ray's default for datasets that fit
  ``data.cache_max_mb``);
- BatchStream streamed: every epoch read again with a shuffle buffer (large shares): by pyarrow
  with read-ahead in a one-process trial, through Ray Data (split across workers) in a multi-worker run.

    python benchmarks/stream_throughput.py [--rows 50000 --dim 512 --epochs 3]
"""

from __future__ import annotations

import argparse
import tempfile
import time

import numpy as np
import torch


def head_steps(batches, dim: int, epoch_rows: int, classes: int = 10) -> tuple[float, float]:
    """(rows/s over the whole run, rows/s after the first epoch): start-up cost vs steady state."""
    torch.manual_seed(0)
    head = torch.nn.Linear(dim, classes)
    optimizer = torch.optim.SGD(head.parameters(), lr=0.01)
    rows, start, after_first = 0, time.perf_counter(), None
    for features, labels in batches:
        features = torch.as_tensor(features)
        labels = torch.as_tensor(labels).long()
        loss = torch.nn.functional.cross_entropy(head(features), labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        rows += len(labels)
        if after_first is None and rows >= epoch_rows:
            after_first = (time.perf_counter(), rows)
    end = time.perf_counter()
    return rows / (end - start), (rows - after_first[1]) / (end - after_first[0])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=50000)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=256)
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.set_flush_denormal(True)
    import ray

    from uml_ray.cluster import start_local_ray
    from uml_ray.data.format import Manifest, ModalitySpec, write_shards
    from uml_ray.data.streams import (
        BatchStream,
        ParquetSource,
        StreamSpec,
        TableSource,
        build_streamed_datasets,
        read_table,
    )

    rng = np.random.default_rng(0)
    features = rng.normal(size=(args.rows, args.dim)).astype(np.float32)
    labels = rng.integers(0, 10, args.rows)
    with tempfile.TemporaryDirectory() as workdir:
        uris = write_shards(workdir, "image", "train", features, labels, rows_per_shard=8192)
        manifest = Manifest(
            "bench",
            [str(i) for i in range(10)],
            "image",
            {"image": ModalitySpec("vector", args.dim, None, {"train": uris})},
        )
        start_local_ray(2)
        steps_per_epoch = args.rows // args.batch_size
        start = time.perf_counter()
        driver_table = ray.put(read_table(uris).sort_by("id"))
        driver_read = time.perf_counter() - start

        def in_memory():
            for epoch in range(args.epochs):
                order = np.random.default_rng(epoch).permutation(args.rows)
                for start in range(0, steps_per_epoch * args.batch_size, args.batch_size):
                    rows = order[start : start + args.batch_size]
                    yield features[rows], labels[rows]

        def naive():
            ds = ray.data.read_parquet(uris, columns=["features", "label"])
            for _ in range(args.epochs):
                for batch in ds.iter_torch_batches(
                    batch_size=args.batch_size, local_shuffle_buffer_size=4096
                ):
                    yield batch["features"], batch["label"]

        def ours(how: str):
            spec = StreamSpec("image.train", "vector", args.dim, args.rows, how == "cached")
            if how == "cached":  # what a trial does: the driver read the table once per sweep (timed apart)
                source = TableSource(ray.get(driver_table))
            elif how == "pyarrow":  # a one-process trial's streamed share
                source = ParquetSource(uris)
            else:  # the multi-worker path: Ray Data, split across Ray Train workers
                source = build_streamed_datasets(manifest, {"image.train": spec}, -1, False, 0)[
                    "image.train"
                ].iterator()
            stream = BatchStream(
                source, spec, args.batch_size, seed=0, rank=0, world_size=1, shuffle_buffer=8192
            )
            for _ in range(steps_per_epoch * args.epochs):
                yield stream.next()

        # torch's first steps (allocations, kernel selection) would be charged to whichever source runs first
        head_steps(
            ((features[: args.batch_size], labels[: args.batch_size]) for _ in range(200)),
            args.dim,
            args.batch_size,
        )
        results = {}
        # the Ray-free and pyarrow sources first: a Ray Data execution leaves its workers busy for a
        # while after its iterator is done, which a one-process trial never has beside it
        for name, make in [
            ("in-memory loop", in_memory),
            ("BatchStream, cached", lambda: ours("cached")),
            ("BatchStream, streamed (1 process, pyarrow)", lambda: ours("pyarrow")),
            ("naive read_parquet→iter_torch_batches", naive),
            ("BatchStream, streamed (Ray Data)", lambda: ours("ray_data")),
        ]:
            source = make()
            results[name] = head_steps(source, args.dim, steps_per_epoch * args.batch_size)
            source.close()  # release Ray Data iterators before Ray shuts down
        ray.shutdown()
    overall_ceiling, steady_ceiling = results["in-memory loop"]
    print(
        f"{args.rows} rows x {args.dim}-d float32, batch {args.batch_size}, {args.epochs} epochs, linear "
        "head, 1 torch thread"
    )
    print(
        "  the driver's one read of the cached table per sweep (not in the trial's figures): "
        f"{driver_read:.2f} s"
    )
    print(f"  {'source':44s} {'whole run':>14s} {'':>8s} {'after epoch 1':>14s}")
    for name, (overall, steady) in results.items():
        print(
            f"  {name:44s} {overall:10,.0f} r/s {overall / overall_ceiling:7.1%} {steady:10,.0f} r/s "
            f"{steady / steady_ceiling:7.1%}"
        )


if __name__ == "__main__":
    main()
