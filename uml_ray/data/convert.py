"""Rewriting a dataset's vector shards in another payload layout (``uml-ray data convert``).

Only the ``features`` column changes form (the float32 values, labels, ids and row order are kept bit
for bit), so a run reads the same numbers from either layout. A shard already in the wanted layout is
left as it is and the manifest records the layout only once every shard holds it: a convert that
stopped midway (its manifest then disagrees with some shards, which ``data validate`` names) is
finished by running it again.
"""

from __future__ import annotations

import pyarrow as pa
import pyarrow.fs  # noqa: F401  (pa.fs)
import pyarrow.parquet as pq

from uml_ray.data.format import (
    FEATURES,
    ID,
    LABEL,
    LAYOUTS,
    WRITE_OPTIONS,
    layout_of,
    shard_schema,
    table_to_numpy,
    vector_array,
)
from uml_ray.data.manifest import ModalitySpec, load_manifest, write_manifest
from uml_ray.data.parquet_source import located
from uml_ray.errors import DataError

BATCH_ROWS = 8192  # rows converted at a time: a shard of any size converts in bounded memory


def convert_shard(uri: str, spec: ModalitySpec, layout: str) -> bool:
    """Rewrite one shard of ``spec``'s modality in ``layout``; False when it already is.

    The new shard is written beside the old one and moved over it, so a shard is never left half
    written. A shard of neither layout's schema (or with null features) is refused, naming it.
    """
    paths, filesystem = located([uri])
    filesystem = filesystem or pa.fs.LocalFileSystem()
    shard = pq.ParquetFile(paths[0], filesystem=filesystem, page_checksum_verification=True)
    found = shard.schema_arrow
    current = layout_of(found.field(FEATURES).type) if FEATURES in found.names else None
    if current is None or not found.equals(shard_schema("vector", spec.dim, current)):
        raise DataError(
            f"{uri}: not a {spec.dim}-d vector shard in either layout ({found.types}); run "
            "`uml-ray data validate` on the manifest and fix what it names first"
        )
    if current == layout:
        return False
    schema = shard_schema("vector", spec.dim, layout)
    partial = f"{paths[0]}.converting"
    with pq.ParquetWriter(partial, schema, filesystem=filesystem, **WRITE_OPTIONS) as writer:
        for batch in shard.iter_batches(batch_size=BATCH_ROWS):
            column = batch.column(FEATURES)
            if column.null_count:
                writer.close()
                filesystem.delete_file(partial)
                raise DataError(
                    f"{uri}: {column.null_count} row(s) have null features; every row needs features: "
                    "drop or fill those rows (uml-ray data validate names them), then convert"
                )
            features, _ = table_to_numpy(batch, "vector", spec.dim)
            arrays = [vector_array(features, spec.dim, layout), batch.column(LABEL), batch.column(ID)]
            writer.write_table(pa.Table.from_arrays(arrays, schema=schema))
    filesystem.move(partial, paths[0])
    return True


def convert_layout(manifest_path: str, layout: str, modalities: list[str] | None = None) -> dict[str, int]:
    """Rewrite every shard of each vector modality (all of them, or ``modalities``) in ``layout`` and
    record the layout in the manifest; returns the shards rewritten per modality."""
    if layout not in LAYOUTS:
        raise DataError(f"--feature-layout {layout!r}: choose one of {list(LAYOUTS)}")
    manifest = load_manifest(manifest_path)
    vectors = [name for name, spec in manifest.modalities.items() if spec.kind == "vector"]
    wanted = vectors if not modalities else list(modalities)
    for name in wanted:
        if name not in vectors:
            raise DataError(
                f"{manifest_path}: --modality {name}: not a vector modality of this manifest; vector "
                f"modalities: {vectors} (sequences and images have one layout)"
            )
    rewritten = {}
    for name in wanted:
        spec = manifest.modalities[name]
        uris = [uri for split in spec.splits.values() for uri in split]
        rewritten[name] = sum(convert_shard(uri, spec, layout) for uri in uris)
        spec.layout = layout
    write_manifest(manifest, manifest.path)
    return rewritten
