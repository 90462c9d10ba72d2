"""Images/s reaching the fine-tuning step: the Ray Data image pipeline vs pre-decoded tensors in memory.

All in one run, on Fashion-MNIST images stored as PNG shards (kind image):
- in memory: every image decoded and transformed once beforehand, random batches of ready tensors
  (the ceiling: the step alone);
- pipeline: ``ImageStream`` — Ray Data decode + random-resized-crop/flip/normalise tasks
  (``--decode-cpus`` each) feeding the same step, as the training loop uses it;
- pipeline alone: the same stream drained without a model (how fast it can feed).
The ratio pipeline / in memory is the number that matters: ≥ 0.9 means the model, not the
input, is the bottleneck. ``--workers 1 2`` adds whole ``uml-ray train`` runs (TorchTrainer with
DDP over gloo for 2) of the same steps, timed end to end, start-up included.

    python benchmarks/finetune_ingest.py [--backbone efficientnet-lite0 --size 64 --steps 30 --workers 1 2]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch


def train_steps(model, optimizer, batches, steps: int, warmup: int) -> float:
    """Images/s of ``steps`` forward/backward/AdamW steps after ``warmup`` untimed ones."""
    seen, start = 0, None
    for step in range(warmup + steps):
        if step == warmup:
            start = time.perf_counter()
        images, labels = next(batches)
        images, labels = torch.as_tensor(images), torch.as_tensor(labels)
        loss = torch.nn.functional.cross_entropy(model(images), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        seen += len(labels) if step >= warmup else 0
    return seen / (time.perf_counter() - start)


def drain(batches, steps: int, warmup: int) -> float:
    """Images/s of the stream alone."""
    seen, start = 0, None
    for step in range(warmup + steps):
        if step == warmup:
            start = time.perf_counter()
        _, labels = next(batches)
        seen += len(labels) if step >= warmup else 0
    return seen / (time.perf_counter() - start)


def write_case(folder: Path, rows: int) -> str:
    """Fashion-MNIST image shards (train/val/test) + 384-d random 'text' vectors, and the manifest."""
    from uml_ray.data.format import write_shards
    from uml_ray.data.images import fashion_mnist_images, write_image_shards
    from uml_ray.data.manifest import Manifest, ModalitySpec, write_manifest
    from uml_ray.data.sources import FASHION_MNIST_CLASSES

    splits = {}
    for split, source, count in (("train", "train", rows), ("val", "test", 100), ("test", "test", 100)):
        images, labels, ids = fashion_mnist_images(source, np.arange(count) + (100 if split == "test" else 0))
        splits[split], _ = write_image_shards(str(folder), "image", split, images, labels, ids)
    text_labels = np.arange(200) % 10
    text = np.random.default_rng(0).normal(size=(200, 384)).astype(np.float32)
    text_uris = write_shards(str(folder), "text", "train", text, text_labels)
    manifest = Manifest(
        "ingest",
        list(FASHION_MNIST_CLASSES),
        "image",
        {
            "image": ModalitySpec(kind="image", dim=1, splits=splits),
            "text": ModalitySpec(kind="vector", dim=384, splits={"train": text_uris}),
        },
    )
    return write_manifest(manifest, str(folder / "manifest.yaml"))


def run_workers(manifest: str, folder: Path, args, workers: int) -> float:
    """Images/s of a whole ``uml-ray train`` run with ``workers`` workers, start-up included."""
    import yaml

    from uml_ray.cli import main as cli

    config = folder / f"workers-{workers}.yaml"
    # the workers and the trial's sliver leave room for one decode task, or Ray Data waits for ever
    decode_cpus = min(args.decode_cpus, 0.5)
    config.write_text(
        yaml.safe_dump(
            {
                "data": {"manifest": manifest},
                "model": {"backbone": args.backbone, "image_size": args.size},
                "train": {
                    "batch_size": args.batch_size,
                    "max_steps": args.steps,
                    "warmup_steps": 1,
                    "val_every": args.steps,
                    "alpha_default": 0.0,
                },
                "tracking": {
                    "uri": f"sqlite:///{folder / 'mlflow.db'}",
                    "storage_path": str(folder / "runs"),
                    "experiment": "ingest",
                },
                "resources": {
                    "num_workers": workers,
                    "cpus_per_worker": (args.cpus - decode_cpus - 0.01) / workers,
                    "decode_cpus": decode_cpus,
                    "torch_threads": args.threads,
                },
            }
        )
    )
    start = time.perf_counter()
    assert cli(["train", str(config), "--name", f"workers-{workers}"]) == 0
    return args.steps * args.batch_size * workers / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbone", default="efficientnet-lite0", help="model.backbone spec")
    parser.add_argument("--size", type=int, default=64, help="input size in pixels")
    parser.add_argument("--rows", type=int, default=2000, help="train images")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--steps", type=int, default=30, help="timed steps per feed")
    parser.add_argument(
        "--warmup", type=int, default=3, help="untimed steps first (pipeline start, allocator)"
    )
    parser.add_argument("--threads", type=int, default=1, help="torch threads of the training step")
    parser.add_argument("--decode-cpus", type=float, default=1.0, help="CPUs per decode task")
    parser.add_argument("--cpus", type=int, default=2, help="CPUs of the local Ray")
    parser.add_argument(
        "--workers",
        type=int,
        nargs="*",
        default=[],
        help="also time uml-ray train runs with these worker counts",
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)
    import pyarrow.parquet as pq

    from uml_ray.cluster import start_local_ray
    from uml_ray.data.image_pipeline import ImageStream, transform_from_data_config, transform_rows
    from uml_ray.data.manifest import load_manifest
    from uml_ray.data.streams import StreamSpec, TableSource
    from uml_ray.models.backbone import build_backbone

    start_local_ray(args.cpus)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        manifest = write_case(folder, args.rows)
        table = pq.read_table(load_manifest(manifest).uris("image", "train"))
        torch.manual_seed(0)
        model = build_backbone(args.backbone)
        transform = transform_from_data_config(model.data_config, args.size, 0.35, True, 0)
        head = torch.nn.Sequential(model, torch.nn.Linear(model.num_features, 10))
        optimizer = torch.optim.AdamW(head.parameters(), lr=1e-4)

        spec = StreamSpec(name="image.train", kind="image", dim=1, rows=len(table), cached=True)
        stream = ImageStream(
            TableSource(table), spec, args.batch_size, 0, 0, 1, transform, args.decode_cpus, 0
        )
        pipeline = train_steps(head, optimizer, iter(stream.next, None), args.steps, args.warmup)
        alone = drain(iter(stream.next, None), args.steps * 4, args.warmup)
        stream.close()

        decoded = transform_rows(table, np.arange(len(table)), np.zeros(len(table), np.int64), transform)
        rng = np.random.default_rng(0)

        def in_memory():
            while True:
                rows = rng.integers(0, len(table), args.batch_size)
                yield decoded["image"][rows], decoded["label"][rows]

        memory = train_steps(head, optimizer, in_memory(), args.steps, args.warmup)
        result = {
            "backbone": args.backbone,
            "size": args.size,
            "batch": args.batch_size,
            "threads": args.threads,
            "decode_cpus": args.decode_cpus,
            "in_memory_img_s": round(memory, 1),
            "pipeline_img_s": round(pipeline, 1),
            "pipeline_alone_img_s": round(alone, 1),
            "ratio_pipeline_to_memory": round(pipeline / memory, 3),
        }
        for workers in args.workers:
            result[f"train_{workers}_workers_img_s"] = round(run_workers(manifest, folder, args, workers), 1)
        print(json.dumps(result))


if __name__ == "__main__":
    main()
