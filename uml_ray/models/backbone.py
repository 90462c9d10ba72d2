"""The vision backbone of the fine-tuning regime (docs/method.md §1: "Fine-tuning the backbone").

``model.backbone`` names it in the encoder-spec grammar of ``uml_ray.encoders.spec``:

- ``efficientnet-lite0`` (the packaged ImageNet weights, the offline default);
- ``timm:NAME`` (any timm model: timm's pretrained weights, ``weights=FILE`` for a local file,
  ``pretrained=false`` for random init, ``img_size=PX`` for models built at a fixed size such as ViTs);
- ``open_clip:NAME[@TAG]`` (the image tower of an open_clip model, the text tower dropped: the tag's
  pretrained weights, ``weights=FILE`` for a local checkpoint, ``pretrained=false`` for random init,
  ``config=PATH.json`` for a model config of one's own, ``img_size=PX`` to build the tower at that size).

The backbone outputs pooled features (timm with ``num_classes=0``; open_clip's pooled, projected
image embedding); the projection and the shared head of ``SharedHeadUML`` sit on top.

Plain PyTorch, timm and open_clip: no Ray, MLflow or Optuna.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from uml_ray.encoders.spec import EncoderSpec, parse_encoder
from uml_ray.encoders.vision import (
    load_open_clip_model,
    load_timm_model,
    open_clip_architecture,
    open_clip_image_config,
    open_clip_model_config,
)
from uml_ray.errors import ConfigError

ACCEPTED = (
    "efficientnet-lite0, timm:NAME[,pretrained=false] or "
    "open_clip:NAME[@TAG][,pretrained=false][,config=PATH.json]"
)


class Backbone(nn.Module):
    """Images ``(N, 3, S, S)`` → pooled features ``(N, num_features)``; parameter groups in forward order.

    ``groups`` are parameter names in forward order (the stem, then each stage or block, the last
    holding the final norm/conv/projection): timm's coarse groups, or the same cut of an open_clip
    tower; ``freeze`` counts them. ``data_config`` is the pretrained input config (size, mean, std,
    interpolation, crop_pct) the image pipeline normalises with. ``num_features`` defaults to the
    model's own (timm's ``num_features``).
    """

    def __init__(
        self, model: nn.Module, groups: list[list[str]], data_config: dict, num_features: int | None = None
    ):
        super().__init__()
        self.model = model
        self.num_features = int(model.num_features if num_features is None else num_features)
        self.groups = groups
        self.data_config = data_config
        self.frozen_modules: list[str] = []

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Pooled features of a batch of normalised images."""
        return self.model(images)

    def freeze(self, count: int) -> None:
        """Freeze the first ``count`` groups: no gradients, and their norm layers keep running statistics.

        A module whose every parameter is frozen stays in eval mode even while the model trains,
        so frozen BatchNorm statistics do not drift and frozen blocks are exactly unchanged.
        """
        if not 0 <= count <= len(self.groups):
            raise ConfigError(
                f"model.freeze_blocks={count}: this backbone has {len(self.groups)} parameter groups "
                f"(the stem, then its blocks); choose 0..{len(self.groups)}"
            )
        names = {name for group in self.groups[:count] for name in group}
        for name, parameter in self.model.named_parameters():
            if name in names:
                parameter.requires_grad_(False)
        self.frozen_modules = [
            name
            for name, module in self.model.named_modules()
            if any(True for _ in module.parameters())
            and not any(p.requires_grad for p in module.parameters())
        ]
        self.train(self.training)

    def train(self, mode: bool = True) -> Backbone:
        """Train/eval mode for the trainable part; frozen modules always evaluate."""
        super().train(mode)
        if self.frozen_modules:
            modules = dict(self.model.named_modules())
            for name in self.frozen_modules:
                modules[name].eval()
        return self


def build_backbone(spec_text: str) -> Backbone:
    """The backbone ``model.backbone`` names, on CPU, in train mode; ConfigError for anything unsupported."""
    spec = parse_encoder(spec_text)
    if spec.family == "open_clip":
        return _build_open_clip(spec_text, spec)
    from timm.data import resolve_data_config
    from timm.models import group_parameters

    _require_image_family(spec_text, spec)
    model = load_timm_model(spec)
    grouped = group_parameters(model, model.group_matcher(coarse=True))
    groups = [list(names) for _, names in sorted(grouped.items())]
    data_config = resolve_data_config({}, model=model)
    return Backbone(model, groups, data_config).train()


def check_backbone(spec_text: str, freeze_blocks: int, image_size: int = 0) -> int:
    """Check ``model.backbone`` and ``model.freeze_blocks`` before launch: a weightless (meta-device) build.

    Returns the backbone's feature dim; ConfigError naming the field for an unknown model, a missing
    config or weight file, or an out-of-range freeze count. ``image_size`` (``model.image_size``, 0 =
    the backbone's own) is checked against open_clip towers, whose position embeddings fix their input size.
    """
    spec = parse_encoder(spec_text)
    if spec.family == "open_clip":
        dim = int(open_clip_model_config(spec, _where(spec_text))["embed_dim"])
        _check_open_clip_weights(spec_text, spec)
        visual = _open_clip_tower(spec_text, open_clip_architecture(spec).visual)
        _check_freeze(freeze_blocks, spec.name, len(_open_clip_groups(spec_text, visual)))
        size = open_clip_image_config(visual)[0]
        if image_size and image_size != size and not _is_timm_tower(visual):
            raise ConfigError(
                f"model.image_size={image_size}: backbone {spec.name} takes {size} px images (its position "
                f"embeddings are fixed); set model.image_size=0, or add img_size={image_size} "
                "to model.backbone"
            )
        return dim
    import timm
    from timm.models import group_parameters

    _require_image_family(spec_text, spec)
    kwargs = {"img_size": spec.int_option("img_size")} if "img_size" in spec.options else {}
    try:
        with torch.device("meta"):
            model = timm.create_model(spec.name, pretrained=False, num_classes=0, **kwargs)
    except RuntimeError as exc:
        raise ConfigError(
            f"model.backbone='{spec_text}': {exc}; list names with timm.list_models()"
        ) from None
    _check_freeze(freeze_blocks, spec.name, len(group_parameters(model, model.group_matcher(coarse=True))))
    return int(model.num_features)


def _require_image_family(spec_text: str, spec: EncoderSpec) -> None:
    if spec.family not in ("timm", "open_clip"):
        raise ConfigError(
            f"model.backbone='{spec_text}': the fine-tuning regime trains timm and open_clip image "
            f"backbones; use {ACCEPTED}"
        )


def _check_freeze(freeze_blocks: int, name: str, count: int) -> None:
    if not 0 <= freeze_blocks <= count:
        raise ConfigError(
            f"model.freeze_blocks={freeze_blocks}: backbone {name} has {count} parameter groups "
            f"(the stem, then its blocks); choose 0..{count}"
        )


def _where(spec_text: str) -> str:
    return f"model.backbone='{spec_text}'"


def _build_open_clip(spec_text: str, spec: EncoderSpec) -> Backbone:
    """The image tower of an open_clip model.

    The text tower is dropped right after the (whole-model) weight load.
    """
    dim = int(open_clip_model_config(spec, _where(spec_text))["embed_dim"])
    _check_open_clip_weights(spec_text, spec)
    model = load_open_clip_model(spec, "cpu")
    visual = _open_clip_tower(spec_text, model.visual)
    del model
    if getattr(visual, "output_tokens", False):
        visual.output_tokens = (
            False  # CoCa towers also return their tokens; the head takes the pooled embedding
        )
    image_size, mean, std = open_clip_image_config(visual)
    preprocess = getattr(visual, "preprocess_cfg", None) or {}
    # CLIP's eval transform: shorter side to the input size, then the centre crop (crop_pct 1)
    data_config = {
        "input_size": (3, image_size, image_size),
        "mean": mean,
        "std": std,
        "interpolation": preprocess.get("interpolation", "bicubic"),
        "crop_pct": 1.0,
        "crop_mode": "center",
    }
    return Backbone(visual, _open_clip_groups(spec_text, visual), data_config, num_features=dim).train()


def _check_open_clip_weights(spec_text: str, spec: EncoderSpec) -> None:
    """Weights a backbone is to start from must be named and exist.

    A bare ``open_clip:NAME`` would train from random init.
    """
    import open_clip

    weights = spec.options.get("weights")
    if weights:
        if not Path(weights).is_file():
            raise ConfigError(
                f"{_where(spec_text)}: weights file {weights} does not exist; "
                "give a local open_clip checkpoint"
            )
        return
    if not spec.pretrained:
        return
    tags = open_clip.list_pretrained_tags_by_model(spec.name)
    if spec.tag is None:
        raise ConfigError(
            f"{_where(spec_text)}: no weights named; "
            f"add @TAG (tags of {spec.name}: {', '.join(tags) or 'none'}), "
            "weights=FILE, or pretrained=false for random init"
        )
    if spec.tag not in tags:
        raise ConfigError(
            f"{_where(spec_text)}: open_clip has no pretrained tag '{spec.tag}' for {spec.name}; "
            f"use one of {', '.join(tags) or '(none)'}, weights=FILE, or pretrained=false"
        )


def _open_clip_tower(spec_text: str, visual: nn.Module) -> nn.Module:
    from open_clip.modified_resnet import ModifiedResNet
    from open_clip.transformer import VisionTransformer

    if not isinstance(visual, (VisionTransformer, ModifiedResNet)) and not _is_timm_tower(visual):
        raise ConfigError(
            f"{_where(spec_text)}: its image tower is a {type(visual).__name__}; the fine-tuning regime "
            "trains open_clip ViT, ModifiedResNet and timm towers: choose another model"
        )
    return visual


def _is_timm_tower(visual: nn.Module) -> bool:
    from open_clip.timm_model import TimmModel

    return isinstance(visual, TimmModel)


def _open_clip_groups(spec_text: str, visual: nn.Module) -> list[list[str]]:
    """Parameter names of an open_clip image tower in forward order, cut the way timm cuts its models.

    ViT: the stem (conv1, class and position embeddings, ln_pre), each ``transformer.resblocks.i``,
    then the pooling/ln_post/proj. ModifiedResNet: the stem convs, ``layer1..4``, the attention pool.
    timm tower: the trunk's coarse timm groups, the projection head joining the last.
    """
    from open_clip.modified_resnet import ModifiedResNet
    from timm.models import group_parameters

    names = [name for name, _ in visual.named_parameters()]
    if _is_timm_tower(visual):
        grouped = group_parameters(visual.trunk, visual.trunk.group_matcher(coarse=True))
        groups = [[f"trunk.{name}" for name in group] for _, group in sorted(grouped.items())]
        groups[-1] += [name for name in names if not name.startswith("trunk.")]
    else:
        if isinstance(visual, ModifiedResNet):
            blocks, last = ["layer1.", "layer2.", "layer3.", "layer4."], ("attnpool",)
        else:
            blocks = [f"transformer.resblocks.{i}." for i in range(len(visual.transformer.resblocks))]
            last = ("attn_pool", "attn_pool_contrastive", "ln_post", "proj")
        groups = [[] for _ in range(len(blocks) + 2)]
        for name in names:
            if name.split(".", 1)[0] in last:
                groups[-1].append(name)
            else:  # a block's, else the stem's (the embeddings and norms before the first block)
                groups[next((i + 1 for i, prefix in enumerate(blocks) if name.startswith(prefix)), 0)].append(
                    name
                )
    grouped_names = [name for group in groups for name in group]
    if sorted(grouped_names) != sorted(names):
        raise ConfigError(
            f"{_where(spec_text)}: cannot cut {type(visual).__name__} into parameter groups "
            "(this open_clip version names its parameters differently); use a timm: backbone"
        )
    return [group for group in groups if group]


def param_groups(
    model: nn.Module,
    lr: float,
    weight_decay: float,
    backbone_lr_scale: float,
    backbone_prefix: str = "backbone.",
) -> list[dict]:
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
        {
            "name": "backbone",
            "params": backbone_decay,
            "lr": lr * backbone_lr_scale,
            "weight_decay": weight_decay,
        },
        {
            "name": "backbone_no_decay",
            "params": backbone_no_decay,
            "lr": lr * backbone_lr_scale,
            "weight_decay": 0.0,
        },
        {"name": "head", "params": head, "lr": lr, "weight_decay": weight_decay},
    ]
    return [group for group in groups if group["params"]]
