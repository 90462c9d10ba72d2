"""Typed, validated run configs: one dataclass per concern, loaded from YAML with dotted overrides.

``schema`` holds the dataclasses and each field's help, choices and bounds; ``checks`` enforces them
and the cross-field rules; ``yaml_io`` reads YAML within bounds; ``overrides`` builds a Config from a
YAML tree and ``section.key=value`` overrides. Importers use the names re-exported here.
"""

from uml_ray.config.checks import check_config, check_modalities
from uml_ray.config.overrides import (
    apply_overrides,
    config_from_dict,
    load_config,
    parse_overrides,
    set_dotted,
)
from uml_ray.config.schema import (
    Config,
    DataConfig,
    ModelConfig,
    ResourcesConfig,
    TrackingConfig,
    TrainConfig,
    field_type,
    flatten,
    option,
)
from uml_ray.config.yaml_io import (
    MAX_INPUT_BYTES,
    MAX_YAML_ALIAS_NODES,
    MAX_YAML_ALIASES,
    decode_text,
    dump_config,
    load_yaml_text,
    read_text,
    read_yaml,
)

__all__ = [
    "MAX_INPUT_BYTES",
    "MAX_YAML_ALIASES",
    "MAX_YAML_ALIAS_NODES",
    "Config",
    "DataConfig",
    "ModelConfig",
    "ResourcesConfig",
    "TrackingConfig",
    "TrainConfig",
    "apply_overrides",
    "check_config",
    "check_modalities",
    "config_from_dict",
    "decode_text",
    "dump_config",
    "field_type",
    "flatten",
    "load_config",
    "load_yaml_text",
    "option",
    "parse_overrides",
    "read_text",
    "read_yaml",
    "set_dotted",
]
