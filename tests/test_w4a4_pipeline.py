"""End to end on the tiny default: infinity_w4a4_test.py (baseline, W4A4, W4A4 + INT8 KV cache) and the kernel
micro-benchmark's CPU smoke run."""

from __future__ import annotations

import json
import runpy
import sys
from pathlib import Path

import pytest

from deepcompressor.bench import w4a4 as kernel_bench
from deepcompressor.bench.w4a4_pipeline import main

ROOT = Path(__file__).resolve().parents[1]
TINY = [str(ROOT / "configs/models/infinity-tiny.yaml"), str(ROOT / "configs/svdquant/int4.yaml")]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("w4a4")
    argv = TINY + [str(ROOT / "configs/edge/memory.yaml"), "--pipeline-device", "cpu", "--warmup", "0", "--repeats", "1", "--kv-synthetic",
                   "--quant-low-rank-rank", "16", "--json", str(out / "tiny.json")]
    assert main(argv) == 0
    return json.loads((out / "tiny.json").read_text())


def test_tiny_run_reports_every_variant_and_stage(tiny_run):
    variants = tiny_run["variants"]
    assert list(variants) == ["baseline", "w4a4", "w4a4_kv8", "w4a4_kv4"]
    for stats in variants.values():
        assert set(stats["median_seconds"]) == {"text_encoder", "transformer", "vae_decode", "total"}
        assert all(v > 0 for v in stats["median_seconds"].values())
    assert tiny_run["image_hw"] == [128, 128]
    quant = tiny_run["quantization"]
    # 7 linears in each of the 6 blocks; the cross-attention key/value projection keeps 16-bit inputs.
    assert (quant["num_layers"], quant["w4a4_inputs"], quant["weight_only"]) == (42, 36, 6)
    assert quant["source"] == "synthetic" and tiny_run["kv"]["synthetic"] is True
    assert tiny_run["memory_options"] == {"release_text_encoder": True, "vae_tiled": True, "vae_tile_rows": 64,
                                          "nonblock_dtype": "bfloat16",
                                          "cuda_graph_pool": "one pool shared by the scales"}


def test_tiny_run_holds_less_memory_and_stays_close_to_the_baseline(tiny_run):
    base, w4a4, kv8, kv4 = (tiny_run["variants"][k] for k in ("baseline", "w4a4", "w4a4_kv8", "w4a4_kv4"))
    # float32 blocks on CPU: the quantized linears hold about 1/8 of their float bytes (plus branch and scales).
    assert w4a4["transformer_gib"] < 0.5 * base["transformer_gib"]
    assert w4a4["kv_cache_gib"] == base["kv_cache_gib"]
    assert kv8["kv_cache_gib"] == pytest.approx(w4a4["kv_cache_gib"] / 4)  # uint8 codes vs float32
    assert kv4["kv_cache_gib"] == pytest.approx(w4a4["kv_cache_gib"] / 8)  # two uint4 codes per byte
    assert (kv8["kv_dtype"], kv4["kv_dtype"]) == ("uint8", "uint4")
    for stats in (base, w4a4, kv8, kv4):
        assert stats["text_encoder_gib"] > 0 and stats["vae_gib"] > 0
        assert stats["jetson"] == {"needed_gib": None, "module": None}  # no GPU peak on the CPU
    for stats in (w4a4, kv8, kv4):
        agreement = stats["bit_agreement_vs_baseline"]
        assert 0.7 < agreement["overall"] < 1.0  # quantized (not identical) but far from chance (0.5)
        assert agreement["per_scale"][0] > 0.9


def test_missing_quantization_is_a_clear_error(capsys):
    assert main([TINY[0], "--pipeline-device", "cpu"]) == 2
    assert "stack configs/svdquant/int4.yaml" in capsys.readouterr().err


def test_top_level_script_is_the_same_program(monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["infinity_w4a4_test.py", "--dump-config", *TINY])
    with pytest.raises(SystemExit) as stop:
        runpy.run_path(str(ROOT / "infinity_w4a4_test.py"), run_name="__main__")
    assert stop.value.code == 0
    assert "sint4" in capsys.readouterr().out


def test_kernel_benchmark_cpu_smoke(tmp_path):
    path = tmp_path / "kernels.json"
    assert kernel_bench.main(["--device", "cpu", "--arch", "tiny", "--rows", "2", "64", "--replays", "1",
                              "--json", str(path)]) == 0
    res = json.loads(path.read_text())
    assert [(r["layer"], r["M"], r["N"], r["K"]) for r in res["rows"]] == [
        (layer, m, n, k) for layer, n, k in (("sa.mat_qkv", 768, 256), ("sa.proj|ca.mat_q|ca.proj", 256, 256),
                                             ("ffn.fc1", 1024, 256), ("ffn.fc2", 256, 1024)) for m in (2, 64)]
    for row in res["rows"]:
        assert set(row["ms"]) == {"bf16", "torch"} and row["device"] == "cpu"  # no CUDA backend on CPU
        assert row["speedup_layer_vs_bf16"] == row["ms"]["bf16"] / row["ms"]["torch"]
        assert row["check_vs_torch_path_rel"] == 0.0  # CPU runs the PyTorch path itself
        assert 0.01 < row["quant_error_vs_16bit_rel"] < 0.5  # 4-bit, with random (unsearched) smoothing
        assert row["resident_bytes"]["w4a4_layer"] < row["resident_bytes"]["bf16"]
    assert res["generation"] == []  # only on GPU by default
    assert res["complete"] is True


def test_generation_rows_are_the_1024_schedule_with_cfg():
    rows = kernel_bench.generation_rows()
    assert rows[:3] == [2, 8, 32] and rows[-2:] == [4608, 8192] and len(rows) == 13


def test_gpu_check_passes_on_correct_kernels():
    """The GPU correctness check of deepcompressor.bench.w4a4_gpu, run under the interpreter at a small shape."""
    import torch

    from deepcompressor.bench.w4a4_gpu import check_shape

    row = check_shape(40, 128, "uint4", False, "sint4", True, device=torch.device("cpu"), seed=0, tokens=24)
    assert row["passed"], row
    assert row["float32"]["rel_err_vs_fake_quant"] < 1e-5
    assert row["bfloat16"]["rel_err_vs_float64"] < 2**-7


# ------------------------------------------------------------------------------------------------ artifacts


def _write_tiny_artifacts(directory):
    """A PTQ artifact directory of the tiny model written through the artifact writer, with round-to-nearest
    layers around seeded random smoothing and low-rank factors (what calibration would search for)."""
    import torch
    from infinity.pipeline import pipeline_from_config

    from deepcompressor.app.diffusion.artifacts import write_artifacts, write_manifest
    from deepcompressor.app.diffusion.capture import model_identity
    from deepcompressor.calib.layer import quant_config_for_kind
    from deepcompressor.config import load_config
    from deepcompressor.nn.fake_linear import FakeQuantLinear
    from deepcompressor.nn.layer_map import block_layer_names
    from deepcompressor.quant import quantize

    cfg = load_config(TINY, {"pipeline.device": "cpu", "quant.low_rank.rank": 8})
    pipe = pipeline_from_config(cfg.pipeline)
    model = pipe.transformer
    identity = model_identity(cfg.pipeline, model, pipe.text_encoder)
    fp_numel = sum(t.numel() for t in model.state_dict().values())
    gen = torch.Generator().manual_seed(0)
    entries = {}
    for block in model.block_names():
        for name, kind in block_layer_names(block):
            linear, layer_cfg = model.get_submodule(name), quant_config_for_kind(cfg.quant, kind)
            w = linear.weight.detach().float()
            s = torch.empty(w.shape[1]).uniform_(-0.5, 0.5, generator=gen).exp() if layer_cfg.ipts.dtype else None
            l1, l2 = torch.randn(w.shape[0], 8, generator=gen) * 0.02, torch.randn(8, w.shape[1], generator=gen) * 0.02
            residual = (w * s if s is not None else w) - l1 @ l2
            fake = FakeQuantLinear(linear.in_features, linear.out_features, bias=linear.bias,
                                   qweight=quantize(residual, layer_cfg.wgts), smooth_scale=s, lowrank_l1=l1,
                                   lowrank_l2=l2, wgts=layer_cfg.wgts, ipts=layer_cfg.ipts, name=name)
            state, meta = fake.artifact_state(pack=True)
            smooth = None if s is None else {"scale": s, "alpha": 0.5, "beta": 0.5, "folded_into": None}
            entries[name] = {"kind": kind, "state": state, "meta": meta, "smooth": smooth}
            model.set_submodule(name, fake)
    write_artifacts(directory, cfg, model, entries, fp_numel)
    write_manifest(directory, {**identity, "name": cfg.pipeline.name}, {n: e["kind"] for n, e in entries.items()}, {})


def test_artifacts_become_w4a4_layers_that_compute_the_fake_quant_model(tmp_path):
    import torch
    from infinity.tiny import build_tiny_transformer

    from deepcompressor.app.diffusion.artifacts import apply_artifacts, load_artifacts
    from deepcompressor.bench.w4a4_pipeline import w4a4_from_artifacts
    from deepcompressor.nn.w4a4_linear import w4a4_layers

    _write_tiny_artifacts(tmp_path / "art")

    def logits(model):
        from infinity.sampler import sample
        from infinity.schedules import get_scale_schedule

        kv = torch.randn(5, model.arch.text_channels, generator=torch.Generator().manual_seed(1))
        schedule = get_scale_schedule("0.06M", 1.0)
        return sample(model, kv, [5], schedule, cfg=3.0, seed=0, return_logits=True).logits

    fake_model = build_tiny_transformer(0, "cpu", torch.float32)
    apply_artifacts(fake_model, load_artifacts(tmp_path / "art"))
    real_model = build_tiny_transformer(0, "cpu", torch.float32)
    _, names = w4a4_from_artifacts(real_model, tmp_path / "art", backend="torch")
    assert len(names) == 42 and set(w4a4_layers(real_model)) == set(names)
    ref, got = logits(fake_model), logits(real_model)
    # The first scales agree to float32 rounding; later ones may differ where a value sits on a 4-bit rounding
    # boundary (the two paths sum in different orders), which then spreads.
    for a, b in zip(ref[:2], got[:2]):
        assert ((a - b).norm() / a.norm()).item() < 1e-5

    out = tmp_path / "run.json"
    assert main(TINY[:1] + ["--pipeline-device", "cpu", "--artifacts", str(tmp_path / "art"), "--warmup", "0",
                            "--repeats", "1", "--json", str(out)]) == 0
    res = json.loads(out.read_text())
    assert res["quantization"]["source"] == "artifacts" and res["quantization"]["num_layers"] == 42
    assert 0.7 < res["variants"]["w4a4"]["bit_agreement_vs_baseline"]["overall"] < 1.0


def test_artifacts_of_another_architecture_are_refused(tmp_path, capsys):
    _write_tiny_artifacts(tmp_path / "art")
    argv = ["configs/svdquant/int4.yaml", "--pipeline-arch", "2b", "--pipeline-random-init", "--pipeline-device",
            "cpu", "--artifacts", str(tmp_path / "art")]
    assert main(argv) == 2
    assert "made for Infinity-tiny" in capsys.readouterr().err


def test_seed_command_runs_as_written(tmp_path, monkeypatch, capsys):
    """The original project's command on the tiny model: ``--base-path`` artifacts, ``--enable_kv_quant true``
    reading ``kv.calib_path``'s default (a clear error while it is missing), the images saved next to the JSON."""
    import torch
    from infinity.tiny import build_tiny_transformer

    from deepcompressor.bench.w4a4_pipeline import synthetic_kv_calibration
    from deepcompressor.utils.files import save_pt

    _write_tiny_artifacts(tmp_path / "art")
    monkeypatch.chdir(tmp_path)
    argv = [TINY[0], "--base-path", "art", "--enable_kv_quant", "true", "--prompt",
            "A cinematic photo of a robot in Zurich", "--seed", "0"]
    assert main(argv) == 2
    assert "runs/kv_scales/kv_quant_calib.pt does not exist" in capsys.readouterr().err
    save_pt(tmp_path / "runs/kv_scales/kv_quant_calib.pt",
            synthetic_kv_calibration(build_tiny_transformer(0, "cpu", torch.float32)))
    assert main(argv) == 0
    out = tmp_path / "runs/w4a4_test"
    res = json.loads((out / "infinity-tiny.json").read_text())
    assert list(res["variants"]) == ["baseline", "w4a4", "w4a4_kv8", "w4a4_kv4"]
    assert res["quantization"]["source"] == "artifacts" and res["quantization"]["num_layers"] == 42
    assert res["prompt"] == "A cinematic photo of a robot in Zurich" and res["kv"]["synthetic"] is False
    assert {name: Path(path).name for name, path in res["images"].items()} == {
        name: f"infinity-tiny.{name}.png" for name in res["variants"]}
    assert all((out / f"infinity-tiny.{name}.png").is_file() for name in res["variants"])
    table = capsys.readouterr().out
    assert "w4a4_kv4" in table and "Jetson" in table

    off = argv[:4] + ["false", "--skip-baseline", "--json", str(tmp_path / "off.json")]
    assert main(off) == 0
    assert list(json.loads((tmp_path / "off.json").read_text())["variants"]) == ["w4a4"]
    assert main(argv[:4] + ["maybe"]) == 2
    assert "--enable_kv_quant: expected true or false" in capsys.readouterr().err
