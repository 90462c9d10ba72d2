"""Feature magnitude: running |value| statistics of a features column and the too-large-value check.

A shard whose values are finite but huge (a scaling bug, a page decoded into finite garbage)
trains to nonsense without a warning, so ``data validate`` bounds |value| by ``max_abs`` and
reports each split's |value| statistics.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# the largest |feature value| a shard may hold unless raised (`data validate --max-abs`,
# data.max_abs_feature): frozen encoders give values of order 1-100 (an LLM's outlier channels a few
# thousand); values beyond this are a scaling bug or pages decoded into finite garbage
DEFAULT_MAX_ABS = 1.0e6


@dataclass
class Magnitude:
    """Running |value| statistics of a features column: how many finite values, their sum and max."""

    values: int = 0
    abs_sum: float = 0.0
    abs_max: float = 0.0

    def add(self, values: np.ndarray) -> None:
        """Count the finite values of ``values`` (NaN/inf are reported elsewhere)."""
        finite = np.abs(values[np.isfinite(values)], dtype=np.float64)
        if finite.size:
            self.values += finite.size
            self.abs_sum += float(finite.sum())
            self.abs_max = max(self.abs_max, float(finite.max()))

    def merge(self, other: Magnitude) -> None:
        """Add another shard's statistics to these."""
        self.values += other.values
        self.abs_sum += other.abs_sum
        self.abs_max = max(self.abs_max, other.abs_max)

    def summary(self) -> dict:
        """``{"abs_max": ..., "abs_mean": ...}`` over every finite value seen."""
        mean = self.abs_sum / self.values if self.values else 0.0
        return {"abs_max": self.abs_max, "abs_mean": mean}


def check_magnitude(values, rows, value_rows, max_abs, magnitude: Magnitude, bad, large_values) -> None:
    """Add a batch's |values| to ``magnitude`` and note the rows holding a finite value beyond
    ``max_abs`` (``value_rows`` maps each row of ``values`` to its batch row: one per step for sequences)."""
    magnitude.add(values)
    with np.errstate(invalid="ignore"):
        large = np.isfinite(values) & (np.abs(values) > max_abs)
    hit = large.any(axis=1)
    if hit.any():
        batch_rows, first = np.unique(value_rows[hit], return_index=True)
        bad["too large"].append(rows[batch_rows])
        large_values.append(values[hit][first][large[hit][first]].reshape(-1)[:1])
