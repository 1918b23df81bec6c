"""Image-quality metrics of the quality benchmark, from well-kept libraries, with weights from local paths only.

- ``psnr``: float64, data range 255, per image against its reference (identical images are counted apart: their
  PSNR is infinite); ``ssim``: torchmetrics on float64 images, data range 255.
- ``lpips``: torchmetrics' LPIPS (AlexNet backbone, its learned linear layers as torchmetrics ships them) with the
  backbone weights from a local ``TORCH_HOME`` folder (``models.lpips``: the folder holding
  ``hub/checkpoints/alexnet-owt-7be5be79.pth``; needs torchvision). Given an ``nn.Module`` returning a list of
  feature maps instead (tests, other backbones), the same LPIPS formula with equal layer weights: channel-normalised
  features, squared difference, spatial mean, sum over layers.
- ``fid``: torchmetrics' ``FrechetInceptionDistance``: torch-fidelity's Inception with the weights file
  ``models.inception``, or any ``nn.Module`` mapping uint8 ``[N, 3, H, W]`` to ``[N, D]`` (the custom-feature
  option). Against the dataset's real images when given (their statistics cached in ``fid_cache``, keyed by the
  extractor and the images), else against the references. Images are resized to the first generated image's size.
- ``clip_score`` and ``clip_iqa``: torchmetrics' ``CLIPScore`` and ``CLIPImageQualityAssessment`` (prompt
  ``quality``) with a local transformers CLIP folder (``models.clip``) or a ``(model, processor)`` pair.
- ``image_reward``: the optional ``image-reward`` package (imported only when asked for) with a local checkpoint,
  or any object with ``score(prompt, PIL.Image) -> float``.

A metric whose weights, package or inputs are missing is ``{"skipped": reason}``, never a number.
"""

from __future__ import annotations

import hashlib
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

__all__ = ["METRICS", "PAIRED", "MetricModels", "compute_metrics"]

METRICS = ("clip_iqa", "clip_score", "fid", "image_reward", "psnr", "ssim", "lpips")
PAIRED = ("psnr", "ssim", "lpips")
DATA_RANGE = 255.0


@dataclass
class MetricModels:
    """Where each metric's weights come from: None (not configured), a local path, or a built object."""

    inception: object = None
    clip: object = None
    lpips: object = None
    image_reward: object = None


class _Skip(Exception):
    pass


def _as_arrays(images) -> list[np.ndarray]:
    return [np.asarray(image.convert("RGB") if hasattr(image, "convert") else image, dtype=np.uint8)
            for image in images]


def _batch(arrays: Sequence[np.ndarray], size: tuple[int, int] | None = None):
    """uint8 ``[N, 3, H, W]`` tensor, resized to ``size`` (H, W) when given."""
    import torch
    from PIL import Image

    out = []
    for a in arrays:
        if size is not None and a.shape[:2] != size:
            a = np.asarray(Image.fromarray(a).resize((size[1], size[0]), Image.BICUBIC))
        out.append(torch.from_numpy(np.ascontiguousarray(a)).permute(2, 0, 1))
    return torch.stack(out)


def _existing_path(value, what: str) -> Path:
    if value is None:
        raise _Skip(f"no {what} configured")
    path = Path(value)
    if not path.exists():
        raise _Skip(f"{what} {path} not found")
    return path


# ------------------------------------------------------------------------------------------------ paired


def _psnr(images, references) -> dict:
    values, identical = [], 0
    for a, b in zip(images, references, strict=True):
        mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
        if mse == 0.0:
            identical += 1
            values.append(math.inf)
        else:
            values.append(10.0 * math.log10(DATA_RANGE**2 / mse))
    finite = [v for v in values if math.isfinite(v)]
    return {"value": sum(finite) / len(finite) if finite else None, "n": len(values), "identical": identical,
            "per_image": [v if math.isfinite(v) else None for v in values]}


def _ssim(images, references) -> dict:
    import torch
    from torchmetrics.functional.image import structural_similarity_index_measure as ssim

    values = [float(ssim(torch.from_numpy(a).double().permute(2, 0, 1)[None],
                         torch.from_numpy(b).double().permute(2, 0, 1)[None], data_range=DATA_RANGE))
              for a, b in zip(images, references, strict=True)]
    return {"value": sum(values) / len(values), "n": len(values), "per_image": values}


def _lpips(images, references, model, device: str, batch_size: int) -> dict:
    import torch

    if isinstance(model, torch.nn.Module):
        net = model.to(device).eval()
        values = []
        for i in range(0, len(images), batch_size):
            x = _batch(images[i : i + batch_size]).to(device).float() / 127.5 - 1.0
            y = _batch(references[i : i + batch_size]).to(device).float() / 127.5 - 1.0
            total = 0.0
            for fx, fy in zip(net(x), net(y), strict=True):
                fx = fx / (fx.norm(dim=1, keepdim=True) + 1e-10)
                fy = fy / (fy.norm(dim=1, keepdim=True) + 1e-10)
                total = total + (fx - fy).square().sum(dim=1).mean(dim=(1, 2))
            values += [float(v) for v in total]
        return {"value": sum(values) / len(values), "n": len(values), "per_image": values,
                "network": type(net).__name__}
    home = _existing_path(model, "LPIPS backbone folder (eval.lpips_weights, a TORCH_HOME holding torchvision's AlexNet)")
    try:
        import torchvision  # noqa: F401
    except ImportError:
        raise _Skip("torchvision is not installed (LPIPS's AlexNet backbone comes from it)") from None
    from torchmetrics.image.lpip import LearnedPerceptualImagePatchSimilarity

    previous = os.environ.get("TORCH_HOME")
    os.environ["TORCH_HOME"] = str(home)
    try:
        metric = LearnedPerceptualImagePatchSimilarity(net_type="alex", reduction="mean").to(device)
    except Exception as error:  # noqa: BLE001 - weights absent from the folder: torchvision would try to download
        raise _Skip(f"LPIPS backbone not loadable from {home}: {type(error).__name__}: {error}"[:300]) from None
    finally:
        if previous is None:
            os.environ.pop("TORCH_HOME", None)
        else:
            os.environ["TORCH_HOME"] = previous
    values = []
    for a, b in zip(images, references, strict=True):
        x = _batch([a]).to(device).float() / 127.5 - 1.0
        y = _batch([b]).to(device).float() / 127.5 - 1.0
        values.append(float(metric(x, y)))
    return {"value": sum(values) / len(values), "n": len(values), "per_image": values, "network": "alex"}


# ------------------------------------------------------------------------------------------------ FID


def _fingerprint(extractor, arrays: Sequence[np.ndarray]) -> str:
    digest = hashlib.sha256()
    if isinstance(extractor, (str, Path)):
        digest.update(f"file:{Path(extractor).resolve()}:{Path(extractor).stat().st_size}".encode())
    else:
        digest.update(type(extractor).__name__.encode())
        for tensor in extractor.state_dict().values():
            digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    for a in arrays:
        digest.update(np.ascontiguousarray(a).tobytes())
    return digest.hexdigest()


def _fid(images, references, real, extractor, fid_cache, device: str, batch_size: int) -> dict:
    import torch
    from torchmetrics.image.fid import FrechetInceptionDistance

    other, source = (real, "real") if real is not None else (references, "generated")
    if other is None:
        raise _Skip("no real images and no references to compare with")
    if len(images) < 2 or len(other) < 2:
        raise _Skip(f"FID needs at least 2 images on each side, got {len(images)} and {len(other)}")
    size = images[0].shape[:2]
    if isinstance(extractor, torch.nn.Module):
        metric = FrechetInceptionDistance(feature=extractor, input_img_size=(3, *size))
    else:
        path = _existing_path(extractor, "Inception weights (eval.inception_weights)")
        metric = FrechetInceptionDistance(feature=2048, feature_extractor_weights_path=str(path))
        extractor = path
    metric = metric.to(device)
    cache = Path(fid_cache) if fid_cache and source == "real" else None
    key = _fingerprint(extractor, other) if cache is not None else None
    cached = False
    if cache is not None and cache.is_file():
        stats = torch.load(cache, map_location="cpu", weights_only=True)
        if stats.get("fingerprint") == key:
            metric.real_features_sum = stats["sum"].to(device)
            metric.real_features_cov_sum = stats["cov_sum"].to(device)
            metric.real_features_num_samples = stats["n"].to(device)
            cached = True
    if not cached:
        for i in range(0, len(other), batch_size):
            metric.update(_batch(other[i : i + batch_size], size).to(device), real=True)
        if cache is not None:
            from deepcompressor.utils.files import save_pt

            save_pt(cache, {"fingerprint": key, "sum": metric.real_features_sum.cpu(),
                            "cov_sum": metric.real_features_cov_sum.cpu(),
                            "n": metric.real_features_num_samples.cpu()})
    for i in range(0, len(images), batch_size):
        metric.update(_batch(images[i : i + batch_size], size).to(device), real=False)
    return {"value": float(metric.compute()), "n": len(images), "reference": source, "n_reference": len(other),
            "reference_statistics_cached": cached}


# ------------------------------------------------------------------------------------------------ CLIP


class _ProjectedFeatures:
    """A CLIP model whose ``get_image_features`` / ``get_text_features`` return tensors: transformers 5 returns
    model outputs (the projection in ``pooler_output``), which torchmetrics 1.9 normalises as tensors."""

    def __init__(self, model):
        self._model = model

    def __getattr__(self, name):
        return getattr(self._model, name)

    def to(self, *args, **kwargs):  # torchmetrics moves the model and keeps what ``to`` returns
        self._model = self._model.to(*args, **kwargs)
        return self

    def _tensor(self, out):
        return out if hasattr(out, "norm") else out.pooler_output

    def get_image_features(self, *args, **kwargs):
        return self._tensor(self._model.get_image_features(*args, **kwargs))

    def get_text_features(self, *args, **kwargs):
        return self._tensor(self._model.get_text_features(*args, **kwargs))


def _clip(models: MetricModels, device: str):
    if isinstance(models.clip, tuple):
        model, processor = models.clip
    else:
        path = _existing_path(models.clip, "CLIP folder (eval.clip_path)")
        from transformers import CLIPModel, CLIPProcessor

        model = CLIPModel.from_pretrained(str(path), local_files_only=True)
        processor = CLIPProcessor.from_pretrained(str(path), local_files_only=True)
    return _ProjectedFeatures(model.to(device).eval()), processor


def _clip_score(images, captions, models: MetricModels, device: str, batch_size: int) -> dict:
    from torchmetrics.multimodal.clip_score import CLIPScore

    model, processor = _clip(models, device)
    metric = CLIPScore(model_name_or_path=lambda: (model, processor))
    for i in range(0, len(images), batch_size):
        metric.update(_batch(images[i : i + batch_size]).to(device), list(captions[i : i + batch_size]))
    return {"value": float(metric.compute()), "n": len(images)}


def _clip_iqa(images, models: MetricModels, device: str, batch_size: int) -> dict:
    import torch
    from torchmetrics.multimodal import CLIPImageQualityAssessment

    model, processor = _clip(models, device)
    metric = CLIPImageQualityAssessment(model_name_or_path=lambda: (model, processor), data_range=DATA_RANGE,
                                        prompts=("quality",))
    values = []
    for i in range(0, len(images), batch_size):
        values += torch.atleast_1d(metric(_batch(images[i : i + batch_size]).to(device).float())).tolist()
    return {"value": sum(values) / len(values), "n": len(values), "prompt": "quality"}


def _image_reward(images, captions, scorer) -> dict:
    from PIL import Image

    if scorer is None or isinstance(scorer, (str, Path)):
        path = _existing_path(scorer, "ImageReward checkpoint (eval.image_reward_path)")
        try:
            import ImageReward
        except ImportError:
            raise _Skip("the optional image-reward package is not installed (pip install image-reward, in its own "
                        "environment: it pins an old timm)") from None
        scorer = ImageReward.load(str(path))
    values = [float(scorer.score(caption, Image.fromarray(a))) for a, caption in zip(images, captions, strict=True)]
    return {"value": sum(values) / len(values), "n": len(values)}


# ------------------------------------------------------------------------------------------------ entry point


def compute_metrics(names: Sequence[str], *, images, captions: Sequence[str], references=None, real_images=None,
                    models: MetricModels | None = None, fid_cache: str | Path | None = None, device: str = "cpu",
                    batch_size: int = 16) -> dict[str, dict]:
    """Every metric of ``names`` (see the module docstring): ``{"value": ..., "n": ...}`` or ``{"skipped": ...}``."""
    import torch

    unknown = [n for n in names if n not in METRICS]
    if unknown:
        raise ValueError(f"unknown metrics {unknown}; choose from {', '.join(METRICS)}")
    models = models or MetricModels()
    images = _as_arrays(images)
    references = None if references is None else _as_arrays(references)
    real_images = None if real_images is None else _as_arrays(real_images)
    if references is not None and len(references) != len(images):
        raise ValueError(f"{len(references)} references for {len(images)} images")
    results = {}
    with torch.inference_mode():
        for name in names:
            try:
                if name in PAIRED and references is None:
                    raise _Skip("no reference images")
                if name == "psnr":
                    results[name] = _psnr(images, references)
                elif name == "ssim":
                    results[name] = _ssim(images, references)
                elif name == "lpips":
                    results[name] = _lpips(images, references, models.lpips, device, batch_size)
                elif name == "fid":
                    results[name] = _fid(images, references, real_images, models.inception, fid_cache, device,
                                         batch_size)
                elif name == "clip_score":
                    results[name] = _clip_score(images, captions, models, device, batch_size)
                elif name == "clip_iqa":
                    results[name] = _clip_iqa(images, models, device, batch_size)
                else:
                    results[name] = _image_reward(images, captions, models.image_reward)
            except _Skip as reason:
                results[name] = {"skipped": str(reason)}
    return results
