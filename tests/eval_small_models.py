"""Small randomly initialised models for the quality metrics in tests (nothing is downloaded): a CNN feature
extractor for FID (torchmetrics' custom-feature option), a CNN of two feature maps for LPIPS, an ImageReward
stand-in, and a one-layer CLIP saved as a local transformers folder with a hand-written tokenizer vocabulary."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn


def _seeded(seed: int, build):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build()


class Features(nn.Module):
    """FID features: uint8 ``[N, 3, H, W]`` -> ``[N, 4]``; records the batch sizes it sees."""

    num_features = 4  # torchmetrics reads it instead of running a dummy image

    def __init__(self, seed: int = 0):
        super().__init__()
        self.net = _seeded(seed, lambda: nn.Sequential(nn.Conv2d(3, 8, 3, stride=2), nn.ReLU(),
                                                       nn.Conv2d(8, 4, 3, stride=2), nn.AdaptiveAvgPool2d(1),
                                                       nn.Flatten()))
        self.seen: list[int] = []

    def forward(self, x):
        assert x.dtype == torch.uint8
        self.seen.append(x.shape[0])
        return self.net(x.float() / 255.0)


class Pyramid(nn.Module):
    """LPIPS features: images in [-1, 1] -> two feature maps."""

    def __init__(self, seed: int = 1):
        super().__init__()
        self.a, self.b = _seeded(seed, lambda: (nn.Conv2d(3, 8, 3, stride=2), nn.Conv2d(8, 6, 3, stride=2)))

    def forward(self, x):
        fa = torch.relu(self.a(x))
        return [fa, torch.relu(self.b(fa))]


class Brightness:
    """An ImageReward stand-in: the mean brightness of the image; records the prompts."""

    def __init__(self):
        self.prompts: list[str] = []

    def score(self, prompt: str, image) -> float:
        assert isinstance(image, Image.Image)
        self.prompts.append(prompt)
        return float(np.asarray(image).mean() / 255.0)


def _tiny_clip(folder: Path) -> Path:
    """A random one-layer CLIP (hidden 32, 32x32 images, patch 8, 16 text positions) and its processor, with a
    tokenizer built from a hand-written vocabulary (letters and '.', no merges), saved with ``save_pretrained``."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTokenizer

    folder.mkdir(parents=True, exist_ok=True)
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for c in "abcdefghijklmnopqrstuvwxyz.":
        vocab[c] = len(vocab)
        vocab[c + "</w>"] = len(vocab)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    tokenizer = CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"))
    config = CLIPConfig(
        text_config={"vocab_size": len(vocab), "hidden_size": 32, "intermediate_size": 48, "num_hidden_layers": 1,
                     "num_attention_heads": 2, "max_position_embeddings": 16, "bos_token_id": 0, "eos_token_id": 1,
                     "pad_token_id": 1},
        vision_config={"hidden_size": 32, "intermediate_size": 48, "num_hidden_layers": 1, "num_attention_heads": 2,
                       "image_size": 32, "patch_size": 8},
        projection_dim=256)  # wide: random embeddings nearly orthogonal, CLIP-IQA's 100 x cos not saturated
    model = _seeded(2, lambda: CLIPModel(config))
    image_processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    model.save_pretrained(folder)
    CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(folder)
    return folder


def small_metric_models(folder: Path):
    """Every metric's model, small: for runs of the whole benchmark in tests."""
    from evaluation.metrics import MetricModels

    clip = Path(folder) / "clip"
    if not (clip / "config.json").is_file():
        _tiny_clip(clip)
    return MetricModels(inception=Features(), clip=str(clip), lpips=Pyramid(), image_reward=Brightness())
