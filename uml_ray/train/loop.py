"""The supervised UML training loop: restore → loop (draw → forward/backward/step) → validate → report.

It runs unchanged in a single-process Tune trial, in every worker of a Ray Train TorchTrainer,
or with no Ray at all: everything about where it runs reaches it through a ``LoopContext``
(``uml_ray.train.context``); what it shares with the sequence loop lives in ``uml_ray.train.common``.

Both supervised regimes run here. Head-only: the target's inputs are frozen-encoder features.
Fine-tuning (the target modality is ``kind: image``): the same model with a vision backbone
(``model.backbone``) under the target's projection, fed augmented images by the Ray Data image
pipeline; parameter groups give the backbone ``lr * train.backbone_lr_scale``. Either way a step
may accumulate ``train.grad_accum`` micro-batches, and on CUDA it runs under bf16 autocast
(``train.precision``), with channels-last images.
"""

from __future__ import annotations

import contextlib
import copy

import numpy as np
import torch
import torch.nn.functional as F

from uml_ray.data.image_pipeline import transform_from_data_config
from uml_ray.data.streams import BatchStream
from uml_ray.models.backbone import Backbone, build_backbone, param_groups
from uml_ray.models.supervised import SharedHeadUML, uml_loss
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


def to_tensors(batch, device, channels_last: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """A batch (numpy features or images, labels) as tensors on ``device``; images channels-last when asked."""
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


def _aux_class_means(
    stream: BatchStream, projection, num_classes: int, ctx
) -> tuple[torch.Tensor, torch.Tensor]:
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


def train_supervised(plan: RunPlan, ctx) -> dict:
    """Train supervised UML for ``train.max_steps`` steps; returns the final metrics."""
    cfg = plan.cfg
    target, classes = plan.dataset.target, plan.dataset.classes
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
    alpha, train_streams, stream = setup_worker(plan, ctx, transform)
    active = [m for m in train_streams if m != target]
    val_stream = stream(target, "val", cfg.train.batch_size)
    test_stream = stream(target, "test", cfg.train.batch_size)

    dims = {m: plan.dataset.dims[m] for m in [target] + active}
    if backbone is not None:
        dims[target] = backbone.num_features
    model = SharedHeadUML(
        dims,
        target,
        len(classes),
        cfg.model.shared_dim,
        cfg.model.project_auxiliary,
        cfg.model.logit_scale,
        cfg.model.project_target,
        backbone,
    )
    channels_last = backbone is not None and ctx.device.type == "cuda"
    model.to(ctx.device)
    if channels_last:
        model.to(memory_format=torch.channels_last)
    # images are large: evaluate them in train-sized batches, features in big ones
    eval_batch = cfg.train.batch_size if backbone is not None else 1024
    state = ctx.restore()  # a resumed run has its head already: no initialisation to redo
    if state is None and cfg.model.head_init == "text" and active:
        sums, counts = _aux_class_means(
            train_streams[active[0]], model.projections[active[0]], len(classes), ctx
        )
        present = counts > 0
        labels = torch.arange(len(classes))[present]
        model.init_head_from_class_means((sums[present] / counts[present, None]).float(), labels)
    if state is None and cfg.model.head_init == "probe":
        probe_head(model, train_streams, alpha, cfg, ctx, channels_last)

    optimizer, scheduler = build_optimizer(
        param_groups(model, cfg.train.lr, cfg.train.weight_decay, cfg.train.backbone_lr_scale), cfg
    )
    progress, best_weights = new_progress(), copy.deepcopy(model.state_dict())
    if state is not None:
        progress, best_weights = restore(state, model, optimizer, scheduler, train_streams)

    trained = ctx.wrap(model)
    model.train()
    tally = Tally()
    metrics: dict = {}
    micro_batches = cfg.train.grad_accum
    while progress["step"] < cfg.train.max_steps:
        optimizer.zero_grad(set_to_none=True)
        step_loss, step_parts = 0.0, {}
        for micro in range(micro_batches):
            features, labels = {}, {}
            for name, batches in train_streams.items():
                features[name], labels[name] = to_tensors(batches.next(), ctx.device, channels_last)
            # DDP all-reduces gradients once per optimizer step: at the last micro-batch
            last_micro = micro == micro_batches - 1
            with (
                trained.no_sync()
                if not last_micro and hasattr(trained, "no_sync")
                else contextlib.nullcontext()
            ):
                with autocast(ctx.device, cfg.train.precision):
                    loss, parts = uml_loss(trained(features), labels, target, alpha)
                (loss / micro_batches if micro_batches > 1 else loss).backward()
            step_loss += float(loss.detach()) / micro_batches
            for name, value in parts.items():
                step_parts[name] = step_parts.get(name, 0.0) + value / micro_batches
        if cfg.train.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.train.grad_clip)
        optimizer.step()
        scheduler.step()
        progress["step"] += 1
        tally.add(step_loss, step_parts)

        last = progress["step"] == cfg.train.max_steps
        if progress["step"] % cfg.train.val_every and not last:
            continue
        val = evaluate(model, val_stream, ctx, eval_batch, cfg.train.precision)
        best_weights, stop = record_validation(
            progress, val["acc"], val["loss"], model, best_weights, cfg.train.patience
        )
        metrics = validation_metrics(
            progress,
            scheduler.get_last_lr()[0],
            val["acc"],
            val["loss"],
            tally,
            epoch=train_streams[target].epoch,
        )
        tally = Tally()
        if stop or last:
            # the score is the best-val point, not the last step (a reference defect)
            with swapped_weights(model, best_weights):
                test = evaluate(model, test_stream, ctx, eval_batch, cfg.train.precision)
            metrics.update(test_acc=test["acc"], test_loss=test["loss"], stopped_early=int(stop), completed=1)
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
    for batches in [*train_streams.values(), val_stream, test_stream]:
        batches.close()
    return metrics
