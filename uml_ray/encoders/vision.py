"""The torch models an ``open_clip:`` or ``timm:`` spec names (open_clip configs, timm input sizes).

Shared by the frozen image encoders (``uml_ray.encoders.registry``) and the fine-tuning backbone
(``uml_ray.models.backbone``).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from uml_ray.encoders.packaged import load_efficientnet_lite0
from uml_ray.encoders.spec import EFFICIENTNET_LITE0_PACKAGE, EncoderSpec
from uml_ray.errors import ConfigError

if TYPE_CHECKING:  # torch is imported where a model is built, not on import
    import torch


def _register_open_clip_config(spec: EncoderSpec, where: str | None = None) -> None:
    # where: how errors name the spec (default "encoder '<spec>'"; the backbone says
    # "model.backbone='<spec>'")
    config = spec.options.get("config")
    if config:
        import open_clip

        where = where or f"encoder '{spec.text}'"
        if Path(config).stem != spec.name:
            raise ConfigError(f"{where}: config file stem '{Path(config).stem}' must equal the model name")
        if not Path(config).is_file():
            raise ConfigError(
                f"{where}: config file {config} does not exist; "
                "give the path of an open_clip model config JSON"
            )
        open_clip.add_model_config(config)


def open_clip_model_config(spec: EncoderSpec, where: str | None = None) -> dict:
    """The open_clip model config an ``open_clip:`` spec names (``config=PATH.json`` registered first).

    ConfigError when there is none; ``where`` is how the error names the spec (default ``encoder '<spec>'``).
    """
    import open_clip

    where = where or f"encoder '{spec.text}'"
    _register_open_clip_config(spec, where)
    config = open_clip.get_model_config(spec.name)
    if config is None:
        raise ConfigError(
            f"{where}: open_clip has no model config '{spec.name}'; "
            "list names with open_clip.list_models(), or give config=PATH.json"
        )
    return config


def _open_clip_kwargs(spec: EncoderSpec) -> dict:
    return {"force_image_size": spec.int_option("img_size")} if "img_size" in spec.options else {}


def load_open_clip_model(spec: EncoderSpec, device: str = "cpu") -> torch.nn.Module:
    """The open_clip model (both towers) an ``open_clip:`` spec names, on ``device``, in train mode.

    Weights: a local ``weights=`` file, else the ``@TAG``'s pretrained weights (which need the model
    hub), else random init (``pretrained=false``, or no tag). ``img_size=`` builds the image tower at
    that size (open_clip resamples pretrained position embeddings to it).
    """
    import open_clip

    _register_open_clip_config(spec)
    pretrained = spec.options.get("weights") or (spec.tag if spec.pretrained else None)
    return open_clip.create_model(spec.name, pretrained=pretrained, device=device, **_open_clip_kwargs(spec))


def open_clip_architecture(spec: EncoderSpec) -> torch.nn.Module:
    """The open_clip model a spec names, built weightless on the meta device.

    Only its shapes: nothing is loaded or downloaded.
    """
    import logging

    import open_clip
    import torch

    open_clip_model_config(spec)
    disabled = logging.root.manager.disable
    logging.disable(logging.WARNING)  # open_clip's "initialized randomly" warning is moot for shapes
    try:
        with torch.device("meta"):
            return open_clip.create_model(
                spec.name, pretrained=None, device="meta", **_open_clip_kwargs(spec)
            )
    finally:
        logging.disable(disabled)


def open_clip_image_config(visual) -> tuple[int, tuple, tuple]:
    """(input size, mean, std) of an open_clip image tower: its ``preprocess_cfg`` (set from the pretrained
    tag), else OpenAI CLIP's normalisation."""
    import open_clip

    preprocess = getattr(visual, "preprocess_cfg", None) or {}
    image_size = visual.image_size[0] if isinstance(visual.image_size, (tuple, list)) else visual.image_size
    return (
        int(image_size),
        tuple(preprocess.get("mean", open_clip.OPENAI_DATASET_MEAN)),
        tuple(preprocess.get("std", open_clip.OPENAI_DATASET_STD)),
    )


def timm_kwargs(spec: EncoderSpec) -> dict:
    return {"img_size": spec.int_option("img_size")} if "img_size" in spec.options else {}


def load_timm_model(spec: EncoderSpec) -> torch.nn.Module:
    """The timm model a ``timm:`` spec names, pooled features out (``num_classes=0``), on CPU.

    Packaged EfficientNet-Lite0 weights, a local ``weights=`` file, random init (``pretrained=false``)
    or timm's own pretrained weights (which need the model hub).
    """
    import timm

    if spec.tag == EFFICIENTNET_LITE0_PACKAGE:
        if spec.name != "tf_efficientnet_lite0":
            raise ConfigError(
                f"encoder '{spec.text}': the {EFFICIENTNET_LITE0_PACKAGE} weights fit "
                "timm:tf_efficientnet_lite0 only"
            )
        model = load_efficientnet_lite0(spec.options.get("weights"))
        model.reset_classifier(0)
    elif spec.tag:
        raise ConfigError(
            f"encoder '{spec.text}': timm names carry their tag after a dot "
            "(vit_small_patch14_dinov2.lvd142m); "
            f"'@' is only for the packaged weights @{EFFICIENTNET_LITE0_PACKAGE}"
        )
    elif "weights" in spec.options:
        model = timm.create_model(
            spec.name,
            pretrained=True,
            num_classes=0,
            pretrained_cfg_overlay={"file": spec.options["weights"]},
            **timm_kwargs(spec),
        )
    else:
        model = timm.create_model(spec.name, pretrained=spec.pretrained, num_classes=0, **timm_kwargs(spec))
    return model


def timm_input_size(model) -> int:
    # a ViT built with img_size= has a patch_embed that knows its size; other models state it in their cfg
    patch_embed = getattr(model, "patch_embed", None)
    if patch_embed is not None and getattr(patch_embed, "img_size", None):
        return int(patch_embed.img_size[0])
    return int(model.pretrained_cfg.get("input_size", (3, 224, 224))[-1])
