"""Typed, validated run configs: one dataclass per concern, loaded from YAML with dotted overrides.

Every field carries its help text, allowed choices and bounds in its metadata, so an unknown key
or an impossible value is rejected at load with a message naming the key and what is allowed.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from uml_ray.errors import ConfigError


def option(default, help: str, choices=None, low=None, high=None, low_open=False):
    """A config field with its documentation and validation rules."""
    meta = {"help": help, "choices": choices, "low": low, "high": high, "low_open": low_open}
    if isinstance(default, (dict, list)):
        return field(default_factory=lambda: copy.deepcopy(default), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class DataConfig:
    """Which dataset to read and how modality streams are drawn."""

    manifest: str = option("", "Path or s3:// / gs:// URI of the dataset manifest (docs/data-format.md).")
    auxiliary: list = option(
        [], "Auxiliary modalities to use; empty = every non-target modality in the manifest."
    )
    aux_per_class: int = option(-1, "Keep k auxiliary rows per class (seeded); -1 keeps all.", low=-1)
    target_per_class: int = option(
        -1,
        "Keep k target train rows per class: a draw seeded by train.seed from the id-sorted rows (nested: the k rows are among the 2k ones of the same seed); val and test stay whole. -1 keeps all.",
        low=-1,
    )
    aux_class_mean: bool = option(False, "Replace each auxiliary modality by its per-class mean vectors.")
    aux_batch_ratio: float = option(
        1.0, "Auxiliary batch size as a multiple of train.batch_size.", low=0.0, low_open=True
    )
    shuffle_buffer: int = option(4096, "Rows held in each worker's shuffle buffer.", low=1)
    augment_min_scale: float = option(
        0.08,
        "Image targets: smallest area fraction of the train random-resized crop (0.08 = the ImageNet recipe; 1 = no cropping). The augmentation strength: lower is stronger.",
        low=0.0,
        low_open=True,
        high=1.0,
    )
    augment_flip: bool = option(True, "Image targets: random horizontal flips in training.")
    cache_max_mb: int = option(
        512,
        "Hold a (modality, split) in memory when it fits in this many MB: read once per sweep, shared by every trial through the object store; larger ones stream through Ray Data.",
        low=0,
    )


@dataclass
class ModelConfig:
    """The shared model: supervised head over features, or shared causal transformer over sequences."""

    regime: str = option("supervised", "Training regime.", choices=["supervised", "sequence"])
    shared_dim: int = option(
        0, "Width of the shared space; 0 = the first auxiliary modality's dim (reference).", low=0
    )
    project_target: bool = option(
        True,
        "Give the target its own linear projection (reference); off = its features enter the shared head directly (aligned spaces, e.g. CLIP).",
    )
    project_auxiliary: bool = option(
        False,
        "Give auxiliary modalities their own linear projection; off = they enter the shared space directly (reference).",
    )
    head_init: str = option(
        "random",
        "Head initialisation: random; text = L2-normalised auxiliary class means; probe (fine-tuning) = a linear probe first: projections and head trained train.probe_steps steps on the frozen backbone's features with the UML loss, then everything fine-tuned (LP-FT).",
        choices=["random", "text", "probe"],
    )
    logit_scale: bool = option(False, "Learnable per-modality logit scale.")
    backbone: str = option(
        "",
        "Fine-tuning regime (target of kind image): the vision backbone trained under the projection and shared head, as an encoder spec: efficientnet-lite0 (packaged ImageNet weights), timm:NAME[,pretrained=false][,img_size=PX][,weights=FILE], or open_clip:NAME[@TAG][,weights=FILE][,pretrained=false][,config=PATH.json][,img_size=PX] (the image tower of an open_clip model, e.g. open_clip:ViT-B-16@openai). Empty = head-only over features.",
    )
    freeze_blocks: int = option(
        0,
        "Fine-tuning: freeze the backbone's first N parameter groups in forward order (timm's coarse groups: the stem, then each stage/block; an open_clip ViT: the stem, each transformer block, then ln_post+proj); 0 trains all of it.",
        low=0,
    )
    image_size: int = option(
        0,
        "Fine-tuning: input size in pixels of the crops fed to the backbone; 0 = the backbone's pretrained input size.",
        low=0,
    )
    zdim: int = option(40, "Sequence regime: transformer width (d_model).", low=1)
    layers: int = option(5, "Sequence regime: transformer layers.", low=1)
    heads: int = option(4, "Sequence regime: attention heads; must divide zdim.", low=1)
    dropout: float = option(0.1, "Sequence regime: dropout.", low=0.0, high=0.9)
    pos_emb: str = option(
        "none", "Sequence regime: positional embedding.", choices=["none", "sinusoidal", "learnable"]
    )
    max_len: int = option(512, "Sequence regime: longest sequence the positional embedding covers.", low=1)


@dataclass
class TrainConfig:
    """Optimisation and schedule (step-based, AdamW, linear warm-up then cosine)."""

    lr: float = option(1e-3, "Peak learning rate.", low=0.0, low_open=True, high=10.0)
    weight_decay: float = option(
        0.0,
        "AdamW weight decay (decoupled; few-shot heads tuned fairly may need more than 1, e.g. 7/sqrt(shots)).",
        low=0.0,
        high=100.0,
    )
    batch_size: int = option(32, "Target-modality batch size per worker.", low=1)
    max_steps: int = option(500, "Optimizer steps.", low=1)
    warmup_steps: int = option(20, "Linear warm-up steps before the cosine decay.", low=0)
    val_every: int = option(25, "Validate on the target modality every N steps.", low=1)
    checkpoint_every: int = option(
        4,
        "Write a checkpoint every N validations, and always at the run's end; a retried or resumed run continues exactly from the last one.",
        low=1,
    )
    patience: int = option(0, "Stop after this many validations without improvement; 0 = never.", low=0)
    alpha: dict = option(
        {},
        "Weight of each auxiliary modality's loss, e.g. {text: 0.5}; missing modalities use alpha_default.",
        low=0.0,
    )
    alpha_default: float = option(
        1.0, "Alpha for auxiliary modalities not named in train.alpha; 0 = unimodal baseline.", low=0.0
    )
    step_k: int = option(
        -1, "Sequence regime: auxiliary-only epochs before joint training; -1 = joint from the start.", low=-1
    )
    probe_c: float = option(
        1.0, "Sequence regime: inverse L2 strength of the logistic-regression probe.", low=0.0, low_open=True
    )
    probe_steps: int = option(
        100,
        "Fine-tuning with model.head_init=probe: steps of the linear probe that initialises the head (backbone frozen, same batches and loss).",
        low=1,
    )
    grad_clip: float = option(0.0, "Clip the gradient norm to this value; 0 = off.", low=0.0)
    backbone_lr_scale: float = option(
        0.1,
        "Fine-tuning: the backbone's learning rate is train.lr times this (projection and head use train.lr); 0 keeps the backbone fixed.",
        low=0.0,
        high=10.0,
    )
    grad_accum: int = option(
        1,
        "Micro-batches accumulated per optimizer step (effective batch = batch_size x grad_accum x workers).",
        low=1,
    )
    precision: str = option(
        "bf16",
        "Mixed precision on CUDA: bf16 autocast, or fp32; CPU always computes in fp32.",
        choices=["bf16", "fp32"],
    )
    seed: int = option(0, "The one seed: per-worker and per-trial seeds derive from it.", low=0)


@dataclass
class TrackingConfig:
    """Where runs, metrics, checkpoints and artifacts go."""

    uri: str = option(
        "sqlite:///mlflow.db",
        "MLflow tracking URI: a local SQLite store (embedded default) or http(s)://server.",
    )
    experiment: str = option("uml-ray", "MLflow experiment name.")
    artifact_location: str = option(
        "", "Artifact root for a new experiment; empty = ./mlartifacts beside a SQLite store."
    )
    storage_path: str = option(
        "./uml_runs", "Ray results and checkpoints: a local folder, or s3:// / gs:// on multi-node clusters."
    )
    run_name: str = option("", "Name of the run or sweep; empty = generated.")


@dataclass
class ResourcesConfig:
    """Workers per run and how a run is placed on the Ray cluster."""

    num_workers: int = option(1, "Data-parallel training workers per run.", low=1)
    cpus_per_worker: float = option(1.0, "CPUs per training worker.", low=0.0, low_open=True)
    gpus_per_worker: float = option(0.0, "GPUs per training worker; > 0 trains on CUDA with NCCL.", low=0.0)
    trainer: str = option(
        "auto",
        "auto: in the trial process for one worker, Ray Train TorchTrainer otherwise.",
        choices=["auto", "inline", "ray_train"],
    )
    data_cpus: float = option(1.0, "CPUs kept free for Ray Data reads beside the training workers.", low=0.0)
    num_cpus: int = option(0, "CPUs of a locally started Ray; 0 = all of this machine's.", low=0)
    address: str = option("", "Ray address to attach to; empty = RAY_ADDRESS or a new local Ray.")
    max_failures: int = option(
        1, "Retries of a run after a worker or node is lost (from its last checkpoint).", low=0
    )
    torch_threads: int = option(1, "Torch intra-op threads per training process.", low=1)
    decode_cpus: float = option(
        1.0,
        "Fine-tuning: CPUs per Ray Data image decode/augment task; tasks run beside the training workers (or on CPU-only nodes feeding GPU workers).",
        low=0.0,
        low_open=True,
    )


@dataclass
class Config:
    """A full run: data, model, train, tracking, resources."""

    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    resources: ResourcesConfig = field(default_factory=ResourcesConfig)

    def __post_init__(self):
        check_config(self)

    def to_dict(self) -> dict:
        """Nested plain dict (YAML-ready)."""
        return dataclasses.asdict(self)

    def flat(self) -> dict[str, Any]:
        """Dotted-key view, e.g. {'train.lr': 1e-3, 'train.alpha.text': 0.5}."""
        return flatten(self.to_dict())

    def alpha_for(self, auxiliary) -> dict[str, float]:
        """Alpha of each auxiliary modality: ``train.alpha[m]``, else ``train.alpha_default``."""
        return {name: float(self.train.alpha.get(name, self.train.alpha_default)) for name in auxiliary}


def check_modalities(cfg: Config, auxiliary) -> None:
    """Rules that need the dataset's auxiliary modalities; run by the driver for the base config and
    for every sampled config before it trains, so a trial never meets them."""
    auxiliary = list(auxiliary)
    for name in cfg.train.alpha:
        if name not in auxiliary:
            raise ConfigError(
                f"train.alpha.{name}: '{name}' is not a used auxiliary modality; choose from {auxiliary}"
            )
    if (
        cfg.model.regime == "sequence"
        and cfg.train.step_k > 0
        and not any(a > 0 for a in cfg.alpha_for(auxiliary).values())
    ):
        raise ConfigError(
            f"train.step_k={cfg.train.step_k} warms up on the auxiliary modalities alone, but every alpha is 0; "
            "set train.step_k=-1 for the unimodal baseline, or give an auxiliary modality alpha > 0"
        )


SECTIONS = {f.name: f.type for f in dataclasses.fields(Config)}
_SECTION_TYPES = {
    "data": DataConfig,
    "model": ModelConfig,
    "train": TrainConfig,
    "tracking": TrackingConfig,
    "resources": ResourcesConfig,
}


def flatten(tree: dict, prefix: str = "") -> dict[str, Any]:
    """Flatten a nested dict to dotted keys."""
    out = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            out.update(flatten(value, name + "."))
        else:
            out[name] = value
    return out


def _field_info(section: str, key: str) -> dataclasses.Field:
    cls = _SECTION_TYPES[section]
    for f in dataclasses.fields(cls):
        if f.name == key:
            return f
    allowed = ", ".join(f.name for f in dataclasses.fields(cls))
    raise ConfigError(f"unknown config key '{section}.{key}'; allowed keys in '{section}': {allowed}")


def field_type(dotted: str) -> type:
    """The Python type of a dotted config key (``train.alpha.text`` is a float); ConfigError if unknown."""
    parts = dotted.split(".")
    if parts[0] not in _SECTION_TYPES:
        raise ConfigError(
            f"unknown config section '{parts[0]}' in '{dotted}'; allowed sections: {', '.join(_SECTION_TYPES)}"
        )
    if len(parts) < 2:
        raise ConfigError(f"'{dotted}' names a section, not a field; use e.g. '{parts[0]}.<field>'")
    f = _field_info(parts[0], parts[1])
    kind = typing.get_type_hints(_SECTION_TYPES[parts[0]])[f.name]
    if kind is dict and len(parts) == 3:
        return float
    if len(parts) != 2:
        raise ConfigError(f"'{dotted}': '{parts[0]}.{parts[1]}' has no sub-fields")
    return kind


def _coerce(dotted: str, value, kind: type):
    """Check/convert one value to its field's type; strings from the command line are parsed."""
    if kind is float:
        if isinstance(value, bool):
            raise ConfigError(f"{dotted}: expected a number, got {value!r}")
        if isinstance(value, str):
            try:
                value = float(value)
            except ValueError:
                raise ConfigError(f"{dotted}: expected a number, got {value!r}") from None
        if not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ConfigError(f"{dotted}: expected a finite number, got {value!r}")
        return float(value)
    if kind is int:
        if isinstance(value, str):
            try:
                value = int(value)
            except ValueError:
                raise ConfigError(f"{dotted}: expected an integer, got {value!r}") from None
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{dotted}: expected an integer, got {value!r}")
        return value
    if kind is bool:
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
        if not isinstance(value, bool):
            raise ConfigError(f"{dotted}: expected true or false, got {value!r}")
        return value
    if kind is str:
        if value is None:
            return ""
        if not isinstance(value, (str, int, float)):
            raise ConfigError(f"{dotted}: expected a string, got {value!r}")
        return str(value)
    if kind is list:
        if isinstance(value, str):
            value = [v for v in value.split(",") if v]
        if not isinstance(value, list):
            raise ConfigError(f"{dotted}: expected a list, got {value!r}")
        return [str(v) for v in value]
    if kind is dict:
        if value is None:
            return {}
        if not isinstance(value, dict):
            raise ConfigError(f"{dotted}: expected a mapping like {{name: value}}, got {value!r}")
        return {str(k): _coerce(f"{dotted}.{k}", v, float) for k, v in value.items()}
    raise AssertionError(f"unhandled config type {kind}")


def _check_field(section: str, f: dataclasses.Field, value):
    meta = f.metadata
    dotted = f"{section}.{f.name}"
    if meta.get("choices") is not None and value not in meta["choices"]:
        raise ConfigError(f"{dotted}: {value!r} is not allowed; choose one of {meta['choices']}")
    values = value.values() if isinstance(value, dict) else [value]
    for v in values:
        if not isinstance(v, (int, float)) or isinstance(v, bool):
            continue
        low, high = meta.get("low"), meta.get("high")
        if low is not None and (v < low or (meta.get("low_open") and v == low)):
            bound = f"> {low}" if meta.get("low_open") else f">= {low}"
            raise ConfigError(
                f"{dotted}: {v!r} is out of range; it must be {bound}"
                + (f" and <= {high}" if high is not None else "")
            )
        if high is not None and v > high:
            raise ConfigError(f"{dotted}: {v!r} is out of range; it must be <= {high}")


def check_config(cfg: Config) -> None:
    """Field-level bounds and choices, then cross-field rules."""
    for section, cls in _SECTION_TYPES.items():
        obj = getattr(cfg, section)
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            value = _coerce(f"{section}.{f.name}", getattr(obj, f.name), hints[f.name])
            setattr(obj, f.name, value)
            _check_field(section, f, value)
    if cfg.model.regime == "sequence" and cfg.model.zdim % cfg.model.heads:
        raise ConfigError(
            f"model.zdim={cfg.model.zdim} is not divisible by model.heads={cfg.model.heads}; "
            f"pick heads from {[h for h in range(1, cfg.model.zdim + 1) if cfg.model.zdim % h == 0][:8]}"
        )
    if cfg.model.regime == "sequence" and cfg.model.backbone:
        raise ConfigError(
            "model.backbone fine-tunes a vision backbone in the supervised regime; set model.regime=supervised or model.backbone=''"
        )
    if cfg.model.regime == "sequence" and (cfg.data.aux_per_class > 0 or cfg.data.aux_class_mean):
        raise ConfigError(
            "data.aux_per_class / data.aux_class_mean select vector rows; the sequence regime does not use them (set -1 / false)"
        )
    if cfg.model.head_init == "probe" and not cfg.model.backbone:
        raise ConfigError(
            "model.head_init=probe trains a linear probe before fine-tuning a backbone; without model.backbone "
            "the run is already a probe: use model.head_init=random or text, or set model.backbone"
        )
    if cfg.data.target_per_class > 0 and (cfg.model.regime == "sequence" or cfg.model.backbone):
        raise ConfigError(
            f"data.target_per_class={cfg.data.target_per_class} selects target feature vectors of the head-only supervised "
            "regime; set it to -1 here (draw few-shot splits when building the dataset instead, e.g. uml-ray case --shots)"
        )
    if not cfg.tracking.experiment.strip():
        # MLflow refuses an empty experiment name only when the run starts, after Ray has started
        raise ConfigError(
            "tracking.experiment is empty; name the MLflow experiment (e.g. tracking.experiment=uml-ray)"
        )
    if cfg.train.warmup_steps >= cfg.train.max_steps:
        raise ConfigError(
            f"train.warmup_steps={cfg.train.warmup_steps} must be smaller than train.max_steps={cfg.train.max_steps}"
        )
    if 0 < cfg.resources.data_cpus < 1:
        # Ray Data's file-listing task asks for a whole CPU: a fraction reserved for it never fits it
        raise ConfigError(
            f"resources.data_cpus={cfg.resources.data_cpus:g}: Ray Data's file-listing task needs a whole CPU; "
            "set it to 0 (no reservation) or a value >= 1"
        )
    if cfg.resources.trainer == "inline" and cfg.resources.num_workers > 1:
        raise ConfigError(
            "resources.trainer=inline runs one worker; set resources.num_workers=1 or trainer=ray_train"
        )


# Limits on YAML input: a config, space or manifest is a few KB; these refuse hostile or broken
# files (a multi-GB file, a "billion laughs" anchor bomb) in milliseconds instead of exhausting memory.
MAX_INPUT_BYTES = 10 * 1024 * 1024
MAX_YAML_ALIASES = 100
MAX_YAML_ALIAS_NODES = 10_000  # nodes reached through aliases, all aliases together


class _UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader that refuses duplicate keys (the reference silently dropped half a sweep on them)
    and bounds aliases: their count, what they expand to, and recursion."""

    def __init__(self, stream):
        super().__init__(stream)
        self.alias_count = 0
        self.alias_nodes = 0
        self.node_sizes: dict[int, int] = {}

    def compose_node(self, parent, index):
        """Count each alias and the nodes it expands to before PyYAML composes it."""
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            self.alias_count += 1
            if self.alias_count > MAX_YAML_ALIASES:
                raise ConfigError(
                    f"more than {MAX_YAML_ALIASES} YAML aliases (*name) at line {event.start_mark.line + 1}; "
                    "write the values out instead of repeating anchors"
                )
            node = self.anchors.get(event.anchor)
            if node is not None:
                if node.end_mark is None:
                    raise ConfigError(
                        f"alias *{event.anchor} at line {event.start_mark.line + 1} refers to itself; "
                        "a recursive YAML structure cannot be a config, space or manifest"
                    )
                self.alias_nodes += _expanded_size(node, self.node_sizes)
                if self.alias_nodes > MAX_YAML_ALIAS_NODES:
                    raise ConfigError(
                        f"YAML aliases expand to more than {MAX_YAML_ALIAS_NODES} values (at *{event.anchor}, "
                        f"line {event.start_mark.line + 1}); write the values out instead of nesting anchors"
                    )
        return super().compose_node(parent, index)


def _expanded_size(node: yaml.Node, sizes: dict[int, int]) -> int:
    """Values a composed node stands for once every alias in it is expanded (memoised per node)."""
    if id(node) not in sizes:
        if isinstance(node, yaml.ScalarNode):
            sizes[id(node)] = 1
        elif isinstance(node, yaml.SequenceNode):
            sizes[id(node)] = 1 + sum(_expanded_size(child, sizes) for child in node.value)
        else:
            sizes[id(node)] = 1 + sum(
                _expanded_size(k, sizes) + _expanded_size(v, sizes) for k, v in node.value
            )
    return sizes[id(node)]


def _construct_mapping(loader, node, deep=False):
    seen = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if key in seen:
            raise ConfigError(
                f"duplicate key '{key}' at line {key_node.start_mark.line + 1}; each key may appear once"
            )
        seen.add(key)
    return yaml.SafeLoader.construct_mapping(loader, node, deep=deep)


_UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def _yaml_problem(exc: yaml.YAMLError) -> str:
    """PyYAML's error on one line: what is wrong and where (its own text spans several lines)."""
    if isinstance(exc, yaml.MarkedYAMLError) and exc.problem_mark is not None:
        context = f" {exc.context}," if exc.context else ""
        return f"{exc.problem}{context} at line {exc.problem_mark.line + 1}, column {exc.problem_mark.column + 1}"
    if isinstance(exc, yaml.reader.ReaderError):
        code = exc.character if isinstance(exc.character, int) else ord(exc.character[:1] or b"\0")
        return f"{exc.reason}: #x{code:04x} at character {exc.position}"
    return " ".join(str(exc).split())


def decode_text(data: bytes, source: str) -> str:
    """UTF-8 text of an input file read as bytes, refused when over ``MAX_INPUT_BYTES`` or binary."""
    if len(data) > MAX_INPUT_BYTES:
        raise ConfigError(
            f"{source}: larger than {MAX_INPUT_BYTES // (1024 * 1024)} MB; "
            "configs, search spaces and manifests are small YAML/JSON text files: check the path"
        )
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(
            f"{source}: not a UTF-8 text file (byte 0x{data[exc.start]:02x} at offset {exc.start}); "
            "expected YAML/JSON text: check the path"
        ) from None


def read_text(path: str | Path) -> str:
    """A local input file as text, reading at most ``MAX_INPUT_BYTES`` + 1 bytes; errors name the file."""
    try:
        with open(path, "rb") as handle:
            data = handle.read(MAX_INPUT_BYTES + 1)
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read ({exc.strerror}); check the path") from None
    return decode_text(data, str(path))


def load_yaml_text(text: str, source: str) -> Any:
    """Parse YAML safely and within bounds (aliases, nesting); errors are one line naming ``source``."""
    try:
        return yaml.load(text, Loader=_UniqueKeyLoader)
    except ConfigError as exc:
        raise ConfigError(f"{source}: {exc}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{source}: not valid YAML ({_yaml_problem(exc)})") from None
    except RecursionError:
        raise ConfigError(
            f"{source}: YAML nested too deeply; configs, spaces and manifests are a few levels deep"
        ) from None


def read_yaml(path: str | Path) -> Any:
    """Load a YAML file safely and within bounds (size, aliases), refusing duplicate keys; errors name the file."""
    return load_yaml_text(read_text(path), str(path))


def set_dotted(tree: dict, dotted: str, value) -> None:
    """Set ``a.b.c`` in a nested dict, creating mappings on the way."""
    parts = dotted.split(".")
    node = tree
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"cannot set '{dotted}': '{part}' is not a mapping")
    node[parts[-1]] = value


def parse_overrides(overrides: list[str]) -> dict[str, Any]:
    """``['train.lr=3e-4', 'train.alpha.text=0.5']`` → {dotted: parsed value}; each key checked."""
    out = {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override '{item}' must look like section.key=value (e.g. train.lr=3e-4)")
        key, raw = item.split("=", 1)
        field_type(key)
        try:
            out[key] = load_yaml_text(raw, f"override '{item}'") if raw else ""
        except ConfigError as exc:
            raise ConfigError(
                f"{exc}; quote the value or write one field per override (e.g. train.alpha.text=0.5)"
            ) from None
    return out


def config_from_dict(tree: dict, source: str | None = None) -> Config:
    """Build and validate a Config from a nested dict; unknown keys are errors naming the key.

    ``source`` (a file name) prefixes error messages when given.
    """
    where = f"{source}: " if source else ""
    if tree is None:
        tree = {}
    if not isinstance(tree, dict):
        raise ConfigError(f"{where}a config is a mapping of sections {', '.join(_SECTION_TYPES)}")
    sections = {}
    for section, body in tree.items():
        if section not in _SECTION_TYPES:
            raise ConfigError(
                f"{where}unknown config section '{section}'; allowed sections: {', '.join(_SECTION_TYPES)}"
            )
        if body is None:
            body = {}
        if not isinstance(body, dict):
            raise ConfigError(f"{where}section '{section}' must be a mapping")
        for key in body:
            try:
                _field_info(section, key)
            except ConfigError as exc:
                raise ConfigError(f"{where}{exc}") from None
        sections[section] = _SECTION_TYPES[section](**body)
    try:
        return Config(**sections)
    except ConfigError as exc:
        raise ConfigError(f"{where}{exc}") from None


def load_config(path: str | Path | None, overrides: list[str] | dict | None = None) -> Config:
    """Load a YAML config file (or defaults when ``path`` is None) and apply dotted overrides.

    Relative ``data.manifest`` paths are resolved against the config file's folder.
    """
    tree = read_yaml(path) if path is not None else {}
    tree = copy.deepcopy(tree) or {}
    if isinstance(tree, dict) and path is not None:
        manifest = (tree.get("data") or {}).get("manifest")
        if (
            isinstance(manifest, str)
            and manifest
            and "://" not in manifest
            and not Path(manifest).is_absolute()
        ):
            tree.setdefault("data", {})["manifest"] = str((Path(path).parent / manifest).resolve())
    if isinstance(overrides, list):
        overrides = parse_overrides(overrides)
    for key, value in (overrides or {}).items():
        field_type(key)
        set_dotted(tree, key, value)
    return config_from_dict(tree, source=str(path) if path else None)


def apply_overrides(cfg: Config, overrides: dict[str, Any]) -> Config:
    """A new validated Config with dotted overrides applied (used for search-space samples)."""
    tree = cfg.to_dict()
    for key, value in overrides.items():
        field_type(key)
        set_dotted(tree, key, value)
    return config_from_dict(tree)


def dump_config(cfg: Config, path: str | Path) -> None:
    """Write a config as YAML that ``load_config`` reads back to the same Config."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))


def describe_fields() -> str:
    """Every config key with its default and help text (for ``uml-ray config``)."""
    lines = []
    for section, cls in _SECTION_TYPES.items():
        for f in dataclasses.fields(cls):
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            choices = f" (one of {f.metadata['choices']})" if f.metadata.get("choices") else ""
            lines.append(f"{section}.{f.name} = {default!r}{choices}: {f.metadata['help']}")
    return "\n".join(lines)
