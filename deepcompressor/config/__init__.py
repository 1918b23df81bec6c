"""Configuration of every app: one dataclass schema, YAML chains, command-line flags.

    from deepcompressor.config import parse_cli
    cfg, args = parse_cli("ptq_infinity", add_arguments=lambda parser: parser.add_argument("--out"))
"""

from .cli import flag_of, parse_cli
from .dump import config_to_dict, config_to_yaml, save_config
from .errors import ConfigError, ConfigIssue
from .loader import load_config
from .paths import derive_run_dirname, expand_path, run_dir
from .schema import (
    INT_DTYPES,
    KV_DTYPES,
    LAYER_KINDS,
    PATH_KEYS,
    ActivationQuantConfig,
    CollectConfig,
    EvalConfig,
    GPTQConfig,
    KVCacheConfig,
    LowRankConfig,
    MemoryConfig,
    MixedPrecisionConfig,
    OutputConfig,
    PipelineConfig,
    QuantConfig,
    QuantizerConfig,
    RangeCalibConfig,
    RotationConfig,
    RunConfig,
    SmoothConfig,
    WeightQuantConfig,
)

__all__ = [
    "INT_DTYPES",
    "KV_DTYPES",
    "LAYER_KINDS",
    "PATH_KEYS",
    "ActivationQuantConfig",
    "CollectConfig",
    "ConfigError",
    "ConfigIssue",
    "EvalConfig",
    "GPTQConfig",
    "KVCacheConfig",
    "LowRankConfig",
    "MemoryConfig",
    "MixedPrecisionConfig",
    "OutputConfig",
    "PipelineConfig",
    "QuantConfig",
    "QuantizerConfig",
    "RangeCalibConfig",
    "RotationConfig",
    "RunConfig",
    "SmoothConfig",
    "WeightQuantConfig",
    "config_to_dict",
    "config_to_yaml",
    "derive_run_dirname",
    "expand_path",
    "flag_of",
    "load_config",
    "parse_cli",
    "run_dir",
    "save_config",
]
