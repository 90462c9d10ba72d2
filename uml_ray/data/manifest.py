"""The dataset manifest (docs/data-format.md §2): what a dataset's modalities are and where their shards live.

A manifest (YAML or JSON) names the dataset, its ordered classes, the target modality and, per
modality, its kind, dim, payload layout (vectors), encoder and shard URIs per split. Relative shard
paths are resolved against the manifest's folder; ``s3://`` and ``gs://`` URIs are kept as they are.
The shards' own Arrow payload is ``uml_ray.data.format``'s.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from uml_ray.config import MAX_INPUT_BYTES, decode_text, load_yaml_text
from uml_ray.data.format import DEFAULT_LAYOUT, LAYOUTS, LEGACY_LAYOUT
from uml_ray.errors import ConfigError, DataError
from uml_ray.uri import filesystem_for, is_remote, join_uri

KINDS = ("vector", "sequence", "image")
SPLITS = ("train", "val", "test")
MODALITY_FIELDS = ("kind", "dim", "layout", "encoder", "splits")


@dataclass
class ModalitySpec:
    """One modality of a dataset: what its rows are and where its shards live."""

    kind: str
    dim: int
    encoder: str | None = None
    splits: dict[str, list[str]] = field(default_factory=dict)
    # how a vector modality's features are stored (format.LAYOUTS); sequences and images have one form
    layout: str = DEFAULT_LAYOUT


@dataclass
class Manifest:
    """A dataset: ordered class names, the target modality, and every modality's shards."""

    name: str
    classes: list[str]
    target: str
    modalities: dict[str, ModalitySpec]
    path: str | None = None

    @property
    def auxiliary(self) -> list[str]:
        """Modalities other than the target, in manifest order."""
        return [m for m in self.modalities if m != self.target]

    def uris(self, modality: str, split: str) -> list[str]:
        """Resolved shard URIs of one (modality, split); empty when the split is absent."""
        return self.modalities[modality].splits.get(split, [])

    def to_dict(self, relative_to: str | None = None) -> dict:
        """Plain dict for YAML/JSON; local URIs made relative to ``relative_to`` when given."""

        def rel(uri: str) -> str:
            if relative_to is None or is_remote(uri):
                return uri
            return os.path.relpath(uri, relative_to)

        def entry(spec: ModalitySpec) -> dict:
            # no `layout` means list (every manifest written before the binary layout): writing it only
            # when it is not list keeps those manifests, and their datasets' fingerprints, as they were
            layout = {"layout": spec.layout} if spec.kind == "vector" and spec.layout != LEGACY_LAYOUT else {}
            return {
                "kind": spec.kind,
                "dim": spec.dim,
                **layout,
                "encoder": spec.encoder,
                "splits": {split: [rel(u) for u in uris] for split, uris in spec.splits.items()},
            }

        return {
            "name": self.name,
            "classes": list(self.classes),
            "target": self.target,
            "modalities": {name: entry(spec) for name, spec in self.modalities.items()},
        }


def _require(mapping: dict, key: str, where: str, kind: type | tuple):
    if key not in mapping:
        raise DataError(f"{where}: missing field '{key}'")
    value = mapping[key]
    # YAML's true/false are Python bools, and bool is an int: never accept one as a number
    if not isinstance(value, kind) or (
        isinstance(value, bool) and bool not in (kind if isinstance(kind, tuple) else (kind,))
    ):
        names = kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
        raise DataError(f"{where}: field '{key}' must be {names}, got {type(value).__name__} {value!r}")
    return value


def _reject_unknown(mapping: dict, allowed: tuple[str, ...], where: str, fields: str = "field(s)") -> None:
    unknown = set(mapping) - set(allowed)
    if unknown:
        raise DataError(f"{where}: unknown {fields} {sorted(unknown)}; allowed: {', '.join(allowed)}")


def _parse_json(text: str, path: str):
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{path}: not valid JSON ({exc})") from None
    except RecursionError:
        raise ConfigError(f"{path}: JSON nested too deeply; a manifest is a few levels deep") from None


def _layout(spec: dict, kind: str, where: str) -> str:
    """A modality's payload layout: its ``layout`` field, or list where there is none (every manifest
    written before the binary layout existed)."""
    if "layout" not in spec:
        return LEGACY_LAYOUT
    layout = spec["layout"]
    if kind != "vector":
        raise DataError(
            f"{where}.layout: only vector modalities have a layout ({kind} shards have one form); "
            "remove the field"
        )
    if layout not in LAYOUTS:
        raise DataError(f"{where}.layout: {layout!r} is not one of {list(LAYOUTS)}")
    return layout


def load_manifest(path: str | os.PathLike) -> Manifest:
    """Read a manifest file (YAML or JSON) and resolve its shard paths.

    Raises DataError naming the file and field for anything structurally wrong; the shard
    contents are checked by ``uml_ray.data.validate``.
    """
    path = str(path)
    # at most MAX_INPUT_BYTES + 1 bytes are read: a huge file is refused without reading it whole
    if is_remote(path):
        filesystem, inner = filesystem_for(path)
        try:
            with filesystem.open_input_stream(inner) as handle:
                data = handle.read(MAX_INPUT_BYTES + 1)
        except OSError as exc:
            raise DataError(f"{path}: cannot read manifest ({exc})") from None
        base = path.rsplit("/", 1)[0]
    else:
        try:
            with open(path, "rb") as handle:
                data = handle.read(MAX_INPUT_BYTES + 1)
        except OSError as exc:
            raise DataError(f"{path}: cannot read manifest ({exc.strerror}); check the path") from None
        base = str(Path(path).resolve().parent)
    try:
        text = decode_text(data, path)
        raw = _parse_json(text, path) if path.endswith(".json") else load_yaml_text(text, path)
    except ConfigError as exc:
        raise DataError(str(exc)) from None
    if not isinstance(raw, dict):
        raise DataError(f"{path}: a manifest is a mapping with name, classes, target, modalities")
    _reject_unknown(raw, ("name", "classes", "target", "modalities"), path, "manifest field(s)")
    name = str(raw.get("name", Path(path).stem))
    classes = _require(raw, "classes", path, list)
    if not classes or len(set(map(str, classes))) != len(classes):
        raise DataError(f"{path}: 'classes' must be a non-empty list of distinct names")
    target = _require(raw, "target", path, str)
    raw_modalities = _require(raw, "modalities", path, dict)
    if target not in raw_modalities:
        raise DataError(f"{path}: target '{target}' is not one of the modalities {sorted(raw_modalities)}")
    modalities = {}
    for mod_name, spec in raw_modalities.items():
        where = f"{path}: modalities.{mod_name}"
        if not isinstance(spec, dict):
            raise DataError(f"{where}: must be a mapping with kind, dim, splits")
        _reject_unknown(spec, MODALITY_FIELDS, where)
        kind = _require(spec, "kind", where, str)
        if kind not in KINDS:
            raise DataError(f"{where}.kind: '{kind}' is not one of {list(KINDS)}")
        dim = _require(spec, "dim", where, int)
        if dim <= 0:
            raise DataError(f"{where}.dim: must be a positive integer, got {dim}")
        if kind == "image" and dim not in (1, 3):
            raise DataError(
                f"{where}.dim: an image modality's dim is its channel count, 1 (grayscale) or 3 (RGB); "
                f"got {dim}"
            )
        layout = _layout(spec, kind, where)
        splits = _require(spec, "splits", where, dict)
        resolved = {}
        for split, uris in splits.items():
            if split not in SPLITS:
                raise DataError(f"{where}.splits: unknown split '{split}'; allowed: {list(SPLITS)}")
            if isinstance(uris, str):
                uris = [uris]
            if not isinstance(uris, list):
                raise DataError(f"{where}.splits.{split}: must be a list of shard paths")
            resolved[split] = [
                u if is_remote(u) or os.path.isabs(u) else join_uri(base, u) for u in map(str, uris)
            ]
        modalities[mod_name] = ModalitySpec(
            kind=kind, dim=dim, encoder=spec.get("encoder"), splits=resolved, layout=layout
        )
    return Manifest(
        name=name, classes=[str(c) for c in classes], target=target, modalities=modalities, path=path
    )


def write_manifest(manifest: Manifest, path: str | os.PathLike) -> str:
    """Write a manifest as YAML (or JSON for a ``.json`` path) with paths relative to its folder."""
    path = str(path)
    base = None if is_remote(path) else str(Path(path).resolve().parent)
    payload = manifest.to_dict(relative_to=base)
    text = (
        json.dumps(payload, indent=2) if path.endswith(".json") else yaml.safe_dump(payload, sort_keys=False)
    )
    if is_remote(path):
        filesystem, inner = filesystem_for(path)
        with filesystem.open_output_stream(inner) as handle:
            handle.write(text.encode())
    else:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(text)
    manifest.path = path
    return path
