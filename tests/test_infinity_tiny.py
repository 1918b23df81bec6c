"""Embedded tiny Infinity: determinism, the pipeline and CLI, and the outlier statistics it claims to carry."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from infinity.kv_cache import KVCache, LayerKVCache
from infinity.pipeline import images_to_uint8_rgb, load_pipeline
from infinity.tiny import TINY_ARCH, build_tiny_transformer, tiny_weights
from infinity.vae import image_to_uint8_bgr
from PIL import Image
from scipy.stats import kurtosis, skew

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = yaml.safe_load((ROOT / "deepcompressor" / "data" / "prompts" / "qdiff.yaml").read_text())
TWO_PROMPTS = [PROMPTS["0002"], PROMPTS["0004"]]


@pytest.fixture(scope="module")
def tiny_pipeline():
    return load_pipeline("tiny", seed=0, device="cpu")


class RecordingLayer(LayerKVCache):
    """Keeps every post-norm, post-RoPE key handed to the cache, as ``[B*L, H*c]`` rows."""

    def __init__(self, sink: list) -> None:
        super().__init__()
        self.sink = sink

    def attend(self, q, k, v, *, store):
        self.sink.append(k.permute(0, 2, 1, 3).reshape(-1, k.shape[1] * k.shape[3]).double())
        return super().attend(q, k, v, store=store)


@pytest.fixture(scope="module")
def tiny_activations(tiny_pipeline):
    """fc2 inputs and cached keys of every block, from one CFG generation of two real prompts."""
    model = tiny_pipeline.transformer
    depth = len(model.blocks())
    fc2_inputs = [[] for _ in range(depth)]
    keys = [[] for _ in range(depth)]
    hooks = [
        block.ffn.fc2.register_forward_pre_hook(
            lambda m, args, i=i: fc2_inputs[i].append(args[0].reshape(-1, args[0].shape[-1]).double())
        )
        for i, block in enumerate(model.blocks())
    ]
    factory = model.kv_cache_factory
    model.kv_cache_factory = lambda m: KVCache([RecordingLayer(keys[i]) for i in range(depth)])
    try:
        result = tiny_pipeline.generate(TWO_PROMPTS, seed=0, cfg=3.0, tau=0.5)
    finally:
        model.kv_cache_factory = factory
        for hook in hooks:
            hook.remove()
    return result, [torch.cat(x).numpy() for x in fc2_inputs], [torch.cat(k).numpy() for k in keys]


def test_tiny_weights_are_seeded_and_deterministic():
    a, b, c = tiny_weights(0), tiny_weights(0), tiny_weights(1)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["head.weight"], c["head.weight"])
    model = build_tiny_transformer(0, device="cpu")
    assert model.arch is TINY_ARCH and len(model.blocks()) == 6
    assert torch.equal(
        model.state_dict()["block_chunks.1.module.1.ffn.fc1.weight"], a["block_chunks.1.module.1.ffn.fc1.weight"]
    )
    bf16 = build_tiny_transformer(0, device="cpu", dtype="bfloat16")
    assert bf16.blocks()[0].sa.mat_qkv.weight.dtype == torch.bfloat16 and bf16.head.weight.dtype == torch.float32


def test_tiny_outlier_statistics_hold(tiny_activations):
    _, fc2_inputs, keys = tiny_activations
    ratios, kurts, key_skews, cv_pairs = [], [], [], []
    for x, k in zip(fc2_inputs, keys):
        a = np.abs(x)
        ratios.append(a.max() / np.median(a))
        kurts.append(kurtosis(x.ravel(), fisher=True))
        key_skews.append(np.nanmax(np.abs(skew(k, axis=0))))
        chan_range, tok_range = k.max(0) - k.min(0), k.max(1) - k.min(1)
        cv_pairs.append((chan_range.std() / chan_range.mean(), tok_range.std() / tok_range.mean()))
    # FFN down-projection inputs: a few hidden channels fire hundreds of times above the median in some blocks.
    assert max(ratios) >= 100, ratios
    assert 200 <= max(ratios) <= 600, ratios
    assert sum(r >= 100 for r in ratios) >= 2, ratios
    assert min(ratios) < 50, "ordinary blocks should stay ordinary"
    assert max(kurts) > 100, kurts
    # Cached keys: strongly skewed channels (attention sink), range variation driven by channels.
    assert max(key_skews) >= 5, key_skews
    assert max(key_skews) <= 25, key_skews
    for cv_chan, cv_tok in cv_pairs:
        assert cv_chan > 2 * cv_tok, cv_pairs


def test_tiny_pipeline_generates_rgb_images(tiny_pipeline, tiny_activations):
    result, _, _ = tiny_activations
    assert result.images.shape == (2, 128, 128, 3) and result.images.dtype == torch.uint8
    assert set(result.timings) == {"text_encoder", "transformer", "vae_decode", "total"}
    assert result.sample.summed_codes.shape == (2, 16, 16, 16)
    decoded = tiny_pipeline.vae.decode(result.sample.summed_codes)
    assert torch.equal(result.images, images_to_uint8_rgb(decoded))
    assert torch.equal(result.images, image_to_uint8_bgr(decoded).flip(-1))
    assert result.images.float().std() > 5, "image should not be flat"
    again = tiny_pipeline.generate(TWO_PROMPTS[:1], seed=0, cfg=3.0, tau=0.5, pn="0.06M")
    assert again.images.shape == (1, 128, 128, 3)


def test_generate_cli_writes_the_png(tmp_path, capsys, tiny_pipeline):
    from infinity.generate import main

    out = tmp_path / "img.png"
    argv = [str(ROOT / "configs" / "models" / "infinity-tiny.yaml"), "--prompt", TWO_PROMPTS[0], "--seed", "3"]
    argv += ["--out", str(out), "--pipeline-pn", "0.06M", "--pipeline-device", "cpu", "--pipeline-seed", "0"]
    argv += ["--pipeline-cfg", "3", "--pipeline-tau", "0.5", "--pipeline-top-k", "900", "--pipeline-top-p", "0.97"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "transformer" in printed and "vae_decode" in printed and "peak RSS" in printed
    image = np.asarray(Image.open(out))
    assert image.shape == (128, 128, 3)
    expected = tiny_pipeline.generate(TWO_PROMPTS[:1], seed=3, cfg=3.0, tau=0.5, top_k=900, top_p=0.97, pn="0.06M")
    assert np.array_equal(image, expected.images[0].numpy()), "PNG must hold the RGB image of the same generation"
