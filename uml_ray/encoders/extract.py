"""Feature extraction on Ray Data: ``map_batches`` over an actor pool, one frozen encoder per actor.

Rows are a Ray Dataset with ``label`` (int), ``id`` (str) and one input column: ``text`` (str),
``image`` (uint8 array, or encoded image bytes) or ``path`` (an image file). Actors take one GPU
each when the cluster has GPUs, otherwise CPUs; results stream back to the driver in input order
and are written as uml-ray Parquet shards (``uml_ray.data.format``), so a run is reproducible row
for row. A rows-done line is printed as shards are written; Ray Data's own progress bars and
execution banners only with ``--verbose`` (``show_ray_data_progress``).
"""

from __future__ import annotations

import sys
import time

import numpy as np

from uml_ray.data.format import DEFAULT_LAYOUT, build_table, shard_folder, write_shard
from uml_ray.data.sources import decode_image
from uml_ray.encoders.registry import EncoderSpec, feature_dim, load_encoder, parse_encoder
from uml_ray.errors import ConfigError, DataError
from uml_ray.uri import join_uri


class EncodeBatch:
    """Ray Data callable class: loads the encoder once per actor, then encodes batch after batch."""

    def __init__(self, spec: str, modality: str, threads: int | None):
        self.encoder = load_encoder(spec, modality, threads=threads)
        self.modality = modality

    def __call__(self, batch: dict) -> dict:
        """``{features (N, dim) float32, label int32, id str}`` for one batch of rows."""
        if self.modality == "text":
            inputs = [str(t) for t in batch["text"]]
        elif "image" in batch:
            column = batch["image"]
            inputs = list(column) if column.dtype != object else [decode_image(x) for x in column]
        else:
            inputs = [decode_image(p) for p in batch["path"]]
        return {
            "features": self.encoder.encode(inputs),
            "label": np.asarray(batch["label"], dtype=np.int32),
            "id": np.asarray([str(i) for i in batch["id"]], dtype=object),
        }


def rows_from_arrays(images: np.ndarray, labels, ids, block_rows: int = 256):
    """A Ray Dataset of in-memory uint8 images (``image`` column) with their labels and ids."""
    import ray

    items = [
        {"image": image, "label": int(label), "id": str(i)} for image, label, i in zip(images, labels, ids)
    ]
    return ray.data.from_items(items, override_num_blocks=max(1, -(-len(items) // block_rows)))


def rows_from_paths(paths: list[str], labels, ids, block_rows: int = 256):
    """A Ray Dataset of image files (``path`` column), decoded inside the encoder actors."""
    import ray

    items = [{"path": str(p), "label": int(label), "id": str(i)} for p, label, i in zip(paths, labels, ids)]
    return ray.data.from_items(items, override_num_blocks=max(1, -(-len(items) // block_rows)))


def rows_from_texts(texts: list[str], labels, ids=None, block_rows: int = 256):
    """A Ray Dataset of sentences (``text`` column) with the class each was written for."""
    import ray

    ids = ids if ids is not None else [f"text-{i:06d}" for i in range(len(texts))]
    items = [{"text": str(t), "label": int(label), "id": str(i)} for t, label, i in zip(texts, labels, ids)]
    return ray.data.from_items(items, override_num_blocks=max(1, -(-len(items) // block_rows)))


def rows_from_image_parquet(
    path: str, image_column: str = "image", label_column: str = "label", id_column: str = "id"
):
    """A Ray Dataset over Parquet files of encoded image bytes, renamed to ``image``/``label``/``id``.

    Images are decoded inside the actors, so the files stream and never sit whole on the driver.
    """
    import ray

    rows = ray.data.read_parquet(path, columns=[image_column, label_column, id_column])
    return rows.rename_columns({image_column: "image", label_column: "label", id_column: "id"})


# whether Ray Data draws its progress bars and execution banners (``--verbose`` of extract and case)
_ray_data_progress = False


def show_ray_data_progress(shown: bool) -> None:
    """Ray Data's progress for the extractions that follow: shown with ``--verbose``, else silent."""
    global _ray_data_progress
    _ray_data_progress = shown


def ensure_ray() -> None:
    """Attach to ``RAY_ADDRESS`` when set, else start a local Ray, unless this process already has one;
    Ray Data's progress bars off unless ``show_ray_data_progress(True)``: they print blocks of lines
    into logs, and the rows-done lines tell the progress."""
    import logging

    import ray.data

    from uml_ray.cluster import attach_or_start_ray

    attach_or_start_ray()
    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = _ray_data_progress
    context.print_on_execution_start = _ray_data_progress
    # both ways: a quiet extraction earlier in this process must not silence a verbose one
    logging.getLogger("ray.data").setLevel(logging.INFO if _ray_data_progress else logging.WARNING)


def actor_resources(num_actors: int | None) -> tuple[int, dict, int]:
    """``(actors, ray_remote_args, torch threads)`` for the running Ray cluster.

    With GPUs: one actor per GPU, one GPU each. On CPUs: one actor per node by default; each
    reserves one CPU (leaving the rest for Ray Data's read tasks) and runs torch on all the node's cores.
    """
    import ray

    resources = ray.cluster_resources()
    gpus = int(resources.get("GPU", 0))
    if gpus:
        return num_actors or gpus, {"num_gpus": 1, "num_cpus": 1}, 1
    nodes = [n for n in ray.nodes() if n.get("Alive") and n["Resources"].get("CPU")]
    node_cpus = min(int(n["Resources"]["CPU"]) for n in nodes) if nodes else 1
    actors = num_actors or max(1, len(nodes))
    actors_per_node = -(-actors // max(1, len(nodes)))
    return actors, {"num_cpus": 1}, max(1, node_cpus // actors_per_node)


class ShardWriter:
    """Writes streamed batches as ``part-NNNNN.parquet`` shards of ``rows_per_shard`` rows, uml-ray schema."""

    def __init__(
        self,
        out_dir: str,
        modality: str,
        split: str,
        dim: int,
        rows_per_shard: int,
        layout: str = DEFAULT_LAYOUT,
    ):
        self.folder, self.filesystem = shard_folder(out_dir, modality, split, clear=True)
        self.dim = dim
        self.layout = layout
        self.rows_per_shard = rows_per_shard
        self.pending: list[tuple[np.ndarray, np.ndarray, list]] = []
        self.pending_rows = 0
        self.uris: list[str] = []
        self.rows = 0

    def add(self, features: np.ndarray, labels: np.ndarray, ids) -> None:
        """Queue one batch; full shards are written as soon as they fill."""
        if features.ndim != 2 or features.shape[1] != self.dim:
            raise ConfigError(
                f"the encoder returned features of shape {features.shape}, expected (N, {self.dim}); "
                "give the right dim= in the encoder spec"
            )
        self.pending.append((features, labels, list(ids)))
        self.pending_rows += len(features)
        self.rows += len(features)
        while self.pending_rows >= self.rows_per_shard:
            self._flush(self.rows_per_shard)

    def close(self) -> list[str]:
        """Write the last partial shard; returns every shard URI in order."""
        if self.pending_rows or not self.uris:
            self._flush(self.pending_rows)
        return self.uris

    def _flush(self, count: int) -> None:
        features = (
            np.concatenate([f for f, _, _ in self.pending])
            if self.pending
            else np.zeros((0, self.dim), np.float32)
        )
        labels = (
            np.concatenate([batch_labels for _, batch_labels, _ in self.pending])
            if self.pending
            else np.zeros(0, np.int32)
        )
        ids = [i for _, _, batch_ids in self.pending for i in batch_ids]
        table = build_table(features[:count], labels[:count], ids[:count], "vector", self.dim, self.layout)
        uri = join_uri(self.folder, f"part-{len(self.uris):05d}.parquet")
        write_shard(table, uri, self.filesystem)
        self.uris.append(uri)
        rest = len(features) - count
        self.pending = [(features[count:], labels[count:], ids[count:])] if rest else []
        self.pending_rows = rest


def extract_features(
    rows,
    encoder: str | EncoderSpec,
    modality: str,
    split: str,
    out_dir: str,
    batch_size: int = 64,
    num_actors: int | None = None,
    rows_per_shard: int = 4096,
    name: str | None = None,
    layout: str = DEFAULT_LAYOUT,
) -> list[str]:
    """Encode every row of the Ray Dataset ``rows`` with ``encoder`` into ``out_dir/<modality>/<split>``.

    Returns the shard URIs in order. Rows keep their input order, so ids line up with the source.
    ``modality`` is the encoder's input kind ('image' or 'text'); ``name`` is the modality's name in the
    dataset and shard folder (default: ``modality``); ``layout`` the shards' payload layout
    (``format.LAYOUTS``).
    """
    from ray.data import ActorPoolStrategy

    spec = parse_encoder(encoder) if isinstance(encoder, str) else encoder
    dim = feature_dim(spec, modality)
    actors, remote_args, threads = actor_resources(num_actors)
    features = rows.map_batches(
        EncodeBatch,
        fn_constructor_args=(spec.text, modality, threads),
        batch_size=batch_size,
        batch_format="numpy",
        compute=ActorPoolStrategy(size=actors),
        **remote_args,
    )
    # ordered output makes shards reproducible row for row, whatever actor finished first; set on this
    # dataset's own context so other Ray Data users in the process keep their settings
    features.context.execution_options.preserve_order = True
    writer = ShardWriter(out_dir, name or modality, split, dim, rows_per_shard, layout)
    total = rows.count()
    start, next_report = time.perf_counter(), 0.0
    for batch in features.iter_batches(batch_size=None, batch_format="numpy"):
        writer.add(np.asarray(batch["features"], dtype=np.float32), batch["label"], batch["id"])
        if time.perf_counter() >= next_report or writer.rows == total:
            elapsed = time.perf_counter() - start
            print(
                f"extract {modality}/{split}: {writer.rows}/{total} rows "
                f"({writer.rows / max(elapsed, 1e-9):.1f} rows/s)",
                file=sys.stderr,
                flush=True,
            )
            next_report = time.perf_counter() + 10.0
    if writer.rows != total:
        raise DataError(f"extract {modality}/{split}: {total} rows in, {writer.rows} features out")
    return writer.close()
