"""The logistic-regression probe: accuracy on separable data, determinism, and the pooled-embedding path."""

import numpy as np
import pytest
import torch

from uml_ray.data.collate import pad_sequences
from uml_ray.models.sequence import SharedSequenceModel
from uml_ray.train.probe import evaluate_probe, fit_probe, probe_accuracy


def _blobs(n_per_class, classes=4, dim=6, seed=0, spread=1.0):
    rng = np.random.default_rng(seed)
    centers = np.random.default_rng(99).normal(scale=3.0, size=(classes, dim))
    labels = np.repeat(np.arange(classes), n_per_class)
    return centers[labels] + spread * rng.normal(size=(len(labels), dim)), labels


def test_probe_beats_chance_on_separable_data():
    train, val = _blobs(50, seed=0), _blobs(30, seed=1)
    probe = fit_probe(*train, C=1.0)
    accuracy = probe_accuracy(probe, *val)
    assert accuracy > 0.9  # chance is 0.25
    shuffled = np.random.default_rng(2).permutation(train[1])
    assert probe_accuracy(fit_probe(train[0], shuffled), *val) < 0.6


def test_probe_is_deterministic():
    train, val = _blobs(40, seed=0, spread=3.0), _blobs(40, seed=1, spread=3.0)
    first, second = fit_probe(*train, C=0.5), fit_probe(*train, C=0.5)
    assert np.array_equal(first[-1].coef_, second[-1].coef_)
    assert np.array_equal(first.predict(val[0]), second.predict(val[0]))
    assert 0.4 < probe_accuracy(first, *val) < 1.0  # overlapping blobs: a real, non-trivial number


def test_probe_rejects_unusable_inputs():
    features, labels = _blobs(5)
    with pytest.raises(ValueError, match="at least two classes"):
        fit_probe(features, np.zeros(len(features), dtype=int))
    features[3, 2] = np.nan
    with pytest.raises(ValueError, match="NaN or inf"):
        fit_probe(features, labels)


def test_evaluate_probe_on_pooled_sequence_embeddings():
    """Classes that differ only in their dynamics are told apart from the pooled encoder output."""
    rng = np.random.default_rng(0)

    def split(n):
        labels = rng.integers(0, 2, size=n)
        lengths = rng.integers(5, 12, size=n)
        sequences = [
            np.cumsum(rng.normal(loc=0.5 if c else -0.5, size=(t, 3)), axis=0)
            for c, t in zip(labels, lengths)
        ]
        return (np.concatenate(sequences).astype(np.float32), lengths), labels

    torch.manual_seed(0)
    model = SharedSequenceModel(
        {"x": 3}, zdim=16, layers=1, heads=2, dropout=0.0, pos_emb="sinusoidal", max_len=16
    ).eval()

    def pool(inputs):
        with torch.no_grad():
            return model.pool("x", *pad_sequences(*inputs)).numpy()

    scores = evaluate_probe(pool, split(80), split(40), split(40), C=1.0)
    assert set(scores) == {"val_acc", "test_acc"}
    assert scores["val_acc"] > 0.8 and scores["test_acc"] > 0.8  # chance is 0.5


def test_probe_log_loss_matches_sklearn_and_stays_finite_for_unseen_labels():
    from sklearn.metrics import log_loss

    from uml_ray.train.probe import probe_log_loss

    train, val = _blobs(30, seed=0, spread=3.0), _blobs(20, seed=1, spread=3.0)
    probe = fit_probe(*train)
    assert probe_log_loss(probe, *val) == pytest.approx(
        log_loss(val[1], probe.predict_proba(val[0]), labels=probe.classes_)
    )
    unseen = val[1].copy()
    unseen[0] = 7  # a class the probe never saw counts as probability 1e-15
    expected = (probe_log_loss(probe, val[0][1:], val[1][1:]) * (len(unseen) - 1) - np.log(1e-15)) / len(
        unseen
    )
    assert probe_log_loss(probe, val[0], unseen) == pytest.approx(expected)
