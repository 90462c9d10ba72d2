"""The supervised UML regime: its model, one step (draw → forward/backward/step) and its evaluation.

``train_supervised`` runs it through the one loop (``uml_ray.train.skeleton.run_loop``: restore,
validate, keep the best, report, test), unchanged in a single-process Tune trial, in every
worker of a Ray Train TorchTrainer, or with no Ray at all: everything about where it runs
reaches it through a ``LoopContext`` (``uml_ray.train.context``).

Both supervised regimes run here. Head-only: the target's inputs are frozen-encoder features.
Fine-tuning (the target modality is ``kind: image``): the same model with a vision backbone
(``model.backbone``) under the target's projection, fed augmented images by the Ray Data image
pipeline; parameter groups give the backbone ``lr * train.backbone_lr_scale``. Either way a step
may accumulate ``train.grad_accum`` micro-batches, and on CUDA it runs under bf16 autocast
(``train.precision``), with channels-last images.
"""

from __future__ import annotations

import contextlib
import functools

import numpy as np
import torch
import torch.nn.functional as F

from uml_ray.data.image_pipeline import transform_from_data_config
from uml_ray.data.streams import BatchStream
from uml_ray.models.backbone import Backbone, build_backbone, param_groups
from uml_ray.models.supervised import SharedHeadUML, uml_loss
from uml_ray.train.common import OneModelRegime, Tally, build_optimizer, setup_worker
from uml_ray.train.plan import RunPlan
from uml_ray.train.skeleton import run_loop


def to_tensors(batch, device, channels_last: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """A batch (numpy features or images, labels) as tensors on ``device``; images channels-last
    when asked."""
    features, labels = batch
    features = torch.from_numpy(np.ascontiguousarray(features)).to(device)
    if channels_last and features.ndim == 4:
        features = features.contiguous(memory_format=torch.channels_last)
    return features, torch.from_numpy(labels).to(device)


def autocast(device: torch.device, precision: str):
    """bf16 autocast on CUDA when ``train.precision`` is bf16; CPU always computes in fp32."""
    if device.type == "cuda" and precision == "bf16":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def build_image_backbone(plan: RunPlan) -> Backbone | None:
    """The fine-tuning regime's backbone (target of kind image), its first ``model.freeze_blocks`` groups
    frozen; None when the target's rows are features. Call after seeding: random-init backbones
    must start the same on every worker."""
    if plan.dataset.manifest.modalities[plan.dataset.target].kind != "image":
        return None
    backbone = build_backbone(plan.cfg.model.backbone)
    backbone.freeze(plan.cfg.model.freeze_blocks)
    return backbone


@torch.no_grad()
def evaluate(
    model: SharedHeadUML, stream: BatchStream, ctx, batch_size: int = 1024, precision: str = "fp32"
) -> dict[str, float]:
    """Accuracy and mean CE of the target modality over every row of a split, summed over workers."""
    model.eval()
    totals = torch.zeros(3, dtype=torch.float64)
    channels_last = model.backbone is not None and ctx.device.type == "cuda"
    for batch in stream.iter_once(batch_size):
        features, labels = to_tensors(batch, ctx.device, channels_last)
        with autocast(ctx.device, precision):
            logits = model.logits(model.target, features).float()
        totals += torch.tensor(
            [
                float((logits.argmax(1) == labels).sum()),
                float(F.cross_entropy(logits, labels, reduction="sum")),
                len(labels),
            ],
            dtype=torch.float64,
        )
    totals = ctx.all_reduce(totals)
    model.train()
    correct, loss, count = totals.tolist()
    return {"acc": correct / max(count, 1), "loss": loss / max(count, 1), "rows": count}


def build_head(cfg, dims: dict[str, int], target: str, num_classes: int, backbone=None) -> SharedHeadUML:
    """The supervised model of ``cfg`` over modalities of ``dims`` (call after seeding)."""
    return SharedHeadUML(
        dims,
        target,
        num_classes,
        cfg.model.shared_dim,
        cfg.model.project_auxiliary,
        cfg.model.logit_scale,
        cfg.model.project_target,
        backbone,
    )


def aux_class_means(
    stream: BatchStream, projection, num_classes: int, ctx
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-class sums and counts of an auxiliary modality's projected features, summed over workers
    (``model.head_init=text``)."""
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


def init_head_from_text(model: SharedHeadUML, sums: torch.Tensor, counts: torch.Tensor) -> None:
    """Head rows from the class means ``aux_class_means`` summed (a class without rows keeps its own)."""
    present = counts > 0
    labels = torch.arange(len(counts))[present]
    model.init_head_from_class_means((sums[present] / counts[present, None]).float(), labels)


def probe_head(
    model: SharedHeadUML, streams: dict[str, BatchStream], alpha: dict, cfg, ctx, channels_last: bool
) -> None:
    """Linear probing before fine-tuning (LP-FT): the projections and the shared head are trained for
    ``train.probe_steps`` steps on the frozen backbone's features with the run's UML loss and
    batches, so fine-tuning starts from a fitted head instead of a random one that would send
    large gradients into the pretrained backbone.

    The backbone runs as fine-tuning will run it (train mode: BatchNorm on batch statistics), so
    the head fits the features it will then see; its parameters get no gradients and its buffers
    (running statistics) are put back afterwards, so the probe leaves the backbone exactly as
    built. Gradients are averaged over workers, so every worker's head stays identical."""
    backbone = model.backbone
    head = [p for name, p in model.named_parameters() if not name.startswith("backbone.") and p.requires_grad]
    trainable = [p for p in backbone.parameters() if p.requires_grad]
    buffers = {name: buffer.clone() for name, buffer in backbone.named_buffers()}
    for parameter in trainable:
        parameter.requires_grad_(False)
    optimizer = torch.optim.AdamW(head, lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)
    for _ in range(cfg.train.probe_steps):
        features, labels = {}, {}
        for name, batches in streams.items():
            features[name], labels[name] = to_tensors(batches.next(), ctx.device, channels_last)
        with autocast(ctx.device, cfg.train.precision):
            loss, _ = uml_loss(model(features), labels, model.target, alpha)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if ctx.world_size > 1:  # one all-reduce of every head gradient
            grads = [p.grad for p in head if p.grad is not None]
            flat = (
                ctx.all_reduce(torch.cat([g.reshape(-1) for g in grads])).to(grads[0].device) / ctx.world_size
            )
            for grad, part in zip(grads, flat.split([g.numel() for g in grads])):
                grad.copy_(part.view_as(grad))
        optimizer.step()
    for parameter in trainable:
        parameter.requires_grad_(True)
    with torch.no_grad():
        for name, buffer in backbone.named_buffers():
            buffer.copy_(buffers[name])


class Supervised(OneModelRegime):
    """The supervised regime on one worker: the model (with a backbone when fine-tuning), its
    optimizer and streams; a step accumulates ``train.grad_accum`` micro-batches."""

    def __init__(self, plan: RunPlan, ctx, closing: contextlib.ExitStack):
        cfg = plan.cfg
        self.cfg, self.ctx, self.configs = cfg, ctx, [cfg]
        self.target, self.classes = plan.dataset.target, plan.dataset.classes
        torch.manual_seed(cfg.train.seed)  # same init on every worker
        backbone = build_image_backbone(plan)
        transform = (
            None
            if backbone is None
            else transform_from_data_config(
                backbone.data_config,
                cfg.model.image_size,
                cfg.data.augment_min_scale,
                cfg.data.augment_flip,
                cfg.train.seed,
            )
        )
        self.alpha, self.streams, stream = setup_worker(plan, ctx, closing, transform)
        self.active = [m for m in self.streams if m != self.target]
        self.val_stream = stream(self.target, "val", cfg.train.batch_size)
        self.test_stream = stream(self.target, "test", cfg.train.batch_size)

        dims = {m: plan.dataset.dims[m] for m in [self.target] + self.active}
        if backbone is not None:
            dims[self.target] = backbone.num_features
        self.model = build_head(cfg, dims, self.target, len(self.classes), backbone)
        self.channels_last = backbone is not None and ctx.device.type == "cuda"
        self.model.to(ctx.device)
        if self.channels_last:
            self.model.to(memory_format=torch.channels_last)
        # images are large: evaluate them in train-sized batches, features in big ones
        self.eval_batch = cfg.train.batch_size if backbone is not None else 1024
        self.optimizer, self.scheduler = build_optimizer(
            param_groups(self.model, cfg.train.lr, cfg.train.weight_decay, cfg.train.backbone_lr_scale), cfg
        )
        self.model.train()
        self.tally = Tally()

    @functools.cached_property
    def trained(self):
        """The model as stepped (DDP across workers). Wrapped at the first step, after the head's
        initialisation or restore: DDP copies rank 0's weights to every worker when it wraps."""
        return self.ctx.wrap(self.model)

    def initialise(self) -> None:
        """The head's start (``model.head_init``): class means of the first active auxiliary's
        projections, or a linear probe (LP-FT); a resumed run restores its head instead."""
        if self.cfg.model.head_init == "text" and self.active:
            first = self.active[0]
            means = aux_class_means(
                self.streams[first], self.model.projections[first], len(self.classes), self.ctx
            )
            init_head_from_text(self.model, *means)
        if self.cfg.model.head_init == "probe":
            probe_head(self.model, self.streams, self.alpha, self.cfg, self.ctx, self.channels_last)

    def step(self, step: int) -> None:
        """One optimizer step over ``train.grad_accum`` micro-batches of every train stream."""
        micro_batches, ctx = self.cfg.train.grad_accum, self.ctx
        self.optimizer.zero_grad(set_to_none=True)
        step_loss, step_parts = 0.0, {}
        for micro in range(micro_batches):
            features, labels = {}, {}
            for name, batches in self.streams.items():
                features[name], labels[name] = to_tensors(batches.next(), ctx.device, self.channels_last)
            # DDP all-reduces gradients once per optimizer step: at the last micro-batch
            last_micro = micro == micro_batches - 1
            with (
                self.trained.no_sync()
                if not last_micro and hasattr(self.trained, "no_sync")
                else contextlib.nullcontext()
            ):
                with autocast(ctx.device, self.cfg.train.precision):
                    loss, parts = uml_loss(self.trained(features), labels, self.target, self.alpha)
                (loss / micro_batches if micro_batches > 1 else loss).backward()
            step_loss += float(loss.detach()) / micro_batches
            for name, value in parts.items():
                step_parts[name] = step_parts.get(name, 0.0) + value / micro_batches
        self.update(self.cfg.train.grad_clip)
        self.tally.add(step_loss, step_parts)

    def validate(self) -> tuple[list[float], list[float]]:
        """Target accuracy and CE on val."""
        val = evaluate(self.model, self.val_stream, self.ctx, self.eval_batch, self.cfg.train.precision)
        return [val["acc"]], [val["loss"]]

    def train_metrics(self, step: int) -> list[dict]:
        """Target epoch, lr and the train-loss means since the last validation."""
        metrics = {
            "epoch": self.streams[self.target].epoch,
            "lr": self.scheduler.get_last_lr()[0],
            **self.tally.means(),
        }
        self.tally = Tally()
        return [metrics]

    def evaluate_test(self) -> dict[str, float]:
        """Target accuracy and CE on test."""
        test = evaluate(self.model, self.test_stream, self.ctx, self.eval_batch, self.cfg.train.precision)
        return {"test_acc": test["acc"], "test_loss": test["loss"]}


def train_supervised(plan: RunPlan, ctx) -> dict:
    """Train supervised UML for ``train.max_steps`` steps; returns the final metrics."""
    return run_loop(plan, ctx, functools.partial(Supervised, plan, ctx))
