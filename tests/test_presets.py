"""Presets shipped inside the package, validation of configs built in code, and the installed wheel."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from deepcompressor import validate
from deepcompressor.config import ConfigError, RunConfig, load_config
from deepcompressor.presets import PRESETS_DIR, load_preset, preset_names, preset_path

ROOT = Path(__file__).resolve().parents[1]


def test_presets_are_the_repository_configs():
    names = preset_names()
    assert {"models/infinity-2b", "models/infinity-8b", "svdquant/int4", "edge/memory"} <= set(names)
    assert sorted(names) == sorted(str(p.relative_to(ROOT / "configs").with_suffix(""))
                                   for p in (ROOT / "configs").rglob("*.yaml") if not p.name.startswith("__"))
    assert preset_path("svdquant/int4").read_text() == (ROOT / "configs/svdquant/int4.yaml").read_text()
    assert PRESETS_DIR.resolve() == (ROOT / "configs").resolve()


def test_load_preset_equals_the_file_chain():
    files = [ROOT / "configs/models/infinity-tiny.yaml", ROOT / "configs/svdquant/int4.yaml"]
    assert load_preset("models/infinity-tiny", "svdquant/int4.yaml") == load_config([str(f) for f in files])
    with pytest.raises(ValueError, match="no preset 'svdquant/int5'; presets: ablations/naive"):
        load_preset("svdquant/int5")


def test_validate_checks_a_config_built_in_code():
    cfg = RunConfig()
    assert validate(cfg) == cfg
    cfg.quant.wgts.dtype = "sint5"
    cfg.pipeline.top_p = 2.0
    with pytest.raises(ConfigError) as error:
        validate(cfg)
    text = str(error.value)
    assert "quant.wgts.dtype" in text and "sint5" in text
    with pytest.raises(TypeError):
        validate({"quant": {}})


def test_installed_wheel_has_the_api_and_the_presets(tmp_path):
    """Build the wheel, install it into a folder and import it from outside the repository."""
    wheels = tmp_path / "wheels"
    subprocess.run([sys.executable, "-m", "pip", "wheel", str(ROOT), "--no-deps", "--no-build-isolation", "-q",
                    "-w", str(wheels)], check=True, cwd=tmp_path, capture_output=True)
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(target),
                    *map(str, wheels.glob("*.whl"))], check=True, capture_output=True)
    code = ("import deepcompressor, infinity; from deepcompressor import quantize, load_quantized; "
            "from deepcompressor.presets import load_preset; "
            "print(deepcompressor.__file__); print(load_preset('models/infinity-tiny', 'svdquant/int4').quant.wgts.dtype)")
    env = {**os.environ, "PYTHONPATH": str(target)}
    out = subprocess.run([sys.executable, "-c", code], check=True, cwd=tmp_path, env=env, capture_output=True,
                         text=True).stdout.split()
    assert out[0].startswith(str(target)) and out[1] == "sint4"
