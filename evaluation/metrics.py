"""Image-quality metrics of the quality benchmark, from well-kept libraries, with weights from local paths only.

``compute_metrics(names, images=..., captions=..., references=..., real_images=..., models=MetricModels(...))``
returns, per metric, ``{"value": float, "n": int, ...}`` or ``{"skipped": reason}``. Images are uint8 RGB arrays
``[H, W, 3]`` (PIL images are converted); ``references[i]`` is the full-precision image of the prompt and seed of
``images[i]``; ``real_images`` are the dataset's photos (FID only). Everything runs under ``torch.inference_mode()``
in float32, ``batch_size`` images at a time, with a tqdm bar per model-based metric (none below ``batch_size``
images). Nothing is downloaded: a metric whose weights are not configured, whose path does not exist, whose optional
package is missing or whose inputs are missing is ``{"skipped": reason}``, never a number.

Paired metrics (``PAIRED``: against ``references``, ``"per_image"`` values in the result):

- ``psnr``: ``10 log10(255^2 / MSE)`` per image pair, all in float64 (torchmetrics' ``peak_signal_noise_ratio`` takes
  the log of the data range in float32, 1e-8 off in relative terms, so it is not used). Identical pairs have an
  infinite PSNR: they are counted in ``"identical"`` and left out of the mean (``"value": None`` when every pair is
  identical); their ``per_image`` entry is ``inf`` (``null`` once written as JSON).
- ``ssim``: torchmetrics' ``structural_similarity_index_measure`` per pair on float64 ``[1, 3, H, W]`` tensors,
  data range 255 (Gaussian window 11, sigma 1.5), mean over pairs.
- ``lpips``: torchmetrics' LPIPS network and update function (``_NoTrainLpips``, ``_lpips_update`` of
  ``torchmetrics.functional.image.lpips``): images scaled to [-1, 1], its scaling layer, the torchvision backbone, its
  shipped learned linear layers (``lpips_models/<net>.pth``), channel-normalised features, squared difference, 1x1
  weights, spatial mean, sum over layers. ``models.lpips`` is the backbone's torchvision weights file
  (``alexnet-owt-7be5be79.pth``; ``vgg16-397923af.pth`` or ``squeezenet1_1-b8a52dc0.pth`` pick those backbones, told
  apart by their keys), or a folder holding one of them (at its top or in ``hub/checkpoints``, as in a
  ``TORCH_HOME``). The backbone is built without weights (``pnet_rand=True``) and loaded from that file: the metric
  class ``LearnedPerceptualImagePatchSimilarity`` is not used because its constructor always asks torchvision for
  the pretrained weights (a download when they are not cached), and its ``net_type`` takes no module. Needs
  torchvision (skipped otherwise). An ``nn.Module`` mapping images in [-1, 1] to a list of feature maps may be given
  instead (tests, other backbones): the same formula through the same ``_lpips_update``, without the scaling layer
  (it belongs to the ImageNet backbones), with the module's ``lins`` (one 1x1 layer per feature map) when it has
  them, else unit weights (a plain channel sum, the "baseline" variant of the LPIPS paper).

Unpaired metrics:

- ``fid``: torchmetrics' ``FrechetInceptionDistance``. ``models.inception`` is torch-fidelity's Inception weights
  file (``pt_inception-2015-12-05-6726825d.pth``, used as ``feature=2048, feature_extractor_weights_path=...``;
  needs torch-fidelity), or an ``nn.Module`` mapping uint8 ``[N, 3, H, W]`` to ``[N, D]`` features (torchmetrics'
  custom-feature option, ``normalize=False``: the module gets the uint8 images). Reference: ``real_images`` when
  given (``"reference": "real"``), else ``references`` (``"reference": "generated"``). Every image is brought to the
  size of the first generated image (an image of another aspect ratio is centre-cropped to it first, then resized
  with PIL's bicubic filter); the Inception network then resizes to 299x299 itself (antialiased bilinear) and a
  custom module is built for that size. At least 2 images on each side. With ``fid_cache`` (a file) and real images,
  the real images' feature mean and covariance (float64), their count and a fingerprint (the extractor's weights,
  the image size and every real image's bytes) are saved with ``torch.save`` through an atomic write (a temp file in
  the same folder, then ``os.replace``) and reused while the fingerprint matches (read with
  ``torch.load(weights_only=True)``); an unreadable or stale file is recomputed and replaced.
- ``clip_score``: torchmetrics' ``CLIPScore``: 100 x cosine of the CLIP image and caption embeddings, averaged and
  clipped at 0. ``clip_iqa``: torchmetrics' ``CLIPImageQualityAssessment`` with ``prompts=("quality",)``: the
  softmax probability of "Good photo." against "Bad photo.", averaged. ``models.clip`` is a local transformers CLIP
  folder (model and processor files, loaded with ``local_files_only=True``) or a ``(model, processor)`` pair; the
  metrics get them through the callable form of ``model_name_or_path`` (a folder name is only accepted by
  torchmetrics for a few hub names, and CLIP-IQA's default ``"clip_iqa"`` weights would be downloaded: never used).
  Two wrappers keep torchmetrics 1.9 and transformers 5 in step: the model's ``get_*_features`` return tensors
  (transformers 5 returns model outputs whose ``pooler_output`` is the projection), and the processor truncates
  captions to the text model's length with the end token kept (torchmetrics would cut the ids after tokenising,
  losing the token CLIP pools) and, for CLIP-IQA, gets the uint8 images back (torchmetrics hands it images divided
  by ``data_range``, which the CLIP image processor would rescale a second time).
- ``image_reward``: the optional ``image-reward`` package, imported only when this metric is asked for (install it
  in its own environment: it pins old timm/transformers). ``models.image_reward`` is the ``ImageReward.pt``
  checkpoint (or its folder) with the package's ``med_config.json`` beside it; the model is built from those two
  files as ``ImageReward.load`` builds it, without its download calls (its BLIP text encoder still reads the
  ``bert-base-uncased`` tokenizer through transformers: keep it in that environment's Hugging Face cache and set
  ``HF_HUB_OFFLINE=1``). Or any object with ``score(prompt: str, image: PIL.Image) -> float``.
"""

from __future__ import annotations

import hashlib
import importlib.util
import math
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

__all__ = ["METRICS", "PAIRED", "MetricModels", "compute_metrics"]

METRICS: tuple[str, ...] = ("clip_iqa", "clip_score", "fid", "image_reward", "psnr", "ssim", "lpips")
PAIRED = ("psnr", "ssim", "lpips")  # need the reference image of the same prompt
DATA_RANGE = 255.0
IMAGE_REWARD_MISSING = "the optional image-reward package is not installed (pip install image-reward in its own " \
                       "environment)"
_FID_CACHE_VERSION = 1


@dataclass
class MetricModels:
    """Where each metric's weights come from. Each field: None (not configured), a local path (str/Path), or, for
    tests and library users, an already-built torch.nn.Module / object."""

    inception: object = None  # FID: torch-fidelity's Inception weights file, or an nn.Module uint8 [N,3,H,W] -> [N,D]
    clip: object = None  # CLIP score and CLIP-IQA: a local transformers CLIP folder, or a (model, processor) tuple
    lpips: object = None  # LPIPS: a torchvision backbone weights file (or its folder), or an nn.Module -> feature maps
    image_reward: object = None  # ImageReward: a local ImageReward.pt (or its folder), or an object with .score


_NO_MODELS = MetricModels()  # the default: nothing configured (never modified)


class _Skip(Exception):
    """The metric cannot be computed; the message says why."""


# ------------------------------------------------------------------------------------------------ inputs


def _as_arrays(images, what: str) -> list[np.ndarray]:
    out = []
    for i, image in enumerate(images):
        a = np.asarray(image.convert("RGB")) if hasattr(image, "convert") else np.asarray(image)
        if a.dtype != np.uint8 or a.ndim != 3 or a.shape[2] != 3:
            raise ValueError(f"{what}[{i}]: expected a uint8 RGB array [H, W, 3], got {a.dtype} {list(a.shape)}")
        out.append(a)
    return out


def _has_module(name: str) -> bool:
    return importlib.util.find_spec(name) is not None


def _existing_path(value, what: str) -> Path:
    if value is None:
        raise _Skip(f"no {what} configured")
    path = Path(value).expanduser()
    if not path.exists():
        raise _Skip(f"{what} {path} not found")
    return path


def _to_tensor(arrays: Sequence[np.ndarray]):
    """uint8 ``[N, 3, H, W]`` tensor (a fresh, writable copy) of same-size arrays."""
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()


def _fit(a: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """``a`` at ``size`` (H, W): centre-cropped to that aspect ratio when it differs, then resized (PIL bicubic)."""
    h, w = a.shape[:2]
    th, tw = size
    if (h, w) == (th, tw):
        return a
    if h * tw > w * th:  # too tall for the target's aspect ratio
        nh = max(1, round(w * th / tw))
        a = a[(h - nh) // 2 : (h - nh) // 2 + nh]
    elif h * tw < w * th:  # too wide
        nw = max(1, round(h * tw / th))
        a = a[:, (w - nw) // 2 : (w - nw) // 2 + nw]
    from PIL import Image

    return np.asarray(Image.fromarray(np.ascontiguousarray(a)).resize((tw, th), Image.BICUBIC))


def _batches(arrays: Sequence[np.ndarray], batch_size: int) -> Iterator[range]:
    """Consecutive index ranges of at most ``batch_size`` images of one size."""
    start = 0
    while start < len(arrays):
        stop = start + 1
        while stop < len(arrays) and stop - start < batch_size and arrays[stop].shape == arrays[start].shape:
            stop += 1
        yield range(start, stop)
        start = stop


def _progress(total: int, name: str, batch_size: int):
    from tqdm import tqdm

    return tqdm(total=total, desc=name, unit="img", disable=total < batch_size, leave=False, dynamic_ncols=True)


def _mean(values: Sequence[float]) -> float:
    return float(math.fsum(values) / len(values))


# ------------------------------------------------------------------------------------------------ paired


def _psnr(images, references) -> dict:
    values = []
    for a, b in zip(images, references, strict=True):
        mse = float(np.mean(np.square(a.astype(np.float64) - b.astype(np.float64))))
        values.append(math.inf if mse == 0.0 else 10.0 * math.log10(DATA_RANGE * DATA_RANGE / mse))
    finite = [v for v in values if math.isfinite(v)]
    return {"value": _mean(finite) if finite else None, "n": len(values), "identical": len(values) - len(finite),
            "per_image": values}


def _ssim(images, references) -> dict:
    from torchmetrics.functional.image import structural_similarity_index_measure

    def tensor(a):
        return torch.from_numpy(a.astype(np.float64)).permute(2, 0, 1)[None]

    values = [float(structural_similarity_index_measure(tensor(a), tensor(b), data_range=DATA_RANGE))
              for a, b in zip(images, references, strict=True)]
    return {"value": _mean(values), "n": len(values), "per_image": values}


def _lpips_net(spec, device: str):
    """An LPIPS network called as torchmetrics' ``_lpips_update`` calls it, and its name."""
    try:
        from torchmetrics.functional.image import lpips as tm_lpips
    except ImportError as error:
        raise _Skip(f"this torchmetrics has no LPIPS implementation ({error})") from None
    if isinstance(spec, nn.Module):
        return _ModuleLPIPS(spec, tm_lpips).to(device).eval(), type(spec).__name__
    path = _existing_path(spec, "LPIPS backbone weights (a torchvision alexnet-owt-7be5be79.pth)")
    if path.is_dir():
        found = sorted({p for folder in (path, path / "hub" / "checkpoints") for pattern in
                        ("alexnet-*.pth", "vgg16-*.pth", "squeezenet1_1-*.pth") for p in folder.glob(pattern)})
        if len(found) != 1:
            raise _Skip(f"LPIPS: {path} holds {len(found)} torchvision backbone weights files (alexnet-*.pth, "
                        "vgg16-*.pth or squeezenet1_1-*.pth at its top or in hub/checkpoints), not exactly one")
        path = found[0]
    if not _has_module("torchvision"):
        raise _Skip("torchvision is not installed (torchmetrics' LPIPS takes its backbone network from it)")
    from deepcompressor.utils.files import load_pt

    try:
        state = load_pt(path)
    except ValueError as error:
        raise _Skip(f"LPIPS: {error}") from None
    if not isinstance(state, dict):
        raise _Skip(f"LPIPS: {path} is not a state dict")
    net_type = "squeeze" if any(".squeeze." in k for k in state) else "vgg" if any(
        k.endswith("28.weight") for k in state) else "alex"
    net = tm_lpips._NoTrainLpips(pretrained=True, net=net_type, pnet_rand=True)  # linear layers: torchmetrics'
    backbone = {}
    for key in net.net.state_dict():  # slice<k>.<i>.<param> or slices.<k>.<i>.<param> <- features.<i>.<param>
        match = re.fullmatch(r"(?:slice\d+|slices\.\d+)\.(\d+)\.(.+)", key)
        source = next((k for k in (f"features.{match[1]}.{match[2]}", f"{match[1]}.{match[2]}") if k in state), None)
        if source is None:
            raise _Skip(f"LPIPS: {path} has no features.{match[1]}.{match[2]} for the {net_type} backbone")
        backbone[key] = state[source]
    try:
        net.net.load_state_dict(backbone, strict=True)
    except RuntimeError as error:
        raise _Skip(f"LPIPS: {path} does not fit the {net_type} backbone: {' '.join(str(error).split())[:200]}")
    return net.to(device=device, dtype=torch.float32).eval(), net_type


class _ModuleLPIPS(nn.Module):
    """LPIPS with any feature network, through torchmetrics' helpers (see the module docstring)."""
    def __init__(self, features: nn.Module, tm_lpips):
        super().__init__()
        self.features = features
        self._tm = tm_lpips

    def forward(self, in0, in1, normalize: bool = False):
        if normalize:
            in0, in1 = 2 * in0 - 1, 2 * in1 - 1
        lins = getattr(self.features, "lins", None)
        total = 0
        for k, (f0, f1) in enumerate(zip(self.features(in0), self.features(in1), strict=True)):
            diff = (self._tm._normalize_tensor(f0) - self._tm._normalize_tensor(f1)) ** 2
            weighted = lins[k](diff) if lins is not None else diff.sum(dim=1, keepdim=True)
            total = total + self._tm._spatial_average(weighted, keep_dim=True)
        return total


def _lpips(images, references, spec, device: str, batch_size: int) -> dict:
    net, network = _lpips_net(spec, device)
    from torchmetrics.functional.image.lpips import _lpips_update

    values = []
    with _progress(len(images), "lpips", batch_size) as bar:
        for idx in _batches(images, batch_size):
            x = _to_tensor([images[i] for i in idx]).to(device=device, dtype=torch.float32) / 127.5 - 1.0
            y = _to_tensor([references[i] for i in idx]).to(device=device, dtype=torch.float32) / 127.5 - 1.0
            values += torch.atleast_1d(_lpips_update(x, y, net, normalize=False)).double().cpu().tolist()
            bar.update(len(idx))
    return {"value": _mean(values), "n": len(values), "per_image": values, "network": network}


# ------------------------------------------------------------------------------------------------ FID


def _module_digest(module) -> str:
    digest = hashlib.sha256(f"{type(module).__module__}.{type(module).__qualname__}".encode())
    for name, tensor in module.state_dict().items():
        t = tensor.detach().cpu().contiguous().reshape(-1)
        digest.update(f"{name}:{t.dtype}:{list(tensor.shape)}".encode())
        digest.update(t.view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _images_digest(arrays: Sequence[np.ndarray]) -> str:
    digest = hashlib.sha256()
    for a in arrays:
        digest.update(f"{a.shape}".encode())
        digest.update(np.ascontiguousarray(a).data)
    return digest.hexdigest()


def _fid_metric(spec, size: tuple[int, int]):
    """torchmetrics' FID for images of ``size`` and a fingerprint of its feature extractor."""
    from torchmetrics.image.fid import FrechetInceptionDistance

    if isinstance(spec, nn.Module):
        metric = FrechetInceptionDistance(feature=spec, normalize=False, input_img_size=(3, *size))
        return metric, f"module:{_module_digest(spec)}"
    path = _existing_path(spec, "Inception weights (torch-fidelity's pt_inception-2015-12-05-6726825d.pth)")
    if not path.is_file():
        raise _Skip(f"Inception weights {path} is not a file")
    if not _has_module("torch_fidelity"):
        raise _Skip("torch-fidelity is not installed (torchmetrics' FID takes its Inception network from it)")
    from deepcompressor.utils.files import sha256_file

    try:
        metric = FrechetInceptionDistance(feature=2048, normalize=False, feature_extractor_weights_path=str(path))
    except (OSError, RuntimeError, ValueError) as error:
        raise _Skip(f"Inception weights {path} not loadable: {' '.join(str(error).split())[:200]}") from None
    return metric, f"torch-fidelity-inception-v3-compat:2048:antialias:{sha256_file(path)}"


def _load_fid_stats(cache: Path, fingerprint: str):
    from deepcompressor.utils.files import load_pt

    if not cache.is_file():
        return None
    try:
        stats = load_pt(cache)
    except ValueError:
        return None  # unreadable: recomputed and replaced
    if not isinstance(stats, dict) or stats.get("fingerprint") != fingerprint:
        return None
    return stats


def _fid(images, references, real_images, spec, fid_cache, device: str, batch_size: int) -> dict:
    if real_images is not None:
        other, source = real_images, "real"
    elif references is not None:
        other, source = references, "generated"
    else:
        raise _Skip("no real images and no reference images to compare with")
    if len(images) < 2 or len(other) < 2:
        raise _Skip(f"FID needs at least 2 images on each side, got {len(images)} generated and {len(other)} "
                    f"{'real' if source == 'real' else 'reference'}")
    size = tuple(images[0].shape[:2])
    metric, extractor_id = _fid_metric(spec, size)
    metric = metric.to(device)
    cache = Path(fid_cache) if fid_cache is not None and source == "real" else None
    fingerprint = stats = None
    if cache is not None:
        fingerprint = hashlib.sha256(f"v{_FID_CACHE_VERSION}|{extractor_id}|{size}|{len(other)}|"
                                     f"{_images_digest(other)}".encode()).hexdigest()
        stats = _load_fid_stats(cache, fingerprint)
    with _progress(len(images) + (0 if stats is not None else len(other)), "fid", batch_size) as bar:
        if stats is not None:
            n = int(stats["n"])
            mu = stats["mu"].to(device=device, dtype=torch.float64)
            sigma = stats["sigma"].to(device=device, dtype=torch.float64)
            metric.real_features_sum = mu * n
            metric.real_features_cov_sum = sigma * (n - 1) + n * torch.outer(mu, mu)
            metric.real_features_num_samples = torch.tensor(n, dtype=torch.long, device=device)
        else:
            for i in range(0, len(other), batch_size):
                chunk = [_fit(a, size) for a in other[i : i + batch_size]]
                metric.update(_to_tensor(chunk).to(device), real=True)
                bar.update(len(chunk))
            if cache is not None:
                from deepcompressor.utils.files import save_pt

                n = int(metric.real_features_num_samples)
                mu = (metric.real_features_sum / n).cpu()
                sigma = ((metric.real_features_cov_sum.cpu() - n * torch.outer(mu, mu)) / (n - 1)).cpu()
                save_pt(cache, {"fingerprint": fingerprint, "mu": mu, "sigma": sigma, "n": n,
                                "image_size": list(size), "extractor": extractor_id, "version": _FID_CACHE_VERSION})
        for i in range(0, len(images), batch_size):
            chunk = [_fit(a, size) for a in images[i : i + batch_size]]
            metric.update(_to_tensor(chunk).to(device), real=False)
            bar.update(len(chunk))
    out = {"value": float(metric.compute()), "n": len(images), "reference": source, "n_reference": len(other),
           "image_size": list(size)}
    if cache is not None:
        out["reference_statistics_cached"] = stats is not None
    return out


# ------------------------------------------------------------------------------------------------ CLIP


class _ClipFeatures(nn.Module):
    """A CLIP model whose ``get_image_features`` / ``get_text_features`` return the projected embeddings as tensors
    (transformers 5 returns model outputs with the projection in ``pooler_output``)."""

    def __init__(self, clip: nn.Module):
        super().__init__()
        self.clip = clip

    @property
    def config(self):
        return self.clip.config

    @staticmethod
    def _tensor(out):
        return out if isinstance(out, torch.Tensor) else out.pooler_output

    def get_image_features(self, *args, **kwargs):
        return self._tensor(self.clip.get_image_features(*args, **kwargs))

    def get_text_features(self, *args, **kwargs):
        return self._tensor(self.clip.get_text_features(*args, **kwargs))


class _ClipProcessor:
    """The CLIP processor as torchmetrics calls it, with captions truncated (end token kept) to ``max_length`` and,
    given ``image_scale``, images multiplied back to uint8 (CLIP-IQA hands them over divided by its data range)."""

    def __init__(self, processor, max_length: int, image_scale: float | None = None):
        self._processor = processor
        self._max_length = max_length
        self._image_scale = image_scale

    def __getattr__(self, name):
        if name.startswith("_"):
            raise AttributeError(name)
        return getattr(self._processor, name)

    def __call__(self, text=None, images=None, **kwargs):
        if text is not None:
            kwargs.setdefault("truncation", True)
            kwargs.setdefault("max_length", self._max_length)
            kwargs["text"] = text
        if images is not None:
            if self._image_scale is not None:
                images = [(torch.as_tensor(i) * self._image_scale).round().clamp(0, 255).to(torch.uint8)
                          for i in images]
            kwargs["images"] = images
        return self._processor(**kwargs)


def _load_clip(spec):
    """``(model, processor, caption length, source)``: the model wrapped, on the CPU in float32."""
    if isinstance(spec, (tuple, list)) and len(spec) == 2:
        model, processor = spec
        source = type(model).__name__
    else:
        path = _existing_path(spec, "CLIP model (models.clip: a local transformers CLIP folder)")
        from transformers import CLIPModel, CLIPProcessor

        try:
            model = CLIPModel.from_pretrained(str(path), local_files_only=True)
            processor = CLIPProcessor.from_pretrained(str(path), local_files_only=True)
        except (OSError, ValueError) as error:
            raise _Skip(f"CLIP not loadable from {path}: {' '.join(str(error).split())[:200]}") from None
        source = str(path)
    text_config = getattr(getattr(model, "config", None), "text_config", None)
    max_length = getattr(text_config, "max_position_embeddings", None) or 77
    model = _ClipFeatures(model.to("cpu").float().eval())
    return model, processor, int(max_length), source


def _clip_metric(cls, clip, **kwargs):
    import torchmetrics

    model, processor = clip
    try:
        return cls(model_name_or_path=lambda: (model, processor), **kwargs)
    except Exception as error:  # noqa: BLE001 - a torchmetrics without the callable form fails on it
        raise _Skip(f"torchmetrics {torchmetrics.__version__} {cls.__name__} does not take a model object "
                    f"({type(error).__name__}: {' '.join(str(error).split())[:160]})") from None


def _clip_score(images, captions, clip, device: str, batch_size: int) -> dict:
    from torchmetrics.multimodal.clip_score import CLIPScore

    model, processor, max_length, source = clip
    metric = _clip_metric(CLIPScore, (model.to("cpu"), _ClipProcessor(processor, max_length))).to(device)
    with _progress(len(images), "clip_score", batch_size) as bar:
        for i in range(0, len(images), batch_size):
            chunk = [torch.from_numpy(np.array(a.transpose(2, 0, 1))).to(device)
                     for a in images[i : i + batch_size]]
            metric.update(chunk, list(captions[i : i + batch_size]))
            bar.update(len(chunk))
    return {"value": float(metric.compute()), "n": len(images), "model": source}


def _clip_iqa(images, clip, device: str, batch_size: int) -> dict:
    from torchmetrics.multimodal import CLIPImageQualityAssessment

    model, processor, max_length, source = clip
    metric = _clip_metric(CLIPImageQualityAssessment, (model.to("cpu"), _ClipProcessor(processor, max_length,
                                                                                        DATA_RANGE)),
                          data_range=DATA_RANGE, prompts=("quality",)).to(device)
    with _progress(len(images), "clip_iqa", batch_size) as bar:
        for idx in _batches(images, batch_size):
            metric.update(_to_tensor([images[i] for i in idx]).to(device=device, dtype=torch.float32))
            bar.update(len(idx))
    values = torch.atleast_1d(metric.compute()).double().cpu().tolist()
    return {"value": _mean(values), "n": len(values), "prompt": "quality", "model": source}


# ------------------------------------------------------------------------------------------------ ImageReward


def _load_image_reward(spec, device: str):
    path = _existing_path(spec, "ImageReward checkpoint")
    checkpoint = path / "ImageReward.pt" if path.is_dir() else path
    med_config = checkpoint.parent / "med_config.json"
    for needed in (checkpoint, med_config):
        if not needed.is_file():
            raise _Skip(f"ImageReward: {needed} not found (ImageReward.pt and med_config.json of THUDM/ImageReward)")
    from ImageReward.ImageReward import ImageReward as RewardModel

    model = RewardModel(med_config=str(med_config), device=device)
    model.load_state_dict(torch.load(checkpoint, map_location="cpu", weights_only=True), strict=False)
    return model.to(device=device, dtype=torch.float32).eval()


def _image_reward(images, captions, spec, device: str, batch_size: int) -> dict:
    from PIL import Image

    if spec is None:
        raise _Skip("no ImageReward checkpoint configured")
    if hasattr(spec, "score"):
        scorer, source = spec, type(spec).__name__
    else:
        try:
            import ImageReward  # noqa: F401 - the optional package, only when this metric is asked for
        except ImportError:
            raise _Skip(IMAGE_REWARD_MISSING) from None
        scorer, source = _load_image_reward(spec, device), str(spec)
    values = []
    with _progress(len(images), "image_reward", batch_size) as bar:
        for a, caption in zip(images, captions, strict=True):
            values.append(float(scorer.score(caption, Image.fromarray(a))))
            bar.update(1)
    return {"value": _mean(values), "n": len(values), "model": source}


# ------------------------------------------------------------------------------------------------ entry point


def compute_metrics(names: Sequence[str], *, images: Sequence[np.ndarray], captions: Sequence[str],
                    references: Sequence[np.ndarray] | None = None, real_images: Sequence[np.ndarray] | None = None,
                    models: MetricModels = _NO_MODELS, fid_cache: str | Path | None = None, device: str = "cpu",
                    batch_size: int = 16) -> dict[str, dict]:
    """Every metric of ``names`` (see the module docstring): ``{"value": ..., "n": ..., ...}`` or
    ``{"skipped": reason}``, in the order asked. Unknown names raise ``ValueError`` before any work."""
    names = list(dict.fromkeys(names))
    unknown = [n for n in names if n not in METRICS]
    if unknown:
        raise ValueError(f"unknown metrics {unknown}; choose from {', '.join(METRICS)}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    models = models if models is not None else MetricModels()
    images = _as_arrays(images, "images")
    references = None if references is None else _as_arrays(references, "references")
    real_images = None if real_images is None else _as_arrays(real_images, "real_images")
    if references is not None:
        if len(references) != len(images):
            raise ValueError(f"{len(references)} references for {len(images)} images")
        for i, (a, b) in enumerate(zip(images, references, strict=True)):
            if a.shape != b.shape:
                raise ValueError(f"images[{i}] is {list(a.shape)} but references[{i}] is {list(b.shape)}")
    if {"clip_score", "image_reward"} & set(names) and len(captions) != len(images):
        raise ValueError(f"{len(captions)} captions for {len(images)} images")
    results: dict[str, dict] = {}
    clip = None
    with torch.inference_mode():
        for name in names:
            try:
                if not images:
                    raise _Skip("no images")
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
                elif name in ("clip_score", "clip_iqa"):
                    clip = clip or _load_clip(models.clip)
                    results[name] = (_clip_score(images, captions, clip, device, batch_size) if name == "clip_score"
                                     else _clip_iqa(images, clip, device, batch_size))
                else:
                    results[name] = _image_reward(images, captions, models.image_reward, device, batch_size)
            except _Skip as reason:
                results[name] = {"skipped": str(reason)}
    return results
