"""The self-supervised UML regime (docs/method.md §2): its model, one step and its probe evaluation.

``train_sequence`` runs it through the same loop as the supervised regime
(``uml_ray.train.skeleton.run_loop``), with the same schedule, checkpoint contents, best-val
bookkeeping and metric names. What differs is the step — masked next-step MSE per modality
through one shared causal transformer, with the step_k warm start — and validation, which is a
logistic-regression probe on mean-pooled target embeddings rather than a classifier head.

step_k counts epochs of the target's train stream from the step number: steps
``0 .. step_k * steps_per_epoch - 1`` train the auxiliary modalities only, and no target batch is
drawn during them, so joint training starts at the target stream's first epoch.
"""

from __future__ import annotations

import contextlib
import functools

import numpy as np
import torch

from uml_ray.data.collate import sequence_batch_to_tensors
from uml_ray.data.streams import BatchStream
from uml_ray.models.sequence import SequenceObjective, SharedSequenceModel, target_active
from uml_ray.train.common import OneModelRegime, Tally, build_optimizer, setup_worker
from uml_ray.train.plan import RunPlan
from uml_ray.train.probe import fit_probe, probe_accuracy, probe_log_loss
from uml_ray.train.skeleton import run_loop

SPLITS = ("train", "val", "test")


@torch.no_grad()
def pool_split(
    model: SharedSequenceModel, modality: str, stream: BatchStream, device, batch_size: int = 256
) -> tuple[np.ndarray, np.ndarray]:
    """Mask-aware mean-pooled embeddings and labels of every row of this worker's share of a split
    (eval mode)."""
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
    """Probe val accuracy, val log-loss and test accuracy of the target's pooled embeddings, on
    every worker.

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


class Sequence(OneModelRegime):
    """The sequence regime on one worker: the shared causal transformer, its optimizer and streams."""

    def __init__(self, plan: RunPlan, ctx, closing: contextlib.ExitStack):
        cfg = plan.cfg
        self.cfg, self.ctx, self.configs = cfg, ctx, [cfg]
        self.alpha, self.streams, stream = setup_worker(plan, ctx, closing)
        self.target = target = plan.dataset.target
        active = [m for m in self.streams if m != target]
        self.probe_streams = {
            "train": self.streams[target],
            "val": stream(target, "val", cfg.train.batch_size),
            "test": stream(target, "test", cfg.train.batch_size),
        }
        # every worker must switch the target on at the same step (DDP), so the epoch length is
        # the shortest share's
        self.steps_per_epoch = min(ctx.all_gather(self.streams[target].batches_per_epoch()))

        torch.manual_seed(cfg.train.seed)  # same init on every worker
        dims = {m: plan.dataset.dims[m] for m in [target] + active}
        self.model = SharedSequenceModel(
            dims,
            cfg.model.zdim,
            cfg.model.layers,
            cfg.model.heads,
            cfg.model.dropout,
            cfg.model.pos_emb,
            cfg.model.max_len,
        )
        self.model.to(ctx.device)
        self.optimizer, self.scheduler = build_optimizer(self.model.parameters(), cfg)
        self.model.train()
        self.tally, self.target_steps = Tally(), 0

    @functools.cached_property
    def trained(self):
        """The objective as stepped (DDP across workers), wrapped at the first step, after a restore
        (DDP copies rank 0's weights when it wraps). During the warm-up the target's projections
        get no gradient, which DDP must be told."""
        objective = SequenceObjective(self.model, self.target, self.alpha)
        return self.ctx.wrap(objective, find_unused_parameters=self.cfg.train.step_k > 0)

    def step(self, step: int) -> None:
        """One optimizer step; the target joins once its warm-up (step_k epochs) is over."""
        target_on = target_active(step // self.steps_per_epoch, self.cfg.train.step_k)
        batches = {}
        for name, batches_of in self.streams.items():
            # warm-up: the target's batches are not drawn, so its first epoch starts at joint training
            if name == self.target and not target_on:
                continue
            x, mask, _ = sequence_batch_to_tensors(batches_of.next(), self.ctx.device)
            batches[name] = (x, mask)
        loss, parts = self.trained(batches, target_on)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.update(self.cfg.train.grad_clip)
        # a modality's mean runs over the steps that trained it (the target's warm-up steps do not)
        self.tally.add(float(loss.detach()), parts)
        self.target_steps += int(target_on)

    def probe(self) -> dict[str, float]:
        """The probe's val accuracy, val log-loss and test accuracy at the current weights."""
        return evaluate_probe_on_splits(
            self.model, self.target, self.probe_streams, self.ctx, self.cfg.train.probe_c
        )

    def validate(self) -> tuple[list[float], list[float]]:
        """The probe's val accuracy and log-loss."""
        val = self.probe()
        return [val["val_acc"]], [val["val_loss"]]

    def train_metrics(self, step: int) -> list[dict]:
        """Target epoch, the share of steps that trained the target, lr and train-loss means."""
        metrics = {
            "epoch": (step - 1) // self.steps_per_epoch,
            "target_on": self.target_steps / self.tally.steps,
            "lr": self.scheduler.get_last_lr()[0],
            **self.tally.means(),
        }
        self.tally, self.target_steps = Tally(), 0
        return [metrics]

    def evaluate_test(self) -> dict[str, float]:
        """The probe's test accuracy."""
        return {"test_acc": self.probe()["test_acc"]}


def train_sequence(plan: RunPlan, ctx) -> dict:
    """Train self-supervised UML for ``train.max_steps`` steps; returns the final metrics.

    The loss is ``L_x + sum_m alpha_m L_m`` (next-step masked MSE); validation fits a
    logistic-regression probe (C = ``train.probe_c``) on the target's train split and scores val;
    test accuracy is reported at the best-val point. The driver has refused step_k > 0 with every
    alpha 0 (``config.check_modalities``) before any trial started.
    """
    return run_loop(plan, ctx, functools.partial(Sequence, plan, ctx))
