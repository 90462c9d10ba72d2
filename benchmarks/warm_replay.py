"""The warm-started searcher's seeding, replayed: another sweep's finished configs seed the study.

It mirrors ``uml-ray tune --warm-start`` for a source sweep run with another seed, which the CLI
treats as a transfer (not the same task: ``train.seed`` differs): the source's top ``TOP_K``
finished configs by ``selection_key`` are enqueued, so the new sweep trains them first, and its
sampler goes on from there. Written with plain Optuna ``enqueue_trial`` because the CLI's warm-start
module (``uml_ray/driver/warm_start.py``, branch ``warmstart``) was not on this branch yet.
"""

from __future__ import annotations

from search_replay import Ledger, Table, final

from uml_ray.selection import SCORE, selection_key

# configs a transfer source puts first (the CLI's --warm-start-top default: half a fused trial)
TOP_K = 8


def warm_from(source: Ledger, table: Table, top_k: int = TOP_K):
    """A function seeding an Optuna study (``warm(study, space)``) with the top ``top_k`` configs the
    ``source`` sweep finished (pruned ones are not finished runs: the CLI does not read them)."""
    ranked = sorted(source.completed, key=lambda row: selection_key(final(row), SCORE), reverse=True)
    seen, top = set(), []
    for row in ranked:
        key = repr(sorted(row["params"].items()))
        if key not in seen:
            seen.add(key)
            top.append(row["params"])
        if len(top) == top_k:
            break

    def warm(study, space) -> None:
        keys = set(space.keys())
        for params in top:
            study.enqueue_trial({k: v for k, v in params.items() if k in keys})

    return warm
