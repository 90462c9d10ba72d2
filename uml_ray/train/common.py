"""What the regimes build with: the LR schedule, the optimizer, the worker's streams, train-loss
tallies, and the one-model side of a regime (model, optimizer, schedule, test at other weights).

The loop around them is one (``skeleton.run_loop``); the regimes are ``loop.Supervised``
(head-only and fine-tuning), ``sequence_loop.Sequence`` and ``fused_loop.Fused``.
"""

from __future__ import annotations

import contextlib
import copy
import math

import torch
import torch.nn.functional as F

from uml_ray.data.image_pipeline import ImageStream, ImageTransform
from uml_ray.data.streams import BatchStream, dataset_name
from uml_ray.train.plan import RunPlan
from uml_ray.train.skeleton import OneModel


def warmup_cosine(warmup_steps: int, max_steps: int):
    """LR multiplier: linear warm-up to 1, then cosine decay to 0 at ``max_steps``."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, max_steps - warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))

    return factor


def build_optimizer(parameters, cfg) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    """AdamW over ``parameters`` (params or param groups) with linear warm-up then cosine decay.

    torch's fused kernel: one pass over each parameter instead of ~10 (about 2.5x faster steps on
    CPU for a head), and the kernel fused trials step their members with (``train.fused_optim``).
    """
    optimizer = torch.optim.AdamW(
        parameters, lr=cfg.train.lr, weight_decay=cfg.train.weight_decay, fused=True
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, warmup_cosine(cfg.train.warmup_steps, cfg.train.max_steps)
    )
    return optimizer, scheduler


class Tally:
    """Mean train losses between two validations: the total per step, each modality over the steps
    that trained it."""

    def __init__(self):
        self.total, self.steps = 0.0, 0
        self.parts: dict[str, float] = {}
        self.counts: dict[str, int] = {}

    def add(self, total: float, parts: dict[str, float]) -> None:
        """One optimizer step's loss and its unweighted per-modality parts."""
        self.total += total
        self.steps += 1
        for name, value in parts.items():
            self.parts[name] = self.parts.get(name, 0.0) + value
            self.counts[name] = self.counts.get(name, 0) + 1

    def means(self) -> dict[str, float]:
        """``train_loss`` and ``train_loss_<modality>`` since the last validation."""
        return {
            "train_loss": self.total / max(self.steps, 1),
            **{f"train_loss_{name}": value / self.counts[name] for name, value in self.parts.items()},
        }


@contextlib.contextmanager
def swapped_weights(model, weights: dict):
    """Evaluate with other weights (the best-val point), then put the current ones back."""
    current = copy.deepcopy(model.state_dict())
    model.load_state_dict(weights)
    try:
        yield model
    finally:
        model.load_state_dict(current)


class OneModelRegime:
    """The part of a ``skeleton.Regime`` that one-model regimes (supervised, fine-tuning, sequence)
    share: one model with its optimizer and LR schedule. A subclass builds them and supplies
    ``step``, ``validate``, ``train_metrics`` and ``evaluate_test``."""

    layout = OneModel
    configs: list
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR

    def initialise(self) -> None:
        """Nothing to do for a fresh run by default."""

    def update(self, max_norm: float) -> None:
        """The end of a step: clip gradients to ``max_norm`` (0: no clipping), step the optimizer
        and the LR schedule."""
        if max_norm > 0:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), max_norm)
        self.optimizer.step()
        self.scheduler.step()

    def evaluate_test(self) -> dict[str, float]:
        """Test metrics of the model's current weights."""
        raise NotImplementedError

    def weights(self, position: int) -> dict:
        """A copy of the model's weights."""
        return copy.deepcopy(self.model.state_dict())

    def test(self, positions: list[int], weights: list[dict]) -> list[dict]:
        """Test metrics with ``weights[0]``; the model keeps its own weights."""
        with swapped_weights(self.model, weights[0]):
            return [self.evaluate_test()]

    def select(self, positions: list[int]) -> None:
        """Nothing to free: the model has finished."""

    def state_dict(self) -> dict:
        """Model, optimizer and LR schedule."""
        return {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
        }

    def load_state_dict(self, state: dict) -> None:
        """Put back what ``state_dict`` saved."""
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])


def worker_seed(cfg, rank: int) -> int:
    """The seed of a worker's batch streams."""
    return cfg.train.seed * 1000 + rank


def setup_worker(
    plan: RunPlan, ctx, closing: contextlib.ExitStack, image_transform: ImageTransform | None = None
):
    """What every regime starts with: thread/denormal settings, alpha per auxiliary modality, the
    train streams (target + auxiliary modalities with alpha > 0) and a factory for further streams.
    Every stream is closed with ``closing``.

    Image datasets (the fine-tuning regime) stream through the image pipeline with ``image_transform``
    (train augmentation; val/test use its eval form)."""
    cfg = plan.cfg
    torch.set_flush_denormal(True)  # denormals in optimizer state made CPU steps ~10x slower
    torch.set_num_threads(cfg.resources.torch_threads)
    target = plan.dataset.target
    alpha = plan.alpha()
    sizes = {target: cfg.train.batch_size}
    sizes.update(
        {
            m: max(1, round(cfg.train.batch_size * cfg.data.aux_batch_ratio))
            for m, w in alpha.items()
            if w > 0.0
        }
    )
    seed = worker_seed(cfg, ctx.rank)

    def stream(modality: str, split: str, batch_size: int) -> BatchStream:
        name = dataset_name(modality, split)
        share = (ctx.source(name), plan.streams[name], batch_size, seed, ctx.rank, ctx.world_size)
        if plan.streams[name].kind == "image":
            transform = image_transform if split == "train" else image_transform.for_eval()
            opened = ImageStream(
                *share,
                transform,
                cfg.resources.decode_cpus,
                cfg.data.cache_max_mb,
                shuffle_buffer=cfg.data.shuffle_buffer,
            )
        else:
            opened = BatchStream(*share, cfg.data.shuffle_buffer)
        closing.callback(opened.close)
        return opened

    return alpha, {m: stream(m, "train", size) for m, size in sizes.items()}, stream


def tally_members(totals: torch.Tensor, logits: torch.Tensor, labels: torch.Tensor) -> None:
    """Add a batch's per-member correct predictions, summed CE and rows to ``totals`` (float64,
    ``[members, 3]``); ``logits`` is ``[members, rows, classes]``, every member on the same rows."""
    members, rows, classes = logits.shape
    losses = F.cross_entropy(
        logits.reshape(members * rows, classes), labels.repeat(members), reduction="none"
    )
    totals[:, 0] += (logits.argmax(2) == labels).sum(1).double().cpu()
    totals[:, 1] += losses.view(members, rows).sum(1).double().cpu()
    totals[:, 2] += rows


def member_means(totals: torch.Tensor) -> tuple[list[float], list[float]]:
    """Per member: accuracy and mean CE from ``tally_members``' totals."""
    count = totals[:, 2].clamp(min=1)
    return (totals[:, 0] / count).tolist(), (totals[:, 1] / count).tolist()
