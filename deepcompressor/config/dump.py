"""Writing a resolved config: as a dict, as YAML text, or atomically to a file."""

from __future__ import annotations

import dataclasses
import os
import tempfile
from pathlib import Path
from typing import Any

from omniconfig import dump_yaml

from .schema import RunConfig

__all__ = ["config_to_dict", "config_to_yaml", "save_config"]


def config_to_dict(cfg: RunConfig) -> dict[str, Any]:
    """Nested plain dict (sections in schema order); loading it back gives an equal config."""
    return dataclasses.asdict(cfg)


def config_to_yaml(cfg: RunConfig) -> str:
    return dump_yaml(config_to_dict(cfg))


def save_config(cfg: RunConfig, path: str | os.PathLike) -> Path:
    """Write the config as YAML atomically (temp file in the same folder, then rename); returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    text = config_to_yaml(cfg)
    descriptor, temp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(descriptor, "w", encoding="utf-8") as stream:
            stream.write(text)
            stream.flush()
            os.fsync(stream.fileno())
        os.replace(temp_name, path)
    finally:
        if os.path.exists(temp_name):
            os.unlink(temp_name)
    return path
