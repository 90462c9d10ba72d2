"""k-fold selection's product: the chosen config retrained on the whole train+val pool, then tested.

Under ``train.select_folds=k`` no single trained model is the sweep's answer: each config was k
fold models, each missing a fold. The chosen config is trained once more, on every pool row, for
the step count at which its fold members' pooled val accuracy peaked (its ``best_step``), under the
same learning-rate schedule (``train.max_steps`` long, stopped there); nothing is held out, so
nothing is validated. Its test accuracy is the sweep's headline (``refit_test_acc``).

One process, no Ray: the driver runs it after the sweep (a head-only config trains in seconds).
"""

from __future__ import annotations

import contextlib
import warnings

from uml_ray.data.folds import pool_table
from uml_ray.data.streams import dataset_name
from uml_ray.train.context import LocalContext
from uml_ray.train.loop import Supervised
from uml_ray.train.plan import RunPlan


def refit(plan: RunPlan, steps: int) -> dict:
    """Train ``plan.cfg`` on the target's train+val pool for ``steps`` steps; its test accuracy and CE,
    the steps and the pool's rows."""
    target = plan.dataset.target
    split = LocalContext(plan)
    pool = pool_table(
        split.source(dataset_name(target, "train")).table, split.source(dataset_name(target, "val")).table
    )
    ctx = LocalContext(plan, tables={dataset_name(target, "train"): pool})
    with contextlib.ExitStack() as closing, warnings.catch_warnings():
        # the driver's console: torch's note on read-only (zero-copy Arrow) batches says nothing here
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        regime = Supervised(plan, ctx, closing)
        regime.initialise()
        for step in range(steps):
            regime.step(step)
        return {**regime.evaluate_test(), "steps": steps, "rows": len(pool)}
