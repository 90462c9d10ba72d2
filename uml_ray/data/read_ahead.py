"""Read-ahead for streamed shares: a thread produces blocks ahead of the training step, as many as
reading needs to hide behind the step's compute, no more than a memory budget holds.

Why a depth that follows the measured times: a fixed depth of two blocks starves a fast step whose
reads come in bursts (the shuffle buffer takes a buffer's worth of blocks at once), and a deep fixed
depth holds gigabytes of decoded blocks for a slow step that never needed them. So the thread times
each block it reads and the consumer's time between two takes (its steps), and ``readahead_depth``
turns the two into blocks ahead.
"""

from __future__ import annotations

import collections
import math
import threading
import time

READAHEAD_BUDGET_BYTES = 256 * 2**20  # decoded blocks one stream may hold ahead of its consumer


def readahead_depth(
    read_s: float, consume_s: float, burst: int, block_bytes: int, budget_bytes: int = READAHEAD_BUDGET_BYTES
) -> int:
    """Blocks to hold ahead of the consumer: ``burst`` blocks (what it takes at once: a shuffle
    buffer's fill) plus what the reader produces while the consumer trains through one block
    (``ceil(read_s / consume_s)`` : a read slower than the step needs that many in the pipe to keep
    up over a burst), at least 2, at most what ``budget_bytes`` holds of ``block_bytes`` blocks (and
    never under 1).

    ``read_s``: seconds to read and decode one block; ``consume_s``: seconds the consumer spends per
    block between two takes (its step time × batches per block)."""
    cover = math.ceil(read_s / consume_s) if consume_s > 0 else burst + 1
    wanted = max(2, burst + cover)
    return max(1, min(wanted, budget_bytes // max(block_bytes, 1)))


class _Timing:
    """Mean seconds per item of the reader and of the consumer (exponentially weighted)."""

    def __init__(self, weight: float = 0.3):
        self.weight = weight
        self.read_s: float | None = None
        self.consume_s: float | None = None
        self.block_bytes = 0

    def _mean(self, old: float | None, new: float) -> float:
        return new if old is None else (1 - self.weight) * old + self.weight * new

    def read(self, seconds: float, nbytes: int) -> None:
        self.read_s = self._mean(self.read_s, seconds)
        self.block_bytes = max(self.block_bytes, nbytes)

    def consumed(self, seconds: float) -> None:
        self.consume_s = self._mean(self.consume_s, seconds)


class ReadAhead:
    """``items`` produced by a thread ahead of the consumer, iterated once; the thread ends when the
    consumer stops early, and an error in it is raised in the consumer where it occurred. ``depth``:
    a number of items, or ``"auto"``: ``readahead_depth`` of the measured read and step times (from
    ``burst + 1`` until both are measured). ``depth`` holds the current depth."""

    def __init__(self, items, depth="auto", burst: int = 1, budget_bytes: int = READAHEAD_BUDGET_BYTES):
        self.items = items
        self.fixed = depth != "auto"
        self.depth = int(depth) if self.fixed else burst + 1
        self.burst = burst
        self.budget_bytes = budget_bytes
        self.timing = _Timing()
        self._held: collections.deque = collections.deque()
        self._changed = threading.Condition()
        self._stop = threading.Event()
        self._done = False
        self._error: BaseException | None = None

    def _produce(self):
        try:
            started = time.perf_counter()
            for item in self.items:
                self.timing.read(time.perf_counter() - started, getattr(item, "nbytes", 0))
                with self._changed:
                    self._changed.wait_for(lambda: self._stop.is_set() or len(self._held) < self.depth)
                    if self._stop.is_set():
                        return
                    self._held.append(item)
                    self._changed.notify_all()
                started = time.perf_counter()
        except BaseException as exc:  # noqa: BLE001 - handed to the consumer
            self._error = exc
        finally:  # on this thread, now: a generator left open (a cache being recorded) cleans up
            close = getattr(self.items, "close", None)
            if close is not None:
                close()
        with self._changed:
            self._done = True
            self._changed.notify_all()

    def _resize(self) -> None:
        timing = self.timing
        if self.fixed or timing.read_s is None or timing.consume_s is None:
            return
        with self._changed:
            self.depth = readahead_depth(
                timing.read_s, timing.consume_s, self.burst, timing.block_bytes, self.budget_bytes
            )
            self._changed.notify_all()

    def __iter__(self):
        thread = threading.Thread(target=self._produce, daemon=True, name="uml-ray-read-ahead")
        thread.start()
        try:
            while True:
                with self._changed:
                    self._changed.wait_for(lambda: self._held or self._done)
                    if not self._held:
                        if self._error is not None:
                            raise self._error
                        return
                    item = self._held.popleft()
                    self._changed.notify_all()
                handed = time.perf_counter()
                yield item
                self.timing.consumed(time.perf_counter() - handed)
                self._resize()
        finally:
            with self._changed:
                self._stop.set()
                self._changed.notify_all()
            # the thread ends within the block it is reading; waiting for it means its cleanup (a
            # partial cache file removed) is done when the consumer moves on
            thread.join()


def read_ahead(items, depth="auto", burst: int = 1, budget_bytes: int = READAHEAD_BUDGET_BYTES):
    """``items`` read ahead on a thread (``ReadAhead``), as an iterator."""
    return iter(ReadAhead(items, depth, burst, budget_bytes))
