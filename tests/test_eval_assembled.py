"""The quality benchmark end to end on the tiny model: the seed's command (reference, then quantized), each toggle,
resume, the checks before any generation, and torchrun with two gloo processes."""

from __future__ import annotations

import contextlib
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from deepcompressor.app.diffusion.ptq_infinity import main as ptq_main
from evaluation.benchmark_assembled_model import EvalError, main, translate_seed_flags

REPO = Path(__file__).resolve().parents[1]
TINY = "configs/models/infinity-tiny.yaml"
# The cheapest complete PTQ: plain round-to-nearest W4A4, one calibration prompt, a few samples.
PTQ_CHAIN = [TINY, "configs/collect/qdiff.yaml", "configs/ablations/naive.yaml"]
PTQ_SMALL = {"pipeline.device": "cpu", "collect.num_prompts": 1, "eval.num_prompts": 1, "quant.num_samples": 4,
             "quant.max_tokens": 128}
SEED_METRICS = ["clip_iqa", "clip_score", "fid", "image_reward", "psnr", "ssim", "lpips"]


def _flags(values: dict) -> list[str]:
    return [arg for key, value in values.items() for arg in ("--set", f"{key}={value}")]


def _quiet(argv: list[str]) -> int:
    with contextlib.redirect_stdout(io.StringIO()):
        return main(argv)


@pytest.fixture(scope="module")
def ptq_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval_assembled")
    values = dict(PTQ_SMALL, **{"output.root": str(root / "runs"), "collect.cache_dir": str(root / "cache")})
    with contextlib.redirect_stdout(io.StringIO()):
        assert ptq_main(PTQ_CHAIN + _flags(values)) == 0
    return root, root / "runs" / "infinity-tiny.qdiff.naive"


def test_seed_flags_become_config_flags():
    seed = ["a.yaml", "--ref-root", "R", "--gen-root", "G", "--base-path", "B", "--enable_weight_quant", "true",
            "--enable_activation_quant", "True", "--enable_kv_quant", "false", "--eval-benchmarks", "MJHQ", "DCI",
            "--eval-num-samples", "5000", "--eval-gt-metrics", *SEED_METRICS]
    assert translate_seed_flags(seed) == [
        "a.yaml", "--eval-ref-root", "R", "--eval-gen-root", "G", "--eval-artifacts", "B",
        "--eval-enable-weight-quant", "--eval-enable-activation-quant", "--no-eval-enable-kv-quant",
        "--eval-benchmarks", "MJHQ,DCI", "--eval-num-samples", "5000", "--eval-gt-metrics", ",".join(SEED_METRICS)]
    # today's flags are aliases
    assert translate_seed_flags(["--artifacts=X", "--out", "Y"]) == ["--eval-artifacts=X", "--eval-gen-root", "Y"]
    with pytest.raises(EvalError, match="--enable_kv_quant: expected true or false, got 'maybe'"):
        translate_seed_flags(["--enable_kv_quant", "maybe"])


def test_the_seed_command_parses_into_the_eval_config():
    from deepcompressor.config import parse_cli

    argv = translate_seed_flags([TINY, "configs/svdquant/int4.yaml", "--ref-root", "REF", "--gen-root", "GEN",
                                 "--base-path", "ARTIFACTS", "--enable_weight_quant", "true",
                                 "--enable_activation_quant", "true", "--enable_kv_quant", "true",
                                 "--eval-benchmarks", "MJHQ", "DCI", "--eval-num-samples", "5000",
                                 "--eval-gt-metrics", *SEED_METRICS])
    cfg, _ = parse_cli("benchmark_assembled_model", argv)
    e = cfg.eval
    assert (e.ref_root, e.gen_root, e.artifacts) == ("REF", "GEN", "ARTIFACTS")
    assert e.enable_weight_quant and e.enable_activation_quant and e.enable_kv_quant
    assert e.benchmarks == ["MJHQ", "DCI"] and e.num_samples == 5000 and e.gt_metrics == SEED_METRICS
    assert cfg.kv.calib_path == "runs/kv_scales/kv_quant_calib.pt"


def test_a_bad_toggle_value_and_an_unknown_metric_exit_2(capsys):
    assert main([TINY, "--enable_weight_quant", "yes please"]) == 2
    assert "--enable_weight_quant: expected true or false" in capsys.readouterr().err
    with pytest.raises(SystemExit) as stop:
        main([TINY, "--eval-gt-metrics", "psnr", "fidelity"])
    assert stop.value.code == 2
    assert "eval.gt_metrics" in capsys.readouterr().err


@pytest.fixture(scope="module")
def reference_and_quantized(ptq_run):
    """Step 1 (every toggle off) into REF, step 2 (W4A4) into GEN scored against REF, with the seed's flags."""
    root, artifacts = ptq_run
    ref, gen = root / "REF", root / "GEN"
    common = [TINY, "configs/svdquant/int4.yaml", "--eval-num-samples", "3", "--eval-gt-metrics", *SEED_METRICS,
              "--set", "pipeline.device=cpu", "--set", f"eval.fid_cache={root / 'fid'}"]
    assert _quiet(common[:2] + ["--gen-root", str(ref)] + common[2:]) == 0
    assert _quiet(common[:2] + ["--ref-root", str(ref), "--gen-root", str(gen), "--base-path", str(artifacts),
                                "--enable_weight_quant", "true", "--enable_activation_quant", "true",
                                "--enable_kv_quant", "false"] + common[2:]) == 0
    return root, ref, gen, artifacts, common


def test_reference_then_quantized_run(reference_and_quantized):
    from evaluation.imageio import read_png

    _, ref, gen, _, _ = reference_and_quantized
    reference = json.loads((ref / "results.json").read_text())
    results = json.loads((gen / "results.json").read_text())
    assert reference["variant"] == "reference" and results["variant"] == "w4a4"
    ids = results["samples"]["smoke"]
    assert len(ids) == 3 and ids == reference["samples"]["smoke"]
    for sample_id in ids:
        a, b = read_png(ref / "samples" / "smoke" / f"{sample_id}.png"), read_png(gen / "samples" / "smoke" /
                                                                                 f"{sample_id}.png")
        assert a.shape == b.shape == (128, 128, 3) and not np.array_equal(a, b)  # W4A4 changes the images
    metrics = results["benchmarks"]["smoke"]["metrics"]
    assert set(metrics) == set(SEED_METRICS)
    assert metrics["psnr"]["value"] > 0 and 0 < metrics["ssim"]["value"] < 1
    for name in ("clip_iqa", "clip_score", "fid", "image_reward", "lpips"):  # no local weights configured
        assert "skipped" in metrics[name] and "value" not in metrics[name], name
    # the reference run has no reference of its own: paired metrics say so
    assert "--ref-root" in reference["benchmarks"]["smoke"]["metrics"]["psnr"]["skipped"]
    assert results["files"]["artifacts.manifest_sha256"]
    assert (gen / "results.md").is_file() and (gen / "grid.png").is_file() and (gen / "config.yaml").is_file()
    grid = read_png(gen / "grid.png")
    assert grid.shape[0] > 3 * 128 and grid.shape[1] > 2 * 128


def test_a_rerun_reuses_the_images_and_recomputes_the_metrics(reference_and_quantized):
    _, ref, gen, artifacts, common = reference_and_quantized
    stamp = {p: p.stat().st_mtime_ns for p in (gen / "samples" / "smoke").glob("*.png")}
    (gen / "results.json").unlink()
    assert _quiet(common[:2] + ["--ref-root", str(ref), "--gen-root", str(gen), "--base-path", str(artifacts),
                                "--enable_weight_quant", "true", "--enable_activation_quant", "true"]
                  + common[2:]) == 0
    results = json.loads((gen / "results.json").read_text())
    assert results["generation_per_rank"] == [{"assigned": 3, "generated": 0, "reused": 3}]
    assert {p: p.stat().st_mtime_ns for p in (gen / "samples" / "smoke").glob("*.png")} == stamp
    # the same folder for another variant is refused (its images would mix)
    with contextlib.redirect_stderr(io.StringIO()) as err:
        assert _quiet(common[:2] + ["--gen-root", str(gen), "--base-path", str(artifacts),
                                    "--enable_weight_quant", "true"] + common[2:]) == 2
    assert "holds the images of another run" in err.getvalue() and "variant" in err.getvalue()


def test_small_models_give_every_model_metric(reference_and_quantized):
    from deepcompressor.config import load_config
    from evaluation.benchmark_assembled_model import run
    from tests.eval_small_models import small_metric_models

    root, ref, gen, artifacts, _ = reference_and_quantized
    names = ["psnr", "ssim", "lpips", "clip_score", "clip_iqa", "fid", "image_reward"]
    cfg = load_config([TINY, "configs/svdquant/int4.yaml"], {
        "pipeline.device": "cpu", "eval.num_samples": 3, "eval.ref_root": str(ref), "eval.gen_root": str(gen),
        "eval.artifacts": str(artifacts), "eval.enable_weight_quant": True, "eval.enable_activation_quant": True,
        "eval.gt_metrics": names, "eval.fid_cache": ""})
    run(cfg, models=small_metric_models(root / "small_models"))  # the images exist: only the metrics run
    results = json.loads((gen / "results.json").read_text())
    metrics = results["benchmarks"]["smoke"]["metrics"]
    for name in names:
        assert isinstance(metrics[name]["value"], float), (name, metrics[name])
    assert metrics["lpips"]["value"] > 0 and metrics["fid"]["reference"] == "generated"
    assert results["generation_per_rank"][0]["generated"] == 0


def test_each_toggle_quantizes_what_it_names(ptq_run, tmp_path):
    from infinity.pipeline import pipeline_from_config

    from deepcompressor.bench.w4a4_pipeline import synthetic_kv_calibration
    from deepcompressor.config import load_config
    from deepcompressor.nn.fake_linear import FakeQuantLinear
    from deepcompressor.nn.kv_cache import QuantizedKVCacheFactory
    from deepcompressor.utils.files import save_pt
    from evaluation.benchmark_assembled_model import _apply_variant, preflight

    _, artifacts = ptq_run
    kv_file = tmp_path / "kv.pt"
    base = {"pipeline.device": "cpu", "eval.num_samples": 1, "eval.artifacts": str(artifacts),
            "kv.calib_path": str(kv_file), "eval.gen_root": str(tmp_path / "g")}
    save_pt(kv_file, synthetic_kv_calibration(pipeline_from_config(load_config([TINY], base).pipeline).transformer))
    seen = {}
    for toggles in ((True, False, False), (False, True, False), (False, False, True), (False, False, False)):
        values = dict(base, **dict(zip(("eval.enable_weight_quant", "eval.enable_activation_quant",
                                        "eval.enable_kv_quant"), toggles, strict=True)))
        cfg = load_config([TINY, "configs/svdquant/int4.yaml"], values)
        pipe = pipeline_from_config(cfg.pipeline)
        _apply_variant(pipe, cfg, preflight(cfg))
        layers = [m for m in pipe.transformer.modules() if isinstance(m, FakeQuantLinear)]
        # (weights quantized, inputs quantized, inputs quantizable: ca.mat_kv reads the text in 16 bits)
        seen[toggles] = ({(m.quant_weights, m.quant_inputs, m.ipts is not None) for m in layers},
                         isinstance(pipe.transformer.kv_cache_factory, QuantizedKVCacheFactory))
    # fake-quantized weights, 16-bit inputs
    assert seen[(True, False, False)] == ({(True, False, True), (True, False, False)}, False)
    # quantized inputs where the config quantizes them, float weights
    assert seen[(False, True, False)] == ({(False, True, True), (False, False, False)}, False)
    assert seen[(False, False, True)] == (set(), True)  # the KV cache alone
    assert seen[(False, False, False)] == (set(), False)  # the reference


def test_problems_stop_the_run_before_any_model(tmp_path, capsys, monkeypatch):
    import infinity.pipeline

    built = []
    monkeypatch.setattr(infinity.pipeline, "pipeline_from_config", lambda *a, **k: built.append(1))
    base = [TINY, "--gen-root", str(tmp_path / "g"), "--set", "pipeline.device=cpu"]
    assert main(base + ["--eval-benchmarks", "MJHQ"]) == 2
    err = capsys.readouterr().err
    assert "eval.mjhq_root" in err and "MJHQ-30K" in err
    missing = tmp_path / "kv.pt"
    assert main(base + ["--enable_kv_quant", "true", "--kv-calib-path", str(missing)]) == 2
    assert f"{missing}: KV calibration file not found" in capsys.readouterr().err
    assert main(base + ["--enable_weight_quant", "true"]) == 2
    assert "--base-path" in capsys.readouterr().err
    assert main(base + ["--enable_weight_quant", "true", "--base-path", str(tmp_path / "nowhere")]) == 2
    assert "artifact directory not found" in capsys.readouterr().err
    assert main(base + ["--ref-root", str(tmp_path / "no_ref")]) == 2
    assert "--ref-root" in capsys.readouterr().err
    assert not built and not (tmp_path / "g").exists()


def test_two_gloo_processes_write_the_same_images_as_one(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET",)}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), str(REPO / "Infinity_rep"), env.get("PYTHONPATH", "")])
    env.update(OMP_NUM_THREADS="1")
    args = [TINY, "--eval-num-samples", "4", "--eval-gt-metrics", "psnr", "--set", "pipeline.device=cpu"]
    one = subprocess.run([sys.executable, "-m", "evaluation.benchmark_assembled_model", *args, "--gen-root",
                          str(tmp_path / "one")], cwd=REPO, env=env, capture_output=True, text=True, timeout=600,
                         check=False)
    assert one.returncode == 0, one.stderr[-2000:]
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port",
                          "29517", "-m", "evaluation.benchmark_assembled_model", *args, "--gen-root",
                          str(tmp_path / "two")], cwd=REPO, env=env, capture_output=True, text=True, timeout=600,
                         check=False)
    assert two.returncode == 0, two.stderr[-3000:]
    files = sorted(p.relative_to(tmp_path / "one") for p in (tmp_path / "one" / "samples").rglob("*.png"))
    assert len(files) == 4
    for rel in files:
        assert (tmp_path / "one" / rel).read_bytes() == (tmp_path / "two" / rel).read_bytes(), rel
    results = json.loads((tmp_path / "two" / "results.json").read_text())
    assert results["world_size"] == 2 and [r["generated"] for r in results["generation_per_rank"]] == [2, 2]
