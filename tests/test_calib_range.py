import pytest
import torch
from test_quant_reference import ref_fake_quant

from deepcompressor.calib.range import calibrate_activation_range, clip_ratio_grid, search_weight_range
from deepcompressor.config.schema import QuantizerConfig, RangeCalibConfig
from deepcompressor.quant import fake_quantize


def _data(out=6, n=64, tokens=40, seed=0):
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(out, n, generator=gen, dtype=torch.float64)
    w[:, 3] *= 4
    x = torch.randn(tokens, n, generator=gen, dtype=torch.float64) @ torch.randn(n, n, generator=gen,
                                                                                   dtype=torch.float64) / 8
    return w, x


def _brute_force(w, x, dtype, group_size, symmetric, objective, granularity, grid):
    """Objective of every grid ratio, evaluated group by group with the loop reference (no Hessian algebra)."""
    out, n = w.shape
    k = n if group_size == -1 else group_size
    groups = n // k
    table = torch.zeros(len(grid), out, groups, dtype=torch.float64)
    totals = torch.zeros(len(grid), dtype=torch.float64)
    for i, ratio in enumerate(grid.tolist()):
        clip = torch.full((out, groups), ratio, dtype=torch.float64)
        dq, _, _, _ = ref_fake_quant(w, dtype, group_size, symmetric, "float32", clip=clip)
        d = dq - w
        totals[i] = (x @ d.T).square().sum() if objective == "output" else d.square().sum()
        for o in range(out):
            for g in range(groups):
                cols = slice(g * k, (g + 1) * k)
                if objective == "output":
                    table[i, o, g] = (x[:, cols] @ d[o, cols]).square().sum()
                else:
                    table[i, o, g] = d[o, cols].square().sum()
    return totals if granularity == "layer" else table


@pytest.mark.parametrize("objective", ("weight", "output"))
@pytest.mark.parametrize("granularity", ("layer", "group"))
@pytest.mark.parametrize("group_size,dtype,symmetric", ((16, "sint4", True), (-1, "uint4", False),
                                                        (32, "sint8", False)))
def test_range_search_equals_brute_force(objective, granularity, group_size, dtype, symmetric):
    w, x = _data()
    rcfg = RangeCalibConfig(enabled=True, objective=objective, granularity=granularity, num_grids=8, max_shrink=0.4)
    wcfg = QuantizerConfig(dtype=dtype, group_size=group_size, symmetric=symmetric, scale_dtype="float32")
    result = search_weight_range(w, wcfg, rcfg, x)
    brute = _brute_force(w, x, dtype, group_size, symmetric, objective, granularity, result.grid)
    torch.testing.assert_close(result.errors, brute, rtol=1e-9, atol=1e-12)
    best = brute.min(dim=0).values
    chosen = result.clip_ratio.expand(w.shape[0], brute.shape[-1]) if granularity == "group" else result.clip_ratio
    if granularity == "layer":
        index = int((result.grid - chosen.flatten()[0]).abs().argmin())
        assert brute[index] == best
    else:
        index = (result.grid.view(-1, 1, 1) - chosen.unsqueeze(0)).abs().argmin(dim=0)
        assert torch.equal(brute.gather(0, index.unsqueeze(0))[0], best)
    # The chosen clipping never does worse than the full range on its own objective.
    assert bool((best <= brute[0]).all())


def test_grid_is_descending_from_one_and_validated():
    grid = clip_ratio_grid(RangeCalibConfig(num_grids=5, max_shrink=0.2))
    torch.testing.assert_close(grid, torch.tensor([1.0, 0.95, 0.9, 0.85, 0.8]))
    with pytest.raises(ValueError, match="max_shrink"):
        clip_ratio_grid(RangeCalibConfig(max_shrink=1.0))
    w, _ = _data()
    wcfg = QuantizerConfig(dtype="sint4", group_size=16)
    with pytest.raises(ValueError, match="objective 'output' needs calibration inputs"):
        search_weight_range(w, wcfg, RangeCalibConfig(objective="output"))
    with pytest.raises(ValueError, match="quant.calib_range.objective"):
        search_weight_range(w, wcfg, RangeCalibConfig(objective="mse"))


def test_clip_ratio_feeds_the_quantizer():
    w, x = _data(seed=1)
    wcfg = QuantizerConfig(dtype="sint4", group_size=16, scale_dtype="float32")
    rcfg = RangeCalibConfig(objective="output", granularity="group", num_grids=10, max_shrink=0.5)
    clip = search_weight_range(w, wcfg, rcfg, x).clip_ratio
    plain = (x @ (fake_quantize(w, wcfg) - w).T).square().sum()
    clipped = (x @ (fake_quantize(w, wcfg, clip_ratio=clip) - w).T).square().sum()
    assert clipped < plain


@pytest.mark.parametrize("granularity", ("layer", "group"))
def test_static_activation_range_equals_brute_force(granularity):
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(30, 48, generator=gen, dtype=torch.float64) * torch.linspace(0.1, 3, 48, dtype=torch.float64)
    icfg = QuantizerConfig(dtype="uint8", group_size=16, symmetric=False, scale_dtype="float32")
    rcfg = RangeCalibConfig(granularity=granularity, num_grids=6, max_shrink=0.5)
    scale, zero = calibrate_activation_range(x, icfg, rcfg)
    assert scale.shape == (1, 3) and zero.shape == (1, 3)
    grid = clip_ratio_grid(rcfg).tolist()
    errors = torch.zeros(len(grid), 3, dtype=torch.float64)
    for i, ratio in enumerate(grid):
        for g in range(3):
            values = x[:, g * 16:(g + 1) * 16].reshape(1, -1)  # one group over all tokens
            dq, _, _, _ = ref_fake_quant(values, "uint8", 0, False, "float32", clip=torch.tensor([ratio]))
            errors[i, g] = (dq - values).square().sum()
    if granularity == "layer":
        errors = errors.sum(dim=1, keepdim=True).expand(-1, 3)
    best = errors.argmin(dim=0)
    for g in range(3):
        values = x[:, g * 16:(g + 1) * 16].reshape(1, -1)
        _, _, scales, zeros = ref_fake_quant(values, "uint8", 0, False, "float32",
                                             clip=torch.tensor([grid[int(best[g])]]))
        assert float(scale[0, g]) == scales[0] and float(zero[0, g]) == zeros[0]
    with pytest.raises(ValueError, match="static input quantization needs group_size 0 or k > 0"):
        calibrate_activation_range(x, QuantizerConfig(dtype="sint8", group_size=-1))
