"""Builds a validated Config from a YAML tree and dotted overrides (``train.lr=3e-4``).

``load_config`` reads a file and applies command-line overrides; ``apply_overrides`` does the same
to an existing Config (a search-space sample). Every key is checked against the schema first.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

from uml_ray.config.schema import SECTION_TYPES, Config, field_info, field_type
from uml_ray.config.yaml_io import load_yaml_text, read_yaml
from uml_ray.errors import ConfigError


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
        raise ConfigError(f"{where}a config is a mapping of sections {', '.join(SECTION_TYPES)}")
    sections = {}
    for section, body in tree.items():
        if section not in SECTION_TYPES:
            raise ConfigError(
                f"{where}unknown config section '{section}'; allowed sections: {', '.join(SECTION_TYPES)}"
            )
        if body is None:
            body = {}
        if not isinstance(body, dict):
            raise ConfigError(f"{where}section '{section}' must be a mapping")
        for key in body:
            try:
                field_info(section, key)
            except ConfigError as exc:
                raise ConfigError(f"{where}{exc}") from None
        sections[section] = SECTION_TYPES[section](**body)
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
