"""Small randomly initialised models for the quality metrics in tests: a CNN feature extractor (FID through
torchmetrics' custom-feature option), a CNN of several feature maps (LPIPS) and a tiny CLIP saved as a local
transformers folder with a hand-written tokenizer vocabulary (nothing is downloaded)."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn


class SmallFeatures(nn.Module):
    """uint8 ``[N, 3, H, W]`` -> ``[N, 16]`` (FID features)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Conv2d(3, 8, 3, stride=2), nn.ReLU(), nn.Conv2d(8, 16, 3, stride=2), nn.ReLU(),
                                 nn.AdaptiveAvgPool2d(1), nn.Flatten())

    def forward(self, x):
        return self.net(x.float() / 255.0).double()


class SmallPyramid(nn.Module):
    """Images in [-1, 1] -> two feature maps (LPIPS)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(1)
        self.a = nn.Conv2d(3, 8, 3, stride=2)
        self.b = nn.Conv2d(8, 8, 3, stride=2)

    def forward(self, x):
        fa = torch.relu(self.a(x))
        return [fa, torch.relu(self.b(fa))]


def tiny_clip_folder(folder: Path) -> Path:
    """A random 1-layer CLIP (hidden 32, 32x32 images) with its processor, saved with ``save_pretrained``."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTokenizer

    folder = Path(folder)
    if (folder / "config.json").is_file():
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for c in "abcdefghijklmnopqrstuvwxyz":
        vocab[c] = len(vocab)
        vocab[c + "</w>"] = len(vocab)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    tokenizer = CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"))
    torch.manual_seed(2)
    model = CLIPModel(CLIPConfig(
        text_config={"vocab_size": len(vocab), "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
                     "num_attention_heads": 2, "max_position_embeddings": 77},
        vision_config={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2,
                       "image_size": 32, "patch_size": 8},
        projection_dim=16))
    processor = CLIPProcessor(image_processor=CLIPImageProcessor(size={"shortest_edge": 32},
                                                                 crop_size={"height": 32, "width": 32}),
                              tokenizer=tokenizer)
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


class FixedReward:
    """An ImageReward stand-in: the image's mean brightness, whatever the prompt."""

    def score(self, prompt: str, image) -> float:
        import numpy as np

        return float(np.asarray(image).mean() / 255.0)


def small_metric_models(folder: Path):
    from evaluation.metrics import MetricModels

    return MetricModels(inception=SmallFeatures(), clip=str(tiny_clip_folder(Path(folder) / "clip")),
                        lpips=SmallPyramid(), image_reward=FixedReward())
