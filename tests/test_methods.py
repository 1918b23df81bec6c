"""Method recipes of ``configs/methods/`` stack last on a chain and run end to end on the tiny model."""

from __future__ import annotations

import contextlib
import io
from pathlib import Path

from deepcompressor.app.diffusion.ptq_infinity import main
from deepcompressor.config import load_config
from deepcompressor.utils.files import load_pt

ROOT = Path(__file__).resolve().parents[1]
CHAIN = [str(ROOT / "configs/models/infinity-tiny.yaml"), str(ROOT / "configs/collect/qdiff.yaml"),
         str(ROOT / "configs/svdquant/int4.yaml"), str(ROOT / "configs/svdquant/fast.yaml")]
SMALL = {"pipeline.device": "cpu", "collect.num_prompts": 2, "quant.max_tokens": 256, "quant.low_rank.rank": 4,
         "quant.low_rank.num_iters": 1, "quant.calib_range.num_grids": 2, "eval.num_prompts": 1}


def test_beta_zero_recipe_runs_and_searches_the_extra_candidates(tmp_path):
    recipe = str(ROOT / "configs/methods/beta_zero.yaml")
    values = dict(SMALL, **{"output.root": str(tmp_path / "runs"), "collect.cache_dir": str(tmp_path / "cache")})
    assert load_config(CHAIN + [recipe]).quant.smooth.beta_zero is True
    flags = [arg for key, value in values.items() for arg in ("--set", f"{key}={value}")]
    with contextlib.redirect_stdout(io.StringIO()):
        assert main(CHAIN + [recipe] + flags) == 0
    directory = tmp_path / "runs" / "infinity-tiny.qdiff.int4.fast.beta_zero"
    assert load_config([str(directory / "config.yaml")]).quant.smooth.beta_zero is True
    scales = load_pt(directory / "smooth.pt")["scales"]
    grid = load_config(CHAIN).quant.smooth.num_grids
    allowed = {(0.0, 0.0)} | {(i / grid, 1 - i / grid) for i in range(grid + 1)} | {(i / grid, 0.0) for i in range(grid)}
    chosen = {(float(e["alpha"]), float(e["beta"])) for e in scales.values()}
    assert chosen and all(any(abs(a - x) < 1e-9 and abs(b - y) < 1e-9 for x, y in allowed) for a, b in chosen)


def test_gps_recipe_runs_without_a_smoothing_search(tmp_path):
    recipe = str(ROOT / "configs/methods/gps.yaml")
    values = dict(SMALL, **{"output.root": str(tmp_path / "runs"), "collect.cache_dir": str(tmp_path / "cache")})
    assert load_config(CHAIN + [recipe]).quant.smooth.strategy == "gps"
    flags = [arg for key, value in values.items() for arg in ("--set", f"{key}={value}")]
    with contextlib.redirect_stdout(io.StringIO()):
        assert main(CHAIN + [recipe] + flags) == 0
    directory = tmp_path / "runs" / "infinity-tiny.qdiff.int4.fast.gps"
    scales = load_pt(directory / "smooth.pt")["scales"]
    assert scales and all(e["gamma"] == 1.0 and e["alpha"] is None for e in scales.values())
    fidelity = __import__("json").loads((directory / "fidelity.json").read_text())
    assert all(row["smooth_gamma"] == 1.0 for row in fidelity["layers"])
    from deepcompressor.app.diffusion.artifacts import load_artifacts

    assert len(load_artifacts(directory).scales) == len(scales)


def test_gps_grid_recipe_runs(tmp_path):
    recipe = str(ROOT / "configs/methods/gps_grid.yaml")
    values = dict(SMALL, **{"output.root": str(tmp_path / "runs"), "collect.cache_dir": str(tmp_path / "cache")})
    flags = [arg for key, value in values.items() for arg in ("--set", f"{key}={value}")]
    with contextlib.redirect_stdout(io.StringIO()):
        assert main(CHAIN + [recipe] + flags) == 0
    scales = load_pt(tmp_path / "runs" / "infinity-tiny.qdiff.int4.fast.gps_grid" / "smooth.pt")["scales"]
    # every layer chose either a grid pair or a GPS power, never both
    assert scales and all((e["gamma"] is None) != (e["alpha"] is None) for e in scales.values())


def test_every_recipe_stacks_on_the_tiny_chain_and_the_ablation_names_them():
    import pytest

    from deepcompressor.bench.ptq_ablation import EXTENDED, method_files

    for recipe in sorted((ROOT / "configs/methods").glob("*.yaml")):
        load_config(CHAIN + [str(recipe)])
    for method in EXTENDED:
        files = method_files(method)
        assert files[0].parent.name == "ablations" and all(f.is_file() for f in files)
    assert [f.name for f in method_files("svdquant+gps")] == ["svdquant.yaml", "gps.yaml"]
    with pytest.raises(ValueError, match="no recipe 'nope'"):
        method_files("svdquant+nope")
    with pytest.raises(ValueError, match="must start with one of"):
        method_files("gps")
