import pytest
import torch
from test_quant_reference import ref_fake_quant

from deepcompressor.calib.smooth import (
    fold_smooth_into_linear,
    fold_smooth_into_norm,
    search_smooth_scale,
    smooth_candidates,
)
from deepcompressor.config.schema import QuantConfig


def _config(num_grids=4, search_beta=False, low_rank=False, ipts=True):
    cfg = QuantConfig()
    cfg.wgts.dtype, cfg.wgts.group_size, cfg.wgts.scale_dtype = "sint4", 16, "float32"
    if ipts:
        cfg.ipts.dtype, cfg.ipts.group_size, cfg.ipts.scale_dtype = "sint4", 16, "float32"
    cfg.smooth.enabled, cfg.smooth.num_grids, cfg.smooth.search_beta = True, num_grids, search_beta
    cfg.low_rank.enabled, cfg.low_rank.rank, cfg.low_rank.svd, cfg.low_rank.dtype = low_rank, 4, "full", "float16"
    return cfg


def _layer(seed=0, tokens=64, n=48, outs=(32,)):
    gen = torch.Generator().manual_seed(seed)
    channel = torch.ones(n)
    channel[[2, 17]] = torch.tensor([30.0, 12.0])
    x = torch.randn(tokens, n, generator=gen) * channel
    weights = [torch.randn(o, n, generator=gen) / n**0.5 for o in outs]
    return x, weights


def _brute_force_error(x, weights, cfg, alpha, beta):
    """Squared output error of one candidate, composed by hand in float64 with the loop reference quantizer."""
    x = x.double()
    x_max = x.abs().amax(dim=0).clamp_min(1e-5)
    w_max = torch.stack([w.double().abs().amax(dim=0) for w in weights]).amax(dim=0).clamp_min(1e-5)
    s = x_max**alpha / w_max**beta
    xs = x / s
    xq, _, _, _ = ref_fake_quant(xs, "sint4", 16, True, "float32") if cfg.ipts.dtype else (xs, 0, 0, 0)
    total = 0.0
    for w in weights:
        w = w.double()
        ws = w * s
        branch = 0.0
        if cfg.low_rank.enabled:
            u, sv, vh = torch.linalg.svd(ws, full_matrices=False)
            r = cfg.low_rank.rank
            l1 = (u[:, :r] * sv[:r].sqrt()).to(torch.float16).double()
            l2 = (sv[:r].sqrt().unsqueeze(1) * vh[:r]).to(torch.float16).double()
            ws = ws - l1 @ l2
            branch = xs @ l2.T @ l1.T
        wq, _, _, _ = ref_fake_quant(ws, "sint4", 16, True, "float32")
        total += float((xq @ wq.T + branch - x @ w.T).square().sum())
    return total


@pytest.mark.parametrize("low_rank,ipts", ((False, True), (True, True), (False, False)))
def test_smooth_search_equals_brute_force(low_rank, ipts):
    x, weights = _layer(outs=(32, 24))
    cfg = _config(num_grids=4, low_rank=low_rank, ipts=ipts)
    result = search_smooth_scale(weights, x, cfg)
    assert result.candidates == smooth_candidates(cfg.smooth)
    brute = torch.tensor([_brute_force_error(x, weights, cfg, a, b) for a, b in result.candidates],
                         dtype=torch.float64)
    torch.testing.assert_close(result.errors.double(), brute, rtol=2e-3, atol=0)
    chosen = result.candidates.index((result.alpha, result.beta))
    assert brute[chosen] <= brute.min() * (1 + 2e-3)
    # The outlier channels get the largest scales; no smoothing loses on these inputs.
    assert (result.alpha, result.beta) != (0.0, 0.0)
    assert brute[chosen] < brute[0]
    assert int(result.scale.argmax()) == 2


def test_candidates():
    cfg = _config(num_grids=4)
    assert smooth_candidates(cfg.smooth) == [(0.0, 0.0), (0.0, 1.0), (0.25, 0.75), (0.5, 0.5), (0.75, 0.25),
                                             (1.0, 0.0)]
    cfg.smooth.search_beta = True
    pairs = smooth_candidates(cfg.smooth)
    assert len(pairs) == 25 and (0.0, 0.0) in pairs and (1.0, 1.0) in pairs


def test_scale_is_finite_for_dead_channels():
    x, weights = _layer()
    x[:, 5] = 0
    weights[0][:, 7] = 0
    result = search_smooth_scale(weights, x, _config())
    assert bool(torch.isfinite(result.scale).all()) and bool((result.scale > 0).all())


def test_fold_into_norm_reproduces_divided_output():
    gen = torch.Generator().manual_seed(1)
    norm = torch.nn.LayerNorm(16)
    with torch.no_grad():
        norm.weight.copy_(torch.rand(16, generator=gen) + 0.5)
        norm.bias.copy_(torch.randn(16, generator=gen))
    s = torch.rand(16, generator=gen) + 0.1
    x = torch.randn(5, 16, generator=gen)
    weight, bias = fold_smooth_into_norm(norm.weight, norm.bias, s)
    folded = torch.nn.functional.layer_norm(x, (16,), weight, bias)
    torch.testing.assert_close(folded, norm(x) / s)
    with pytest.raises(ValueError, match="no affine weight"):
        fold_smooth_into_norm(None, None, s)


def test_fold_into_producing_linear_rows():
    gen = torch.Generator().manual_seed(2)
    producer = torch.nn.Linear(8, 24)
    s = torch.rand(8, generator=gen) + 0.1
    x = torch.randn(3, 8, generator=gen)
    rows = slice(16, 24)  # e.g. the value rows of a fused qkv projection
    weight, bias = fold_smooth_into_linear(producer.weight.detach(), producer.bias.detach(), s, rows)
    expected = producer(x).detach()
    expected[:, rows] = expected[:, rows] / s
    torch.testing.assert_close(torch.nn.functional.linear(x, weight, bias), expected)
    with pytest.raises(ValueError, match="selected rows"):
        fold_smooth_into_linear(producer.weight.detach(), None, s, slice(0, 4))


def test_beta_zero_candidates_are_added_and_searched_like_the_others():
    cfg = _config(num_grids=4)
    cfg.smooth.beta_zero = True
    assert smooth_candidates(cfg.smooth) == [(0.0, 0.0), (0.0, 1.0), (0.25, 0.75), (0.5, 0.5), (0.75, 0.25),
                                             (1.0, 0.0), (0.25, 0.0), (0.5, 0.0), (0.75, 0.0)]
    x, weights = _layer(outs=(32, 24))
    result = search_smooth_scale(weights, x, cfg)
    brute = torch.tensor([_brute_force_error(x, weights, cfg, a, b) for a, b in result.candidates],
                         dtype=torch.float64)
    torch.testing.assert_close(result.errors.double(), brute, rtol=2e-3, atol=0)
    without = search_smooth_scale(weights, x, _config(num_grids=4))
    assert float(result.errors.min()) <= float(without.errors.min())  # a superset of the candidates
    cfg.smooth.search_beta = True  # the full grid holds them already
    assert len(smooth_candidates(cfg.smooth)) == 25


# ------------------------------------------------------------------------------------------------ gain-projected


def _gps_reference(x, weights, gamma):
    """The closed form written out in float64, channel by channel."""
    x, weights = x.double(), [w.double() for w in weights]
    logs = []
    for j in range(x.shape[1]):
        energy_x = sum(float(v) ** 2 for v in x[:, j])
        energy_w = sum(float(v) ** 2 for w in weights for v in w[:, j])
        logs.append(gamma / 4 * (torch.tensor(energy_x, dtype=torch.float64).log() - torch.tensor(energy_w, dtype=torch.float64).log()))
    logs = torch.stack(logs)
    return (logs - logs.mean()).exp()


@pytest.mark.parametrize("gamma", (0.5, 1.0, 1.5))
def test_gps_scale_matches_the_closed_form(gamma):
    from deepcompressor.calib.smooth import gps_scale

    x, weights = _layer(outs=(32, 24))
    got = gps_scale(x, weights, gamma)
    assert torch.allclose(got.double(), _gps_reference(x, weights, gamma), rtol=1e-5)
    assert float(got.log().mean()) == pytest.approx(0.0, abs=1e-5)
    # outlier channels (2 and 17) get the largest scales
    assert set(got.topk(2).indices.tolist()) == {2, 17}


def test_a_constant_per_group_does_not_change_group_aligned_quantization():
    """Why the closed form may drop its per-group constant: W4A4 groups of 16 along the inputs on both operands."""
    from deepcompressor.calib.search import quantize_inputs, quantized_linear_output
    from deepcompressor.calib.smooth import gps_scale
    from deepcompressor.quant.functional import fake_quantize

    cfg = _config()
    x, (w,) = _layer()
    s = gps_scale(x, [w])
    outputs = []
    for factor in (torch.ones(48), torch.tensor([2.0] * 16 + [0.5] * 16 + [4.0] * 16)):
        scaled = s * factor
        xq = quantize_inputs(x / scaled, cfg.ipts)
        wq = fake_quantize(w * scaled, cfg.wgts, check=False)
        outputs.append(quantized_linear_output(xq, wq))
    assert torch.allclose(outputs[0], outputs[1], rtol=1e-5, atol=1e-5)


def test_gps_alone_evaluates_no_candidate():
    from deepcompressor.calib.smooth import gps_scale

    cfg = _config()
    cfg.smooth.strategy = "gps"
    x, weights = _layer(outs=(32, 24))
    result = search_smooth_scale(weights, x, cfg)
    assert result.gamma == 1.0 and result.alpha is None and result.errors.numel() == 0
    assert torch.equal(result.scale, gps_scale(x, weights))


def test_gps_plus_grid_scores_the_gps_candidates_like_the_others():
    from deepcompressor.calib.smooth import GPS_EXPONENTS, gps_scale

    cfg = _config(num_grids=4)
    x, weights = _layer(outs=(32,))
    grid_only = search_smooth_scale(weights, x, cfg)
    cfg.smooth.strategy = "gps+grid"
    result = search_smooth_scale(weights, x, cfg)
    assert result.gps_exponents == GPS_EXPONENTS
    assert result.errors.shape == (len(result.candidates) + len(GPS_EXPONENTS),)
    assert torch.allclose(result.errors[: len(result.candidates)], grid_only.errors)
    for k, gamma in enumerate(GPS_EXPONENTS):  # each GPS candidate's error, composed by hand in float64
        s = gps_scale(x, weights, gamma).double()
        xs = x.double() / s
        xq, _, _, _ = ref_fake_quant(xs, "sint4", 16, True, "float32")
        wq, _, _, _ = ref_fake_quant(weights[0].double() * s, "sint4", 16, True, "float32")
        brute = float((xq @ wq.T - x.double() @ weights[0].double().T).square().sum())
        assert float(result.errors[len(result.candidates) + k]) == pytest.approx(brute, rel=1e-3)
    assert float(result.errors.min()) <= float(grid_only.errors.min())
    best = int(result.errors.argmin())
    if best >= len(result.candidates):
        assert result.gamma == GPS_EXPONENTS[best - len(result.candidates)] and result.alpha is None
