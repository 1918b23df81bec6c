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
    argv = TINY + ["--pipeline-device", "cpu", "--warmup", "0", "--repeats", "1", "--kv-synthetic",
                   "--quant-low-rank-rank", "16", "--json", str(out / "tiny.json")]
    assert main(argv) == 0
    return json.loads((out / "tiny.json").read_text())


def test_tiny_run_reports_every_variant_and_stage(tiny_run):
    variants = tiny_run["variants"]
    assert list(variants) == ["baseline", "w4a4", "w4a4_kv"]
    for stats in variants.values():
        assert set(stats["median_seconds"]) == {"text_encoder", "transformer", "vae_decode", "total"}
        assert all(v > 0 for v in stats["median_seconds"].values())
    assert tiny_run["image_hw"] == [128, 128]
    quant = tiny_run["quantization"]
    # 7 linears in each of the 6 blocks; the cross-attention key/value projection keeps 16-bit inputs.
    assert (quant["num_layers"], quant["w4a4_inputs"], quant["weight_only"]) == (42, 36, 6)
    assert quant["source"] == "synthetic" and tiny_run["kv"]["synthetic"] is True


def test_tiny_run_holds_less_memory_and_stays_close_to_the_baseline(tiny_run):
    base, w4a4, kv = (tiny_run["variants"][k] for k in ("baseline", "w4a4", "w4a4_kv"))
    # float32 blocks on CPU: the quantized linears hold about 1/8 of their float bytes (plus branch and scales).
    assert w4a4["transformer_gib"] < 0.5 * base["transformer_gib"]
    assert w4a4["kv_cache_gib"] == base["kv_cache_gib"]
    assert kv["kv_cache_gib"] == pytest.approx(w4a4["kv_cache_gib"] / 4)  # uint8 codes vs float32
    for stats in (w4a4, kv):
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
    assert kernel_bench.main(["--device", "cpu", "--arch", "tiny", "--tokens", "32", "--repeats", "1", "--warmup",
                              "0", "--json", str(path)]) == 0
    res = json.loads(path.read_text())
    assert [(r["layer"], r["M"], r["N"], r["K"]) for r in res["rows"]] == [
        ("sa.mat_qkv", 64, 768, 256), ("sa.proj|ca.mat_q|ca.proj", 64, 256, 256), ("ffn.fc1", 64, 1024, 256),
        ("ffn.fc2", 64, 256, 1024)]
    for row in res["rows"]:
        assert set(row["ms"]) >= {"bf16", "w4a4_gemm", "w4a4_gemm_lr", "act_quant", "layer"}
        assert row["check_vs_torch_path_rel"] == 0.0  # CPU runs the PyTorch path itself
        assert 0.01 < row["quant_error_vs_16bit_rel"] < 0.5  # 4-bit, with random (unsearched) smoothing
        assert row["weight_bytes"]["w4a4_layer"] < row["weight_bytes"]["bf16"]  # rank 32 is large at tiny widths


def test_gpu_check_passes_on_correct_kernels():
    """The GPU correctness check of deepcompressor.bench.w4a4_gpu, run under the interpreter at a small shape."""
    import torch

    from deepcompressor.bench.w4a4_gpu import check_shape

    row = check_shape(40, 128, "uint4", False, "sint4", True, device=torch.device("cpu"), seed=0, tokens=24)
    assert row["passed"], row
    assert row["float32"]["rel_err_vs_fake_quant"] < 1e-5
    assert row["bfloat16"]["rel_err_vs_float64"] < 2**-7
