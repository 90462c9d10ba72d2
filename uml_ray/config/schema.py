"""The run config's schema: one typed dataclass per concern, each field with its help, choices and bounds.

Every field carries its help text, allowed choices and bounds in its metadata (``option``), so an
unknown key or an impossible value is rejected with a message naming the key and what is allowed;
``uml_ray.config.checks`` enforces them whenever a ``Config`` is built.
"""

from __future__ import annotations

import copy
import dataclasses
import typing
from dataclasses import dataclass, field
from typing import Any

from uml_ray.config.checks import check_config
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
        "Keep k target train rows per class: a draw seeded by train.seed from the id-sorted rows (nested: "
        "the k rows are among the 2k ones of the same seed); val and test stay whole. -1 keeps all.",
        low=-1,
    )
    aux_class_mean: bool = option(False, "Replace each auxiliary modality by its per-class mean vectors.")
    aux_batch_ratio: float = option(
        1.0, "Auxiliary batch size as a multiple of train.batch_size.", low=0.0, low_open=True
    )
    shuffle_buffer: int = option(4096, "Rows held in each worker's shuffle buffer.", low=1)
    augment_min_scale: float = option(
        0.08,
        "Image targets: smallest area fraction of the train random-resized crop (0.08 = the ImageNet "
        "recipe; 1 = no cropping). The augmentation strength: lower is stronger.",
        low=0.0,
        low_open=True,
        high=1.0,
    )
    augment_flip: bool = option(True, "Image targets: random horizontal flips in training.")
    max_abs_feature: float = option(
        1.0e6,
        "The largest |feature value| the data checks accept (data validate --max-abs): beyond it a row "
        "is a scaling bug or a corrupted page, refused before training.",
        low=0.0,
        low_open=True,
    )
    cache_max_mb: int = option(
        512,
        "Hold a (modality, split) in memory when it fits in this many MB: read once per sweep, shared by "
        "every trial through the object store; larger ones stream (data.stream_reader).",
        low=0,
    )
    stream_reader: str = option(
        "pyarrow",
        "How a multi-worker run streams vector shares over data.cache_max_mb: pyarrow (each worker reads "
        "its own row range of the shards; exact resume) or ray_data (Ray Data's split across workers). "
        "Images and auxiliary shares shaped by aux_per_class/aux_class_mean always go through Ray Data.",
        choices=["pyarrow", "ray_data"],
    )
    stream_cache_max_gb: float = option(
        0.0,
        "Largest share (GB decoded) the decoded stream cache keeps on local disk; a larger one streams "
        "from its shards every epoch. 0 = no cap.",
        low=0.0,
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
        "Give the target its own linear projection (reference); off = its features enter the shared head "
        "directly (aligned spaces, e.g. CLIP).",
    )
    project_auxiliary: bool = option(
        False,
        "Give auxiliary modalities their own linear projection; off = they enter the shared space directly "
        "(reference).",
    )
    head_init: str = option(
        "random",
        "Head initialisation: random; text = L2-normalised auxiliary class means; probe (fine-tuning) = a "
        "linear probe first: projections and head trained train.probe_steps steps on the frozen backbone's "
        "features with the UML loss, then everything fine-tuned (LP-FT).",
        choices=["random", "text", "probe"],
    )
    logit_scale: bool = option(False, "Learnable per-modality logit scale.")
    backbone: str = option(
        "",
        "Fine-tuning regime (target of kind image): the vision backbone trained under the projection and "
        "shared head, as an encoder spec: efficientnet-lite0 (packaged ImageNet weights), "
        "timm:NAME[,pretrained=false][,img_size=PX][,weights=FILE], or "
        "open_clip:NAME[@TAG][,weights=FILE][,pretrained=false][,config=PATH.json][,img_size=PX] (the image "
        "tower of an open_clip model, e.g. open_clip:ViT-B-16@openai). Empty = head-only over features.",
    )
    freeze_blocks: int = option(
        0,
        "Fine-tuning: freeze the backbone's first N parameter groups in forward order (timm's coarse "
        "groups: the stem, then each stage/block; an open_clip ViT: the stem, each transformer block, then "
        "ln_post+proj); 0 trains all of it.",
        low=0,
    )
    image_size: int = option(
        0,
        "Fine-tuning: input size in pixels of the crops fed to the backbone; 0 = the backbone's pretrained "
        "input size.",
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
        "AdamW weight decay (decoupled; few-shot heads tuned fairly may need more than 1, e.g. "
        "7/sqrt(shots)).",
        low=0.0,
        high=100.0,
    )
    batch_size: int = option(32, "Target-modality batch size per worker.", low=1)
    max_steps: int = option(500, "Optimizer steps.", low=1)
    warmup_steps: int = option(20, "Linear warm-up steps before the cosine decay.", low=0)
    val_every: int = option(25, "Validate on the target modality every N steps.", low=1)
    checkpoint_every: int = option(
        4,
        "Write a checkpoint every N validations, and always at the run's end; a retried or resumed run "
        "continues exactly from the last one.",
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
        "Fine-tuning with model.head_init=probe: steps of the linear probe that initialises the head "
        "(backbone frozen, same batches and loss).",
        low=1,
    )
    grad_clip: float = option(0.0, "Clip the gradient norm to this value; 0 = off.", low=0.0)
    backbone_lr_scale: float = option(
        0.1,
        "Fine-tuning: the backbone's learning rate is train.lr times this (projection and head use "
        "train.lr); 0 keeps the backbone fixed.",
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
    select_folds: int = option(
        0,
        "k-fold selection (head-only sweeps): 0 validates on the manifest's val split; k >= 2 pools the "
        "target's train+val rows into k class-stratified folds, trains each config once per fold (side by "
        "side) and scores it on the held-out folds; the chosen config is retrained on the whole pool.",
        low=0,
    )
    select_seed: int = option(0, "Seed of the k-fold split (train.select_folds).", low=0)


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
    transient_retries: int = option(
        3,
        "Retries of a run trained in the trial process after a transient network or object-storage "
        "error (from its last checkpoint; README, Reliability); other errors are not retried.",
        low=0,
        high=100,
    )
    retry_backoff_s: float = option(
        2.0, "Seconds before the first transient retry, doubled for each next one (at most 600).", low=0.0
    )
    torch_threads: int = option(1, "Torch intra-op threads per training process.", low=1)
    decode_cpus: float = option(
        1.0,
        "Fine-tuning: CPUs per Ray Data image decode/augment task; tasks run beside the training workers "
        "(or on CPU-only nodes feeding GPU workers).",
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


SECTION_TYPES = {
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


def field_info(section: str, key: str) -> dataclasses.Field:
    """The dataclass field of ``section.key``; ConfigError naming the allowed keys if there is none."""
    cls = SECTION_TYPES[section]
    for f in dataclasses.fields(cls):
        if f.name == key:
            return f
    allowed = ", ".join(f.name for f in dataclasses.fields(cls))
    raise ConfigError(f"unknown config key '{section}.{key}'; allowed keys in '{section}': {allowed}")


def field_type(dotted: str) -> type:
    """The Python type of a dotted config key (``train.alpha.text`` is a float); ConfigError if unknown."""
    parts = dotted.split(".")
    if parts[0] not in SECTION_TYPES:
        raise ConfigError(
            f"unknown config section '{parts[0]}' in '{dotted}'; allowed sections: {', '.join(SECTION_TYPES)}"
        )
    if len(parts) < 2:
        raise ConfigError(f"'{dotted}' names a section, not a field; use e.g. '{parts[0]}.<field>'")
    f = field_info(parts[0], parts[1])
    kind = typing.get_type_hints(SECTION_TYPES[parts[0]])[f.name]
    if kind is dict and len(parts) == 3:
        return float
    if len(parts) != 2:
        raise ConfigError(f"'{dotted}': '{parts[0]}.{parts[1]}' has no sub-fields")
    return kind
