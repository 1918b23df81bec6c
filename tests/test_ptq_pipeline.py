"""End to end on the tiny model: artifacts, the loader's checks, resumption, and the reported fidelity."""

from __future__ import annotations

import contextlib
import io
import json
import shutil

import pytest
import torch

from deepcompressor.app.diffusion.artifacts import ArtifactError, apply_artifacts, load_artifacts
from deepcompressor.app.diffusion.fidelity import FidelityReference, teacher_forced_logits
from deepcompressor.app.diffusion.ptq_infinity import PTQError, main, run_ptq
from deepcompressor.config import load_config
from deepcompressor.nn.fake_linear import FakeQuantLinear
from deepcompressor.utils.files import load_pt

CHAIN = ["configs/models/infinity-tiny.yaml", "configs/collect/qdiff.yaml", "configs/svdquant/int4.yaml",
         "configs/svdquant/gptq.yaml"]
# Small but complete: every method of the chain runs (smoothing with folding, low-rank branch, range search, GPTQ).
SMALL = {"pipeline.device": "cpu", "collect.num_prompts": 2, "quant.max_tokens": 256, "quant.smooth.num_grids": 4,
         "quant.low_rank.rank": 8, "quant.low_rank.num_iters": 2, "quant.calib_range.num_grids": 4,
         "eval.num_prompts": 1}


def _flags(values: dict) -> list[str]:
    return [arg for key, value in values.items() for arg in ("--set", f"{key}={value}")]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """One PTQ run through the command line; returns (artifact dir, config, printed text)."""
    root = tmp_path_factory.mktemp("ptq")
    values = dict(SMALL, **{"output.root": str(root / "runs"), "collect.cache_dir": str(root / "cache")})
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        assert main(CHAIN + _flags(values)) == 0
    cfg = load_config(CHAIN, values)
    directory = root / "runs" / "infinity-tiny.qdiff.int4.gptq"
    return directory, cfg, stdout.getvalue()


def _tensors(directory) -> dict[str, torch.Tensor]:
    """Every tensor of model.pt, smooth.pt and branch.pt by a flat key."""
    flat = {}

    def visit(prefix, value):
        if isinstance(value, torch.Tensor):
            flat[prefix] = value
        elif isinstance(value, dict):
            for k, v in value.items():
                visit(f"{prefix}/{k}", v)

    for name in ("model.pt", "smooth.pt", "branch.pt"):
        visit(name, load_pt(directory / name))
    return flat


def test_artifacts_are_written_and_validate(run):
    directory, cfg, printed = run
    summary = printed.strip().splitlines()
    start = summary.index(f"artifacts: {directory}")
    summary = summary[start:]
    assert "bit agreement" in summary[1] and "round-to-nearest" in summary[2] and summary[3] == "next:"
    assert [line.split()[2] for line in summary[4:6]] == ["deepcompressor.app.diffusion.calibrate_cache_quantization",
                                                           "evaluation.benchmark_assembled_model"]
    assert all(str(directory) in line for line in summary[4:]) and "infinity_w4a4_test.py" in summary[6]
    for name in ("model.pt", "smooth.pt", "branch.pt", "config.yaml", "manifest.json", "fidelity.json",
                 "fidelity.md", "ptq.log"):
        assert (directory / name).is_file(), name
    bundle = load_artifacts(directory, expected_config=cfg)
    assert len(bundle.layers) == 6 * 7
    manifest = bundle.manifest
    assert set(manifest["files"]) == {"model.pt", "smooth.pt", "branch.pt", "config.yaml", "fidelity.json",
                                      "fidelity.md"}
    assert manifest["packages"]["torch"] == torch.__version__
    assert manifest["model"]["transformer_fingerprint"] and manifest["model"]["arch"] == "tiny"
    assert "ca_norm" in "".join(s["folded_into"] or "" for s in bundle.scales.values())
    assert "smoothing alpha" in (directory / "ptq.log").read_text()


def test_weights_are_int4_packed_and_a_quarter_of_bf16(run):
    directory, _, _ = run
    bundle = load_artifacts(directory)
    code_bytes = scale_bytes = dense = 0
    for entry in bundle.layers.values():
        state, meta = entry["state"], entry["meta"]
        out_f, in_f = meta["out_features"], meta["in_features"]
        codes = state["qweight.codes"]
        assert meta["qweight"]["packed"] and codes.dtype == torch.uint8 and tuple(codes.shape) == (out_f, in_f // 2)
        assert "weight" not in state  # no float copy of a quantized weight
        code_bytes += codes.numel()
        scale_bytes += state["qweight.scale"].numel() * state["qweight.scale"].element_size()
        dense += 2 * out_f * in_f
    # 4 bits per weight plus one fp16 scale per 64 weights: (0.5 + 2 / 64) / 2 of the bf16 bytes
    assert (code_bytes + scale_bytes) / dense == pytest.approx((0.5 + 2 / 64) / 2, rel=1e-6)
    sizes = bundle.manifest["sizes"]
    assert sizes["model_pt_over_bf16"] == pytest.approx((directory / "model.pt").stat().st_size / sizes["bf16_bytes"])
    assert sizes["model_pt_over_bf16"] < 0.5


def test_reported_logit_error_is_what_the_loaded_model_gives(run):
    from infinity.pipeline import load_pipeline

    directory, cfg, _ = run
    report = json.loads((directory / "fidelity.json").read_text())
    refs = [FidelityReference.from_state(s) for s in load_pt(directory / "state" / "fp_reference.pt")["references"]]
    schedule = [[1, h, w] for h, w in [(1, 1), (2, 2), (4, 4), (6, 6), (8, 8), (12, 12), (16, 16)]]
    p = cfg.pipeline
    model = load_pipeline("tiny", device="cpu", seed=0).transformer

    def rel_error(m):
        num = den = 0.0
        for ref in refs:
            logits = teacher_forced_logits(m, ref.kv_compact, ref.lens, schedule, ref.next_inputs, cfg=p.cfg,
                                           h_div_w=p.h_div_w)
            for a, b in zip(logits, ref.logits):
                num += float((a.double() - b.double()).square().sum())
                den += float(b.double().square().sum())
        return (num / den) ** 0.5

    assert rel_error(model) == 0.0
    apply_artifacts(model, load_artifacts(directory))
    assert sum(isinstance(m, FakeQuantLinear) for m in model.modules()) == 42
    measured = rel_error(model)
    assert measured == pytest.approx(report["model_level"]["logit_rel_error"], rel=1e-6)
    assert 0.01 < measured < 1.0
    assert 0.5 < report["model_level"]["bit_agreement"] < 1.0
    layers = report["layers"]
    assert len(layers) == 42
    assert sum(r["error_final"] for r in layers) < sum(r["error_rtn"] for r in layers)


def test_resumed_run_gives_identical_artifacts(run, tmp_path):
    directory, cfg, _ = run
    values = dict(SMALL, **{"output.root": str(tmp_path), "collect.cache_dir": cfg.collect.cache_dir})
    cfg2 = load_config(CHAIN, values)

    def interrupt(index):
        if index == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_ptq(cfg2, tmp_path / "resumed", on_block_done=interrupt)
    assert sorted(p.name for p in (tmp_path / "resumed" / "state").glob("block_*.pt")) == [
        "block_000.pt", "block_001.pt", "block_002.pt"]
    result = run_ptq(cfg2, tmp_path / "resumed")
    assert result.blocks_calibrated == [3, 4, 5]
    expected, got = _tensors(directory), _tensors(tmp_path / "resumed")
    assert sorted(expected) == sorted(got)
    for key, tensor in expected.items():
        assert torch.equal(tensor, got[key]), key
    # a different quant config may not continue this state
    with pytest.raises(PTQError, match="different model, calibration data or quant"):
        run_ptq(load_config(CHAIN, dict(values, **{"quant.wgts.group_size": 128})), tmp_path / "resumed")


@pytest.fixture
def copy(run, tmp_path):
    directory = tmp_path / "artifacts"
    shutil.copytree(run[0], directory, ignore=shutil.ignore_patterns("state"))
    return directory


def test_loader_rejects_a_corrupted_file(copy):
    data = bytearray((copy / "model.pt").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (copy / "model.pt").write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match=r"model\.pt: sha256 .* does not match the manifest"):
        load_artifacts(copy)


def test_loader_rejects_a_missing_file(copy):
    (copy / "branch.pt").unlink()
    with pytest.raises(ArtifactError, match=r"branch\.pt: missing artifact file"):
        load_artifacts(copy)
    (copy / "manifest.json").unlink()
    with pytest.raises(ArtifactError, match=r"manifest\.json: missing"):
        load_artifacts(copy)


def test_loader_rejects_non_finite_values_naming_the_tensor(copy):
    from deepcompressor.utils.files import save_pt, sha256_file

    data = load_pt(copy / "branch.pt")
    layer = min(data["branches"])
    data["branches"][layer]["l1"][0, 0] = float("inf")
    save_pt(copy / "branch.pt", data)
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["files"]["branch.pt"]["sha256"] = sha256_file(copy / "branch.pt")  # sealed as a bad run would be
    (copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ArtifactError, match=rf"branch\.pt: NaN or Inf values in branches\.{layer}\.l1"):
        load_artifacts(copy)


def test_loader_rejects_a_config_that_does_not_match_the_manifest(copy):
    from deepcompressor.utils.files import sha256_file

    config = copy / "config.yaml"
    config.write_text(config.read_text().replace("seed: 0\n", "seed: 7\n", 1))
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["files"]["config.yaml"]["sha256"] = sha256_file(config)
    (copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ArtifactError, match=r"model\.seed = 0 does not match pipeline\.seed = 7"):
        load_artifacts(copy)


def test_loader_rejects_a_different_expected_config(run):
    directory, _cfg, _ = run
    other = load_config(CHAIN, dict(SMALL, **{"quant.low_rank.rank": 16}))
    with pytest.raises(ArtifactError, match=r"differs in quant\.low_rank"):
        load_artifacts(directory, expected_config=other)


def test_apply_rejects_another_model(run):
    from infinity.tiny import build_tiny_transformer

    bundle = load_artifacts(run[0])
    with pytest.raises(ArtifactError, match="weights do not match the calibrated model"):
        apply_artifacts(build_tiny_transformer(1, "cpu"), bundle)
    from infinity.checkpoints import random_transformer

    with pytest.raises(ArtifactError, match="artifacts are for Infinity-tiny"):
        apply_artifacts(random_transformer("tiny_p0", 0, "cpu"), bundle)


def test_apply_rejects_unknown_layers_and_shapes(run):
    from infinity.tiny import build_tiny_transformer

    bundle = load_artifacts(run[0])
    name = "block_chunks.0.module.0.ffn.fc1"
    renamed = dict(bundle.layers)
    renamed[name.replace("fc1", "fc3")] = renamed.pop(name)
    bundle_renamed = type(bundle)(**{**bundle.__dict__, "layers": renamed})
    model = build_tiny_transformer(0, "cpu")
    with pytest.raises(ArtifactError, match=r"layer block_chunks\.0\.module\.0\.ffn\.fc3 is not a linear layer"):
        apply_artifacts(model, bundle_renamed)
    assert not any(isinstance(m, FakeQuantLinear) for m in model.modules())  # nothing was touched
    reshaped = {k: dict(v) for k, v in bundle.layers.items()}
    reshaped[name]["meta"] = dict(reshaped[name]["meta"], out_features=512)
    with pytest.raises(ArtifactError, match=r"ffn\.fc1 is 512x256, the model's is 1024x256"):
        apply_artifacts(model, type(bundle)(**{**bundle.__dict__, "layers": reshaped}))
    params = dict(bundle.params)
    params["block_chunks.0.module.0.ca_norm.weight"] = torch.ones(3)
    with pytest.raises(ArtifactError, match=r"ca_norm\.weight has shape \(3,\)"):
        apply_artifacts(model, type(bundle)(**{**bundle.__dict__, "params": params}))


def test_non_block_layers_must_stay_unquantized(tmp_path):
    cfg = load_config(CHAIN, dict(SMALL, **{"quant.wgts.skips": ["embed", "adaln", "text_proj"]}))
    with pytest.raises(PTQError, match="quant.wgts.skips: .* add head"):
        run_ptq(cfg, tmp_path)


def test_size_estimate_matches_the_written_model_pt(run):
    from infinity.checkpoints import build_meta_model

    from deepcompressor.app.diffusion.artifacts import estimate_model_pt_bytes

    directory, cfg, _ = run
    estimate = estimate_model_pt_bytes(build_meta_model("tiny"), cfg.quant)
    written = (directory / "model.pt").stat().st_size
    assert estimate["total"] <= written < 1.02 * estimate["total"]
    assert estimate["bf16"] == load_artifacts(directory).manifest["sizes"]["bf16_bytes"]


def test_benchmark_times_blocks_and_extrapolates(tmp_path, capsys):
    from deepcompressor.bench.ptq import main as bench_main

    small = tmp_path / "small.yaml"
    small.write_text("collect:\n  num_prompts: 2\nquant:\n  max_tokens: 256\n  smooth:\n    num_grids: 2\n"
                     "  low_rank:\n    num_iters: 1\n  calib_range:\n    num_grids: 2\neval:\n  num_prompts: 1\n")
    report_path = tmp_path / "bench.json"
    assert bench_main(["--arch", "tiny", "--device", "cpu", "--blocks", "1", "--config", str(small),
                       "--workdir", str(tmp_path / "work"), "--json", str(report_path)]) == 0
    printed = capsys.readouterr().out
    assert "calibration, 6 blocks (EXTRAPOLATED)" in printed
    report = json.loads(report_path.read_text())
    s = report["seconds"]
    assert report["blocks_timed"] == 1 and not report["complete"]
    assert s["calibration_extrapolated"] == pytest.approx(6 * s["blocks"][0])
    assert s["ptq_total_extrapolated"] > s["collect"] + s["calibration_extrapolated"]


def test_an_interrupted_start_over_leaves_no_previous_sealed_artifacts(run, tmp_path):
    directory, cfg, _ = run
    copy = tmp_path / "run"
    shutil.copytree(directory, copy)
    load_artifacts(copy)  # a sealed folder loads
    values = dict(SMALL, **{"output.root": str(tmp_path), "collect.cache_dir": str(cfg.collect.cache_dir),
                            "output.resume": False})
    result = run_ptq(load_config(CHAIN, values), copy, max_blocks=1)  # stops before writing artifacts
    assert not result.complete
    for name in ("manifest.json", "model.pt", "smooth.pt", "branch.pt", "fidelity.json"):
        assert not (copy / name).exists(), name
    with pytest.raises(ArtifactError, match="did not finish"):
        load_artifacts(copy)


def test_config_problems_are_all_reported_before_any_model_is_built(tmp_path, capsys, monkeypatch):
    import infinity.pipeline

    built = []
    monkeypatch.setattr(infinity.pipeline, "pipeline_from_config", lambda *a, **k: built.append(1))
    prompts = tmp_path / "p.yaml"
    prompts.write_text("a: one\nb: two\n", encoding="utf-8")
    argv = CHAIN + ["--quant-wgts-group-size", "96", "--quant-low-rank-rank", "300", "--quant-wgts-skips",
                    "ffn_down", "--collect-prompts", str(prompts), "--output-root", str(tmp_path / "runs")]
    assert main(argv) == 2
    err = capsys.readouterr().err.splitlines()
    assert not built and not (tmp_path / "runs").exists()
    assert all(line.startswith("ptq_infinity: error: ") for line in err) and "Traceback" not in "".join(err)
    joined = "\n".join(err)
    assert "quant.wgts.skips: PTQ quantizes the transformer blocks only; add" in joined  # skips replaced the list
    assert "quant.wgts.group_size: 96 does not divide the 256 inputs of Infinity-tiny sa_qkv" in joined
    assert "quant.low_rank.rank: 300 exceeds the smaller side of Infinity-tiny sa_out (256 outputs x 256 inputs)" \
        in joined
    assert "collect.prompts: prompts 0..11 requested" in joined and "eval.prompt_offset: prompts 512..515" in joined


@pytest.mark.parametrize("app", ["deepcompressor.app.diffusion.ptq_infinity",
                                 "deepcompressor.app.diffusion.calibrate_cache_quantization",
                                 "evaluation.activations_measurements"])
def test_missing_checkpoint_paths_stop_every_app_before_the_model(app, tmp_path, capsys, monkeypatch):
    import importlib

    import infinity.pipeline

    built = []
    monkeypatch.setattr(infinity.pipeline, "pipeline_from_config", lambda *a, **k: built.append(1))
    argv = ["configs/models/infinity-tiny.yaml", "--pipeline-transformer-path", str(tmp_path / "nope.pth"),
            "--output-root", str(tmp_path / "runs")]
    main_fn = importlib.import_module(app).main
    try:
        code = main_fn(argv)
    except SystemExit as stop:
        code = stop.code
    err = capsys.readouterr().err
    assert code == 2 and not built and not (tmp_path / "runs").exists()
    assert f"pipeline.transformer_path: {tmp_path / 'nope.pth'} does not exist" in err and "Traceback" not in err


def test_a_checkpoint_of_the_wrong_shape_is_one_line_in_ptq(tmp_path, capsys):
    bogus = tmp_path / "other.pth"
    torch.save({"not_a_layer.weight": torch.ones(2, 2)}, bogus)
    argv = ["configs/models/infinity-tiny.yaml", "configs/svdquant/int4.yaml", "--pipeline-transformer-path",
            str(bogus), "--pipeline-device", "cpu", "--output-root", str(tmp_path / "runs")]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and str(bogus) in err and "Traceback" not in err
