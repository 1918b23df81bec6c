"""KV clipping search and baselines against independent float64 / brute-force references."""

import math

import numpy as np
import pytest
import torch

from deepcompressor.calib import kv as kvq
from deepcompressor.calib.kv import (
    asymmetric_qparams,
    bracket_levels,
    channel_mse,
    dequantize_asymmetric,
    effective_bounds,
    fake_quantize_per_token,
    minmax_asymmetric,
    per_group_percentile,
    per_token_asymmetric_mse,
    percentile_levels,
    quantize_asymmetric,
    search_clipping_bounds,
    search_sorted,
    sorted_quantile,
    symmetric_per_channel,
)

INV_PHI = (math.sqrt(5) - 1) / 2


def skewed_samples(num_tokens: int, num_channels: int, seed: int = 0) -> torch.Tensor:
    """Per-channel offsets and scales; lognormal (right-skewed), gaussian, mirrored lognormal and rare outliers."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(num_tokens, num_channels, generator=g)
    kind = torch.arange(num_channels) % 4
    x = torch.where(kind == 0, torch.exp(0.7 * base), torch.where(kind == 1, base, -torch.exp(0.5 * base)))
    x = x * (0.5 + torch.rand(num_channels, generator=g)) + 2 * torch.randn(num_channels, generator=g)
    spikes = (torch.rand(num_tokens, num_channels, generator=g) < 0.003) & (kind == 3)
    return x + 12.0 * spikes


# ------------------------------------------------------------------------------------------------ numpy reference


def np_qparams(lo: float, hi: float, bits: int) -> tuple[float, float]:
    qmax = 2**bits - 1
    scale = max((hi - lo) / qmax, 1e-12, max(abs(lo), abs(hi)) * 2.0**-16)
    return scale, float(np.round(-lo / scale))


def np_mse(x: np.ndarray, scale: float, zero: float, bits: int) -> float:
    q = np.clip(np.round(x / scale) + zero, 0, 2**bits - 1)
    return float(np.mean(((q - zero) * scale - x) ** 2))


def np_anchored(x: np.ndarray, lo: float, hi: float, bits: int) -> float:
    qmax = 2**bits - 1
    scale = max((hi - lo) / qmax, 1e-12)
    return float(np.mean((np.clip(np.round((x - lo) / scale), 0, qmax) * scale + lo - x) ** 2))


def brute_force_channel(x: np.ndarray, bits: int, num_grids: int, dense: int):
    """The search of one channel without golden section: grid, dense scans of hi then lo, integer zero point."""
    ext = bracket_levels(percentile_levels(num_grids))
    his = [np.quantile(x, p) for p in ext]
    los = [np.quantile(x, 1 - p) for p in ext]
    grid = [np_mse(x, *np_qparams(los[g], his[g], bits), bits) for g in range(1, len(ext) - 1)]
    g = int(np.argmin(grid)) + 1
    lo = los[g]
    hi_cands = np.linspace(his[g - 1], his[g + 1], dense)
    hi_vals = np.array([np_anchored(x, lo, h, bits) for h in hi_cands])
    hi = hi_cands[hi_vals.argmin()]
    lo_cands = np.linspace(los[g + 1], los[g - 1], dense)
    lo_vals = np.array([np_anchored(x, v, hi, bits) for v in lo_cands])
    lo_ref = lo_cands[lo_vals.argmin()]
    scale = max((hi - lo_ref) / (2**bits - 1), 1e-12)
    final = min([grid[g - 1]] + [np_mse(x, scale, z, bits) for z in (np.floor(-lo_ref / scale),
                                                                     np.ceil(-lo_ref / scale))])  # fmt: skip
    return {
        "grid_index": g - 1,
        "grid": grid,
        "hi": hi,
        "hi_value": hi_vals.min(),
        "hi_bracket": his[g + 1] - his[g - 1],
        "final": final,
    }


# ------------------------------------------------------------------------------------------------ tests


def test_percentile_grid_and_exact_quantiles_match_numpy():
    assert np.allclose(percentile_levels(5), [0.99, 0.999, 0.9999, 0.99999, 0.999999], rtol=0, atol=1e-15)
    x = torch.randn(7, 1001, dtype=torch.float64) ** 3
    xs = torch.sort(x, dim=1).values
    for level in [0.0, 1e-6, 0.001, 0.01, 0.3, 0.5, 0.99, 0.999999, 1.0]:
        expected = np.quantile(x.numpy(), level, axis=1)
        assert np.allclose(sorted_quantile(xs, level).numpy(), expected, rtol=0, atol=1e-12), level


@pytest.mark.parametrize("bits", [8, 4])
def test_quantizer_round_trip_error_is_at_most_half_a_step_inside_the_bounds(bits):
    x = skewed_samples(4096, 16, seed=1)
    found = search_clipping_bounds(x, bits, num_grids=5, golden_iters=8)
    scale, zero = found.scale, found.zero
    x_hat = dequantize_asymmetric(quantize_asymmetric(x, scale, zero, bits), scale, zero)
    inside = (x >= found.lo) & (x <= found.hi)
    assert inside.float().mean() > 0.95
    err = (x - x_hat).abs()
    assert (err[inside] <= (scale.expand_as(x)[inside] / 2) * (1 + 1e-5) + 1e-6 * x.abs()[inside]).all()
    # The reported bounds are the integer quantizer's range, and recompute to the same scale and zero.
    lo, hi = effective_bounds(scale, zero, bits)
    assert torch.equal(lo, found.lo) and torch.equal(hi, found.hi)
    s2, z2 = asymmetric_qparams(found.lo, found.hi, bits)
    assert torch.allclose(s2, scale, rtol=1e-5) and torch.equal(z2, zero)
    # The reported MSE is the quantizer's MSE on the samples (float64 numpy).
    for c in range(16):
        ref = np_mse(x[:, c].double().numpy(), float(scale[c]), float(zero[c]), bits)
        assert found.mse[c].item() == pytest.approx(ref, rel=1e-4)


def test_degenerate_channels_are_exact():
    x = torch.zeros(64, 3)
    x[:, 1] = 0.37
    x[:, 2] = torch.linspace(-1, 1, 64)
    found = search_clipping_bounds(x, 8, golden_iters=4)
    assert found.mse[0] == 0 and found.mse[1] < 1e-12
    assert torch.isfinite(found.scale).all() and (found.scale > 0).all()


def test_golden_section_engine_matches_dense_scan_on_unimodal_functions():
    g = torch.Generator().manual_seed(3)
    centers = torch.rand(64, generator=g, dtype=torch.float64) * 4 - 2
    powers = 1.0 + torch.rand(64, generator=g, dtype=torch.float64)
    a = torch.full((64,), -3.0, dtype=torch.float64)
    b = torch.full((64,), 3.0, dtype=torch.float64)

    def fn(x):
        return (x - centers).abs() ** powers + 0.1 * torch.sin(centers)

    start_x = a.clone()
    x, f = kvq._golden_section(fn, a, b, 30, start_x, fn(start_x))
    tolerance = 6.0 * INV_PHI**30
    assert ((x - centers).abs() <= tolerance).all()
    assert torch.allclose(f, fn(centers), rtol=0, atol=tolerance)


@pytest.mark.parametrize("bits", [4, 8])
def test_search_matches_brute_force_per_channel(bits):
    num_tokens, num_channels, dense = 2048, 12, 401
    x = skewed_samples(num_tokens, num_channels, seed=bits)
    xs = torch.sort(x.t().contiguous().double(), dim=1).values
    iters = 24
    trace = search_sorted(xs, bits, percentile_levels(5), iters)
    found = search_clipping_bounds(x.double(), bits, 5, iters)
    hits, ratios = 0, []
    for c in range(num_channels):
        data = x[:, c].double().numpy()
        ref = brute_force_channel(data, bits, 5, dense)
        # Grid stage: same MSEs, same choice unless two grid points tie.
        assert trace.grid_mse[c].item() == pytest.approx(min(ref["grid"]), rel=1e-9)
        ranked = sorted(ref["grid"])
        if ranked[1] > ranked[0] * (1 + 1e-9):
            assert int(trace.grid_index[c]) == ref["grid_index"]
        # Never worse than the grid. Against the exhaustive refinement: finite samples make the MSE valley floor
        # ripple (relative noise ~ sqrt(2 / tokens) = 3%), so golden section may settle in a neighbouring ripple.
        assert found.mse[c].item() <= min(ref["grid"]) * (1 + 1e-6)  # float32 result
        ratios.append(found.mse[c].item() / ref["final"])
        assert ratios[-1] <= 1.05
        # First bound (hi, lo fixed at the grid's): within golden section's tolerance of the dense-scan optimum,
        # or an equally good point of a flat valley.
        lo0 = trace.bracket_lo[int(trace.grid_index[c]) + 1, c].item()
        hi = trace.refined_hi[c].item()
        tolerance = ref["hi_bracket"] * (INV_PHI**iters + 2.0 / (dense - 1))
        hits += abs(hi - ref["hi"]) <= tolerance or np_anchored(data, lo0, hi, bits) <= ref["hi_value"] * (1 + 1e-6)
    assert np.mean(ratios) <= 1.01
    assert hits >= 0.75 * num_channels


def test_search_beats_minmax_on_skewed_data_and_chunking_does_not_change_results():
    x = skewed_samples(3000, 20, seed=5)
    for bits in (8, 4):
        ours = search_clipping_bounds(x, bits, golden_iters=10)
        chunked = search_clipping_bounds(x, bits, golden_iters=10, chunk_elems=3000 * 3)
        assert torch.equal(ours.scale, chunked.scale) and torch.equal(ours.zero, chunked.zero)
        base = minmax_asymmetric(x, bits)
        assert (ours.mse <= base.mse * (1 + 1e-6)).all()
        assert ours.mse.mean() < base.mse.mean()


def test_baselines_against_float64_references():
    x = skewed_samples(1024, 8, seed=7)
    x64 = x.double().numpy()
    for bits in (8, 4):
        mm = minmax_asymmetric(x, bits)
        sym = symmetric_per_channel(x, bits)
        half = 2 ** (bits - 1)
        for c in range(8):
            s, z = np_qparams(x64[:, c].min(), x64[:, c].max(), bits)
            assert mm.mse[c].item() == pytest.approx(np_mse(x64[:, c], s, z, bits), rel=1e-4)
            amax = np.abs(x64[:, c]).max()
            ref = np.clip(np.round(x64[:, c] / (amax / (half - 1))), -half, half - 1) * (amax / (half - 1))
            assert sym.mse[c].item() == pytest.approx(np.mean((ref - x64[:, c]) ** 2), rel=1e-4)
        # Per token: min-max asymmetric over each group of 4 channels of each token.
        per_token = per_token_asymmetric_mse(x, bits, group_size=4)
        groups = x64.reshape(1024, 2, 4)
        err = np.zeros_like(groups)
        for t in range(1024):
            for g in range(2):
                s, z = np_qparams(groups[t, g].min(), groups[t, g].max(), bits)
                q = np.clip(np.round(groups[t, g] / s) + z, 0, 2**bits - 1)
                err[t, g] = (q - z) * s - groups[t, g]
        assert np.allclose(per_token.numpy(), (err**2).mean(axis=0).reshape(8), rtol=1e-4, atol=1e-12)
        assert fake_quantize_per_token(x, bits, 4).shape == x.shape
        # One percentile per group of 4 channels: every channel of a group shares one quantizer.
        layer = per_group_percentile(x, bits, group_size=4)
        assert torch.equal(layer.scale[:4], layer.scale[:1].expand(4))
        flat = x64[:, :4].reshape(-1)
        best = min(
            np.mean([np_mse(x64[:, c], *np_qparams(np.quantile(flat, 1 - p), np.quantile(flat, p), bits), bits)
                     for c in range(4)])
            for p in percentile_levels(5)
        )  # fmt: skip
        assert layer.mse[:4].mean().item() == pytest.approx(best, rel=1e-4)


def test_channel_mse_matches_numpy_for_given_quantizer():
    x = skewed_samples(512, 6, seed=9).t().contiguous()
    lo, hi = x.amin(dim=1) * 0.8, x.amax(dim=1) * 0.9
    for bits in (8, 4):
        got = channel_mse(x, lo, hi, bits)
        for c in range(6):
            s, z = np_qparams(lo[c].item(), hi[c].item(), bits)
            assert got[c].item() == pytest.approx(np_mse(x[c].double().numpy(), s, z, bits), rel=1e-4)


def test_bad_inputs_are_refused():
    with pytest.raises(ValueError, match="tokens"):
        search_clipping_bounds(torch.randn(5), 8)
    with pytest.raises(ValueError, match="4- and 8-bit"):
        search_clipping_bounds(torch.randn(10, 2), 3)
    bad = torch.randn(10, 2)
    bad[3, 1] = float("nan")
    with pytest.raises(ValueError, match="non-finite"):
        search_clipping_bounds(bad, 8)
