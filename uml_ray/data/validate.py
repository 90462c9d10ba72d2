"""Up-front data validation: every problem of a manifest and its shards, before any cluster work.

The checks are those of docs/data-format.md §4 (one shard's are ``uml_ray.data.shard_checks``').

``validate_manifest`` reads every shard in record batches and collects EVERY problem it finds —
unreadable files, wrong schema or dim, NaN/inf features, empty sequences, labels out of range or
missing, empty modalities, classes without any auxiliary sample, duplicated shards — each as one
line naming the file (and row/column/value) and the fix.
"""

from __future__ import annotations

from collections import defaultdict

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from uml_ray.data.format import LABEL
from uml_ray.data.magnitude import DEFAULT_MAX_ABS
from uml_ray.data.manifest import SPLITS, Manifest, load_manifest
from uml_ray.data.shard_checks import BATCH_ROWS, ShardStats, check_shard, open_shard
from uml_ray.errors import DataError


def _duplicate_id_problem(where: str, uris: list[str], shard_ids: list[list[pa.Array]]) -> str | None:
    """One line naming a duplicated row id of one (modality, split) and the two places it occurs."""
    chunks = [chunk for per_shard in shard_ids for chunk in per_shard]
    if not chunks:
        return None
    counts = pc.value_counts(pa.chunked_array(chunks, pa.string()).drop_null())
    repeated = counts.filter(pc.greater(counts.field("counts"), 1))
    if not len(repeated):
        return None
    first = repeated.field("values")[0].as_py()
    places = []
    for uri, per_shard in zip(uris, shard_ids):
        column = pa.chunked_array(per_shard, pa.string()) if per_shard else pa.chunked_array([], pa.string())
        rows = np.flatnonzero(pc.equal(column, first).fill_null(False).to_numpy(zero_copy_only=False))
        places += [f"{uri} row {int(r)}" for r in rows]
    return (
        f"{where}: {len(repeated)} id(s) appear more than once in the split (first: '{first}' at "
        f"{' and '.join(places[:2])}); ids must be unique within a split: drop or rename the duplicates"
    )


def _duplicate_problems(manifest: Manifest) -> list[str]:
    """One line per shard URI listed more than once anywhere in the manifest."""
    places = defaultdict(list)
    for modality, spec in manifest.modalities.items():
        for split, uris in spec.splits.items():
            for uri in uris:
                places[uri].append(f"modalities.{modality}.splits.{split}")
    return [
        f"{uri}: listed {len(where)} times ({', '.join(where)}); a shard belongs to exactly one "
        "(modality, split)"
        for uri, where in places.items()
        if len(where) > 1
    ]


def validate_manifest(
    path: str, max_abs: float = DEFAULT_MAX_ABS
) -> tuple[Manifest | None, list[str], dict[str, dict]]:
    """Load a manifest and check it and every shard; returns (manifest or None, every problem found,
    the |value| statistics of each feature split by ``modality.split``).

    Nothing stops at the first problem: a user fixes a dataset in one pass.
    """
    try:
        manifest = load_manifest(path)
    except DataError as exc:
        return None, list(exc.problems), {}
    problems = _duplicate_problems(manifest)
    n_classes = len(manifest.classes)
    stats = {}  # (modality, split) -> ShardStats summed over shards, or None if any shard failed
    for modality, spec in manifest.modalities.items():
        for split in SPLITS:
            if split not in spec.splits:
                continue
            labels_required = modality == manifest.target or split == "train"
            total = ShardStats(rows=0, class_counts=np.zeros(n_classes, dtype=np.int64), unlabeled=0)
            complete = True
            read_uris, read_ids = [], []
            for uri in spec.splits[split]:
                shard = check_shard(uri, modality, spec, n_classes, labels_required, problems, max_abs)
                if shard is None:
                    complete = False
                    continue
                total.rows += shard.rows
                total.class_counts += shard.class_counts
                total.unlabeled += shard.unlabeled
                total.magnitude.merge(shard.magnitude)
                read_uris.append(uri)
                read_ids.append(shard.ids)
            stats[modality, split] = total if complete else None
            duplicated = _duplicate_id_problem(f"modalities.{modality}.splits.{split}", read_uris, read_ids)
            if duplicated:
                problems.append(duplicated)

    where = manifest.path
    for modality in manifest.modalities:
        needed = SPLITS if modality == manifest.target else ("train",)
        role = "the target" if modality == manifest.target else "an auxiliary modality"
        for split in needed:
            if not manifest.uris(modality, split):
                problems.append(
                    f"{where}: modalities.{modality}.splits.{split} has no shards; {role} needs {split} rows"
                )
            elif stats.get((modality, split)) is not None and stats[modality, split].rows == 0:
                problems.append(
                    f"{where}: modalities.{modality}.splits.{split} has 0 rows in its shards; "
                    f"{role} needs {split} rows"
                )

    auxiliary = manifest.auxiliary
    target_train = stats.get((manifest.target, "train"))
    aux_train = [stats.get((m, "train")) for m in auxiliary]
    # only judge class coverage from complete counts: a broken shard is already reported
    if auxiliary and target_train is not None and all(s is not None for s in aux_train):
        covered = sum(s.class_counts for s in aux_train)
        for c, name in enumerate(manifest.classes):
            if target_train.class_counts[c] and not covered[c]:
                problems.append(
                    f"{where}: class '{name}' (label {c}) has {target_train.class_counts[c]} target train "
                    f"rows but no sample in any auxiliary modality ({', '.join(auxiliary)}); add auxiliary "
                    f"rows labelled {c} or drop the class"
                )
    magnitudes = {
        f"{modality}.{split}": found.magnitude.summary()
        for (modality, split), found in stats.items()
        if found is not None and manifest.modalities[modality].kind != "image"
    }
    return manifest, list(dict.fromkeys(problems)), magnitudes


def require_valid_manifest(path: str, max_abs: float = DEFAULT_MAX_ABS) -> Manifest:
    """The loaded manifest, or DataError listing every problem ``validate_manifest`` found."""
    manifest, problems, _ = validate_manifest(path, max_abs)
    if problems:
        raise DataError(problems)
    return manifest


def summarize_manifest(manifest: Manifest) -> dict:
    """Shards, rows, unlabeled rows and per-class label counts per modality and split (labels read only)."""
    summary = {
        "name": manifest.name,
        "target": manifest.target,
        "classes": list(manifest.classes),
        "modalities": {},
    }
    for modality, spec in manifest.modalities.items():
        splits = {}
        for split, uris in spec.splits.items():
            labels = [
                batch.column(0)
                for uri in uris
                for batch in open_shard(uri).iter_batches(batch_size=BATCH_ROWS * 8, columns=[LABEL])
            ]
            values = (
                np.concatenate([a.drop_null().to_numpy(zero_copy_only=False) for a in labels])
                if labels
                else np.zeros(0, np.int64)
            )
            counts = np.bincount(values.astype(np.int64), minlength=len(manifest.classes))
            splits[split] = {
                "shards": len(uris),
                "rows": int(sum(len(a) for a in labels)),
                "unlabeled": int(sum(a.null_count for a in labels)),
                "per_class": {name: int(counts[c]) for c, name in enumerate(manifest.classes)},
            }
        summary["modalities"][modality] = {"kind": spec.kind, "dim": spec.dim, "splits": splits}
    return summary
