"""The decoded feature cache: replayed epochs equal uncached ones byte for byte, a rewritten shard
invalidates the cache, a resume mid-epoch is exact, and a Ray Data share is spooled once."""

from __future__ import annotations

import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from uml_ray.data.feature_cache import CACHE_ENV, SpooledSource, feature_cache_dir
from uml_ray.data.format import write_shards
from uml_ray.data.parquet_source import ParquetSource
from uml_ray.data.streams import BatchStream, StreamSpec, TableSource

ROWS, DIM = 300, 8


@pytest.fixture
def cache_dir(tmp_path, monkeypatch):
    """A cache folder of the test's own (the env var reaches Ray workers started after it is set)."""
    folder = tmp_path / "cache"
    monkeypatch.setenv(CACHE_ENV, str(folder))
    return folder


def shards(folder, seed: int = 0):
    rng = np.random.default_rng(seed)
    features = rng.normal(size=(ROWS, DIM)).astype(np.float32)
    return write_shards(str(folder), "text", "train", features, rng.integers(0, 5, ROWS), rows_per_shard=128)


def stream(source, buffer: int = 50) -> BatchStream:
    spec = StreamSpec("text.train", "vector", DIM, ROWS, cached=False)
    return BatchStream(source, spec, 16, seed=7, rank=0, world_size=1, shuffle_buffer=buffer)


def draw(batches: BatchStream, epochs: int) -> dict:
    drawn = {}
    while batches.epoch < epochs:
        features, labels = batches.next()
        drawn[(batches.epoch, batches.drawn - 1)] = (features.tobytes(), labels.tobytes())
    del drawn[max(drawn)]  # the first batch of the next epoch
    return drawn


def test_cached_epochs_are_byte_identical_to_uncached_ones(tmp_path, cache_dir):
    uris = shards(tmp_path)
    uncached = draw(stream(ParquetSource(uris, block_rows=37, cache=False)), 3)
    cached = ParquetSource(uris, block_rows=37)
    assert not cached.cache.ready
    assert draw(stream(cached), 3) == uncached  # epoch 0 recorded, epochs 1-2 replayed
    assert cached.cache.ready and cached.cache.path.parent == cache_dir
    # a later run on this node replays from its first epoch, with the same batches
    again = ParquetSource(uris, block_rows=37)
    assert again.cache.ready
    assert draw(stream(again), 3) == uncached
    assert pa.concat_tables(list(again.iter_batches(batch_size=50))).equals(
        pa.concat_tables(list(ParquetSource(uris, cache=False).iter_batches()))
    )


def test_replayed_features_are_views_of_the_mapped_file(tmp_path, cache_dir):
    uris = shards(tmp_path)
    source = ParquetSource(uris, block_rows=64)
    list(source.iter_batches())
    block = next(iter(source.iter_batches()))
    column = block.column("features").chunk(0)  # binary rows: the data buffer holds the floats
    features = np.frombuffer(column.buffers()[1], dtype=np.float32)
    assert not features.flags.owndata and not features.flags.writeable  # no copy: read-only map


def test_a_rewritten_shard_invalidates_the_cache(tmp_path, cache_dir):
    uris = shards(tmp_path, seed=0)
    first = ParquetSource(uris, block_rows=64)
    list(first.iter_batches())
    old_path = first.cache.path
    stat = os.stat(uris[1])
    shards(tmp_path, seed=1)  # same paths and sizes, new values
    os.utime(uris[1], ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    rewritten = ParquetSource(uris, block_rows=64)
    assert not rewritten.cache.ready and rewritten.cache.path != old_path
    fresh = pa.concat_tables(list(ParquetSource(uris, cache=False).iter_batches()))
    assert pa.concat_tables(list(rewritten.iter_batches())).equals(fresh)
    assert not old_path.exists()  # the stale version is removed once the new one is complete
    assert pa.concat_tables(list(ParquetSource(uris, block_rows=64).iter_batches())).equals(fresh)


def test_a_pass_stopped_early_leaves_no_cache(tmp_path, cache_dir):
    uris = shards(tmp_path)
    source = ParquetSource(uris, block_rows=64)
    blocks = source.iter_batches()
    next(blocks)
    blocks.close()
    assert not source.cache.ready and list(cache_dir.iterdir()) == []


def test_resume_mid_epoch_is_exact_with_the_cache(tmp_path, cache_dir):
    uris = shards(tmp_path)
    whole = draw(stream(ParquetSource(uris, block_rows=37)), 3)
    for epoch, drawn in ((0, 3), (2, 5)):  # resumed before the cache exists in its process, and after
        resumed = stream(ParquetSource(uris, block_rows=37))
        resumed.load_state_dict({"epoch": epoch, "drawn": drawn})
        for d in range(drawn, drawn + 4):
            features, labels = resumed.next()
            assert (features.tobytes(), labels.tobytes()) == whole[(epoch, d)]


class CountingIterator:
    """A Ray Data iterator stand-in: counts how many passes (executions) it starts."""

    def __init__(self, table: pa.Table):
        self.table, self.passes = table, 0

    def iter_batches(self, batch_size=None, batch_format="pyarrow", **_):
        self.passes += 1
        yield from TableSource(self.table).iter_batches(batch_size=batch_size or 45)


def test_a_ray_data_share_is_read_once_and_spooled(tmp_path, cache_dir, monkeypatch):
    uris = shards(tmp_path)
    table = pa.concat_tables(list(ParquetSource(uris, cache=False).iter_batches()))
    monkeypatch.setenv(CACHE_ENV, "off")
    unspooled = CountingIterator(table)
    reference = draw(stream(unspooled), 3)
    assert unspooled.passes == 4  # uncached: one execution per epoch (the 4th drew one batch)
    monkeypatch.setenv(CACHE_ENV, str(cache_dir))
    iterator = CountingIterator(table)
    spooled = stream(iterator)
    assert isinstance(spooled.iterator, SpooledSource)
    assert draw(spooled, 3) == reference
    assert iterator.passes == 1  # one execution for three epochs
    evaluated = pa.concat_tables(list(spooled.iterator.iter_batches(batch_size=64)))
    assert evaluated.equals(table) and iterator.passes == 1
    path = spooled.iterator.cache.path
    assert path.is_file()
    spooled.close()
    assert not path.exists()


@pytest.mark.slow
def test_a_two_worker_run_streamed_through_ray_data_trains_and_removes_its_spools(
    ray_session, synthetic_manifest, tmp_path, capsys
):
    """Every share over data.cache_max_mb, two Ray Train workers, data.stream_reader=ray_data: each
    worker's Ray Data split is spooled on its first epoch and replayed after (the real split iterator
    behind the spool), and the spools are deleted when the run ends. The workers use the default
    cache folder: they were started before this test could set one."""
    shares = feature_cache_dir() / "shares"
    before = set(shares.iterdir()) if shares.is_dir() else set()
    result = two_worker_streamed_run(synthetic_manifest, tmp_path, capsys, "ray_data")
    assert result["step"] == 120 and result["test_acc"] > 0.4  # 5 classes: chance is 0.2
    assert (set(shares.iterdir()) if shares.is_dir() else set()) <= before


@pytest.mark.slow
def test_a_two_worker_run_streamed_by_pyarrow_reads_a_row_range_per_worker(
    ray_session, synthetic_manifest, tmp_path, capsys
):
    """The default multi-worker reader (data.stream_reader=pyarrow): each worker reads its own row
    range of the shards, caches it decoded under its range's key, and the run learns."""
    from uml_ray.data.feature_cache import shard_key
    from uml_ray.data.manifest import load_manifest
    from uml_ray.data.parquet_source import count_rows, rank_range, shard_stat

    result = two_worker_streamed_run(synthetic_manifest, tmp_path, capsys, "pyarrow")
    assert result["step"] == 120 and result["test_acc"] > 0.4  # 5 classes: chance is 0.2
    uris = load_manifest(synthetic_manifest).uris("text", "train")
    rows = count_rows(uris)
    for rank in (0, 1):
        dataset, version = shard_key(uris, 8192, shard_stat, rank_range(rows, rank, 2))
        assert (feature_cache_dir() / f"{dataset}-{version}.arrow").is_file(), rank


def two_worker_streamed_run(manifest, tmp_path, capsys, reader: str) -> dict:
    """The final result of a two-worker run with every share streamed through ``reader``."""
    import json

    from tests.conftest import write_config
    from uml_ray.cli import main

    config = write_config(
        tmp_path / "c.yaml", manifest, tmp_path, data={"cache_max_mb": 0, "shuffle_buffer": 64}
    )
    overrides = ["resources.num_workers=2", "resources.cpus_per_worker=0.25", "resources.data_cpus=1"]
    assert main(["train", str(config), *overrides, f"data.stream_reader={reader}", "--name", reader]) == 0
    return json.loads([line for line in capsys.readouterr().out.splitlines() if line.startswith("{")][-1])


def test_a_share_over_the_size_cap_streams_every_epoch_and_says_so_once(tmp_path, cache_dir, caplog):
    uris = shards(tmp_path)
    reference = draw(stream(ParquetSource(uris, block_rows=37, cache=False)), 3)
    decoded = ParquetSource(uris, cache=False).decoded_bytes
    assert ROWS * DIM * 4 < decoded < 4 * ROWS * DIM * 4  # the features, labels and ids, uncompressed
    with caplog.at_level("WARNING", logger="uml_ray"):
        over = [ParquetSource(uris, block_rows=37, cache_max_bytes=decoded - 1) for _ in range(2)]
    assert over[0].cache is None and over[1].cache is None
    notes = [r.getMessage() for r in caplog.records if "stream cache off" in r.getMessage()]
    assert len(notes) == 1 and "data.stream_cache_max_gb" in notes[0], notes
    assert draw(stream(over[0]), 3) == reference  # the same batches, read from Parquet each epoch
    assert not cache_dir.exists() or list(cache_dir.iterdir()) == []
    under = ParquetSource(uris, block_rows=37, cache_max_bytes=decoded + 1)
    assert draw(stream(under), 3) == reference and under.cache.ready


def test_a_ray_data_spool_past_the_size_cap_is_dropped(tmp_path, cache_dir, caplog):
    uris = shards(tmp_path)
    table = pa.concat_tables(list(ParquetSource(uris, cache=False).iter_batches()))
    spooled = stream(CountingIterator(table))
    reference = draw(spooled, 3)
    spooled.close()
    iterator = CountingIterator(table)
    spec = StreamSpec("text.train", "vector", DIM, ROWS, cached=False)
    capped = BatchStream(
        iterator, spec, 16, seed=7, rank=0, world_size=1, shuffle_buffer=50, cache_max_bytes=table.nbytes // 2
    )
    with caplog.at_level("WARNING", logger="uml_ray"):
        assert draw(capped, 3) == reference
    assert iterator.passes == 4  # no spool: one execution per epoch, as uncached
    assert not capped.iterator.cache.ready and list((cache_dir / "shares").iterdir()) == []
    assert sum("passed data.stream_cache_max_gb" in r.getMessage() for r in caplog.records) == 1


def test_page_checksums_are_verified_on_a_shards_first_full_read(tmp_path, cache_dir):
    """A corrupted data page fails a source's first pass with the CRC error; once a source has read a
    shard through with verification, its later epochs skip it (half a pass's time), as a replay of the
    decoded cache does."""
    uris = shards(tmp_path)
    verified = ParquetSource(uris, block_rows=64, cache=False)
    first = pa.concat_tables(list(verified.iter_batches()))
    column = pq.ParquetFile(uris[1]).metadata.row_group(0).column(0)
    assert not column.has_dictionary_page and column.compression == "UNCOMPRESSED"  # format.WRITE_OPTIONS
    start = column.data_page_offset + column.total_compressed_size // 2
    data = bytearray(open(uris[1], "rb").read())
    data[start : start + 64] = bytes(b ^ 0x5A for b in data[start : start + 64])
    open(uris[1], "wb").write(bytes(data))
    with pytest.raises(OSError, match="CRC checksum verification failed"):
        list(ParquetSource(uris, block_rows=64, cache=False).iter_batches())
    again = pa.concat_tables(list(verified.iter_batches()))  # not verified again: the flipped bytes read
    assert len(again) == len(first) and not again.equals(first)


def test_ray_data_streams_with_no_cpu_left_for_their_reads_are_refused(
    ray_session, synthetic_manifest, tmp_path, capsys
):
    """Two workers holding 1.9 of the local Ray's 2 CPUs and resources.data_cpus=0: Ray Data's read
    tasks (a whole CPU each) would never be scheduled and the run would wait forever. It is refused
    before any trial starts, naming the streams, the CPUs left and the fix."""
    from tests.conftest import write_config
    from uml_ray.cli import main

    config = write_config(tmp_path / "c.yaml", synthetic_manifest, tmp_path, data={"cache_max_mb": 0})
    overrides = ["data.stream_reader=ray_data", "resources.num_workers=2", "resources.cpus_per_worker=0.95"]
    assert main(["train", str(config), *overrides, "resources.data_cpus=0"]) == 2
    err = capsys.readouterr().err
    assert "text.train" in err and "stream through Ray Data" in err, err
    assert "leave 0.09 of this Ray's 2" in err and "set resources.data_cpus=1" in err, err
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").rglob("result.json"))
