"""Reading config YAML files into layers of dotted settings.

Rules (also in the README):
- ``__default__.yaml`` files apply before the files given explicitly: for each given file, the defaults of its
  folder and of every parent folder up to the config root (the nearest enclosing folder named ``configs``; the
  file's own folder when there is none), outermost first. Defaults of all files come first, in order of first
  appearance, then the given files in order, so a given file always beats a default.
- ``__base__: <path or list of paths>`` at the top of a file includes other files (relative to the including
  file) before the file's own settings. It is the only way to share settings between files; included files do
  not pull in their own ``__default__.yaml``.
- Unknown keys, non-mapping sections, duplicate keys and YAML syntax errors are reported with the file and the
  dotted key.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from .errors import ConfigError, ConfigIssue
from .spec import leaf_specs, section_keys, suggest_key

__all__ = ["CONFIG_ROOT_NAME", "INCLUDE_KEY", "Layer", "default_files", "display", "file_layers", "mapping_layer"]

CONFIG_ROOT_NAME = "configs"
DEFAULT_STEM = "__default__"
INCLUDE_KEY = "__base__"
YAML_SUFFIXES = (".yaml", ".yml")


@dataclass
class Layer:
    """Settings from one source, applied in order; a later layer wins key by key."""

    source: str
    values: dict[str, Any]


def display(path: str | Path) -> str:
    """A path as users should read it: relative to the working directory when inside it."""
    relative = os.path.relpath(os.path.abspath(path))
    return str(path) if relative.startswith("..") else relative


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that rejects duplicate keys (PyYAML silently keeps the last one)."""


def _construct_mapping(loader: _StrictLoader, node: yaml.MappingNode, deep: bool = False) -> dict:
    loader.flatten_mapping(node)
    seen = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=True)
        try:
            duplicate = key in seen
        except TypeError:
            raise yaml.constructor.ConstructorError(
                None, None, f"unhashable mapping key {key!r}", key_node.start_mark
            ) from None
        if duplicate:
            raise yaml.constructor.ConstructorError(None, None, f"duplicate key {key!r}", key_node.start_mark)
        seen.add(key)
    return yaml.SafeLoader.construct_mapping(loader, node, deep=deep)


_StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def _read_yaml(path: Path) -> dict[str, Any]:
    shown = display(path)
    if path.suffix not in YAML_SUFFIXES:
        raise ConfigError([ConfigIssue("not a YAML config file (expected .yaml or .yml)", source=shown)])
    if not path.is_file():
        reason = "is a folder, not a config file" if path.is_dir() else "config file not found"
        raise ConfigError([ConfigIssue(reason, source=shown)])
    try:
        with open(path, encoding="utf-8") as stream:
            data = yaml.load(stream, Loader=_StrictLoader)  # a SafeLoader subclass
    except yaml.YAMLError as error:
        raise ConfigError([ConfigIssue(f"invalid YAML: {error}", source=shown)]) from None
    except (OSError, UnicodeDecodeError) as error:
        raise ConfigError([ConfigIssue(f"cannot read: {error}", source=shown)]) from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(
            [ConfigIssue(f"the top level must be a mapping of sections, got {type(data).__name__}", source=shown)]
        )
    return data


def mapping_layer(mapping: dict[str, Any], source: str, prefix: str = "", dotted: bool = False) -> Layer:
    """Flatten a nested mapping into dotted keys, rejecting unknown keys (with a suggestion).

    With ``dotted``, keys may themselves be dotted paths (``{"quant.wgts.dtype": "sint4"}``), as in overrides.
    """
    leaves, sections = leaf_specs(), section_keys()
    values: dict[str, Any] = {}
    issues: list[ConfigIssue] = []

    def visit(node: dict, prefix: str) -> None:
        for name, value in node.items():
            if not isinstance(name, str):
                issues.append(
                    ConfigIssue(
                        f"invalid key {name!r}: keys must be names", key=prefix.rstrip(".") or None, source=source
                    )
                )
                continue
            key = f"{prefix}{name}"
            if "." in name and not dotted:
                issues.append(
                    ConfigIssue(
                        "dotted keys are for the command line; nest the sections in YAML", key=key, source=source
                    )
                )
                continue
            if key in sections:
                if value is None:  # a section whose keys are all commented out
                    continue
                if not isinstance(value, dict):
                    issues.append(
                        ConfigIssue(
                            f"is a section: expected a mapping of its keys, got {value!r}", key=key, source=source
                        )
                    )
                    continue
                visit(value, f"{key}.")
            elif key in leaves:
                values[key] = value
            else:
                hint = suggest_key(key)
                issues.append(
                    ConfigIssue("unknown key" + (f"; did you mean {hint!r}?" if hint else ""), key=key, source=source)
                )

    visit(mapping, prefix)
    if issues:
        raise ConfigError(issues)
    return Layer(source, values)


def _file_with_includes(path: Path, stack: tuple[Path, ...]) -> list[Layer]:
    resolved = path.resolve()
    if resolved in stack:
        cycle = " -> ".join(display(p) for p in (*stack, resolved))
        raise ConfigError([ConfigIssue(f"include cycle: {cycle}", key=INCLUDE_KEY, source=display(stack[-1]))])
    data = _read_yaml(path)
    layers: list[Layer] = []
    if INCLUDE_KEY in data:
        bases = data.pop(INCLUDE_KEY)
        bases = [bases] if isinstance(bases, str) else bases
        if not isinstance(bases, list) or not all(isinstance(base, str) and base for base in bases):
            raise ConfigError(
                [
                    ConfigIssue(
                        "expected a path or a list of paths relative to this file",
                        key=INCLUDE_KEY,
                        source=display(path),
                    )
                ]
            )
        for base in bases:
            base_path = path.parent / base
            if not base_path.is_file():
                raise ConfigError(
                    [
                        ConfigIssue(
                            f"included file not found: {base} ({display(base_path)})",
                            key=INCLUDE_KEY,
                            source=display(path),
                        )
                    ]
                )
            layers += _file_with_includes(base_path, (*stack, resolved))
    layers.append(mapping_layer(data, display(path)))
    return layers


def default_files(path: str | Path) -> list[Path]:
    """The ``__default__.yaml`` files that apply to ``path``, outermost folder first."""
    folder = Path(path).resolve().parent
    chain = [folder, *folder.parents]
    root = next((index for index, parent in enumerate(chain) if parent.name == CONFIG_ROOT_NAME), 0)
    found = []
    for parent in reversed(chain[: root + 1]):
        for suffix in YAML_SUFFIXES:
            candidate = parent / f"{DEFAULT_STEM}{suffix}"
            if candidate.is_file():
                found.append(candidate)
                break
    return found


def file_layers(paths: list[str]) -> list[Layer]:
    """Layers of the given files and their defaults, in application order. Reports all file problems at once."""
    issues: list[ConfigIssue] = []
    defaults: list[Path] = []
    for path in paths:
        if Path(path).is_file():
            for default in default_files(path):
                if default not in defaults:
                    defaults.append(default)
    layers: list[Layer] = []
    for path in [*defaults, *(Path(p) for p in paths)]:
        try:
            layers += _file_with_includes(path, ())
        except ConfigError as error:
            issues += error.issues
    if issues:
        raise ConfigError(issues)
    return layers
