import itertools

import pytest
import torch

from deepcompressor.calib.layer import calibrate_linear
from deepcompressor.config.schema import QuantConfig
from deepcompressor.nn.fake_linear import FakeQuantLinear
from deepcompressor.quant import fake_quantize


def _config(static=False):
    cfg = QuantConfig()
    cfg.wgts.dtype, cfg.wgts.group_size = "sint4", 16
    cfg.ipts.dtype, cfg.ipts.group_size, cfg.ipts.static = "sint4", 16, static
    if static:
        cfg.ipts.dtype, cfg.ipts.symmetric = "uint8", False
    cfg.smooth.enabled, cfg.smooth.num_grids = True, 4
    cfg.low_rank.enabled, cfg.low_rank.rank, cfg.low_rank.num_iters = True, 4, 2
    cfg.calib_range.enabled = False
    return cfg


@pytest.fixture(scope="module")
def calibrated():
    gen = torch.Generator().manual_seed(0)
    linear = torch.nn.Linear(48, 40)
    with torch.no_grad():
        linear.weight.copy_(torch.randn(40, 48, generator=gen) / 7)
        linear.bias.copy_(torch.randn(40, generator=gen))
    channel = torch.ones(48)
    channel[3] = 25.0
    x = torch.randn(128, 48, generator=gen) * channel
    cfg = _config()
    result = calibrate_linear(linear.weight.detach(), linear.bias.detach(), x, cfg)
    return linear, cfg, result, x


def test_everything_off_is_the_float_linear(calibrated):
    linear, cfg, result, x = calibrated
    module = FakeQuantLinear.from_linear(linear, result, cfg)
    module.smooth = module.lowrank = module.quant_weights = module.quant_inputs = False
    assert torch.equal(module(x), linear(x))


def test_everything_on_is_the_manual_composition(calibrated):
    linear, cfg, result, x = calibrated
    module = FakeQuantLinear.from_linear(linear, result, cfg)
    s = result.smooth_scale
    lin = result.linears[0]
    xs = x / s
    l1, l2 = lin.lowrank_l1.float(), lin.lowrank_l2.float()
    manual = fake_quantize(xs, cfg.ipts) @ lin.qweight.dequantize().T + (xs @ l2.T) @ l1.T + linear.bias
    torch.testing.assert_close(module(x), manual, rtol=1e-6, atol=1e-5)
    # The calibrated residual is the smoothed weight minus the branch, quantized.
    torch.testing.assert_close(lin.qweight.dequantize(),
                               fake_quantize(linear.weight.detach() * s - l1 @ l2, cfg.wgts), rtol=0, atol=0)


@pytest.mark.parametrize("smooth,lowrank,quant_weights,quant_inputs", itertools.product((False, True), repeat=4))
def test_every_switch_combination_is_its_manual_composition(calibrated, smooth, lowrank, quant_weights, quant_inputs):
    linear, cfg, result, x = calibrated
    module = FakeQuantLinear.from_linear(linear, result, cfg)
    module.smooth, module.lowrank, module.quant_weights, module.quant_inputs = smooth, lowrank, quant_weights, quant_inputs
    s = result.smooth_scale if smooth else torch.ones(48)
    l1, l2 = result.linears[0].lowrank_l1.float(), result.linears[0].lowrank_l2.float()
    xs = x / s
    w = linear.weight.detach() * s - (l1 @ l2 if lowrank else 0)
    w = fake_quantize(w, cfg.wgts) if quant_weights else w
    xq = fake_quantize(xs, cfg.ipts) if quant_inputs else xs
    manual = xq @ w.T + ((xs @ l2.T) @ l1.T if lowrank else 0) + linear.bias
    torch.testing.assert_close(module(x), manual, rtol=1e-5, atol=1e-4)
    if not quant_weights and not quant_inputs:  # smoothing and the branch alone are exact rewrites
        torch.testing.assert_close(module(x), linear(x), rtol=1e-4, atol=1e-3)


def test_artifact_round_trip_with_packed_codes(calibrated):
    linear, cfg, result, x = calibrated
    module = FakeQuantLinear.from_linear(linear, result, cfg)
    state, meta = module.artifact_state()
    assert state["qweight.codes"].dtype == torch.uint8 and state["qweight.codes"].shape == (40, 24)
    assert "weight" not in state
    back = FakeQuantLinear.from_artifact(state, meta)
    assert torch.equal(back(x), module(x))
    back.quant_weights = False
    with pytest.raises(RuntimeError, match="needs the float weight"):
        back(x)
    with_weight = FakeQuantLinear.from_artifact(state, meta, weight=linear.weight.detach())
    with_weight.smooth = with_weight.lowrank = with_weight.quant_weights = with_weight.quant_inputs = False
    assert torch.equal(with_weight(x), linear(x))
    bad = dict(state)
    bad["smooth_scale"] = state["smooth_scale"][:5]
    with pytest.raises(ValueError, match="fc2: smooth_scale has shape"):
        FakeQuantLinear.from_artifact(bad, meta, name="fc2")


def test_static_inputs_and_uncalibrated_switches():
    gen = torch.Generator().manual_seed(1)
    linear = torch.nn.Linear(32, 8, bias=False)
    x = torch.randn(64, 32, generator=gen)
    cfg = _config(static=True)
    cfg.smooth.enabled = cfg.low_rank.enabled = False
    result = calibrate_linear(linear.weight.detach(), None, x, cfg)
    assert result.input_scale.shape == (1, 2) and result.input_zero.dtype == torch.uint8
    module = FakeQuantLinear.from_linear(linear, result, cfg)
    xq = fake_quantize(x, cfg.ipts, scale=result.input_scale, zero=result.input_zero)
    torch.testing.assert_close(module(x), xq @ result.linears[0].qweight.dequantize().T)
    state, meta = module.artifact_state()
    assert torch.equal(FakeQuantLinear.from_artifact(state, meta)(x), module(x))
    module.lowrank = True
    with pytest.raises(RuntimeError, match="'lowrank' is on but the layer was not calibrated"):
        module(x)


def test_bfloat16_forward_runs_in_the_input_dtype(calibrated):
    linear, cfg, result, x = calibrated
    module = FakeQuantLinear.from_linear(linear, result, cfg)
    y16 = module(x.bfloat16())
    assert y16.dtype == torch.bfloat16
    y = module(x)
    assert float((y16.float() - y).norm() / y.norm()) < 0.05


def test_leading_dimensions_are_tokens(calibrated):
    linear, cfg, result, x = calibrated
    module = FakeQuantLinear.from_linear(linear, result, cfg)
    torch.testing.assert_close(module(x.view(2, 64, 48)), module(x).view(2, 64, 40), rtol=0, atol=0)


def test_calibrated_input_parameters_must_fit_the_input_format():
    from deepcompressor.config.schema import ActivationQuantConfig, WeightQuantConfig

    weight = torch.randn(8, 32)
    static = ActivationQuantConfig(dtype="sint8", group_size=16, static=True)
    scale = torch.ones(1, 2)
    FakeQuantLinear(32, 8, weight=weight, ipts=static, input_scale=scale)  # two groups of 16: fits
    with pytest.raises(ValueError, match="needs 4"):
        FakeQuantLinear(32, 8, weight=weight, ipts=ActivationQuantConfig(dtype="sint8", group_size=8, static=True),
                        input_scale=scale)
    with pytest.raises(ValueError, match="dynamic input quantization"):
        FakeQuantLinear(32, 8, weight=weight, ipts=ActivationQuantConfig(dtype="sint8", group_size=16),
                        input_scale=scale)
    with pytest.raises(ValueError, match="16-bit inputs"):
        FakeQuantLinear(32, 8, weight=weight, wgts=WeightQuantConfig(dtype=None), input_scale=scale)
