"""Statistics of the science commands, in plain numpy/scipy: paired differences over seeds and the
conversion ratio read off an interpolated unimodal accuracy curve.

Everything here is a pure function of arrays of accuracies, so tests can check it against answers
worked out by hand. Seeds are the unit of replication: a paired difference is one number per seed,
and a bootstrap resamples whole seeds.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
from scipy import stats

BOOTSTRAP_SAMPLES = 10000


@dataclass(frozen=True)
class PairedSummary:
    """``a - b`` over paired seeds: the mean difference, its t and bootstrap intervals, and two tests.

    ``sign_p`` is the two-sided exact binomial sign test over the non-zero differences and
    ``wilcoxon_p`` the two-sided exact Wilcoxon signed-rank test (zeros dropped); both are 1.0 when
    every difference is 0. With n seeds neither can go below 2 / 2**n (0.25 at n = 3).
    """

    n: int
    mean: float
    sd: float
    t_low: float
    t_high: float
    boot_low: float
    boot_high: float
    wins: int
    losses: int
    sign_p: float
    wilcoxon_p: float
    confidence: float

    def to_dict(self) -> dict:
        """Plain data (JSON-ready)."""
        return asdict(self)

    def excludes_zero(self) -> bool:
        """Whether the t interval lies wholly on one side of 0."""
        return self.t_low > 0 or self.t_high < 0


def t_interval(differences, confidence: float = 0.95) -> tuple[float, float]:
    """Two-sided Student-t interval of the mean of ``differences`` (n - 1 degrees of freedom)."""
    d = np.asarray(differences, dtype=float)
    if d.size < 2:
        raise ValueError("a t interval needs at least 2 paired values")
    mean = d.mean()
    half = stats.t.ppf(0.5 + confidence / 2, d.size - 1) * d.std(ddof=1) / np.sqrt(d.size)
    return float(mean - half), float(mean + half)


def bootstrap_interval(
    differences, confidence: float = 0.95, samples: int = BOOTSTRAP_SAMPLES, seed: int = 0
) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of ``differences``, resampling them with replacement.

    With few values it can only reach the means of the multisets they form (10 at n = 3), so it
    is narrower than the t interval there; both are reported.
    """
    d = np.asarray(differences, dtype=float)
    rng = np.random.default_rng(seed)
    means = d[rng.integers(0, d.size, size=(samples, d.size))].mean(axis=1)
    alpha = (1 - confidence) / 2
    return float(np.quantile(means, alpha)), float(np.quantile(means, 1 - alpha))


def sign_test(differences) -> tuple[int, int, float]:
    """(wins, losses, two-sided exact binomial p) over the non-zero differences; ties are dropped."""
    d = np.asarray(differences, dtype=float)
    wins, losses = int((d > 0).sum()), int((d < 0).sum())
    if wins + losses == 0:
        return 0, 0, 1.0
    return wins, losses, float(stats.binomtest(wins, wins + losses, 0.5).pvalue)


def wilcoxon_p(differences) -> float:
    """Two-sided exact Wilcoxon signed-rank p over the non-zero differences (1.0 when all are 0)."""
    d = np.asarray(differences, dtype=float)
    d = d[d != 0]
    if d.size == 0:
        return 1.0
    return float(stats.wilcoxon(d, method="exact").pvalue)


def paired_summary(a, b, confidence: float = 0.95, seed: int = 0) -> PairedSummary:
    """Summary of ``a[i] - b[i]`` over n >= 2 paired seeds."""
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if a.shape != b.shape or a.ndim != 1:
        raise ValueError(f"paired values must be two 1-d arrays of one length, got {a.shape} and {b.shape}")
    d = a - b
    t_low, t_high = t_interval(d, confidence)
    boot_low, boot_high = bootstrap_interval(d, confidence, seed=seed)
    wins, losses, sign_p = sign_test(d)
    return PairedSummary(
        int(d.size),
        float(d.mean()),
        float(d.std(ddof=1)),
        t_low,
        t_high,
        boot_low,
        boot_high,
        wins,
        losses,
        sign_p,
        wilcoxon_p(d),
        confidence,
    )


def isotonic_increasing(values) -> np.ndarray:
    """The least-squares non-decreasing fit to ``values`` (pool-adjacent-violators, equal weights).

    A measured accuracy curve can dip between grid points by noise; inverting it needs it monotone.
    """
    blocks: list[list[float]] = []  # [mean, count] per pooled block
    for v in np.asarray(values, dtype=float):
        blocks.append([v, 1.0])
        while len(blocks) > 1 and blocks[-2][0] > blocks[-1][0]:
            (m2, c2), (m1, c1) = blocks.pop(), blocks.pop()
            blocks.append([(m1 * c1 + m2 * c2) / (c1 + c2), c1 + c2])
    return np.concatenate([np.full(int(c), m) for m, c in blocks])


def equivalent_count(counts, curve, accuracy: float) -> float:
    """The target count at which the (non-decreasing) unimodal ``curve`` over ``counts`` reaches ``accuracy``.

    Linear interpolation in log2(count). Below the curve's first point it is ``counts[0]`` (no
    gain); past its last point it is ``counts[-1]``: the grid cannot tell more, so the value is a
    lower bound there. Within a flat stretch the smallest count reaching the accuracy is taken.
    """
    counts, curve = np.asarray(counts, dtype=float), np.asarray(curve, dtype=float)
    if accuracy <= curve[0]:
        return float(counts[0])
    if accuracy > curve[-1]:
        return float(counts[-1])
    i = int(np.searchsorted(curve, accuracy, side="left"))  # curve[i-1] < accuracy <= curve[i]
    if curve[i] == accuracy:
        return float(counts[i])
    logs = np.log2(counts)
    fraction = (accuracy - curve[i - 1]) / (curve[i] - curve[i - 1])
    return float(2 ** (logs[i - 1] + fraction * (logs[i] - logs[i - 1])))


@dataclass(frozen=True)
class Conversion:
    """What auxiliary samples are worth in target samples, from seed-averaged accuracies.

    ``gains[j]``: extra target samples per class the unimodal curve needs to match UML with
    ``aux_counts[j]`` auxiliary samples per class at ``budget`` target samples per class.
    ``ratios[j] = gains[j] / aux_counts[j]``: target samples one auxiliary sample is worth.
    ``ratio``: the least-squares slope through the origin of gains against aux counts (one number
    for the whole grid; the larger counts, where gains are measurable, weigh most).
    ``capped[j]``: UML passed the curve's last point, so the gain is a lower bound.
    """

    curve: list[float]
    uml: list[float]
    gains: list[float]
    ratios: list[float]
    ratio: float
    capped: list[bool]


def conversion(target_counts, unimodal, budget: int, aux_counts, uml) -> Conversion:
    """Conversion from per-seed accuracies: ``unimodal[s, i]`` at ``target_counts[i]`` target samples
    per class, ``uml[s, j]`` at ``budget`` target and ``aux_counts[j]`` auxiliary samples per class.

    The seed means of the unimodal curve are made non-decreasing, and each UML accuracy is read off
    it as an equivalent target count (``equivalent_count``); the gain is that count minus ``budget``.
    """
    counts = np.asarray(target_counts, dtype=float)
    aux = np.asarray(aux_counts, dtype=float)
    curve = isotonic_increasing(np.asarray(unimodal, dtype=float).mean(axis=0))
    uml_mean = np.asarray(uml, dtype=float).mean(axis=0)
    if budget not in target_counts:
        raise ValueError(f"the target budget {budget} must be one of the target counts {list(target_counts)}")
    start = list(target_counts).index(budget)
    # UML is compared with the curve from the budget on: a dip of UML below the budget's own point is no gain
    gains = np.array([equivalent_count(counts[start:], curve[start:], a) - budget for a in uml_mean])
    ratios = gains / aux
    slope = float((aux * gains).sum() / (aux * aux).sum())
    capped = [bool(a > curve[-1]) for a in uml_mean]
    return Conversion(curve.tolist(), uml_mean.tolist(), gains.tolist(), ratios.tolist(), slope, capped)


def bootstrap_conversion(
    target_counts,
    unimodal,
    budget: int,
    aux_counts,
    uml,
    confidence: float = 0.95,
    samples: int = 2000,
    seed: int = 0,
) -> dict:
    """Seed-bootstrap intervals of the conversion: whole seeds resampled with replacement, the same
    draw for the unimodal curve and UML (they share seeds), everything recomputed per draw.

    Returns ``{"ratio": (low, high), "ratios": [(low, high) per aux count], "gains": [...]}``.
    """
    unimodal, uml = np.asarray(unimodal, dtype=float), np.asarray(uml, dtype=float)
    seeds = unimodal.shape[0]
    rng = np.random.default_rng(seed)
    draws = [
        conversion(target_counts, unimodal[pick], budget, aux_counts, uml[pick])
        for pick in rng.integers(0, seeds, size=(samples, seeds))
    ]
    alpha = (1 - confidence) / 2

    def interval(values) -> tuple[float, float]:
        return float(np.quantile(values, alpha)), float(np.quantile(values, 1 - alpha))

    return {
        "ratio": interval([d.ratio for d in draws]),
        "ratios": [interval([d.ratios[j] for d in draws]) for j in range(len(aux_counts))],
        "gains": [interval([d.gains[j] for d in draws]) for j in range(len(aux_counts))],
    }
