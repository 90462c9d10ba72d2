"""Few-shot splits (docs/data-format.md §5): seeded k-shot train, min(4, k)-shot val, CoOp index formats.

Splits are stable across runs, machines and Python versions: rows are sorted by id before any
draw, and the draw uses numpy's PCG64 with an explicit seed — no ``hash()``, no dict or
file-system order.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import numpy as np

from uml_ray.data.sources import read_json_mapping
from uml_ray.errors import DataError

MAX_VAL_SHOTS = 4


def few_shot_split(
    ids, labels, shots: int, seed: int, max_val_shots: int = MAX_VAL_SHOTS
) -> dict[str, list[str]]:
    """Pick ``shots`` train ids and ``min(max_val_shots, shots)`` val ids per class, disjoint, from one pool.

    ``ids`` and ``labels`` describe the pool row by row. Each class's ids are sorted, permuted by
    ``Generator(PCG64(seed))`` (classes in label order, one permutation each), and the first
    ``shots`` go to train, the next ones to val. Returns ``{"train": [...], "val": [...]}``, each
    sorted by (label, id). A class with too few rows is a DataError naming it.
    """
    ids = np.asarray([str(i) for i in ids], dtype=object)
    labels = np.asarray(labels, dtype=np.int64)
    if len(ids) != len(labels):
        raise DataError(f"few-shot split: {len(ids)} ids but {len(labels)} labels")
    if len(set(ids.tolist())) != len(ids):
        raise DataError("few-shot split: ids must be unique")
    if shots < 1:
        raise DataError(f"few-shot split: shots must be at least 1, got {shots}")
    val_shots = min(max_val_shots, shots)
    rng = np.random.Generator(np.random.PCG64(seed))
    chosen = {"train": [], "val": []}
    short = []
    for label in np.unique(labels):
        pool = sorted(ids[labels == label].tolist())
        if len(pool) < shots + val_shots:
            short.append(f"class {int(label)} has {len(pool)} rows, needs {shots + val_shots}")
            continue
        order = rng.permutation(len(pool))
        chosen["train"].extend((int(label), pool[i]) for i in order[:shots])
        chosen["val"].extend((int(label), pool[i]) for i in order[shots : shots + val_shots])
    if short:
        raise DataError([f"few-shot split ({shots} train + {val_shots} val per class): " + s for s in short])
    return {split: [i for _, i in sorted(rows)] for split, rows in chosen.items()}


@dataclass
class ImageList:
    """Labelled image files: paths (resolved), ids (as the index file writes them), labels, class names."""

    paths: list[str]
    ids: list[str]
    labels: np.ndarray
    classes: list[str]
    indices: list[int] = field(default_factory=list)


def _classes_from(entries: list[tuple[str, int, str]], source: str) -> list[str]:
    names = {}
    for _, label, name in entries:
        if names.setdefault(label, name) != name:
            raise DataError(f"{source}: label {label} is named both {names[label]!r} and {name!r}")
    missing = sorted(set(range(max(names) + 1)) - set(names)) if names else []
    if missing:
        raise DataError(f"{source}: labels {missing} never appear, so their class names are unknown")
    return [names[label] for label in range(len(names))]


def _image_list(
    entries: list[tuple[str, int, str]], image_dir: str | None, classes: list[str], indices=None
) -> ImageList:
    def resolve(path: str) -> str:
        return path if image_dir is None or os.path.isabs(path) else os.path.join(image_dir, path)

    return ImageList(
        paths=[resolve(p) for p, _, _ in entries],
        ids=[p for p, _, _ in entries],
        labels=np.array([label for _, label, _ in entries], dtype=np.int64),
        classes=classes,
        indices=list(indices or []),
    )


def _read_json(path: str) -> dict:
    return read_json_mapping(path, "split JSON", "a split file maps split names to entries")


def load_coop_split(path: str, image_dir: str | None = None) -> dict[str, ImageList]:
    """A CoOp ``split_zhou_*.json``: ``{"train"|"val"|"test": [[impath, label, classname], ...]}``.

    Image paths are joined onto ``image_dir`` when relative. Classes are ordered by label and must
    be named consistently across splits.
    """
    raw = _read_json(path)
    entries = {}
    for split, rows in raw.items():
        if split not in ("train", "val", "test"):
            raise DataError(f"{path}: unknown split '{split}'; CoOp splits are train, val, test")
        try:
            entries[split] = [(str(p), int(label), str(name)) for p, label, name in rows]
        except (TypeError, ValueError):
            raise DataError(f"{path}: split '{split}' rows must be [impath, label, classname]") from None
    classes = _classes_from([e for rows in entries.values() for e in rows], path)
    return {split: _image_list(rows, image_dir, classes) for split, rows in entries.items()}


def load_few_shot_index(path: str, image_dir: str | None = None) -> dict[str, ImageList]:
    """A cross_modal_adaptation few-shot file (``indices/<dataset>/shot_K-seed_S.json``).

    Format: ``{"train"|"val": {"data": [{"impath", "label", "classname"}, ...], "indices": [...]}}``;
    the indices point into the CoOp split's train/val lists and are kept on each ImageList.
    """
    raw = _read_json(path)
    entries, indices = {}, {}
    for split, block in raw.items():
        if split not in ("train", "val", "test") or not isinstance(block, dict) or "data" not in block:
            raise DataError(f"{path}: '{split}' must be a train/val/test block with a 'data' list")
        try:
            entries[split] = [(str(d["impath"]), int(d["label"]), str(d["classname"])) for d in block["data"]]
        except (KeyError, TypeError, ValueError):
            raise DataError(f"{path}: '{split}.data' entries need impath, label, classname") from None
        indices[split] = [int(i) for i in block.get("indices", [])]
        if indices[split] and len(indices[split]) != len(entries[split]):
            raise DataError(
                f"{path}: '{split}' has {len(entries[split])} data entries but {len(indices[split])} indices"
            )
    classes = _classes_from([e for rows in entries.values() for e in rows], path)
    return {split: _image_list(rows, image_dir, classes, indices[split]) for split, rows in entries.items()}
