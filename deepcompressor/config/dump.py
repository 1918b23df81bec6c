"""Writing a resolved config: as a dict, as YAML text, or atomically to a file."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any

from omniconfig import dump_yaml

from ..utils.files import write_text
from .schema import RunConfig

__all__ = ["config_to_dict", "config_to_yaml", "save_config"]


def config_to_dict(cfg: RunConfig) -> dict[str, Any]:
    """Nested plain dict (sections in schema order); loading it back gives an equal config."""
    return dataclasses.asdict(cfg)


def config_to_yaml(cfg: RunConfig) -> str:
    return dump_yaml(config_to_dict(cfg))


def save_config(cfg: RunConfig, path: str | os.PathLike) -> Path:
    """Write the config as YAML atomically (temp file in the same folder, then rename); returns the path."""
    return write_text(path, config_to_yaml(cfg))
