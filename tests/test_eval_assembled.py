"""Fake-quant quality benchmark: metrics against float64 references, and one end-to-end run on the tiny model."""

from __future__ import annotations

import contextlib
import io
import json
import math

import numpy as np
import pytest
import torch

from deepcompressor.app.diffusion.ptq_infinity import main as ptq_main
from evaluation.benchmark_assembled_model import bit_agreement, image_scores, main, psnr_float64

# The cheapest complete PTQ: plain round-to-nearest W4A4, one calibration prompt, a few samples.
PTQ_CHAIN = ["configs/models/infinity-tiny.yaml", "configs/collect/qdiff.yaml", "configs/ablations/naive.yaml"]
PTQ_SMALL = {"pipeline.device": "cpu", "collect.num_prompts": 1, "eval.num_prompts": 1, "quant.num_samples": 4,
             "quant.max_tokens": 128}
EVAL = {"pipeline.device": "cpu", "eval.num_prompts": 2}


def _flags(values: dict) -> list[str]:
    return [arg for key, value in values.items() for arg in ("--set", f"{key}={value}")]


def _psnr_numpy(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float(10 * np.log10(255.0**2 / mse))


def _random_pair(seed: int, noise: int = 20) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    ref = torch.randint(0, 256, (24, 20, 3), generator=gen, dtype=torch.int32)
    image = (ref + torch.randint(-noise, noise + 1, ref.shape, generator=gen, dtype=torch.int32)).clamp(0, 255)
    return image.to(torch.uint8), ref.to(torch.uint8)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_psnr_matches_float64_formula(seed):
    image, ref = _random_pair(seed)
    expected = _psnr_numpy(image.numpy(), ref.numpy())
    assert psnr_float64(image, ref) == pytest.approx(expected, rel=1e-12)
    scores = image_scores(image, ref)
    assert scores["psnr"] == pytest.approx(expected, rel=1e-12)
    assert scores["ssim"] is None or -1.0 <= scores["ssim"] < 1.0


def test_identical_images_give_inf_and_ssim_one():
    image, _ = _random_pair(3)
    assert psnr_float64(image, image.clone()) == math.inf
    scores = image_scores(image, image.clone())
    assert scores["psnr"] == math.inf
    assert scores["ssim"] is None or scores["ssim"] == pytest.approx(1.0, abs=1e-9)
    with pytest.raises(ValueError, match="shape"):
        psnr_float64(image, image[:-1])


def test_bit_agreement_counts_equal_bits():
    gen = torch.Generator().manual_seed(0)
    ref = [torch.randint(0, 2, (1, n, n, 4), generator=gen) for n in (1, 2, 4)]
    flipped = [b.clone() for b in ref]
    flipped[2][0, 0, 0, :3] ^= 1  # 3 of 4 + 16 + 64 = 84 bits
    assert bit_agreement(ref, ref) == 1.0
    assert bit_agreement(flipped, ref) == pytest.approx(81 / 84, rel=1e-12)


@pytest.fixture(scope="module")
def ptq_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval_assembled")
    values = dict(PTQ_SMALL, **{"output.root": str(root / "runs"), "collect.cache_dir": str(root / "cache")})
    with contextlib.redirect_stdout(io.StringIO()):
        assert ptq_main(PTQ_CHAIN + _flags(values)) == 0
    return root, root / "runs" / "infinity-tiny.qdiff.naive"


def test_benchmark_writes_images_and_consistent_scores(ptq_run):
    from infinity.pipeline import pipeline_from_config
    from PIL import Image

    from deepcompressor.config import load_config

    root, artifacts = ptq_run
    out = root / "eval"
    with contextlib.redirect_stdout(io.StringIO()):
        assert main(["configs/models/infinity-tiny.yaml", "--artifacts", str(artifacts), "--out", str(out)]
                    + _flags(EVAL)) == 0
    results = json.loads((out / "results.json").read_text())
    assert (out / "results.md").is_file() and (out / "config.yaml").is_file()
    ids = results["eval"]["prompt_ids"]
    assert ids == ["0512", "0513"]
    rows = results["variants"]["quant"]["per_prompt"]
    assert "kv" in results and "quant_kv" not in results["variants"]

    # The fp images are what the pipeline gives for the same prompt and seed (PNG is lossless).
    cfg = load_config(["configs/models/infinity-tiny.yaml"], EVAL)
    pipe = pipeline_from_config(cfg.pipeline)
    p = cfg.pipeline
    first = pipe.generate([rows[0]["caption"]], seed=cfg.eval.seed, cfg=p.cfg, tau=p.tau, top_k=p.top_k,
                          top_p=p.top_p, pn=p.pn, h_div_w=p.h_div_w).images[0].numpy()
    assert np.array_equal(np.asarray(Image.open(out / "fp" / f"{ids[0]}.png")), first)

    for row in rows:
        fp = np.asarray(Image.open(out / "fp" / f"{row['prompt_id']}.png"))
        quant = np.asarray(Image.open(out / "quant" / f"{row['prompt_id']}.png"))
        assert fp.shape == quant.shape == (128, 128, 3)
        # W4A4 changes the images: the reported PSNR is finite and is the float64 PSNR of the saved images.
        assert not row["identical"] and math.isfinite(row["psnr"])
        assert row["psnr"] == pytest.approx(_psnr_numpy(quant, fp), rel=1e-12)
        assert 0.0 < row["bit_agreement"] < 1.0
    mean = results["variants"]["quant"]["mean"]
    assert mean["psnr"] == pytest.approx(sum(r["psnr"] for r in rows) / len(rows), rel=1e-12)
    assert set(results["timings"]) >= {"build_pipeline", "generate_fp", "apply_artifacts", "generate_quant"}


def test_bad_artifacts_give_clear_errors(ptq_run, tmp_path, capsys):
    _, artifacts = ptq_run
    missing = tmp_path / "nowhere"
    assert main(["configs/models/infinity-tiny.yaml", "--artifacts", str(missing)] + _flags(EVAL)) == 1
    assert f"{missing}: artifact directory not found" in capsys.readouterr().err
    other = dict(EVAL, **{"pipeline.seed": 1})
    assert main(["configs/models/infinity-tiny.yaml", "--artifacts", str(artifacts), "--out", str(tmp_path / "o")]
                + _flags(other)) == 1
    assert "pipeline.seed" in capsys.readouterr().err


def test_a_missing_or_foreign_kv_file_stops_before_the_generations(ptq_run, tmp_path, capsys, monkeypatch):
    import infinity.pipeline

    from deepcompressor.bench.w4a4_pipeline import synthetic_kv_calibration
    from deepcompressor.utils.files import save_pt

    _, artifacts = ptq_run
    built = []
    real_factory = infinity.pipeline.pipeline_from_config
    monkeypatch.setattr(infinity.pipeline, "pipeline_from_config", lambda *a, **k: built.append(1))
    missing = tmp_path / "kv.pt"
    argv = ["configs/models/infinity-tiny.yaml", "--artifacts", str(artifacts), "--out", str(tmp_path / "o"),
            "--kv-calib-path", str(missing)] + _flags(dict(EVAL, **{"kv.enabled": True}))
    assert main(argv) == 1
    assert f"{missing}: KV calibration file not found" in capsys.readouterr().err and not built
    assert not (tmp_path / "o").exists()
    # A file of another model of the same architecture: refused once the model is built, before any generation.
    monkeypatch.setattr(infinity.pipeline, "pipeline_from_config", real_factory)
    pipe = real_factory(__import__("deepcompressor.config", fromlist=["load_config"]).load_config(
        ["configs/models/infinity-tiny.yaml"], EVAL).pipeline)
    data = synthetic_kv_calibration(pipe.transformer)
    data["model"] = dict(data["model"], kv_fingerprint="0" * 64)
    save_pt(missing, data)
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert "other Infinity-tiny" in err and "weights" in err
    assert not list((tmp_path / "o").glob("fp/*.png"))  # no generation ran
