"""One shard checked: readable, of the manifest's schema, every row (features, labels, ids) sound.

The checks are those of docs/data-format.md §4; each problem is one line naming the file (and
row/column/value) and the fix. ``uml_ray.data.validate`` runs them over a manifest's shards.
"""

from __future__ import annotations

import dataclasses
import re
from collections import defaultdict
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from uml_ray.data.format import FEATURES, ID, IMAGE, LABEL, shard_schema, table_to_numpy, vector_type
from uml_ray.data.images import DECODE_SAMPLE, ImageRowProblems, check_image_column, report_image_problems
from uml_ray.data.magnitude import DEFAULT_MAX_ABS, Magnitude, check_magnitude
from uml_ray.data.manifest import ModalitySpec
from uml_ray.uri import filesystem_for, is_remote

BATCH_ROWS = 8192  # rows per record batch: large shards are checked without loading them whole
FORMAT_HINT = "write shards with uml_ray.data.format.write_shards"


@dataclass
class ShardStats:
    """What one readable shard holds: its rows, per-class label counts and unlabeled rows."""

    rows: int
    class_counts: np.ndarray
    unlabeled: int
    ids: list[pa.Array] = dataclasses.field(default_factory=list)  # the id column, per record batch
    magnitude: Magnitude = dataclasses.field(default_factory=Magnitude)


def open_shard(uri: str) -> pq.ParquetFile:
    """Open a Parquet shard from a local path or an ``s3://`` / ``gs://`` URI (footer only)."""
    if is_remote(uri):
        filesystem, path = filesystem_for(uri)
        return pq.ParquetFile(filesystem.open_input_file(path), page_checksum_verification=True)
    return pq.ParquetFile(uri, page_checksum_verification=True)


def _reason(exc: Exception) -> str:
    """The first line of an I/O or Arrow error, without Python's exception class name."""
    if isinstance(exc, FileNotFoundError):
        return "file not found"
    return str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__


def _feature_kind(feature_type: pa.DataType) -> tuple[str | None, int | None, str | None]:
    """(kind, dim, vector layout) that a features column type encodes; Nones for anything else.

    A binary column whose byte width is not a whole number of float32s has dim None."""
    if pa.types.is_fixed_size_binary(feature_type):
        width = feature_type.byte_width
        return "vector", (width // 4 if width % 4 == 0 else None), "binary"
    if pa.types.is_fixed_size_list(feature_type) and pa.types.is_floating(feature_type.value_type):
        return "vector", feature_type.list_size, "list"
    if pa.types.is_list(feature_type) and pa.types.is_fixed_size_list(feature_type.value_type):
        return "sequence", feature_type.value_type.list_size, None
    return None, None, None


def _features_problem(uri: str, found_type: pa.DataType, modality: str, spec: ModalitySpec) -> str | None:
    """The one line that says how a features column of the wrong type differs from the manifest's
    kind, layout or dim, and the fix; None when it is no known features type."""
    kind, dim, layout = _feature_kind(found_type)
    where = f"modalities.{modality}"
    if kind is None:
        return None
    if kind != spec.kind:
        return (
            f"{uri}: features are {kind} rows ({found_type}) but {where}.kind is {spec.kind}; fix the "
            "manifest kind or rewrite the shard"
        )
    if kind == "vector" and layout != spec.layout:
        return (
            f"{uri}: column 'features' is in the {layout} layout ({found_type}) but {where}.layout is "
            f"{spec.layout} (expected {vector_type(spec.dim, spec.layout)}); set {where}.layout: {layout} "
            f"in the manifest, or rewrite the shards in the {spec.layout} layout (uml-ray data convert)"
        )
    if layout == "binary" and dim is None:
        return (
            f"{uri}: column 'features' is {found_type}: {found_type.byte_width} bytes per row is not a "
            f"whole number of float32 values; {where}.dim {spec.dim} needs {vector_type(spec.dim, 'binary')} "
            "(little-endian float32 rows): rewrite the shard"
        )
    if found_type.equals(shard_schema(kind, dim, spec.layout).field(FEATURES).type):
        width = f", {found_type.byte_width} bytes per row" if layout == "binary" else ""
        expected = shard_schema(kind, spec.dim, spec.layout).field(FEATURES).type
        return (
            f"{uri}: features have dim {dim} ({found_type}{width}) but {where}.dim is {spec.dim} (expected "
            f"{expected}); fix the manifest dim or re-extract the features"
        )
    return None


def _schema_problems(uri: str, found: pa.Schema, modality: str, spec: ModalitySpec) -> list[str]:
    """Every way a shard's schema differs from ``shard_schema(kind, dim, layout)``; empty when it matches."""
    expected = shard_schema(spec.kind, spec.dim, spec.layout)
    problems = []
    for field in expected:
        if field.name not in found.names:
            problems.append(f"{uri}: column '{field.name}' is missing (expected {field.type}); {FORMAT_HINT}")
            continue
        found_type = found.field(field.name).type
        if found_type == field.type:
            continue
        explained = _features_problem(uri, found_type, modality, spec) if field.name == FEATURES else None
        problems.append(
            explained
            or f"{uri}: column '{field.name}' has type {found_type}, expected {field.type}; {FORMAT_HINT}"
        )
    extra = [name for name in found.names if name not in expected.names]
    if extra:
        problems.append(f"{uri}: unexpected column(s) {extra}; a shard holds exactly {expected.names}")
    return problems


def _report_rows(problems: list[str], uri: str, rows: np.ndarray, what: str, fix: str) -> None:
    """Add one line for a set of bad rows: how many, and the first one."""
    if len(rows):
        problems.append(f"{uri}: {len(rows)} row(s) {what} (first at row {int(rows[0])}); {fix}")


def check_shard(
    uri: str,
    modality: str,
    spec: ModalitySpec,
    n_classes: int,
    labels_required: bool,
    problems: list[str],
    max_abs: float = DEFAULT_MAX_ABS,
) -> ShardStats | None:
    """Check one shard's readability, schema and every row; append problems.

    None when the shard is unreadable or mis-typed. Rows are read in record batches, so a shard of any
    size is checked in bounded memory. Page checksums (written by ``format.write_shard``) are verified,
    and a row whose features exceed ``max_abs`` in magnitude is a problem: finite garbage trains to
    nonsense without a warning.
    """
    try:
        shard = open_shard(uri)
        schema = shard.schema_arrow
    except (OSError, pa.ArrowException) as exc:
        problems.append(
            f"{uri}: cannot read the Parquet shard ({_reason(exc)}); fix the path in the manifest or "
            "rewrite the shard"
        )
        return None
    schema_problems = _schema_problems(uri, schema, modality, spec)
    if schema_problems:
        problems.extend(schema_problems)
        return None
    bad = defaultdict(list)  # problem name -> arrays of shard row indices
    magnitude = Magnitude()
    large_values = []  # the first too-large value of each such row
    label_values = []
    ids = []
    counts = np.zeros(n_classes, dtype=np.int64)
    total = unlabeled = 0
    content = IMAGE if spec.kind == "image" else FEATURES
    images = ImageRowProblems()
    # every image header is read; a spread-out sample of rows is decoded in full
    stride = max(1, shard.metadata.num_rows // DECODE_SAMPLE)
    try:
        for batch in shard.iter_batches(batch_size=BATCH_ROWS, columns=[content, LABEL, ID]):
            rows = np.arange(total, total + batch.num_rows)
            total += batch.num_rows
            ids.append(batch.column(ID))
            features = batch.column(content)
            if features.null_count:
                valid = features.is_valid().to_numpy(zero_copy_only=False)
                bad["null features"].append(rows[~valid])
                # keep the shard row numbers of the rows still checked
                batch, rows = batch.filter(pa.array(valid)), rows[valid]
            values, labels = table_to_numpy(batch, spec.kind, spec.dim)
            if spec.kind == "vector":
                bad["non-finite"].append(rows[~np.isfinite(values).all(axis=1)])
                check_magnitude(values, rows, np.arange(len(rows)), max_abs, magnitude, bad, large_values)
            elif spec.kind == "image":
                check_image_column(values, rows, spec.dim, stride, images)
            else:
                steps, lengths = values
                bad["empty sequence"].append(rows[lengths == 0])
                step_rows = np.repeat(np.arange(len(lengths)), lengths)
                bad["non-finite"].append(rows[np.unique(step_rows[~np.isfinite(steps).all(axis=1)])])
                check_magnitude(steps, rows, step_rows, max_abs, magnitude, bad, large_values)
            missing = batch.column(LABEL).is_null().to_numpy(zero_copy_only=False)
            unlabeled += int(missing.sum())
            bad["null label"].append(rows[missing])
            out_of_range = ~missing & ((labels < 0) | (labels >= n_classes))
            bad["label range"].append(rows[out_of_range])
            label_values.append(labels[out_of_range])
            in_range = labels[~missing & ~out_of_range]
            counts += np.bincount(in_range, minlength=n_classes)
    except (OSError, pa.ArrowException) as exc:
        null_row = _null_fixed_size_row(exc, total)
        if null_row is not None:
            problems.append(
                f"{uri}: row {null_row} has null features (the first; Parquet cannot read past it); "
                "every row needs features: drop or fill those rows"
            )
        elif "checksum" in str(exc).lower():
            problems.append(
                f"{uri}: column '{content}' has a corrupted data page after row {total} (its CRC checksum "
                "does not match); rewrite the shard from its source"
            )
        else:
            problems.append(f"{uri}: cannot read rows past row {total} ({_reason(exc)}); rewrite the shard")
        return None
    found = {
        name: np.concatenate(bad[name]) if bad[name] else np.zeros(0, np.int64)
        for name in (
            "null features",
            "non-finite",
            "too large",
            "empty sequence",
            "label range",
            "null label",
        )
    }
    _report_rows(
        problems,
        uri,
        found["null features"],
        "have null features",
        "every row needs features: drop or fill those rows",
    )
    _report_rows(problems, uri, found["non-finite"], "have NaN/inf features", "drop or repair those rows")
    if len(found["too large"]):
        first = float(np.concatenate(large_values)[0])
        problems.append(
            f"{uri}: column '{content}': {len(found['too large'])} row(s) hold values beyond ±{max_abs:g} "
            f"(first at row {int(found['too large'][0])}: {first:.3g}); rescale or repair the features, or "
            "raise the bound (data validate --max-abs, data.max_abs_feature) if they are right"
        )
    if spec.kind == "sequence":
        _report_rows(problems, uri, found["empty sequence"], "are empty sequences (T=0)", "drop those rows")
    if spec.kind == "image":
        report_image_problems(uri, modality, spec.dim, images, problems)
    if len(found["label range"]):
        first = int(np.concatenate(label_values)[0])
        problems.append(
            f"{uri}: {len(found['label range'])} label(s) outside [0, {n_classes}) (first at row "
            f"{int(found['label range'][0])}: label {first}); labels index the manifest's classes"
        )
    if labels_required:
        _report_rows(
            problems,
            uri,
            found["null label"],
            "have no label",
            "the target's splits and every auxiliary train split need a class label on each row",
        )
    return ShardStats(rows=total, class_counts=counts, unlabeled=unlabeled, ids=ids, magnitude=magnitude)


def _null_fixed_size_row(exc: Exception, batch_start: int) -> int | None:
    """The shard row of the first null features row when that is why a batch failed, else None.

    Arrow writes a null fixed-size-list row to Parquet but cannot read it back: it fails with
    "Expected all lists to be of size=D but index I had size=0", I being the null row's position
    in the batch plus one (an offsets index).
    """
    found = re.search(r"Expected all lists to be of size=\d+ but index (\d+) had size=0", str(exc))
    return batch_start + int(found.group(1)) - 1 if found else None
