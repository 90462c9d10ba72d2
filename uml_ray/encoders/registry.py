"""Frozen encoders built from a spec: ``load_encoder`` and ``feature_dim`` over the four families.

The spec grammar is ``uml_ray.encoders.spec``'s; the open_clip and timm models come from
``uml_ray.encoders.vision``, the packaged offline weights from ``uml_ray.encoders.packaged``.
Encoders are plain torch: ``Encoder.encode(inputs) -> np.ndarray (N, dim) float32``.
"""

from __future__ import annotations

from uml_ray.encoders.frozen import Encoder, ImageEncoder, TextEncoder
from uml_ray.encoders.packaged import minilm_path
from uml_ray.encoders.spec import MINILM_PACKAGE, MODALITIES, EncoderSpec, parse_encoder
from uml_ray.encoders.vision import (
    load_open_clip_model,
    load_timm_model,
    open_clip_image_config,
    open_clip_model_config,
    timm_input_size,
    timm_kwargs,
)
from uml_ray.errors import ConfigError


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
            model = timm.create_model(spec.name, pretrained=False, num_classes=0, **timm_kwargs(spec))
        return int(model.num_features)
    if spec.family == "hf":
        return _hidden_size(_hf_config(spec), spec)
    return int(_load_sentence_transformers(spec, "text", "cpu").dim)


def _require_modality(spec: EncoderSpec, modality: str, allowed: tuple) -> None:
    if modality not in allowed:
        raise ConfigError(f"encoder '{spec.text}' embeds {' or '.join(allowed)}, not {modality}")


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


def _load_timm(spec: EncoderSpec, modality: str, device: str) -> Encoder:
    _require_modality(spec, modality, ("image",))
    model = load_timm_model(spec).eval().to(device)
    config = model.pretrained_cfg
    image_size = spec.int_option("image_size", timm_input_size(model))
    return ImageEncoder(
        spec,
        int(model.num_features),
        device,
        model,
        image_size,
        config.get("mean", (0.485, 0.456, 0.406)),
        config.get("std", (0.229, 0.224, 0.225)),
    )


def _hf_path(spec: EncoderSpec) -> str:
    if spec.tag == MINILM_PACKAGE:
        return minilm_path()
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
