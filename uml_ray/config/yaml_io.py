"""Reads YAML input within bounds (size, aliases, nesting, unique keys) and writes configs as YAML.

Configs, search spaces and manifests all pass through ``read_yaml`` / ``load_yaml_text``, so a
hostile or broken file is refused here with one line naming the file, before anything uses it.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from uml_ray.errors import ConfigError

if TYPE_CHECKING:
    from uml_ray.config.schema import Config

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
                        f"YAML aliases expand to more than {MAX_YAML_ALIAS_NODES} values (at "
                        f"*{event.anchor}, line {event.start_mark.line + 1}); write the values out instead "
                        "of nesting anchors"
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
        mark = exc.problem_mark
        return f"{exc.problem}{context} at line {mark.line + 1}, column {mark.column + 1}"
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
    """Load a YAML file safely and within bounds (size, aliases), refusing duplicate keys.

    Errors name the file.
    """
    return load_yaml_text(read_text(path), str(path))


def dump_config(cfg: Config, path: str | Path) -> None:
    """Write a config as YAML that ``load_config`` reads back to the same Config."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
