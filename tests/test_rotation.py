"""Hadamard rotation: the transform against float64 matrices, the rotated layer's invariance, calibration on the
rotated pair, the real path, and a tiny run whose artifacts give the reported fidelity."""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import pytest
import torch

from deepcompressor.calib.layer import calibrate_linear
from deepcompressor.config.schema import QuantConfig
from deepcompressor.nn.fake_linear import FakeQuantLinear
from deepcompressor.quant.hadamard import block_hadamard, hadamard_matrix

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("block", (2, 16, 64))
def test_block_hadamard_is_the_block_diagonal_matrix_product(block):
    x = torch.randn(3, 5, 128, dtype=torch.float64)
    h = hadamard_matrix(block)
    assert torch.allclose(h @ h.T, torch.eye(block, dtype=torch.float64), atol=1e-12)
    rotation = torch.block_diag(*[h] * (128 // block))
    assert torch.allclose(block_hadamard(x, block), x @ rotation, atol=1e-12)
    assert torch.allclose(block_hadamard(block_hadamard(x, block), block), x, atol=1e-12)  # its own inverse
    low = block_hadamard(x.bfloat16(), block)
    assert low.dtype == torch.bfloat16 and torch.allclose(low.double(), x @ rotation, atol=0.1)
    with pytest.raises(ValueError, match="power of two"):
        block_hadamard(x, 24)
    with pytest.raises(ValueError, match="does not divide"):
        block_hadamard(x[..., :96], 64)


def _cfg(rotation: bool):
    cfg = QuantConfig(max_tokens=256)
    cfg.wgts.dtype, cfg.wgts.group_size, cfg.wgts.scale_dtype = "sint4", 16, "float32"
    cfg.ipts.dtype, cfg.ipts.group_size, cfg.ipts.scale_dtype = "sint4", 16, "float32"
    cfg.smooth.enabled, cfg.smooth.num_grids = True, 4
    cfg.low_rank.enabled, cfg.low_rank.rank, cfg.low_rank.svd, cfg.low_rank.num_iters = True, 4, "full", 2
    cfg.rotation.enabled, cfg.rotation.block_size = rotation, 16
    return cfg


def _layer():
    gen = torch.Generator().manual_seed(0)
    channel = torch.ones(64)
    channel[[3, 40]] = torch.tensor([25.0, 10.0])
    return torch.randn(256, 64, generator=gen) * channel, torch.randn(48, 64, generator=gen) / 8


def test_an_unquantized_rotated_layer_is_the_original_layer():
    x, w = _layer()
    layer = FakeQuantLinear(64, 48, weight=w, rotation=16)
    assert torch.allclose(layer(x), x @ w.T, rtol=1e-4, atol=1e-4)


def test_calibration_works_on_the_rotated_pair_and_helps_outlier_channels():
    x, w = _layer()
    rotated = calibrate_linear(w, None, x, _cfg(True))
    by_hand = calibrate_linear(block_hadamard(w, 16), None, block_hadamard(x, 16), _cfg(False))
    assert rotated.rotation == 16 and by_hand.rotation is None
    a, b = rotated.linears[0], by_hand.linears[0]
    assert torch.equal(a.qweight.unpacked_codes(), b.qweight.unpacked_codes())
    assert torch.equal(rotated.smooth_scale, by_hand.smooth_scale) and torch.equal(a.lowrank_l1, b.lowrank_l1)
    assert a.error_final == pytest.approx(b.error_final, rel=1e-5)
    plain = calibrate_linear(w, None, x, _cfg(False))
    assert a.error_rtn == pytest.approx(plain.linears[0].error_rtn)  # the baseline is the plain layer in both
    # the layer built from the result computes what the calibration scored
    fake = FakeQuantLinear.from_linear(torch.nn.Linear(64, 48, bias=False), rotated, _cfg(True), name="l")
    with torch.no_grad():
        fake.weight = None
    y = fake(x)
    assert float((y - x @ w.T).norm() / (x @ w.T).norm()) == pytest.approx(a.error_final, rel=1e-3)


def test_the_real_layer_rotates_like_the_fake_one():
    from deepcompressor.nn.w4a4_linear import W4A4Linear

    gen = torch.Generator().manual_seed(1)
    x = torch.randn(256, 128, generator=gen) * torch.linspace(0.5, 20.0, 128)
    w = torch.randn(48, 128, generator=gen) / 11
    cfg = _cfg(True)  # the W4A4 kernels take groups of 64
    cfg.wgts.group_size = cfg.ipts.group_size = cfg.rotation.block_size = 64
    result = calibrate_linear(w, None, x, cfg)
    fake = FakeQuantLinear.from_linear(torch.nn.Linear(128, 48, bias=False), result, cfg, keep_float_weight=False)
    real = W4A4Linear.from_fake(fake, backend="torch")
    assert real.rotation == 64
    assert torch.allclose(real(x), fake(x), rtol=1e-4, atol=1e-4)


def test_rotation_recipe_writes_artifacts_that_give_the_reported_fidelity(tmp_path):
    from infinity.pipeline import load_pipeline
    from test_methods import CHAIN, SMALL

    from deepcompressor.app.diffusion.artifacts import apply_artifacts, load_artifacts
    from deepcompressor.app.diffusion.capture import CaptureSettings
    from deepcompressor.app.diffusion.fidelity import FidelityReference, evaluate_model
    from deepcompressor.app.diffusion.ptq_infinity import main
    from deepcompressor.config import load_config
    from deepcompressor.utils.files import load_pt

    chain = CHAIN + [str(ROOT / "configs/methods/rotation.yaml")]
    values = {**SMALL, "output.root": str(tmp_path / "runs"), "collect.cache_dir": str(tmp_path / "c")}
    flags = [arg for key, value in values.items() for arg in ("--set", f"{key}={value}")]
    with contextlib.redirect_stdout(io.StringIO()):
        assert main(chain + flags) == 0
    directory = tmp_path / "runs" / "infinity-tiny.qdiff.int4.fast.rotation"
    layers = load_pt(directory / "model.pt")["layers"]
    assert layers and all(entry["meta"]["rotation"] == 64 for entry in layers.values())
    assert all(s["folded_into"] is None for s in load_pt(directory / "smooth.pt")["scales"].values())
    report = json.loads((directory / "fidelity.json").read_text())["model_level"]
    refs = [FidelityReference.from_state(s) for s in load_pt(directory / "state" / "fp_reference.pt")["references"]]
    model = load_pipeline("tiny", device="cpu").transformer
    apply_artifacts(model, load_artifacts(directory))
    measured = evaluate_model(model, refs, CaptureSettings.from_config(load_config(chain, values)))
    assert measured["logit_rel_error"] == pytest.approx(report["logit_rel_error"], rel=1e-6)
