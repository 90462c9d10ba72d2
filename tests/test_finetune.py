"""The fine-tuning regime: image shards, the Ray Data image pipeline, a timm backbone under the shared head.

A tiny random-init timm model (``test_efficientnet``, 99k parameters, with BatchNorm) on 32 px
synthetic images whose class is a bright quadrant: fast on CPU, and learnable.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from conftest import write_config
from uml_ray.cli import main
from uml_ray.config import load_config
from uml_ray.data.format import Manifest, ModalitySpec, load_manifest, write_manifest, write_shards
from uml_ray.data.image_pipeline import ImageStream, ImageTransform, crop_box, transform_image
from uml_ray.data.images import encode_png, to_picture, write_image_shards
from uml_ray.data.streams import StreamSpec, TableSource
from uml_ray.driver.plan import build_plan
from uml_ray.models.backbone import build_backbone, param_groups
from uml_ray.train.context import LocalContext
from uml_ray.train.loop import train_supervised

CLASSES = ["top-left", "top-right", "bottom-left", "bottom-right"]
BACKBONE = "timm:test_efficientnet,pretrained=false"
FINETUNE = {
    "model": {"regime": "supervised", "backbone": BACKBONE, "image_size": 32, "freeze_blocks": 2, "head_init": "text"},
    "train": {"lr": 0.01, "batch_size": 8, "max_steps": 12, "warmup_steps": 2, "val_every": 4, "checkpoint_every": 1,
              "backbone_lr_scale": 0.5, "weight_decay": 0.01, "grad_clip": 1.0},
    "data": {"augment_min_scale": 0.5},
    "resources": {"decode_cpus": 0.5},
}


def quadrant_images(labels: np.ndarray, rng: np.random.Generator, size: int = 40) -> np.ndarray:
    """RGB images whose class is the bright quadrant, under noise."""
    images = rng.integers(0, 90, size=(len(labels), size, size, 3)).astype(np.uint8)
    half = size // 2
    for image, label in zip(images, labels):
        top, left = (label // 2) * half, (label % 2) * half
        image[top:top + half, left:left + half] += 150
    return images


def write_image_case(out: Path, per_class: dict[str, int], seed: int = 0) -> str:
    """An image target (PNG shards) + 8-d 'text' feature vectors carrying the class, with its manifest."""
    rng = np.random.default_rng(seed)
    splits = {}
    for split, count in per_class.items():
        labels = np.repeat(np.arange(len(CLASSES)), count)
        ids = [f"{split}-{i:03d}" for i in range(len(labels))]
        splits[split], _ = write_image_shards(str(out), "image", split, quadrant_images(labels, rng), labels, ids)
    text_labels = np.repeat(np.arange(len(CLASSES)), 10)
    text = np.eye(len(CLASSES), 8, dtype=np.float32)[text_labels] * 2 + rng.normal(0, 0.3, (len(text_labels), 8)).astype(np.float32)
    manifest = Manifest("quadrants", CLASSES, "image", {
        "image": ModalitySpec(kind="image", dim=3, splits=splits),
        "text": ModalitySpec(kind="vector", dim=8, splits={"train": write_shards(str(out), "text", "train", text, text_labels)}),
    })
    return write_manifest(manifest, str(out / "manifest.yaml"))


@pytest.fixture(scope="module")
def image_manifest(tmp_path_factory):
    """4 classes: 4 train, 2 val and 4 test images per class."""
    return write_image_case(tmp_path_factory.mktemp("images"), {"train": 4, "val": 2, "test": 4})


def finetune_config(path: Path, manifest: str, workdir: Path, **sections) -> Path:
    merged = {section: {**FINETUNE.get(section, {}), **sections.get(section, {})} for section in set(FINETUNE) | set(sections)}
    return write_config(path, manifest, workdir, **merged)


def test_resumed_finetune_continues_exactly(ray_session, image_manifest, tmp_path):
    plan = build_plan(load_config(finetune_config(tmp_path / "c.yaml", image_manifest, tmp_path)))
    whole = LocalContext(plan)
    train_supervised(plan, whole)

    first = LocalContext(plan, fail_after=1)
    with pytest.raises(LocalContext.Interrupted):
        train_supervised(plan, first)
    assert first.saved["progress"]["step"] == 4
    second = LocalContext(plan, saved=first.saved)
    train_supervised(plan, second)

    assert [r["step"] for r in second.reports] == [8, 12]
    for resumed, uninterrupted in zip(second.reports, whole.reports[1:]):
        assert resumed == uninterrupted  # losses, accuracies, lr: bit-identical
    for name, weight in whole.saved["model"].items():
        assert torch.equal(weight, second.saved["model"][name]), name
