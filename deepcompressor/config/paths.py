"""Path handling of the config: ``${ENV_VAR}`` / ``~`` expansion and the run folder of a config chain."""

from __future__ import annotations

import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path

from .schema import RunConfig

__all__ = ["UnsetVariableError", "derive_run_dirname", "expand_path", "run_dir"]

_ENV_REFERENCE = re.compile(r"\$(?:\{([^}]*)\}|([A-Za-z_][A-Za-z0-9_]*))")
_IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


class UnsetVariableError(ValueError):
    """A ``${NAME}`` reference to an environment variable that is not set."""


def expand_path(value: str, environ: Mapping[str, str] | None = None) -> str:
    """Expand ``${NAME}`` / ``$NAME`` and a leading ``~``; ValueError naming the variable if it is unset."""
    environ = os.environ if environ is None else environ

    def substitute(match: re.Match) -> str:
        name = match.group(1) if match.group(1) is not None else match.group(2)
        if not _IDENTIFIER.fullmatch(name):
            raise ValueError(f"malformed environment variable reference {match.group(0)!r}")
        if name not in environ:
            raise UnsetVariableError(f"environment variable {name} is not set (used in {value!r})")
        return environ[name]

    return os.path.expanduser(_ENV_REFERENCE.sub(substitute, value))


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._+-]+", "_", text).strip("._") or "run"


def derive_run_dirname(model_name: str, config_files: Sequence[str]) -> str:
    """``<model name>.<stem>.<stem>...`` from the explicitly given config files.

    A stem equal to the model name is dropped and a ``<model name>-`` prefix is removed, so
    ``infinity-2b-naive.yaml qdiff.yaml int4.yaml`` with model ``infinity-2b`` gives ``infinity-2b.naive.qdiff.int4``.
    """
    parts = [model_name]
    for path in config_files:
        stem = Path(path).stem
        if stem.startswith(f"{model_name}-"):
            stem = stem[len(model_name) + 1 :]
        if stem and stem != model_name and stem not in parts:
            parts.append(stem)
    return ".".join(_slug(part) for part in parts)


def run_dir(cfg: RunConfig, config_files: Sequence[str]) -> Path:
    """``output.root / output.dirname``, the dirname derived from the model and config files when empty."""
    dirname = cfg.output.dirname or derive_run_dirname(cfg.pipeline.name, config_files)
    return Path(cfg.output.root) / dirname
