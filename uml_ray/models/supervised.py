"""Supervised UML over frozen-encoder features (docs/method.md §1): per-modality projections, ONE shared head.

Plain PyTorch: config values in, module out. No Ray, MLflow or Optuna here.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class SharedHeadUML(nn.Module):
    """Per-modality projection into a shared space, then one shared linear head.

    The target gets ``Linear(d_target -> shared_dim, bias=False)`` (reference) unless
    ``project_target`` is off, for features already in an aligned space (e.g. CLIP image/text).
    An auxiliary modality enters the shared space directly (reference: text goes straight in)
    unless ``project_auxiliary`` is set. A modality whose dim differs from ``shared_dim`` is
    always projected.

    With a ``backbone`` (the fine-tuning regime) the target's inputs are images: the backbone's
    pooled features (``dims[target]`` = its feature dim) enter the target's projection. Without
    one (the head-only regime) the target's inputs are features already — the same model, minus
    the backbone.
    """

    def __init__(
        self,
        dims: dict[str, int],
        target: str,
        num_classes: int,
        shared_dim: int = 0,
        project_auxiliary: bool = False,
        logit_scale: bool = False,
        project_target: bool = True,
        backbone: nn.Module | None = None,
    ):
        super().__init__()
        if target not in dims:
            raise ValueError(f"target modality '{target}' not in {sorted(dims)}")
        auxiliary = [m for m in dims if m != target]
        self.target = target
        self.backbone = backbone
        self.shared_dim = shared_dim or (dims[auxiliary[0]] if auxiliary else dims[target])
        self.projections = nn.ModuleDict()
        for name, dim in dims.items():
            if (
                (name == target and project_target)
                or (name != target and project_auxiliary)
                or dim != self.shared_dim
            ):
                self.projections[name] = nn.Linear(dim, self.shared_dim, bias=False)
            else:
                self.projections[name] = nn.Identity()
        self.head = nn.Linear(self.shared_dim, num_classes, bias=False)
        # log-parameterised so the scale stays positive; 0 = scale 1 (plain logits)
        self.log_scales = nn.ParameterDict(
            {name: nn.Parameter(torch.zeros(())) for name in dims} if logit_scale else {}
        )

    def logits(self, modality: str, features: torch.Tensor) -> torch.Tensor:
        """Class logits for a batch of one modality's features (images for the target with a backbone)."""
        if modality == self.target and self.backbone is not None:
            features = self.backbone(features)
        logits = self.head(self.projections[modality](features))
        if modality in self.log_scales:
            logits = logits * self.log_scales[modality].exp()
        return logits

    def forward(self, features: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Logits for independent batches of several modalities in ONE forward pass.

        One call per step keeps DistributedDataParallel's single forward/backward contract.
        """
        return {name: self.logits(name, batch) for name, batch in features.items()}

    @torch.no_grad()
    def init_head_from_class_means(self, features: torch.Tensor, labels: torch.Tensor) -> None:
        """Set head rows to the L2-normalised class means of auxiliary features (in the shared space).

        Classes with no sample keep their random initialisation.
        """
        shared = features
        num_classes = self.head.weight.shape[0]
        sums = torch.zeros(num_classes, shared.shape[1], dtype=shared.dtype)
        sums.index_add_(0, labels, shared)
        counts = torch.bincount(labels, minlength=num_classes)
        present = counts > 0
        means = sums[present] / counts[present, None]
        self.head.weight[present] = F.normalize(means, dim=1).to(self.head.weight.dtype)


def uml_loss(
    logits: dict[str, torch.Tensor],
    labels: dict[str, torch.Tensor],
    target: str,
    alpha: dict[str, float],
) -> tuple[torch.Tensor, dict[str, float]]:
    """``CE(target) + sum_m alpha_m * CE(m)`` over independent (never paired) batches per modality.

    Returns the total and each modality's unweighted CE. Callers leave alpha-0 modalities out of
    the batch entirely, which makes alpha = 0 exactly the unimodal baseline.
    """
    total = F.cross_entropy(logits[target], labels[target])
    parts = {target: float(total.detach())}
    for name, modality_logits in logits.items():
        if name == target:
            continue
        loss = F.cross_entropy(modality_logits, labels[name])
        parts[name] = float(loss.detach())
        total = total + alpha[name] * loss
    return total, parts
