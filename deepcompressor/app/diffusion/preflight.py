"""Checks every app runs before it builds a model: what the config and the file system can tell, one line per
problem, so that a bad input costs no minutes of loading and capturing."""

from __future__ import annotations

import sys
from pathlib import Path

__all__ = ["exit_on_problems", "pipeline_path_problems"]


def pipeline_path_problems(pipeline_cfg) -> list[str]:
    """The checkpoint paths the config gives exist (a file, or the 8B shard / T5 folder)."""
    problems = []
    for key in ("transformer_path", "vae_path", "text_encoder_path"):
        value = getattr(pipeline_cfg, key)
        if value and not Path(value).exists():
            problems.append(f"pipeline.{key}: {value} does not exist")
    return problems


def exit_on_problems(prog: str, problems: list[str]) -> None:
    """Print each problem as ``prog: error: ...`` and exit with code 2 (nothing when there are none)."""
    if problems:
        for line in problems:
            print(f"{prog}: error: {line}", file=sys.stderr)
        raise SystemExit(2)
