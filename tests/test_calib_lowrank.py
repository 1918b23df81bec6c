import pytest
import torch

from deepcompressor.calib.lowrank import calibrate_lowrank, lowrank_factors, randomized_svd, truncated_svd
from deepcompressor.config.schema import LowRankConfig, QuantizerConfig
from deepcompressor.quant import fake_quantize

WCFG = QuantizerConfig(dtype="sint4", group_size=32, symmetric=True, scale_dtype="float16")
ICFG = QuantizerConfig(dtype="sint4", group_size=32, symmetric=True, scale_dtype="float16")


def _smoothed_layer(out=96, n=128, tokens=256, seed=0):
    """A weight with a few heavy columns (what smoothing produces) and inputs with matching small channels."""
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(out, n, generator=gen) / n**0.5
    w[:, :4] *= torch.tensor([12.0, 9.0, 7.0, 5.0])
    w += (torch.randn(out, 3, generator=gen) @ torch.randn(3, n, generator=gen)) / n**0.5
    x = torch.randn(tokens, n, generator=gen)
    x[:, :4] /= 6.0
    return w, x


def test_randomized_svd_matches_full_svd_on_decaying_spectrum():
    gen = torch.Generator().manual_seed(1)
    q1 = torch.linalg.qr(torch.randn(300, 120, generator=gen, dtype=torch.float64)).Q
    q2 = torch.linalg.qr(torch.randn(200, 120, generator=gen, dtype=torch.float64)).Q
    spectrum = torch.logspace(1, -2, 120, dtype=torch.float64)
    a = (q1 * spectrum) @ q2.T
    u, s, v = randomized_svd(a, 16)
    torch.testing.assert_close(s, spectrum[:16], rtol=1e-6, atol=0)
    best = (a - (q1[:, :16] * spectrum[:16]) @ q2[:, :16].T).norm()
    assert (a - (u * s) @ v.T).norm() <= best * (1 + 1e-6)
    torch.testing.assert_close(u.T @ u, torch.eye(16, dtype=torch.float64))


def test_randomized_lowrank_reaches_full_svd_error():
    w, x = _smoothed_layer()
    errors = {}
    for method in ("full", "randomized"):
        cfg = LowRankConfig(enabled=True, rank=8, num_iters=4, svd=method, dtype="bfloat16")
        errors[method] = min(calibrate_lowrank(w, x, WCFG, cfg, icfg=ICFG).errors)
    assert errors["randomized"] <= errors["full"] * 1.02


def test_lowrank_beats_plain_quantization():
    w, x = _smoothed_layer()
    y = x @ w.T
    xq = fake_quantize(x, ICFG)
    plain = float((xq @ fake_quantize(w, WCFG).T - y).square().sum())
    result = calibrate_lowrank(w, x, WCFG, LowRankConfig(enabled=True, rank=8, num_iters=6), icfg=ICFG)
    assert min(result.errors) < 0.8 * plain
    # Weight objective (no inputs): the same holds for the reconstruction error.
    weight_only = calibrate_lowrank(w, None, WCFG, LowRankConfig(enabled=True, rank=8, num_iters=3))
    assert min(weight_only.errors) < float((fake_quantize(w, WCFG) - w).square().sum())


def test_refinement_keeps_best_iterate_and_reports_its_error():
    w, x = _smoothed_layer(seed=2)
    cfg = LowRankConfig(enabled=True, rank=8, num_iters=5, early_stop=False, svd="full", dtype="bfloat16")
    result = calibrate_lowrank(w, x, WCFG, cfg, icfg=ICFG)
    assert len(result.errors) == 5
    assert result.best_iter == min(range(5), key=result.errors.__getitem__)
    assert result.l1.dtype == torch.bfloat16 and result.l1.shape == (96, 8) and result.l2.shape == (8, 128)
    l1, l2 = result.l1.float(), result.l2.float()
    torch.testing.assert_close(result.residual, w - l1 @ l2, rtol=0, atol=0)
    # Recompute the kept iterate's error by hand: the branch reads unquantized inputs, the residual quantized ones.
    y = fake_quantize(x, ICFG) @ fake_quantize(result.residual, WCFG).T + x @ l2.T @ l1.T
    torch.testing.assert_close(float((y - x @ w.T).square().sum()), min(result.errors), rtol=1e-4, atol=0)
    # Early stop ends at the first iteration that does not improve.
    cfg.early_stop = True
    stopped = calibrate_lowrank(w, x, WCFG, cfg, icfg=ICFG)
    n = len(stopped.errors)
    assert all(stopped.errors[i + 1] < stopped.errors[i] for i in range(n - 2))
    assert n == 5 or stopped.errors[-1] >= min(stopped.errors[:-1])


def test_factors_and_validation():
    w, _ = _smoothed_layer()
    l1, l2 = lowrank_factors(w, 4, "full", torch.float16)
    u, s, vh = torch.linalg.svd(w, full_matrices=False)
    torch.testing.assert_close(l1 @ l2, (u[:, :4] * s[:4]) @ vh[:4], rtol=0, atol=5e-3)
    with pytest.raises(ValueError, match="quant.low_rank.rank"):
        truncated_svd(w, 500)
    with pytest.raises(ValueError, match="quant.low_rank.svd"):
        truncated_svd(w, 4, "exact")
    with pytest.raises(ValueError, match="quant.low_rank.dtype"):
        calibrate_lowrank(w, None, WCFG, LowRankConfig(dtype="int8"))
