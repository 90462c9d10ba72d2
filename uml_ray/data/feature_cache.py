"""The decoded local cache of streamed feature shares: a share's first full pass is written down as
an uncompressed Arrow IPC (Feather v2) file, and later passes replay it memory-mapped.

Why: decoding Parquet costs more per epoch than a small head's arithmetic (``fixed_size_list<float32>``
~8x more than the ``binary`` layout's ``fixed_size_binary``), and a Ray Data execution costs seconds
to start, every epoch. Blocks are cached in the layout they were read in. An IPC file holds the
decoded buffers as they lie in memory, so a memory-mapped replay is zero-copy (no per-element work
and no start-up), and its blocks are the blocks first read, in the same order: the shuffle buffer
draws exactly the batches of an uncached pass, and a resumed run stays exact.

Two lifetimes: a whole dataset read by pyarrow (``ParquetSource``) is cached across runs under
``feature_cache_dir()``, keyed by every shard's path, size and mtime (a rewritten shard is a new
key, and the stale file is removed); a worker's share of a Ray Data split (which rows a worker gets
is only known once read) is spooled for its stream's life and deleted on close.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
import uuid
import weakref
from pathlib import Path

import pyarrow as pa

log = logging.getLogger("uml_ray")

CACHE_ENV = "UML_RAY_STREAM_CACHE"  # folder of the cache; "off" disables it
_VERSION = 1  # bump when the cached layout changes


def feature_cache_dir() -> Path | None:
    """The node-local cache folder (``$UML_RAY_STREAM_CACHE``, else the temp folder); None when off."""
    folder = os.environ.get(CACHE_ENV, "")
    if folder.lower() == "off":
        return None
    return Path(folder) if folder else Path(tempfile.gettempdir()) / "uml-ray-features"


def shard_key(uris: list[str], block_rows: int, stat, part: tuple[int, int] | None = None) -> tuple[str, str]:
    """(the dataset's name in the cache, the name of its current bytes): ``stat(uri)`` gives each
    shard's (size, mtime_ns), so rewriting any shard changes the second name; ``part``: the row
    range ``[start, stop)`` of one worker's share (None: the whole dataset)."""
    named = [_VERSION, block_rows, uris] + ([] if part is None else [list(part)])
    dataset = hashlib.sha256(json.dumps(named).encode()).hexdigest()[:20]
    version = hashlib.sha256(json.dumps([stat(uri) for uri in uris]).encode()).hexdigest()[:20]
    return dataset, version


def _as_batch(block) -> pa.RecordBatch | None:
    """One block as one record batch (None for an empty one: it draws no rows, so skipping it
    leaves every batch unchanged)."""
    if isinstance(block, pa.RecordBatch):
        return block if block.num_rows else None
    if not block.num_rows:
        return None
    return block.combine_chunks().to_batches()[0]


class BlockCache:
    """Blocks of one share: recorded on the first full pass, then replayed memory-mapped from ``path``.

    ``persistent`` files outlive the process (a dataset cache); the others are deleted by ``close``
    (or when the cache is collected)."""

    def __init__(
        self, path: Path, persistent: bool, stale: list[Path] | None = None, max_bytes: int | None = None
    ):
        self.path = path
        self.persistent = persistent
        self.stale = stale or []
        self.max_bytes = max_bytes
        self.over_cap = False  # a pass outgrew max_bytes: later ones are not recorded either
        if not persistent:
            self._remove = weakref.finalize(self, _unlink, path)

    @classmethod
    def for_dataset(
        cls,
        uris: list[str],
        block_rows: int,
        stat,
        part: tuple[int, int] | None = None,
        decoded_bytes: int = 0,
        max_bytes: int | None = None,
    ) -> BlockCache | None:
        """The persistent cache of a dataset (or of one worker's row range ``part`` of it), or None when
        caching is off or its ``decoded_bytes`` exceed ``max_bytes`` (then it streams every epoch)."""
        folder = feature_cache_dir()
        if folder is None:
            return None
        dataset, version = shard_key(uris, block_rows, stat, part)
        path = folder / f"{dataset}-{version}.arrow"
        if max_bytes is not None and decoded_bytes > max_bytes and not path.is_file():
            _say_once(
                path,
                "decoded stream cache off for %s (%d shards from %s): %.2f GB decoded exceeds "
                "data.stream_cache_max_gb=%.2f; it streams from Parquet every epoch",
                path.name,
                len(uris),
                uris[0],
                decoded_bytes / 2**30,
                max_bytes / 2**30,
            )
            return None
        return cls(path, persistent=True, stale=[p for p in folder.glob(f"{dataset}-*.arrow") if p != path])

    @classmethod
    def for_share(cls, max_bytes: int | None = None) -> BlockCache | None:
        """A spool for one worker's share of a Ray Data split, removed on close; None when caching is
        off. Its size is only known once read: a spool that grows past ``max_bytes`` is dropped."""
        folder = feature_cache_dir()
        if folder is None:
            return None
        path = folder / "shares" / f"{os.getpid()}-{uuid.uuid4().hex}.arrow"
        return cls(path, persistent=False, max_bytes=max_bytes)

    @property
    def ready(self) -> bool:
        """Whether a complete pass is on disk."""
        return self.path.is_file()

    def blocks(self, read):
        """The share's blocks: replayed when ``ready``, else from ``read()`` (an iterable of blocks),
        recorded as they pass. A pass stopped early leaves nothing behind."""
        if self.ready:
            yield from self._replay()
        elif self.over_cap:
            yield from read()
        else:
            yield from self._record(read())

    def _replay(self):
        reader = pa.ipc.open_file(pa.memory_map(str(self.path)))  # buffers point into the map
        for i in range(reader.num_record_batches):
            yield reader.get_batch(i)

    def _record(self, blocks):
        temporary = self.path.with_name(f".{self.path.name}.{os.getpid()}-{uuid.uuid4().hex}")
        writer, written = None, 0
        try:
            for block in blocks:
                batch = _as_batch(block)
                if batch is not None and temporary is not None:
                    written += batch.nbytes
                    if self.max_bytes is not None and written > self.max_bytes:
                        self.over_cap = True
                        _say_once(
                            "spool",
                            "a Ray Data share spool passed data.stream_cache_max_gb=%.2f; that share "
                            "streams through Ray Data every epoch",
                            self.max_bytes / 2**30,
                        )
                        writer = _close(writer)
                        _unlink(temporary)
                        temporary = None
                        yield block
                        continue
                    try:
                        if writer is None:
                            temporary.parent.mkdir(parents=True, exist_ok=True)
                            writer = pa.ipc.new_file(str(temporary), batch.schema)
                        writer.write_batch(batch)
                    except (OSError, pa.ArrowException) as exc:  # a full disk costs speed, not the run
                        log.warning("feature cache %s not written (%s); streaming uncached", self.path, exc)
                        writer = _close(writer)
                        _unlink(temporary)
                        temporary = None
                yield block
            if writer is not None:
                writer = _close(writer)
                os.replace(temporary, self.path)
                for stale in self.stale:
                    _unlink(stale)
        finally:
            _close(writer)
            if temporary is not None:
                _unlink(temporary)

    def close(self) -> None:
        """Delete a share's spool (a persistent dataset cache stays)."""
        if not self.persistent:
            self._remove()


_SAID: set = set()


def _say_once(key, message: str, *args) -> None:
    """Log ``message`` at warning level the first time ``key`` comes up in this process."""
    if key not in _SAID:
        _SAID.add(key)
        log.warning(message, *args)


def _close(writer) -> None:
    if writer is not None:
        writer.close()


def _unlink(path: Path) -> None:
    path.unlink(missing_ok=True)


class SpooledSource:
    """A Ray Data iterator whose first full pass of native blocks is spooled (``BlockCache.for_share``):
    later passes replay the spool, so Ray Data's execution starts once per run instead of per epoch.
    Batched passes (``batch_size`` given) are cut from the spool once it is complete."""

    def __init__(self, iterator, cache: BlockCache):
        self.iterator = iterator
        self.cache = cache

    def iter_batches(self, batch_size=None, batch_format="pyarrow", **options):
        """Native blocks (``batch_size=None``), else tables of ``batch_size`` rows; the last may be short."""
        if batch_size is not None and not self.cache.ready:
            yield from self.iterator.iter_batches(batch_size=batch_size, batch_format=batch_format, **options)
            return
        native = self.cache.blocks(
            lambda: self.iterator.iter_batches(batch_size=None, batch_format=batch_format, **options)
        )
        yield from rebatch(native, batch_size)

    def close(self) -> None:
        """Delete the spool."""
        self.cache.close()


def rebatch(blocks, batch_size: int | None):
    """Blocks as tables (``batch_size=None``), else tables of ``batch_size`` rows; the last may be short."""
    pending: list[pa.Table] = []
    held = 0
    for block in blocks:
        table = pa.Table.from_batches([block]) if isinstance(block, pa.RecordBatch) else block
        if batch_size is None:
            yield table
            continue
        pending.append(table)
        held += len(table)
        while held >= batch_size:
            table = pa.concat_tables(pending).combine_chunks()
            yield table.slice(0, batch_size)
            pending, held = [table.slice(batch_size)], held - batch_size
    if batch_size is not None and held:
        yield pa.concat_tables(pending).combine_chunks()
