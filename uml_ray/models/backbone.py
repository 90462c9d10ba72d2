"""The vision backbone of the fine-tuning regime (docs/method.md §1: "Fine-tuning the backbone").

``model.backbone`` names it in the encoder-spec grammar of ``uml_ray.encoders.registry``:
``efficientnet-lite0`` (the packaged ImageNet weights, the offline default), ``timm:NAME`` (any timm
model: timm's pretrained weights, ``weights=FILE`` for a local file, ``pretrained=false`` for random
init, ``img_size=PX`` for models built at a fixed size such as ViTs). The backbone outputs pooled
features (``num_classes=0``); the projection and the shared head of ``SharedHeadUML`` sit on top.

Plain PyTorch and timm: no Ray, MLflow or Optuna.
"""

from __future__ import annotations

import torch
from torch import nn

from uml_ray.encoders.registry import load_timm_model, parse_encoder
from uml_ray.errors import ConfigError


class Backbone(nn.Module):
    """Images ``(N, 3, S, S)`` → pooled features ``(N, num_features)``, with its parameter groups in forward order.

    ``groups`` are timm's coarse groups (the stem, then each stage or block, the last holding the
    final norm/conv), which is what ``freeze`` counts. ``data_config`` is the pretrained input
    config (size, mean, std, interpolation, crop_pct) the image pipeline normalises with.
    """

    def __init__(self, model: nn.Module, groups: list[list[str]], data_config: dict):
        super().__init__()
        self.model = model
        self.num_features = int(model.num_features)
        self.groups = groups
        self.data_config = data_config
        self.frozen_modules: list[str] = []

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Pooled features of a batch of normalised images."""
        return self.model(images)

    def freeze(self, count: int) -> None:
        """Freeze the first ``count`` groups: no gradients, and their norm layers keep their running statistics.

        A module whose every parameter is frozen stays in eval mode even while the model trains,
        so frozen BatchNorm statistics do not drift and frozen blocks are exactly unchanged.
        """
        if not 0 <= count <= len(self.groups):
            raise ConfigError(f"model.freeze_blocks={count}: this backbone has {len(self.groups)} parameter groups "
                              f"(the stem, then its blocks); choose 0..{len(self.groups)}")
        names = {name for group in self.groups[:count] for name in group}
        for name, parameter in self.model.named_parameters():
            if name in names:
                parameter.requires_grad_(False)
        self.frozen_modules = [
            name for name, module in self.model.named_modules()
            if any(True for _ in module.parameters()) and not any(p.requires_grad for p in module.parameters())
        ]
        self.train(self.training)

    def train(self, mode: bool = True) -> "Backbone":
        """Train/eval mode for the trainable part; frozen modules always evaluate."""
        super().train(mode)
        if self.frozen_modules:
            modules = dict(self.model.named_modules())
            for name in self.frozen_modules:
                modules[name].eval()
        return self


def build_backbone(spec_text: str) -> Backbone:
    """The backbone ``model.backbone`` names, on CPU, in train mode; ConfigError for anything unsupported."""
    from timm.data import resolve_data_config
    from timm.models import group_parameters

    spec = parse_encoder(spec_text)
    if spec.family != "timm":
        raise ConfigError(f"model.backbone='{spec_text}': the fine-tuning regime trains timm backbones; "
                          "use efficientnet-lite0 or timm:NAME[,pretrained=false]")
    model = load_timm_model(spec)
    grouped = group_parameters(model, model.group_matcher(coarse=True))
    groups = [list(names) for _, names in sorted(grouped.items())]
    data_config = resolve_data_config({}, model=model)
    return Backbone(model, groups, data_config).train()


def check_backbone(spec_text: str, freeze_blocks: int) -> int:
    """Check ``model.backbone`` and ``model.freeze_blocks`` before launch with a weightless (meta-device) build.

    Returns the backbone's feature dim; ConfigError naming the field for an unknown model or an
    out-of-range freeze count.
    """
    import timm
    from timm.models import group_parameters

    spec = parse_encoder(spec_text)
    if spec.family != "timm":
        raise ConfigError(f"model.backbone='{spec_text}': the fine-tuning regime trains timm backbones; "
                          "use efficientnet-lite0 or timm:NAME[,pretrained=false]")
    kwargs = {"img_size": spec.int_option("img_size")} if "img_size" in spec.options else {}
    try:
        with torch.device("meta"):
            model = timm.create_model(spec.name, pretrained=False, num_classes=0, **kwargs)
    except RuntimeError as exc:
        raise ConfigError(f"model.backbone='{spec_text}': {exc}; list names with timm.list_models()") from None
    count = len(group_parameters(model, model.group_matcher(coarse=True)))
    if not 0 <= freeze_blocks <= count:
        raise ConfigError(f"model.freeze_blocks={freeze_blocks}: backbone {spec.name} has {count} parameter groups "
                          f"(the stem, then its blocks); choose 0..{count}")
    return int(model.num_features)


def param_groups(model: nn.Module, lr: float, weight_decay: float, backbone_lr_scale: float,
                 backbone_prefix: str = "backbone.") -> list[dict]:
    """AdamW parameter groups: the backbone at ``lr * backbone_lr_scale`` without weight decay on its norms
    and biases (parameters of fewer than 2 dims); everything else (projections, head) at ``lr``.

    The head's group keeps ``model.parameters()`` order and settings, so a model without a backbone
    (the head-only regime) trains exactly as a plain ``AdamW(model.parameters())`` would.
    Frozen parameters are left out; empty groups are dropped.
    """
    backbone_decay, backbone_no_decay, head = [], [], []
    for name, parameter in model.named_parameters():
        if not parameter.requires_grad:
            continue
        if not name.startswith(backbone_prefix):
            head.append(parameter)
        elif parameter.ndim >= 2:
            backbone_decay.append(parameter)
        else:
            backbone_no_decay.append(parameter)
    groups = [
        {"name": "backbone", "params": backbone_decay, "lr": lr * backbone_lr_scale, "weight_decay": weight_decay},
        {"name": "backbone_no_decay", "params": backbone_no_decay, "lr": lr * backbone_lr_scale, "weight_decay": 0.0},
        {"name": "head", "params": head, "lr": lr, "weight_decay": weight_decay},
    ]
    return [group for group in groups if group["params"]]
