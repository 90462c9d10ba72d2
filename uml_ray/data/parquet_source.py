"""Shards streamed by pyarrow in one process (``ParquetSource``): read ahead on a thread the first
time, replayed from the decoded feature cache after that."""

from __future__ import annotations

import os
import queue
import threading

import pyarrow.parquet as pq

from uml_ray.data.feature_cache import BlockCache, rebatch
from uml_ray.uri import filesystem_for, is_remote


def located(uris: list[str]) -> tuple[list[str], object]:
    """(paths, filesystem) for pyarrow: object-store URIs lose their scheme and get their filesystem."""
    if not is_remote(uris[0]):
        return uris, None
    filesystem, _ = filesystem_for(uris[0])
    return [u.split("://", 1)[1] for u in uris], filesystem


def shard_stat(uri: str) -> tuple[int, int]:
    """(size, mtime_ns) of one shard: what the feature cache's key watches for rewrites."""
    paths, filesystem = located([uri])
    if filesystem is None:
        stat = os.stat(paths[0])
        return stat.st_size, stat.st_mtime_ns
    info = filesystem.get_file_info(paths[0])
    return info.size, info.mtime_ns


def count_rows(uris: list[str]) -> int:
    """Rows in a list of shards, read from the Parquet footers only."""
    total = 0
    for path, filesystem in (located([uri]) for uri in uris):
        total += pq.ParquetFile(path[0], filesystem=filesystem).metadata.num_rows
    return total


def encoded_mb(uris: list[str], column: str) -> float:
    """Uncompressed size in MB of one column of a list of shards, from the Parquet footers only."""
    total = 0
    for path, filesystem in (located([uri]) for uri in uris):
        metadata = pq.ParquetFile(path[0], filesystem=filesystem).metadata
        index = metadata.schema.names.index(column)
        total += sum(
            metadata.row_group(g).column(index).total_uncompressed_size
            for g in range(metadata.num_row_groups)
        )
    return total / 2**20


class ParquetSource:
    """A share streamed straight from its Parquet shards by pyarrow, behind the same slice of Ray
    Data's iterator API as ``TableSource``: for a one-process run, where Ray Data's per-epoch
    execution start-up (seconds) would cost more than the read itself. Row groups are read in file
    order (so an epoch's order, and a resume, are exact) by a thread ``readahead`` blocks ahead;
    pyarrow decodes without the GIL, so reading overlaps the training step. The first full pass is
    written to the decoded feature cache (``cache``; default: ``BlockCache.for_dataset``) and every
    later one, in this run or the next on this node, replays it memory-mapped, in the same blocks."""

    def __init__(self, uris: list[str], block_rows: int = 8192, readahead: int = 2, cache: bool = True):
        self.uris = uris
        self.block_rows = block_rows
        self.readahead = readahead
        self.cache = BlockCache.for_dataset(uris, block_rows, shard_stat) if cache else None

    def _blocks(self):
        for uri in self.uris:
            paths, filesystem = located([uri])
            yield from pq.ParquetFile(
                paths[0], filesystem=filesystem, page_checksum_verification=True
            ).iter_batches(batch_size=self.block_rows)

    def iter_batches(self, batch_size=None, batch_format="pyarrow", **_):
        """Blocks as read (``batch_size=None``), else tables of ``batch_size`` rows; the last may be short."""
        if self.cache is None:
            blocks = read_ahead(self._blocks(), self.readahead)
        else:
            blocks = self.cache.blocks(lambda: read_ahead(self._blocks(), self.readahead))
        yield from rebatch(blocks, batch_size)


def read_ahead(items, depth: int):
    """``items`` produced by a thread up to ``depth`` ahead of the consumer; the thread ends when the
    consumer stops early, and an error in it is raised in the consumer."""
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
