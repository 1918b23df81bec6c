"""Mixed precision: sensitivities against a float64 reference, the choice of layers, and a tiny run end to end."""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import pytest
import torch
from test_quant_reference import ref_fake_quant

from deepcompressor.calib.mixed_precision import (
    choose_layers,
    high_precision_config,
    layer_sensitivity,
    weight_bytes,
)
from deepcompressor.config.schema import QuantConfig

ROOT = Path(__file__).resolve().parents[1]


def _w4a4():
    cfg = QuantConfig()
    cfg.wgts.dtype, cfg.wgts.group_size, cfg.wgts.scale_dtype = "sint4", 16, "float32"
    cfg.ipts.dtype, cfg.ipts.group_size, cfg.ipts.scale_dtype = "sint4", 16, "float32"
    return cfg


def test_sensitivity_is_the_round_to_nearest_error_in_float64():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(64, 32, generator=gen) * torch.linspace(0.5, 8.0, 32)
    w = torch.randn(24, 32, generator=gen) / 6
    bias = torch.randn(24, generator=gen)
    got = layer_sensitivity(w, x, _w4a4(), bias)
    xq, _, _, _ = ref_fake_quant(x.double(), "sint4", 16, True, "float32")
    wq, _, _, _ = ref_fake_quant(w.double(), "sint4", 16, True, "float32")
    ref = x.double() @ w.double().T + bias.double()
    expected = float((xq @ wq.T + bias.double() - ref).norm() / ref.norm())
    assert got == pytest.approx(expected, rel=1e-4)
    # at 8 bits per channel / per token the same layer is far less sensitive
    assert layer_sensitivity(w, x, high_precision_config(_w4a4(), "sint8"), bias) < got / 5
    assert layer_sensitivity(w, x, high_precision_config(_w4a4(), "bf16"), bias) == 0.0


def test_formats_and_bytes():
    cfg = high_precision_config(_w4a4(), "sint8")
    assert (cfg.wgts.dtype, cfg.wgts.group_size, cfg.ipts.dtype, cfg.ipts.group_size) == ("sint8", -1, "sint8", -1)
    assert cfg.smooth == _w4a4().smooth and cfg.low_rank == _w4a4().low_rank
    assert weight_bytes(8, 64, _w4a4().wgts) == 8 * 64 // 2 + 8 * 4 * 4  # codes + a float32 scale per group of 16
    assert weight_bytes(8, 64, cfg.wgts) == 8 * 64 + 8 * 4  # codes + a float32 scale per row
    assert weight_bytes(8, 64, None) == 2 * 8 * 64
    with pytest.raises(ValueError, match="not sint8 or bf16"):
        high_precision_config(_w4a4(), "fp8")


def test_choice_by_count_and_by_budget():
    sensitivity = {"a": 0.3, "b": 0.1, "c": 0.5, "d": 0.3}
    extra = {"a": 40, "b": 10, "c": 100, "d": 20}
    assert choose_layers(sensitivity, extra, 1000, keep=2, max_extra_bytes_ratio=0) == ["c", "a"]
    # 6% of 1000 bytes = 60: c (100) does not fit, a (40) and d (20) do, b would exceed it
    assert choose_layers(sensitivity, extra, 1000, keep=0, max_extra_bytes_ratio=0.06) == ["a", "d"]
    assert choose_layers(sensitivity, extra, 1000, keep=1, max_extra_bytes_ratio=0.2) == ["c"]


def test_mixed_precision_recipe_keeps_the_chosen_layers_in_8_bits(tmp_path):
    from test_methods import CHAIN, SMALL

    from deepcompressor.app.diffusion.artifacts import load_artifacts
    from deepcompressor.app.diffusion.ptq_infinity import main
    from deepcompressor.utils.files import load_pt

    chain = CHAIN + [str(ROOT / "configs/methods/mixed_precision.yaml")]
    values = {**SMALL, "quant.mixed_precision.keep": 3, "quant.mixed_precision.max_extra_bytes_ratio": 0,
              "output.root": str(tmp_path / "runs"), "collect.cache_dir": str(tmp_path / "c")}
    flags = [arg for key, value in values.items() for arg in ("--set", f"{key}={value}")]
    with contextlib.redirect_stdout(io.StringIO()):
        assert main(chain + flags) == 0
    directory = tmp_path / "runs" / "infinity-tiny.qdiff.int4.fast.mixed_precision"
    record = json.loads((directory / "manifest.json").read_text())["calibration"]["mixed_precision"]
    state = json.loads((directory / "state" / "mixed_precision.json").read_text())
    assert record["precision"] == "sint8" and len(record["layers"]) == 3
    ranked = sorted(state["sensitivity"], key=lambda n: (-state["sensitivity"][n], n))
    assert record["layers"] == ranked[:3] and len(state["sensitivity"]) == 6 * 7
    layers = load_pt(directory / "model.pt")["layers"]
    for name, entry in layers.items():
        expected = "sint8" if name in record["layers"] else "sint4"
        assert entry["meta"]["wgts"]["dtype"] == expected, name
    bundle = load_artifacts(directory)
    # the real path converts the 4-bit layers and keeps the 8-bit ones fake-quantized
    from infinity.pipeline import load_pipeline

    from deepcompressor.app.diffusion.artifacts import apply_artifacts
    from deepcompressor.nn.fake_linear import FakeQuantLinear
    from deepcompressor.nn.w4a4_linear import convert_to_w4a4

    model = load_pipeline("tiny", device="cpu").transformer
    apply_artifacts(model, bundle)
    converted = convert_to_w4a4(model, backend="torch")
    assert len(converted) == len(layers) - 3
    assert all(isinstance(model.get_submodule(name), FakeQuantLinear) for name in record["layers"])
