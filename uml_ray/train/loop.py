"""The supervised UML training loop: restore → loop (draw → forward/backward/step) → validate → report.

It runs unchanged in a single-process Tune trial, in every worker of a Ray Train TorchTrainer,
or with no Ray at all: everything about where it runs reaches it through a ``LoopContext``
(``uml_ray.train.context``); what it shares with the sequence loop lives in ``uml_ray.train.common``.
"""

from __future__ import annotations

import copy

import numpy as np
import torch
import torch.nn.functional as F

from uml_ray.data.streams import BatchStream
from uml_ray.models.supervised import SharedHeadUML, uml_loss
from uml_ray.train.common import (Tally, build_optimizer, new_progress, record_validation, report_validation, restore,
                                  setup_worker, swapped_weights, validation_metrics)
from uml_ray.train.plan import RunPlan


def to_tensors(batch, device) -> tuple[torch.Tensor, torch.Tensor]:
    """A vector batch (numpy features, labels) as tensors on ``device``."""
    features, labels = batch
    return torch.from_numpy(np.ascontiguousarray(features)).to(device), torch.from_numpy(labels).to(device)


@torch.no_grad()
def evaluate(model: SharedHeadUML, stream: BatchStream, ctx, batch_size: int = 1024) -> dict[str, float]:
    """Accuracy and mean CE of the target modality over every row of a split, summed over workers."""
    model.eval()
    totals = torch.zeros(3, dtype=torch.float64)
    for batch in stream.iter_once(batch_size):
        features, labels = to_tensors(batch, ctx.device)
        logits = model.logits(model.target, features)
        totals += torch.tensor(
            [float((logits.argmax(1) == labels).sum()), float(F.cross_entropy(logits, labels, reduction="sum")), len(labels)],
            dtype=torch.float64,
        )
    totals = ctx.all_reduce(totals)
    model.train()
    correct, loss, count = totals.tolist()
    return {"acc": correct / max(count, 1), "loss": loss / max(count, 1), "rows": count}


def _aux_class_means(stream: BatchStream, projection, num_classes: int, ctx) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-class feature sums and counts of an auxiliary modality, summed over workers."""
    sums, counts = None, torch.zeros(num_classes, dtype=torch.float64)
    with torch.no_grad():
        for batch in stream.iter_once(4096):
            features, labels = to_tensors(batch, ctx.device)
            shared = projection(features).double()
            if sums is None:
                sums = torch.zeros(num_classes, shared.shape[1], dtype=torch.float64)
            sums.index_add_(0, labels, shared)
            counts += torch.bincount(labels, minlength=num_classes).double()
    return ctx.all_reduce(sums), ctx.all_reduce(counts)


def train_supervised(plan: RunPlan, ctx) -> dict:
    """Train supervised UML for ``train.max_steps`` steps; returns the final metrics."""
    cfg = plan.cfg
    alpha, train_streams, stream = setup_worker(plan, ctx)
    target, classes = plan.dataset.target, plan.dataset.classes
    active = [m for m in train_streams if m != target]
    val_stream = stream(target, "val", cfg.train.batch_size)
    test_stream = stream(target, "test", cfg.train.batch_size)

    torch.manual_seed(cfg.train.seed)  # same init on every worker
    dims = {m: plan.dataset.dims[m] for m in [target] + active}
    model = SharedHeadUML(dims, target, len(classes), cfg.model.shared_dim, cfg.model.project_auxiliary,
                          cfg.model.logit_scale, cfg.model.project_target)
    model.to(ctx.device)
    if cfg.model.head_init == "text" and active:
        sums, counts = _aux_class_means(train_streams[active[0]], model.projections[active[0]], len(classes), ctx)
        present = counts > 0
        labels = torch.arange(len(classes))[present]
        model.init_head_from_class_means((sums[present] / counts[present, None]).float(), labels)

    optimizer, scheduler = build_optimizer(model.parameters(), cfg)
    progress, best_weights = new_progress(), copy.deepcopy(model.state_dict())
    state = ctx.restore()
    if state is not None:
        progress, best_weights = restore(state, model, optimizer, scheduler, train_streams)

    trained = ctx.wrap(model)
    model.train()
    tally = Tally()
    metrics: dict = {}
    while progress["step"] < cfg.train.max_steps:
        features, labels = {}, {}
        for name, batches in train_streams.items():
            features[name], labels[name] = to_tensors(batches.next(), ctx.device)
        loss, parts = uml_loss(trained(features), labels, target, alpha)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.train.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.train.grad_clip)
        optimizer.step()
        scheduler.step()
        progress["step"] += 1
        tally.add(float(loss.detach()), parts)

        last = progress["step"] == cfg.train.max_steps
        if progress["step"] % cfg.train.val_every and not last:
            continue
        val = evaluate(model, val_stream, ctx)
        best_weights, stop = record_validation(progress, val["acc"], val["loss"], model, best_weights, cfg.train.patience)
        metrics = validation_metrics(progress, scheduler.get_last_lr()[0], val["acc"], val["loss"], tally,
                                     epoch=train_streams[target].epoch)
        tally = Tally()
        if stop or last:
            # the score is the best-val point, not the last step (a reference defect)
            with swapped_weights(model, best_weights):
                test = evaluate(model, test_stream, ctx)
            metrics.update(test_acc=test["acc"], test_loss=test["loss"], stopped_early=int(stop), completed=1)
        report_validation(ctx, plan, metrics, stop or last, model, optimizer, scheduler, train_streams, progress, best_weights)
        if stop:
            break
    return metrics
