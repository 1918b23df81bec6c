import pytest
import torch

from deepcompressor.bench.layers import METHODS, _bench_layer, format_table, method_config
from deepcompressor.bench.layers_synthetic import LAYER_SETS, input_statistics, synthetic_inputs
from deepcompressor.calib.layer import calibrate_linear, calibrate_linears, quant_config_for_kind
from deepcompressor.calib.search import subsample_tokens
from deepcompressor.config.schema import QuantConfig
from deepcompressor.quant import fake_quantize


def _outlier_layer(n=64, outs=(48,), tokens=256, seed=0):
    gen = torch.Generator().manual_seed(seed)
    channel = torch.ones(n)
    channel[[1, 9]] = torch.tensor([40.0, 15.0])
    x = torch.randn(tokens, n, generator=gen) * channel
    return x, [torch.randn(o, n, generator=gen) / n**0.5 for o in outs]


def test_svdquant_layer_calibration_improves_on_rtn_and_reports_consistent_errors():
    x, (w,) = _outlier_layer()
    bias = torch.randn(48)
    cfg = method_config("svdquant_gptq", max_tokens=200, rank=4)
    cfg.smooth.num_grids = 5
    cfg.calib_range.enabled = True
    result = calibrate_linear(w, bias, x, cfg, name="blocks.0.ffn.fc2")
    lin = result.linears[0]
    assert result.num_tokens == 200 and result.smooth_scale.shape == (64,)
    assert lin.qweight.shape == (48, 64) and lin.lowrank_l1.shape == (48, 4) and lin.clip_ratio.shape == (48, 1)
    assert lin.error_final < 0.5 * lin.error_rtn
    assert set(result.timings) >= {"smooth", "lowrank", "weights", "errors", "total"}
    # The reported errors are those of the composition on the subsampled calibration tokens.
    xc = subsample_tokens(x, 200)
    y = xc @ w.T + bias
    xs = xc / result.smooth_scale
    l1, l2 = lin.lowrank_l1.float(), lin.lowrank_l2.float()
    yq = fake_quantize(xs, cfg.ipts) @ lin.qweight.dequantize().T + xs @ l2.T @ l1.T + bias
    assert float((yq - y).norm() / y.norm()) == pytest.approx(lin.error_final, rel=1e-4)
    y_rtn = fake_quantize(xc, cfg.ipts) @ fake_quantize(w, cfg.wgts).T + bias
    assert float((y_rtn - y).norm() / y.norm()) == pytest.approx(lin.error_rtn, rel=1e-4)


def test_linears_sharing_an_input_share_one_smoothing_scale():
    x, weights = _outlier_layer(outs=(32, 16, 24))
    cfg = method_config("smoothquant")
    cfg.smooth.num_grids = 4
    result = calibrate_linears(weights, x, cfg)
    assert len(result.linears) == 3 and result.smooth_scale.shape == (64,)
    for w, lin in zip(weights, result.linears):
        torch.testing.assert_close(lin.qweight.dequantize(), fake_quantize(w * result.smooth_scale, cfg.wgts))
        assert lin.error_final < lin.error_rtn


def test_skips_and_bad_inputs():
    cfg = QuantConfig()
    cfg.wgts.dtype, cfg.ipts.dtype = "sint4", "sint4"
    kv = quant_config_for_kind(cfg, "ca_kv")
    assert kv.ipts.dtype is None and kv.wgts.dtype == "sint4" and cfg.ipts.dtype == "sint4"
    assert quant_config_for_kind(cfg, "head").wgts.dtype is None
    assert quant_config_for_kind(cfg, "ffn_up") is cfg
    x, (w,) = _outlier_layer()
    x[3, 3] = float("nan")
    with pytest.raises(ValueError, match="blocks.2.sa.proj: calibration inputs contain NaN"):
        calibrate_linear(w, None, x, cfg, name="blocks.2.sa.proj")
    with pytest.raises(ValueError, match=r"blocks.2.sa.proj\[1\]: weight \(8, 5\)"):
        calibrate_linears([w, torch.zeros(8, 5)], x, cfg, name="blocks.2.sa.proj")


def test_synthetic_inputs_have_the_measured_outliers():
    down = LAYER_SETS["tiny"][1]
    stats = input_statistics(synthetic_inputs(down, 2048, seed=0))
    assert 150 < stats["absmax_over_median"] < 800 and stats["kurtosis"] > 100
    assert torch.equal(synthetic_inputs(down, 64, seed=3), synthetic_inputs(down, 64, seed=3))


def test_benchmark_orders_methods_as_expected():
    from tqdm import tqdm

    layer = LAYER_SETS["tiny"][1]  # FFN down projection, the hardest inputs
    with tqdm(disable=True) as progress:
        results = _bench_layer(layer, METHODS, tokens=512, eval_tokens=256, device="cpu", rank=8, progress=progress)
    errors = {m: results[m]["rel_error"] for m in METHODS}
    assert errors["rtn"] > errors["smoothquant"] > errors["svdquant"]
    assert errors["svdquant_gptq"] < 0.95 * errors["svdquant"]  # its Hessian sees 8 x in_features tokens
    assert errors["w4a16"] < errors["rtn"]
    assert all(results[m]["seconds"] > 0 for m in METHODS)
    table = format_table({layer.name: results})
    assert "tiny.ffn_down" in table and "svdquant_gptq" in table


def test_gptq_hessian_defaults_to_all_tokens_and_accepts_an_accumulated_one():
    from deepcompressor.calib.gptq import accumulate_hessian

    x, (w,) = _outlier_layer(tokens=300)
    cfg = method_config("svdquant_gptq", max_tokens=100, rank=4)
    cfg.smooth.num_grids = 3
    default = calibrate_linear(w, None, x, cfg)
    hessian, count = accumulate_hessian(None, 0, x[:120])
    hessian, count = accumulate_hessian(hessian, count, x[120:])
    given = calibrate_linear(w, None, x, cfg, hessian=hessian)
    assert torch.equal(given.linears[0].qweight.codes, default.linears[0].qweight.codes)
    # Only the searches are limited to max_tokens: a Hessian of the 100 search tokens gives other codes.
    sub = subsample_tokens(x, 100)
    few = calibrate_linear(w, None, x, cfg, hessian=accumulate_hessian(None, 0, sub)[0])
    assert not torch.equal(few.linears[0].qweight.codes, default.linears[0].qweight.codes)
    with pytest.raises(ValueError, match="Hessian"):
        calibrate_linear(w, None, x, cfg, hessian=hessian[:5, :5])


# ------------------------------------------------------------------------------------------------ bad values


def _svdquant_cfg(scale_dtype="float16"):
    from deepcompressor.config.schema import ActivationQuantConfig, QuantConfig, WeightQuantConfig

    cfg = QuantConfig(wgts=WeightQuantConfig(dtype="sint4", group_size=64),
                      ipts=ActivationQuantConfig(dtype="sint4", group_size=64, scale_dtype=scale_dtype))
    cfg.smooth.enabled = True
    cfg.low_rank.enabled = True
    cfg.low_rank.rank = 4
    return cfg


def test_non_finite_bias_is_refused_naming_the_layer():
    from deepcompressor.calib.layer import calibrate_linear

    w, x = torch.randn(32, 128), torch.randn(64, 128)
    with pytest.raises(ValueError, match=r"blk\.fc\[0\]: bias contains NaN or Inf"):
        calibrate_linear(w, torch.full((32,), float("nan")), x, _svdquant_cfg(), name="blk.fc")


def test_inputs_beyond_the_scale_dtype_fail_clearly_or_calibrate_with_float32_scales():
    from deepcompressor.calib.layer import calibrate_linear

    gen = torch.Generator().manual_seed(0)
    w, x = torch.randn(32, 128, generator=gen), torch.randn(64, 128, generator=gen) * 1e30
    with pytest.raises(ValueError, match=r"blk\.fc: calibration inputs: values up to .* float16 .* scale_dtype"):
        calibrate_linear(w, None, x, _svdquant_cfg(), name="blk.fc")
    result = calibrate_linear(w, None, x, _svdquant_cfg("float32"), name="blk.fc")
    errors = (result.linears[0].error_rtn, result.linears[0].error_final)
    assert all(0.0 < e < 1.0 for e in errors), errors  # finite: no overflow in the error of 1e31-sized outputs
