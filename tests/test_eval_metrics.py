"""Quality metrics with small randomly initialised models: values, skipped reasons, the FID statistics cache."""

from __future__ import annotations

import math
import sys

import numpy as np
import pytest

from evaluation.metrics import METRICS, MetricModels, compute_metrics
from tests.eval_small_models import small_metric_models


def _images(n: int, seed: int, size: int = 48) -> list[np.ndarray]:
    gen = np.random.default_rng(seed)
    return [gen.integers(0, 256, (size, size, 3), dtype=np.uint8) for _ in range(n)]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    return small_metric_models(tmp_path_factory.mktemp("small_models"))


def test_every_metric_with_small_models(models):
    images, refs = _images(4, 0), _images(4, 1)
    captions = ["a red fox", "a blue car", "a green tree", "a yellow house"]
    out = compute_metrics(METRICS, images=images, captions=captions, references=refs, models=models)
    assert set(out) == set(METRICS)
    for name, entry in out.items():
        assert isinstance(entry["value"], float) and math.isfinite(entry["value"]), (name, entry)
    assert out["lpips"]["value"] > 0 and out["fid"]["reference"] == "generated"
    assert 0 <= out["image_reward"]["value"] <= 1
    psnr = [10 * math.log10(255**2 / np.mean((a.astype(np.float64) - b) ** 2)) for a, b in zip(images, refs)]
    assert out["psnr"]["value"] == pytest.approx(sum(psnr) / 4, rel=1e-12)


def test_identical_images(models):
    images = _images(3, 2)
    out = compute_metrics(["psnr", "ssim", "lpips"], images=images, captions=["x"] * 3,
                          references=[a.copy() for a in images], models=models)
    assert out["psnr"] == {"value": None, "n": 3, "identical": 3, "per_image": [None] * 3}
    assert out["ssim"]["value"] == pytest.approx(1.0, abs=1e-9) and out["lpips"]["value"] == pytest.approx(0.0)


def test_skipped_with_reasons(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "ImageReward", None)  # the optional package absent
    missing = MetricModels(inception=str(tmp_path / "inception.pth"), clip=None, lpips=None,
                           image_reward=str(tmp_path))
    out = compute_metrics(METRICS, images=_images(2, 3), captions=["a", "b"], models=missing)
    assert out["psnr"] == {"skipped": "no reference images"} and "skipped" in out["ssim"]
    assert "no real images and no references" in out["fid"]["skipped"]
    out = compute_metrics(METRICS, images=_images(2, 3), captions=["a", "b"], references=_images(2, 4),
                          models=missing)
    assert "inception.pth not found" in out["fid"]["skipped"]
    assert out["clip_score"]["skipped"] == "no CLIP folder (eval.clip_path) configured"
    assert "image-reward package is not installed" in out["image_reward"]["skipped"]
    assert "LPIPS backbone" in out["lpips"]["skipped"]
    assert all("value" not in out[n] for n in ("fid", "clip_score", "clip_iqa", "image_reward", "lpips"))
    with pytest.raises(ValueError, match="unknown metrics"):
        compute_metrics(["psnr", "is"], images=_images(1, 0), captions=["a"])


def test_fid_statistics_of_real_images_are_cached(models, tmp_path):
    real = _images(5, 5, size=64)  # other size than the generated images: resized to theirs
    cache = tmp_path / "fid" / "MJHQ.pt"
    first = compute_metrics(["fid"], images=_images(4, 6), captions=["a"] * 4, real_images=real, models=models,
                            fid_cache=cache)["fid"]
    assert cache.is_file() and first["reference"] == "real" and not first["reference_statistics_cached"]
    again = compute_metrics(["fid"], images=_images(4, 6), captions=["a"] * 4, real_images=real, models=models,
                            fid_cache=cache)["fid"]
    assert again["reference_statistics_cached"] and again["value"] == pytest.approx(first["value"], rel=1e-9)
    other = compute_metrics(["fid"], images=_images(4, 6), captions=["a"] * 4, real_images=real[:4], models=models,
                            fid_cache=cache)["fid"]
    assert not other["reference_statistics_cached"]  # other real images: recomputed
