"""Synthetic PTQ artifacts (for loading / latency / memory benchmarks of random-weight models) are real artifacts:
``load_artifacts`` validates them and they convert into the same W4A4 layers ``synthesize_w4a4`` builds."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from deepcompressor.config import load_config

ROOT = Path(__file__).resolve().parents[1]
TINY = [str(ROOT / "configs/models/infinity-tiny.yaml"), str(ROOT / "configs/svdquant/int4.yaml")]


def test_synthetic_artifacts_load_and_match_the_synthesized_model(tmp_path):
    from infinity.pipeline import pipeline_from_config

    from deepcompressor.app.diffusion.artifacts import apply_artifacts, load_artifacts
    from deepcompressor.app.diffusion.synthetic_artifacts import write_synthetic_artifacts
    from deepcompressor.nn.w4a4_linear import convert_to_w4a4, synthesize_w4a4, w4a4_layers

    cfg = load_config(TINY, {"pipeline.device": "cpu", "quant.low_rank.rank": 8})
    write_synthetic_artifacts(cfg, tmp_path / "art")
    bundle = load_artifacts(tmp_path / "art", expected_config=cfg)
    assert json.loads((tmp_path / "art/manifest.json").read_text())["synthetic"] is True
    assert len(bundle.layers) == 42 and len(bundle.branches) == 42

    from_files = pipeline_from_config(cfg.pipeline).transformer
    apply_artifacts(from_files, bundle)
    names = convert_to_w4a4(from_files, backend="torch")
    synthesized = pipeline_from_config(cfg.pipeline).transformer
    assert synthesize_w4a4(synthesized, cfg.quant, seed=cfg.pipeline.seed, backend="torch") == names
    # Same seeded construction in the same order: the layers are equal buffer for buffer.
    for name, layer in w4a4_layers(from_files).items():
        other = w4a4_layers(synthesized)[name]
        for key, tensor in layer.state_dict().items():
            assert torch.equal(tensor, other.state_dict()[key]), f"{name}.{key}"
