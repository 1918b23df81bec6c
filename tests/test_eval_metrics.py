"""Quality metrics with small randomly initialised models (a CNN for FID, a CNN pyramid for LPIPS, a one-layer CLIP
saved as a local transformers folder with a hand-written vocabulary): values against direct computations, skipped
reasons, the FID reference-statistics cache. Nothing is downloaded."""

from __future__ import annotations

import copy
import json
import math
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from evaluation import metrics as metrics_module
from evaluation.metrics import IMAGE_REWARD_MISSING, METRICS, PAIRED, MetricModels, compute_metrics
from tests.eval_small_models import Brightness, Features, Pyramid, _seeded, _tiny_clip

CAPTIONS = ["a red fox", "a blue car", "a green tree", "a yellow house", "a very long caption about a small boat"]


def _images(n: int, seed: int, size: int | tuple[int, int] = 32) -> list[np.ndarray]:
    h, w = (size, size) if isinstance(size, int) else size
    gen = np.random.default_rng(seed)
    return [gen.integers(0, 256, (h, w, 3), dtype=np.uint8) for _ in range(n)]


@pytest.fixture(scope="module", autouse=True)
def _no_home_cache(tmp_path_factory):
    """torchmetrics imports matplotlib (its plots), whose font cache would go to ~/.cache: a temp folder instead."""
    with pytest.MonkeyPatch.context() as patch:
        if "matplotlib" not in sys.modules:
            patch.setenv("MPLCONFIGDIR", str(tmp_path_factory.mktemp("matplotlib")))
        yield


@pytest.fixture(scope="module")
def clip_folder(tmp_path_factory) -> Path:
    return _tiny_clip(tmp_path_factory.mktemp("tiny_clip"))


def _manual_fid(a: np.ndarray, b: np.ndarray) -> float:
    from scipy import linalg

    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    root = linalg.sqrtm(cov_a @ cov_b).real
    return float(np.sum((mu_a - mu_b) ** 2) + np.trace(cov_a + cov_b - 2 * root))


@pytest.mark.filterwarnings("error:The given NumPy array is not writable")
def test_every_metric_with_small_models(clip_folder):
    images, refs = _images(5, 0), _images(5, 1)
    for a in images + refs:
        a.setflags(write=False)  # as decoded images may be
    reward = Brightness()
    models = MetricModels(inception=Features(), clip=str(clip_folder), lpips=Pyramid(), image_reward=reward)
    out = compute_metrics(METRICS, images=images, captions=CAPTIONS, references=refs, models=models)
    assert list(out) == list(METRICS)
    for name, entry in out.items():
        assert isinstance(entry["value"], float) and math.isfinite(entry["value"]) and entry["n"] == 5, (name, entry)
    for name in PAIRED:
        assert len(out[name]["per_image"]) == 5
    psnr = [10 * math.log10(255**2 / np.mean((a.astype(np.float64) - b) ** 2)) for a, b in zip(images, refs)]
    assert out["psnr"]["value"] == pytest.approx(sum(psnr) / 5, rel=1e-13) and out["psnr"]["identical"] == 0
    from torchmetrics.functional.image import structural_similarity_index_measure as ssim

    def t(a):
        return torch.from_numpy(a.astype(np.float64)).permute(2, 0, 1)[None]

    assert out["ssim"]["per_image"] == pytest.approx([float(ssim(t(a), t(b), data_range=255.0))
                                                      for a, b in zip(images, refs)], rel=1e-12)
    assert out["lpips"]["value"] > 0 and out["lpips"]["network"] == "Pyramid"
    assert out["fid"]["reference"] == "generated" and out["fid"]["n_reference"] == 5
    assert 0 <= out["clip_score"]["value"] <= 100 and 0 < out["clip_iqa"]["value"] < 1
    assert out["image_reward"]["value"] == pytest.approx(np.mean([a.mean() / 255 for a in images]), rel=1e-12)
    assert reward.prompts == CAPTIONS


def test_clip_metrics_match_a_direct_computation(clip_folder):
    """torchmetrics' CLIPScore and CLIP-IQA through the wrappers give 100 * max(mean cos, 0) and the softmax of the
    "Good photo." / "Bad photo." logits, with the uint8 images and the captions truncated with their end token."""
    from transformers import CLIPModel, CLIPProcessor

    model = CLIPModel.from_pretrained(str(clip_folder), local_files_only=True).eval()
    processor = CLIPProcessor.from_pretrained(str(clip_folder), local_files_only=True)
    images = _images(5, 7, size=40)
    with torch.inference_mode():
        pixels = processor(images=[torch.from_numpy(a).permute(2, 0, 1) for a in images], return_tensors="pt")
        image_emb = model.get_image_features(pixel_values=pixels["pixel_values"])
        image_emb = getattr(image_emb, "pooler_output", image_emb)

        def text_emb(texts):
            tokens = processor.tokenizer(texts, padding=True, truncation=True, max_length=16, return_tensors="pt")
            assert tokens["input_ids"].shape[1] <= 16 and (tokens["input_ids"] == 1).any(dim=1).all()
            emb = model.get_text_features(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"])
            return getattr(emb, "pooler_output", emb)

        cos = torch.nn.functional.cosine_similarity(image_emb, text_emb(CAPTIONS), dim=-1)
        expected_score = max(100 * float(cos.mean()), 0.0)
        anchors = text_emb(["Good photo.", "Bad photo."])
        logits = 100 * torch.nn.functional.normalize(image_emb, dim=-1) @ torch.nn.functional.normalize(
            anchors, dim=-1).T
        expected_iqa = float(logits.softmax(-1)[:, 0].mean())
    for clip in (str(clip_folder), (model, processor)):
        out = compute_metrics(["clip_score", "clip_iqa"], images=images, captions=CAPTIONS,
                              models=MetricModels(clip=clip), batch_size=2)
        assert out["clip_score"]["value"] == pytest.approx(expected_score, rel=1e-5, abs=1e-4)
        assert out["clip_iqa"]["value"] == pytest.approx(expected_iqa, rel=1e-5)
        assert out["clip_iqa"]["prompt"] == "quality"


def test_psnr_is_float64_and_counts_identical_pairs():
    images = _images(3, 2)
    refs = [images[0].copy(), images[1].copy(), _images(1, 3)[0]]
    refs[1][5, 7, 2] ^= 1  # one value off by one: MSE = 1 / (32 * 32 * 3)
    out = compute_metrics(["psnr"], images=images, captions=[], references=refs)["psnr"]
    one_off = 10 * math.log10(255**2 * 32 * 32 * 3)
    other = 10 * math.log10(255**2 / np.mean((images[2].astype(np.float64) - refs[2]) ** 2))
    assert out["identical"] == 1 and out["n"] == 3 and out["per_image"][0] == math.inf
    assert out["per_image"][1] == pytest.approx(one_off, rel=1e-14)  # float32 would be ~1e-7 off
    assert out["value"] == pytest.approx((one_off + other) / 2, rel=1e-14) and type(out["value"]) is float
    same = compute_metrics(["psnr"], images=images, captions=[], references=[Image.fromarray(a) for a in images])
    assert same["psnr"] == {"value": None, "n": 3, "identical": 3, "per_image": [math.inf] * 3}


def test_ssim_and_lpips_on_identical_and_different_images():
    images, refs = _images(3, 4), _images(3, 5)
    models = MetricModels(lpips=Pyramid())
    same = compute_metrics(["ssim", "lpips"], images=images, captions=[], references=[a.copy() for a in images],
                           models=models)
    assert same["ssim"]["value"] == pytest.approx(1.0, abs=1e-12)
    assert same["lpips"]["value"] == 0.0 and same["lpips"]["per_image"] == [0.0] * 3
    out = compute_metrics(["lpips"], images=images, captions=[], references=refs, models=models, batch_size=2)
    assert all(v > 0 for v in out["lpips"]["per_image"])
    # the LPIPS formula with unit weights: unit-normalised channels, squared difference, channel sum, spatial mean
    net = Pyramid().requires_grad_(False)
    expected = []
    for a, b in zip(images, refs):
        fx, fy = (net(torch.from_numpy(x).permute(2, 0, 1)[None].float() / 127.5 - 1) for x in (a, b))
        expected.append(float(sum(((u / (u.square().sum(1, keepdim=True) + 1e-8).sqrt()
                                    - v / (v.square().sum(1, keepdim=True) + 1e-8).sqrt()) ** 2).sum(1).mean()
                                  for u, v in zip(fx, fy))))
    assert out["lpips"]["per_image"] == pytest.approx(expected, rel=1e-5)
    # learned non-negative 1x1 weights, when the network has them
    weighted = Pyramid()
    weighted.lins = nn.ModuleList([nn.Conv2d(8, 1, 1, bias=False), nn.Conv2d(6, 1, 1, bias=False)])
    for lin in weighted.lins:
        nn.init.constant_(lin.weight, 0.5)
    half = compute_metrics(["lpips"], images=images, captions=[], references=refs,
                           models=MetricModels(lpips=weighted))["lpips"]
    assert half["per_image"] == pytest.approx([v / 2 for v in expected], rel=1e-5)


def _alexnet_features(seed: int) -> nn.Sequential:
    """torchvision's AlexNet ``features`` layout, randomly initialised (no torchvision here)."""
    return _seeded(seed, lambda: nn.Sequential(
        nn.Conv2d(3, 64, 11, stride=4, padding=2), nn.ReLU(), nn.MaxPool2d(3, 2),
        nn.Conv2d(64, 192, 5, padding=2), nn.ReLU(), nn.MaxPool2d(3, 2),
        nn.Conv2d(192, 384, 3, padding=1), nn.ReLU(), nn.Conv2d(384, 256, 3, padding=1), nn.ReLU(),
        nn.Conv2d(256, 256, 3, padding=1), nn.ReLU(), nn.MaxPool2d(3, 2)))


def test_lpips_from_a_local_backbone_file_equals_torchmetrics_metric(tmp_path, monkeypatch):
    """With torchvision replaced by a random AlexNet layout: the backbone file's weights and torchmetrics' shipped
    linear layers give exactly what torchmetrics' LearnedPerceptualImagePatchSimilarity gives for those weights."""
    import torchmetrics.functional.image.lpips as tm_lpips
    import torchmetrics.image.lpip as tm_lpip

    features = _alexnet_features(10)
    state = {f"features.{k}": v for k, v in features.state_dict().items()}
    state["classifier.1.weight"] = torch.zeros(2, 2)
    weights = tmp_path / "hub" / "checkpoints" / "alexnet-owt-7be5be79.pth"
    weights.parent.mkdir(parents=True)
    torch.save(state, weights)
    monkeypatch.setattr(metrics_module, "_has_module", lambda name: True)
    monkeypatch.setattr(tm_lpip, "_TORCHVISION_AVAILABLE", True)
    monkeypatch.setattr(tm_lpips, "_get_tv_model_features",
                        lambda net, pretrained=False: copy.deepcopy(features) if pretrained else _alexnet_features(11))
    images, refs = _images(3, 8, size=64), _images(3, 9, size=64)
    with torch.inference_mode():
        reference = tm_lpip.LearnedPerceptualImagePatchSimilarity(net_type="alex", reduction="none")
        expected = reference(*(torch.from_numpy(np.stack(x)).permute(0, 3, 1, 2).float() / 127.5 - 1
                               for x in (images, refs))).tolist()
    for spec in (weights, tmp_path):  # the file, or a TORCH_HOME-like folder holding it
        out = compute_metrics(["lpips"], images=images, captions=[], references=refs, models=MetricModels(lpips=spec))
        assert out["lpips"]["network"] == "alex" and out["lpips"]["per_image"] == pytest.approx(expected, rel=1e-5)
    del state["features.10.weight"]
    torch.save(state, weights)
    out = compute_metrics(["lpips"], images=images, captions=[], references=refs, models=MetricModels(lpips=weights))
    assert "has no features.10.weight" in out["lpips"]["skipped"]


def test_skipped_with_reasons(tmp_path, monkeypatch):
    images, refs = _images(3, 3), _images(3, 4)
    out = compute_metrics(METRICS, images=images, captions=CAPTIONS[:3], references=refs)
    assert out["fid"]["skipped"].startswith("no Inception weights") and "configured" in out["fid"]["skipped"]
    assert out["clip_score"]["skipped"].startswith("no CLIP model") and out["clip_iqa"] == out["clip_score"]
    assert out["lpips"]["skipped"].startswith("no LPIPS backbone weights")
    assert out["image_reward"] == {"skipped": "no ImageReward checkpoint configured"}
    assert all("value" not in out[n] for n in METRICS if n not in ("psnr", "ssim"))

    absent = MetricModels(inception=tmp_path / "pt_inception.pth", clip=str(tmp_path / "clip"),
                          lpips=str(tmp_path / "alexnet.pth"), image_reward=str(tmp_path / "ImageReward.pt"))
    monkeypatch.setitem(sys.modules, "ImageReward", Brightness())  # installed: the path is what is missing
    out = compute_metrics(METRICS, images=images, captions=CAPTIONS[:3], references=refs, models=absent)
    for name, path in (("fid", "pt_inception.pth"), ("clip_score", "clip"), ("clip_iqa", "clip"),
                       ("lpips", "alexnet.pth"), ("image_reward", "ImageReward.pt")):
        assert out[name]["skipped"].endswith(f"{tmp_path / path} not found"), (name, out[name])

    for name in ("pt_inception.pth", "alexnet.pth", "ImageReward.pt"):
        (tmp_path / name).write_bytes(b"weights")
    monkeypatch.setitem(sys.modules, "ImageReward", None)  # the optional package absent
    monkeypatch.setattr(metrics_module, "_has_module", lambda name: name not in ("torchvision", "torch_fidelity"))
    out = compute_metrics(METRICS, images=images, captions=CAPTIONS[:3], references=refs, models=absent)
    assert out["image_reward"] == {"skipped": IMAGE_REWARD_MISSING}
    assert out["image_reward"]["skipped"] == ("the optional image-reward package is not installed "
                                              "(pip install image-reward in its own environment)")
    assert out["lpips"]["skipped"].startswith("torchvision is not installed")
    assert out["fid"]["skipped"].startswith("torch-fidelity is not installed")

    built = MetricModels(inception=Features(), lpips=Pyramid(), image_reward=Brightness())
    out = compute_metrics(METRICS, images=images, captions=CAPTIONS[:3], models=built)
    assert {n: out[n] for n in PAIRED} == {n: {"skipped": "no reference images"} for n in PAIRED}
    assert out["fid"] == {"skipped": "no real images and no reference images to compare with"}
    out = compute_metrics(["fid"], images=images[:1], captions=["a"], references=refs[:1], models=built)
    assert "at least 2 images on each side" in out["fid"]["skipped"]
    out = compute_metrics(["fid"], images=images, captions=[], real_images=refs[:1], models=built)
    assert "at least 2 images on each side, got 3 generated and 1 real" in out["fid"]["skipped"]
    assert compute_metrics(["psnr", "fid"], images=[], captions=[], references=[], models=built) == {
        "psnr": {"skipped": "no images"}, "fid": {"skipped": "no images"}}


def test_unknown_metric_and_bad_inputs_raise_before_any_work():
    reward = Brightness()
    with pytest.raises(ValueError, match="unknown metrics") as error:
        compute_metrics(["image_reward", "psnr", "inception_score"], images=_images(2, 0), captions=["a", "b"],
                        references=_images(2, 1), models=MetricModels(image_reward=reward))
    assert all(name in str(error.value) for name in METRICS) and reward.prompts == []
    with pytest.raises(ValueError, match="uint8 RGB"):
        compute_metrics(["psnr"], images=[np.zeros((8, 8, 3), np.float32)], captions=["a"])
    with pytest.raises(ValueError, match="2 references for 3 images"):
        compute_metrics(["psnr"], images=_images(3, 0), captions=[], references=_images(2, 0))
    with pytest.raises(ValueError, match="captions"):
        compute_metrics(["clip_score"], images=_images(3, 0), captions=["a"])


def test_fid_matches_the_frechet_distance_of_the_features():
    """Real photos of another size and aspect ratio: centre-cropped, resized (bicubic) to the generated size."""
    images, real = _images(6, 10), _images(7, 11, size=(48, 64))
    features = Features()
    out = compute_metrics(["fid"], images=images, captions=[], real_images=real, models=MetricModels(
        inception=features), batch_size=4)["fid"]
    assert out["reference"] == "real" and out["n_reference"] == 7 and out["image_size"] == [32, 32]
    assert features.seen == [4, 3, 4, 2] and "reference_statistics_cached" not in out
    fitted = [np.asarray(Image.fromarray(a[:, 8:56]).resize((32, 32), Image.BICUBIC)) for a in real]
    with torch.inference_mode():
        def feats(arrays):
            return features(torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2)).double().numpy()

        expected = _manual_fid(feats(fitted), feats(images))
    assert out["value"] == pytest.approx(expected, rel=1e-6)


def test_fid_reference_statistics_are_cached_atomically_and_reused(tmp_path, monkeypatch):
    replaced = []
    real_replace = os.replace

    def spy(src, dst):
        replaced.append((Path(src), Path(dst)))
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", spy)
    images, real = _images(4, 12), _images(5, 13, size=48)
    cache = tmp_path / "fid" / "MJHQ.pt"

    def run(features, real_images=real, fid_cache=cache):
        return compute_metrics(["fid"], images=images, captions=[], real_images=real_images,
                               models=MetricModels(inception=features), fid_cache=fid_cache)["fid"]

    features = Features()
    first = run(features)
    assert not first["reference_statistics_cached"] and sum(features.seen) == 5 + 4
    assert len(replaced) == 1 and replaced[0][1] == cache and replaced[0][0].parent == cache.parent
    assert replaced[0][0] != cache and sorted(p.name for p in cache.parent.iterdir()) == ["MJHQ.pt"]
    stats = torch.load(cache, weights_only=True)
    assert stats["n"] == 5 and stats["mu"].dtype == torch.float64 and stats["sigma"].shape == (4, 4)

    features = Features()
    again = run(features)
    assert again["reference_statistics_cached"] and sum(features.seen) == 4  # only the generated images
    assert again["value"] == pytest.approx(first["value"], rel=1e-9) and len(replaced) == 1

    changed = [a.copy() for a in real]
    changed[3][0, 0, 0] ^= 1
    assert not run(Features(), real_images=changed)["reference_statistics_cached"]  # other real images
    assert not run(Features(seed=5))["reference_statistics_cached"]  # another extractor
    larger = compute_metrics(["fid"], images=_images(4, 12, size=40), captions=[], real_images=real,
                             models=MetricModels(inception=Features()), fid_cache=cache)["fid"]
    assert not larger["reference_statistics_cached"]  # real images resized to another size
    assert len(replaced) == 4
    cache.write_bytes(b"not a torch file")
    assert not run(Features())["reference_statistics_cached"]  # unreadable: recomputed and replaced
    assert run(Features())["reference_statistics_cached"]

    generated_only = tmp_path / "other" / "DCI.pt"
    out = compute_metrics(["fid"], images=images, captions=[], references=_images(4, 14),
                          models=MetricModels(inception=Features()), fid_cache=generated_only)["fid"]
    assert out["reference"] == "generated" and not generated_only.exists()


class PlainFeatures(nn.Module):
    """A feature extractor without ``num_features``: torchmetrics finds the size from a dummy uint8 image."""

    def __init__(self):
        super().__init__()
        self.inner = Features()

    def forward(self, x):
        return self.inner(x)


def test_progress_bar_only_from_batch_size_images(capsys):
    models = MetricModels(inception=PlainFeatures())
    compute_metrics(["fid"], images=_images(4, 0), captions=[], references=_images(4, 1), models=models, batch_size=2)
    assert "fid" in capsys.readouterr().err
    compute_metrics(["fid"], images=_images(4, 0), captions=[], references=_images(4, 1), models=models)
    assert "fid" not in capsys.readouterr().err


def test_image_reward_checkpoint_through_the_package(tmp_path, monkeypatch):
    """A stand-in ``ImageReward`` package: the model is built from med_config.json and the checkpoint beside it."""
    import types

    class RewardModel(nn.Module):
        def __init__(self, med_config, device="cpu"):
            super().__init__()
            assert json.loads(Path(med_config).read_text()) == {"hidden": 4}
            self.scale = nn.Parameter(torch.zeros(()))

        def score(self, prompt, image):
            return float(self.scale) * float(np.asarray(image).mean()) + len(prompt)

    package, module = types.ModuleType("ImageReward"), types.ModuleType("ImageReward.ImageReward")
    module.ImageReward = RewardModel
    monkeypatch.setitem(sys.modules, "ImageReward", package)
    monkeypatch.setitem(sys.modules, "ImageReward.ImageReward", module)
    folder = tmp_path / "image_reward"
    folder.mkdir()
    torch.save({"scale": torch.tensor(2.0)}, folder / "ImageReward.pt")
    images = _images(2, 20)
    out = compute_metrics(["image_reward"], images=images, captions=["ab", "abcd"],
                          models=MetricModels(image_reward=folder))
    assert "med_config.json not found" in out["image_reward"]["skipped"]
    (folder / "med_config.json").write_text(json.dumps({"hidden": 4}))
    for spec in (folder, folder / "ImageReward.pt"):
        out = compute_metrics(["image_reward"], images=images, captions=["ab", "abcd"],
                              models=MetricModels(image_reward=spec))
        assert out["image_reward"]["value"] == pytest.approx(np.mean([2 * a.mean() for a in images]) + 3, rel=1e-6)
