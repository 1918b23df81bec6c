"""Diagnostics statistics against NumPy/SciPy on known distributions, and streaming == one-shot."""

import math

import numpy as np
import pytest
import scipy.stats
import torch

from evaluation import stats


def _gen(seed: int) -> np.random.Generator:
    return np.random.default_rng(seed)


def _distributions(n: int = 3000, c: int = 16) -> dict[str, np.ndarray]:
    """Token x channel matrices: symmetric light/heavy tails, skewed mixtures, injected outlier channels."""
    rng = _gen(0)
    gaussian = rng.normal(0.5, 2.0, size=(n, c))
    laplace = rng.laplace(-1.0, 0.7, size=(n, c))
    # Per-column mixtures: lognormal bulk with an exponential component of varying weight, some columns negated.
    weights = np.linspace(0.05, 0.6, c)
    pick = rng.random((n, c)) < weights
    mixture = np.where(pick, rng.exponential(3.0, size=(n, c)) + 2.0, rng.lognormal(0.0, 0.8, size=(n, c)))
    mixture[:, ::3] *= -1
    outliers = rng.normal(0.0, 1.0, size=(n, c))
    outliers[:, [2, 11]] *= 80.0
    return {"gaussian": gaussian, "laplace": laplace, "mixture": mixture, "outlier_channels": outliers}


DISTRIBUTIONS = _distributions()


# ---------------------------------------------------------------------------------------------------------------
# One-shot statistics against NumPy / SciPy


@pytest.mark.parametrize("n", [1, 2, 7, 10])
def test_median_matches_numpy_odd_even_and_dims(n):
    x = _gen(n).normal(size=(n, 5))
    t = torch.from_numpy(x)
    assert stats.median(t).item() == pytest.approx(np.median(x), rel=0, abs=1e-15)
    np.testing.assert_allclose(stats.median(t, dim=0).numpy(), np.median(x, axis=0), rtol=0, atol=1e-15)
    np.testing.assert_allclose(stats.median(t, dim=1).numpy(), np.median(x, axis=1), rtol=0, atol=1e-15)


def test_median_of_bfloat16_is_exact_on_its_values():
    t = torch.randn(33, 4).to(torch.bfloat16)
    ref = np.median(t.float().numpy(), axis=0)
    np.testing.assert_allclose(stats.median(t, dim=0).numpy(), ref, rtol=0, atol=0)


@pytest.mark.parametrize("name", sorted(DISTRIBUTIONS))
def test_abs_max_to_median_matches_numpy(name):
    x = DISTRIBUTIONS[name]
    ref = np.abs(x).max() / np.median(np.abs(x))
    assert stats.abs_max_to_median(torch.from_numpy(x)) == pytest.approx(ref, rel=1e-12)


def test_abs_max_to_median_grows_with_an_injected_outlier_channel():
    base = torch.from_numpy(DISTRIBUTIONS["gaussian"] - 0.5)
    spiked = base.clone()
    spiked[:, 3] *= 100
    assert stats.abs_max_to_median(spiked) > 20 * stats.abs_max_to_median(base)


def test_abs_max_to_median_zero_median_is_inf():
    x = torch.zeros(10, 3)
    x[0, 0] = 1.0
    assert math.isinf(stats.abs_max_to_median(x))


@pytest.mark.parametrize("name", sorted(DISTRIBUTIONS))
def test_excess_kurtosis_matches_scipy(name):
    x = DISTRIBUTIONS[name]
    ref = scipy.stats.kurtosis(x.ravel(), fisher=True, bias=True)
    assert stats.excess_kurtosis(torch.from_numpy(x)) == pytest.approx(ref, rel=1e-10, abs=1e-12)


def test_excess_kurtosis_of_known_distributions():
    # Population values: Gaussian 0, Laplace 3, uniform -1.2 (sample of 2e5: a few standard errors).
    rng = _gen(5)
    assert stats.excess_kurtosis(torch.from_numpy(rng.normal(size=200_000))) == pytest.approx(0.0, abs=0.05)
    assert stats.excess_kurtosis(torch.from_numpy(rng.laplace(size=200_000))) == pytest.approx(3.0, abs=0.25)
    assert stats.excess_kurtosis(torch.from_numpy(rng.uniform(size=200_000))) == pytest.approx(-1.2, abs=0.02)


def test_excess_kurtosis_is_stable_with_a_large_offset():
    x = _gen(6).laplace(size=50_000) + 1e7
    ref = scipy.stats.kurtosis(x, bias=True)
    assert stats.excess_kurtosis(torch.from_numpy(x)) == pytest.approx(ref, rel=1e-6)


def test_excess_kurtosis_of_constant_input_is_nan():
    assert math.isnan(stats.excess_kurtosis(torch.full((100,), 3.0)))


@pytest.mark.parametrize("name", sorted(DISTRIBUTIONS))
def test_channel_abs_max_to_median_matches_numpy(name):
    x = DISTRIBUTIONS[name]
    ref = np.abs(x).max(axis=0) / np.median(np.abs(x), axis=0)
    np.testing.assert_allclose(stats.channel_abs_max_to_median(torch.from_numpy(x)).numpy(), ref, rtol=1e-12)


def test_channel_abs_max_to_median_finds_the_injected_channel():
    x = torch.from_numpy(DISTRIBUTIONS["gaussian"] - 0.5)
    x[17, 9] = 500.0
    assert int(torch.argmax(stats.channel_abs_max_to_median(x))) == 9


@pytest.mark.parametrize("name", sorted(DISTRIBUTIONS))
def test_dynamic_ranges_and_cv_match_numpy(name):
    x = DISTRIBUTIONS[name]
    t = torch.from_numpy(x)
    r_chan = x.max(axis=0) - x.min(axis=0)
    r_tok = x.max(axis=1) - x.min(axis=1)
    np.testing.assert_allclose(stats.channel_dynamic_range(t).numpy(), r_chan, rtol=0, atol=0)
    np.testing.assert_allclose(stats.token_dynamic_range(t).numpy(), r_tok, rtol=0, atol=0)
    cv_chan, cv_tok = stats.dynamic_range_cv(t)
    assert cv_chan == pytest.approx(scipy.stats.variation(r_chan), rel=1e-12)
    assert cv_tok == pytest.approx(scipy.stats.variation(r_tok), rel=1e-12)


def _channel_driven(n=4000, c=64, seed=7):
    rng = _gen(seed)
    return rng.normal(size=(n, c)) * rng.lognormal(0.0, 1.0, size=(1, c)) + rng.normal(0, 3, size=(1, c))


def _token_driven(n=4000, c=64, seed=8):
    rng = _gen(seed)
    return rng.normal(size=(n, c)) * rng.lognormal(0.0, 1.0, size=(n, 1))


def test_cv_chan_exceeds_cv_tok_on_channel_driven_data():
    cv_chan, cv_tok = stats.dynamic_range_cv(torch.from_numpy(_channel_driven()))
    assert cv_chan > 2 * cv_tok


def test_cv_tok_exceeds_cv_chan_on_token_driven_data():
    cv_chan, cv_tok = stats.dynamic_range_cv(torch.from_numpy(_token_driven()))
    assert cv_tok > 2 * cv_chan


@pytest.mark.parametrize("name", sorted(DISTRIBUTIONS))
def test_channel_skewness_matches_scipy(name):
    x = DISTRIBUTIONS[name]
    ref = scipy.stats.skew(x, axis=0, bias=True)
    np.testing.assert_allclose(stats.channel_skewness(torch.from_numpy(x)).numpy(), ref, rtol=1e-10, atol=1e-12)
    mean_abs, max_abs = stats.skewness_summary(stats.channel_skewness(torch.from_numpy(x)))
    assert mean_abs == pytest.approx(np.abs(ref).mean(), rel=1e-10)
    assert max_abs == pytest.approx(np.abs(ref).max(), rel=1e-10)


def test_channel_skewness_of_known_distributions():
    # Population skewness: exponential 2, lognormal(0, 0.5) (e^s2 + 2) sqrt(e^s2 - 1) ~ 1.75, Gaussian 0.
    rng = _gen(9)
    n = 400_000
    x = np.stack([rng.exponential(size=n), -rng.exponential(size=n), rng.lognormal(0, 0.5, size=n), rng.normal(size=n)])
    gamma = stats.channel_skewness(torch.from_numpy(x.T)).numpy()
    lognormal = (math.exp(0.25) + 2) * math.sqrt(math.exp(0.25) - 1)
    np.testing.assert_allclose(gamma, [2.0, -2.0, lognormal, 0.0], atol=0.1)


def test_constant_channels_have_nan_skewness_and_are_left_out_of_the_summary():
    x = torch.from_numpy(DISTRIBUTIONS["mixture"][:, :4].copy())
    x[:, 1] = 2.5
    gamma = stats.channel_skewness(x)
    assert torch.isnan(gamma[1]) and not torch.isnan(gamma[[0, 2, 3]]).any()
    ref = np.abs(scipy.stats.skew(x.numpy()[:, [0, 2, 3]], axis=0))
    mean_abs, max_abs = stats.skewness_summary(gamma)
    assert mean_abs == pytest.approx(ref.mean(), rel=1e-10) and max_abs == pytest.approx(ref.max(), rel=1e-10)


def test_kv_token_matrix_layout():
    kv = torch.randn(2, 3, 5, 4)
    m = stats.kv_token_matrix(kv)
    assert m.shape == (10, 12)
    for b, h, ell, j in [(0, 0, 0, 0), (1, 2, 4, 3), (1, 0, 2, 1), (0, 1, 3, 2)]:
        assert m[b * 5 + ell, h * 4 + j] == kv[b, h, ell, j]
    with pytest.raises(ValueError, match="K/V"):
        stats.kv_token_matrix(torch.randn(3, 4))


# ---------------------------------------------------------------------------------------------------------------
# Streaming == one-shot


def _random_splits(x: torch.Tensor, seed: int) -> list[torch.Tensor]:
    rng = _gen(seed)
    cuts = np.sort(rng.choice(np.arange(1, x.shape[0]), size=min(9, x.shape[0] - 1), replace=False))
    return list(torch.tensor_split(x, torch.from_numpy(cuts)))


@pytest.mark.parametrize("name", sorted(DISTRIBUTIONS))
def test_streaming_moments_equal_one_shot(name):
    x = torch.from_numpy(DISTRIBUTIONS[name])
    scalar = stats.CentralMoments(order=4, per_channel=False)
    per_channel = stats.CentralMoments(order=4, per_channel=True)
    for chunk in _random_splits(x, 1):
        scalar.update(chunk)
        per_channel.update(chunk)
    xn = x.numpy()
    assert scalar.n == xn.size
    assert scalar.excess_kurtosis().item() == pytest.approx(scipy.stats.kurtosis(xn.ravel()), rel=1e-10)
    assert scalar.variance().item() == pytest.approx(xn.var(), rel=1e-12)
    np.testing.assert_allclose(per_channel.mean.numpy(), xn.mean(axis=0), rtol=1e-12)
    np.testing.assert_allclose(per_channel.variance().numpy(), xn.var(axis=0), rtol=1e-11)
    np.testing.assert_allclose(per_channel.skewness().numpy(), scipy.stats.skew(xn, axis=0), rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(per_channel.excess_kurtosis().numpy(), scipy.stats.kurtosis(xn, axis=0), rtol=1e-9)


def test_streaming_moments_are_stable_with_uneven_batches_and_large_offset():
    rng = _gen(11)
    x = np.concatenate([rng.lognormal(0, 1, size=7), rng.lognormal(0, 1, size=20_000)]) + 1e6
    m = stats.CentralMoments(order=4)
    m.update(torch.from_numpy(x[:7]))
    m.update(torch.from_numpy(x[7:]))
    assert m.skewness().item() == pytest.approx(scipy.stats.skew(x), rel=1e-6)
    assert m.excess_kurtosis().item() == pytest.approx(scipy.stats.kurtosis(x), rel=1e-6)


def test_streaming_moments_reject_a_channel_mismatch_and_missing_orders():
    m = stats.CentralMoments(order=3, per_channel=True)
    m.update(torch.randn(4, 3))
    with pytest.raises(ValueError, match="channels"):
        m.update(torch.randn(4, 5))
    with pytest.raises(ValueError, match="order"):
        m.excess_kurtosis()
    with pytest.raises(ValueError, match="no data"):
        stats.CentralMoments().variance()


@pytest.mark.parametrize("budget", [1, 37, 500, 5000])
def test_reservoir_equals_one_shot_sample_for_any_split(budget):
    x = torch.arange(3000 * 2, dtype=torch.float32).reshape(3000, 2)
    expected = stats.select_token_sample(3000, budget, seed=3)
    for split_seed in (0, 1):
        res = stats.TokenReservoir(budget, seed=3)
        for chunk in _random_splits(x, split_seed):
            res.update(chunk)
        assert torch.equal(res.indices, expected)
        assert torch.equal(res.rows, x[expected])
    assert res.rows.shape[0] == min(budget, 3000)


def test_reservoir_with_many_small_batches_grows_and_evicts_correctly():
    x = torch.randn(3000, 3)
    expected = stats.select_token_sample(3000, 100, seed=9)
    res = stats.TokenReservoir(100, seed=9)
    for chunk in x.split(7):
        res.update(chunk)
    assert torch.equal(res.indices, expected) and torch.equal(res.rows, x[expected])
    assert res.num_rows == 100 and res.unordered_rows.shape == (100, 3)
    assert torch.equal(
        res.unordered_rows[torch.argsort(res.unordered_rows[:, 0])], x[expected][torch.argsort(x[expected][:, 0])]
    )


def test_reservoir_sample_is_uniform_and_seeded():
    n, budget = 100_000, 4000
    idx = stats.select_token_sample(n, budget, seed=0).numpy()
    assert len(np.unique(idx)) == budget
    counts = np.histogram(idx, bins=10, range=(0, n))[0]
    # Chi-square test of uniform coverage over ten equal parts of the stream.
    assert scipy.stats.chisquare(counts).pvalue > 1e-3
    other = stats.select_token_sample(n, budget, seed=1).numpy()
    assert len(np.intersect1d(idx, other)) < budget // 5
    assert np.array_equal(idx, stats.select_token_sample(n, budget, seed=0).numpy())


def test_reservoir_keeps_the_arrival_dtype():
    res = stats.TokenReservoir(10)
    res.update(torch.randn(30, 4).to(torch.bfloat16))
    assert res.rows.dtype == torch.bfloat16 and res.rows.shape == (10, 4)


@pytest.mark.parametrize("name", sorted(DISTRIBUTIONS))
def test_activation_accumulator_equals_one_shot_when_everything_fits(name):
    x = torch.from_numpy(DISTRIBUTIONS[name])
    acc = stats.ActivationAccumulator(token_budget=x.shape[0], seed=0, name="blk.fc2")
    for chunk in _random_splits(x, 2):
        acc.update(chunk.reshape(1, -1, x.shape[1]))  # [B, L, C] like a linear input
    r = acc.result()
    assert (r.num_tokens, r.num_sampled, r.channels) == (x.shape[0], x.shape[0], x.shape[1])
    assert r.max_to_median == pytest.approx(stats.abs_max_to_median(x), rel=1e-12)
    assert r.kurtosis == pytest.approx(scipy.stats.kurtosis(x.numpy().ravel()), rel=1e-10)
    per_channel = stats.channel_abs_max_to_median(x)
    np.testing.assert_allclose(r.channel_max_to_median.numpy(), per_channel.numpy(), rtol=1e-12)
    assert r.channel_max_to_median_max == pytest.approx(per_channel.max().item(), rel=1e-12)
    assert r.worst_channel == int(torch.argmax(per_channel))
    np.testing.assert_allclose(r.channel_abs_max.numpy(), np.abs(x.numpy()).max(axis=0), rtol=0)


def test_activation_accumulator_with_sampling_uses_full_max_and_sampled_median():
    x = torch.from_numpy(DISTRIBUTIONS["outlier_channels"])
    acc = stats.ActivationAccumulator(token_budget=500, seed=4)
    for chunk in _random_splits(x, 3):
        acc.update(chunk)
    r = acc.result()
    sample = x[stats.select_token_sample(x.shape[0], 500, seed=4)].numpy()
    assert (r.num_tokens, r.num_sampled) == (x.shape[0], 500)
    assert r.abs_max == np.abs(x.numpy()).max()
    assert r.abs_median == pytest.approx(np.median(np.abs(sample)), rel=1e-12)
    ref_channel = np.abs(x.numpy()).max(axis=0) / np.median(np.abs(sample), axis=0)
    np.testing.assert_allclose(r.channel_max_to_median.numpy(), ref_channel, rtol=1e-12)
    assert r.worst_channel == int(np.argmax(ref_channel))
    # The sampled median is a close estimate of the full one.
    assert r.abs_median == pytest.approx(np.median(np.abs(x.numpy())), rel=0.05)


def test_activation_accumulator_bfloat16_and_errors():
    x = torch.randn(64, 8).to(torch.bfloat16)
    acc = stats.ActivationAccumulator(token_budget=1000, name="block_chunks.0.module.1.ffn.fc2")
    acc.update(x)
    r = acc.result()
    xf = x.float().numpy()
    assert r.max_to_median == pytest.approx(np.abs(xf).max() / np.median(np.abs(xf)), rel=1e-12)
    with pytest.raises(ValueError, match="ffn.fc2.*9 channels"):
        acc.update(torch.randn(3, 9))
    with pytest.raises(TypeError, match="floating"):
        acc.update(torch.ones(3, 8, dtype=torch.int64))
    with pytest.raises(ValueError, match="no data"):
        stats.ActivationAccumulator(10, name="x").result()


def test_kv_accumulator_equals_one_shot_over_scales():
    # K of one layer as the sampler caches it: [B, H, L_scale, c] per scale, streamed scale after scale.
    rng = _gen(12)
    scales = [1, 4, 16, 36, 64]
    b, h, c = 2, 3, 8
    channel_scale = rng.lognormal(0, 1, size=(1, h, 1, c))
    parts = [torch.from_numpy(rng.exponential(size=(b, h, n, c)) * channel_scale - 0.3) for n in scales]
    acc = stats.KVAccumulator(name="k")
    for part in parts:
        acc.update(stats.kv_token_matrix(part))
    r = acc.result()
    full = torch.cat([stats.kv_token_matrix(p) for p in parts])
    cv_chan, cv_tok = stats.dynamic_range_cv(full)
    assert (r.num_tokens, r.channels) == (b * sum(scales), h * c)
    assert r.cv_chan == pytest.approx(cv_chan, rel=1e-12)
    assert r.cv_tok == pytest.approx(cv_tok, rel=1e-10)
    gamma = scipy.stats.skew(full.numpy(), axis=0)
    np.testing.assert_allclose(r.channel_skewness.numpy(), gamma, rtol=1e-9)
    assert r.mean_abs_skew == pytest.approx(np.abs(gamma).mean(), rel=1e-9)
    assert r.max_abs_skew == pytest.approx(np.abs(gamma).max(), rel=1e-9)
    assert r.worst_skew_channel == int(np.argmax(np.abs(gamma)))
    assert r.num_constant_channels == 0
    assert r.cv_chan > r.cv_tok  # the per-channel scales drive the ranges


def test_kv_accumulator_token_driven_and_errors():
    acc = stats.KVAccumulator(name="block 3 V")
    x = torch.from_numpy(_token_driven(n=2000, c=32))
    for chunk in _random_splits(x, 5):
        acc.update(chunk)
    r = acc.result()
    assert r.cv_tok > r.cv_chan
    with pytest.raises(ValueError, match="block 3 V"):
        acc.update(torch.randn(4, 31))
    with pytest.raises(ValueError, match="no data"):
        stats.KVAccumulator().result()


def test_activation_accumulator_leaves_zero_median_channels_out_of_the_highest_ratio():
    x = torch.from_numpy(DISTRIBUTIONS["laplace"].copy())
    x[: x.shape[0] // 2 + 10, 4] = 0.0  # mostly exactly zero (GELU underflow in bfloat16)
    x[:, 6] = 0.0  # dead channel: 0 / 0
    acc = stats.ActivationAccumulator(token_budget=x.shape[0])
    acc.update(x)
    r = acc.result()
    a = np.abs(x.numpy())
    with np.errstate(divide="ignore", invalid="ignore"):
        ref = a.max(axis=0) / np.median(a, axis=0)
    assert r.num_zero_median_channels == 2
    assert math.isinf(r.channel_max_to_median[4]) and math.isnan(r.channel_max_to_median[6])
    finite = np.isfinite(ref)
    assert r.channel_max_to_median_max == pytest.approx(ref[finite].max(), rel=1e-12)
    assert r.worst_channel == int(np.nanargmax(np.where(finite, ref, -np.inf)))
