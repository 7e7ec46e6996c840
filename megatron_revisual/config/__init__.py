"""Typed run configuration: dataclasses (schema), YAML + dotted overrides (loader), checks (validate)."""

from megatron_revisual.config.loader import (
    ConfigError,
    apply_override,
    config_from_dict,
    config_to_dict,
    dump_config,
    load_config,
    read_raw_config,
)
from megatron_revisual.config.schema import (
    ClusterConfig,
    ModelConfig,
    OptimConfig,
    ParallelConfig,
    RunConfig,
    TrainConfig,
    VisionConfig,
)
from megatron_revisual.config.validate import ConfigValidationError, validate_config

__all__ = [
    "ClusterConfig",
    "ConfigError",
    "ConfigValidationError",
    "ModelConfig",
    "OptimConfig",
    "ParallelConfig",
    "RunConfig",
    "TrainConfig",
    "VisionConfig",
    "apply_override",
    "config_from_dict",
    "config_to_dict",
    "dump_config",
    "load_config",
    "read_raw_config",
    "validate_config",
]
