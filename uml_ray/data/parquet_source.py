"""Shards streamed by pyarrow (``ParquetSource``), one rank's row range of them: read ahead on a
thread the first time, replayed from the decoded feature cache after that."""

from __future__ import annotations

import os

import pyarrow.parquet as pq

from uml_ray.data.feature_cache import BlockCache, rebatch
from uml_ray.data.read_ahead import ReadAhead
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


def rank_range(rows: int, rank: int, world_size: int) -> tuple[int, int]:
    """The rows ``[start, stop)`` of a dataset's ``rows`` (in shard order) that rank ``rank`` of
    ``world_size`` reads: contiguous ranges balanced by row count (sizes differ by at most one row),
    so every row is read by exactly one worker each epoch, however the shards divide."""
    return rows * rank // world_size, rows * (rank + 1) // world_size


class ParquetSource:
    """A share streamed straight from its Parquet shards by pyarrow, behind the same slice of Ray
    Data's iterator API as ``TableSource``: no Ray Data execution to start every epoch (seconds, more
    than the read itself). Rank ``rank`` of ``world_size`` reads its ``rank_range`` of the rows in
    shard order, so an epoch's order (and a resume) is exact, and a multi-worker run reads every row
    once per epoch with no row exchanged between workers. Blocks of ``block_rows`` are read by a
    thread ahead of the consumer (``ReadAhead``: ``readahead`` blocks, or ``"auto"``: sized from the
    measured read and step times, starting at ``burst + 1`` — ``burst``: blocks the consumer takes at
    once); pyarrow decodes without the GIL, so reading overlaps the training step. Page checksums are
    verified on a shard's first full read in this source, not on every epoch (half the read's time).
    The first full pass is written to the decoded feature cache (``cache``; ``BlockCache.for_dataset``,
    skipped when the decoded share would exceed ``cache_max_bytes``) and every later one, in this run or
    the next on this node, replays it memory-mapped, in the same blocks."""

    def __init__(
        self,
        uris: list[str],
        block_rows: int = 8192,
        readahead="auto",
        cache: bool = True,
        rank: int = 0,
        world_size: int = 1,
        cache_max_bytes: int | None = None,
        burst: int = 1,
    ):
        self.uris = uris
        self.block_rows = block_rows
        self.readahead = readahead
        self.burst = burst
        self._footers = [_footer(uri) for uri in uris]
        total = sum(metadata.num_rows for metadata in self._footers)
        self.start, self.stop = rank_range(total, rank, world_size)
        part = None if world_size == 1 else (self.start, self.stop)
        decoded = sum(
            metadata.row_group(g).total_byte_size
            for metadata in self._footers
            for g in range(metadata.num_row_groups)
        )
        self.decoded_bytes = decoded * (self.stop - self.start) // max(total, 1)
        self._verified: set[str] = set()  # shards whose pages this source has read through once
        self.cache = (
            BlockCache.for_dataset(uris, block_rows, shard_stat, part, self.decoded_bytes, cache_max_bytes)
            if cache
            else None
        )

    @property
    def rows(self) -> int:
        """Rows in this rank's share."""
        return self.stop - self.start

    def _blocks(self):
        offset = 0  # the first row of the current shard in the dataset
        for uri, metadata in zip(self.uris, self._footers):
            first, last = max(self.start - offset, 0), min(self.stop - offset, metadata.num_rows)
            offset += metadata.num_rows
            if first >= last:
                continue
            paths, filesystem = located([uri])
            verify = uri not in self._verified
            shard = pq.ParquetFile(paths[0], filesystem=filesystem, page_checksum_verification=verify)
            if (first, last) == (0, metadata.num_rows):
                yield from shard.iter_batches(batch_size=self.block_rows)
                self._verified.add(uri)
                continue
            # the row groups overlapping [first, last), cut to it
            groups, row, begin = [], 0, None
            for g in range(metadata.num_row_groups):
                size = metadata.row_group(g).num_rows
                if row < last and row + size > first:
                    groups.append(g)
                    begin = row if begin is None else begin
                row += size
            for batch in shard.iter_batches(batch_size=self.block_rows, row_groups=groups):
                low, high = max(first - begin, 0), min(last - begin, len(batch))
                begin += len(batch)
                if high > low:
                    yield batch.slice(low, high - low)
            self._verified.add(uri)

    def iter_batches(self, batch_size=None, batch_format="pyarrow", **_):
        """Blocks as read (``batch_size=None``), else tables of ``batch_size`` rows; the last may be short."""

        if self.cache is not None and self.cache.ready:
            blocks = self.cache.blocks(self._blocks)  # replayed memory-mapped: nothing to read ahead
        else:
            # a first pass is recorded on the reading thread: writing the cache overlaps the step too
            blocks = self._blocks() if self.cache is None else self.cache.blocks(self._blocks)
            blocks = ReadAhead(blocks, self.readahead, self.burst)
        yield from rebatch(blocks, batch_size)


def _footer(uri: str):
    paths, filesystem = located([uri])
    return pq.ParquetFile(paths[0], filesystem=filesystem).metadata
