"""The fine-tuning image pipeline on Ray Data: encoded images in, model-ready float tensors out.

Train batches get a random-resized crop (its smallest area fraction, ``data.augment_min_scale``, is
the augmentation strength), an optional horizontal flip and the backbone's own pretrained
normalisation; val/test batches get timm's eval transform (resize to ``size / crop_pct``, centre
crop). Decoding and augmentation run as Ray Data ``map_batches`` CPU tasks of
``resources.decode_cpus`` CPUs each, so CPU nodes can feed GPU workers, which receive finished
``(N, 3, S, S)`` float32 batches.

Determinism: a worker's rows are its id-sorted share (as ``BatchStream`` holds it), drawn in a
seeded order per epoch; every random choice of a row comes from ``(seed, epoch, row id)``, and Ray
Data keeps the block order. So a resumed run sees exactly the images — crops and flips included —
that an uninterrupted run would. Only the encoded bytes are held in memory; decoded pixels exist
for the batches in flight (and for val/test, whose transform never changes, once when they fit
``data.cache_max_mb``).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import io
import math
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from uml_ray.data.format import ID, IMAGE, LABEL
from uml_ray.data.streams import BatchStream, StreamSpec, opened

ROW = "row"
EPOCH = "epoch"
WINDOW_BATCHES = 64  # batches per Ray Data pipeline: long enough that its start-up is amortised
BATCHES_PER_TASK = 4  # batches one decode task makes: several tasks per window run in parallel
RATIO = (3 / 4, 4 / 3)  # aspect-ratio range of the random-resized crop (torchvision's)


@dataclass(frozen=True)
class ImageTransform:
    """How encoded images become model input: output size, normalisation, and (train only) augmentation."""

    size: int
    mean: tuple
    std: tuple
    interpolation: str = "bicubic"
    crop_pct: float = 0.875
    train: bool = False
    min_scale: float = 0.08
    flip: bool = True
    seed: int = 0

    def for_eval(self) -> ImageTransform:
        """The same transform without augmentation (val/test)."""
        return dataclasses.replace(self, train=False)


def transform_from_data_config(
    data_config: dict, size: int, min_scale: float, flip: bool, seed: int
) -> ImageTransform:
    """The train transform for a backbone's pretrained data config (``timm.data.resolve_data_config``).

    ``size`` 0 keeps the backbone's own input size.
    """
    return ImageTransform(
        size=int(size or data_config["input_size"][-1]),
        mean=tuple(map(float, data_config["mean"])),
        std=tuple(map(float, data_config["std"])),
        interpolation=str(data_config.get("interpolation", "bicubic")),
        crop_pct=float(data_config.get("crop_pct", 0.875)),
        train=True,
        min_scale=float(min_scale),
        flip=bool(flip),
        seed=int(seed),
    )


def row_rng(seed: int, epoch: int, row_id: str) -> np.random.Generator:
    """The random source of one row in one epoch: the same (seed, epoch, id) gives the same crop and flip."""
    key = int.from_bytes(hashlib.blake2b(row_id.encode(), digest_size=8).digest(), "little")
    return np.random.default_rng([seed, epoch, key])


def crop_box(
    width: int, height: int, rng: np.random.Generator, min_scale: float
) -> tuple[int, int, int, int]:
    """(left, top, width, height) of a random-resized crop: area fraction in [min_scale, 1], aspect in RATIO.

    torchvision's algorithm: ten tries, then the largest centred crop of an in-range aspect ratio.
    """
    area = width * height
    log_ratio = (math.log(RATIO[0]), math.log(RATIO[1]))
    for _ in range(10):
        target = area * rng.uniform(min_scale, 1.0)
        aspect = math.exp(rng.uniform(*log_ratio))
        w, h = int(round(math.sqrt(target * aspect))), int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            return int(rng.integers(0, width - w + 1)), int(rng.integers(0, height - h + 1)), w, h
    aspect = width / height
    if aspect < RATIO[0]:
        w, h = width, int(round(width / RATIO[0]))
    elif aspect > RATIO[1]:
        w, h = int(round(height * RATIO[1])), height
    else:
        w, h = width, height
    return (width - w) // 2, (height - h) // 2, w, h


def _resample(name: str) -> int:
    from PIL import Image

    return {"bilinear": Image.BILINEAR, "bicubic": Image.BICUBIC, "nearest": Image.NEAREST}.get(
        name, Image.BICUBIC
    )


def transform_image(payload: bytes, row_id: str, epoch: int, transform: ImageTransform) -> np.ndarray:
    """One encoded image as a ``(size, size, 3)`` uint8 array: augmented for train, centre-cropped for eval.

    Grayscale is repeated to three channels: pretrained backbones take RGB.
    """
    from PIL import Image

    picture = Image.open(io.BytesIO(payload)).convert("RGB")
    size, resample = transform.size, _resample(transform.interpolation)
    if transform.train:
        rng = row_rng(transform.seed, epoch, row_id)
        left, top, w, h = crop_box(picture.width, picture.height, rng, transform.min_scale)
        picture = picture.resize((size, size), resample, box=(left, top, left + w, top + h))
        if transform.flip and rng.random() < 0.5:
            picture = picture.transpose(Image.FLIP_LEFT_RIGHT)
        return np.asarray(picture)
    # timm's eval transform: shorter side to size / crop_pct, then the centre size x size
    scaled = math.floor(size / transform.crop_pct)
    ratio = scaled / min(picture.size)
    width, height = max(scaled, round(picture.width * ratio)), max(scaled, round(picture.height * ratio))
    picture = picture.resize((width, height), resample)
    left, top = int(round((width - size) / 2)), int(round((height - size) / 2))
    return np.asarray(picture.crop((left, top, left + size, top + size)))


def normalise(pixels: np.ndarray, transform: ImageTransform) -> np.ndarray:
    """``(N, S, S, 3)`` uint8 → ``(N, 3, S, S)`` float32 normalised with the backbone's mean and std."""
    mean = np.asarray(transform.mean, np.float32).reshape(1, 1, 1, 3) * 255.0
    inverse_std = 1.0 / (np.asarray(transform.std, np.float32).reshape(1, 1, 1, 3) * 255.0)
    return np.ascontiguousarray(((pixels.astype(np.float32) - mean) * inverse_std).transpose(0, 3, 1, 2))


def transform_rows(share: pa.Table, rows: np.ndarray, epochs: np.ndarray, transform: ImageTransform) -> dict:
    """``{image: (N, 3, S, S) float32, label: (N,) int64}`` for rows of ``share`` seen in ``epochs``."""
    picked = share.take(pa.array(rows))
    payloads, ids = picked.column(IMAGE).to_pylist(), picked.column(ID).to_pylist()
    labels = picked.column(LABEL).fill_null(-1).to_numpy(zero_copy_only=False).astype(np.int64)
    pixels = np.stack([transform_image(p, i, int(e), transform) for p, i, e in zip(payloads, ids, epochs)])
    return {IMAGE: normalise(pixels, transform), LABEL: labels}


def decode_block(block: pa.Table, share, transform: ImageTransform) -> dict:
    """Ray Data map task: a block of (row, epoch) positions → transformed images and labels.

    ``share`` is an object reference to the worker's share of encoded images, fetched (zero-copy
    on the same node) by each task instead of copying bytes into every block.
    """
    import ray

    rows = block.column(ROW).to_numpy()
    epochs = block.column(EPOCH).to_numpy()
    return transform_rows(ray.get(share), rows, epochs, transform)


def decode_rows(block: pa.Table, transform: ImageTransform) -> dict:
    """Ray Data map task of the streamed path: a block of encoded rows (image, id, label, epoch) →
    transformed images and labels."""
    return transform_rows(block, np.arange(len(block)), block.column(EPOCH).to_numpy(), transform)


class ImageStream(BatchStream):
    """An endless stream of transformed image batches from one worker's share of an image dataset.

    Same contract as ``BatchStream`` (``next``, ``iter_once``, ``state_dict``, epoch/drawn state,
    the same seeded per-epoch order of the id-sorted share); batches are ``(images (N, 3, S, S)
    float32, labels)``. Each window of ``window_batches`` batches is one Ray Data pipeline of
    decode tasks (``decode_cpus`` CPUs each) whose output order is kept.

    A share held in memory (``spec.cached``: its encoded bytes fit ``data.cache_max_mb``) is drawn in
    a seeded order of the id-sorted share, so a resumed run sees exactly the same images. A larger
    train share streams: encoded rows arrive from its source (pyarrow in file order in a one-process
    run, Ray Data's split across workers), a shuffle buffer of ``shuffle_buffer`` rows is permuted
    with the epoch's seed, and only the buffer and the batches in flight are in memory. Resuming
    skips the epoch's drawn batches before decoding them; the images are the same when the rows
    arrive in the same order (always in a one-process run; Ray Data assigns blocks to workers as
    they ask), and a fresh shuffle of the same epoch otherwise.
    """

    def __init__(
        self,
        source,
        spec: StreamSpec,
        batch_size: int,
        seed: int,
        rank: int,
        world_size: int,
        transform: ImageTransform,
        decode_cpus: float,
        eval_cache_mb: float,
        window_batches: int = WINDOW_BATCHES,
        shuffle_buffer: int = 4096,
    ):
        super().__init__(source, spec, batch_size, seed, rank, world_size, shuffle_buffer)
        self.transform = transform
        self.decode_cpus = decode_cpus
        self.eval_cache_mb = eval_cache_mb
        self.window_batches = window_batches
        self._evaluated = None

    @functools.cached_property
    def _share(self):
        """The id-sorted share in the object store, put once: decode tasks fetch it by reference."""
        import ray

        return ray.put(self.table())

    def _epoch_batches(self, epoch: int) -> np.ndarray:
        """The share's rows of one epoch as (batches, batch size): seeded order, partial batch dropped."""
        n = len(self.table())
        size = min(self.batch_size, n)
        order = self._rng(epoch).permutation(n)
        return order[: n // size * size].reshape(-1, size)

    def _pipeline(
        self, rows: np.ndarray, epochs: np.ndarray, transform: ImageTransform, batch_size: int
    ) -> Iterator[tuple]:
        """Transformed batches of ``rows`` (seen in ``epochs``) through Ray Data, in order."""
        per_task = batch_size * BATCHES_PER_TASK
        blocks = [
            pa.table({ROW: rows[i : i + per_task], EPOCH: epochs[i : i + per_task]})
            for i in range(0, len(rows), per_task)
        ]
        yield from self._decoded(
            blocks, decode_block, {"share": self._share, "transform": transform}, batch_size
        )

    def _decoded(self, blocks: list[pa.Table], function, kwargs: dict, batch_size: int) -> Iterator[tuple]:
        """``function`` over ``blocks`` as Ray Data decode tasks; the transformed batches, in block order."""
        import ray.data

        # from_blocks, not from_arrow: from_arrow runs a metadata task which, inside a Ray Train worker,
        # would queue in the worker's own (full) placement group for ever
        dataset = ray.data.from_blocks(blocks).map_batches(
            function, batch_size=None, batch_format="pyarrow", num_cpus=self.decode_cpus, fn_kwargs=kwargs
        )
        # batch order is the stream's state: Ray Data must hand blocks over in input order
        dataset.context.execution_options.preserve_order = True
        dataset.context.enable_progress_bars = False
        dataset.context.print_on_execution_start = False
        with opened(
            dataset.iter_batches(batch_size=batch_size, batch_format="numpy", prefetch_batches=2)
        ) as batches:
            for batch in batches:
                yield batch[IMAGE], batch[LABEL]

    def _window(self, epoch: int, drawn: int) -> Iterator[tuple[int, int, tuple]]:
        """The next ``window_batches`` batches from position (epoch, drawn), each with the position after."""
        positions, rows = [], []
        while len(positions) < self.window_batches:
            batches = self._epoch_batches(epoch)
            if drawn >= len(batches):
                epoch, drawn = epoch + 1, 0
                continue
            take = batches[drawn : drawn + self.window_batches - len(positions)]
            rows.append(take)
            positions += [(epoch, drawn + i + 1) for i in range(len(take))]
            drawn += len(take)
        rows = np.concatenate(rows)
        epochs = np.repeat([e for e, _ in positions], rows.shape[1])
        # zip stops at the last position, with the pipeline still open
        with opened(self._pipeline(rows.reshape(-1), epochs, self.transform, rows.shape[1])) as batches:
            for (epoch, drawn), batch in zip(positions, batches):
                yield epoch, drawn, batch

    def _streamed_batches(self, epoch: int, skip: int) -> Iterator[tuple]:
        """One epoch of a streamed share: shuffle-buffered encoded rows, the first ``skip`` batches
        passed over undecoded (a resume), the rest decoded a window of batches at a time."""
        index = 0  # batches of this epoch so far
        for table, order, size in self._shuffle_buffered(epoch):
            count = len(order) // size
            first = min(max(skip - index, 0), count)  # batches already drawn before a resume
            index += count
            chosen = order[first * size : count * size]
            for start in range(0, len(chosen), size * self.window_batches):
                rows = chosen[start : start + size * self.window_batches]
                picked = table.take(pa.array(rows)).select([IMAGE, ID, LABEL])
                picked = picked.append_column(EPOCH, pa.array(np.full(len(picked), epoch, np.int64)))
                per_task = size * BATCHES_PER_TASK
                blocks = [picked.slice(i, per_task) for i in range(0, len(picked), per_task)]
                yield from self._decoded(blocks, decode_rows, {"transform": self.transform}, size)

    def next(self):
        """The next augmented batch; crosses epoch boundaries forever."""
        if not self.spec.cached:
            while True:
                if self._batches is None:
                    self._batches = self._streamed_batches(self.epoch, self.drawn)
                try:
                    batch = next(self._batches)
                    self.drawn += 1
                    return batch
                except StopIteration:
                    self.epoch, self.drawn, self._batches = self.epoch + 1, 0, None
        while True:
            if self._batches is None:
                self._batches = self._window(self.epoch, self.drawn)
            try:
                self.epoch, self.drawn, batch = next(self._batches)
                return batch
            except StopIteration:
                self._batches = None

    def iter_once(self, batch_size: int):
        """Every row of this worker's share once, in id order, through the eval transform.

        The eval transform never changes, so its output is kept when it fits ``eval_cache_mb``.
        """
        if self._evaluated is not None:
            images, labels = self._evaluated
            for start in range(0, len(labels), batch_size):
                yield images[start : start + batch_size], labels[start : start + batch_size]
            return
        n = len(self.table())
        keep = n * 3 * self.transform.size**2 * 4 / 2**20 <= self.eval_cache_mb
        kept = []
        for batch in self._pipeline(
            np.arange(n), np.zeros(n, np.int64), self.transform.for_eval(), batch_size
        ):
            if keep:
                kept.append(batch)
            yield batch
        if keep and kept:
            self._evaluated = (np.concatenate([b[0] for b in kept]), np.concatenate([b[1] for b in kept]))
