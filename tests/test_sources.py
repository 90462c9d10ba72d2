"""Image and text sources: idx files, ImageFolder, CuPL, templates, WordNet glosses."""

from __future__ import annotations

import gzip
import io
import json
import struct

import numpy as np
import pytest
from PIL import Image

from uml_ray.data.sources import (
    FASHION_MNIST_CLASSES,
    FASHION_MNIST_SENSES,
    decode_image,
    list_image_folder,
    load_cupl,
    load_fashion_mnist,
    read_idx,
    template_texts,
    wordnet_glosses,
)
from uml_ray.errors import DataError


def test_read_idx_roundtrip(tmp_path):
    images = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    path = tmp_path / "images-idx3-ubyte.gz"
    with gzip.open(path, "wb") as handle:
        handle.write(struct.pack(">IIII", 2051, 2, 3, 4) + images.tobytes())
    np.testing.assert_array_equal(read_idx(str(path)), images)
    labels = tmp_path / "labels-idx1-ubyte"
    labels.write_bytes(struct.pack(">II", 2049, 3) + bytes([7, 1, 9]))
    assert read_idx(str(labels)).tolist() == [7, 1, 9]
    labels.write_bytes(struct.pack(">II", 2049, 5) + bytes([7, 1, 9]))
    with pytest.raises(DataError, match="header says 5 bytes of data, file has 3"):
        read_idx(str(labels))


def test_fashion_mnist_package_files():
    images, labels = load_fashion_mnist("test")
    assert images.shape == (10000, 28, 28) and images.dtype == np.uint8
    assert np.bincount(labels).tolist() == [1000] * 10
    assert len(FASHION_MNIST_CLASSES) == 10


def _png(color: int, size=(6, 4)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, (color, 0, 0)).save(buffer, format="PNG")
    return buffer.getvalue()


def test_image_folder_listing_and_decoding(tmp_path):
    for name, count in (("dog", 2), ("cat", 1)):
        (tmp_path / name).mkdir()
        for i in range(count):
            (tmp_path / name / f"{i}.png").write_bytes(_png(40 * (i + 1)))
    (tmp_path / "cat" / "notes.txt").write_text("not an image")
    folder = list_image_folder(str(tmp_path))
    assert folder.classes == ["cat", "dog"]
    assert folder.ids == ["cat/0.png", "dog/0.png", "dog/1.png"]
    assert folder.labels.tolist() == [0, 1, 1]
    decoded = decode_image(folder.paths[2])
    assert decoded.shape == (4, 6, 3) and decoded[0, 0, 0] == 80
    assert decode_image(_png(120))[0, 0, 0] == 120
    with pytest.raises(DataError, match=r"no folder for class\(es\) \['bird'\]"):
        list_image_folder(str(tmp_path), ["cat", "bird"])


def test_cupl_matches_names_and_fails_loudly_on_missing_classes(tmp_path):
    path = tmp_path / "cupl.json"
    path.write_text(
        json.dumps(
            {
                "ankle_boot": ["A boot that ends at the ankle."],
                "Sandal": ["Open shoe.", "Strappy."],
                "Umbrella": ["Not a class here."],
            }
        )
    )
    pairs = load_cupl(str(path), ["Sandal", "Ankle boot"])
    assert pairs == [("Open shoe.", 0), ("Strappy.", 0), ("A boot that ends at the ankle.", 1)]
    with pytest.raises(DataError) as info:
        load_cupl(str(path), ["Sandal", "Ankle boot", "Bag", "Coat"])
    message = str(info.value)
    assert "no text for class(es) ['Bag', 'Coat']" in message
    assert "available keys: ['Sandal', 'Umbrella', 'ankle_boot']" in message


def test_templates():
    assert template_texts(["cat", "dog"], ["a photo of a {}.", "{} again"]) == [
        ("a photo of a cat.", 0),
        ("cat again", 0),
        ("a photo of a dog.", 1),
        ("dog again", 1),
    ]
    with pytest.raises(DataError, match="no '{}'"):
        template_texts(["cat"], ["a photo"])


def test_wordnet_glosses_for_the_fashion_mnist_classes():
    pairs = wordnet_glosses(FASHION_MNIST_CLASSES, FASHION_MNIST_SENSES, hyponyms=False)
    first = {}
    for text, label in pairs:
        first.setdefault(FASHION_MNIST_CLASSES[label], text)
    assert set(first) == set(FASHION_MNIST_CLASSES)
    assert first["Sandal"] == "sandal: a shoe consisting of a sole fastened by straps to the foot"
    assert first["Ankle boot"] == "boot: footwear that covers the whole foot and lower leg"
    assert first["Sneaker"] == "gym shoe: a canvas shoe with a pliable rubber sole"
    assert first["T-shirt/top"] == "jersey: a close-fitting pullover shirt"
    assert first["Bag"].startswith("bag: a container used for carrying money and small personal items")

    with_hyponyms = wordnet_glosses(FASHION_MNIST_CLASSES, FASHION_MNIST_SENSES, hyponyms=True)
    texts = [text for text, _ in with_hyponyms]
    assert len(texts) == len(set(texts)) and len(texts) > 60
    assert (
        "flip-flop: a backless sandal held to the foot by a thong between the big toe and the second toe",
        FASHION_MNIST_CLASSES.index("Sandal"),
    ) in with_hyponyms


def test_wordnet_default_sense_and_unknown_class():
    assert wordnet_glosses(["Sandal"], hyponyms=False) == [
        ("sandal: a shoe consisting of a sole fastened by straps to the foot", 0)
    ]
    with pytest.raises(DataError, match="class 'Zorblax': WordNet has no noun 'zorblax'"):
        wordnet_glosses(["Sandal", "Zorblax"])
