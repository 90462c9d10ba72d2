"""Search spaces: YAML files of distributions over config fields, checked before anything launches.

A space file::

    recipe: supervised            # which regime it is for (supervised | sequence)
    metric: selection_score       # optional; what the search maximises (or best_val_acc, val_acc)
    seed_policy: fixed            # fixed: every trial uses train.seed; per_trial: a seed derived per trial
    searcher: tpe                 # tpe (default) | random | grid (every combination of the choices, once)
    seeds: [0, 1, 2]              # grid only, optional: the whole grid once per train.seed
    params:
      train.lr: {type: loguniform, low: 1.0e-4, high: 1.0e-2}
      train.alpha.text: {type: uniform, low: 0.0, high: 1.5}
      train.batch_size: {type: int, low: 16, high: 64}
      model.head_init: {type: choice, values: [random, text]}

Every key must name a real config field (``train.alpha.<modality>`` names an auxiliary modality);
ranges and choices are checked against the field's type and bounds.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from uml_ray.config import Config, apply_overrides, field_type, read_yaml
from uml_ray.errors import ConfigError

DISTRIBUTIONS = ("loguniform", "uniform", "int", "choice")
SEED_POLICIES = ("fixed", "per_trial")
SEARCHERS = ("tpe", "random", "grid")
# selection_score (the default): best val accuracy, ties broken by the lower val loss, in one number
# (uml_ray.selection); best_val_acc ranks by accuracy alone; val_acc is the latest validation's
METRICS = ("selection_score", "best_val_acc", "val_acc")


@dataclass
class Param:
    """One searched config field and its distribution."""

    key: str
    type: str
    low: float | int | None = None
    high: float | int | None = None
    log: bool = False
    values: list = field(default_factory=list)


@dataclass
class SearchSpace:
    """A validated search space."""

    params: list[Param]
    recipe: str = "supervised"
    metric: str = "selection_score"
    seed_policy: str = "fixed"
    source: str = "space"
    searcher: str = "tpe"
    seeds: list[int] = field(default_factory=list)

    def keys(self) -> list[str]:
        """The searched dotted config keys."""
        return [p.key for p in self.params]

    def size(self) -> int | None:
        """Distinct configs in the space when every param is a choice (times the grid's seeds), else None."""
        if any(p.type != "choice" for p in self.params):
            return None
        count = max(len(self.seeds), 1)
        for p in self.params:
            count *= len(p.values)
        return count


def _number(where: str, value, kind: type):
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"{where}: expected a number, got {value!r}")
    if kind is int and not float(value).is_integer():
        raise ConfigError(f"{where}: the field is an integer; got {value!r}")
    return kind(value) if kind is int else float(value)


def parse_param(key: str, spec: Any, source: str) -> Param:
    """One distribution entry, checked against its config field's type."""
    where = f"{source}: params.{key}"
    try:
        kind = field_type(key)
    except ConfigError as exc:
        raise ConfigError(f"{where}: {exc}") from None
    if not isinstance(spec, dict):
        raise ConfigError(f"{where}: must be a mapping like {{type: uniform, low: 0, high: 1}}")
    unknown = set(spec) - {"type", "low", "high", "log", "values"}
    if unknown:
        raise ConfigError(
            f"{where}: unknown field(s) {sorted(unknown)}; allowed: type, low, high, log, values"
        )
    dist = spec.get("type")
    if dist not in DISTRIBUTIONS:
        raise ConfigError(f"{where}: type {dist!r} is not one of {list(DISTRIBUTIONS)}")
    if dist == "choice":
        values = spec.get("values")
        if not isinstance(values, list) or not values:
            raise ConfigError(f"{where}: a choice needs a non-empty list 'values'")
        return Param(key, dist, values=list(values))
    if "low" not in spec or "high" not in spec:
        raise ConfigError(f"{where}: a {dist} distribution needs 'low' and 'high'")
    if kind not in (int, float):
        raise ConfigError(f"{where}: '{key}' is a {kind.__name__} field; use type: choice with its values")
    if dist == "int" and kind is not int:
        raise ConfigError(
            f"{where}: type int needs an integer field; '{key}' is a float (use uniform/loguniform)"
        )
    number = int if dist == "int" else float
    low, high = _number(f"{where}.low", spec["low"], number), _number(f"{where}.high", spec["high"], number)
    if low > high:
        raise ConfigError(f"{where}: low={low} is greater than high={high}; swap them")
    log = dist == "loguniform" or bool(spec.get("log", False))
    if log and low <= 0:
        raise ConfigError(
            f"{where}: a log range must be strictly positive, got low={low}; "
            f"use a low > 0 (e.g. {high / 1000:g}) or type uniform"
        )
    if dist != "int" and low == high:
        raise ConfigError(f"{where}: low == high == {low} is not a range; use a fixed config value instead")
    if not (math.isfinite(low) and math.isfinite(high)):
        raise ConfigError(f"{where}: bounds must be finite")
    return Param(key, dist, low=low, high=high, log=log)


def load_space(path: str) -> SearchSpace:
    """Read and validate a search-space YAML (structure and types; ``check_space`` adds config bounds)."""
    raw = read_yaml(path)
    if not isinstance(raw, dict):
        raise ConfigError(
            f"{path}: a search space is a mapping with 'params' (and optional recipe, metric, seed_policy)"
        )
    unknown = set(raw) - {"recipe", "metric", "seed_policy", "params", "searcher", "seeds"}
    if unknown:
        raise ConfigError(
            f"{path}: unknown field(s) {sorted(unknown)}; "
            "allowed: recipe, metric, seed_policy, searcher, seeds, params"
        )
    params = raw.get("params")
    if not isinstance(params, dict) or not params:
        raise ConfigError(f"{path}: 'params' must be a non-empty mapping of config keys to distributions")
    recipe = raw.get("recipe", "supervised")
    if recipe not in ("supervised", "sequence"):
        raise ConfigError(f"{path}: recipe {recipe!r} is not one of ['supervised', 'sequence']")
    metric = raw.get("metric", "selection_score")
    if metric not in METRICS:
        raise ConfigError(f"{path}: metric {metric!r} is not one of {list(METRICS)}")
    seed_policy = raw.get("seed_policy", "fixed")
    if seed_policy not in SEED_POLICIES:
        raise ConfigError(f"{path}: seed_policy {seed_policy!r} is not one of {list(SEED_POLICIES)}")
    searcher = raw.get("searcher", "tpe")
    if searcher not in SEARCHERS:
        raise ConfigError(f"{path}: searcher {searcher!r} is not one of {list(SEARCHERS)}")
    seeds = raw.get("seeds", [])
    if not isinstance(seeds, list) or not all(
        isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in seeds
    ):
        raise ConfigError(f"{path}: seeds must be a list of integers >= 0, e.g. [0, 1, 2]")
    if seeds and searcher != "grid":
        raise ConfigError(
            f"{path}: seeds repeats a grid per seed; set searcher: grid, or search train.seed as a choice"
        )
    parsed = [parse_param(str(k), v, path) for k, v in params.items()]
    if searcher == "grid":
        ranged = [p.key for p in parsed if p.type != "choice"]
        if ranged:
            raise ConfigError(
                f"{path}: searcher grid needs every param as a choice; {ranged} are ranges "
                "(give them as {type: choice, values: [...]}, or use searcher: tpe / random)"
            )
        if seeds and "train.seed" in [p.key for p in parsed]:
            raise ConfigError(f"{path}: train.seed is both a param and the grid's seeds; keep one")
    return SearchSpace(parsed, recipe, metric, seed_policy, path, searcher, list(seeds))


def check_space(space: SearchSpace, cfg: Config, auxiliary: list[str]) -> None:
    """Check a space against a base config: the recipe, alpha modalities, and every corner of every range.

    Each extreme (low, high, every choice) is applied to the config, so a value the config would
    reject (a negative lr, zdim not divisible by heads, an unknown choice) fails here, before launch.
    """
    if space.recipe != cfg.model.regime:
        raise ConfigError(
            f"{space.source}: recipe '{space.recipe}' does not match model.regime='{cfg.model.regime}'"
        )
    for param in space.params:
        parts = param.key.split(".")
        if parts[:2] == ["train", "alpha"] and parts[2] not in auxiliary:
            raise ConfigError(
                f"{space.source}: params.{param.key}: '{parts[2]}' is not an auxiliary modality; "
                f"choose from {auxiliary}"
            )
        corners = param.values if param.type == "choice" else [param.low, param.high]
        for value in corners:
            try:
                apply_overrides(cfg, {param.key: value})
            except ConfigError as exc:
                raise ConfigError(
                    f"{space.source}: params.{param.key}: value {value!r} is invalid for the config: {exc}"
                ) from None
