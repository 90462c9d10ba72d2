"""Image shards (``kind: image``): encoded images in Parquet, the input of the fine-tuning regime.

See docs/data-format.md.

One Parquet dataset per (modality, split), like feature shards, with the columns
- ``image``: binary, one encoded image (PNG when written here; any format Pillow reads is accepted);
- ``label``: int32; ``id``: string.

An image modality's manifest ``dim`` is its channel count: 1 (grayscale) or 3 (RGB); every image
of the modality must decode to that many channels. The writers take the sources of
``uml_ray.data.sources`` (Fashion-MNIST idx files, ImageFolder directories, Parquet files of
encoded bytes), convert each picture to L or RGB and optionally shrink it, so the shards hold what
the pipeline (``uml_ray.data.image_pipeline``) decodes and augments at training time.
"""

from __future__ import annotations

import io
import itertools
import operator
from collections import defaultdict
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from uml_ray.data.format import shard_folder, shard_schema, write_shard
from uml_ray.data.manifest import Manifest, ModalitySpec, load_manifest, write_manifest
from uml_ray.data.parquet_source import count_rows
from uml_ray.data.sources import (
    FASHION_MNIST_CLASSES,
    FASHION_MNIST_DIR,
    decode_image,
    list_image_folder,
    load_fashion_mnist,
)
from uml_ray.errors import DataError
from uml_ray.uri import is_remote, join_uri

CHANNEL_MODES = {1: "L", 3: "RGB"}
DECODE_SAMPLE = 256  # rows per shard decoded in full by validation; every row's header is read


def to_picture(payload, channels: int | None = None, size: int = 0):
    """A Pillow image in mode L or RGB from bytes, a path or a uint8 array; shorter side shrunk to ``size``.

    ``channels`` None keeps grayscale as L and turns everything else into RGB (alpha dropped).
    Pictures are only ever shrunk: the pipeline's crops start from the stored resolution.
    """
    from PIL import Image

    picture = Image.fromarray(decode_image(payload))
    mode = CHANNEL_MODES[channels] if channels else ("L" if picture.mode == "L" else "RGB")
    picture = picture.convert(mode)
    if size and min(picture.size) > size:
        scale = size / min(picture.size)
        picture = picture.resize(
            (max(1, round(picture.width * scale)), max(1, round(picture.height * scale))), Image.BICUBIC
        )
    return picture


def encode_png(picture) -> bytes:
    """PNG bytes of a Pillow image (lossless: a stored image decodes to exactly these pixels)."""
    buffer = io.BytesIO()
    picture.save(buffer, format="PNG")
    return buffer.getvalue()


def write_image_shards(
    out_dir: str,
    modality: str,
    split: str,
    images: Iterable,
    labels: Iterable[int],
    ids: Iterable[str],
    channels: int | None = None,
    size: int = 0,
    rows_per_shard: int = 4096,
) -> tuple[list[str], int]:
    """Write one (modality, split) of images as PNG Parquet shards under ``out_dir/modality/split``.

    ``images`` yields encoded bytes, file paths or uint8 arrays; they are read one at a time, so a
    source of any size streams through. Returns (shard URIs, channel count); the channel count is
    ``channels`` or, when None, that of the first image (1 for grayscale, else 3).
    """
    folder, filesystem = shard_folder(out_dir, modality, split, clear=True)
    schema = shard_schema("image", 0)
    uris, column, label_column, id_column = [], [], [], []

    def flush() -> None:
        table = pa.Table.from_arrays(
            [
                pa.array(column, pa.binary()),
                pa.array(label_column, pa.int32()),
                pa.array(id_column, pa.string()),
            ],
            schema=schema,
        )
        uri = join_uri(folder, f"part-{len(uris):05d}.parquet")
        write_shard(table, uri, filesystem)
        uris.append(uri)
        column.clear(), label_column.clear(), id_column.clear()

    for image, label, row_id in zip(images, labels, ids):
        picture = to_picture(image, channels, size)
        channels = channels or len(picture.getbands())
        column.append(encode_png(picture))
        label_column.append(int(label))
        id_column.append(str(row_id))
        if len(column) == rows_per_shard:
            flush()
    if column or not uris:
        flush()
    return uris, channels or 3


def fashion_mnist_images(
    split: str, rows: np.ndarray | None = None, invert: bool = True, folder: str = FASHION_MNIST_DIR
) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Fashion-MNIST images (uint8, 28 x 28), labels and ids ``<split>-<row>``, optionally a subset of rows.

    ``invert`` gives dark garments on a light ground, like the product photos ImageNet backbones saw.
    """
    images, labels = load_fashion_mnist(split, folder)
    rows = np.arange(len(images)) if rows is None else np.asarray(rows)
    chosen = images[rows]
    return (255 - chosen if invert else chosen), labels[rows], [f"{split}-{r:05d}" for r in rows]


def parquet_image_rows(
    paths: list[str], image_column: str = "image", label_column: str = "label", id_column: str = "id"
) -> Iterator[tuple[bytes, int, str]]:
    """``(encoded bytes, label, id)`` from Parquet files of image bytes, a record batch at a time."""
    for path in paths:
        try:
            shard = pq.ParquetFile(path, page_checksum_verification=True)
            missing = [
                c for c in (image_column, label_column, id_column) if c not in shard.schema_arrow.names
            ]
        except (OSError, pa.ArrowException) as exc:
            raise DataError(f"{path}: cannot read the Parquet file ({exc})") from None
        if missing:
            raise DataError(
                f"{path}: no column(s) {missing}; it has {shard.schema_arrow.names} "
                "(name yours with --image-column/--label-column/--id-column)"
            )
        for batch in shard.iter_batches(batch_size=1024, columns=[image_column, label_column, id_column]):
            yield from zip(
                batch.column(0).to_pylist(),
                batch.column(1).to_pylist(),
                map(str, batch.column(2).to_pylist()),
            )


def add_image_split(
    out_dir: str, modality: str, split: str, uris: list[str], channels: int, classes: list[str], target: str
) -> str:
    """Record one written (modality, split) in ``out_dir/manifest.yaml``, creating the manifest if needed."""
    path = join_uri(out_dir, "manifest.yaml")
    exists = Path(path).exists() if not is_remote(path) else False
    manifest = (
        load_manifest(path)
        if exists
        else Manifest(name=Path(out_dir).name, classes=list(classes), target=target, modalities={})
    )
    if list(manifest.classes) != list(classes):
        raise DataError(f"{path}: classes {manifest.classes} differ from this source's {classes}")
    spec = manifest.modalities.setdefault(modality, ModalitySpec(kind="image", dim=channels, encoder=None))
    if spec.kind != "image" or spec.dim != channels:
        raise DataError(
            f"{path}: modality '{modality}' holds {spec.kind} rows of dim {spec.dim}; write "
            f"{channels}-channel images under another --modality or --out"
        )
    spec.splits[split] = uris
    return write_manifest(manifest, path)


def write_image_dataset(
    out_dir: str,
    split: str,
    *,
    fashion_mnist: str | None = None,
    image_folder: str | None = None,
    image_parquet: list[str] | None = None,
    classes: list[str] | None = None,
    modality: str = "image",
    target: str = "image",
    size: int = 0,
    channels: int | None = None,
    limit: int = 0,
) -> dict:
    """Write one split of images from exactly one source into ``out_dir`` and its manifest.

    Returns a summary.
    """
    chosen = [s for s in (fashion_mnist, image_folder, image_parquet) if s]
    if len(chosen) != 1:
        raise DataError("give exactly one image source: --fashion-mnist, --image-folder or --image-parquet")
    if fashion_mnist:
        rows = np.arange(limit) if limit else None
        images, labels, ids = fashion_mnist_images(fashion_mnist, rows)
        classes = classes or list(FASHION_MNIST_CLASSES)
    elif image_folder:
        folder = list_image_folder(image_folder, classes)
        classes, count = folder.classes, limit or len(folder.paths)
        images, labels, ids = folder.paths[:count], folder.labels[:count], folder.ids[:count]
    else:
        if not classes:
            raise DataError("--image-parquet needs --classes (or an existing manifest) to name the labels")
        # three lock-step views of one stream of rows: the files are never held whole
        views = itertools.tee(itertools.islice(parquet_image_rows(image_parquet), limit or None), 3)
        images, labels, ids = (map(operator.itemgetter(i), view) for i, view in enumerate(views))
    uris, channels = write_image_shards(out_dir, modality, split, images, labels, ids, channels, size)
    manifest = add_image_split(out_dir, modality, split, uris, channels, classes, target)
    return {
        "manifest": manifest,
        "modality": modality,
        "split": split,
        "shards": len(uris),
        "channels": channels,
        "rows": count_rows(uris),
    }


@dataclass
class ImageRowProblems:
    """Bad rows of an image column: shard row numbers, and what the first bad row of each kind showed."""

    rows: dict[str, list[int]] = field(default_factory=lambda: defaultdict(list))
    first: dict[str, str] = field(default_factory=dict)

    def add(self, kind: str, row: int, detail: str) -> None:
        """Record one bad row."""
        self.rows[kind].append(row)
        self.first.setdefault(kind, detail)


def check_image_column(
    column: pa.Array, rows: np.ndarray, channels: int, stride: int, found: ImageRowProblems
) -> None:
    """Check a batch of encoded images (``rows``: their shard row numbers): each header is read,
    every ``stride``-th row is decoded in full.

    Undecodable rows and rows whose channel count is not ``channels`` are added to ``found``.
    """
    from PIL import Image, UnidentifiedImageError

    for row, payload in zip(rows.tolist(), column.to_pylist()):
        try:
            picture = Image.open(io.BytesIO(payload))
            if row % stride == 0:
                picture.load()
        except UnidentifiedImageError:
            found.add("undecodable", row, "not an image format Pillow reads")
            continue
        except (OSError, ValueError, SyntaxError) as exc:
            found.add("undecodable", row, str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
            continue
        bands = picture.getbands() if picture.mode != "P" else tuple(picture.palette.mode)
        if len(bands) != channels:
            found.add("channels", row, f"{len(bands)} channel(s) ({picture.mode})")


def report_image_problems(
    uri: str, modality: str, channels: int, found: ImageRowProblems, problems: list[str]
) -> None:
    """One line per kind of bad image row: how many, the first row and what it showed, and the fix."""
    if found.rows["undecodable"]:
        rows = found.rows["undecodable"]
        problems.append(
            f"{uri}: {len(rows)} row(s) are not decodable images (first at row {rows[0]}: "
            f"{found.first['undecodable']}); re-encode them as PNG/JPEG or drop those rows"
        )
    if found.rows["channels"]:
        rows = found.rows["channels"]
        problems.append(
            f"{uri}: {len(rows)} image(s) do not have the {channels} channel(s) of modalities.{modality}.dim "
            f"(first at row {rows[0]}: {found.first['channels']}); convert them to "
            f"{CHANNEL_MODES.get(channels, 'L or RGB')} (uml-ray data images does) or fix the dim"
        )
