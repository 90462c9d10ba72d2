"""The Parquet shard format and manifest (docs/data-format.md).

One Parquet dataset per (modality, split), many shard files each:
- ``features``: ``fixed_size_list<float32>[dim]`` for vectors, or
  ``list<fixed_size_list<float32>[dim]>`` for sequences (T x dim, variable T);
- ``label``: int32, nullable where a split has no labels;
- ``id``: string.

Image modalities (``kind: image``, the fine-tuning regime) hold an ``image`` column of encoded
image bytes instead of ``features``; their ``dim`` is the channel count (1 or 3). See
``uml_ray.data.images``.

A manifest (YAML or JSON) names the dataset, its ordered classes, the target modality and,
per modality, its kind, dim, encoder and shard URIs per split. Relative shard paths are
resolved against the manifest's folder; ``s3://`` and ``gs://`` URIs are kept as they are.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import yaml

from uml_ray.config import MAX_INPUT_BYTES, decode_text, load_yaml_text
from uml_ray.errors import ConfigError, DataError
from uml_ray.uri import filesystem_for, is_remote, join_uri

FEATURES = "features"
IMAGE = "image"
LABEL = "label"
ID = "id"
KINDS = ("vector", "sequence", "image")
SPLITS = ("train", "val", "test")


def vector_type(dim: int) -> pa.DataType:
    """Arrow type of one vector row."""
    return pa.list_(pa.float32(), dim)


def sequence_type(dim: int) -> pa.DataType:
    """Arrow type of one sequence row: T steps of ``dim`` floats."""
    return pa.list_(pa.list_(pa.float32(), dim))


def shard_schema(kind: str, dim: int) -> pa.Schema:
    """The exact schema every shard of a modality must have."""
    if kind == "image":
        return pa.schema(
            [
                pa.field(IMAGE, pa.binary(), nullable=False),
                pa.field(LABEL, pa.int32()),
                pa.field(ID, pa.string()),
            ]
        )
    feature_type = vector_type(dim) if kind == "vector" else sequence_type(dim)
    return pa.schema(
        [
            pa.field(FEATURES, feature_type, nullable=False),
            pa.field(LABEL, pa.int32()),
            pa.field(ID, pa.string()),
        ]
    )


@dataclass
class ModalitySpec:
    """One modality of a dataset: what its rows are and where its shards live."""

    kind: str
    dim: int
    encoder: str | None = None
    splits: dict[str, list[str]] = field(default_factory=dict)


@dataclass
class Manifest:
    """A dataset: ordered class names, the target modality, and every modality's shards."""

    name: str
    classes: list[str]
    target: str
    modalities: dict[str, ModalitySpec]
    path: str | None = None

    @property
    def auxiliary(self) -> list[str]:
        """Modalities other than the target, in manifest order."""
        return [m for m in self.modalities if m != self.target]

    def uris(self, modality: str, split: str) -> list[str]:
        """Resolved shard URIs of one (modality, split); empty when the split is absent."""
        return self.modalities[modality].splits.get(split, [])

    def to_dict(self, relative_to: str | None = None) -> dict:
        """Plain dict for YAML/JSON; local URIs made relative to ``relative_to`` when given."""

        def rel(uri: str) -> str:
            if relative_to is None or is_remote(uri):
                return uri
            return os.path.relpath(uri, relative_to)

        return {
            "name": self.name,
            "classes": list(self.classes),
            "target": self.target,
            "modalities": {
                name: {
                    "kind": spec.kind,
                    "dim": spec.dim,
                    "encoder": spec.encoder,
                    "splits": {split: [rel(u) for u in uris] for split, uris in spec.splits.items()},
                }
                for name, spec in self.modalities.items()
            },
        }


def _require(mapping: dict, key: str, where: str, kind: type | tuple):
    if key not in mapping:
        raise DataError(f"{where}: missing field '{key}'")
    value = mapping[key]
    # YAML's true/false are Python bools, and bool is an int: never accept one as a number
    if not isinstance(value, kind) or (
        isinstance(value, bool) and bool not in (kind if isinstance(kind, tuple) else (kind,))
    ):
        names = kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
        raise DataError(f"{where}: field '{key}' must be {names}, got {type(value).__name__} {value!r}")
    return value


def _reject_unknown(mapping: dict, allowed: tuple[str, ...], where: str, fields: str = "field(s)") -> None:
    unknown = set(mapping) - set(allowed)
    if unknown:
        raise DataError(f"{where}: unknown {fields} {sorted(unknown)}; allowed: {', '.join(allowed)}")


def _parse_json(text: str, path: str):
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{path}: not valid JSON ({exc})") from None
    except RecursionError:
        raise ConfigError(f"{path}: JSON nested too deeply; a manifest is a few levels deep") from None


def load_manifest(path: str | os.PathLike) -> Manifest:
    """Read a manifest file (YAML or JSON) and resolve its shard paths.

    Raises DataError naming the file and field for anything structurally wrong; the shard
    contents are checked by ``uml_ray.data.validate``.
    """
    path = str(path)
    # at most MAX_INPUT_BYTES + 1 bytes are read: a huge file is refused without reading it whole
    if is_remote(path):
        filesystem, inner = filesystem_for(path)
        try:
            with filesystem.open_input_stream(inner) as handle:
                data = handle.read(MAX_INPUT_BYTES + 1)
        except OSError as exc:
            raise DataError(f"{path}: cannot read manifest ({exc})") from None
        base = path.rsplit("/", 1)[0]
    else:
        try:
            with open(path, "rb") as handle:
                data = handle.read(MAX_INPUT_BYTES + 1)
        except OSError as exc:
            raise DataError(f"{path}: cannot read manifest ({exc.strerror}); check the path") from None
        base = str(Path(path).resolve().parent)
    try:
        text = decode_text(data, path)
        raw = _parse_json(text, path) if path.endswith(".json") else load_yaml_text(text, path)
    except ConfigError as exc:
        raise DataError(str(exc)) from None
    if not isinstance(raw, dict):
        raise DataError(f"{path}: a manifest is a mapping with name, classes, target, modalities")
    _reject_unknown(raw, ("name", "classes", "target", "modalities"), path, "manifest field(s)")
    name = str(raw.get("name", Path(path).stem))
    classes = _require(raw, "classes", path, list)
    if not classes or len(set(map(str, classes))) != len(classes):
        raise DataError(f"{path}: 'classes' must be a non-empty list of distinct names")
    target = _require(raw, "target", path, str)
    raw_modalities = _require(raw, "modalities", path, dict)
    if target not in raw_modalities:
        raise DataError(f"{path}: target '{target}' is not one of the modalities {sorted(raw_modalities)}")
    modalities = {}
    for mod_name, spec in raw_modalities.items():
        where = f"{path}: modalities.{mod_name}"
        if not isinstance(spec, dict):
            raise DataError(f"{where}: must be a mapping with kind, dim, splits")
        _reject_unknown(spec, ("kind", "dim", "encoder", "splits"), where)
        kind = _require(spec, "kind", where, str)
        if kind not in KINDS:
            raise DataError(f"{where}.kind: '{kind}' is not one of {list(KINDS)}")
        dim = _require(spec, "dim", where, int)
        if dim <= 0:
            raise DataError(f"{where}.dim: must be a positive integer, got {dim}")
        if kind == "image" and dim not in (1, 3):
            raise DataError(
                f"{where}.dim: an image modality's dim is its channel count, 1 (grayscale) or 3 (RGB); "
                f"got {dim}"
            )
        splits = _require(spec, "splits", where, dict)
        resolved = {}
        for split, uris in splits.items():
            if split not in SPLITS:
                raise DataError(f"{where}.splits: unknown split '{split}'; allowed: {list(SPLITS)}")
            if isinstance(uris, str):
                uris = [uris]
            if not isinstance(uris, list):
                raise DataError(f"{where}.splits.{split}: must be a list of shard paths")
            resolved[split] = [
                u if is_remote(u) or os.path.isabs(u) else join_uri(base, u) for u in map(str, uris)
            ]
        modalities[mod_name] = ModalitySpec(kind=kind, dim=dim, encoder=spec.get("encoder"), splits=resolved)
    return Manifest(
        name=name, classes=[str(c) for c in classes], target=target, modalities=modalities, path=path
    )


def write_manifest(manifest: Manifest, path: str | os.PathLike) -> str:
    """Write a manifest as YAML (or JSON for a ``.json`` path) with paths relative to its folder."""
    path = str(path)
    base = None if is_remote(path) else str(Path(path).resolve().parent)
    payload = manifest.to_dict(relative_to=base)
    text = (
        json.dumps(payload, indent=2) if path.endswith(".json") else yaml.safe_dump(payload, sort_keys=False)
    )
    if is_remote(path):
        filesystem, inner = filesystem_for(path)
        with filesystem.open_output_stream(inner) as handle:
            handle.write(text.encode())
    else:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(text)
    manifest.path = path
    return path


def features_array(features, kind: str, dim: int) -> pa.Array:
    """Arrow array for a batch of features: (N, dim) for vectors, a list of (T_i, dim) for sequences."""
    if kind == "vector":
        flat = np.ascontiguousarray(np.asarray(features, dtype=np.float32))
        if flat.ndim != 2 or flat.shape[1] != dim:
            raise ValueError(f"vector features must have shape (N, {dim}), got {flat.shape}")
        return pa.FixedSizeListArray.from_arrays(pa.array(flat.reshape(-1)), dim)
    sequences = [np.asarray(s, dtype=np.float32) for s in features]
    for seq in sequences:
        if seq.ndim != 2 or seq.shape[1] != dim:
            raise ValueError(f"sequence features must each have shape (T, {dim}), got {seq.shape}")
    lengths = np.array([len(s) for s in sequences], dtype=np.int32)
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)
    steps = np.concatenate(sequences) if sequences else np.zeros((0, dim), np.float32)
    inner = pa.FixedSizeListArray.from_arrays(pa.array(steps.reshape(-1)), dim)
    return pa.ListArray.from_arrays(pa.array(offsets), inner)


def build_table(features, labels, ids, kind: str, dim: int) -> pa.Table:
    """A shard table in the exact schema of ``shard_schema(kind, dim)``."""
    array = features_array(features, kind, dim)
    n = len(array)
    label_array = pa.nulls(n, pa.int32()) if labels is None else pa.array(np.asarray(labels, dtype=np.int32))
    id_array = pa.array([str(i) for i in (ids if ids is not None else range(n))], pa.string())
    return pa.Table.from_arrays([array, label_array, id_array], schema=shard_schema(kind, dim))


def write_shard(table: pa.Table, uri: str, filesystem=None) -> None:
    """Write one Parquet shard with page checksums, so a reader that verifies them (``data validate``,
    the streams) names a corrupted page instead of decoding it into finite garbage."""
    path = uri.split("://", 1)[1] if filesystem is not None else uri
    pq.write_table(table, path, filesystem=filesystem, write_page_checksum=True)


def shard_folder(out_dir: str, modality: str, split: str, clear: bool = False) -> tuple[str, object]:
    """The folder of one (modality, split)'s shards and the filesystem to write there (None: local).

    A local folder is made; ``clear`` removes the shards an earlier write left in it, so that a
    re-run with fewer rows leaves no stale shard behind.
    """
    folder = join_uri(out_dir, modality, split)
    if is_remote(folder):
        return folder, filesystem_for(folder)[0]
    Path(folder).mkdir(parents=True, exist_ok=True)
    if clear:
        for stale in Path(folder).glob("part-*.parquet"):
            stale.unlink()
    return folder, None


def write_shards(
    out_dir: str,
    modality: str,
    split: str,
    features,
    labels: Sequence[int] | np.ndarray | None,
    ids: Iterable[str] | None = None,
    kind: str = "vector",
    dim: int | None = None,
    rows_per_shard: int = 4096,
) -> list[str]:
    """Write one (modality, split) as Parquet shards under ``out_dir/modality/split``.

    Returns the shard URIs in order. ``ids`` default to ``{modality}-{split}-{row}``.
    """
    n = len(features)
    if dim is None:
        dim = int(np.asarray(features[0]).shape[-1]) if n else 0
    if ids is None:
        ids = [f"{modality}-{split}-{i}" for i in range(n)]
    ids = list(ids)
    folder, filesystem = shard_folder(out_dir, modality, split)
    uris = []
    for shard, start in enumerate(range(0, max(n, 1), rows_per_shard)):
        stop = min(n, start + rows_per_shard)
        table = build_table(
            features[start:stop], None if labels is None else labels[start:stop], ids[start:stop], kind, dim
        )
        uri = join_uri(folder, f"part-{shard:05d}.parquet")
        write_shard(table, uri, filesystem)
        uris.append(uri)
    return uris


def table_to_numpy(table: pa.Table | pa.RecordBatch, kind: str, dim: int):
    """Zero-copy view of a shard batch: features (N, dim) float32 for vectors, labels int64 (-1 = none).

    For sequences, returns (steps (sum T, dim), lengths (N,)) as the features; for images, the
    encoded-bytes column (a pyarrow binary array).
    """
    column = table.column(IMAGE if kind == "image" else FEATURES)
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    labels_column = table.column(LABEL)
    if isinstance(labels_column, pa.ChunkedArray):
        labels_column = labels_column.combine_chunks()
    labels = labels_column.fill_null(-1).to_numpy(zero_copy_only=False).astype(np.int64)
    if kind == "vector":
        return column.flatten().to_numpy(zero_copy_only=False).reshape(-1, dim), labels
    if kind == "image":
        return column, labels
    lengths = np.diff(column.offsets.to_numpy()).astype(np.int64)
    steps = column.flatten().flatten().to_numpy(zero_copy_only=False).reshape(-1, dim)
    return (steps, lengths), labels
