"""k-fold selection in a fused trial: the fold streams, the fold members' layout, their validation.

With ``train.select_folds=k`` a fused trial of C configs trains ``k × C`` members: fold-major, member
``f * C + c`` is config ``c`` trained on every fold but ``f`` (``data/folds.py``) and validated on
fold ``f``. Fold ``f``'s members draw their batches from fold ``f``'s own train stream, so a fold
member trains exactly as its config alone on the rows outside fold ``f`` would, and never meets its
held-out rows in a loss. To the loop (``skeleton.run_loop``) a config is one member: its val
accuracy and loss are pooled over the k held-out folds (every pool row once), so its best step,
patience, halving and selection score act on the fold mean, never on a single fold.
"""

from __future__ import annotations

import contextlib
import dataclasses

import torch

from uml_ray.data.folds import FoldBatches, fold_split, pool_table
from uml_ray.data.streams import BatchStream, TableSource, dataset_name
from uml_ray.train.common import member_means, tally_members, worker_seed
from uml_ray.train.loop import to_tensors
from uml_ray.train.plan import RunPlan


def fold_members(positions: list[int], folds: int, configs: int) -> list[int]:
    """The fold members (fold-major) of the configs at ``positions`` among ``configs`` live ones."""
    return [f * configs + p for f in range(folds) for p in positions]


def _pool(plan: RunPlan, ctx):
    target = plan.dataset.target
    tables = []
    for split in ("train", "val"):
        source = ctx.source(dataset_name(target, split))
        if not isinstance(source, TableSource):
            raise RuntimeError(
                f"train.select_folds needs '{target}.{split}' in memory (the driver checks data.cache_max_mb)"
            )
        tables.append(source.table)
    return pool_table(*tables)


def fold_streams(
    plan: RunPlan, ctx, closing: contextlib.ExitStack, batch_size: int
) -> tuple[FoldBatches, list[BatchStream], int]:
    """The fold split of the target's train+val pool: the folds' train streams drawn together, each
    fold's held-out rows as a val stream, and the pool's row count. Every fold draws batches of
    ``min(batch_size, the smallest fold's train rows)``, so the folds' batches stack."""
    cfg, target = plan.cfg, plan.dataset.target
    pool = _pool(plan, ctx)
    splits = fold_split(pool, cfg.train.select_folds, cfg.train.select_seed)
    size = min([batch_size] + [len(train) for train, _ in splits])
    seed = worker_seed(cfg, ctx.rank)

    def stream(table, split: str, f: int, rows_per_batch: int) -> BatchStream:
        spec = dataclasses.replace(
            plan.streams[dataset_name(target, split)], name=f"{target}.{split}.fold{f}", rows=len(table)
        )
        opened = BatchStream(
            TableSource(table), spec, rows_per_batch, seed, ctx.rank, ctx.world_size, cfg.data.shuffle_buffer
        )
        closing.callback(opened.close)
        return opened

    train = FoldBatches([stream(table, "train", f, size) for f, (table, _) in enumerate(splits)])
    val = [stream(table, "val", f, batch_size) for f, (_, table) in enumerate(splits)]
    return train, val, len(pool)


@torch.no_grad()
def evaluate_folds(model, streams: list[BatchStream], ctx, batch_size: int = 1024):
    """Per config (fold-major members, ``len(streams)`` folds): accuracy and mean CE of its fold
    members, each on its own held-out fold, pooled over the folds (every pool row counted once)."""
    model.eval()
    folds = len(streams)
    configs = model.members // folds
    totals = torch.zeros(configs, 3, dtype=torch.float64)
    for f, stream in enumerate(streams):
        for batch in stream.iter_once(batch_size):
            features, labels = to_tensors(batch, ctx.device)
            tally_members(
                totals, model.logits(model.target, features)[f * configs : (f + 1) * configs], labels
            )
    totals = ctx.all_reduce(totals)
    model.train()
    return member_means(totals)


def fold_means(values: list[float], folds: int) -> list[float]:
    """Per config, the mean over its ``folds`` fold members of fold-major per-member ``values``."""
    configs = len(values) // folds
    return [sum(values[f * configs + c] for f in range(folds)) / folds for c in range(configs)]
