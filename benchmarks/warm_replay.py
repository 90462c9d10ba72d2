"""The warm-started searcher's seeding, replayed: another sweep's finished configs seed the study.

It is what ``uml-ray tune --warm-start`` does with a source sweep run with another seed, which the
CLI treats as a transfer (not the same task: ``train.seed`` differs): ``plan_warm_start`` enqueues
the source's top ``DEFAULT_TOP`` finished configs by ``selection_key`` (``uml_ray/driver/
warm_start.py``), ``apply_warm_plan`` puts them in the study, so the new sweep trains them first and
its sampler goes on from there.
"""

from __future__ import annotations

from search_replay import Ledger, final

from uml_ray.driver.warm_start import (
    DEFAULT_TOP,
    WarmRecord,
    apply_warm_plan,
    plan_warm_start,
    space_distributions,
)
from uml_ray.selection import SCORE


def warm_from(source: Ledger, top_k: int = DEFAULT_TOP):
    """A function seeding an Optuna study (``warm(study, space)``) from the configs the ``source``
    sweep finished (pruned ones are not finished runs: the CLI does not read them)."""
    records = []
    for row in source.completed:
        metrics = final(row)
        records.append(WarmRecord(row["params"], metrics[SCORE], "source sweep", metrics))

    def warm(study, space) -> None:
        plan = plan_warm_start(records, space, same_task=False, top_k=top_k)
        apply_warm_plan(study, plan, space_distributions(space))

    return warm
