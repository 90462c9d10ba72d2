"""Ray Data streams of unpaired modality shards (the only module here that touches Ray Data).

Each (modality, split) is its own Ray Data dataset read from Parquet. On a worker, each modality
is consumed as an independent, endlessly repeating stream of seeded shuffled batches — never
paired with another modality's rows.

Speed: features leave Arrow as zero-copy numpy views (``table_to_numpy``) instead of
``iter_torch_batches``' per-column conversion. A dataset that fits ``data.cache_max_mb`` is
read once per run or sweep by the driver (``read_table``), put in the Ray object store, and
served from memory by every trial and worker (``TableSource``): no Ray Data job per trial.
Larger ones stream through Ray Data (``build_streamed_datasets``). In-memory shares are sorted
by row id and split by rank, so batch order depends only on the seed, the rank and the epoch:
a resumed run draws exactly the batches an uninterrupted run would.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from uml_ray.data.format import FEATURES, ID, IMAGE, LABEL, Manifest, table_to_numpy
from uml_ray.uri import filesystem_for, is_remote

log = logging.getLogger("uml_ray")

READ_TASK_CPUS = 0.25  # Ray Data read tasks stay small so they fit beside the training workers


@dataclass
class StreamSpec:
    """How a worker consumes one dataset: its kind/dim, and whether its share is cached in memory."""

    name: str
    kind: str
    dim: int
    rows: int
    cached: bool


def dataset_name(modality: str, split: str) -> str:
    """The Ray Train dataset name of a (modality, split)."""
    return f"{modality}.{split}"


def _filesystem(uri: str):
    if is_remote(uri):
        filesystem, _ = filesystem_for(uri)
        return filesystem
    return None


def count_rows(uris: list[str]) -> int:
    """Rows in a list of shards, read from the Parquet footers only."""
    total = 0
    for path, filesystem in (_located([uri]) for uri in uris):
        total += pq.ParquetFile(path[0], filesystem=filesystem).metadata.num_rows
    return total


def encoded_mb(uris: list[str], column: str) -> float:
    """Uncompressed size in MB of one column of a list of shards, from the Parquet footers only."""
    total = 0
    for path, filesystem in (_located([uri]) for uri in uris):
        metadata = pq.ParquetFile(path[0], filesystem=filesystem).metadata
        index = metadata.schema.names.index(column)
        total += sum(
            metadata.row_group(g).column(index).total_uncompressed_size
            for g in range(metadata.num_row_groups)
        )
    return total / 2**20


def plan_streams(manifest: Manifest, auxiliary: list[str], cache_max_mb: int) -> dict[str, StreamSpec]:
    """Decide, before any cluster work, which datasets a run reads and which are held in memory."""
    wanted = [(manifest.target, split) for split in ("train", "val", "test")]
    wanted += [(name, "train") for name in auxiliary]
    plan = {}
    for modality, split in wanted:
        spec = manifest.modalities[modality]
        uris = manifest.uris(modality, split)
        rows = count_rows(uris)
        steps_per_row = 64 if spec.kind == "sequence" else 1
        # the driver holds the whole table once per sweep, whatever the worker count
        table_mb = rows * spec.dim * 4 * steps_per_row / 2**20
        name = dataset_name(modality, split)
        # the sequence probe makes ordered passes over the target's splits beside the endless
        # train stream, which a live streaming_split iterator cannot serve: those are always cached
        cached = table_mb <= cache_max_mb or (spec.kind == "sequence" and modality == manifest.target)
        if spec.kind == "image":
            # memory holds encoded bytes only (pixels are decoded per batch). A train split whose
            # bytes exceed cache_max_mb streams through Ray Data with a shuffle buffer; val and test
            # are read in ordered passes beside the endless train stream, so they are always held
            cached = split != "train" or encoded_mb(uris, IMAGE) <= cache_max_mb
        plan[name] = StreamSpec(name=name, kind=spec.kind, dim=spec.dim, rows=rows, cached=cached)
    return plan


def _select_per_class(table: pa.Table, k: int, seed: int) -> pa.Table:
    """k rows per class, chosen by a seeded permutation of the id-sorted rows."""
    table = table.sort_by(ID)
    labels = table.column(LABEL).to_numpy(zero_copy_only=False)
    rng = np.random.default_rng(seed)
    keep = []
    for label in np.unique(labels):
        rows = np.flatnonzero(labels == label)
        keep.extend(sorted(rng.permutation(rows)[:k]))
    return table.take(pa.array(sorted(keep)))


def _class_means(table: pa.Table) -> pa.Table:
    """One row per class: the mean feature vector of that class."""
    dim = table.schema.field(FEATURES).type.list_size
    features, labels = table_to_numpy(table, "vector", dim)
    classes = np.unique(labels)
    means = np.stack([features[labels == c].mean(axis=0) for c in classes]).astype(np.float32)
    return pa.table(
        {
            FEATURES: pa.FixedSizeListArray.from_arrays(pa.array(means.reshape(-1)), dim),
            LABEL: pa.array(classes.astype(np.int32)),
            ID: pa.array([f"class-mean-{c}" for c in classes]),
        },
        schema=table.schema,
    )


def read_table(uris: list[str]) -> pa.Table:
    """Every row of a (modality, split) as one Arrow table, read with pyarrow (local or object store)."""
    paths, filesystem = _located(uris)
    return pq.read_table(paths, filesystem=filesystem, page_checksum_verification=True).combine_chunks()


def _located(uris: list[str]) -> tuple[list[str], object]:
    """(paths, filesystem) for pyarrow: object-store URIs lose their scheme and get their filesystem."""
    filesystem = _filesystem(uris[0])
    return ([u.split("://", 1)[1] for u in uris] if filesystem is not None else uris), filesystem


def read_column(uris: list[str], column: str) -> np.ndarray:
    """One column of a (modality, split) as a numpy array (the other columns are not read)."""
    paths, filesystem = _located(uris)
    return (
        pq.read_table(paths, filesystem=filesystem, columns=[column], page_checksum_verification=True)
        .column(column)
        .to_numpy()
    )


def shape_target(table: pa.Table, target_per_class: int, seed: int) -> pa.Table:
    """The target's train split as a run uses it: k rows per class (``data.target_per_class``), else whole."""
    return _select_per_class(table, target_per_class, seed) if target_per_class > 0 else table


def shape_auxiliary(table: pa.Table, aux_per_class: int, aux_class_mean: bool, seed: int) -> pa.Table:
    """An auxiliary vector modality as a run uses it: k rows per class and/or per-class means."""
    if aux_per_class > 0:
        table = _select_per_class(table, aux_per_class, seed)
    if aux_class_mean:
        table = _class_means(table)
    return table


class TableSource:
    """An in-memory table behind the slice of Ray Data's iterator API that ``BatchStream`` uses."""

    def __init__(self, table: pa.Table):
        self.table = table

    def iter_batches(self, batch_size=None, batch_format="pyarrow", **_):
        """The whole table at once (``batch_size=None``), else slices of ``batch_size`` rows."""
        if batch_size is None:
            yield self.table
            return
        for start in range(0, len(self.table), batch_size):
            yield self.table.slice(start, batch_size)


class ParquetSource:
    """A share streamed straight from its Parquet shards by pyarrow, behind the same slice of Ray
    Data's iterator API as ``TableSource``: for a one-process run, where Ray Data's per-epoch
    execution start-up (seconds) would cost more than the read itself. Row groups are read in file
    order (so an epoch's order, and a resume, are exact) by a thread ``readahead`` blocks ahead;
    pyarrow decodes without the GIL, so reading overlaps the training step."""

    def __init__(self, uris: list[str], block_rows: int = 8192, readahead: int = 2):
        self.uris = uris
        self.block_rows = block_rows
        self.readahead = readahead

    def _blocks(self):
        for uri in self.uris:
            paths, filesystem = _located([uri])
            yield from pq.ParquetFile(
                paths[0], filesystem=filesystem, page_checksum_verification=True
            ).iter_batches(batch_size=self.block_rows)

    def iter_batches(self, batch_size=None, batch_format="pyarrow", **_):
        """Blocks as read (``batch_size=None``), else tables of ``batch_size`` rows; the last may be short."""
        pending: list[pa.Table] = []
        held = 0
        for block in read_ahead(self._blocks(), self.readahead):
            table = pa.Table.from_batches([block])
            if batch_size is None:
                yield table
                continue
            pending.append(table)
            held += len(table)
            while held >= batch_size:
                table = _concat(pending)
                yield table.slice(0, batch_size)
                pending, held = [table.slice(batch_size)], held - batch_size
        if batch_size is not None and held:
            yield _concat(pending)


@contextlib.contextmanager
def opened(iterable):
    """An iterator over ``iterable``, closed on leaving the block: now, while Ray is up. Left to the
    garbage collector, a Ray Data iterator reports its stats whenever it is collected, and after
    ``ray.shutdown()`` that is a logging error on stderr."""
    iterator = iter(iterable)
    try:
        yield iterator
    finally:
        close = getattr(iterator, "close", None)
        if close is not None:
            close()


def read_ahead(items, depth: int):
    """``items`` produced by a thread up to ``depth`` ahead of the consumer; the thread ends when the
    consumer stops early, and an error in it is raised in the consumer."""
    import queue
    import threading

    slots: queue.Queue = queue.Queue(maxsize=depth)
    done, stop = object(), threading.Event()

    def offer(item) -> bool:
        while not stop.is_set():
            try:
                slots.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def produce():
        try:
            for item in items:
                if not offer(item):
                    return
            offer(done)
        except BaseException as exc:  # noqa: BLE001 - handed to the consumer
            offer(exc)

    thread = threading.Thread(target=produce, daemon=True, name="uml-ray-read-ahead")
    thread.start()
    try:
        while True:
            item = slots.get()
            if item is done:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()


def build_streamed_datasets(
    manifest: Manifest, plan: dict[str, StreamSpec], aux_per_class: int, aux_class_mean: bool, seed: int
) -> dict:
    """Lazy Ray Data datasets of the shares too large to hold in memory (``cached`` False), keyed by name.

    Auxiliary row options run as groupby operations; Ray Train splits these across workers.
    """
    import ray.data

    datasets = {}
    for name, spec in plan.items():
        if spec.cached:
            continue
        modality, split = name.rsplit(".", 1)
        uris = manifest.uris(modality, split)
        paths, filesystem = _located(uris)
        ds = ray.data.read_parquet(paths, filesystem=filesystem, num_cpus=READ_TASK_CPUS)
        if modality != manifest.target and spec.kind == "vector":
            if aux_per_class > 0:
                ds = ds.groupby(LABEL).map_groups(
                    lambda t: _select_per_class(t, aux_per_class, seed), batch_format="pyarrow"
                )
            if aux_class_mean:
                ds = ds.groupby(LABEL).map_groups(_class_means, batch_format="pyarrow")
        datasets[name] = ds
    return datasets


def start_ray_data_helpers(timeout_s: float = 60.0) -> None:
    """Start Ray Data's cluster-wide helper actors from this (driver) process, on its node.

    Ray Data creates detached helper actors (the stats actor, the autoscaling coordinator) on the
    node of the first process that runs a dataset. Were that a trial on an autoscaled GPU node,
    the actors would keep the node busy for good and the autoscaler would never remove it. Their
    getters pin them to the calling process's node; trials later find them by name.
    """
    import ray

    try:
        from ray.data._internal.cluster_autoscaler.default_autoscaling_coordinator import (
            get_or_create_autoscaling_coordinator,
        )
        from ray.data._internal.stats import get_or_create_stats_actor
    except ImportError as exc:  # another Ray version: the helpers land wherever Ray Data first runs
        log.warning(
            "Ray Data helper actors not started on the driver's node (%s); an autoscaled node may stay up",
            exc,
        )
        return
    actors = [get_or_create_stats_actor(), get_or_create_autoscaling_coordinator()]
    try:
        ray.get([actor.__ray_ready__.remote() for actor in actors], timeout=timeout_s)
    except ray.exceptions.GetTimeoutError:
        log.warning("Ray Data helper actors did not start within %.0f s on the driver's node", timeout_s)


def _to_arrays(table: pa.Table, spec: StreamSpec):
    features, labels = table_to_numpy(table, spec.kind, spec.dim)
    return features, labels


def _sorted_by_id(table: pa.Table) -> bool:
    ids = table.column(ID)
    return len(table) < 2 or pc.all(pc.less_equal(ids.slice(0, len(table) - 1), ids.slice(1))).as_py()


def _concat(tables: list[pa.Table]) -> pa.Table:
    return pa.concat_tables(tables).combine_chunks() if tables else None


@dataclass(eq=False, repr=False)
class BatchStream:
    """An endless stream of shuffled batches from one worker's share of a dataset.

    ``iterator`` is a Ray Data ``DataIterator`` (``ray.train.get_dataset_shard`` in a Train worker,
    ``Dataset.iterator()`` in a single-process trial) or a ``TableSource`` over an in-memory share.
    Batches are (features, labels) numpy arrays; for sequences, features are (steps, lengths).
    State is (epoch, batches drawn this epoch).
    """

    iterator: object
    spec: StreamSpec
    batch_size: int
    seed: int
    rank: int
    world_size: int
    shuffle_buffer: int = 4096
    epoch: int = field(default=0, init=False)
    drawn: int = field(default=0, init=False)
    _table: pa.Table | None = field(default=None, init=False)
    _arrays: tuple | None = field(default=None, init=False)
    _batches: object = field(default=None, init=False)

    def state_dict(self) -> dict:
        """Position in the stream, for checkpoints."""
        return {"epoch": self.epoch, "drawn": self.drawn}

    def load_state_dict(self, state: dict) -> None:
        """Continue from a saved position (the next batch is the one an uninterrupted run would draw)."""
        self.epoch, self.drawn = int(state["epoch"]), int(state["drawn"])
        self._batches = None

    def _rng(self, epoch: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, self.rank, epoch])

    def table(self) -> pa.Table:
        """This worker's whole share, id-sorted (read once, then held): the cached path."""
        if self._table is None:
            tables = [batch for batch in self.iterator.iter_batches(batch_size=None, batch_format="pyarrow")]
            table = _concat(
                [pa.Table.from_batches([b]) if isinstance(b, pa.RecordBatch) else b for b in tables]
            )
            if not _sorted_by_id(
                table
            ):  # the driver's tables come sorted: a check costs 1000x less than a sort
                table = table.sort_by(ID)
            if self.world_size > 1:  # cached datasets reach every worker whole
                table = table.take(pa.array(np.arange(self.rank, len(table), self.world_size)))
            if len(table) == 0:
                raise RuntimeError(
                    f"dataset '{self.spec.name}' has no rows on worker {self.rank} of {self.world_size}; "
                    "use fewer workers or more data"
                )
            self._table = table
        return self._table

    def _epoch_from_cache(self, epoch: int):
        table = self.table()
        n = len(table)
        order = self._rng(epoch).permutation(n)
        # a share smaller than one batch is served whole instead of dropped (the reference's
        # per-class-mean text set crashed here when classes < batch size)
        size = min(self.batch_size, n)
        usable = order[: n // size * size]
        if self.spec.kind == "vector":
            if self._arrays is None:
                self._arrays = _to_arrays(table, self.spec)
            features, labels = self._arrays
            for start in range(0, len(usable), size):
                rows = usable[start : start + size]
                yield features[rows], labels[rows]
            return
        yield from self._shuffled_batches(table, usable, size)

    def _epoch_streamed(self, epoch: int):
        for table, order, size in self._shuffle_buffered(epoch):
            yield from self._shuffled_batches(table, order, size)

    def _shuffle_buffered(self, epoch: int):
        """One epoch of a streamed share through the shuffle buffer: ``(table, row order, batch size)``
        each time the buffer fills (whole batches; the rest stays for the next fill) and once for
        what is left at the end, permuted with the epoch's seed."""
        rng = self._rng(epoch)
        buffer: list[pa.Table] = []
        buffered = 0
        # native blocks (batch_size=None) skip Ray Data's re-batching; the buffer shuffles them
        with opened(
            self.iterator.iter_batches(batch_size=None, batch_format="pyarrow", prefetch_batches=2)
        ) as batches:
            for batch in batches:
                buffer.append(batch if isinstance(batch, pa.Table) else pa.Table.from_batches([batch]))
                buffered += len(buffer[-1])
                if buffered >= self.shuffle_buffer:
                    table = _concat(buffer)
                    full = len(table) // self.batch_size * self.batch_size
                    order = rng.permutation(len(table))
                    yield table, order[:full], self.batch_size
                    rest = table.take(pa.array(order[full:]))
                    buffer, buffered = [rest], len(rest)
        if buffered:
            table = _concat(buffer)
            size = min(self.batch_size, len(table))
            order = rng.permutation(len(table))
            yield table, order[: len(table) // size * size], size

    def _shuffled_batches(self, table: pa.Table, order: np.ndarray, size: int):
        if self.spec.kind == "vector":
            features, labels = _to_arrays(table, self.spec)
            for start in range(0, len(order), size):
                rows = order[start : start + size]
                yield features[rows], labels[rows]
            return
        for start in range(0, len(order), size):
            yield _to_arrays(table.take(pa.array(order[start : start + size])), self.spec)

    def _epoch(self, epoch: int):
        return self._epoch_from_cache(epoch) if self.spec.cached else self._epoch_streamed(epoch)

    def next(self):
        """The next batch; crosses epoch boundaries forever."""
        while True:
            if self._batches is None:
                self._batches = self._epoch(self.epoch)
                for _ in range(self.drawn):  # resume mid-epoch: skip what was already drawn
                    next(self._batches)
            try:
                batch = next(self._batches)
                self.drawn += 1
                return batch
            except StopIteration:
                self.epoch += 1
                self.drawn = 0
                self._batches = None

    def close(self) -> None:
        """End the epoch in progress, and with it any Ray Data read-ahead it holds.

        The loop calls this when done.
        """
        if self._batches is not None:
            self._batches.close()
            self._batches = None

    def batches_per_epoch(self) -> int:
        """Batches in one epoch of this worker's share (cached shares only; streamed shares estimate)."""
        rows = len(self.table()) if self.spec.cached else max(self.spec.rows // max(self.world_size, 1), 1)
        return max(rows // min(self.batch_size, rows), 1)

    def iter_once(self, batch_size: int):
        """One ordered pass (evaluation): every row of this worker's share exactly once."""
        if self.spec.cached:
            table = self.table()
            for start in range(0, len(table), batch_size):
                yield _to_arrays(table.slice(start, batch_size), self.spec)
            return
        with opened(self.iterator.iter_batches(batch_size=batch_size, batch_format="pyarrow")) as batches:
            for batch in batches:
                table = batch if isinstance(batch, pa.Table) else pa.Table.from_batches([batch])
                yield _to_arrays(table, self.spec)
