"""The self-supervised UML training loop (docs/method.md §2): restore → loop (draw → forward/backward/step) → validate → report.

The sequence regime's twin of ``uml_ray.train.loop.train_supervised``: the same LoopContext
and, from ``uml_ray.train.common``, the same schedule, checkpoint contents, best-val bookkeeping
and metric names. What differs is the step — masked next-step MSE per modality
through one shared causal transformer, with the step_k warm start — and validation, which is a
logistic-regression probe on mean-pooled target embeddings rather than a classifier head.

step_k counts epochs of the target's train stream from the step number: steps
``0 .. step_k * steps_per_epoch - 1`` train the auxiliary modalities only, and no target batch is
drawn during them, so joint training starts at the target stream's first epoch.
"""

from __future__ import annotations

import copy

import numpy as np
import torch

from uml_ray.data.collate import sequence_batch_to_tensors
from uml_ray.data.streams import BatchStream
from uml_ray.models.sequence import SequenceObjective, SharedSequenceModel, target_active
from uml_ray.train.common import (
    Tally,
    build_optimizer,
    new_progress,
    record_validation,
    report_validation,
    restore,
    setup_worker,
    swapped_weights,
    validation_metrics,
)
from uml_ray.train.plan import RunPlan
from uml_ray.train.probe import fit_probe, probe_accuracy, probe_log_loss

SPLITS = ("train", "val", "test")


@torch.no_grad()
def pool_split(
    model: SharedSequenceModel, modality: str, stream: BatchStream, device, batch_size: int = 256
) -> tuple[np.ndarray, np.ndarray]:
    """Mask-aware mean-pooled embeddings and labels of every row of this worker's share of a split (eval mode)."""
    was_training = model.training
    model.eval()
    features, labels = [], []
    for batch in stream.iter_once(batch_size):
        x, mask, batch_labels = sequence_batch_to_tensors(batch, device)
        features.append(model.pool(modality, x, mask).double().cpu().numpy())
        labels.append(batch_labels.cpu().numpy())
    model.train(was_training)
    return np.concatenate(features), np.concatenate(labels)


def evaluate_probe_on_splits(
    model: SharedSequenceModel, modality: str, streams: dict[str, BatchStream], ctx, probe_c: float
) -> dict[str, float]:
    """Probe val accuracy, val log-loss and test accuracy of the target's pooled embeddings, on every worker.

    Every worker pools its share; rank 0 gathers all shares, fits the probe on train and scores
    val and test; the numbers reach every worker through a sum in which only rank 0 is non-zero.
    """
    pooled = {split: pool_split(model, modality, streams[split], ctx.device) for split in SPLITS}
    shares = ctx.all_gather(pooled)
    scores = torch.zeros(3, dtype=torch.float64)
    if ctx.rank == 0:
        merged = {
            split: (
                np.concatenate([s[split][0] for s in shares]),
                np.concatenate([s[split][1] for s in shares]),
            )
            for split in SPLITS
        }
        probe = fit_probe(*merged["train"], C=probe_c)
        scores = torch.tensor(
            [
                probe_accuracy(probe, *merged["val"]),
                probe_log_loss(probe, *merged["val"]),
                probe_accuracy(probe, *merged["test"]),
            ],
            dtype=torch.float64,
        )
    val_acc, val_loss, test_acc = ctx.all_reduce(scores).tolist()
    return {"val_acc": val_acc, "val_loss": val_loss, "test_acc": test_acc}


def train_sequence(plan: RunPlan, ctx) -> dict:
    """Train self-supervised UML for ``train.max_steps`` steps; returns the final metrics.

    The loss is ``L_x + sum_m alpha_m L_m`` (next-step masked MSE); validation fits a
    logistic-regression probe (C = ``train.probe_c``) on the target's train split and scores val;
    test accuracy is reported at the best-val point. The driver has refused step_k > 0 with every
    alpha 0 (``config.check_modalities``) before any trial started.
    """
    cfg = plan.cfg
    alpha, train_streams, stream = setup_worker(plan, ctx)
    target = plan.dataset.target
    active = [m for m in train_streams if m != target]
    step_k = cfg.train.step_k
    probe_streams = {
        "train": train_streams[target],
        "val": stream(target, "val", cfg.train.batch_size),
        "test": stream(target, "test", cfg.train.batch_size),
    }
    # every worker must switch the target on at the same step (DDP), so the epoch length is the
    # shortest share's
    steps_per_epoch = min(ctx.all_gather(train_streams[target].batches_per_epoch()))

    torch.manual_seed(cfg.train.seed)  # same init on every worker
    dims = {m: plan.dataset.dims[m] for m in [target] + active}
    model = SharedSequenceModel(
        dims,
        cfg.model.zdim,
        cfg.model.layers,
        cfg.model.heads,
        cfg.model.dropout,
        cfg.model.pos_emb,
        cfg.model.max_len,
    )
    model.to(ctx.device)
    optimizer, scheduler = build_optimizer(model.parameters(), cfg)
    progress, best_weights = new_progress(), copy.deepcopy(model.state_dict())
    state = ctx.restore()
    if state is not None:
        progress, best_weights = restore(state, model, optimizer, scheduler, train_streams)

    # during the warm-up the target's projections get no gradient, which DDP must be told
    trained = ctx.wrap(SequenceObjective(model, target, alpha), find_unused_parameters=step_k > 0)
    model.train()
    tally, target_steps = Tally(), 0
    metrics: dict = {}
    while progress["step"] < cfg.train.max_steps:
        target_on = target_active(progress["step"] // steps_per_epoch, step_k)
        batches = {}
        for name, batches_of in train_streams.items():
            if name == target and not target_on:
                continue  # warm-up: the target's batches are not drawn, so its first epoch starts at joint training
            x, mask, _ = sequence_batch_to_tensors(batches_of.next(), ctx.device)
            batches[name] = (x, mask)
        loss, parts = trained(batches, target_on)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.train.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.train.grad_clip)
        optimizer.step()
        scheduler.step()
        progress["step"] += 1
        # a modality's mean runs over the steps that trained it (the target's warm-up steps do not)
        tally.add(float(loss.detach()), parts)
        target_steps += int(target_on)

        step = progress["step"]
        last = step == cfg.train.max_steps
        if step % cfg.train.val_every and not last:
            continue
        val = evaluate_probe_on_splits(model, target, probe_streams, ctx, cfg.train.probe_c)
        best_weights, stop = record_validation(
            progress, val["val_acc"], val["val_loss"], model, best_weights, cfg.train.patience
        )
        metrics = validation_metrics(
            progress,
            scheduler.get_last_lr()[0],
            val["val_acc"],
            val["val_loss"],
            tally,
            epoch=(step - 1) // steps_per_epoch,
            target_on=target_steps / tally.steps,
        )
        tally, target_steps = Tally(), 0
        if stop or last:
            # the score is the best-val point, not the last step (a reference defect)
            with swapped_weights(model, best_weights):
                test = evaluate_probe_on_splits(model, target, probe_streams, ctx, cfg.train.probe_c)
            metrics.update(test_acc=test["test_acc"], stopped_early=int(stop), completed=1)
        report_validation(
            ctx,
            plan,
            metrics,
            stop or last,
            model,
            optimizer,
            scheduler,
            train_streams,
            progress,
            best_weights,
        )
        if stop:
            break
    return metrics
