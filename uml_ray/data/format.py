"""The Parquet shard format (docs/data-format.md §1): the Arrow payload of a shard, its encoding from
numpy, its zero-copy decoding back, and the writers.

One Parquet dataset per (modality, split), many shard files each:
- ``features``: for vectors, one of two layouts (``LAYOUTS``; the manifest's ``layout`` says which):
  ``binary``: ``fixed_size_binary(4*dim)``, each row ``dim`` little-endian float32 (decodes ~8x faster
  than a list: no per-element work, and numpy reads the data buffer as it is); ``list``:
  ``fixed_size_list<float32>[dim]`` (self-describing to other Arrow/Parquet tools; the only layout
  before ``binary``). Sequences: ``list<fixed_size_list<float32>[dim]>`` (T x dim, variable T);
- ``label``: int32, nullable where a split has no labels;
- ``id``: string.

Image modalities (``kind: image``, the fine-tuning regime) hold an ``image`` column of encoded
image bytes instead of ``features``; their ``dim`` is the channel count (1 or 3). See
``uml_ray.data.images``. The manifest that lists the shards is ``uml_ray.data.manifest``'s.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from uml_ray.errors import DataError
from uml_ray.uri import filesystem_for, is_remote, join_uri

FEATURES = "features"
IMAGE = "image"
LABEL = "label"
ID = "id"
LAYOUTS = ("binary", "list")  # how a vector modality's features column is stored
DEFAULT_LAYOUT = "binary"  # what the writers write: the fastest to stream
LEGACY_LAYOUT = "list"  # what a manifest without a `layout` field holds
FLOAT32_LE = np.dtype("<f4")  # a binary row's element type, whatever the machine's byte order
LAYOUT_HELP = (
    "how vector features are stored: binary (fixed_size_binary rows of little-endian float32, the "
    "fastest to stream; default) or list (fixed_size_list<float32>, numbers to any Arrow/Parquet tool); "
    "docs/data-format.md §1"
)


def vector_type(dim: int, layout: str = DEFAULT_LAYOUT) -> pa.DataType:
    """Arrow type of one vector row in ``layout``."""
    if layout == "binary":
        return pa.binary(4 * dim)
    if layout == "list":
        return pa.list_(pa.float32(), dim)
    raise ValueError(f"vector layout must be one of {list(LAYOUTS)}, got {layout!r}")


def sequence_type(dim: int) -> pa.DataType:
    """Arrow type of one sequence row: T steps of ``dim`` floats."""
    return pa.list_(pa.list_(pa.float32(), dim))


def layout_of(feature_type: pa.DataType) -> str | None:
    """The vector layout a features column type is stored in, or None when it is neither."""
    if pa.types.is_fixed_size_binary(feature_type):
        return "binary"
    if pa.types.is_fixed_size_list(feature_type):
        return "list"
    return None


def shard_schema(kind: str, dim: int, layout: str = DEFAULT_LAYOUT) -> pa.Schema:
    """The exact schema every shard of a modality must have (``layout``: vectors only)."""
    if kind == "image":
        return pa.schema(
            [
                pa.field(IMAGE, pa.binary(), nullable=False),
                pa.field(LABEL, pa.int32()),
                pa.field(ID, pa.string()),
            ]
        )
    feature_type = vector_type(dim, layout) if kind == "vector" else sequence_type(dim)
    return pa.schema(
        [
            pa.field(FEATURES, feature_type, nullable=False),
            pa.field(LABEL, pa.int32()),
            pa.field(ID, pa.string()),
        ]
    )


def vector_array(features, dim: int, layout: str = DEFAULT_LAYOUT) -> pa.Array:
    """An (N, dim) float array as a features column in ``layout``; binary wraps the bytes, no copy
    when ``features`` is already contiguous little-endian float32."""
    row_type = vector_type(dim, layout)
    flat = np.ascontiguousarray(np.asarray(features), dtype=FLOAT32_LE)
    if flat.ndim != 2 or flat.shape[1] != dim:
        raise ValueError(f"vector features must have shape (N, {dim}), got {flat.shape}")
    if layout == "binary":
        return pa.FixedSizeBinaryArray.from_buffers(row_type, len(flat), [None, pa.py_buffer(flat)])
    return pa.FixedSizeListArray.from_arrays(pa.array(flat.reshape(-1)), dim)


def features_array(features, kind: str, dim: int, layout: str = DEFAULT_LAYOUT) -> pa.Array:
    """Arrow array for a batch of features: (N, dim) for vectors (in ``layout``), a list of (T_i, dim)
    for sequences."""
    if kind == "vector":
        return vector_array(features, dim, layout)
    sequences = [np.asarray(s, dtype=np.float32) for s in features]
    for seq in sequences:
        if seq.ndim != 2 or seq.shape[1] != dim:
            raise ValueError(f"sequence features must each have shape (T, {dim}), got {seq.shape}")
    lengths = np.array([len(s) for s in sequences], dtype=np.int32)
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)
    steps = np.concatenate(sequences) if sequences else np.zeros((0, dim), np.float32)
    inner = pa.FixedSizeListArray.from_arrays(pa.array(steps.reshape(-1)), dim)
    return pa.ListArray.from_arrays(pa.array(offsets), inner)


def build_table(features, labels, ids, kind: str, dim: int, layout: str = DEFAULT_LAYOUT) -> pa.Table:
    """A shard table in the exact schema of ``shard_schema(kind, dim, layout)``."""
    array = features_array(features, kind, dim, layout)
    n = len(array)
    label_array = pa.nulls(n, pa.int32()) if labels is None else pa.array(np.asarray(labels, dtype=np.int32))
    id_array = pa.array([str(i) for i in (ids if ids is not None else range(n))], pa.string())
    return pa.Table.from_arrays([array, label_array, id_array], schema=shard_schema(kind, dim, layout))


# how the writers write a shard: page checksums, so a reader that verifies them (``data validate``, a
# stream's first pass) names a corrupted page instead of decoding it into finite garbage; the payload
# column (float bytes, encoded images) plain: neither a dictionary nor snappy shrinks it, and skipping
# both reads a pass of 512-d binary rows about 1.6x faster (benchmarks/stream_throughput.py)
WRITE_OPTIONS = {
    "write_page_checksum": True,
    "use_dictionary": [LABEL, ID],
    "compression": {FEATURES: "none", IMAGE: "none", LABEL: "snappy", ID: "snappy"},
}


def write_shard(table: pa.Table, uri: str, filesystem=None) -> None:
    """Write one Parquet shard (``WRITE_OPTIONS``)."""
    path = uri.split("://", 1)[1] if filesystem is not None else uri
    pq.write_table(table, path, filesystem=filesystem, **WRITE_OPTIONS)


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
    layout: str = DEFAULT_LAYOUT,
) -> list[str]:
    """Write one (modality, split) as Parquet shards under ``out_dir/modality/split``.

    Returns the shard URIs in order. ``ids`` default to ``{modality}-{split}-{row}``; ``layout`` is the
    vector payload's (``LAYOUTS``; the manifest's ``layout`` must say the same).
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
            features[start:stop],
            None if labels is None else labels[start:stop],
            ids[start:stop],
            kind,
            dim,
            layout,
        )
        uri = join_uri(folder, f"part-{shard:05d}.parquet")
        write_shard(table, uri, filesystem)
        uris.append(uri)
    return uris


def binary_rows(column: pa.FixedSizeBinaryArray, dim: int) -> np.ndarray:
    """The (N, dim) float32 rows of a binary-layout features column: a view of its data buffer (from
    the array's offset, so a slice reads its own rows), no per-element work. Null rows read as whatever
    bytes they hold (``data validate`` refuses them)."""
    if column.type.byte_width != 4 * dim:
        raise DataError(
            f"features column is {column.type} ({column.type.byte_width} bytes per row) but dim {dim} "
            f"needs fixed_size_binary({4 * dim}); fix the manifest dim or rewrite the shards"
        )
    if len(column) == 0:
        return np.zeros((0, dim), np.float32)
    rows = np.frombuffer(
        column.buffers()[1], dtype=FLOAT32_LE, count=len(column) * dim, offset=column.offset * 4 * dim
    )
    return rows.reshape(-1, dim).astype(np.float32, copy=False)


def _one_array(column: pa.Array | pa.ChunkedArray) -> pa.Array:
    """A column as one array: its only chunk as it is (combining copies, even a single chunk)."""
    if not isinstance(column, pa.ChunkedArray):
        return column
    return column.chunk(0) if column.num_chunks == 1 else column.combine_chunks()


def table_to_numpy(table: pa.Table | pa.RecordBatch, kind: str, dim: int):
    """Zero-copy view of a shard batch: features (N, dim) float32 for vectors, labels int64 (-1 = none).

    Vectors decode from either layout, told apart by the column's Arrow type, so one reader serves
    every shard. For sequences, returns (steps (sum T, dim), lengths (N,)) as the features; for
    images, the encoded-bytes column (a pyarrow binary array).
    """
    column = _one_array(table.column(IMAGE if kind == "image" else FEATURES))
    labels_column = _one_array(table.column(LABEL))
    labels = labels_column.fill_null(-1).to_numpy(zero_copy_only=False).astype(np.int64)
    if kind == "vector":
        if pa.types.is_fixed_size_binary(column.type):
            return binary_rows(column, dim), labels
        return column.flatten().to_numpy(zero_copy_only=False).reshape(-1, dim), labels
    if kind == "image":
        return column, labels
    lengths = np.diff(column.offsets.to_numpy()).astype(np.int64)
    steps = column.flatten().flatten().to_numpy(zero_copy_only=False).reshape(-1, dim)
    return (steps, lengths), labels
