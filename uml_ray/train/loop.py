"""The supervised UML training loop: restore → loop (draw → forward/backward/step) → validate → report.

It runs unchanged in a single-process Tune trial or in every worker of a Ray Train TorchTrainer:
everything Ray-specific reaches it through a ``LoopContext`` (see ``uml_ray.train.runner``):

- ``rank``, ``world_size``, ``device``;
- ``iterator(name)`` → the Ray Data iterator of a dataset (``modality.split``);
- ``restore()`` → the latest checkpoint's state dict, or None;
- ``wrap(model, find_unused_parameters=False)`` → the model as trained (DDP across workers);
- ``all_reduce(tensor)`` → the sum over workers; ``all_gather(value)`` → every worker's value;
- ``report(metrics, state, best)`` → metrics to the search/tracking, plus a checkpoint.
"""

from __future__ import annotations

import contextlib
import copy
import math
import random

import numpy as np
import torch
import torch.nn.functional as F

from uml_ray.config import Config, config_from_dict
from uml_ray.data.streams import BatchStream, StreamSpec, dataset_name
from uml_ray.models.supervised import SharedHeadUML, uml_loss


def warmup_cosine(warmup_steps: int, max_steps: int):
    """LR multiplier: linear warm-up to 1, then cosine decay to 0 at ``max_steps``."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, max_steps - warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))

    return factor


def resolve_alpha(cfg: Config, auxiliary: list[str]) -> dict[str, float]:
    """Alpha of every auxiliary modality: ``train.alpha[m]`` or ``train.alpha_default``."""
    return {name: float(cfg.train.alpha.get(name, cfg.train.alpha_default)) for name in auxiliary}


def rng_state() -> dict:
    """Every RNG the loop may touch (CUDA's too: dropout on GPU), for checkpoints."""
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    """Restore what ``rng_state`` saved."""
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def new_progress() -> dict:
    """Loop bookkeeping that checkpoints carry: step, best-val point, validations without improvement."""
    return {"step": 0, "best_val_acc": -1.0, "best_val_loss": math.inf, "best_step": 0, "bad_validations": 0}


def restore(state: dict, model, optimizer, scheduler, streams: dict) -> tuple[dict, dict]:
    """Load a checkpoint's loop state in place; returns (progress, best_weights)."""
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    for name, position in state["streams"].items():
        streams[name].load_state_dict(position)
    set_rng_state(state["rng"])
    return state["progress"], state["best_weights"]


def record_validation(progress: dict, acc: float, loss: float, model, best_weights: dict, patience: int) -> tuple[dict, bool]:
    """Keep the best-val weights (higher accuracy, ties to lower loss); returns (best_weights, stop on patience)."""
    if acc > progress["best_val_acc"] or (acc == progress["best_val_acc"] and loss < progress["best_val_loss"]):
        progress.update(best_val_acc=acc, best_val_loss=loss, best_step=progress["step"], bad_validations=0)
        best_weights = copy.deepcopy(model.state_dict())
    else:
        progress["bad_validations"] += 1
    return best_weights, patience > 0 and progress["bad_validations"] >= patience


@contextlib.contextmanager
def swapped_weights(model, weights: dict):
    """Evaluate with other weights (the best-val point), then put the current ones back."""
    current = copy.deepcopy(model.state_dict())
    model.load_state_dict(weights)
    try:
        yield model
    finally:
        model.load_state_dict(current)


def checkpoint(cfg: Config, model, optimizer, scheduler, streams: dict, progress: dict, best_weights: dict,
               dataset_info: dict) -> tuple[dict, dict]:
    """(full loop state for an exact resume, the best-val product) for ``ctx.report``."""
    state = {
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "streams": {name: s.state_dict() for name, s in streams.items()},
        "progress": dict(progress),
        "best_weights": best_weights,
        "rng": rng_state(),
        "config": cfg.to_dict(),
    }
    best = {"model": best_weights, "config": cfg.to_dict(), "dataset": dataset_info, "val_acc": progress["best_val_acc"],
            "step": progress["best_step"]}
    return state, best


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


def setup_worker(config: dict, plan: dict[str, StreamSpec], dataset_info: dict, ctx):
    """What every loop starts with: the Config, alpha per auxiliary modality, the train streams
    (target + auxiliary modalities with alpha > 0) and a factory for further streams."""
    cfg = config_from_dict(config)
    torch.set_flush_denormal(True)  # denormals in optimizer state made CPU steps ~10x slower
    torch.set_num_threads(cfg.resources.torch_threads)
    target = dataset_info["target"]
    alpha = resolve_alpha(cfg, dataset_info["auxiliary"])
    sizes = {target: cfg.train.batch_size}
    sizes.update({m: max(1, round(cfg.train.batch_size * cfg.data.aux_batch_ratio)) for m, w in alpha.items() if w > 0.0})
    worker_seed = cfg.train.seed * 1000 + ctx.rank

    def stream(modality: str, split: str, batch_size: int) -> BatchStream:
        name = dataset_name(modality, split)
        return BatchStream(ctx.iterator(name), plan[name], batch_size, worker_seed, ctx.rank, ctx.world_size,
                           cfg.data.shuffle_buffer)

    return cfg, alpha, {m: stream(m, "train", size) for m, size in sizes.items()}, stream


def train_supervised(config: dict, plan: dict[str, StreamSpec], dataset_info: dict, ctx) -> dict:
    """Train supervised UML for ``train.max_steps`` steps; returns the final metrics.

    ``config`` is a Config as a dict, ``plan`` the stream plan of ``plan_streams``, ``dataset_info``
    the manifest facts a worker needs (classes, target, dims, auxiliary).
    """
    cfg, alpha, train_streams, stream = setup_worker(config, plan, dataset_info, ctx)
    target, classes = dataset_info["target"], dataset_info["classes"]
    active = [m for m in train_streams if m != target]
    val_stream = stream(target, "val", cfg.train.batch_size)
    test_stream = stream(target, "test", cfg.train.batch_size)

    torch.manual_seed(cfg.train.seed)  # same init on every worker
    dims = {m: dataset_info["dims"][m] for m in [target] + active}
    model = SharedHeadUML(dims, target, len(classes), cfg.model.shared_dim, cfg.model.project_auxiliary,
                          cfg.model.logit_scale, cfg.model.project_target)
    model.to(ctx.device)
    if cfg.model.head_init == "text" and active:
        sums, counts = _aux_class_means(train_streams[active[0]], model.projections[active[0]], len(classes), ctx)
        present = counts > 0
        labels = torch.arange(len(classes))[present]
        model.init_head_from_class_means((sums[present] / counts[present, None]).float(), labels)

    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(cfg.train.warmup_steps, cfg.train.max_steps))
    progress, best_weights = new_progress(), copy.deepcopy(model.state_dict())
    state = ctx.restore()
    if state is not None:
        progress, best_weights = restore(state, model, optimizer, scheduler, train_streams)

    trained = ctx.wrap(model)
    model.train()
    running = {m: 0.0 for m in train_streams}
    running_total, since_report = 0.0, 0
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
        running_total += float(loss.detach())
        for name, value in parts.items():
            running[name] += value
        since_report += 1

        step = progress["step"]
        last = step == cfg.train.max_steps
        if step % cfg.train.val_every and not last:
            continue
        val = evaluate(model, val_stream, ctx)
        best_weights, stop = record_validation(progress, val["acc"], val["loss"], model, best_weights, cfg.train.patience)
        metrics = {
            "step": step,
            "epoch": train_streams[target].epoch,
            "lr": scheduler.get_last_lr()[0],
            "train_loss": running_total / since_report,
            **{f"train_loss_{name}": value / since_report for name, value in running.items()},
            "val_acc": val["acc"],
            "val_loss": val["loss"],
            "best_val_acc": progress["best_val_acc"],
            "best_val_loss": progress["best_val_loss"],
            "best_step": progress["best_step"],
        }
        running = {m: 0.0 for m in train_streams}
        running_total, since_report = 0.0, 0
        if stop or last:
            # the score is the best-val point, not the last step (a reference defect)
            with swapped_weights(model, best_weights):
                test = evaluate(model, test_stream, ctx)
            metrics.update(test_acc=test["acc"], test_loss=test["loss"], stopped_early=int(stop), completed=1)
        state, best = checkpoint(cfg, model, optimizer, scheduler, train_streams, progress, best_weights, dataset_info)
        ctx.report(metrics, state, best)
        if stop:
            break
    return metrics
