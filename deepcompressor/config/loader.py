"""Turn layers of settings (files, then command-line overrides) into one validated ``RunConfig``.

Stages, each reporting all of its problems at once and stopping before the next one:
1. every value of every layer is checked against the schema (type, list element types, choices), naming the
   file or flag that set it, even if a later layer overrides it;
2. layers merge key by key, later wins (lists are replaced, not appended);
3. ``~`` and ``${ENV_VAR}`` expand in the path keys (with ``pipeline.random_init`` an unset variable in a model-file
   path makes it null: random weights read no files);
4. the sections' ``check()`` rules (ranges, required values, cross-field rules) run on the built config.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

from .errors import ConfigError, ConfigIssue
from .files import Layer, file_layers, mapping_layer
from .paths import UnsetVariableError, expand_path
from .schema import PATH_KEYS, RunConfig
from .spec import build_config, check_value, leaf_specs

__all__ = ["OVERRIDES_SOURCE", "RANDOM_INIT_OPTIONAL_PATHS", "load_config", "resolve_layers"]

# Model files that ``pipeline.random_init`` does not need: an unset ``${VAR}`` in them resolves to null.
RANDOM_INIT_OPTIONAL_PATHS = ("pipeline.transformer_path", "pipeline.vae_path", "pipeline.text_encoder_path")

OVERRIDES_SOURCE = "overrides"


def _schema_issues(obj: Any, prefix: str = "") -> list[tuple[str, str]]:
    found = []
    if hasattr(obj, "check"):
        found += [(f"{prefix}{key}", message) for key, message in obj.check()]
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            found += _schema_issues(value, f"{prefix}{f.name}.")
    return found


def resolve_layers(layers: Sequence[Layer]) -> RunConfig:
    """The validated config of layers applied in order. Raises ConfigError."""
    specs = leaf_specs()
    issues: list[ConfigIssue] = []
    merged: dict[str, tuple[Any, str]] = {}
    for layer in layers:
        for key, raw in layer.values.items():
            try:
                merged[key] = (check_value(specs[key], raw), layer.source)
            except ValueError as error:
                issues.append(ConfigIssue(str(error), key=key, source=layer.source))
    if issues:
        raise ConfigError(issues)

    values = {key: value for key, (value, _) in merged.items()}
    sources = {key: source for key, (_, source) in merged.items()}
    random_init = bool(values.get("pipeline.random_init", specs["pipeline.random_init"].default))
    for key in PATH_KEYS:
        value = values.get(key, specs[key].default)
        if isinstance(value, str):
            try:
                values[key] = expand_path(value)
            except UnsetVariableError as error:
                # A model YAML names its weight files through environment variables; with random weights
                # nothing is read, so an unset variable only means "no file" (one flag makes any chain runnable).
                if random_init and key in RANDOM_INIT_OPTIONAL_PATHS:
                    values[key] = None
                else:
                    hint = " (or pass --pipeline-random-init for random weights)" if key in RANDOM_INIT_OPTIONAL_PATHS else ""
                    issues.append(ConfigIssue(f"{error}{hint}", key=key, source=sources.get(key)))
            except ValueError as error:
                issues.append(ConfigIssue(str(error), key=key, source=sources.get(key)))
    if issues:
        raise ConfigError(issues)

    cfg = build_config(values)
    issues = [ConfigIssue(message, key=key, source=sources.get(key)) for key, message in _schema_issues(cfg)]
    if issues:
        raise ConfigError(issues)
    return cfg


def load_config(files: Sequence[str], overrides: dict[str, Any] | None = None) -> RunConfig:
    """The validated config of YAML files (with their ``__default__.yaml``) and optional overrides.

    ``overrides`` maps dotted keys (``{"quant.wgts.dtype": "sint4"}``) or nested sections to values and beats
    every file. Raises ConfigError naming the file and dotted key of every problem.
    """
    layers = file_layers([str(path) for path in files])
    if overrides:
        layers.append(mapping_layer(overrides, OVERRIDES_SOURCE, dotted=True))
    return resolve_layers(layers)
