"""The shipped configuration files (``configs/`` of the repository), importable from an installed package.

    from deepcompressor.presets import load_preset, preset_names
    cfg = load_preset("models/infinity-2b", "svdquant/int4", overrides={"pipeline.random_init": True})

A preset is a YAML file of ``configs/`` named without its suffix; ``load_preset`` stacks them in order (with each
folder's ``__default__.yaml``, as the command line does) and validates the result.
"""

from __future__ import annotations

from pathlib import Path

__all__ = ["PRESETS_DIR", "load_preset", "preset_names", "preset_path"]

PRESETS_DIR = Path(__file__).resolve().parent / "configs"


def preset_names() -> list[str]:
    """Every preset, e.g. ``svdquant/int4`` (folder defaults are not presets of their own)."""
    return sorted(str(p.relative_to(PRESETS_DIR).with_suffix("")) for p in PRESETS_DIR.rglob("*.yaml")
                  if not p.name.startswith("__"))


def preset_path(name: str) -> Path:
    """The YAML file of preset ``name`` (``svdquant/int4`` or ``svdquant/int4.yaml``); ValueError listing the
    presets when there is none."""
    path = PRESETS_DIR / (name if name.endswith(".yaml") else f"{name}.yaml")
    if not path.is_file() or path.name.startswith("__"):
        raise ValueError(f"no preset {name!r}; presets: {', '.join(preset_names())}")
    return path


def load_preset(*names: str, overrides: dict | None = None):
    """The validated ``RunConfig`` of presets ``names`` stacked in order, then ``overrides`` (dotted keys)."""
    from ..config import load_config

    return load_config([str(preset_path(name)) for name in names], overrides)
