"""Streamed shares split across workers by pyarrow (each rank its own row range of the shards), and
the read-ahead depth sized from the measured read and step times."""

from __future__ import annotations

import time

import numpy as np
import pyarrow as pa
import pytest

from uml_ray.data.feature_cache import CACHE_ENV
from uml_ray.data.format import write_shards
from uml_ray.data.parquet_source import ParquetSource, rank_range
from uml_ray.data.read_ahead import ReadAhead, readahead_depth
from uml_ray.data.streams import BatchStream, StreamSpec

ROWS, DIM = 1003, 4  # shards of 128 rows: no worker count divides them evenly


@pytest.fixture
def uris(tmp_path, monkeypatch):
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "cache"))
    rng = np.random.default_rng(0)
    features = rng.normal(size=(ROWS, DIM)).astype(np.float32)
    return write_shards(
        str(tmp_path), "text", "train", features, rng.integers(0, 5, ROWS), rows_per_shard=128
    )


def ids(batches) -> list[str]:
    return [i for batch in batches for i in batch.column("id").to_pylist()]


def stream(source, rank: int, world_size: int) -> BatchStream:
    spec = StreamSpec("text.train", "vector", DIM, ROWS, cached=False)
    return BatchStream(source, spec, 16, seed=5, rank=rank, world_size=world_size, shuffle_buffer=100)


def epoch_batches(batches: BatchStream) -> dict:
    """The feature bytes of each batch of a stream's next epoch, keyed by (epoch, index)."""
    epoch, drawn = batches.epoch, {}
    while batches.epoch == epoch:
        features, labels = batches.next()
        if batches.epoch == epoch:
            drawn[(epoch, batches.drawn - 1)] = features.tobytes()
    return drawn


def test_rank_ranges_cover_every_row_once_and_balance_by_rows():
    for rows, world in ((1003, 2), (1003, 3), (7, 4), (3, 4)):
        ranges = [rank_range(rows, rank, world) for rank in range(world)]
        assert ranges[0][0] == 0 and ranges[-1][1] == rows
        assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))  # contiguous: no gap, no overlap
        sizes = [stop - start for start, stop in ranges]
        assert max(sizes) - min(sizes) <= 1, sizes


@pytest.mark.parametrize("world_size", [2, 3])
def test_workers_read_every_row_once_per_epoch_and_the_cache_replays_the_same_blocks(uris, world_size):
    whole = ids(ParquetSource(uris, cache=False).iter_batches())
    assert len(whole) == ROWS
    shares = []
    for rank in range(world_size):
        read = ParquetSource(uris, block_rows=50, rank=rank, world_size=world_size)
        first = list(read.iter_batches())  # recorded to the cache
        assert read.cache.ready and len(ids(first)) == read.rows
        again = ParquetSource(uris, block_rows=50, rank=rank, world_size=world_size)
        replayed = list(again.iter_batches())
        assert [len(b) for b in replayed] == [len(b) for b in first]
        assert pa.concat_tables(replayed).equals(pa.concat_tables(first))
        shares.append(ids(first))
    # the ranks' shares, in rank order, are the dataset in shard order: each row exactly once
    assert [i for share in shares for i in share] == whole
    # one worker reads what a one-process run reads, in the same blocks (the same cache key, too)
    alone = ParquetSource(uris, block_rows=50, rank=0, world_size=1)
    assert [len(b) for b in alone.iter_batches()] == [
        len(b) for b in ParquetSource(uris, block_rows=50).iter_batches()
    ]


def test_two_workers_draw_disjoint_batches_a_new_order_each_epoch_and_resume_exactly(uris):
    epochs = {}
    for rank in (0, 1):
        batches = stream(ParquetSource(uris, block_rows=50, rank=rank, world_size=2), rank, 2)
        epochs[rank] = [epoch_batches(batches) for _ in range(3)]
        resumed = stream(ParquetSource(uris, block_rows=50, rank=rank, world_size=2), rank, 2)
        resumed.load_state_dict({"epoch": 1, "drawn": 7})
        for d in range(7, 12):
            assert resumed.next()[0].tobytes() == epochs[rank][1][(1, d)]
        assert epochs[rank][1] != {(0, d): f for (_, d), f in epochs[rank][0].items()}  # a new order
    # each epoch the two workers' batches hold different rows (of 16 rows, drop the partial tail)
    whole_rows = {rank: b"".join(epochs[rank][0].values()) for rank in (0, 1)}
    features = np.frombuffer(whole_rows[0], np.float32).reshape(-1, DIM)
    others = {tuple(row) for row in np.frombuffer(whole_rows[1], np.float32).reshape(-1, DIM)}
    assert not any(tuple(row) in others for row in features)
    assert len(features) + len(others) >= ROWS - 2 * 16  # all but each worker's last partial batch


def test_read_ahead_depth_follows_read_and_step_times():
    block = 8192 * 384 * 4  # 12 MiB: a block of 8192 384-d float32 rows
    # reads hide behind the step: a fill of 1 block plus one being read is enough
    assert readahead_depth(read_s=0.010, consume_s=0.080, burst=1, block_bytes=block) == 2
    # a shuffle buffer of 4 blocks taken at once: 4 ahead plus one in the pipe
    assert readahead_depth(read_s=0.010, consume_s=0.080, burst=4, block_bytes=block) == 5
    # a read 3.5x the step's time per block: 4 in the pipe keep the consumer fed across a fill
    assert readahead_depth(read_s=0.070, consume_s=0.020, burst=1, block_bytes=block) == 5
    # the memory budget caps it: 256 MiB holds 21 such blocks
    assert readahead_depth(read_s=1.0, consume_s=0.010, burst=1, block_bytes=block) == 21
    # a block larger than the budget still reads one ahead
    assert readahead_depth(read_s=0.1, consume_s=0.1, burst=1, block_bytes=2**30) == 1


def test_read_ahead_grows_when_reading_is_slower_than_the_step():
    def slow_reads():
        for i in range(40):
            time.sleep(0.004)
            yield np.zeros(1024, np.float32) + i

    ahead = ReadAhead(slow_reads(), "auto", burst=1)
    items = iter(ahead)
    depths = []
    for _ in range(40):
        next(items)
        depths.append(ahead.depth)  # the consumer's step here takes ~nothing
    assert depths[0] >= 2 and max(depths) >= 4, depths  # read ~4 ms vs step ~0: depth grows
    fast = ReadAhead(iter([np.zeros(8)] * 30), "auto", burst=1)
    taken = iter(fast)
    for _ in range(30):
        next(taken)
        time.sleep(0.003)  # a step far slower than a read
    assert fast.depth == 2
