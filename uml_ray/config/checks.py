"""Checks a run config: values coerced to their fields' types and bounds, then the cross-field rules.

The rules read each section's field metadata (``uml_ray.config.schema.option``) off the section
objects themselves, so this module needs no import of the schema that calls it on every build.
"""

from __future__ import annotations

import dataclasses
import math
import typing
from typing import TYPE_CHECKING

from uml_ray.errors import ConfigError

MAX_INT = 2**31 - 1  # the largest integer any config field takes

if TYPE_CHECKING:
    from uml_ray.config.schema import Config


def check_config(cfg: Config) -> None:
    """Field-level bounds and choices, then cross-field rules."""
    for section in dataclasses.fields(cfg):
        obj = getattr(cfg, section.name)
        cls = type(obj)
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            value = _coerce(f"{section.name}.{f.name}", getattr(obj, f.name), hints[f.name])
            setattr(obj, f.name, value)
            _check_field(section.name, f, value)
    if cfg.model.regime == "sequence" and cfg.model.zdim % cfg.model.heads:
        raise ConfigError(
            f"model.zdim={cfg.model.zdim} is not divisible by model.heads={cfg.model.heads}; "
            f"pick heads from {[h for h in range(1, cfg.model.zdim + 1) if cfg.model.zdim % h == 0][:8]}"
        )
    if cfg.model.regime == "sequence" and cfg.model.backbone:
        raise ConfigError(
            "model.backbone fine-tunes a vision backbone in the supervised regime; set "
            "model.regime=supervised or model.backbone=''"
        )
    if cfg.model.regime == "sequence" and (cfg.data.aux_per_class > 0 or cfg.data.aux_class_mean):
        raise ConfigError(
            "data.aux_per_class / data.aux_class_mean select vector rows; the sequence regime does not use "
            "them (set -1 / false)"
        )
    if cfg.model.head_init == "probe" and not cfg.model.backbone:
        raise ConfigError(
            "model.head_init=probe trains a linear probe before fine-tuning a backbone; without "
            "model.backbone the run is already a probe: use model.head_init=random or text, or set "
            "model.backbone"
        )
    head_only = cfg.model.regime != "sequence" and not cfg.model.backbone
    if cfg.data.target_per_class > 0 and not head_only:
        raise ConfigError(
            f"data.target_per_class={cfg.data.target_per_class} selects target feature vectors of the "
            "head-only supervised regime; set it to -1 here (draw few-shot splits when building the "
            "dataset instead, e.g. uml-ray case --shots)"
        )
    if cfg.train.select_folds == 1:
        raise ConfigError(
            "train.select_folds=1: use 0 (the manifest's val split) or k >= 2 folds of the train+val pool"
        )
    if cfg.train.select_folds > 1 and not head_only:
        raise ConfigError(
            f"train.select_folds={cfg.train.select_folds} trains k fold models side by side in the fused "
            "head-only supervised regime; the sequence and fine-tuning regimes cannot: set "
            "train.select_folds=0"
        )
    if not cfg.tracking.experiment.strip():
        # MLflow refuses an empty experiment name only when the run starts, after Ray has started
        raise ConfigError(
            "tracking.experiment is empty; name the MLflow experiment (e.g. tracking.experiment=uml-ray)"
        )
    if cfg.train.warmup_steps >= cfg.train.max_steps:
        raise ConfigError(
            f"train.warmup_steps={cfg.train.warmup_steps} must be smaller than "
            f"train.max_steps={cfg.train.max_steps}"
        )
    if 0 < cfg.resources.data_cpus < 1:
        # Ray Data's file-listing task asks for a whole CPU: a fraction reserved for it never fits it
        raise ConfigError(
            f"resources.data_cpus={cfg.resources.data_cpus:g}: Ray Data's file-listing task needs a whole "
            "CPU; set it to 0 (no reservation) or a value >= 1"
        )
    if cfg.resources.trainer == "inline" and cfg.resources.num_workers > 1:
        raise ConfigError(
            "resources.trainer=inline runs one worker; set resources.num_workers=1 or trainer=ray_train"
        )


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
            f"train.step_k={cfg.train.step_k} warms up on the auxiliary modalities alone, but every alpha "
            "is 0; set train.step_k=-1 for the unimodal baseline, or give an auxiliary modality alpha > 0"
        )


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
    """Refuse a value outside its field's choices or bounds (each value of a mapping field is checked)."""
    meta = f.metadata
    dotted = f"{section}.{f.name}"
    if meta.get("choices") is not None and value not in meta["choices"]:
        raise ConfigError(f"{dotted}: {value!r} is not allowed; choose one of {meta['choices']}")
    values = value.values() if isinstance(value, dict) else [value]
    for v in values:
        if not isinstance(v, (int, float)) or isinstance(v, bool):
            continue
        low, high = meta.get("low"), meta.get("high")
        if isinstance(v, int) and high is None:
            # counts, sizes and seeds become int64 tensors, NumPy indices and MLflow params: a value
            # past a 32-bit int is a typo, never a size any run can honour
            high = MAX_INT
        if low is not None and (v < low or (meta.get("low_open") and v == low)):
            bound = f"> {low}" if meta.get("low_open") else f">= {low}"
            raise ConfigError(
                f"{dotted}: {v!r} is out of range; it must be {bound}"
                + (f" and <= {high}" if high is not None else "")
            )
        if high is not None and v > high:
            raise ConfigError(f"{dotted}: {v!r} is out of range; it must be <= {high}")
