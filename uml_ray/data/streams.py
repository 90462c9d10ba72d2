"""Ray Data streams of unpaired modality shards (the only module here that touches Ray Data).

Each (modality, split) is its own Ray Data dataset read from Parquet. On a worker, each modality
is consumed as an independent, endlessly repeating stream of seeded shuffled batches — never
paired with another modality's rows.

Speed: features leave Arrow as zero-copy numpy views (``table_to_numpy``) instead of
``iter_torch_batches``' per-column conversion. A dataset that fits ``data.cache_max_mb`` is
read once per run or sweep by the driver (``read_table``), put in the Ray object store, and
served from memory by every trial and worker (``TableSource``): no Ray Data job per trial.
Larger ones stream by pyarrow (``ParquetSource``: in a multi-worker run each worker reads its own
row range of the shards), or through Ray Data split across workers (``ray_streams``: images, shaped
auxiliaries, ``data.stream_reader=ray_data``); either way the first pass is kept decoded on local
disk and later epochs replay it memory-mapped (``feature_cache``). In-memory shares are sorted
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

from uml_ray.data.feature_cache import BlockCache, SpooledSource
from uml_ray.data.format import FEATURES, ID, IMAGE, LABEL, layout_of, table_to_numpy, vector_array
from uml_ray.data.manifest import Manifest
from uml_ray.data.parquet_source import ParquetSource, count_rows, encoded_mb, located

log = logging.getLogger("uml_ray")


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
    feature_type = table.schema.field(FEATURES).type
    layout = layout_of(feature_type)  # the means keep the shards' layout, so the stream's schema holds
    dim = feature_type.byte_width // 4 if layout == "binary" else feature_type.list_size
    features, labels = table_to_numpy(table, "vector", dim)
    classes = np.unique(labels)
    means = np.stack([features[labels == c].mean(axis=0) for c in classes]).astype(np.float32)
    return pa.table(
        {
            FEATURES: vector_array(means, dim, layout),
            LABEL: pa.array(classes.astype(np.int32)),
            ID: pa.array([f"class-mean-{c}" for c in classes]),
        },
        schema=table.schema,
    )


def read_table(uris: list[str]) -> pa.Table:
    """Every row of a (modality, split) as one Arrow table, read with pyarrow (local or object store)."""
    paths, filesystem = located(uris)
    return pq.read_table(paths, filesystem=filesystem, page_checksum_verification=True).combine_chunks()


def read_column(uris: list[str], column: str) -> np.ndarray:
    """One column of a (modality, split) as a numpy array (the other columns are not read)."""
    paths, filesystem = located(uris)
    table = pq.read_table(paths, filesystem=filesystem, columns=[column], page_checksum_verification=True)
    return table.column(column).to_numpy()


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


def _to_arrays(table: pa.Table, spec: StreamSpec):
    return table_to_numpy(table, spec.kind, spec.dim)


def _sorted_by_id(table: pa.Table) -> bool:
    ids = table.column(ID)
    return len(table) < 2 or pc.all(pc.less_equal(ids.slice(0, len(table) - 1), ids.slice(1))).as_py()


def _concat(tables: list[pa.Table]) -> pa.Table:
    """One table of contiguous columns; a lone contiguous table as it is (a one-block fill: no copy)."""
    tables = [table for table in tables if len(table)] or tables[:1]
    if len(tables) == 1 and all(column.num_chunks <= 1 for column in tables[0].columns):
        return tables[0]
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
    cache_max_bytes: int | None = None  # the largest Ray Data share spooled to the decoded cache
    epoch: int = field(default=0, init=False)
    drawn: int = field(default=0, init=False)
    _table: pa.Table | None = field(default=None, init=False)
    _arrays: tuple | None = field(default=None, init=False)
    _batches: object = field(default=None, init=False)

    def __post_init__(self):
        # a streamed vector share from Ray Data is spooled on its first pass: one execution per run
        if not self.spec.cached and self.spec.kind == "vector":
            if not isinstance(self.iterator, (TableSource, ParquetSource, SpooledSource)):
                spool = BlockCache.for_share(self.cache_max_bytes)
                self.iterator = self.iterator if spool is None else SpooledSource(self.iterator, spool)

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
            blocks = self.iterator.iter_batches(batch_size=None, batch_format="pyarrow")
            table = _concat([b if isinstance(b, pa.Table) else pa.Table.from_batches([b]) for b in blocks])
            # the driver's tables come sorted: a check costs 1000x less than a sort
            if not _sorted_by_id(table):
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
                batch = batch if isinstance(batch, pa.Table) else pa.Table.from_batches([batch])
                # ids are not drawn: a vector buffer holds (and copies) only what batches are made of
                buffer.append(batch.select([FEATURES, LABEL]) if self.spec.kind == "vector" else batch)
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
        if isinstance(self.iterator, SpooledSource):
            self.iterator.close()

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
