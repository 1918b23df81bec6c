"""Offloading (``memory.*``): blocks in host memory, streamed generations, the same artifacts as a resident run."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from test_ptq_pipeline import _tensors
from torch import nn

from deepcompressor.app.diffusion import calibrate_cache_quantization as kv_app
from deepcompressor.app.diffusion.memory_plan import (
    EncodedPrompts,
    generation_work_bytes,
    plan_memory,
    resident_blocks_within,
)
from deepcompressor.app.diffusion.ptq_infinity import run_ptq
from deepcompressor.config import load_config
from deepcompressor.config.schema import MemoryConfig
from deepcompressor.nn.offload import BlockOffloader, module_device_bytes

CHAIN = ["configs/models/infinity-tiny.yaml", "configs/collect/qdiff.yaml", "configs/svdquant/int4.yaml",
         "configs/svdquant/fast.yaml"]
SMALL = {"pipeline.device": "cpu", "collect.num_prompts": 2, "quant.max_tokens": 256, "eval.num_prompts": 1,
         "output.resume": False}
GiB = 2**30


def _config(root: Path, offload: str, **extra):
    # Separate capture caches: the offloaded run captures its calibration data with streamed blocks itself.
    values = {**SMALL, "output.root": str(root), "collect.cache_dir": str(root / f"cache-{offload}"),
              "memory.offload": offload, "memory.resident_blocks": 2, **extra}
    return load_config(CHAIN, values)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("offload")
    results = {mode: run_ptq(_config(root, mode), root / mode) for mode in ("off", "on")}
    # a budget (30 MiB) that keeps some blocks on the "device" and offloads others as the phases need
    budget = _config(root / "budget", "on", **{"memory.resident_blocks": -1, "memory.gpu_budget_gib": 0.03})
    results["budget"] = run_ptq(budget, root / "budget" / "run")
    return root, results


@pytest.mark.parametrize("mode", ["on", "budget"])
def test_offloaded_run_writes_the_resident_runs_artifacts(runs, mode):
    root, results = runs
    assert results[mode].memory["offload"] and not results["off"].memory["offload"]
    assert results["on"].memory["resident_blocks"] == 2
    where = root / "budget" / "run" if mode == "budget" else root / mode
    resident, offloaded = _tensors(root / "off"), _tensors(where)
    assert sorted(resident) == sorted(offloaded) and len(resident) > 100
    for key, tensor in resident.items():
        assert torch.equal(tensor, offloaded[key]), key
    fidelity = [json.loads((d / "fidelity.json").read_text())["model_level"] for d in (root / "off", where)]
    assert fidelity[0] == fidelity[1]


def test_an_offloaded_run_resumes_to_the_same_artifacts(runs, tmp_path):
    root, _ = runs
    cfg = _config(tmp_path, "on", **{"output.resume": True, "collect.cache_dir": str(root / "cache-on")})

    def interrupt(index):
        if index == 1:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_ptq(cfg, tmp_path / "resumed", on_block_done=interrupt)
    result = run_ptq(cfg, tmp_path / "resumed")
    assert result.blocks_calibrated == [2, 3, 4, 5]
    expected, got = _tensors(root / "off"), _tensors(tmp_path / "resumed")
    for key, tensor in expected.items():
        assert torch.equal(tensor, got[key]), key


def test_a_callers_pipeline_gets_its_blocks_text_encoder_and_vae_back(tmp_path):
    from infinity.pipeline import pipeline_from_config

    cfg = _config(tmp_path, "on", **{"quant.max_tokens": 64})
    pipe = pipeline_from_config(cfg.pipeline)
    encoder, vae = pipe.text_encoder, pipe.vae
    run_ptq(cfg, tmp_path / "run", pipeline=pipe)
    assert pipe.text_encoder is encoder and pipe.vae is vae
    # every parameter is a plain tensor of the model again (no host copy left behind by the offloader)
    assert all(p.device == pipe.transformer.device for p in pipe.transformer.parameters())


def test_kv_calibration_offloaded_equals_resident(tmp_path):
    from infinity.pipeline import load_pipeline

    data = {}
    for mode in ("off", "on"):
        pipe = load_pipeline("tiny", device="cpu")
        cfg = load_config(CHAIN[:1], {"pipeline.pn": "0.06M", "collect.num_prompts": 1, "kv.max_tokens": 256,
                                      "kv.golden_iters": 4, "kv.calib_path": str(tmp_path / mode / "calib.pt"),
                                      "memory.offload": mode, "memory.resident_blocks": 3})
        result = kv_app.run_calibration(cfg, pipeline_factory=lambda _, p=pipe: p, progress=False)
        data[mode] = result.data["qparams"]
        assert result.timings["memory"]["offload"] == (mode == "on")
    for dtype, tensors in data["off"].items():
        for key, tensor in tensors.items():
            assert torch.equal(tensor, data["on"][dtype][key]), (dtype, key)


# ------------------------------------------------------------------------------------------------ the offloader


class _Block(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.a = nn.Linear(width, width)
        self.b = nn.Linear(width, width)
        self.register_buffer("shift", torch.randn(width))

    def forward(self, x):
        return self.b(torch.relu(self.a(x))) + self.shift


def _blocks(count=4, width=8):
    torch.manual_seed(0)
    return nn.Sequential(*[_Block(width) for _ in range(count)])


def test_streaming_loads_each_block_only_around_its_forward():
    model = _blocks()
    x = torch.randn(3, 8)
    expected = model(x)
    offloader = BlockOffloader(list(model), "cpu")
    offloader.offload_all()
    seen = []
    with offloader.streaming(resident=1):
        for block in model:  # registered after the offloader's hooks: they run after them
            block.register_forward_pre_hook(lambda *_: seen.append([offloader.on_device(j) for j in range(4)]))
        assert offloader.host_blocks() == [1, 2, 3]
        got = model(x)
        assert offloader.host_blocks() == [1, 2, 3]
    assert torch.equal(got, expected)
    # block i is on the device when it runs, and no streamed block other than the running one is
    assert seen == [[True, False, False, False], [True, True, False, False], [True, False, True, False],
                    [True, False, False, True]]
    assert offloader.bytes_copied == 4 * module_device_bytes(model[1])  # the resident block once, three streamed


def test_a_forward_that_raises_leaves_no_streamed_block_on_the_device():
    model = _blocks()
    offloader = BlockOffloader(list(model), "cpu")
    model[2].register_forward_hook(lambda *_: (_ for _ in ()).throw(RuntimeError("stop")))
    with pytest.raises(RuntimeError, match="stop"), offloader.streaming(resident=0):
        model(torch.randn(2, 8))
    assert offloader.host_blocks() == [0, 1, 2, 3]


def test_offload_copies_changes_release_does_not_and_strides_and_ties_are_kept():
    model = _blocks(count=1)
    block = model[0]
    block.b.weight = block.a.weight  # tied
    block.a.bias = nn.Parameter(torch.randn(8, 2).t()[0])  # a strided view
    offloader = BlockOffloader([block], "cpu")
    offloader.offload(0)
    assert block.b.weight.data_ptr() == block.a.weight.data_ptr() and block.a.bias.stride() == (2,)
    offloader.load(0)
    with torch.no_grad():
        block.shift.add_(1.0)
    snapshot = block.shift.clone()
    offloader.offload(0)  # a changed block is copied again
    assert torch.equal(block.shift, snapshot)
    with pytest.raises(RuntimeError, match="no host copy"):
        BlockOffloader([_blocks(count=1)[0]], "cpu").release(0)


def test_load_all_returns_the_blocks_for_good():
    model = _blocks()
    x = torch.randn(2, 8)
    expected = model(x)
    offloader = BlockOffloader(list(model), "cpu")
    offloader.offload_all()
    offloader.load_all()
    assert offloader.host_blocks() == [] and torch.equal(model(x), expected)


# ------------------------------------------------------------------------------------------------ the plan


def test_generation_work_counts_the_8b_kv_cache():
    from infinity.arch import get_arch
    from infinity.schedules import get_scale_schedule

    arch = get_arch("8b")
    schedule = get_scale_schedule("1M", 1.0)
    sizes = [t * h * w for t, h, w in schedule]
    cache = 40 * sum(sizes[:-1]) * 2 * 3584 * 2 * 2  # blocks x stored tokens x CFG rows x width x (K, V) x bf16
    assert cache / GiB == pytest.approx(6.86, abs=0.01)
    work = generation_work_bytes(arch, schedule)
    assert cache < work < cache + 3 * GiB


def test_resident_blocks_fit_the_room_left():
    assert resident_blocks_within(100 * GiB, 10 * GiB, GiB, 40) == 40
    # 22 GiB budget, 1 GiB margin, 9 GiB fixed: 12 blocks of 1 GiB fit, two of them kept for streamed blocks
    assert resident_blocks_within(22 * GiB, 9 * GiB, GiB, 40) == 10
    assert resident_blocks_within(5 * GiB, 9 * GiB, GiB, 40) == 0
    # a small budget keeps 5% free instead of 1 GiB
    assert resident_blocks_within(10 * 2**20, 0, 2**20, 40) == 7


def test_a_changed_block_reuses_its_host_memory():
    model = _blocks()
    offloader = BlockOffloader(list(model), "cpu")
    offloader.offload_all()
    held = offloader.host_bytes
    offloader.load(1)
    model[1].b = nn.Linear(8, 4)  # calibration swaps layers for smaller ones
    offloader.offload(1)
    assert offloader.host_bytes == held
    offloader.load(2)
    offloader.keep(2)  # stays on the device: its host copy is released for later offloads
    assert offloader.host_blocks() == [0, 1, 3]


def test_auto_offloads_only_when_the_model_does_not_fit():
    from infinity.pipeline import load_pipeline
    from infinity.schedules import get_scale_schedule

    model = load_pipeline("tiny", device="cpu").transformer
    schedule = get_scale_schedule("0.06M", 1.0)

    def plan(**cfg):
        return plan_memory(MemoryConfig(**cfg), model, schedule, text_bytes=0, capture_bytes=2**20, max_tokens=256,
                           device=torch.device("cpu"))

    roomy = plan(gpu_budget_gib=8.0)
    assert not roomy.offload and "generates in" in roomy.reason
    tight = plan(gpu_budget_gib=roomy.estimates["blocks"] / GiB)  # the blocks alone: no room to generate
    assert tight.offload and "budget" in tight.reason
    assert tight.resident_blocks < len(model.blocks())
    assert plan(offload="on", gpu_budget_gib=8.0, resident_blocks=2).resident_blocks == 2
    assert not plan(offload="off", gpu_budget_gib=0.001).offload
    assert "offloading" in tight.describe(len(model.blocks()))


def test_encoded_prompts_answer_as_the_encoder_did():
    from infinity.pipeline import load_pipeline

    encoder = load_pipeline("tiny", device="cpu").text_encoder
    encoded = EncodedPrompts(encoder, ["a red cube", "a blue ball", "a red cube"])
    direct = encoder.encode(["a blue ball"])
    got = encoded.encode(["a blue ball"])
    assert torch.equal(got.kv_compact, direct.kv_compact) and got.lens == direct.lens
    with pytest.raises(KeyError, match="encoded ahead of time"):
        encoded.encode(["something else"])


def test_memory_keys_are_checked():
    from deepcompressor.config import ConfigError

    with pytest.raises(ConfigError, match="memory.gpu_budget_gib"):
        load_config(CHAIN[:1], {"memory.gpu_budget_gib": -1})
    with pytest.raises(ConfigError, match="memory.offload"):
        load_config(CHAIN[:1], {"memory.offload": "sometimes"})


def test_the_benchmark_compares_offloaded_and_resident_runs(tmp_path, capsys):
    from deepcompressor.bench.ptq import main as bench_main

    small = tmp_path / "small.yaml"
    small.write_text("collect:\n  num_prompts: 2\nquant:\n  max_tokens: 128\neval:\n  num_prompts: 1\n")
    report_path = tmp_path / "bench.json"
    assert bench_main(["--arch", "tiny", "--device", "cpu", "--fast", "--blocks", "1", "--config", str(small),
                       "--offload", "on", "off", "--workdir", str(tmp_path / "work"), "--json", str(report_path)]) == 0
    printed = capsys.readouterr().out
    assert "memory.offload side by side" in printed and "memory.offload on -> on" in printed
    report = json.loads(report_path.read_text())
    assert report["offload"] == "on" and report["memory_plan"]["offload"]
    assert set(report["runs"]) == {"on", "off"} and not report["runs"]["off"]["memory_plan"]["offload"]
    for key in ("arch", "complete", "blocks_timed", "depth", "date"):
        assert key in report
    assert report["peak_memory"]["GiB"] > 0


def test_expandable_segments_are_asked_for_only_when_offloading_may_happen(monkeypatch):
    from deepcompressor.app.diffusion.memory_plan import prefer_expandable_segments

    monkeypatch.delenv("PYTORCH_CUDA_ALLOC_CONF", raising=False)
    prefer_expandable_segments(MemoryConfig(offload="off"))
    assert "PYTORCH_CUDA_ALLOC_CONF" not in os.environ
    prefer_expandable_segments(MemoryConfig())
    assert os.environ["PYTORCH_CUDA_ALLOC_CONF"] == "expandable_segments:True"
    monkeypatch.setenv("PYTORCH_CUDA_ALLOC_CONF", "max_split_size_mb:128")
    prefer_expandable_segments(MemoryConfig())
    assert os.environ["PYTORCH_CUDA_ALLOC_CONF"] == "max_split_size_mb:128"


@pytest.mark.parametrize("arch,budget", [("8b", 22.0), ("2b", 12.0)])
def test_the_plan_for_the_real_sizes_offloads_within_the_budget(arch, budget):
    """The plan ptq_infinity makes at the issue's budgets, from the shapes alone (meta tensors)."""
    from deepcompressor.bench.ptq import build_config, plan_preview

    cfg = build_config(arch, "cuda", False, [], Path("runs"), {"memory.gpu_budget_gib": budget})
    preview = plan_preview(cfg)
    plan = preview["plan"]
    assert plan["offload"] and plan["activations_on_device"]
    estimates = plan["estimates_GiB"]
    assert estimates["resident_generation"] > budget  # why auto offloads
    # the generations keep what fits next to their cache and activations, with two streamed blocks in flight
    resident_bytes = plan["resident_blocks"] * estimates["block"]
    assert estimates["nonblock"] + resident_bytes + estimates["generation_work"] <= budget - 1.0
    if arch == "8b":
        assert 25 <= plan["resident_blocks"] < 40
        assert estimates["blocks"] == pytest.approx(15.3, abs=0.1)
    assert estimates["nonblock"] + estimates["calibration_work"] <= budget - 1.0  # calibration fits beside no block
