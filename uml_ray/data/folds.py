"""k-fold selection's data: the target's train+val pool, re-split into k class-stratified, seeded folds.

A few-shot val split is too small to rank configs (40 rows: accuracy moves in 2.5-point steps).
With ``train.select_folds=k`` the target's train rows (as the run uses them: after
``data.target_per_class``) and its val rows are pooled, sorted by row id, and every row is given
one of k folds: per class, the class's rows in a seeded permutation are dealt to the folds in turn,
each class starting where the previous one stopped, so every fold holds ``floor`` or ``ceil`` of
``n_c / k`` rows of each class ``c`` and the fold sizes differ by at most one row. Fold ``f``'s
model trains on the other folds' rows and is validated on fold ``f``: it never sees them.

The assignment depends only on the pool's ids and labels and ``train.select_seed``: every trial,
worker and resume of a sweep draws the same folds.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from uml_ray.data.format import ID, LABEL
from uml_ray.errors import ConfigError


def pool_table(train: pa.Table, val: pa.Table) -> pa.Table:
    """The target's train and val rows as one id-sorted table (the k-fold pool)."""
    return pa.concat_tables([train, val.cast(train.schema)]).combine_chunks().sort_by(ID)


def check_folds(k: int, class_counts: np.ndarray, classes: list[str], where: str) -> None:
    """ConfigError unless every class present in the pool has at least ``k`` rows (each fold must
    hold a row of every class) and ``k`` is 0 or >= 2."""
    if k == 0:
        return
    if k < 2:
        raise ConfigError(
            f"train.select_folds={k}: use 0 (the manifest's val split) or k >= 2 folds of the train+val pool"
        )
    present = np.flatnonzero(class_counts)
    poorest = int(present[class_counts[present].argmin()])
    if class_counts[poorest] < k:
        raise ConfigError(
            f"train.select_folds={k}: class '{classes[poorest]}' has only {class_counts[poorest]} row(s) in "
            f"the pooled train+val of {where}, fewer than one per fold; use "
            f"train.select_folds<={class_counts[poorest]} (or 0: the manifest's val split)"
        )


def fold_assignment(labels: np.ndarray, k: int, seed: int) -> np.ndarray:
    """The fold (0..k-1) of every row of an id-sorted pool with these ``labels``: class-stratified and
    seeded. Raises ConfigError when a class has fewer than ``k`` rows."""
    labels = np.asarray(labels)
    counts = np.bincount(labels) if len(labels) else np.zeros(0, dtype=int)
    check_folds(k, counts, [str(c) for c in range(len(counts))], "the target")
    rng = np.random.default_rng([seed, k])
    folds = np.empty(len(labels), dtype=np.int64)
    start = 0  # the fold the next class's first row goes to: spreads the remainders over the folds
    for label in np.unique(labels):
        rows = rng.permutation(np.flatnonzero(labels == label))
        folds[rows] = (start + np.arange(len(rows))) % k
        start = (start + len(rows)) % k
    return folds


def fold_split(pool: pa.Table, k: int, seed: int) -> list[tuple[pa.Table, pa.Table]]:
    """Per fold ``f``: (the rows it trains on: every other fold's, its held-out rows), both id-sorted."""
    labels = pool.column(LABEL).to_numpy(zero_copy_only=False)
    folds = fold_assignment(labels, k, seed)
    return [(pool.filter(pa.array(folds != f)), pool.filter(pa.array(folds == f))) for f in range(k)]


class FoldBatches:
    """k train streams, one per fold (each over the pool's rows outside that fold), drawn together:
    ``next()`` gives features ``[k, B, ...]`` and labels ``[k, B]``, fold ``f``'s batch at ``f`` (the
    batches a fused model's fold groups train on). Positions checkpoint per fold."""

    def __init__(self, streams: list):
        self.folds = list(streams)

    @property
    def epoch(self) -> int:
        """The first fold's epoch (the folds' train sets differ by at most a row per class)."""
        return self.folds[0].epoch

    def next(self):
        """The next batch of every fold, stacked."""
        drawn = [stream.next() for stream in self.folds]
        return np.stack([features for features, _ in drawn]), np.stack([labels for _, labels in drawn])

    def state_dict(self) -> dict:
        """Every fold stream's position."""
        return {"folds": [stream.state_dict() for stream in self.folds]}

    def load_state_dict(self, state: dict) -> None:
        """Continue every fold stream from its saved position."""
        for stream, position in zip(self.folds, state["folds"]):
            stream.load_state_dict(position)

    def close(self) -> None:
        """Close every fold stream."""
        for stream in self.folds:
            stream.close()
