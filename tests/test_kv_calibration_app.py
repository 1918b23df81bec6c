"""The KV calibration app end to end on the tiny model (one prompt, small token budget)."""

from pathlib import Path

import pytest
import torch

from deepcompressor.app.diffusion import calibrate_cache_quantization as app
from deepcompressor.calib.kv import search_clipping_bounds
from deepcompressor.config import load_config
from deepcompressor.nn.kv_cache import KVRecorder, attach_kv_qparams, detach_kv_qparams, load_kv_calibration

REPO = Path(__file__).resolve().parents[1]
TINY = str(REPO / "configs" / "models" / "infinity-tiny.yaml")


@pytest.fixture(scope="module")
def tiny():
    from infinity.pipeline import load_pipeline

    return load_pipeline("tiny", device="cpu")


def tiny_config(tmp_path, **overrides):
    settings = {
        "pipeline.pn": "0.06M",
        "collect.num_prompts": 1,
        "kv.max_tokens": 256,
        "kv.golden_iters": 4,
        "kv.calib_path": str(tmp_path / "kv" / "calib.pt"),
    }
    return load_config([TINY], settings | overrides)


def test_calibration_writes_a_valid_file_that_matches_an_independent_search(tiny, tmp_path):
    cfg = tiny_config(tmp_path)
    result = app.run_calibration(cfg, pipeline_factory=lambda _: tiny, progress=False)
    path = Path(cfg.kv.calib_path)
    assert result.path == path and path.is_file()
    assert path.with_suffix(".config.yaml").is_file() and path.with_suffix(".json").is_file()
    data = load_kv_calibration(path)
    arch = tiny.arch
    assert data["model"]["arch"] == "tiny" and data["model"]["name"] == cfg.pipeline.name
    assert data["qparams"]["uint8"]["scale"].shape == (arch.depth, 2, arch.num_heads, arch.head_dim)
    assert data["settings"]["tokens_sampled_per_block"] == 256

    # The same recording and search, done here: block 2's V at 4 bits must come out identical.
    with KVRecorder(tiny.transformer, 256, seed=cfg.collect.seed) as recorder:
        tiny.generate([load_first_prompt()], seed=cfg.collect.seed, cfg=cfg.pipeline.cfg, tau=cfg.pipeline.tau,
                      top_k=cfg.pipeline.top_k, top_p=cfg.pipeline.top_p, pn="0.06M")  # fmt: skip
    rows = recorder.values[2].rows
    found = search_clipping_bounds(rows, 4, cfg.kv.num_grids, cfg.kv.golden_iters)
    stored = data["qparams"]["uint4"]
    assert torch.equal(stored["scale"][2, 1], found.scale.view(arch.num_heads, arch.head_dim))
    assert torch.equal(stored["zero"][2, 1], found.zero.view(arch.num_heads, arch.head_dim))
    assert torch.equal(stored["mse"][2, 1], found.mse.view(arch.num_heads, arch.head_dim))
    # INT4 error exceeds INT8 error everywhere it matters; both are usable by the cache.
    assert stored["mse"].mean() > data["qparams"]["uint8"]["mse"].mean()
    attach_kv_qparams(tiny.transformer, path, "uint4")
    try:
        image = tiny.generate(["a lighthouse"], seed=0, pn="0.06M").images
        assert image.dtype == torch.uint8
    finally:
        detach_kv_qparams(tiny.transformer)


def load_first_prompt() -> str:
    from deepcompressor.app.diffusion.capture import load_prompt_set

    return load_prompt_set("qdiff", 0, 1)[0][1]


def test_missing_artifact_directory_is_a_clear_error(tmp_path, capsys):
    cfg = tiny_config(tmp_path, **{"kv.artifact_dir": str(tmp_path / "no_such_run")})
    with pytest.raises(app.KVCalibrationRunError, match="kv.artifact_dir: .*no_such_run.*not found"):
        app.run_calibration(cfg, pipeline_factory=lambda _: pytest.fail("the model must not be built"))
    code = app.main([TINY, "--kv-artifact-dir", str(tmp_path / "no_such_run"), "--kv-calib-path",
                     str(tmp_path / "out.pt")])  # fmt: skip
    assert code == 1
    assert "kv.artifact_dir" in capsys.readouterr().err
    assert not (tmp_path / "out.pt").exists()


def test_calibration_through_the_w4a4_model_of_a_ptq_run(tmp_path):
    from deepcompressor.app.diffusion.ptq_infinity import run_ptq
    from deepcompressor.nn.fake_linear import FakeQuantLinear

    chain = [TINY] + [str(REPO / "configs" / name) for name in ("collect/qdiff.yaml", "svdquant/int4.yaml",
                                                                "svdquant/fast.yaml")]  # fmt: skip
    small = {"pipeline.pn": "0.06M", "collect.num_prompts": 1, "quant.max_tokens": 128, "quant.smooth.num_grids": 2,
             "quant.low_rank.rank": 4, "quant.low_rank.num_iters": 1, "quant.calib_range.num_grids": 2,
             "eval.num_prompts": 1, "output.root": str(tmp_path / "runs"),
             "collect.cache_dir": str(tmp_path / "cache")}  # fmt: skip
    ptq = run_ptq(load_config(chain, small), tmp_path / "ptq")
    cfg = tiny_config(tmp_path, **{"kv.artifact_dir": str(ptq.directory)})
    built = []

    def build(pipeline_cfg):
        from infinity.pipeline import pipeline_from_config

        built.append(pipeline_from_config(pipeline_cfg))
        return built[-1]

    result = app.run_calibration(cfg, pipeline_factory=build, progress=False)
    assert result.data["model"]["artifact_dir"] == str(ptq.directory)
    model = built[0].transformer
    assert any(isinstance(m, FakeQuantLinear) for m in model.modules())  # K/V were recorded through W4A4 layers
    # The scales serve the quantized model (the K/V-relevant weights are untouched by weight quantization).
    attach_kv_qparams(model, result.path)
    assert detach_kv_qparams(model)


def _another_models_file(tiny, path):
    """A valid calibration file of the tiny architecture whose weight fingerprints are not the tiny model's."""
    from deepcompressor.bench.w4a4_pipeline import synthetic_kv_calibration
    from deepcompressor.utils.files import save_pt

    data = synthetic_kv_calibration(tiny.transformer)
    data["model"] = dict(data["model"], kv_fingerprint="0" * 64, name="someone-else")
    save_pt(path, data)
    return path.read_bytes()


def test_a_kv_file_of_another_model_is_not_overwritten(tiny, tmp_path, capsys):
    cfg = tiny_config(tmp_path)
    path = Path(cfg.kv.calib_path)
    path.parent.mkdir(parents=True)
    before = _another_models_file(tiny, path)
    with pytest.raises(app.KVOutputInUseError, match="another Infinity-tiny model .*kv_fingerprint.*--force"):
        app.run_calibration(cfg, pipeline_factory=lambda _: tiny, progress=False)
    assert path.read_bytes() == before
    app.run_calibration(cfg, pipeline_factory=lambda _: tiny, progress=False, force=True)
    assert path.read_bytes() != before
    # Calibrating the same model again replaces its own file without --force.
    app.run_calibration(cfg, pipeline_factory=lambda _: tiny, progress=False)


def test_a_file_that_is_no_kv_calibration_or_of_another_arch_stops_the_app_before_the_model(tmp_path, capsys,
                                                                                             monkeypatch):
    import infinity.pipeline

    built = []
    monkeypatch.setattr(infinity.pipeline, "pipeline_from_config", lambda *a, **k: built.append(1))
    path = tmp_path / "kv.pt"
    path.write_text("not a torch file")
    with pytest.raises(SystemExit) as stop:
        app.main([TINY, "--kv-calib-path", str(path)])
    code = stop.value.code
    err = capsys.readouterr().err
    assert code == 2 and not built and "not overwriting it" in err and err.count("\n") == 1
    assert path.read_text() == "not a torch file"
