"""Where raw examples come from, before any encoder sees them (docs/method.md §1, docs/data-format.md §6).

Images: ImageFolder-style directories (``root/<class>/<file>``), Parquet files of encoded image
bytes, and the Fashion-MNIST idx files (Debian ``dataset-fashion-mnist``).
Text: CuPL-format JSON (``{classname: [sentence, ...]}``), prompt templates, and WordNet glosses
(Debian ``wordnet-base``, parsed directly: NLTK's reader needs a ``lexnames`` file the package lacks).

Every text source returns ``(text, class index)`` pairs for an ordered class list, and fails with a
DataError naming any class left without text — a class is never dropped silently.
"""

from __future__ import annotations

import gzip
import json
import os
import re
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from uml_ray.errors import DataError

FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_CLASSES = [
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
]
WORDNET_DIR = "/usr/share/wordnet"
# WordNet 3.0 noun senses per Fashion-MNIST class, as lemma.n.<sense number in index.noun order>.
# "top" has eleven noun senses; sense 10 is the garment. The Fashion-MNIST bags are handbags, so "Bag"
# uses handbag.n.01 (= bag.n.04): bag.n.01's hyponyms are tea bags, sandbags and body bags. WordNet has no
# "ankle boot"; boot.n.01 ("footwear that covers the whole foot and lower leg") is the closest sense.
FASHION_MNIST_SENSES = {
    "T-shirt/top": ["tee_shirt.n.01", "top.n.10"],
    "Trouser": ["trouser.n.01"],
    "Pullover": ["pullover.n.01", "sweater.n.01"],
    "Dress": ["dress.n.01"],
    "Coat": ["coat.n.01"],
    "Sandal": ["sandal.n.01"],
    "Shirt": ["shirt.n.01"],
    "Sneaker": ["sneaker.n.01"],
    "Bag": ["handbag.n.01"],
    "Ankle boot": ["boot.n.01"],
}
TEMPLATES = [
    "a photo of a {}.",
    "a black and white photo of a {}.",
    "a low resolution photo of a {}.",
    "a grayscale picture of a {}.",
    "a product photo of a {}.",
    "a cropped photo of the {}.",
    "a close-up photo of a {}.",
    "a small photo of the {}.",
]
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")


def read_idx(path: str) -> np.ndarray:
    """An idx-format array from a ``.gz`` or plain file.

    Images come back as ``(N, rows, cols)`` uint8, labels as ``(N,)`` uint8.
    """
    opener = gzip.open if str(path).endswith(".gz") else open
    try:
        with opener(path, "rb") as handle:
            data = handle.read()
    except OSError as exc:
        raise DataError(
            f"{path}: cannot read ({exc}); for Fashion-MNIST install the Debian package dataset-fashion-mnist"
        ) from None
    if len(data) < 8:
        raise DataError(f"{path}: too short for an idx file")
    magic, count = struct.unpack(">II", data[:8])
    if magic == 2051:
        rows, cols = struct.unpack(">II", data[8:16])
        expected, offset, shape = count * rows * cols, 16, (count, rows, cols)
    elif magic == 2049:
        expected, offset, shape = count, 8, (count,)
    else:
        raise DataError(
            f"{path}: not an idx uint8 image (2051) or label (2049) file; magic number is {magic}"
        )
    if len(data) - offset != expected:
        raise DataError(f"{path}: header says {expected} bytes of data, file has {len(data) - offset}")
    return np.frombuffer(data, dtype=np.uint8, offset=offset).reshape(shape)


def load_fashion_mnist(split: str, folder: str = FASHION_MNIST_DIR) -> tuple[np.ndarray, np.ndarray]:
    """Fashion-MNIST ``split`` ('train' = 60k, 'test' = 10k).

    Images come back as ``(N, 28, 28)`` uint8, labels as ``(N,)`` int64.
    """
    prefix = {"train": "train", "test": "t10k"}.get(split)
    if prefix is None:
        raise DataError(f"Fashion-MNIST split '{split}': use 'train' or 'test'")
    images = read_idx(os.path.join(folder, f"{prefix}-images-idx3-ubyte.gz"))
    labels = read_idx(os.path.join(folder, f"{prefix}-labels-idx1-ubyte.gz")).astype(np.int64)
    if len(images) != len(labels):
        raise DataError(f"{folder}: {len(images)} {split} images but {len(labels)} labels")
    return images, labels


@dataclass
class ImageFolder:
    """An ImageFolder-style directory: ordered class names (sorted sub-folders) and one row per image file."""

    classes: list[str]
    paths: list[str]
    labels: np.ndarray
    ids: list[str]


def list_image_folder(root: str, classes: list[str] | None = None) -> ImageFolder:
    """Index ``root/<class>/<image>`` files (sorted, so row order is the same on every machine).

    ``classes`` fixes the class order (default: sorted sub-folder names); a named class without a
    folder or an empty folder is a DataError. Ids are paths relative to ``root``.
    """
    base = Path(root)
    if not base.is_dir():
        raise DataError(f"{root}: not a directory of class folders")
    folders = sorted(p.name for p in base.iterdir() if p.is_dir())
    classes = list(classes) if classes is not None else folders
    missing = [c for c in classes if c not in folders]
    if missing:
        raise DataError(f"{root}: no folder for class(es) {missing}; folders are {folders}")
    paths, labels, ids, empty = [], [], [], []
    for label, name in enumerate(classes):
        files = sorted(p for p in (base / name).rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            empty.append(name)
        paths.extend(str(p) for p in files)
        labels.extend([label] * len(files))
        ids.extend(str(p.relative_to(base)) for p in files)
    if empty:
        raise DataError(f"{root}: class folder(s) {empty} hold no images ({', '.join(IMAGE_SUFFIXES)})")
    return ImageFolder(classes=classes, paths=paths, labels=np.array(labels, dtype=np.int64), ids=ids)


def decode_image(payload) -> np.ndarray:
    """A uint8 ``H x W`` or ``H x W x 3`` array from encoded bytes, a file path, or an array (kept as is)."""
    import io

    from PIL import Image

    if isinstance(payload, np.ndarray) and payload.dtype != object:
        return payload
    if isinstance(payload, (bytes, bytearray, memoryview)):
        picture = Image.open(io.BytesIO(bytes(payload)))
    else:
        picture = Image.open(str(payload))
    if picture.mode not in ("L", "RGB"):
        picture = picture.convert("RGB")
    return np.asarray(picture)


def class_key(name: str) -> str:
    """The form class names are matched in: lower case, '_' and '-' as spaces, single spaces."""
    return re.sub(r"\s+", " ", re.sub(r"[_\-]", " ", str(name).lower())).strip()


def _check_coverage(
    pairs: list[tuple[str, int]], classes: list[str], source: str, available: list[str]
) -> None:
    covered = {label for _, label in pairs}
    missing = [name for label, name in enumerate(classes) if label not in covered]
    if missing:
        raise DataError(f"{source}: no text for class(es) {missing}; available keys: {available}")


def read_json_mapping(path: str, what: str, shape: str) -> dict:
    """A local JSON file that must hold one object; DataError names the file and ``what`` it is, or
    says the ``shape`` it must have."""
    try:
        raw = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise DataError(f"{path}: cannot read {what} ({exc})") from None
    if not isinstance(raw, dict):
        raise DataError(f"{path}: {shape}")
    return raw


def load_cupl(path: str, classes: list[str]) -> list[tuple[str, int]]:
    """``(sentence, class index)`` pairs from a CuPL JSON ``{classname: [sentence, ...]}``.

    Keys match class names in ``class_key`` form (case, '_' and '-' ignored). A class without a
    key, or with no sentences, is a DataError naming it and the keys the file has; keys for
    classes not in ``classes`` are ignored (CuPL files often cover a superset).
    """
    raw = read_json_mapping(path, "CuPL JSON", "CuPL JSON must map class names to lists of sentences")
    by_key = {}
    for key, sentences in raw.items():
        if isinstance(sentences, str):
            sentences = [sentences]
        if not isinstance(sentences, list) or not all(isinstance(s, str) for s in sentences):
            raise DataError(f"{path}: key {key!r} must map to a list of sentences")
        by_key.setdefault(class_key(key), []).extend(s.strip() for s in sentences if s.strip())
    pairs = [
        (sentence, label)
        for label, name in enumerate(classes)
        for sentence in by_key.get(class_key(name), [])
    ]
    _check_coverage(pairs, classes, path, sorted(raw))
    return pairs


def template_texts(
    classes: list[str], templates: list[str] = TEMPLATES, names: dict[str, str] | None = None
) -> list[tuple[str, int]]:
    """``(template.format(name), class index)`` for every template and class.

    ``names`` renames classes for prose.
    """
    bad = [t for t in templates if "{}" not in t]
    if bad:
        raise DataError(f"prompt template(s) {bad} have no '{{}}' for the class name")
    names = names or {}
    return [
        (template.format(names.get(name, name)), label)
        for label, name in enumerate(classes)
        for template in templates
    ]


@dataclass
class WordNet:
    """WordNet noun lemma → synset offsets (sense order), offset → (lemmas, hyponym offsets, gloss)."""

    senses: dict[str, list[str]]
    synsets: dict[str, tuple[list[str], list[str], str]]

    def synset(self, name: str) -> str:
        """The offset of ``lemma.n.N`` (or of ``lemma``'s first noun sense); DataError if WordNet lacks it."""
        lemma, _, number = name.partition(".n.")
        lemma = lemma.lower().replace(" ", "_")
        offsets = self.senses.get(lemma)
        if not offsets:
            raise DataError(f"WordNet has no noun '{lemma}'")
        index = int(number or 1) - 1
        if not 0 <= index < len(offsets):
            raise DataError(
                f"WordNet noun '{lemma}' has {len(offsets)} sense(s); asked for sense {index + 1}"
            )
        return offsets[index]


def load_wordnet(folder: str = WORDNET_DIR) -> WordNet:
    """Parse ``index.noun`` and ``data.noun`` of a WordNet 3.0 database folder."""
    senses, synsets = {}, {}
    try:
        with open(os.path.join(folder, "index.noun")) as handle:
            for line in handle:
                if line.startswith(" "):  # license header
                    continue
                fields = line.split()
                senses[fields[0]] = fields[-int(fields[2]) :]
        with open(os.path.join(folder, "data.noun")) as handle:
            for line in handle:
                if line.startswith(" "):
                    continue
                head, _, gloss = line.partition(" | ")
                fields = head.split()
                word_count = int(fields[3], 16)
                words = [w.replace("_", " ") for w in fields[4 : 4 + 2 * word_count : 2]]
                position = 4 + 2 * word_count
                pointers = [
                    fields[position + 1 + 4 * i : position + 5 + 4 * i] for i in range(int(fields[position]))
                ]
                hyponyms = [p[1] for p in pointers if p[0] in ("~", "~i") and p[2] == "n"]
                synsets[fields[0]] = (words, hyponyms, gloss.strip())
    except OSError as exc:
        raise DataError(
            f"{folder}: cannot read WordNet ({exc}); install the Debian package wordnet-base"
        ) from None
    return WordNet(senses=senses, synsets=synsets)


def wordnet_glosses(
    classes: list[str],
    senses: dict[str, list[str]] | None = None,
    hyponyms: bool = True,
    folder: str = WORDNET_DIR,
) -> list[tuple[str, int]]:
    """``("<lemma>: <gloss>", class index)`` pairs from WordNet for each class.

    ``senses`` maps a class to WordNet senses (``lemma.n.N``); a class not in it uses the first noun
    sense of its own name. With ``hyponyms``, each sense's direct hyponyms add their glosses too
    (e.g. coat → greatcoat, parka), each synset going to one class only: a synset named for a
    class is that class's, and a hyponym reachable from two classes goes to the first.
    A class WordNet cannot place is a DataError naming it.
    """
    wordnet = load_wordnet(folder)
    senses = senses or {}
    chosen, problems = {}, []
    for label, name in enumerate(classes):
        try:
            chosen[label] = [wordnet.synset(s) for s in senses.get(name, [class_key(name).replace(" ", "_")])]
        except DataError as exc:
            problems.append(f"class {name!r}: {exc}")
    if problems:
        raise DataError(
            problems + ["map these classes to WordNet senses (lemma.n.N) with the senses argument"]
        )
    used = {offset for offsets in chosen.values() for offset in offsets}
    pairs = []
    for label in range(len(classes)):
        offsets = list(chosen[label])
        if hyponyms:
            for offset in chosen[label]:
                extra = [h for h in wordnet.synsets[offset][1] if h not in used]
                used.update(extra)
                offsets.extend(extra)
        for offset in offsets:
            words, _, gloss = wordnet.synsets[offset]
            pairs.append((f"{words[0]}: {gloss}", label))
    return pairs
