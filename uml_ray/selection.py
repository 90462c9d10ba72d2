"""The selection statistic: val accuracy with ties broken by val loss, and what the val split can tell apart.

Val accuracy over ``n_val`` rows moves in steps of ``1/n_val``: on a 40-row split, hundreds of
configs of a sweep share the top accuracy, and ranking them by accuracy alone returns whichever
came first. ``selection_score`` gives the ranking resolution without changing its order where
accuracy decides::

    selection_score = best_val_acc + (1 / n_val) * 0.5 / (1 + best_val_loss)

The loss term lies in (0, 0.5 / n_val]: under half an accuracy step, so a config with a higher
val accuracy always scores higher whatever the losses (the order is lexicographic: accuracy,
then lower val loss), and configs tied on accuracy are ordered by their val loss. Both numbers are
taken at the run's best-val point, the weights its test accuracy is read with. A non-finite loss
adds nothing (it ranks last among its accuracy ties).

The standard error of a val accuracy p is binomial, ``sqrt(p (1 - p) / n_val)``: configs whose
best val accuracy lies within one SE of the chosen one's cannot be told apart by the val split,
whatever their order by loss. ``uml-ray best`` and the sweep summary say how many there are.

Plain Python (no torch): the training loop reports the score; the driver and ``uml-ray best`` rank
and summarise with the same functions.
"""

from __future__ import annotations

import math

SCORE = "selection_score"  # the metric name, reported at every validation
VAL_ROWS = "val_rows"  # rows of the val split the accuracy is over (reported beside it)


def selection_score(best_val_acc: float, best_val_loss: float, val_rows: int) -> float:
    """Val accuracy plus under half an accuracy step that is larger for a lower val loss."""
    step = 1.0 / max(int(val_rows), 1)
    closeness = 1.0 / (1.0 + best_val_loss) if math.isfinite(best_val_loss) and best_val_loss >= 0 else 0.0
    return best_val_acc + 0.5 * step * closeness


def standard_error(acc: float, val_rows: int) -> float:
    """Binomial standard error of an accuracy ``acc`` over ``val_rows`` rows."""
    return math.sqrt(max(acc * (1.0 - acc), 0.0) / max(int(val_rows), 1))


def _finite(value, default: float) -> float:
    if value is None or not isinstance(value, (int, float)) or not math.isfinite(value):
        return default
    return float(value)


def rankable(metrics: dict, metric: str) -> bool:
    """Whether a run's metrics can be ranked by ``metric``: it holds it, or (recorded before the
    selection score existed) its best val accuracy stands in for the score."""
    if metric == SCORE and metrics.get(SCORE) is None:
        return metrics.get("best_val_acc") is not None
    return metrics.get(metric) is not None


def selection_key(metrics: dict, metric: str) -> tuple[float, float, float]:
    """Sort key of a run's metrics, higher is better: ``metric`` (for a run recorded before the
    selection score, its best val accuracy in the score's place), then best val accuracy, then
    lower best val loss."""
    value = metrics.get(metric)
    if value is None and metric == SCORE:
        value = metrics.get("best_val_acc")
    return (
        _finite(value, -math.inf),
        _finite(metrics.get("best_val_acc"), -math.inf),
        -_finite(metrics.get("best_val_loss"), math.inf),
    )


def separation(best: dict, completed: list[dict]) -> dict | None:
    """How the chosen run's val accuracy stands among ``completed`` runs' metrics (the chosen one
    included): its accuracy, SE, val rows, the runs within one SE of it and those tied with it.
    None when the chosen run recorded no val rows (a run from before the selection score)."""
    acc, rows = best.get("best_val_acc"), best.get(VAL_ROWS)
    if acc is None or not rows:
        return None
    se = standard_error(acc, rows)
    accuracies = [m["best_val_acc"] for m in completed if m.get("best_val_acc") is not None]
    # accuracies are multiples of 1/n_val computed in floating point: compare with a margin far
    # below one step
    margin = 1e-9
    return {
        "best_val_acc": acc,
        "val_se": se,
        VAL_ROWS: int(rows),
        "within_1se": sum(1 for a in accuracies if abs(a - acc) <= se + margin),
        "tied_top": sum(1 for a in accuracies if abs(a - acc) <= margin),
        "completed": len(accuracies),
    }


def separation_line(facts: dict | None) -> str:
    """One line saying the chosen val accuracy, its SE, and how many configs the val split cannot
    tell from it."""
    if facts is None:
        return "val accuracy's standard error unknown: the chosen run recorded no val_rows (an older run)"
    return (
        f"chosen config's val accuracy {facts['best_val_acc']:.4f} ± {facts['val_se']:.4f} "
        f"(1 SE over {facts[VAL_ROWS]} val rows; "
        f"{facts['tied_top']} of {facts['completed']} completed configs tie at it); "
        f"{facts['within_1se']} configs within 1 SE of the best val accuracy: "
        "the val split cannot tell them apart"
    )
