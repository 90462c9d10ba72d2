"""The linear-probe evaluation of the self-supervised regime (docs/method.md §2).

Pooled target embeddings of the train split fit a logistic regression on the class labels; its
accuracy on the val split is the number the search optimises, and test accuracy is reported
beside it. Features are standardised first (embedding scales differ between runs, and L2
strength C should mean the same thing in all of them); lbfgs makes the fit deterministic.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import Pipeline, make_pipeline
from sklearn.preprocessing import StandardScaler

MAX_ITER = 2000


def fit_probe(train_feats: np.ndarray, train_labels: np.ndarray, C: float = 1.0) -> Pipeline:
    """Standardise features, then fit a multinomial logistic regression (lbfgs, inverse L2 strength ``C``)."""
    train_feats = np.asarray(train_feats, dtype=np.float64)
    train_labels = np.asarray(train_labels)
    if train_feats.ndim != 2 or len(train_feats) != len(train_labels):
        raise ValueError(
            f"need (N, d) features and N labels, got {train_feats.shape} and {train_labels.shape}"
        )
    if len(np.unique(train_labels)) < 2:
        raise ValueError("the probe needs at least two classes in the train split")
    if not np.isfinite(train_feats).all():
        raise ValueError("probe features contain NaN or inf (did training diverge?)")
    probe = make_pipeline(StandardScaler(), LogisticRegression(C=C, solver="lbfgs", max_iter=MAX_ITER))
    return probe.fit(train_feats, train_labels)


def probe_accuracy(probe: Pipeline, feats: np.ndarray, labels: np.ndarray) -> float:
    """Fraction of rows whose predicted class is the label."""
    predicted = probe.predict(np.asarray(feats, dtype=np.float64))
    return float(np.mean(predicted == np.asarray(labels)))


def probe_log_loss(probe: Pipeline, feats: np.ndarray, labels: np.ndarray) -> float:
    """Mean negative log-likelihood of the labels under the probe (the probe's val loss).

    A label the probe never saw in training gets probability 1e-15 (it cannot predict it), so the
    loss stays finite and still penalises it.
    """
    labels = np.asarray(labels)
    proba = probe.predict_proba(np.asarray(feats, dtype=np.float64))
    classes = probe.classes_
    column = np.searchsorted(classes, labels).clip(max=len(classes) - 1)
    known = classes[column] == labels
    chosen = np.where(known, proba[np.arange(len(labels)), column], 0.0)
    return float(-np.mean(np.log(np.clip(chosen, 1e-15, 1.0))))


def evaluate_probe(
    pool_fn: Callable[[object], np.ndarray],
    train: tuple[object, np.ndarray],
    val: tuple[object, np.ndarray],
    test: tuple[object, np.ndarray],
    C: float = 1.0,
) -> dict[str, float]:
    """Fit the probe on the train split's pooled embeddings; ``{'val_acc', 'test_acc'}``.

    Each split is ``(inputs, labels)``; ``pool_fn(inputs)`` returns the ``(N, d)`` embeddings of
    those inputs (e.g. ``SharedSequenceModel.pool`` of the target over a split's batches).
    """
    probe = fit_probe(pool_fn(train[0]), train[1], C)
    return {
        "val_acc": probe_accuracy(probe, pool_fn(val[0]), val[1]),
        "test_acc": probe_accuracy(probe, pool_fn(test[0]), test[1]),
    }
