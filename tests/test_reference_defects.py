"""Reference-code defects we avoid that no other test covers (docs/reference-defects.md): validation
leaves the model in train mode, and an auxiliary set smaller than one batch is served, not dropped."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pyarrow as pa
import pytest
import torch

from uml_ray.data.format import build_table, table_to_numpy
from uml_ray.data.streams import BatchStream, StreamSpec, _class_means
from uml_ray.models.sequence import SharedSequenceModel
from uml_ray.models.supervised import SharedHeadUML
from uml_ray.train.loop import evaluate
from uml_ray.train.sequence_loop import pool_split

CPU = SimpleNamespace(device=torch.device("cpu"), all_reduce=lambda tensor: tensor)


class TableIterator:
    """The slice of a Ray Data iterator that an in-memory BatchStream reads: the whole table at once."""

    def __init__(self, table: pa.Table):
        self.table = table

    def iter_batches(self, batch_size=None, batch_format="pyarrow", **_):
        yield self.table


def stream_of(features, labels, kind: str, dim: int, batch_size: int) -> BatchStream:
    ids = [f"row-{i:03d}" for i in range(len(features))]
    table = build_table(features, labels, ids, kind, dim)
    spec = StreamSpec(name="m.train", kind=kind, dim=dim, rows=len(ids), cached=True)
    return BatchStream(TableIterator(table), spec, batch_size, seed=0, rank=0, world_size=1)


def test_supervised_validation_returns_the_model_to_train_mode():
    rng = np.random.default_rng(0)
    torch.manual_seed(0)
    features, labels = rng.normal(size=(20, 6)).astype(np.float32), rng.integers(0, 3, 20)
    model = SharedHeadUML({"image": 6, "text": 4}, "image", num_classes=3)
    # the figures of the whole split, computed here in one batch, in eval mode
    model.eval()
    with torch.no_grad():
        logits = model.logits("image", torch.from_numpy(features))
    target = torch.from_numpy(labels)
    val = stream_of(features, labels, "vector", 6, batch_size=8)
    modes = []
    model.head.register_forward_hook(lambda module, args, output: modes.append(module.training))
    model.train()
    result = evaluate(model, val, CPU, batch_size=8)
    assert modes == [False] * 3  # every validation batch (8 + 8 + 4 rows) in eval mode
    assert model.training  # the reference stayed in eval mode from its first validation on
    assert result["rows"] == 20
    assert result["acc"] == pytest.approx(float((logits.argmax(1) == target).double().mean()))
    assert result["loss"] == pytest.approx(float(torch.nn.functional.cross_entropy(logits, target)), rel=1e-5)


def test_sequence_validation_pools_in_eval_mode_then_trains_with_dropout_again():
    rng = np.random.default_rng(0)
    torch.manual_seed(0)
    model = SharedSequenceModel({"image": 5}, zdim=16, layers=2, heads=4, dropout=0.5)
    sequences = [rng.normal(size=(n, 5)).astype(np.float32) for n in (4, 7, 3, 6)]
    val = stream_of(sequences, [0, 1, 0, 1], "sequence", 5, batch_size=2)
    model.train()
    first, labels = pool_split(model, "image", val, CPU.device)
    second, _ = pool_split(model, "image", val, CPU.device)
    assert first.shape == (4, 16) and labels.tolist() == [0, 1, 0, 1]
    np.testing.assert_array_equal(first, second)  # pooled without dropout: eval mode during validation
    assert model.training
    x = torch.from_numpy(np.stack([sequences[0][:3], sequences[2]]))
    mask = torch.ones(2, 3, dtype=torch.bool)
    # dropout is active again after validation: two training forwards differ
    assert not torch.equal(model.next_step_loss("image", x, mask), model.next_step_loss("image", x, mask))


@pytest.mark.timeout(60)  # a stream that dropped its only, short batch would search for one for ever
def test_class_mean_set_smaller_than_a_batch_is_served_whole():
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(10), 5)
    descriptions = build_table(
        rng.normal(size=(50, 4)) + labels[:, None], labels, [f"t-{i}" for i in range(50)], "vector", 4
    )
    means = _class_means(descriptions)
    assert (
        len(means) == 10
    )  # 10 classes, batch size 32: the reference's drop_last loader had no batch to give
    spec = StreamSpec(name="text.train", kind="vector", dim=4, rows=10, cached=True)
    stream = BatchStream(TableIterator(means), spec, batch_size=32, seed=0, rank=0, world_size=1)
    assert stream.batches_per_epoch() == 1
    for epoch in range(3):
        features, batch_labels = stream.next()
        assert features.shape == (10, 4) and sorted(batch_labels.tolist()) == list(range(10))
        assert stream.epoch == epoch
    rows = table_to_numpy(descriptions, "vector", 4)[0]
    expected = np.stack([rows[labels == c].mean(axis=0) for c in range(10)])
    np.testing.assert_allclose(features[np.argsort(batch_labels)], expected, rtol=1e-5)
