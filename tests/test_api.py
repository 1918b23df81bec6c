"""The Python entry points: ``quantize`` a loaded pipeline, ``load_quantized`` from artifacts alone; the same
artifacts and the same image as the command-line path."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from test_ptq_pipeline import _tensors  # every tensor of an artifact directory by a flat key

from deepcompressor import load_config, load_quantized, quantize
from deepcompressor.app.diffusion import ptq_infinity
from deepcompressor.bench import w4a4_pipeline

ROOT = Path(__file__).resolve().parents[1]
CHAIN = [str(ROOT / "configs/models/infinity-tiny.yaml"), str(ROOT / "configs/collect/qdiff.yaml"),
         str(ROOT / "configs/svdquant/int4.yaml"), str(ROOT / "configs/svdquant/fast.yaml")]
SMALL = {"pipeline.device": "cpu", "collect.num_prompts": 2, "quant.max_tokens": 256, "quant.low_rank.rank": 8,
         "eval.num_prompts": 1}
PROMPT, SEED = "A cinematic photo of a robot in Zurich", 3


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("api")
    values = dict(SMALL, **{"collect.cache_dir": str(root / "cache"), "output.root": str(root / "runs")})
    flags = [arg for key, value in values.items() for arg in ("--set", f"{key}={value}")]
    assert ptq_infinity.main(CHAIN + flags) == 0
    cli_dir = root / "runs" / "infinity-tiny.qdiff.int4.fast"

    from infinity.pipeline import pipeline_from_config

    cfg = load_config(CHAIN, values)
    pipe = quantize(pipeline_from_config(cfg.pipeline), cfg, out_dir=root / "api")
    return cli_dir, root / "api", cfg, pipe, root


def test_quantize_writes_the_artifacts_the_command_line_writes(runs):
    cli_dir, api_dir, _, pipe, _ = runs
    cli, api = _tensors(cli_dir), _tensors(api_dir)
    assert set(cli) == set(api)
    assert all(torch.equal(cli[key], api[key]) for key in cli)
    assert pipe.quantization["fidelity"]["bit_agreement"] > 0.5
    layers = [m for m in pipe.transformer.modules() if type(m).__name__ == "FakeQuantLinear"]
    assert len(layers) == 42  # returned quantized in memory (the simulation, as the PTQ calibrated it)


def test_load_quantized_generates_the_image_of_the_command_line_path(runs):
    cli_dir, api_dir, cfg, _, root = runs
    out = root / "bench.json"
    assert w4a4_pipeline.main([CHAIN[0], "--base-path", str(cli_dir), "--skip-baseline", "--pipeline-device", "cpu",
                               "--warmup", "0", "--repeats", "1", "--prompt", PROMPT, "--seed", str(SEED),
                               "--json", str(out)]) == 0
    from PIL import Image

    cli_image = torch.from_numpy(__import__("numpy").array(Image.open(json.loads(out.read_text())["images"]["w4a4"])))
    pipe = load_quantized(api_dir, device="cpu")
    p = cfg.pipeline
    image = pipe.generate([PROMPT], seed=SEED, cfg=p.cfg, tau=p.tau, top_k=p.top_k, top_p=p.top_p, pn=p.pn,
                          h_div_w=p.h_div_w).images[0]
    assert torch.equal(image, cli_image)
    assert sum(type(m).__name__ == "W4A4Linear" for m in pipe.transformer.modules()) == 42


def test_load_quantized_fake_equals_the_quantized_pipeline(runs):
    _, api_dir, cfg, pipe, _ = runs
    fake = load_quantized(api_dir, device="cpu", real=False)
    a = pipe.generate([PROMPT], seed=SEED, pn=cfg.pipeline.pn)
    b = fake.generate([PROMPT], seed=SEED, pn=cfg.pipeline.pn)
    assert torch.equal(a.images, b.images)


def test_quantize_refuses_a_config_of_another_model(runs):
    from deepcompressor.config import ConfigError

    _, _, _, pipe, _ = runs
    other = load_config(CHAIN, {**SMALL, "pipeline.arch": "2b", "pipeline.random_init": True})
    with pytest.raises(ConfigError, match="pipeline.arch"):
        quantize(pipe, other)


def test_quantize_with_kv_enabled_calibrates_and_attaches_the_cache(runs, tmp_path):
    from infinity.pipeline import pipeline_from_config

    from deepcompressor.nn.kv_cache import QuantizedKVCacheFactory

    root = runs[4]
    values = dict(SMALL, **{"collect.cache_dir": str(root / "cache"), "kv.enabled": True, "kv.max_tokens": 256})
    kv_cfg = load_config(CHAIN, values)
    pipe = quantize(pipeline_from_config(kv_cfg.pipeline), kv_cfg, out_dir=tmp_path / "art")
    assert (tmp_path / "art" / "kv_quant_calib.pt").is_file()
    assert isinstance(pipe.transformer.kv_cache_factory, QuantizedKVCacheFactory)
    reloaded = load_quantized(tmp_path / "art", device="cpu")  # the KV file next to the artifacts is attached
    assert isinstance(reloaded.transformer.kv_cache_factory, QuantizedKVCacheFactory)
